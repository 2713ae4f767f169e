//! `DependencyGraph`: which variables of a session depend on which, kept
//! acyclic by incremental cycle detection.
//!
//! An edge `from -> to` means `to` depends on `from`: a change to `from` must
//! update `to`. Edges carry a type (`data` unless told otherwise; any atom).
//!
//! Cycle detection follows Pearce and Kelly, "A Dynamic Topological Sort
//! Algorithm for Directed Acyclic Graphs" (JEA 2007): the graph keeps a
//! topological order, and an insert that contradicts it searches only the
//! affected region (vertices whose position lies between the two endpoints),
//! then either finds the path that would close a cycle or shifts the region
//! into a valid order. An insert that agrees with the order is O(1).
//!
//! Invariants (checked by the property tests in `tests.rs`):
//! 1. The graph is acyclic; an edge that would close a cycle is rejected with
//!    the offending path and leaves the graph exactly as it was.
//! 2. `ord` is a topological order: every edge `u -> v` has
//!    `ord(u) < ord(v)`, and no two live vertices share a position.
//! 3. No self-loops and no parallel edges; the out-lists, in-lists and the
//!    edge map describe the same edge set.
//! 4. A vertex exists only while it has an edge: a vertex left isolated by
//!    a removal is released, so memory follows the edge count.
//! 5. Every walk is iterative with an explicit stack: a 100,000-long chain
//!    is walked on a scheduler thread's small stack without overflow.
//!
//! Vertices are keyed by the text of a variable's name, so `:temp` and
//! `"temp"` are one vertex, as they are one variable in a `Session`; the
//! name is kept in the form first given, and results return that form.
//!
//! Layout: the algorithm is here; [`render`] draws the graph as DOT or
//! Mermaid; [`SessionGraph`] (in `session_graph.rs`) is a session's graph
//! behind its lock. The session side (naming variables, access checks) is
//! `Session`'s, in `session/dependencies.rs`: the graph knows nothing of
//! sessions.

use std::collections::{HashMap, VecDeque};

use ahash::AHashMap;

use crate::error::{Error, Result};
use crate::value::Value;

pub mod render;
mod session_graph;
#[cfg(test)]
mod tests;

pub use render::Format;
pub use session_graph::SessionGraph;

/// The edge type used when none is given.
pub const DEFAULT_EDGE_TYPE: &str = "data";
/// Edges one graph holds at most (a dense graph of 100,000 variables would
/// otherwise be unbounded).
pub const MAX_EDGES: usize = 1_000_000;
/// Distinct edge types one graph holds at most.
pub const MAX_EDGE_TYPES: usize = 1024;
/// Longest edge type name, in bytes.
pub const MAX_EDGE_TYPE_BYTES: usize = 255;

type VertexId = u32;

/// One edge, as listed by [`DependencyGraph::edges`].
#[derive(Clone, Debug, PartialEq)]
pub struct Edge<'a> {
    pub from: &'a Value,
    pub to: &'a Value,
    pub edge_type: &'a str,
}

/// What [`DependencyGraph::add_edge_within`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    Added,
    /// The edge was there; its type is replaced.
    Existed,
    /// The searches needed more than the budget; nothing changed.
    OverBudget,
}

/// Which way a walk follows edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Towards what a vertex depends on (`get_dependencies`).
    Dependencies,
    /// Towards what depends on a vertex (`get_dependents`).
    Dependents,
}
/// Scratch space of the insert-time searches, reused across inserts so an
/// insert allocates nothing once warm. `mark[v] == epoch` means "visited in
/// the current search", so clearing is one increment.
#[derive(Default)]
struct Scratch {
    mark: Vec<u32>,
    epoch: u32,
    stack: Vec<(VertexId, usize)>,
    /// `(position, vertex)` of what the two searches reached.
    forward: Vec<(i64, VertexId)>,
    backward: Vec<(i64, VertexId)>,
    slots: Vec<i64>,
}

