//! The documents on the wire besides the method payloads: presence and the method
//! catalog (both retained), and the rules every payload follows.
//!
//! Readers are tolerant: unknown fields are ignored, so a newer host can add fields
//! without breaking an older invoker.

use serde::{Deserialize, Serialize};

/// The largest request or response payload, in bytes: IoT Hub's 128 KiB.
pub const MAX_PAYLOAD: usize = 128 * 1024;

/// Retained on `NS$edge/presence`: whether the device is online.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Whether the device takes calls now.
    pub online: bool,
    /// When this state began (RFC 3339, UTC): set when online and on a clean shutdown;
    /// the MQTT will is written at connect time, so it carries none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Why the device went offline: `shutdown` or `connection-lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The software answering, such as `edge-host 0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// Retained on `NS$edge/methods`: what the device serves now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The methods served, sorted by name.
    #[serde(default)]
    pub methods: Vec<CatalogEntry>,
    /// Handler files that failed to load, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<CatalogFailure>,
}

/// One method in the [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The method name.
    pub name: String,
    /// What the handler says the method does.
    #[serde(default)]
    pub description: String,
    /// The handler file that serves it, such as `echo.wasm`.
    #[serde(default)]
    pub handler: String,
    /// The handler file's content digest, `sha256:<hex>`.
    #[serde(default)]
    pub digest: String,
}

/// A handler file that failed to load, in the [`Catalog`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogFailure {
    /// The file name, such as `broken.wasm`.
    pub handler: String,
    /// Why it failed.
    pub error: String,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Larger than [`MAX_PAYLOAD`] (or the configured limit).
    #[error("payload is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// Not UTF-8.
    #[error("payload is not UTF-8 text: {0}")]
    NotUtf8(String),
    /// UTF-8, but not one JSON document.
    #[error("payload is not JSON: {0}")]
    NotJson(String),
}

/// Checks a payload and returns it as JSON text. An empty payload stands for JSON
/// `null`, as IoT Hub delivers a call made without a payload.
///
/// # Errors
/// When the payload is over `max` bytes, not UTF-8, or not exactly one JSON document.
pub fn json_payload(bytes: &[u8], max: usize) -> Result<&str, PayloadError> {
    if bytes.len() > max {
        return Err(PayloadError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    if bytes.is_empty() {
        return Ok("null");
    }
    let text = std::str::from_utf8(bytes).map_err(|e| PayloadError::NotUtf8(e.to_string()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map_err(|e| PayloadError::NotJson(e.to_string()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_must_be_one_json_document_within_the_limit() {
        assert_eq!(json_payload(br#"{"a":1}"#, 100), Ok(r#"{"a":1}"#));
        assert_eq!(json_payload(b"", 100), Ok("null"));
        assert_eq!(json_payload(b" 42 ", 100), Ok(" 42 "));
        assert!(matches!(
            json_payload(b"{", 100),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            json_payload(b"1 2", 100),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            json_payload(b"not json", 100),
            Err(PayloadError::NotJson(_))
        ));
        assert!(matches!(
            json_payload(&[0xff, 0xfe], 100),
            Err(PayloadError::NotUtf8(_))
        ));
        assert_eq!(
            json_payload(&[b' '; 101], 100),
            Err(PayloadError::TooLarge { len: 101, max: 100 })
        );
    }

    #[test]
    fn presence_reads_documents_with_unknown_fields() {
        let p: Presence =
            serde_json::from_str(r#"{"online":true,"future":1}"#).expect("tolerant reader");
        assert!(p.online);
        assert_eq!(
            serde_json::to_string(&Presence {
                online: false,
                since: None,
                reason: Some("shutdown".into()),
                agent: None
            })
            .expect("serializes"),
            r#"{"online":false,"reason":"shutdown"}"#
        );
    }
}
