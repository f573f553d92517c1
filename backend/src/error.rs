//! The one error type of the service layer, and how it becomes an RFC 9457 response.
//! Expected cases carry a stable code and a message a person can act on; everything else
//! is an opaque 500 whose cause chain is logged, never sent.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use consilium_core::problem::Problem;

#[derive(thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// Something the caller may not see: answered exactly like `NotFound` (so the answer does
    /// not tell what exists), but audited as a denial.
    #[error("{0}")]
    Hidden(String),
    /// Too many attempts (sign-in); try again after `retry_after` seconds (429).
    #[error("{detail}")]
    TooManyAttempts { retry_after: u64, detail: String },
    /// The request is malformed or a value is out of range (400).
    #[error("{0}")]
    Invalid(String),
    /// The request body is larger than this server accepts for it (413).
    #[error("{0}")]
    TooLarge(String),
    /// Several fields are wrong at once (422).
    #[error("{}", .0.join("; "))]
    Unprocessable(Vec<String>),
    /// The request conflicts with the current state (409), e.g. approving a rejected study.
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },
    /// A run can't start; every unmet condition in words (409).
    #[error("{}", .0.join("; "))]
    PreconditionsUnmet(Vec<String>),
    #[error("an unexpected error occurred")]
    Unexpected(#[source] anyhow::Error),
}

impl std::fmt::Debug for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        error_chain_fmt(self, f)
    }
}

/// Writes an error and every cause beneath it, one per line.
pub fn error_chain_fmt(
    e: &impl std::error::Error,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    writeln!(f, "{e}")?;
    let mut current = e.source();
    while let Some(cause) = current {
        writeln!(f, "Caused by:\n\t{cause}")?;
        current = cause.source();
    }
    Ok(())
}

impl AppError {
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        AppError::Conflict {
            code,
            detail: detail.into(),
        }
    }

    pub fn unexpected(e: impl Into<anyhow::Error>) -> Self {
        AppError::Unexpected(e.into())
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::Unauthenticated(_) => "unauthenticated",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) | AppError::Hidden(_) => "not_found",
            AppError::TooManyAttempts { .. } => "too_many_attempts",
            AppError::Invalid(_) => "invalid_input",
            AppError::TooLarge(_) => "too_large",
            AppError::Unprocessable(_) => "invalid_input",
            AppError::Conflict { code, .. } => code,
            AppError::PreconditionsUnmet(_) => "preconditions_unmet",
            AppError::Unexpected(_) => "internal_error",
        }
    }

    pub fn problem(&self) -> Problem {
        let status = self.status_code();
        let errors = match self {
            AppError::Unprocessable(v) | AppError::PreconditionsUnmet(v) => v.clone(),
            _ => Vec::new(),
        };
        let detail = match self {
            AppError::Unexpected(_) => {
                "The server could not complete the request. It has been logged; try again, and report it if it persists.".to_string()
            }
            AppError::PreconditionsUnmet(v) => {
                format!("A run can't start yet: {}", v.join("; "))
            }
            other => other.to_string(),
        };
        problem(status, self.code(), detail, errors)
    }
}

pub fn problem(status: StatusCode, code: &str, detail: String, errors: Vec<String>) -> Problem {
    Problem {
        type_: format!("urn:consilium:problem:{code}"),
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        status: status.as_u16(),
        detail,
        code: code.to_string(),
        errors,
    }
}

pub fn problem_response(p: &Problem) -> HttpResponse {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = HttpResponse::build(status);
    if status == StatusCode::UNAUTHORIZED {
        builder.insert_header(("WWW-Authenticate", "Bearer"));
    }
    builder.content_type("application/problem+json").json(p)
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            AppError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) | AppError::Hidden(_) => StatusCode::NOT_FOUND,
            AppError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::Invalid(_) => StatusCode::BAD_REQUEST,
            AppError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Conflict { .. } | AppError::PreconditionsUnmet(_) => StatusCode::CONFLICT,
            AppError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let AppError::Unexpected(_) = self {
            tracing::error!(error.cause_chain = ?self, "request failed");
        }
        let mut res = problem_response(&self.problem());
        match self {
            AppError::Forbidden(_) | AppError::Hidden(_) => {
                res.extensions_mut().insert(Denied);
            }
            AppError::TooManyAttempts { retry_after, .. } => {
                if let Ok(v) =
                    actix_web::http::header::HeaderValue::from_str(&retry_after.to_string())
                {
                    res.headers_mut()
                        .insert(actix_web::http::header::RETRY_AFTER, v);
                }
            }
            _ => {}
        }
        res
    }
}

/// Marks a response as a refusal of something the caller tried (403, or a 404 that hides what
/// exists), for the denial audit in `crate::security`.
#[derive(Clone, Copy, Debug)]
pub struct Denied;

impl From<sea_orm::DbErr> for AppError {
    fn from(e: sea_orm::DbErr) -> Self {
        if let Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) = e.sql_err() {
            return AppError::conflict(
                "already_exists",
                "Something with the same unique name already exists; choose another name.",
            );
        }
        AppError::Unexpected(e.into())
    }
}

impl From<serde_json::Error> for AppError {
    fn from(e: serde_json::Error) -> Self {
        AppError::Unexpected(e.into())
    }
}

pub type AppResult<T> = Result<T, AppError>;
