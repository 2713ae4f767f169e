//! Named breakers or budgets, looked up without a lock.

/// A breaker's or budget's name: an atom's term word (atoms live as long as
/// the VM, so the word is stable), or any other term's external format.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Name {
    Atom(usize),
    Term(Box<[u8]>),
}

/// Named breakers or budgets: lookups take no lock and write no shared
/// memory (papaya), so asks from every scheduler run in parallel.
/// Inserts and removals are rare; callers serialise them if they must.
pub struct Registry<V> {
    map: papaya::HashMap<Name, V, foldhash::fast::RandomState>,
}

impl<V> Default for Registry<V> {
    fn default() -> Self {
        Registry {
            map: papaya::HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
        }
    }
}

impl<V: Clone + Send + Sync> Registry<V> {
    pub fn with<R>(&self, name: &Name, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.map.pin().get(name).map(f)
    }

    /// Inserts or replaces.
    pub fn insert(&self, name: Name, v: V) {
        self.map.pin().insert(name, v);
    }

    pub fn remove(&self, name: &Name) -> bool {
        self.map.pin().remove(name).is_some()
    }

    pub fn values(&self) -> Vec<V> {
        self.map.pin().values().cloned().collect()
    }
}
