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
pub mod job;
pub mod model;
pub mod preview;
pub mod synthetic;
pub mod train;
