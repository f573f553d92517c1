//! Logging with `tracing`: text or JSON lines, filtered by `log.level` or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::configuration::LogSettings;

pub fn init(settings: &LogSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first.
    let _ = if settings.json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
