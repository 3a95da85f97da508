//! Logs go to stderr (runtimes keep it, and stdout is the result), filtered by WG_CNI_LOG.

/// Default: warnings.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WG_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a person at a terminal: runtimes and `kubectl logs` keep the bytes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
