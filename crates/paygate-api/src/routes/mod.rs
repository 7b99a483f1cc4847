pub mod api_keys;
pub mod audit;
pub mod me;
