//! The hash-chained JSONL audit log: one line per state change and per exec, durable
//! before the request that caused it is answered, holding no customer content. An LLM
//! call has two: its admission, durable before the answer, and its settlement, which
//! follows with the next commit (see [`AuditLog::record_detached`]).
//!
//! Each line is a JSON object with a `seq` number and `prev`, the SHA-256 (hex) of the
//! previous line's bytes (64 zeros for the first). `audit.head` records the seq and hash
//! of the last committed line, rewritten in place after each commit (it may lag after a
//! crash, never lead the log and its write-ahead ring `audit.wal` together), so that
//! cutting lines off the end is detected too.
#![forbid(unsafe_code)]

mod verify;
mod wal;
mod writer;

pub use verify::{VerifyError, VerifyReport, verify_file};
pub use writer::{AuditError, AuditLog, Durable, InFlight};

use sha2::{Digest, Sha256};

/// The genesis `prev` value.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an audit line says. Content never goes here: no argv, output, file bytes, config
/// values or tokens — only names, digests and outcomes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Event {
    /// Who: the admin key id (`ak_…`), a token id (`tk_<tenant>_<8 hex>`), or `daemon`.
    pub actor: String,
    /// The tenant concerned, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tenant: Option<String>,
    /// What was done, e.g. `tenant.create`, `token.rotate`, `exec`, `files.put`.
    pub action: String,
    /// What it was done to (a tenant name, token id, or a path inside work/).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub target: Option<String>,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    /// The refusal's reason code.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason_code: Option<String>,
    /// The request's trace id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub trace_id: Option<String>,
    /// For exec: details without content.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exec: Option<ExecDetails>,
    /// For egress: the connection's destination, bytes and outcome (no payload).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub egress: Option<crate::egress::Connection>,
    /// For an LLM call: model, tokens, cost and latency (no prompt or answer).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub llm: Option<LlmDetails>,
}

/// What an LLM call's line records.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LlmDetails {
    /// The public model that answered.
    pub model: String,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// What it cost, USD.
    pub cost_usd: String,
    /// From request to answer, milliseconds.
    pub latency_ms: u64,
    /// Models tried.
    pub attempts: u64,
    /// The worst case reserved against the budgets before the call, USD.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reserved_usd: Option<String>,
}

/// What an exec line records.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ExecDetails {
    /// The program's file name (`argv[0]`'s last component).
    pub program: String,
    /// SHA-256 of the argv (each argument NUL-terminated), hex.
    pub argv_sha256: String,
    /// Exit status, when it exited.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub exit_code: Option<i32>,
    /// Signal, when one ended it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub signal: Option<i32>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

impl ExecDetails {
    /// The program name and argv digest for `argv`.
    pub fn describe(argv: &[String]) -> (String, String) {
        let program = argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).chars().take(64).collect())
            .unwrap_or_default();
        let mut h = Sha256::new();
        for a in argv {
            h.update(a.as_bytes());
            h.update([0u8]);
        }
        (program, hex(&h.finalize()))
    }
}

/// One line as written: the event plus chain fields.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Line {
    pub seq: u64,
    pub ts_ms: u64,
    #[serde(flatten)]
    pub event: Event,
    pub prev: String,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}
