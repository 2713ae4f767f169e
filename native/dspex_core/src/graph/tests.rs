//! Tests of the graph, with the property test of the invariants in [the
//! module docs](super).

use super::*;
use proptest::prelude::*;

fn n(i: usize) -> Value {
    Value::str(&format!("v{i}"))
}

fn add(g: &mut DependencyGraph, from: &str, to: &str) -> Result<bool> {
    g.add_edge(&Value::atom(from), &Value::atom(to), DEFAULT_EDGE_TYPE)
}

fn atoms(names: &[&str]) -> Vec<Value> {
    names.iter().map(|n| Value::atom(n)).collect()
}

#[test]
fn closing_a_cycle_is_rejected_with_its_path() {
    let mut g = DependencyGraph::new();
    assert_eq!(add(&mut g, "a", "b"), Ok(true));
    assert_eq!(add(&mut g, "b", "c"), Ok(true));
    assert_eq!(
        add(&mut g, "c", "a"),
        Err(Error::WouldCreateCycle(Value::List(
            atoms(&["c", "a", "b", "c"]).into()
        )))
    );
    assert_eq!(g.edge_count(), 2);
    assert!(g.is_consistent());
    assert_eq!(add(&mut g, "a", "a"), Err(Error::SelfDependency));
}

#[test]
fn diamond_update_order_puts_the_join_last() {
    let mut g = DependencyGraph::new();
    for (f, t) in [("c", "d"), ("b", "d"), ("a", "c"), ("a", "b")] {
        add(&mut g, f, t).unwrap();
    }
    let order = g.update_order(&atoms(&["a"]));
    assert_eq!(order.len(), 4);
    assert_eq!(order[0], Value::atom("a"));
    assert_eq!(order[3], Value::atom("d"));
    assert_eq!(g.update_order(&atoms(&["b"])), atoms(&["b", "d"]));
    assert_eq!(
        g.update_order(&atoms(&["zz", "d"])),
        atoms(&["zz", "d"]),
        "a name without edges comes first, alone"
    );
    assert_eq!(g.transitive("d", Direction::Dependencies).len(), 3);
    assert_eq!(g.neighbours("a", Direction::Dependents).len(), 2);
}

#[test]
fn atom_and_string_names_are_one_vertex() {
    let mut g = DependencyGraph::new();
    g.add_edge(&Value::atom("a"), &Value::str("b"), "data")
        .unwrap();
    assert_eq!(
        g.add_edge(&Value::str("b"), &Value::atom("a"), "data"),
        Err(Error::WouldCreateCycle(Value::List(
            vec![Value::str("b"), Value::atom("a"), Value::str("b")].into()
        )))
    );
    assert_eq!(g.neighbours("a", Direction::Dependents), [Value::str("b")]);
}

#[test]
fn re_adding_replaces_the_type_and_removal_frees_vertices() {
    let mut g = DependencyGraph::new();
    assert_eq!(
        g.add_edge(&Value::atom("a"), &Value::atom("b"), "data"),
        Ok(true)
    );
    assert_eq!(
        g.add_edge(&Value::atom("a"), &Value::atom("b"), "control"),
        Ok(false)
    );
    assert_eq!(g.edge_type("a", "b"), Some("control"));
    assert!(g.remove_edge("a", "b"));
    assert!(!g.remove_edge("a", "b"));
    assert_eq!(g.vertex_count(), 0);
    // Removal then re-adding the other way round is fine.
    assert_eq!(add(&mut g, "b", "a"), Ok(true));
    assert!(g.is_consistent());
}

#[test]
fn removing_a_vertex_drops_its_edges_and_orphans() {
    let mut g = DependencyGraph::new();
    for (f, t) in [("a", "b"), ("b", "c"), ("x", "b")] {
        add(&mut g, f, t).unwrap();
    }
    assert_eq!(g.remove_vertex("b"), 3);
    assert!(g.is_empty());
    assert_eq!(g.vertex_count(), 0);
    assert_eq!(add(&mut g, "c", "a"), Ok(true));
    assert!(g.is_consistent());
}

