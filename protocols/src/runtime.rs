//! Process-level glue shared by the `maeum-coordinator` and `maeum-site` binaries:
//! log setup and the shutdown signal. (Libraries emit `tracing` events; only binaries
//! call [`init_tracing`].)

/// Installs the tracing subscriber: human-readable to stderr, `MAEUM_LOG` (or
/// `RUST_LOG`) sets the filter (else `default`), `MAEUM_LOG_FORMAT=json` switches to
/// JSON lines.
pub fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("MAEUM_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)));
    // Colours only on a terminal: journald, files and log shippers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if std::env::var("MAEUM_LOG_FORMAT").as_deref() == Ok("json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Resolves on SIGTERM (how systemd and Kubernetes stop a service) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