impl Scratch {
    fn next_epoch(&mut self, vertices: usize) -> u32 {
        if self.mark.len() < vertices {
            self.mark.resize(vertices, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.mark.iter_mut().for_each(|m| *m = 0);
            self.epoch = 1;
        }
        self.epoch
    }
}

pub struct DependencyGraph {
    index: AHashMap<Box<str>, VertexId>,
    // Vertex data in parallel arrays indexed by `VertexId`: the searches
    // touch `ord` and the adjacency of many vertices, and dense arrays keep
    // that in cache. A released slot has a `Nil` name and empty lists.
    /// The name as first given (atom or string).
    names: Vec<Value>,
    /// Position in the maintained topological order.
    ord: Vec<i64>,
    out: Vec<Vec<VertexId>>,
    inn: Vec<Vec<VertexId>>,
    /// Released vertex slots, reused before the vector grows.
    free: Vec<VertexId>,
    /// `(from, to)` packed into a `u64` -> index into `types`.
    edges: AHashMap<u64, u16>,
    types: Vec<Box<str>>,
    /// Lowest and highest positions handed out so far: a new vertex with
    /// only out-edges goes before everything, one with only in-edges after.
    lowest: i64,
    highest: i64,
    max_edges: usize,
    scratch: Scratch,
}

impl Default for DependencyGraph {
    fn default() -> Self {
        DependencyGraph::with_max_edges(MAX_EDGES)
    }
}

impl std::fmt::Debug for DependencyGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DependencyGraph")
            .field("vertices", &self.vertex_count())
            .field("edges", &self.edge_count())
            .finish()
    }
}

fn pack(from: VertexId, to: VertexId) -> u64 {
    (u64::from(from) << 32) | u64::from(to)
}

fn unlink(list: &mut Vec<VertexId>, v: VertexId) {
    if let Some(i) = list.iter().position(|&u| u == v) {
        list.swap_remove(i);
    }
}

pub(crate) fn key_of(name: &Value) -> Result<&str> {
    match name.as_text() {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err(Error::invalid_arg("name_must_be_atom_or_string")),
    }
}

impl DependencyGraph {
    pub fn new() -> Self {
        DependencyGraph::default()
    }

    pub fn with_max_edges(max_edges: usize) -> Self {
        DependencyGraph {
            index: AHashMap::default(),
            names: Vec::new(),
            ord: Vec::new(),
            out: Vec::new(),
            inn: Vec::new(),
            free: Vec::new(),
            edges: AHashMap::default(),
            types: vec![DEFAULT_EDGE_TYPE.into()],
            lowest: 0,
            highest: 0,
            max_edges,
            scratch: Scratch::default(),
        }
    }

    pub fn vertex_count(&self) -> usize {
        self.index.len()
    }

    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Does anything depend on `key`? The question every write asks.
    pub fn has_dependents(&self, key: &str) -> bool {
        self.index
            .get(key)
            .is_some_and(|&v| !self.out[v as usize].is_empty())
    }

    /// The type of the edge `from -> to`, if there is one.
    pub fn edge_type(&self, from: &str, to: &str) -> Option<&str> {
        let (&f, &t) = (self.index.get(from)?, self.index.get(to)?);
        self.edges
            .get(&pack(f, t))
            .map(|&ty| &*self.types[ty as usize])
    }

    /// Adds `from -> to` (`to` depends on `from`). Returns `true` if the
    /// edge is new, `false` if it existed (its type is then replaced).
    ///
    /// Errors: [`Error::SelfDependency`] for `from == to`;
    /// [`Error::WouldCreateCycle`] with the path `[from, to, .., from]` when
    /// `to` already reaches `from`. A rejected edge changes nothing.
    pub fn add_edge(&mut self, from: &Value, to: &Value, edge_type: &str) -> Result<bool> {
        match self.add_edge_within(from, to, edge_type, usize::MAX)? {
            Insert::Added => Ok(true),
            Insert::Existed => Ok(false),
            // The searches visit each vertex at most once, so this cannot be.
            Insert::OverBudget => Err(Error::invalid_arg("over_budget")),
        }
    }

