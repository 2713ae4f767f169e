//! The atoms the engine itself writes into replies: error details, reply
//! map keys, type, permission and event names. Atoms are never collected,
//! so the NIF creates these once, when it loads, and otherwise only looks
//! atoms up: a name that is not already an atom is handed back as a binary.
//! That way no data (a snapshot's atom names, a rule's condition keys, a
//! value) can grow the VM's atom table, and every atom of this vocabulary
//! still comes back as an atom.
//!
//! The port backend decodes the port program's replies against the same
//! vocabulary: it ensures the NIF is loaded, which creates these atoms.
//!
//! Invariants (tests below): every atom literal in the engine's and the
//! NIF's sources is listed here, and so is every error kind
//! ([`crate::Error::kind`]) and every key of a reply map ([`crate::command::reply`]).

use crate::audit::AuditEvent;
use crate::command::reply::{AUDIT_KEYS, HISTORY_KEYS, SESSION_KEYS, VARIABLE_KEYS};
use crate::permission::Permission;
use crate::types::VarType;

/// Every reason [`crate::Error::kind`] gives (checked against its source).
const ERROR_KINDS: &[&str] = &[
    "session_not_found",
    "already_exists",
    "not_found",
    "invalid_value",
    "constraint_violation",
    "version_mismatch",
    "version_not_found",
    "invalid_argument",
    "too_large",
    "invalid_snapshot",
    "validation_failed",
    "access_denied",
    "invalid_rules",
    "rate_limited",
    "busy",
    "locked_by",
    "stale_lock_token",
    "would_create_cycle",
    "self_dependency",
    "lock_held_by",
    "not_lock_owner",
    "not_optimizing",
    "already_optimizing",
    "timeout",
    "bad_request",
    "internal_error",
];

const NAMES: &[&str] = &[
    "above_max",
    "access_rules",
    "allowed_modules",
    "any",
    "at",
    "audit_capacity",
    "available",
    "bad_aggregation",
    "bad_atom",
    "bad_caller",
    "bad_conflict_resolution",
    "bad_constraint",
    "bad_context",
    "bad_edge_type",
    "bad_fence",
    "bad_float",
    "bad_iteration",
    "bad_lease",
    "bad_limit",
    "bad_lock_token",
    "bad_map",
    "bad_max_history",
    "bad_metric_name",
    "bad_metrics_config",
    "bad_milliseconds",
    "bad_name_length",
    "bad_optimizer_id",
    "bad_principal",
    "bad_session_id",
    "bad_ttl",
    "bad_tuple",
    "bad_update",
    "bad_variable_id",
    "below_min",
    "bitstring",
    "boolean",
    "burst",
    "busy",
    "choice",
    "choice_needs_choices",
    "choices",
    "conditions",
    "conditions_not_a_map",
    "constraint_keys_must_be_atoms",
    "constraints",
    "constraints_must_be_a_map",
    "context_must_be_a_map",
    "created_at",
    "description",
    "description_must_be_a_string",
    "dimensions",
    "duplicate_variable_in_batch",
    "edge_type",
    "edges",
    "embedding",
    "enum",
    "event",
    "expected",
    "expected_a_list",
    "expected_atom",
    "expected_non_negative_integer",
    "failure_rate",
    "float",
    "format",
    "half_open_probes",
    "half_open_successes",
    "id",
    "improper_list",
    "integer",
    "integer_out_of_range",
    "invalid_condition_key",
    "invalid_permission",
    "invalid_session_pattern",
    "invalid_utf8",
    "last_write",
    "lease_ms",
    "limits_must_be_a_map",
    "lock_table_exists",
    "max",
    "max_history",
    "max_length",
    "max_name_bytes",
    "max_snapshot_bytes",
    "max_tokens",
    "max_value_bytes",
    "max_variables",
    "metadata",
    "metadata_must_be_a_map",
    "min",
    "min_greater_than_max",
    "min_length",
    "min_per_second",
    "minimum_calls",
    "missing_permissions",
    "missing_session_pattern",
    "module",
    "name",
    "name_must_be_atom_or_string",
    "nested_too_deeply",
    "not_a_finite_number",
    "not_a_list",
    "not_a_map",
    "not_finite",
    "not_in_choices",
    "ops_per_sec",
    "over_budget",
    "owner_not_alive",
    "pattern",
    "pattern_must_be_a_string",
    "permission",
    "permissions",
    "permissions_not_a_list",
    "preempt_after",
    "principal",
    "probe_lease_ms",
    "rate_limit",
    "ratio",
    "rollback_to",
    "seq",
    "session_pattern",
    "shape",
    "shape_data_mismatch",
    "slow_call_ms",
    "store_exists",
    "string",
    "tensor",
    "threshold",
    "timeout",
    "too_large",
    "too_many_conditions",
    "too_many_edge_types",
    "too_many_edges",
    "too_many_metrics",
    "too_many_rules",
    "type",
    "type_must_be_an_atom",
    "unknown_format",
    "unknown_key",
    "unknown_permission",
    "unknown_type",
    "unsupported_term",
    "updated_at",
    "updates_must_be_a_list",
    "value",
    "value_must_be_a_number",
    "variable",
    "version",
    "vertices",
    "window",
];

