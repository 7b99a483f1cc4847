use paygate_domain::CompanyId;

use crate::OperatorStore;

/// Proof that the caller may act for one company. Company data is reachable only
/// through store methods that take one, and it can be created only by
/// authentication ([`crate::auth::Authenticator`]) or by a holder of an
/// [`OperatorStore`] (the CLI). The HTTP API holds neither constructor. Who is
/// acting is carried by the audit record of each change, not by the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompanyScope {
    company_id: CompanyId,
}

impl CompanyScope {
    pub(crate) fn new(company_id: CompanyId) -> Self {
        Self { company_id }
    }

    pub fn company_id(&self) -> CompanyId {
        self.company_id
    }
}

/// An operator's scope for one company. Requires an [`OperatorStore`] as proof of
/// operator capability.
pub fn operator_scope(_proof: &dyn OperatorStore, company_id: CompanyId) -> CompanyScope {
    CompanyScope::new(company_id)
}
