//! The tests' logs: shown with the test's output, and captured for tests that read
//! what the host logged.

/// Sends the host's and the tests' logs to the test output (shown on failure or with
/// `--nocapture`), and to [`capture_logs`] while one is open; `RUST_LOG` filters them.
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Another test in the same binary may have set it up already.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(|| CapturedWriter),
        )
        .try_init();
}

/// What the logs said while captures were open, shared by the whole test binary.
static CAPTURED: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
/// Captures open now: the log is kept only while one is.
static CAPTURING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct CapturedWriter;

impl std::io::Write for CapturedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if CAPTURING.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            CAPTURED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines (without colours) written from now until it is dropped, by every
/// thread of this test binary: filter them by what your test's lines carry (a method,
/// a request id), since other tests run alongside.
pub struct LogCapture {
    start: usize,
}

/// Starts capturing the log; see [`LogCapture`].
pub fn capture_logs() -> LogCapture {
    init_logging();
    let start = CAPTURED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len();
    CAPTURING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    LogCapture { start }
}

impl LogCapture {
    /// The lines captured so far that contain `needle`, joined by newlines.
    pub fn lines_with(&self, needle: &str) -> String {
        let captured = CAPTURED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(captured.get(self.start..).unwrap_or_default())
            .lines()
            .filter(|line| line.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        if CAPTURING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) == 1 {
            CAPTURED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clear();
        }
    }
}
