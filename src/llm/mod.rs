//! LLM routing: OpenAI-compatible endpoints on the tenant socket, served by upstream
//! providers from the admin config, with per-tenant accounting.
//!
//! One pooled HTTP client serves every tenant (requests are stateless upstream). What
//! goes upstream is the tenant's request body with the overlay applied (model mapped to
//! its upstream name, `max_tokens` capped, the overlay's system prompt first) and the
//! provider's key; nothing names the tenant, the actor or the trace.
#![forbid(unsafe_code)]

pub mod config;
pub mod cost;
mod secret;
pub mod upstream;

pub use secret::Secret;
