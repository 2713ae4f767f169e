//! Session-level authorization: the guard of the operations that have a
//! session and no variable (its information, diagnostics, snapshot and
//! audit log, its deletion), and so no access rules.
//!
//! Dependencies point one way: this module uses [`crate::acl`] (for
//! [`MAX_PRINCIPAL_BYTES`]), [`crate::audit`] and [`crate::permission`];
//! none of them knows a session.

use super::Session;
use crate::acl::MAX_PRINCIPAL_BYTES;
use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::permission::Permission;

impl Session {
    /// The check of a session-level operation: `Ok` for no principal (the
    /// session itself) or the session naming itself; anyone else is refused
    /// with `AccessDenied`, audited with `perm` and no variable. A principal
    /// that is empty or longer than [`MAX_PRINCIPAL_BYTES`] is
    /// `bad_principal`.
    pub fn authorize_session(
        &self,
        principal: Option<&str>,
        perm: Permission,
        now_us: i64,
    ) -> Result<()> {
        match principal {
            None => Ok(()),
            Some(p) if p.is_empty() || p.len() > MAX_PRINCIPAL_BYTES => {
                Err(Error::invalid_arg("bad_principal"))
            }
            Some(p) if p == &*self.id => Ok(()),
            Some(p) => {
                self.audit_ring()
                    .record(now_us, AuditEvent::Denied, Some(p), None, Some(perm));
                Err(Error::AccessDenied)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::session::SessionOpts;
    use Permission::Read;

    #[test]
    fn session_operations_are_reserved_to_the_session() {
        let s = Session::new("s1".into(), SessionOpts::default(), Limits::default(), 0);
        assert_eq!(s.authorize_session(None, Read, 0), Ok(()));
        assert_eq!(s.authorize_session(Some("s1"), Read, 0), Ok(()));
        assert!(s.audit_log(10).is_empty());

        assert_eq!(
            s.authorize_session(Some("s10"), Read, 0),
            Err(Error::AccessDenied)
        );
        let long = "x".repeat(MAX_PRINCIPAL_BYTES + 1);
        for bad in ["", long.as_str()] {
            assert_eq!(
                s.authorize_session(Some(bad), Read, 0),
                Err(Error::invalid_arg("bad_principal"))
            );
        }
        let log = s.audit_log(10);
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].event, AuditEvent::Denied);
        assert_eq!(log[0].principal.as_deref(), Some("s10"));
        assert_eq!(log[0].variable, None);
        assert_eq!(log[0].permission, Some(Read));
    }
}
