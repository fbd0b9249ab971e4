//! Virtual address management: range parsing and validation, and the allocation engine.
//!
//! This crate is a pure core: no I/O, no async, no SQL. The server feeds it the
//! state it loaded from the store and asks it which address to hand out next; the
//! store has the last word through its UNIQUE constraints.

mod engine;
mod free_set;
mod location;
mod range;

pub use engine::{Allocation, AllocationError, Engine, EngineError, Place, RangeSpec};
pub use free_set::FreeSet;
pub use location::{Location, LocationTier, great_circle_km};
pub use range::{AddressRange, Family, RangeError, address_from_key, address_key, join_address, parse_address, split_address};
