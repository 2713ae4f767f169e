//! A bounded ring of security events per session: what was refused, and
//! who changed access rules.
//!
//! Audited: every access denial of a session operation (principal,
//! variable, permission), every call refused by the rate limiter, and every
//! change of a variable's access rules. Not audited: allowed operations
//! (they would flood the ring and are visible through telemetry) and
//! `check_access` questions, which change nothing.
//!
//! Invariants (tests below):
//! - The ring never holds more than its capacity; the oldest entry goes first.
//! - Sequence numbers increase by one per recorded event, so a reader can
//!   tell how many entries it missed (`seq` gaps, or `dropped()`).
//! - Capacity 0 records nothing and costs one branch.

use std::collections::VecDeque;

use parking_lot::Mutex;

use crate::permission::Permission;

/// Default entries kept per session.
pub const DEFAULT_CAPACITY: usize = 256;
/// Largest capacity a session may ask for.
pub const MAX_CAPACITY: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditEvent {
    /// A principal was refused a permission on a variable.
    Denied,
    /// A call was refused by the session's rate limit.
    RateLimited,
    /// A variable's access rules were replaced.
    RulesChanged,
}

impl AuditEvent {
    pub fn name(self) -> &'static str {
        match self {
            AuditEvent::Denied => "denied",
            AuditEvent::RateLimited => "rate_limited",
            AuditEvent::RulesChanged => "rules_changed",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    /// 1 for the session's first event, then one more per event.
    pub seq: u64,
    /// Microseconds since the Unix epoch.
    pub at: i64,
    pub event: AuditEvent,
    /// `None`: the session itself.
    pub principal: Option<Box<str>>,
    /// The variable's id, when the event concerns one.
    pub variable: Option<Box<str>>,
    pub permission: Option<Permission>,
}

#[derive(Debug)]
pub struct AuditRing {
    capacity: usize,
    inner: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<AuditEntry>,
    recorded: u64,
}

impl AuditRing {
    pub fn new(capacity: usize) -> AuditRing {
        AuditRing {
            capacity: capacity.min(MAX_CAPACITY),
            inner: Mutex::new(Ring::default()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records `event` as happening at `at` (microseconds since the epoch).
    pub fn record(
        &self,
        at: i64,
        event: AuditEvent,
        principal: Option<&str>,
        variable: Option<&str>,
        permission: Option<Permission>,
    ) {
        if self.capacity == 0 {
            return;
        }
        let at = crate::time::resolve(at);
        let mut ring = self.inner.lock();
        ring.recorded += 1;
        let entry = AuditEntry {
            seq: ring.recorded,
            at,
            event,
            principal: principal.map(Into::into),
            variable: variable.map(Into::into),
            permission,
        };
        if ring.entries.len() >= self.capacity {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry);
    }

    /// At most `limit` entries, newest first.
    pub fn recent(&self, limit: usize) -> Vec<AuditEntry> {
        let ring = self.inner.lock();
        ring.entries.iter().rev().take(limit).cloned().collect()
    }

    /// Events recorded since the session began.
    pub fn recorded(&self) -> u64 {
        self.inner.lock().recorded
    }

    /// Events that no longer fit and were dropped (or were never kept).
    pub fn dropped(&self) -> u64 {
        let ring = self.inner.lock();
        ring.recorded - ring.entries.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_up_to_capacity() {
        let ring = AuditRing::new(3);
        for i in 0..10 {
            let var = format!("v{i}");
            ring.record(
                i,
                AuditEvent::Denied,
                Some("p"),
                Some(&var),
                Some(Permission::Write),
            );
        }
        let recent = ring.recent(100);
        assert_eq!(recent.len(), 3);
        let seqs: Vec<u64> = recent.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![10, 9, 8]);
        assert_eq!(recent[0].variable.as_deref(), Some("v9"));
        assert_eq!(ring.dropped(), 7);
        assert_eq!(ring.recent(1).len(), 1);
    }

    #[test]
    fn zero_capacity_records_nothing() {
        let ring = AuditRing::new(0);
        ring.record(0, AuditEvent::RateLimited, None, None, None);
        assert!(ring.recent(10).is_empty());
        assert_eq!(ring.recorded(), 0);
    }

    #[test]
    fn capacity_is_capped() {
        assert_eq!(AuditRing::new(usize::MAX).capacity(), MAX_CAPACITY);
    }
}