    /// As [`add_edge`](Self::add_edge), but gives up, changing nothing, once
    /// the searches have visited `budget` vertices: a NIF on a normal
    /// scheduler tries this first and hands the rare large insert to a
    /// dirty scheduler.
    pub fn add_edge_within(
        &mut self,
        from: &Value,
        to: &Value,
        edge_type: &str,
        budget: usize,
    ) -> Result<Insert> {
        let (from_key, to_key) = (key_of(from)?, key_of(to)?);
        if from_key == to_key {
            return Err(Error::SelfDependency);
        }
        let ty = self.type_id(edge_type)?;
        let (f, t) = (
            self.index.get(from_key).copied(),
            self.index.get(to_key).copied(),
        );
        if let (Some(f), Some(t)) = (f, t) {
            if let Some(existing) = self.edges.get_mut(&pack(f, t)) {
                *existing = ty;
                return Ok(Insert::Existed);
            }
        }
        if self.edges.len() >= self.max_edges {
            return Err(Error::InvalidArgument(Value::tagged(
                "too_many_edges",
                Value::Int(self.max_edges as i64),
            )));
        }
        let (f, t) = match (f, t) {
            (Some(f), Some(t)) => {
                if !self.reorder_for(f, t, budget)? {
                    return Ok(Insert::OverBudget);
                }
                (f, t)
            }
            // A new endpoint has no edges, so it can take any position: a new
            // source goes first, a new sink last, and nothing needs to move.
            (Some(f), None) => (f, self.add_vertex(to, false)),
            (None, Some(t)) => (self.add_vertex(from, true), t),
            (None, None) => {
                let f = self.add_vertex(from, false);
                (f, self.add_vertex(to, false))
            }
        };
        self.out[f as usize].push(t);
        self.inn[t as usize].push(f);
        self.edges.insert(pack(f, t), ty);
        Ok(Insert::Added)
    }

    /// Removes `from -> to`; `false` if there was no such edge.
    pub fn remove_edge(&mut self, from: &str, to: &str) -> bool {
        let (Some(&f), Some(&t)) = (self.index.get(from), self.index.get(to)) else {
            return false;
        };
        if self.edges.remove(&pack(f, t)).is_none() {
            return false;
        }
        unlink(&mut self.out[f as usize], t);
        unlink(&mut self.inn[t as usize], f);
        self.release_if_isolated(f);
        self.release_if_isolated(t);
        true
    }

    /// Removes every edge touching `key` (a deleted variable, or
    /// `clear_dependencies`). Returns how many edges went.
    pub fn remove_vertex(&mut self, key: &str) -> usize {
        let Some(&v) = self.index.get(key) else {
            return 0;
        };
        let out = std::mem::take(&mut self.out[v as usize]);
        let inn = std::mem::take(&mut self.inn[v as usize]);
        for &w in &out {
            self.edges.remove(&pack(v, w));
            unlink(&mut self.inn[w as usize], v);
            self.release_if_isolated(w);
        }
        for &w in &inn {
            self.edges.remove(&pack(w, v));
            unlink(&mut self.out[w as usize], v);
            self.release_if_isolated(w);
        }
        self.release_if_isolated(v);
        out.len() + inn.len()
    }

    /// Direct neighbours of `key` in topological order; empty for a name
    /// with no edges.
    pub fn neighbours(&self, key: &str, direction: Direction) -> Vec<Value> {
        let Some(&v) = self.index.get(key) else {
            return Vec::new();
        };
        let list = match direction {
            Direction::Dependencies => &self.inn[v as usize],
            Direction::Dependents => &self.out[v as usize],
        };
        self.names_in_order(list.clone())
    }

    /// Everything reachable from `key` in `direction` (not `key` itself),
    /// in topological order.
    pub fn transitive(&self, key: &str, direction: Direction) -> Vec<Value> {
        let Some(&v) = self.index.get(key) else {
            return Vec::new();
        };
        let mut reached = self.reach(&[v], direction);
        reached.retain(|&w| w != v);
        self.names_in_order(reached)
    }

