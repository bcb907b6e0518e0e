//! Tenant policy: every decision about whether an actor may do something goes through
//! [`check`], which takes the request's `Boundary` and a typed [`Action`] and answers
//! allow or a reason. Handlers never check roles or scopes by hand.
//!
//! This release holds scopes (roles and per-token tool allowlists) and the daemon-wide
//! halt; limits, budgets and fair scheduling build on the same entry point.
#![forbid(unsafe_code)]

pub mod cgroups;
pub mod limits;
pub mod schedule;

use crate::auth::{Boundary, Role};

/// Tool names a token's allowlist may hold (later issues add `retrieval.*`, `memory.*`,
/// `jobs.*`).
pub const TOOLS: &[&str] = &[
    "llm",
    "exec",
    "files.read",
    "files.write",
    "config.read",
    "config.write",
    "retrieval.read",
    "retrieval.write",
    "memory.read",
    "memory.write",
];

/// What a tenant request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run a command (`POST /v1/exec`).
    Exec,
    /// Read or list files.
    FilesRead,
    /// Write or delete files.
    FilesWrite,
    /// Read the tenant config.
    ConfigRead,
    /// Change the tenant config overlay.
    ConfigWrite,
    /// Call a model, or list them (`/v1/chat/completions`, `/v1/models`).
    Llm,
    /// Search, or read a document (`/v1/search`, `GET /v1/datasources/.../documents/...`).
    RetrievalRead,
    /// Create datasources, store or delete documents.
    RetrievalWrite,
    /// Read run state or memory.
    MemoryRead,
    /// Write run state or memory, or promote run state to memory.
    MemoryWrite,
}

impl Action {
    /// The tool (scope) name.
    pub fn tool(self) -> &'static str {
        match self {
            Action::Exec => "exec",
            Action::FilesRead => "files.read",
            Action::FilesWrite => "files.write",
            Action::ConfigRead => "config.read",
            Action::ConfigWrite => "config.write",
            Action::Llm => "llm",
            Action::RetrievalRead => "retrieval.read",
            Action::RetrievalWrite => "retrieval.write",
            Action::MemoryRead => "memory.read",
            Action::MemoryWrite => "memory.write",
        }
    }

    fn reads_only(self) -> bool {
        matches!(
            self,
            Action::FilesRead | Action::ConfigRead | Action::RetrievalRead | Action::MemoryRead
        )
    }
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The token lacks the scope (role or allowlist).
    #[error("policy denied: the token lacks the scope `{scope}` ({why})")]
    Scope {
        /// The missing scope.
        scope: &'static str,
        /// Role or allowlist.
        why: &'static str,
    },
    /// The daemon is halted.
    #[error("the daemon is halted: no new work is accepted")]
    Halted,
}

/// Validates a tool allowlist given at token creation.
pub fn validate_tools(tools: &[String]) -> Result<(), String> {
    match tools.iter().find(|t| !TOOLS.contains(&t.as_str())) {
        Some(bad) => Err(format!(
            "unknown tool {bad:?} (known: {})",
            TOOLS.join(", ")
        )),
        None => Ok(()),
    }
}

/// The single policy decision for a tenant request.
pub fn check(b: &Boundary, action: Action, halted: bool) -> Result<(), Denial> {
    if halted {
        return Err(Denial::Halted);
    }
    let role_allows = match b.role() {
        Role::Owner | Role::Admin | Role::Member => true,
        Role::Viewer => action.reads_only(),
    };
    if !role_allows {
        return Err(Denial::Scope {
            scope: action.tool(),
            why: "a viewer only reads",
        });
    }
    if b.allowed_tools()
        .is_some_and(|tools| !tools.iter().any(|t| t == action.tool()))
    {
        return Err(Denial::Scope {
            scope: action.tool(),
            why: "not in the token's tool allowlist",
        });
    }
    Ok(())
}
