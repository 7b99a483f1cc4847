use std::fmt;

use paygate_domain::{ApiKeyId, CompanyId};

use crate::OperatorStore;

/// Who is acting inside a [`CompanyScope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    ApiKey { id: ApiKeyId, owner: String },
    Operator,
}

/// Proof that the caller may act for one company. Company data is reachable only
/// through store methods that take one, and it can be created only by
/// authentication ([`crate::auth::Authenticator`]) or by a holder of an
/// [`OperatorStore`] (the CLI). The HTTP API holds neither constructor.
#[derive(Clone, PartialEq, Eq)]
pub struct CompanyScope {
    company_id: CompanyId,
    actor: Actor,
}

impl CompanyScope {
    pub(crate) fn new(company_id: CompanyId, actor: Actor) -> Self {
        Self { company_id, actor }
    }

    pub fn company_id(&self) -> CompanyId {
        self.company_id
    }

    pub fn actor(&self) -> &Actor {
        &self.actor
    }
}

impl fmt::Debug for CompanyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompanyScope").field("company_id", &self.company_id).field("actor", &self.actor).finish()
    }
}

/// An operator's scope for one company. Requires an [`OperatorStore`] as proof of
/// operator capability.
pub fn operator_scope(_proof: &dyn OperatorStore, company_id: CompanyId) -> CompanyScope {
    CompanyScope::new(company_id, Actor::Operator)
}
