//! What a handler prints or logs: its stdout and stderr go to the host's log, a line at
//! a time as they are written, and so do the lines it gives the `log` import, tagged
//! with the handler, method and request. Writes never fail (a handler that prints a
//! lot is not broken), but each call's log is capped: past [`MAX_LOGGED`] bytes per
//! stream (and, for `log`, past [`MAX_LOG_LINES`] lines) the rest is counted and
//! dropped, and one line says how much.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::call::HandlerContext;

/// Bytes of one stream logged per call; the rest is dropped.
pub const MAX_LOGGED: usize = 16 * 1024;

/// The longest line logged whole; a longer one is logged in pieces of this size (from
/// stdout and stderr) or cut there (from `log`).
const MAX_LINE: usize = 1024;

/// Lines of the `log` import logged per call; the rest is dropped.
pub const MAX_LOG_LINES: usize = 256;

/// The `log` import of one call: each line goes to the host's log at the level the
/// handler chose, within the per-call caps.
pub struct HandlerLog {
    context: Arc<HandlerContext>,
    method: Arc<str>,
    request_id: Arc<str>,
    /// Lines and bytes logged in this call.
    lines: usize,
    bytes: usize,
    /// Lines dropped whole, and bytes dropped (theirs and the cut tails of long lines).
    dropped_lines: usize,
    dropped_bytes: usize,
}

impl HandlerLog {
    /// The `log` import of one call.
    pub fn new(context: &Arc<HandlerContext>, method: &Arc<str>, request_id: &Arc<str>) -> Self {
        Self {
            context: Arc::clone(context),
            method: Arc::clone(method),
            request_id: Arc::clone(request_id),
            lines: 0,
            bytes: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// Starts another call of a reused instance: reports what the last one dropped, and
    /// the caps start over.
    pub fn start_call(&mut self, method: &Arc<str>, request_id: &Arc<str>) {
        self.finish();
        self.method = Arc::clone(method);
        self.request_id = Arc::clone(request_id);
        self.lines = 0;
        self.bytes = 0;
    }

    /// Logs one line at `level`, or counts it as dropped past the caps.
    pub fn line(&mut self, level: tracing::Level, message: &str) {
        if self.lines >= MAX_LOG_LINES || self.bytes >= MAX_LOGGED {
            self.dropped_lines += 1;
            self.dropped_bytes += message.len();
            return;
        }
        let room = MAX_LINE.min(MAX_LOGGED - self.bytes);
        let mut kept = message;
        if kept.len() > room {
            let mut end = room;
            while !kept.is_char_boundary(end) {
                end -= 1;
            }
            kept = &kept[..end];
            self.dropped_bytes += message.len() - end;
        }
        self.lines += 1;
        self.bytes += kept.len().max(1);
        let cut = if kept.len() < message.len() {
            " [cut]"
        } else {
            ""
        };
        let (file, method, rid) = (&self.context.file, &self.method, &self.request_id);
        macro_rules! log_at {
            ($level:ident) => {
                tracing::$level!(target: "edge_host::handler", handler = %file, method = %method, rid = %rid, "{kept}{cut}")
            };
        }
        match level {
            tracing::Level::TRACE => log_at!(trace),
            tracing::Level::DEBUG => log_at!(debug),
            tracing::Level::INFO => log_at!(info),
            tracing::Level::WARN => log_at!(warn),
            _ => log_at!(error),
        }
    }

    /// At the end of a call: one line for what was dropped, if anything.
    fn finish(&mut self) {
        if self.dropped_lines > 0 || self.dropped_bytes > 0 {
            tracing::warn!(
                target: "edge_host::handler",
                handler = %self.context.file,
                method = %self.method,
                rid = %self.request_id,
                dropped_lines = self.dropped_lines,
                dropped_bytes = self.dropped_bytes,
                "the handler logged more than {MAX_LOG_LINES} lines or {MAX_LOGGED} bytes, or lines over {MAX_LINE} bytes; the rest was dropped"
            );
        }
        self.dropped_lines = 0;
        self.dropped_bytes = 0;
    }
}

impl Drop for HandlerLog {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One of a call's output streams, as WASI sees it: every clone writes to the same
/// buffer.
#[derive(Clone)]
pub struct LogStream {
    inner: Arc<Mutex<LineLogger>>,
}

struct LineLogger {
    stream: &'static str,
    context: Arc<HandlerContext>,
    method: Arc<str>,
    request_id: Arc<str>,
    partial: Vec<u8>,
    logged: usize,
    dropped: usize,
}

impl LogStream {
    /// The stream `stream` (`stdout` or `stderr`) of one call.
    pub fn new(
        stream: &'static str,
        context: &Arc<HandlerContext>,
        method: &Arc<str>,
        request_id: &Arc<str>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LineLogger {
                stream,
                context: Arc::clone(context),
                method: Arc::clone(method),
                request_id: Arc::clone(request_id),
                partial: Vec::new(),
                logged: 0,
                dropped: 0,
            })),
        }
    }