#[test]
fn an_insert_over_budget_changes_nothing() {
    let names: Vec<Value> = (0..100).map(n).collect();
    let mut g = DependencyGraph::new();
    for w in names.windows(2) {
        g.add_edge(&w[0], &w[1], "data").unwrap();
    }
    // v99 -> v0 is fine only after the chain moves: a 100-vertex search.
    let x = Value::atom("x");
    g.add_edge(&names[99], &x, "data").unwrap();
    assert_eq!(
        g.add_edge_within(&x, &names[0], "data", 10),
        Ok(Insert::OverBudget)
    );
    assert_eq!(g.edge_count(), 100);
    assert!(g.is_consistent());
    assert_eq!(
        g.add_edge_within(&names[0], &x, "data", 10),
        Ok(Insert::Added),
        "an insert the order already allows needs no search"
    );
    match g.add_edge_within(&x, &names[0], "data", 1_000) {
        Err(Error::WouldCreateCycle(_)) => {}
        other => panic!("{other:?}"),
    }
    g.remove_edge("v99", "x");
    g.remove_edge("v0", "x");
    assert_eq!(
        g.add_edge_within(&x, &names[0], "data", 1_000),
        Ok(Insert::Added)
    );
    assert!(g.is_consistent());
}

#[test]
fn bad_input_is_an_error() {
    let mut g = DependencyGraph::new();
    assert!(g
        .add_edge(&Value::Int(1), &Value::atom("a"), "data")
        .is_err());
    assert!(g
        .add_edge(&Value::str(""), &Value::atom("a"), "data")
        .is_err());
    assert!(g
        .add_edge(&Value::atom("a"), &Value::atom("b"), "")
        .is_err());
    let mut small = DependencyGraph::with_max_edges(1);
    add(&mut small, "a", "b").unwrap();
    assert!(matches!(
        add(&mut small, "b", "c"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(g.is_empty());
}

#[test]
fn renders_dot_and_mermaid_with_escaping() {
    let mut g = DependencyGraph::new();
    add(&mut g, "a", "b").unwrap();
    g.add_edge(&Value::str("q\"x"), &Value::atom("b"), "control")
        .unwrap();
    let dot = g.render(Format::Dot);
    assert!(dot.starts_with("digraph dependencies {"));
    assert!(dot.contains("\"a\" -> \"b\";"));
    assert!(dot.contains("\"q\\\"x\" -> \"b\" [label=\"control\"];"));
    let mermaid = g.render(Format::Mermaid);
    assert!(mermaid.starts_with("graph LR\n"));
    assert!(mermaid.contains("[\"q#quot;x\"] -->|\"control\"| v"));
    assert_eq!(mermaid.lines().count(), 3);
    assert!(Format::parse("svg").is_err());
}

#[test]
fn from_edges_sorts_once_and_finds_cycles() {
    let (a, b, c) = (Value::atom("a"), Value::atom("b"), Value::atom("c"));
    let g = DependencyGraph::from_edges([(&b, &c, "data"), (&a, &b, "data")]).unwrap();
    assert!(g.is_consistent());
    assert_eq!(
        g.update_order(std::slice::from_ref(&a)),
        [a.clone(), b.clone(), c.clone()]
    );
    let cyclic = DependencyGraph::from_edges([(&a, &b, "data"), (&b, &c, "data"), (&c, &a, "x")]);
    match cyclic {
        Err(Error::WouldCreateCycle(Value::List(path))) => {
            assert_eq!(path.len(), 4);
            assert_eq!(path[0], path[3]);
        }
        other => panic!("{other:?}"),
    }
}

/// Runs `f` on a thread with a stack far smaller than a scheduler's,
/// so any recursion proportional to the graph would overflow.
fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(64 * 1024)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn a_100k_chain_and_its_closing_edge_need_no_stack() {
    on_small_stack(|| {
        const N: usize = 100_000;
        let names: Vec<Value> = (0..N).map(n).collect();
        let mut g = DependencyGraph::new();
        for w in names.windows(2) {
            g.add_edge(&w[0], &w[1], "data").unwrap();
        }
        match g.add_edge(&names[N - 1], &names[0], "data") {
            Err(Error::WouldCreateCycle(Value::List(path))) => assert_eq!(path.len(), N + 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.update_order(&names[..1]).len(), N);
        assert_eq!(g.transitive("v99999", Direction::Dependencies).len(), N - 1);
        // Built backwards, every insert lands before the chain: no reorder.
        let mut back = DependencyGraph::new();
        for w in names.windows(2).rev() {
            back.add_edge(&w[0], &w[1], "data").unwrap();
        }
        assert!(back.add_edge(&names[N - 1], &names[0], "data").is_err());
        let edges = back.edges();
        let rebuilt =
            DependencyGraph::from_edges(edges.iter().map(|e| (e.from, e.to, e.edge_type))).unwrap();
        assert_eq!(rebuilt.edge_count(), N - 1);
        drop(edges);
        assert_eq!(back.remove_vertex("v50000"), 2);
        assert_eq!(back.update_order(&names[..1]).len(), 50_000);
    });
}

/// The reference: is there a path `from ~> to` in `edges`? Plain DFS.
fn reaches(edges: &[(usize, usize)], from: usize, to: usize) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![from];
    while let Some(v) = stack.pop() {
        if v == to {
            return true;
        }
        if seen.insert(v) {
            stack.extend(edges.iter().filter(|e| e.0 == v).map(|e| e.1));
        }
    }
    false
}

#[derive(Clone, Debug)]
enum Op {
    Add(usize, usize),
    Remove(usize, usize),
    RemoveVertex(usize),
}

fn op(vertices: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..vertices, 0..vertices).prop_map(|(a, b)| Op::Add(a, b)),
        2 => (0..vertices, 0..vertices).prop_map(|(a, b)| Op::Remove(a, b)),
        1 => (0..vertices).prop_map(Op::RemoveVertex),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn agrees_with_a_plain_dfs(ops in prop::collection::vec(op(12), 0..120)) {
        let mut g = DependencyGraph::new();
        let mut reference: Vec<(usize, usize)> = Vec::new();
        for op in ops {
            match op {
                Op::Add(a, b) => {
                    // A tiny budget first: giving up must change nothing.
                    let before = g.edge_count();
                    let result = match g.add_edge_within(&n(a), &n(b), "data", 3) {
                        Ok(Insert::OverBudget) => {
                            prop_assert_eq!(g.edge_count(), before);
                            prop_assert!(g.is_consistent());
                            g.add_edge(&n(a), &n(b), "data")
                        }
                        other => other.map(|i| i == Insert::Added),
                    };
                    if a == b {
                        prop_assert_eq!(result, Err(Error::SelfDependency));
                    } else if reference.contains(&(a, b)) {
                        prop_assert_eq!(result, Ok(false));
                    } else if reaches(&reference, b, a) {
                        let Err(Error::WouldCreateCycle(Value::List(path))) = result else {
                            return Err(TestCaseError::fail(format!("accepted a cycle: {result:?}")));
                        };
                        // The path is the new edge followed by existing edges.
                        prop_assert_eq!(&path[0], &n(a));
                        prop_assert_eq!(&path[1], &n(b));
                        prop_assert_eq!(path.last(), Some(&n(a)));
                        for w in path[1..].windows(2) {
                            let key = |v: &Value| v.as_text().unwrap()[1..].parse::<usize>().unwrap();
                            prop_assert!(reference.contains(&(key(&w[0]), key(&w[1]))));
                        }
                    } else {
                        prop_assert_eq!(result, Ok(true));
                        reference.push((a, b));
                    }
                }
                Op::Remove(a, b) => {
                    let had = reference.contains(&(a, b));
                    reference.retain(|&e| e != (a, b));
                    prop_assert_eq!(g.remove_edge(&format!("v{a}"), &format!("v{b}")), had);
                }
                Op::RemoveVertex(v) => {
                    let before = reference.len();
                    reference.retain(|&(a, b)| a != v && b != v);
                    prop_assert_eq!(g.remove_vertex(&format!("v{v}")), before - reference.len());
                }
            }
            prop_assert!(g.is_consistent());
            prop_assert_eq!(g.edge_count(), reference.len());
        }
        // Update order: exactly the reachable set, and every edge inside
        // it goes forward in the list.
        for v in 0..12 {
            let order = g.update_order(&[n(v)]);
            let expected = (0..12).filter(|&w| w == v || reaches(&reference, v, w)).count();
            prop_assert_eq!(order.len(), expected);
            prop_assert_eq!(&order[0], &n(v));
            let at = |x: usize| order.iter().position(|o| o == &n(x));
            for &(a, b) in &reference {
                if let (Some(i), Some(j)) = (at(a), at(b)) {
                    prop_assert!(i < j);
                }
            }
        }
    }
}
