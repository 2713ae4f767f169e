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
//! Invariants (checked by the property tests below):
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

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use ahash::AHashMap;
use parking_lot::{RwLock, RwLockReadGuard};

use crate::caller::{Caller, Permission};
use crate::error::{Error, Result};
use crate::session::Session;
use crate::value::Value;

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

/// Output formats of [`DependencyGraph::render`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Dot,
    Mermaid,
}

impl Format {
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "dot" => Ok(Format::Dot),
            "mermaid" => Ok(Format::Mermaid),
            _ => Err(Error::InvalidArgument(Value::tagged(
                "unknown_format",
                Value::str(name),
            ))),
        }
    }
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

fn key_of(name: &Value) -> Result<&str> {
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

    /// The graph as Graphviz DOT or a Mermaid flowchart. Edges of a type
    /// other than `data` are labelled with it.
    pub fn render(&self, format: Format) -> String {
        let edges = self.edges();
        let mut out = String::with_capacity(32 + edges.len() * 24);
        match format {
            Format::Dot => {
                out.push_str("digraph dependencies {\n  rankdir=LR;\n");
                for e in &edges {
                    let _ = write!(
                        out,
                        "  {} -> {}",
                        dot_quote(e.from.as_text().unwrap_or_default()),
                        dot_quote(e.to.as_text().unwrap_or_default())
                    );
                    if e.edge_type != DEFAULT_EDGE_TYPE {
                        let _ = write!(out, " [label={}]", dot_quote(e.edge_type));
                    }
                    out.push_str(";\n");
                }
                out.push_str("}\n");
            }
            Format::Mermaid => {
                // Mermaid ids must be plain words, so vertices get `v<n>` ids
                // and their names go in quoted labels.
                out.push_str("graph LR\n");
                let mut ids: HashMap<&str, usize> = HashMap::new();
                for e in &edges {
                    out.push_str("  ");
                    mermaid_node(e.from, &mut ids, &mut out);
                    if e.edge_type == DEFAULT_EDGE_TYPE {
                        out.push_str(" --> ");
                    } else {
                        let _ = write!(out, " -->|\"{}\"| ", mermaid_escape(e.edge_type));
                    }
                    mermaid_node(e.to, &mut ids, &mut out);
                    out.push('\n');
                }
            }
        }
        out
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

fn dot_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {}
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// Writes a vertex's id, with its label the first time it appears.
fn mermaid_node<'a>(name: &'a Value, ids: &mut HashMap<&'a str, usize>, out: &mut String) {
    let key = name.as_text().unwrap_or_default();
    let next = ids.len();
    let id = *ids.entry(key).or_insert(next);
    if id == next {
        let _ = write!(out, "v{id}[\"{}\"]", mermaid_escape(key));
    } else {
        let _ = write!(out, "v{id}");
    }
}

fn mermaid_escape(s: &str) -> String {
    let mut q = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => q.push_str("#quot;"),
            '#' => q.push_str("#35;"),
            '<' => q.push_str("#lt;"),
            '>' => q.push_str("#gt;"),
            c if c.is_control() => q.push(' '),
            c => q.push(c),
        }
    }
    q
}

/// A session's graph behind its lock, with the edge count mirrored in an
/// atomic so a write to a session without dependencies asks nothing more.
#[derive(Debug, Default)]
pub struct SessionGraph {
    graph: RwLock<DependencyGraph>,
    edges: AtomicUsize,
}

impl SessionGraph {
    pub fn read(&self) -> RwLockReadGuard<'_, DependencyGraph> {
        self.graph.read()
    }

    /// Runs `f` on the graph under the write lock.
    pub fn update<T>(&self, f: impl FnOnce(&mut DependencyGraph) -> T) -> T {
        let mut graph = self.graph.write();
        let result = f(&mut graph);
        self.edges.store(graph.edge_count(), Ordering::Release);
        result
    }

    /// Replaces the whole graph (snapshot import).
    pub fn replace(&self, graph: DependencyGraph) {
        self.update(|g| *g = graph);
    }

    pub fn edge_count(&self) -> usize {
        self.edges.load(Ordering::Acquire)
    }

    /// Does anything depend on `key`? Free when the session has no edges.
    pub fn has_dependents(&self, key: &str) -> bool {
        self.edge_count() > 0 && self.graph.read().has_dependents(key)
    }
}

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
    /// [`DependencyGraph::add_edge_within`]).
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
        let names = changed
            .iter()
            .map(|c| self.dependency_name(c, caller, Permission::Read))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.dependencies().read().update_order(&names))
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
        let cyclic =
            DependencyGraph::from_edges([(&a, &b, "data"), (&b, &c, "data"), (&c, &a, "x")]);
        match cyclic {
            Err(Error::WouldCreateCycle(Value::List(path))) => {
                assert_eq!(path.len(), 4);
                assert_eq!(path[0], path[3]);
            }
            other => panic!("{other:?}"),
        }
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
                DependencyGraph::from_edges(edges.iter().map(|e| (e.from, e.to, e.edge_type)))
                    .unwrap();
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
}
