//! The one error type of the portal's server functions: what the REST API said (its RFC 9457
//! problem), or why the portal could not ask it. It travels to the browser as JSON.

use leptos::server_fn::codec::JsonEncoding;
use leptos::server_fn::error::{FromServerFnError, ServerFnErrorErr};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortalError {
    /// HTTP status of the API's answer (0 when the API could not be reached).
    pub status: u16,
    /// The API's stable error code, e.g. `unauthenticated`, `forbidden`, `invalid`.
    pub code: String,
    /// What went wrong and what to do, in words.
    pub detail: String,
    /// Every individual problem, when the API listed them.
    pub errors: Vec<String>,
}

impl PortalError {
    pub fn new(code: &str, detail: impl Into<String>) -> Self {
        PortalError {
            status: 0,
            code: code.into(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn is_unauthenticated(&self) -> bool {
        self.status == 401
    }

    /// The detail followed by the listed problems the detail does not already name.
    pub fn message(&self) -> String {
        let extra: Vec<&str> = self
            .errors
            .iter()
            .filter(|e| !self.detail.contains(e.as_str()))
            .map(String::as_str)
            .collect();
        if extra.is_empty() {
            self.detail.clone()
        } else {
            format!("{} {}", self.detail, extra.join("; "))
        }
    }
}

impl std::fmt::Display for PortalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

impl std::error::Error for PortalError {}

impl FromServerFnError for PortalError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(value: ServerFnErrorErr) -> Self {
        PortalError::new(
            "portal",
            format!(
                "The portal could not complete this request ({value}). Reload the page and try again."
            ),
        )
    }
}
