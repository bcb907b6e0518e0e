//! Every refusal, mapped once to an HTTP status and a stable `reason_code`.

use super::http::ApiBody;
use hyper::{Response, StatusCode};

use crate::audit::AuditError;
use crate::auth::AuthError;
use crate::config::ConfigError;
use crate::spawner::SpawnerError;
use crate::tenant::RegistryError;
use crate::tenant::files::FilesError;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input.
    #[error("{0}")]
    BadRequest(String),
    /// Missing, malformed or unknown credential.
    #[error("{0}")]
    Auth(#[from] AuthError),
    /// The tenant is frozen.
    #[error("tenant is frozen")]
    Frozen,
    /// No such route or object.
    #[error("{0}")]
    NotFound(String),
    /// Admin operation on a tenant that does not exist.
    #[error("no tenant {0}")]
    TenantMissing(String),
    /// Method not allowed on this route.
    #[error("method not allowed")]
    Method,
    /// Body or value too large.
    #[error("{0}")]
    TooLarge(String),
    /// A path that would leave the tenant's work dir.
    #[error("{0}")]
    PathEscape(String),
    /// A tenant overlay key that only the admin may set.
    #[error("{0}")]
    AdminOnlyKey(String),
    /// An overlay key that does not exist.
    #[error("{0}")]
    UnknownKey(String),
    /// Conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The command could not be executed.
    #[error("{0}")]
    ExecFailed(String),
    /// The sandbox machinery failed.
    #[error("{0}")]
    Sandbox(String),
    /// Something on our side failed.
    #[error("{0}")]
    Internal(String),
    /// The daemon is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The client was too slow.
    #[error("{0}")]
    Timeout(String),
    /// The policy refused the action.
    #[error("{0}")]
    Policy(#[from] crate::policy::Denial),
    /// An idempotency key reused for a different request.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// The tenant's work/ is at or over its `disk_bytes` limit.
    #[error("work/ holds {} bytes; the limit disk_bytes is {} (this write adds {}); delete files to continue", .0.used, .0.limit, .0.adding)]
    QuotaExceeded(crate::policy::limits::OverQuota),
    /// No such model.
    #[error("model {0:?} does not exist")]
    ModelNotFound(String),
    /// The tenant may not use the model.
    #[error("model {0:?} is not allowed for this tenant")]
    ModelNotAllowed(String),
    /// The call could pass the tenant's budget.
    #[error("{0}")]
    BudgetExceeded(String),
    /// The call could pass one of the calling actor's budgets.
    #[error("{0}")]
    ActorBudgetExceeded(String),
    /// Every upstream for the model failed.
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// The provider answered, but with an error or an answer that cannot be used.
    #[error("{0}")]
    UpstreamRefused(String),
    /// The tenant's work/ cannot be measured, so it counts as over its `disk_bytes` limit.
    #[error(
        "{0}; with disk_bytes set, writes and runs are refused until it can (delete files, or the admin lifts the limit)"
    )]
    Unmeasurable(String),
    /// The client went away before its request could be served.
    #[error("the client went away")]
    ClientGone,
    /// A rate or concurrency limit was hit.
    #[error("limit {} reached; retry after {} ms", .0.limit, .0.retry_after.as_millis())]
    RateLimited(crate::policy::limits::Throttled),
}

