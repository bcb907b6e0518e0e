//! bulkhead: per-tenant isolation for LLM-agent platforms.
//!
//! The crate is layered as DESIGN.md describes: the isolation core ([`sandbox`]) at the
//! bottom, then the spawner, tenants and auth, policy, audit and the API. Raw syscalls live
//! only in the core; Cargo.toml denies them everywhere else (the lint table), and the core
//! alone opts back in, with a SAFETY comment required on every block.

pub mod api;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod egress;
pub mod llm;
pub mod policy;
pub mod retrieval;
pub mod sandbox;
pub mod spawner;
pub mod tenant;
