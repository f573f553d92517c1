//! RFC 9457 problem details, the body of every error the API returns.

use serde::{Deserialize, Serialize};

/// An error response (`application/problem+json`, RFC 9457). `code` is stable and meant
/// for programs; `detail` is meant for the person who has to act on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Problem {
    /// A URI naming the problem type: `urn:consilium:problem:<code>`.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable error code, e.g. `invalid_input`, `forbidden`.
    pub code: String,
    /// Each reason the request was refused, where there is more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}