    /// Starts logging for another call of a reused instance: what the last call left
    /// (a line without its newline, a count of dropped bytes) is logged under its own
    /// tags, and the cap starts over.
    pub fn start_call(&self, method: &Arc<str>, request_id: &Arc<str>) {
        let mut logger = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        logger.finish();
        logger.method = Arc::clone(method);
        logger.request_id = Arc::clone(request_id);
        logger.logged = 0;
        logger.dropped = 0;
    }

    fn write_bytes(&self, bytes: &[u8]) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(bytes);
    }
}

impl LineLogger {
    fn write(&mut self, mut bytes: &[u8]) {
        let room = MAX_LOGGED.saturating_sub(self.logged + self.partial.len());
        if bytes.len() > room {
            self.dropped += bytes.len() - room;
            bytes = &bytes[..room];
        }
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.logged += 1; // the newline
            self.emit(&line[..end]);
        }
        while self.partial.len() >= MAX_LINE {
            let piece: Vec<u8> = self.partial.drain(..MAX_LINE).collect();
            self.emit(&piece);
        }
    }

    fn emit(&mut self, line: &[u8]) {
        self.logged += line.len();
        let line = String::from_utf8_lossy(line);
        tracing::info!(
            target: "edge_host::handler",
            handler = %self.context.file,
            method = %self.method,
            rid = %self.request_id,
            stream = self.stream,
            "{}", line.trim_end_matches('\r')
        );
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        self.finish();
    }
}

impl LineLogger {
    /// At the end of a call: the last line without a newline, and what was dropped.
    fn finish(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.emit(&rest);
        }
        if self.dropped > 0 {
            tracing::warn!(
                target: "edge_host::handler",
                handler = %self.context.file,
                method = %self.method,
                rid = %self.request_id,
                stream = self.stream,
                dropped_bytes = self.dropped,
                "the handler printed more than {MAX_LOGGED} bytes; the rest was dropped"
            );
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always ready: what does not fit in the log is counted and dropped.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logger() -> LineLogger {
        LineLogger {
            stream: "stdout",
            context: Arc::new(HandlerContext {
                file: "t.wasm".into(),
                device_id: "d".into(),
                config: Default::default(),
                max_memory: 0,
                grants: Default::default(),
                reuse: None,
            }),
            method: Arc::from("m"),
            request_id: Arc::from("r"),
            partial: Vec::new(),
            logged: 0,
            dropped: 0,
        }
    }

    #[test]
    fn lines_are_split_and_output_past_the_cap_is_counted_not_kept() {
        let mut log = logger();
        log.write(b"one\ntwo\nthr");
        assert_eq!(log.partial, b"thr");
        assert_eq!(log.logged, 8);
        log.write(&vec![b'x'; MAX_LOGGED * 2]);
        assert!(log.logged + log.partial.len() <= MAX_LOGGED);
        assert_eq!(log.dropped, MAX_LOGGED * 2 - (MAX_LOGGED - 8 - 3));
        // Further writes are all dropped, and never fail.
        log.write(b"more\n");
        assert_eq!(log.dropped, MAX_LOGGED * 2 - (MAX_LOGGED - 8 - 3) + 5);
    }
}
