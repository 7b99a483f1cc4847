use paygate_domain::{CompanyId, KeyMode};

use crate::OperatorStore;

/// Proof that the caller may act for one company in one mode. Company data is
/// reachable only through store methods that take one, and it can be created
/// only by authentication ([`crate::auth::Authenticator`], from the key's
/// company and mode) or by a holder of an [`OperatorStore`] (the CLI). The
/// HTTP API holds neither constructor, so test and live data never mix by a
/// caller passing the wrong mode. Who is acting is carried by the audit record
/// of each change, not by the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompanyScope {
    company_id: CompanyId,
    mode: KeyMode,
}

impl CompanyScope {
    pub(crate) fn new(company_id: CompanyId, mode: KeyMode) -> Self {
        Self { company_id, mode }
    }

    pub fn company_id(&self) -> CompanyId {
        self.company_id
    }

    /// The mode whose payees, payments, events and endpoints the scope reaches.
    pub fn mode(&self) -> KeyMode {
        self.mode
    }

    /// The same company in another mode (conformance cases only).
    #[cfg(feature = "conformance")]
    pub(crate) fn in_mode(self, mode: KeyMode) -> Self {
        Self { mode, ..self }
    }
}

/// An operator's scope for one company and mode. Requires an [`OperatorStore`]
/// as proof of operator capability.
pub fn operator_scope(_proof: &dyn OperatorStore, company_id: CompanyId, mode: KeyMode) -> CompanyScope {
    CompanyScope::new(company_id, mode)
}
