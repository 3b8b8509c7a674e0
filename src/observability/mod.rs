//! Logs and metrics.
//!
//! - [`metrics`]: per-core counters, gathered by message and rendered for Prometheus.
//!
//! Logging: `tracing` to stderr, JSON lines by default (as the original's zerolog), a human
//! format with LOG_FORMAT=text, the level from RUST_LOG (default info). Set up once by main,
//! on the main thread, before any other thread starts.

pub mod metrics;

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
