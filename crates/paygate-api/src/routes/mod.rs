pub mod api_keys;
pub mod me;
