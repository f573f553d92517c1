#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Integration tests: the real server on a free port, against SQLite in a temporary folder
//! and PostgreSQL (127.0.0.1:5432) cloned from a migrated template per test.

mod helpers;

mod audit;
mod engine;
mod errors;
mod federation;
mod intake;
mod isolation;
mod lifecycle;
mod oidc;
mod openapi;
mod plans;
mod previews;
mod privacy;
mod robust;
mod roles;
mod secagg;
mod security;
mod signing;
mod simulate;
mod tokens;