/// Every name of the vocabulary (some more than once).
pub fn atoms() -> impl Iterator<Item = &'static str> {
    NAMES
        .iter()
        .chain(ERROR_KINDS)
        .chain(&VARIABLE_KEYS)
        .chain(&HISTORY_KEYS)
        .chain(&SESSION_KEYS)
        .chain(&AUDIT_KEYS)
        .copied()
        .chain(VarType::ALL.into_iter().map(VarType::name))
        .chain(Permission::ALL.into_iter().map(Permission::name))
        .chain(
            [
                AuditEvent::Denied,
                AuditEvent::RateLimited,
                AuditEvent::RulesChanged,
            ]
            .into_iter()
            .map(AuditEvent::name),
        )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    /// Scans the non-test part of every source file of the engine and the
    /// NIF for names given to `Value::atom`, `Value::tagged`,
    /// `Error::invalid_arg` and the error helpers built on them.
    #[test]
    fn every_atom_literal_is_in_the_vocabulary() {
        let known: HashSet<&str> = super::atoms().collect();
        let literal = regex::Regex::new(
            r#"(?:atom|tagged|invalid_arg|invalid|violation|bad)\(\s*"([a-z_][a-z_0-9]*)""#,
        )
        .unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut missing = Vec::new();
        let mut files = 0;
        for dir in [root.join("src"), root.join("../dspex_nif/src")] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension() != Some(std::ffi::OsStr::new("rs")) {
                    continue;
                }
                files += 1;
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                for c in literal.captures_iter(code) {
                    let name = c.get(1).unwrap().as_str();
                    if !known.contains(name) && !["ok", "error"].contains(&name) {
                        missing.push(format!("{}: {name}", path.display()));
                    }
                }
            }
        }
        assert!(files > 20, "sources not found under {}", root.display());
        assert!(missing.is_empty(), "not in the vocabulary: {missing:?}");
    }

    /// Every arm of `Error::kind` (`Error::X => "kind"`) names a kind listed.
    #[test]
    fn every_error_kind_is_in_the_vocabulary() {
        let known: HashSet<&str> = super::atoms().collect();
        let arm = regex::Regex::new(r#"Error::\w+(?:\(_\))? => "([a-z_]+)""#).unwrap();
        let source = include_str!("error.rs");
        let kinds: Vec<&str> = arm
            .captures_iter(source)
            .map(|c| c.get(1).unwrap().as_str())
            .collect();
        assert!(kinds.len() > 20, "Error::kind not found in error.rs");
        let missing: Vec<&&str> = kinds.iter().filter(|k| !known.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "error kinds not in the vocabulary: {missing:?}"
        );
    }
}
