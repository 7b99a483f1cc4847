//! The closed list of event types integrators can receive, and the set an
//! endpoint subscribes to. Events themselves are built and stored by
//! `paygate-store` (in the same transaction as their change).

use std::fmt;

use crate::payment::PaymentStatus;

macro_rules! event_types {
    ($($variant:ident => $text:tt, $object:tt),+ $(,)?) => {
        /// What happened. Documented in the README; a new type is a new variant here.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, utoipa::ToSchema)]
        pub enum EventType {
            $(#[serde(rename = $text)] $variant,)+
        }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $text,)+
                }
            }

            /// The `object_type` of events of this type.
            pub fn object_type(self) -> &'static str {
                match self {
                    $(EventType::$variant => $object,)+
                }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some(EventType::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

event_types! {
    PaymentCreated => "payment.created", "payment",
    PaymentUpdated => "payment.updated", "payment",
    PaymentApproved => "payment.approved", "payment",
    PaymentRejected => "payment.rejected", "payment",
    PaymentCanceled => "payment.canceled", "payment",
    PaymentExpired => "payment.expired", "payment",
    PaymentProcessing => "payment.processing", "payment",
    PaymentCompleted => "payment.completed", "payment",
    PaymentFailed => "payment.failed", "payment",
    PaymentReturned => "payment.returned", "payment",
    PayeeCreated => "payee.created", "payee",
    PayeeDisabled => "payee.disabled", "payee",
    ApiKeyCreated => "api_key.created", "api_key",
    ApiKeyRotated => "api_key.rotated", "api_key",
    ApiKeyRevoked => "api_key.revoked", "api_key",
    ApiKeyExpiring => "api_key.expiring", "api_key",
    ApprovalPolicyUpdated => "approval_policy.updated", "approval_policy",
    WebhookEndpointDisabled => "webhook_endpoint.disabled", "webhook_endpoint",
    Ping => "ping", "webhook_endpoint",
}

impl EventType {
    /// The event of a payment entering `status` (`pending_approval` is its creation).
    pub fn for_payment_status(status: PaymentStatus) -> Self {
        match status {
            PaymentStatus::PendingApproval => Self::PaymentCreated,
            PaymentStatus::Approved => Self::PaymentApproved,
            PaymentStatus::Rejected => Self::PaymentRejected,
            PaymentStatus::Canceled => Self::PaymentCanceled,
            PaymentStatus::Expired => Self::PaymentExpired,
            PaymentStatus::Processing => Self::PaymentProcessing,
            PaymentStatus::Completed => Self::PaymentCompleted,
            PaymentStatus::Failed => Self::PaymentFailed,
            PaymentStatus::Returned => Self::PaymentReturned,
        }
    }

    /// The scope that may read events of this type (and subscribe to them):
    /// the one that reads the object itself, so events never widen a key's view.
    pub fn read_scope(self) -> crate::Scope {
        use crate::Scope;
        match self.object_type() {
            "payment" => Scope::PaymentsRead,
            "payee" => Scope::PayeesRead,
            "api_key" => Scope::KeysRead,
            "approval_policy" => Scope::PolicyManage,
            _ => Scope::WebhooksManage,
        }
    }

    /// The types a key holding `scopes` may read.
    pub fn readable_with(scopes: crate::ScopeSet) -> Vec<Self> {
        Self::ALL.iter().copied().filter(|t| scopes.contains(t.read_scope())).collect()
    }

    /// `ping` is sent only by the endpoint test; nobody subscribes to it.
    pub fn subscribable(self) -> bool {
        self != Self::Ping
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// At most this many distinct types in one subscription (the closed list is shorter).
pub const MAX_SUBSCRIBED_TYPES: usize = 32;

/// What an endpoint receives: every type (`["*"]`), or the listed ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventTypes {
    All,
    Only(Vec<EventType>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTypesError {
    #[error("must list at least one event type, or \"*\" for all")]
    Empty,
    #[error("{0:?} is not an event type")]
    Unknown(String),
    #[error("\"*\" cannot be combined with other types")]
    WildcardWithOthers,
    #[error("at most {MAX_SUBSCRIBED_TYPES} event types")]
    TooMany,
}

impl EventTypes {
    /// Parses a list; duplicates collapse. Each error carries the index of its item.
    pub fn parse(items: &[String]) -> Result<Self, Vec<(usize, EventTypesError)>> {
        if items.is_empty() {
            return Err(vec![(0, EventTypesError::Empty)]);
        }
        if items.len() > MAX_SUBSCRIBED_TYPES {
            return Err(vec![(0, EventTypesError::TooMany)]);
        }
        if items.iter().any(|t| t == "*") {
            return if items.len() == 1 { Ok(Self::All) } else { Err(vec![(0, EventTypesError::WildcardWithOthers)]) };
        }
        let mut errors = Vec::new();
        let mut types = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match EventType::parse(item).filter(|t| t.subscribable()) {
                Some(t) => types.push(t),
                None => errors.push((i, EventTypesError::Unknown(item.chars().take(64).collect()))),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        types.sort();
        types.dedup();
        Ok(Self::Only(types))
    }

    pub fn includes(&self, t: EventType) -> bool {
        match self {
            Self::All => t.subscribable(),
            Self::Only(types) => types.contains(&t),
        }
    }

    /// Storage and API form: `*` or the names joined by spaces.
    pub fn to_storage(&self) -> String {
        match self {
            Self::All => "*".to_owned(),
            Self::Only(types) => types.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" "),
        }
    }

    pub fn from_storage(text: &str) -> Option<Self> {
        let items: Vec<String> = text.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        Self::parse(&items).ok()
    }

    pub fn to_list(&self) -> Vec<String> {
        match self {
            Self::All => vec!["*".to_owned()],
            Self::Only(types) => types.iter().map(|t| t.as_str().to_owned()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
        }
        for s in PaymentStatus::ALL {
            assert_eq!(EventType::for_payment_status(s).object_type(), "payment");
        }
    }

    #[test]
    fn subscriptions() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(EventTypes::parse(&strings(&["*"])), Ok(EventTypes::All));
        let some = EventTypes::parse(&strings(&["payment.approved", "payee.created", "payment.approved"])).unwrap();
        assert!(some.includes(EventType::PaymentApproved));
        assert!(!some.includes(EventType::PaymentCompleted));
        assert_eq!(EventTypes::from_storage(&some.to_storage()), Some(some));
        assert!(!EventTypes::All.includes(EventType::Ping));
        assert!(EventTypes::parse(&[]).is_err());
        let many: Vec<String> = (0..MAX_SUBSCRIBED_TYPES + 1).map(|_| "payment.approved".to_owned()).collect();
        assert_eq!(EventTypes::parse(&many), Err(vec![(0, EventTypesError::TooMany)]));
        assert!(EventTypes::parse(&strings(&["*", "payment.approved"])).is_err());
        let errors = EventTypes::parse(&strings(&["payment.approved", "payment.nope", "ping"])).unwrap_err();
        assert_eq!(errors.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 2]);
    }
}
