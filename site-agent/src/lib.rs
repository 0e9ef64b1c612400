//! Maeum site agent library: the glue the `maeum-site` binary runs.
#![forbid(unsafe_code)]

pub mod local;

/// Installs the tracing subscriber: human-readable to stderr, `MAEUM_LOG` (or
/// `RUST_LOG`) sets the filter, `MAEUM_LOG_FORMAT=json` switches to JSON lines.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("MAEUM_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("MAEUM_LOG_FORMAT").as_deref() == Ok("json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
