//! Dependencies between a session's variables: the session side of
//! [`crate::graph`] (naming variables by name or id, access rules), so the
//! graph itself knows nothing of sessions.

use super::Session;
use crate::caller::Caller;
use crate::error::{Error, Result};
use crate::graph::{key_of, Direction, Format, Insert};
use crate::permission::Permission;
use crate::value::Value;

/// Dependencies between a session's variables. Idents are names (atom or
/// string) or generated ids; every variable named must exist, checked under
/// the graph's lock so an edge can never outlive its variable.
impl Session {
    /// `from -> to`: `to` depends on `from`. The caller needs read access to
    /// `from` and write access to `to`. `Ok(true)` when the edge is new.
    pub fn add_dependency(
        &self,
        from: &Value,
        to: &Value,
        edge_type: &str,
        caller: &Caller,
    ) -> Result<bool> {
        self.dependencies().update(|graph| {
            let from = self.dependency_name(from, caller, Permission::Read)?;
            let to = self.dependency_name(to, caller, Permission::Write)?;
            graph.add_edge(&from, &to, edge_type)
        })
    }

    /// [`add_dependency`](Self::add_dependency) within a search budget (see
    /// [`DependencyGraph::add_edge_within`](crate::graph::DependencyGraph::add_edge_within)).
    pub fn add_dependency_within(
        &self,
        from: &Value,
        to: &Value,
        edge_type: &str,
        budget: usize,
        caller: &Caller,
    ) -> Result<Insert> {
        self.dependencies().update(|graph| {
            let from = self.dependency_name(from, caller, Permission::Read)?;
            let to = self.dependency_name(to, caller, Permission::Write)?;
            graph.add_edge_within(&from, &to, edge_type, budget)
        })
    }

    /// Removes `from -> to`; `Ok(false)` when there was no such edge.
    pub fn remove_dependency(&self, from: &Value, to: &Value, caller: &Caller) -> Result<bool> {
        self.dependencies().update(|graph| {
            let from = self.dependency_name(from, caller, Permission::Read)?;
            let to = self.dependency_name(to, caller, Permission::Write)?;
            Ok(graph.remove_edge(key_of(&from)?, key_of(&to)?))
        })
    }

    /// Removes every edge touching `var`; returns how many.
    pub fn clear_dependencies(&self, var: &Value, caller: &Caller) -> Result<usize> {
        self.dependencies().update(|graph| {
            let name = self.dependency_name(var, caller, Permission::Write)?;
            Ok(graph.remove_vertex(key_of(&name)?))
        })
    }

    /// What `var` depends on (direct, or all with `transitive`), in
    /// topological order.
    pub fn dependencies_of(
        &self,
        var: &Value,
        direction: Direction,
        transitive: bool,
        caller: &Caller,
    ) -> Result<Vec<Value>> {
        let name = self.dependency_name(var, caller, Permission::Read)?;
        let key = key_of(&name)?;
        let graph = self.dependencies().read();
        Ok(if transitive {
            graph.transitive(key, direction)
        } else {
            graph.neighbours(key, direction)
        })
    }

    /// `[changed.., dependents..]` in the order updates must happen.
    pub fn update_order(&self, changed: &[Value], caller: &Caller) -> Result<Vec<Value>> {
        // No graph is larger than `usize::MAX`: always `Some`.
        self.update_order_within(changed, usize::MAX, caller)
            .map(Option::unwrap_or_default)
    }

    /// `update_order` when the graph has at most `budget` vertices and
    /// edges together (the walk is linear in them at worst), `Ok(None)`
    /// without walking when it has more: a caller on a scheduler that must
    /// not be held long asks elsewhere.
    pub fn update_order_within(
        &self,
        changed: &[Value],
        budget: usize,
        caller: &Caller,
    ) -> Result<Option<Vec<Value>>> {
        let names = changed
            .iter()
            .map(|c| self.dependency_name(c, caller, Permission::Read))
            .collect::<Result<Vec<_>>>()?;
        let graph = self.dependencies().read();
        if graph.vertex_count().saturating_add(graph.edge_count()) > budget {
            return Ok(None);
        }
        Ok(Some(graph.update_order(&names)))
    }

    /// The whole graph as text; only the session itself may see it.
    pub fn render_dependencies(&self, format: Format, caller: &Caller) -> Result<String> {
        self.owner_only(caller)?;
        Ok(self.dependencies().read().render(format))
    }

    /// `%{edges: n, vertices: n}`; only the session itself may see it.
    pub fn dependency_info(&self, caller: &Caller) -> Result<Value> {
        self.owner_only(caller)?;
        let graph = self.dependencies().read();
        let count = |n: usize| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
        Ok(Value::Map(
            vec![
                (Value::atom("edges"), count(graph.edge_count())),
                (Value::atom("vertices"), count(graph.vertex_count())),
            ]
            .into(),
        ))
    }

