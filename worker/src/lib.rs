//! The Consilium site worker: a hospital's side of federated training. It consumes only its
//! site's jobs, verifies each against the approvals the server recorded, reads local images
//! (PNG/JPEG, DICOM, NIfTI), trains with candle, and sends back updates through the
//! artifact store. The broker and artifact-store adapters live here because the server
//! speaks to the sites through the same ones.

pub mod artifacts;
pub mod bench;
pub mod broker;
pub mod consumer;
pub mod cvae;
pub mod data;
pub mod decode;
pub mod harmonise;
pub mod identity;
pub mod job;
pub mod jpeg12;
pub mod ledger;
pub mod model;
pub mod preview;
pub mod secure;
pub mod synthetic;
pub mod train;
pub mod transport;

/// The allocator of every program that links the site worker: the worker and server binaries,
/// and the tests, so that they run what users run. Training allocates and frees large tensors
/// every step; jemalloc keeps freed memory for a while instead of returning it to the kernel and
/// faulting it back in (a quarter of CPU training time with the system allocator).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
