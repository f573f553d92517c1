//! The portal in real headless Chromium (Debian's `chromium` and `chromium-driver`), driven
//! over WebDriver: the governed story as the people who live it, and the guards around it.
//! Each step saves a screenshot under `target/portal-screenshots/<test>/`.
//! Needs the browser bundle (`scripts/build-portal`); `scripts/test` installs and builds all
//! of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod governance;
mod guards;
mod harness;
mod keys;
mod nojs;
mod oidc;
mod plan;
mod previews;
mod privacy;
mod secagg;
mod security;
mod segmentation;
mod setup;
mod story;