    fn owner_only(&self, caller: &Caller) -> Result<()> {
        match caller.principal {
            Some(p) if p != &*self.id => Err(Error::AccessDenied),
            _ => Ok(()),
        }
    }

    /// The variable's name as registered, or `{:not_found, ident}`.
    fn dependency_name(&self, ident: &Value, caller: &Caller, perm: Permission) -> Result<Value> {
        let text = ident
            .as_text()
            .ok_or_else(|| Error::invalid_arg("name_must_be_atom_or_string"))?;
        // Access rules apply; an optimizer's lock does not: an edge changes
        // the graph, not the variable's value.
        self.with_cell(text, |cell| {
            let var = cell.lock();
            caller
                .authorize(&self.id, &var, perm)
                .map(|_| var.name.clone())
        })
        .map_err(|e| match e {
            Error::NotFound => Error::MissingVariable(ident.clone()),
            e => e,
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::DependencyGraph;

    fn n(i: usize) -> Value {
        Value::str(&format!("v{i}"))
    }

    fn session_with(names: &[&str]) -> std::sync::Arc<Session> {
        let s = Session::new(
            "s".into(),
            crate::SessionOpts::default(),
            crate::limits::Limits::default(),
            0,
        );
        for name in names {
            s.register(
                Value::atom(name),
                crate::VarType::Float,
                Value::Float(0.0),
                Default::default(),
                0,
            )
            .unwrap();
        }
        std::sync::Arc::new(s)
    }

    #[test]
    fn session_dependencies_name_variables_by_name_or_id() {
        let s = session_with(&["a", "b", "c"]);
        let owner = &Caller::owner(0);
        let id_of_b = Value::str(&s.get("b", owner).unwrap().id);
        assert_eq!(
            s.add_dependency(&Value::atom("a"), &id_of_b, "data", owner),
            Ok(true)
        );
        assert_eq!(
            s.add_dependency(&id_of_b, &Value::str("b"), "data", owner),
            Err(Error::SelfDependency)
        );
        assert_eq!(
            s.add_dependency(&Value::atom("a"), &Value::atom("ghost"), "data", owner),
            Err(Error::MissingVariable(Value::atom("ghost")))
        );
        assert_eq!(
            s.dependencies_of(&Value::atom("a"), Direction::Dependents, false, owner),
            Ok(vec![Value::atom("b")])
        );
        assert!(s.dependencies().has_dependents("a"));
        assert!(!s.dependencies().has_dependents("b"));
        let stranger = Caller::principal("other", 0);
        assert_eq!(
            s.add_dependency(&Value::atom("b"), &Value::atom("c"), "data", &stranger),
            Err(Error::AccessDenied)
        );
        s.delete("b", owner).unwrap();
        assert_eq!(s.dependencies().edge_count(), 0);
        assert_eq!(
            s.update_order(&[Value::atom("a")], owner),
            Ok(vec![Value::atom("a")])
        );
    }

    #[test]
    fn update_order_within_a_budget() {
        let s = session_with(&["a", "b", "c"]);
        let owner = &Caller::owner(0);
        s.add_dependency(&Value::atom("a"), &Value::atom("b"), "data", owner)
            .unwrap();
        s.add_dependency(&Value::atom("b"), &Value::atom("c"), "data", owner)
            .unwrap();
        let order = vec![Value::atom("a"), Value::atom("b"), Value::atom("c")];
        // Three vertices and two edges.
        assert_eq!(
            s.update_order_within(&[Value::atom("a")], 5, owner),
            Ok(Some(order.clone()))
        );
        assert_eq!(
            s.update_order_within(&[Value::atom("a")], 4, owner),
            Ok(None)
        );
        assert_eq!(s.update_order(&[Value::atom("a")], owner), Ok(order));
        let stranger = Caller::principal("other", 0);
        assert_eq!(
            s.update_order_within(&[Value::atom("a")], 5, &stranger),
            Err(Error::AccessDenied)
        );
    }

    #[test]
    fn concurrent_inserts_never_build_a_cycle() {
        let names: Vec<String> = (0..16).map(|i| format!("v{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let s = session_with(&refs);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for _ in 0..2_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let (a, b) = (x % 16, (x >> 8) % 16);
                        let _ = s.add_dependency(
                            &n(a as usize),
                            &n(b as usize),
                            "data",
                            &Caller::owner(0),
                        );
                        if x % 11 == 0 {
                            let _ = s.remove_dependency(
                                &n(b as usize),
                                &n(a as usize),
                                &Caller::owner(0),
                            );
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let graph = s.dependencies().read();
        assert!(graph.is_consistent());
        assert!(DependencyGraph::from_edges(graph.edges().iter().map(|e| (
            e.from,
            e.to,
            e.edge_type
        )))
        .is_ok());
    }
}
