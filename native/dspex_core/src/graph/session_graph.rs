//! A session's dependency graph behind its lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{RwLock, RwLockReadGuard};

use super::DependencyGraph;

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
