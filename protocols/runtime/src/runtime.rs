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
pub fn shutdown_signal() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // The handlers are installed by this call, not at the first poll: a caller that
    // prints "Ctrl-C to stop" after calling it is already listening (the demo's console
    // test sent SIGINT right after that line and the default action killed the process).
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            return Box::pin(async move {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            });
        }
    }
    Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Makes a closed stdout (`maeum-coordinator jobs list | head -1`) end the process
/// quietly with status 141, as a Unix tool killed by SIGPIPE does, instead of a panic
/// report. Rust ignores SIGPIPE, so writing to a closed pipe fails with EPIPE and
/// `println!` panics with "failed printing to stdout"; this hook recognises only that
/// panic and leaves every other to the default hook. Call it first thing in `main`.
pub fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if message.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default(info);
    }));
}
