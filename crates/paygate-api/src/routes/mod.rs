pub mod api_keys;
pub mod audit;
pub mod events;
pub mod me;
pub mod payees;
pub mod payments;
pub mod policy;
pub mod webhooks;
