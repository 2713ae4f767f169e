//! Dependency-graph NIFs: edges between a session's variables, cycle
//! detection, update order and rendering (see `dspex_core::graph`).
//! Anything whose cost grows with the graph runs on a dirty CPU scheduler,
//! or on a normal one when it fits a budget (an insert, an update order).

use dspex_core::graph::{Direction, Format, Insert};
use dspex_core::{Error, Value};
use rustler::{Encoder, Env, Term};

use crate::atoms;
use crate::error::{error, ok_or};
use crate::store::store;
use crate::term::{decode_name, encode_value};
use crate::variable::with_session;

fn name(term: Term) -> Result<Value, Error> {
    decode_name(term, store().limits().max_name_bytes)
}

fn atom_text(term: Term, what: &str) -> Result<String, Error> {
    term.atom_to_string()
        .map_err(|_| Error::InvalidArgument(Value::tagged(what, Value::atom("expected_atom"))))
}

fn names<'a>(env: Env<'a>, r: Result<Vec<Value>, Error>) -> Term<'a> {
    match r {
        Ok(names) => {
            let terms: Vec<Term> = names.iter().map(|n| encode_value(env, n)).collect();
            (atoms::ok(), terms).encode(env)
        }
        Err(e) => error(env, &e),
    }
}

/// Vertices an insert may visit on a normal scheduler (well under a
/// millisecond); a larger search is redone by `graph_add_edge_dirty`.
const INSERT_BUDGET: usize = 10_000;

/// `{:ok, true}` for a new edge, `{:ok, false}` when it existed (its type
/// replaced); `{:error, {:would_create_cycle, path}}`, `:self_dependency`,
/// `{:not_found, ident}`; `:over_budget` when the insert needs a search too
/// large for a normal scheduler (nothing changed; call the dirty variant).
#[rustler::nif(name = "graph_add_edge")]
fn add_edge<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    from: Term<'a>,
    to: Term<'a>,
    edge_type: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let (from, to) = (name(from)?, name(to)?);
        let edge_type = atom_text(edge_type, "edge_type")?;
        s.add_dependency_within(&from, &to, &edge_type, INSERT_BUDGET, caller)
    });
    match r {
        Ok(Insert::Added) => (atoms::ok(), true).encode(env),
        Ok(Insert::Existed) => (atoms::ok(), false).encode(env),
        Ok(Insert::OverBudget) => atoms::over_budget().encode(env),
        Err(e) => error(env, &e),
    }
}

/// `graph_add_edge` without a budget, on a dirty scheduler.
#[rustler::nif(name = "graph_add_edge_dirty", schedule = "DirtyCpu")]
fn add_edge_dirty<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    from: Term<'a>,
    to: Term<'a>,
    edge_type: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let (from, to) = (name(from)?, name(to)?);
        let edge_type = atom_text(edge_type, "edge_type")?;
        s.add_dependency(&from, &to, &edge_type, caller)
    });
    ok_or(env, r)
}

/// `{:ok, removed?}`
#[rustler::nif(name = "graph_remove_edge")]
fn remove_edge<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    from: Term<'a>,
    to: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        s.remove_dependency(&name(from)?, &name(to)?, caller)
    });
    ok_or(env, r)
}

/// Removes every edge touching the variable: `{:ok, count}`.
#[rustler::nif(name = "graph_clear")]
fn clear<'a>(env: Env<'a>, sid: Term<'a>, var: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        s.clear_dependencies(&name(var)?, caller)
    });
    ok_or(env, r)
}

fn neighbours<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    var: Term<'a>,
    transitive: bool,
    principal: Term<'a>,
    direction: Direction,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        s.dependencies_of(&name(var)?, direction, transitive, caller)
    });
    names(env, r)
}

/// What the variable depends on, in topological order: `{:ok, [name]}`.
#[rustler::nif(name = "graph_dependencies", schedule = "DirtyCpu")]
fn dependencies<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    var: Term<'a>,
    transitive: bool,
    principal: Term<'a>,
) -> Term<'a> {
    neighbours(
        env,
        sid,
        var,
        transitive,
        principal,
        Direction::Dependencies,
    )
}

/// What depends on the variable, in topological order: `{:ok, [name]}`.
#[rustler::nif(name = "graph_dependents", schedule = "DirtyCpu")]
fn dependents<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    var: Term<'a>,
    transitive: bool,
    principal: Term<'a>,
) -> Term<'a> {
    neighbours(env, sid, var, transitive, principal, Direction::Dependents)
}

/// Vertices and edges together an update order may walk on a normal
/// scheduler (a propagation pass asks for one: a dirty call costs 10-25 us
/// of scheduling for a walk of a small graph that takes well under one);
/// a larger graph's is redone by `graph_update_order_dirty`.
/// (4,000 keeps the walk and the encoding of the answer well under a
/// millisecond.) The list of changed variables counts against it too.
const ORDER_BUDGET: usize = 4_000;

/// The changed variables' names, or `None` past `limit` of them (read no
/// further: the caller asks again on a dirty scheduler).
fn changed_names(changed: Term, limit: usize) -> Result<Option<Vec<Value>>, Error> {
    let mut out = Vec::new();
    for t in changed
        .into_list_iterator()
        .map_err(|_| Error::invalid_arg("expected_a_list"))?
    {
        if out.len() == limit {
            return Ok(None);
        }
        out.push(name(t)?);
    }
    Ok(Some(out))
}

/// `[changed.., dependents..]` in update order, from a list of idents:
/// `{:ok, [name]}`; `:over_budget` when the graph is too large to walk on
/// a normal scheduler (call the dirty variant).
#[rustler::nif(name = "graph_update_order")]
fn update_order<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    changed: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        match changed_names(changed, ORDER_BUDGET)? {
            Some(changed) => s.update_order_within(&changed, ORDER_BUDGET, caller),
            None => Ok(None),
        }
    });
    match r {
        Ok(Some(order)) => names(env, Ok(order)),
        Ok(None) => atoms::over_budget().encode(env),
        Err(e) => error(env, &e),
    }
}

/// `graph_update_order` without a budget, on a dirty scheduler.
#[rustler::nif(name = "graph_update_order_dirty", schedule = "DirtyCpu")]
fn update_order_dirty<'a>(
    env: Env<'a>,
    sid: Term<'a>,
    changed: Term<'a>,
    principal: Term<'a>,
) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let changed = changed_names(changed, usize::MAX)?.unwrap_or_default();
        s.update_order(&changed, caller)
    });
    names(env, r)
}

/// The graph as DOT or Mermaid text: `{:ok, binary}`.
#[rustler::nif(name = "graph_render", schedule = "DirtyCpu")]
fn render<'a>(env: Env<'a>, sid: Term<'a>, format: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| {
        let format = Format::parse(&atom_text(format, "format")?)?;
        s.render_dependencies(format, caller)
    });
    ok_or(env, r)
}

/// `{:ok, %{edges: n, vertices: n}}` for diagnostics.
#[rustler::nif(name = "graph_info")]
fn info<'a>(env: Env<'a>, sid: Term<'a>, principal: Term<'a>) -> Term<'a> {
    let r = with_session(sid, principal, |s, caller| s.dependency_info(caller));
    match r {
        Ok(v) => (atoms::ok(), encode_value(env, &v)).encode(env),
        Err(e) => error(env, &e),
    }
}
