//! Governance services. Each mutating call checks the actor's role (and the resource:
//! owner, custodian, committee member) here, not only in handlers, writes its change and
//! the audit event in one transaction, and returns the new state as a DTO.

pub mod access;
pub mod directory;
pub mod health;
pub mod models;
pub mod previews;
pub mod privacy;
pub mod runs;
pub mod secagg;
pub mod sessions;
pub mod site_artifacts;
pub mod site_keys;
pub mod studies;
pub mod tokens;

use consilium_core::Role;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::domain::{Actor, Operation, authorize};
use crate::error::{AppError, AppResult};

pub(crate) fn require(actor: &Actor, op: Operation) -> AppResult<()> {
    authorize(actor, op).map_err(AppError::Forbidden)
}

pub(crate) fn require_any(actor: &Actor, roles: &[Role], what: &str) -> AppResult<()> {
    if roles.iter().any(|r| actor.has(*r)) {
        Ok(())
    } else {
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(AppError::Forbidden(format!(
            "Only a user with one of the roles {} may {what}.",
            names.join(", ")
        )))
    }
}

/// Collects every problem with a request body, to report them all at once.
#[derive(Default)]
pub(crate) struct Checks(pub Vec<String>);

/// The furthest an approval or a data-access grant may run.
pub const MAX_EXPIRY_YEARS: i64 = 10;

/// Unicode category Cf: bidirectional overrides, zero-width characters and the like, which
/// make text display differently from what it is.
pub fn is_format_char(c: char) -> bool {
    unicode_general_category::get_general_category(c)
        == unicode_general_category::GeneralCategory::Format
}

impl Checks {
    /// A required single-line or multi-line text: trimmed, non-empty, bounded, no control
    /// characters (other than line breaks and tabs in multi-line text).
    pub fn text(&mut self, field: &str, value: &str, max: usize, multiline: bool) -> String {
        let v = value.trim();
        if v.is_empty() {
            self.0.push(format!("{field} must not be empty"));
        } else if v.chars().count() > max {
            self.0
                .push(format!("{field} must be at most {max} characters"));
        } else if v
            .chars()
            .any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\r' | '\t')))
        {
            self.0
                .push(format!("{field} must not contain control characters"));
        } else if !multiline && v.chars().any(is_format_char) {
            self.0.push(format!(
                "{field} must not contain invisible formatting characters (Unicode category Cf, such as right-to-left overrides or zero-width spaces): they can make a name read differently from what it is"
            ));
        }
        v.to_string()
    }

    /// An approval's or a grant's expiry: in the future, and at most `MAX_EXPIRY_YEARS` ahead
    /// (a study is renewed by a new decision, not approved for ever).
    pub fn expiry(&mut self, field: &str, at: chrono::DateTime<chrono::Utc>) {
        let now = chrono::Utc::now();
        if at <= now {
            self.0.push(format!("{field} must be in the future"));
        } else if at > now + chrono::Duration::days(365 * MAX_EXPIRY_YEARS) {
            self.0.push(format!(
                "{field} must be within {MAX_EXPIRY_YEARS} years from now"
            ));
        }
    }

    pub fn optional_text(
        &mut self,
        field: &str,
        value: Option<&str>,
        max: usize,
    ) -> Option<String> {
        match value.map(str::trim) {
            None | Some("") => None,
            Some(v) => Some(self.text(field, v, max, true)),
        }
    }

    pub fn check(&mut self, ok: bool, message: impl Into<String>) {
        if !ok {
            self.0.push(message.into());
        }
    }

    pub fn finish(self) -> AppResult<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(AppError::Unprocessable(self.0))
        }
    }
}

pub(crate) fn from_json<T: DeserializeOwned>(v: &serde_json::Value) -> AppResult<T> {
    serde_json::from_value(v.clone()).map_err(AppError::unexpected)
}

/// Like `not_found`, for something that exists but the caller may not see: the same answer,
/// audited as a denial.
pub(crate) fn hidden(what: &str, id: Uuid) -> AppError {
    AppError::Hidden(format!(
        "No {what} with id {id} exists (or you may not see it)."
    ))
}

pub(crate) fn not_found(what: &str, id: Uuid) -> AppError {
    AppError::NotFound(format!(
        "No {what} with id {id} exists (or you may not see it)."
    ))
}
