//! Response bodies. The views of stored objects live in `paygate-store`
//! (events carry the same snapshots); this module re-exports them.

pub use paygate_store::views::*;
