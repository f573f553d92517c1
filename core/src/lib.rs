//! Consilium's shared types: the REST contract between the server, the portal and
//! integrations, the training-plan manifest and its content hash. No I/O, builds for wasm.

pub mod aggregate;
pub mod api;
#[cfg(feature = "train")]
pub mod attack;
#[cfg(feature = "train")]
pub mod conv;
pub mod hash;
#[cfg(feature = "train")]
pub mod loss;
pub mod manifest;
#[cfg(feature = "train")]
mod matmul;
#[cfg(feature = "train")]
pub mod noise;
#[cfg(feature = "train")]
pub mod norm;
pub mod plan;
pub mod preview;
pub mod privacy;
pub mod problem;
pub mod protocol;
pub mod role;
#[cfg(feature = "secagg")]
pub mod secagg;
pub mod segmentation;
#[cfg(feature = "signing")]
pub mod signing;

pub use role::Role;

/// Whether a redirect target is a path of this server: it starts with one `/` (not `//host` or
/// `/\host`, which browsers read as another host) and has no line break. The server's
/// middleware and the portal's form handling both ask this.
pub fn is_local_path(target: &str) -> bool {
    target.starts_with('/')
        && !target.starts_with("//")
        && !target.starts_with("/\\")
        && !target.contains(['\r', '\n'])
}