    /// The order in which to update after `changed` change: the changed
    /// names, then every transitive dependent, each once, sorted by the
    /// maintained topological order (no subgraph is built). Changed names
    /// with no edges come first, in the order given.
    pub fn update_order(&self, changed: &[Value]) -> Vec<Value> {
        let mut loose = Vec::new();
        let mut roots = Vec::with_capacity(changed.len());
        for name in changed {
            let Some(key) = name.as_text() else { continue };
            match self.index.get(key) {
                Some(&v) => roots.push(v),
                None if !loose.iter().any(|n: &Value| n.as_text() == Some(key)) => {
                    loose.push(name.clone())
                }
                None => {}
            }
        }
        let reached = self.reach(&roots, Direction::Dependents);
        loose.extend(self.names_in_order(reached));
        loose
    }

    /// Every edge, sorted by the positions of its endpoints, so the list is
    /// deterministic and inserting it in order never reorders anything.
    pub fn edges(&self) -> Vec<Edge<'_>> {
        let mut pairs: Vec<(VertexId, VertexId, u16)> = self
            .edges
            .iter()
            .map(|(&k, &ty)| ((k >> 32) as VertexId, k as VertexId, ty))
            .collect();
        pairs.sort_unstable_by_key(|&(f, t, _)| (self.ord[f as usize], self.ord[t as usize]));
        pairs
            .into_iter()
            .map(|(f, t, ty)| Edge {
                from: &self.names[f as usize],
                to: &self.names[t as usize],
                edge_type: &self.types[ty as usize],
            })
            .collect()
    }

    /// Builds a graph from an edge list in one pass (Kahn's algorithm), as
    /// snapshot import needs: O(V + E) however the list is ordered.
    pub fn from_edges<'a, I>(edges: I) -> Result<DependencyGraph>
    where
        I: IntoIterator<Item = (&'a Value, &'a Value, &'a str)>,
    {
        let mut g = DependencyGraph::new();
        for (from, to, edge_type) in edges {
            let (from_key, to_key) = (key_of(from)?, key_of(to)?);
            if from_key == to_key {
                return Err(Error::SelfDependency);
            }
            let ty = g.type_id(edge_type)?;
            let f = match g.index.get(from_key) {
                Some(&f) => f,
                None => g.add_vertex(from, false),
            };
            let t = match g.index.get(to_key) {
                Some(&t) => t,
                None => g.add_vertex(to, false),
            };
            if g.edges.insert(pack(f, t), ty).is_none() {
                if g.edges.len() > g.max_edges {
                    return Err(Error::InvalidArgument(Value::tagged(
                        "too_many_edges",
                        Value::Int(g.max_edges as i64),
                    )));
                }
                g.out[f as usize].push(t);
                g.inn[t as usize].push(f);
            }
        }
        g.sort_from_scratch()?;
        Ok(g)
    }

    /// Checks invariants 2 and 3 (for tests and debug assertions).
    pub fn is_consistent(&self) -> bool {
        let mut seen_ord = std::collections::HashSet::new();
        let mut listed = 0;
        for (key, &v) in &self.index {
            let i = v as usize;
            if self.names[i].as_text() != Some(&**key)
                || !seen_ord.insert(self.ord[i])
                || (self.out[i].is_empty() && self.inn[i].is_empty())
            {
                return false;
            }
            for &w in &self.out[i] {
                if w == v
                    || self.ord[i] >= self.ord[w as usize]
                    || !self.edges.contains_key(&pack(v, w))
                    || !self.inn[w as usize].contains(&v)
                {
                    return false;
                }
                listed += 1;
            }
        }
        listed == self.edges.len()
    }

    fn type_id(&mut self, edge_type: &str) -> Result<u16> {
        if let Some(i) = self.types.iter().position(|t| &**t == edge_type) {
            return Ok(i as u16);
        }
        if edge_type.is_empty() || edge_type.len() > MAX_EDGE_TYPE_BYTES {
            return Err(Error::invalid_arg("bad_edge_type"));
        }
        if self.types.len() >= MAX_EDGE_TYPES {
            return Err(Error::invalid_arg("too_many_edge_types"));
        }
        self.types.push(edge_type.into());
        Ok((self.types.len() - 1) as u16)
    }

    fn add_vertex(&mut self, name: &Value, first: bool) -> VertexId {
        let ord = if first {
            self.lowest -= 1;
            self.lowest
        } else {
            self.highest += 1;
            self.highest
        };
        let v = match self.free.pop() {
            Some(v) => {
                let i = v as usize;
                self.names[i] = name.clone();
                self.ord[i] = ord;
                v
            }
            None => {
                self.names.push(name.clone());
                self.ord.push(ord);
                self.out.push(Vec::new());
                self.inn.push(Vec::new());
                (self.names.len() - 1) as VertexId
            }
        };
        let key = name.as_text().unwrap_or_default();
        self.index.insert(key.into(), v);
        v
    }

    fn release_if_isolated(&mut self, v: VertexId) {
        let i = v as usize;
        if !self.out[i].is_empty() || !self.inn[i].is_empty() || self.names[i].is_nil() {
            return;
        }
        let name = std::mem::take(&mut self.names[i]);
        // Give the lists' memory back: a released slot may stay unused.
        self.out[i] = Vec::new();
        self.inn[i] = Vec::new();
        if let Some(key) = name.as_text() {
            self.index.remove(key);
        }
        self.free.push(v);
    }

    /// Pearce–Kelly: makes room for `f -> t` in the order, or reports the
    /// path `t ~> f` that the edge would close into a cycle. `Ok(false)`
    /// when the searches would visit more than `budget` vertices; nothing
    /// has changed then (the order is only rewritten after both searches).
    fn reorder_for(&mut self, f: VertexId, t: VertexId, budget: usize) -> Result<bool> {
        let upper = self.ord[f as usize];
        let lower = self.ord[t as usize];
        if lower > upper {
            return Ok(true);
        }
        // Forward from `t`, through vertices placed before `f`: reaching `f`
        // closes a cycle, anything placed after `f` cannot reach it.
        let Self {
            names,
            ord,
            out,
            inn,
            scratch,
            ..
        } = self;
        let epoch = scratch.next_epoch(names.len());
        scratch.forward.clear();
        scratch.stack.clear();
        scratch.mark[t as usize] = epoch;
        scratch.forward.push((lower, t));
        scratch.stack.push((t, 0));
        while let Some((v, next)) = scratch.stack.last_mut() {
            let Some(&w) = out[*v as usize].get(*next) else {
                scratch.stack.pop();
                continue;
            };
            *next += 1;
            if w == f {
                let mut path: Vec<Value> = vec![names[f as usize].clone()];
                path.extend(
                    scratch
                        .stack
                        .iter()
                        .map(|&(v, _)| names[v as usize].clone()),
                );
                path.push(names[f as usize].clone());
                scratch.stack.clear();
                return Err(Error::WouldCreateCycle(Value::List(path.into())));
            }
            let (w_ord, mark) = (ord[w as usize], &mut scratch.mark[w as usize]);
            if *mark != epoch && w_ord < upper {
                if scratch.forward.len() >= budget {
                    scratch.stack.clear();
                    return Ok(false);
                }
                *mark = epoch;
                scratch.forward.push((w_ord, w));
                scratch.stack.push((w, 0));
            }
        }
        // Backward from `f`, through vertices placed after `t`. No cycle, so
        // this set and the forward one are disjoint.
        scratch.backward.clear();
        scratch.mark[f as usize] = epoch;
        scratch.backward.push((upper, f));
        scratch.stack.push((f, 0));
        while let Some((v, next)) = scratch.stack.last_mut() {
            let Some(&w) = inn[*v as usize].get(*next) else {
                scratch.stack.pop();
                continue;
            };
            *next += 1;
            let (w_ord, mark) = (ord[w as usize], &mut scratch.mark[w as usize]);
            if *mark != epoch && w_ord > lower {
                if scratch.forward.len() + scratch.backward.len() >= budget {
                    scratch.stack.clear();
                    return Ok(false);
                }
                *mark = epoch;
                scratch.backward.push((w_ord, w));
                scratch.stack.push((w, 0));
            }
        }
        // Hand the positions the two sets occupy back out: everything that
        // reaches `f` first, everything `t` reaches after, each set keeping
        // its internal order. Both lists sorted, the slots are their merge.
        scratch.backward.sort_unstable();
        scratch.forward.sort_unstable();
        scratch.slots.clear();
        let (mut i, mut j) = (0, 0);
        let (back, fwd) = (&scratch.backward, &scratch.forward);
        while i < back.len() || j < fwd.len() {
            if j == fwd.len() || (i < back.len() && back[i].0 < fwd[j].0) {
                scratch.slots.push(back[i].0);
                i += 1;
            } else {
                scratch.slots.push(fwd[j].0);
                j += 1;
            }
        }
        for (&(_, v), &slot) in back.iter().chain(fwd).zip(&scratch.slots) {
            ord[v as usize] = slot;
        }
        Ok(true)
    }

    /// Every vertex reachable from `roots` (roots included), iteratively.
    fn reach(&self, roots: &[VertexId], direction: Direction) -> Vec<VertexId> {
        let mut seen = vec![0u64; self.names.len().div_ceil(64)];
        let mut visit = |v: VertexId| {
            let (word, bit) = (v as usize / 64, 1u64 << (v % 64));
            let fresh = seen[word] & bit == 0;
            seen[word] |= bit;
            fresh
        };
        let mut reached: Vec<VertexId> = roots.iter().copied().filter(|&v| visit(v)).collect();
        let mut stack = reached.clone();
        while let Some(v) = stack.pop() {
            let next = match direction {
                Direction::Dependencies => &self.inn[v as usize],
                Direction::Dependents => &self.out[v as usize],
            };
            for &w in next {
                if visit(w) {
                    reached.push(w);
                    stack.push(w);
                }
            }
        }
        reached
    }

    fn names_in_order(&self, mut vertices: Vec<VertexId>) -> Vec<Value> {
        vertices.sort_unstable_by_key(|&v| self.ord[v as usize]);
        vertices
            .into_iter()
            .map(|v| self.names[v as usize].clone())
            .collect()
    }

    /// Assigns positions by Kahn's algorithm; a cycle is reported with one
    /// of its paths.
    fn sort_from_scratch(&mut self) -> Result<()> {
        let live: Vec<VertexId> = self.index.values().copied().collect();
        let mut indegree: HashMap<VertexId, usize> = live
            .iter()
            .map(|&v| (v, self.inn[v as usize].len()))
            .collect();
        let mut ready: VecDeque<VertexId> =
            live.iter().copied().filter(|v| indegree[v] == 0).collect();
        let mut next = 0i64;
        while let Some(v) = ready.pop_front() {
            self.ord[v as usize] = next;
            next += 1;
            for &w in &self.out[v as usize] {
                let d = indegree.get_mut(&w).expect("live vertex");
                *d -= 1;
                if *d == 0 {
                    ready.push_back(w);
                }
            }
        }
        self.lowest = 0;
        self.highest = next;
        if next as usize == live.len() {
            return Ok(());
        }
        // Every vertex left has an in-edge from another one left: walking
        // those backwards must repeat a vertex, and the repeat is a cycle.
        let mut v = *live
            .iter()
            .find(|v| indegree[v] > 0)
            .expect("a vertex in a cycle");
        let mut walked: Vec<VertexId> = Vec::new();
        let mut at: HashMap<VertexId, usize> = HashMap::new();
        let start = loop {
            if let Some(&i) = at.get(&v) {
                break i;
            }
            at.insert(v, walked.len());
            walked.push(v);
            v = *self.inn[v as usize]
                .iter()
                .find(|w| indegree[w] > 0)
                .expect("a predecessor in the cycle");
        };
        // `walked[start..]` follows in-edges; reversed it follows the edges.
        let mut path: Vec<Value> = walked[start..]
            .iter()
            .rev()
            .map(|&v| self.names[v as usize].clone())
            .collect();
        path.push(path[0].clone());
        Err(Error::WouldCreateCycle(Value::List(path.into())))
    }
}
