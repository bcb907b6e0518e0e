//! bulkhead: per-tenant isolation for LLM-agent platforms.
//!
//! The crate is layered as DESIGN.md describes. This release holds the isolation core
//! ([`sandbox`]) and the cold-start benchmark ([`bench`]); every module above the core is
//! free of `unsafe`, which lives only in `src/sandbox/`.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod client;
pub mod config;
pub mod policy;
pub mod sandbox;
pub mod spawner;
pub mod tenant;
