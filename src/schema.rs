//! The schema registry: what a valid event is, per event name.
//!
//! - [`registry`]: per-event schemas (the seed's property lists or JSON Schema draft 2020-12),
//!   SchemaVer versions, reject/tag/allow policies, unplanned events, sampling;
//! - [`quantity`]: quantities of metered events (exact decimals);
//! - [`tools`]: `northstar schema check | codegen | diff` for users' CI.

pub mod quantity;
pub mod registry;
pub mod tools;

pub use registry::{Decision, Registry, RegistryError};
