//! Governance services. Each mutating call checks the actor's role (and the resource:
//! owner, custodian, committee member) here, not only in handlers, writes its change and
//! the audit event in one transaction, and returns the new state as a DTO.

pub mod access;
pub mod directory;
pub mod models;
pub mod previews;
pub mod runs;
pub mod sessions;
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
        }
        v.to_string()
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

pub(crate) fn not_found(what: &str, id: Uuid) -> AppError {
    AppError::NotFound(format!(
        "No {what} with id {id} exists (or you may not see it)."
    ))
}