impl ApiError {
    /// Status and reason code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Auth(AuthError::InvalidTenantName(_) | AuthError::InvalidWorkspace(_)) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ApiError::Auth(AuthError::Random(_)) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Auth(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            ApiError::Frozen => (StatusCode::LOCKED, "tenant_frozen"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::TenantMissing(_) => (StatusCode::NOT_FOUND, "tenant_missing"),
            ApiError::Method => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::PathEscape(_) => (StatusCode::FORBIDDEN, "path_escape"),
            ApiError::AdminOnlyKey(_) => (StatusCode::FORBIDDEN, "admin_only_key"),
            ApiError::UnknownKey(_) => (StatusCode::BAD_REQUEST, "unknown_key"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::ExecFailed(_) => (StatusCode::BAD_REQUEST, "exec_failed"),
            ApiError::Sandbox(_) => (StatusCode::INTERNAL_SERVER_ERROR, "sandbox_error"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            ApiError::ClientGone => (StatusCode::REQUEST_TIMEOUT, "client_gone"),
            ApiError::ModelNotFound(_) => (StatusCode::NOT_FOUND, "model_not_found"),
            ApiError::ModelNotAllowed(_) => (StatusCode::FORBIDDEN, "model_not_allowed"),
            ApiError::BudgetExceeded(_) => (StatusCode::PAYMENT_REQUIRED, "tenant_budget_exceeded"),
            ApiError::ActorBudgetExceeded(_) => {
                (StatusCode::PAYMENT_REQUIRED, "actor_budget_exceeded")
            }
            ApiError::UpstreamUnavailable(_) => (StatusCode::BAD_GATEWAY, "upstream_unavailable"),
            ApiError::UpstreamRefused(_) => (StatusCode::BAD_GATEWAY, "upstream_refused"),
            ApiError::QuotaExceeded(_) | ApiError::Unmeasurable(_) => {
                (StatusCode::FORBIDDEN, "quota_exceeded")
            }
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::Policy(crate::policy::Denial::Halted) => {
                (StatusCode::SERVICE_UNAVAILABLE, "halted")
            }
            ApiError::Policy(crate::policy::Denial::Scope { .. }) => {
                (StatusCode::FORBIDDEN, "policy_denied")
            }
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::IdempotencyConflict(_) => (StatusCode::CONFLICT, "idempotency_conflict"),
        }
    }

    /// The JSON error response.
    pub fn response(&self, trace_id: &str) -> Response<ApiBody> {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({"error": {"reason_code": code, "message": self.to_string()}});
        let mut r = super::http::json_response(status, &body, trace_id);
        if let ApiError::RateLimited(t) = self {
            let secs = t.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = hyper::header::HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl ApiError {
    /// The API error an LLM routing failure becomes.
    pub fn from_llm_ref(e: &crate::llm::upstream::LlmError) -> ApiError {
        match e {
            crate::llm::upstream::LlmError::UnknownModel(m) => ApiError::ModelNotFound(m.clone()),
            crate::llm::upstream::LlmError::Unavailable(_) => {
                ApiError::UpstreamUnavailable(e.to_string())
            }
        }
    }
}

impl From<crate::llm::upstream::LlmError> for ApiError {
    fn from(e: crate::llm::upstream::LlmError) -> Self {
        ApiError::from_llm_ref(&e)
    }
}

impl From<FilesError> for ApiError {
    fn from(e: FilesError) -> Self {
        match e {
            FilesError::PathEscape => ApiError::PathEscape(e.to_string()),
            FilesError::BadPath(_) | FilesError::WrongType(_) => {
                ApiError::BadRequest(e.to_string())
            }
            FilesError::NotFound => ApiError::NotFound(e.to_string()),
            FilesError::NotEmpty => ApiError::Conflict(e.to_string()),
            FilesError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
            FilesError::Unmeasurable(_) => ApiError::Unmeasurable(e.to_string()),
            FilesError::Os {
                errno: nix::errno::Errno::EACCES | nix::errno::Errno::EPERM,
                ..
            } => ApiError::Conflict(format!("{e}: the sandbox changed its permissions")),
            FilesError::Os { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(n) => ApiError::TenantMissing(n),
            RegistryError::AlreadyExists(_) => ApiError::Conflict(e.to_string()),
            RegistryError::TokenNotFound(_) => ApiError::NotFound(e.to_string()),
            RegistryError::Auth(a) => ApiError::Auth(a),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::AdminOnlyKey { .. } => ApiError::AdminOnlyKey(e.to_string()),
            ConfigError::UnknownKey { .. } => ApiError::UnknownKey(e.to_string()),
            ConfigError::Invalid { .. } => ApiError::BadRequest(e.to_string()),
            ConfigError::Read { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<SpawnerError> for ApiError {
    fn from(e: SpawnerError) -> Self {
        match e {
            SpawnerError::Failed {
                exec_failure: true, ..
            } => ApiError::ExecFailed(e.to_string()),
            SpawnerError::Failed { invalid: true, .. } => ApiError::BadRequest(e.to_string()),
            other => ApiError::Sandbox(other.to_string()),
        }
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> Self {
        ApiError::Internal(format!("audit: {e}"))
    }
}
