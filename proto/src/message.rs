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

/// The most bytes a catalog document takes. The catalog is retained and published in
/// one MQTT packet; a packet over the limit of the device's client (1 MiB), of a broker
/// (`message_size_limit`) or of a reader is refused, and with it the connection. A
/// quarter of the host's limit leaves room for any broker configured for IoT Hub's
/// 128 KiB payloads with the catalog in it, and holds about a thousand methods.
pub const CATALOG_MAX_BYTES: usize = 256 * 1024;

/// The most a catalog reported as twin properties (IoT Hub) takes as JSON: IoT Hub
/// holds at most 32 KiB of reported properties per device, and the rest is left for
/// the device's other properties.
pub const TWIN_CATALOG_MAX_BYTES: usize = 24 * 1024;

/// The longest method description kept in a catalog, in bytes; the rest is cut, and
/// the cut marked. A description is a line or two for people.
pub const CATALOG_MAX_DESCRIPTION: usize = 1024;

/// The longest failure text kept in a catalog, in bytes; the rest is cut, and the cut
/// marked. Enough for an error chain with a parser's snippet; the host's log has it
/// whole.
pub const CATALOG_MAX_ERROR: usize = 4096;

/// Room kept for the document around its lists: the field names and both counts.
const CATALOG_ENVELOPE_BYTES: usize = 256;

/// Retained on `NS$edge/methods`: what the device serves now.
///
/// Bounded in size ([`Catalog::bounded`]): long texts are cut, and entries past the
/// bound are left out and counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// The methods served, sorted by name.
    #[serde(default)]
    pub methods: Vec<CatalogEntry>,
    /// Handler files that failed to load, with why, sorted by file name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<CatalogFailure>,
    /// Methods served but left out of `methods` to keep the document within
    /// [`CATALOG_MAX_BYTES`]: the last ones by name.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub methods_omitted: usize,
    /// Failed handler files left out of `failures` for the same reason: the last ones
    /// by file name.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures_omitted: usize,
}

/// Whether a count is zero, to leave it out of the document (serde passes a reference).
fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Catalog {
    /// The catalog of `methods` and `failures`, sorted, within [`CATALOG_MAX_BYTES`]
    /// as JSON: each description is cut to [`CATALOG_MAX_DESCRIPTION`] bytes and each
    /// failure text to [`CATALOG_MAX_ERROR`] (a cut text ends with `…[N bytes cut]`);
    /// failures take at most a quarter of the room (so that a folder full of broken
    /// files never pushes the served methods out), methods the rest, and whatever
    /// does not fit is counted in `failures_omitted` and `methods_omitted`.
    pub fn bounded(methods: Vec<CatalogEntry>, failures: Vec<CatalogFailure>) -> Self {
        Self::bounded_to(methods, failures, CATALOG_MAX_BYTES)
    }

    /// As [`Catalog::bounded`], within `max_bytes` (at least 1 KiB): failures take at
    /// most a quarter of it.
    pub fn bounded_to(
        mut methods: Vec<CatalogEntry>,
        mut failures: Vec<CatalogFailure>,
        max_bytes: usize,
    ) -> Self {
        let max_bytes = max_bytes.max(1024);
        methods.sort_by(|a, b| a.name.cmp(&b.name));
        failures.sort_by(|a, b| a.handler.cmp(&b.handler));
        for method in &mut methods {
            cut(&mut method.description, CATALOG_MAX_DESCRIPTION);
        }
        for failure in &mut failures {
            cut(&mut failure.error, CATALOG_MAX_ERROR);
        }
        let (failures_kept, failures_bytes) = fitting(&failures, max_bytes / 4);
        let room = max_bytes - CATALOG_ENVELOPE_BYTES - failures_bytes;
        let (methods_kept, _) = fitting(&methods, room);
        let methods_omitted = methods.len() - methods_kept;
        let failures_omitted = failures.len() - failures_kept;
        methods.truncate(methods_kept);
        failures.truncate(failures_kept);
        Self {
            methods,
            failures,
            methods_omitted,
            failures_omitted,
        }
    }
}

impl Catalog {
    /// The catalog as an IoT Hub twin's reported properties patch:
    /// `{"methods":[..],"failures":[..],"methodsOmitted":N,"failuresOmitted":N}`, every
    /// key always present (a key left out of a patch keeps its old value), within
    /// [`TWIN_CATALOG_MAX_BYTES`].
    pub fn reported_properties(&self) -> serde_json::Value {
        let fitted = Self::bounded_to(
            self.methods.clone(),
            self.failures.clone(),
            TWIN_CATALOG_MAX_BYTES,
        );
        serde_json::json!({
            "methods": fitted.methods,
            "failures": fitted.failures,
            "methodsOmitted": fitted.methods_omitted + self.methods_omitted,
            "failuresOmitted": fitted.failures_omitted + self.failures_omitted,
        })
    }

    /// How many methods the device serves, listed or left out.
    pub fn methods_served(&self) -> usize {
        self.methods.len() + self.methods_omitted
    }

    /// How many handler files failed to load, listed or left out.
    pub fn failed_handlers(&self) -> usize {
        self.failures.len() + self.failures_omitted
    }
}

/// How many of `items`, from the first, fit in `room` bytes of a JSON list, and the
/// bytes they take.
fn fitting<T: Serialize>(items: &[T], room: usize) -> (usize, usize) {
    let mut used = 0;
    for (kept, item) in items.iter().enumerate() {
        // These documents always serialize; a failure would only leave the item out.
        let size = serde_json::to_vec(item).map_or(usize::MAX, |json| json.len());
        // One more for the comma before it.
        match used + size + 1 {
            total if total <= room => used = total,
            _ => return (kept, used),
        }
    }
    (items.len(), used)
}

/// Cuts `text` to at most `max` bytes (at a character boundary) and marks the cut.
fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let removed = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("…[{removed} bytes cut]"));
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

    fn entry(name: &str, description: &str) -> CatalogEntry {
        CatalogEntry {
            name: name.to_owned(),
            description: description.to_owned(),
            handler: format!("{name}.wasm"),
            digest: format!("sha256:{}", "0".repeat(64)),
        }
    }

    fn failed(handler: &str, error: &str) -> CatalogFailure {
        CatalogFailure {
            handler: handler.to_owned(),
            error: error.to_owned(),
        }
    }

    fn json_len(catalog: &Catalog) -> usize {
        serde_json::to_vec(catalog).expect("serializes").len()
    }

    #[test]
    fn a_small_catalog_is_kept_whole_and_sorted() {
        let catalog = Catalog::bounded(
            vec![entry("b", "B"), entry("a", "A")],
            vec![failed("z.wasm", "bad"), failed("y.wasm", "worse")],
        );
        let names: Vec<&str> = catalog.methods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(catalog.failures[0].handler, "y.wasm");
        assert_eq!((catalog.methods_omitted, catalog.failures_omitted), (0, 0));
        let json = serde_json::to_string(&catalog).expect("serializes");
        assert!(
            !json.contains("omitted"),
            "counts appear only when not zero: {json}"
        );
    }

    #[test]
    fn long_texts_are_cut_at_a_character_boundary_and_marked() {
        // 'é' is two bytes: the cut falls inside one and must step back.
        let description = format!("x{}", "é".repeat(CATALOG_MAX_DESCRIPTION));
        let error = "e".repeat(5 * CATALOG_MAX_ERROR);
        let catalog = Catalog::bounded(
            vec![entry("m", &description)],
            vec![failed("f.wasm", &error)],
        );
        let kept = &catalog.methods[0].description;
        assert_eq!(
            kept,
            &format!(
                "x{}…[{} bytes cut]",
                "é".repeat(CATALOG_MAX_DESCRIPTION / 2 - 1),
                description.len() - (CATALOG_MAX_DESCRIPTION - 1)
            )
        );
        assert_eq!(
            catalog.failures[0].error,
            format!(
                "{}…[{} bytes cut]",
                "e".repeat(CATALOG_MAX_ERROR),
                4 * CATALOG_MAX_ERROR
            )
        );
    }

    #[test]
    fn the_twin_patch_names_every_key_and_fits_iot_hubs_limit() {
        let methods: Vec<CatalogEntry> = (0..2000)
            .map(|i| entry(&format!("m{i:05}"), "does a thing"))
            .collect();
        let patch = Catalog::bounded(methods, Vec::new()).reported_properties();
        let len = serde_json::to_vec(&patch).expect("JSON").len();
        assert!(len <= TWIN_CATALOG_MAX_BYTES, "{len}");
        let listed = patch["methods"].as_array().expect("a list").len();
        assert!(listed > 0);
        assert_eq!(
            listed + patch["methodsOmitted"].as_u64().expect("a count") as usize,
            2000
        );
        // An empty list and zero counts are sent, not left out: a key missing from a
        // patch would keep the twin's previous value.
        let empty = Catalog::default().reported_properties();
        assert_eq!(
            empty,
            serde_json::json!({"methods": [], "failures": [], "methodsOmitted": 0, "failuresOmitted": 0})
        );
    }

    #[test]
    fn too_many_entries_are_left_out_counted_and_the_document_fits() {
        // Long descriptions of control characters: each byte takes six in JSON.
        let noisy = "\u{1}".repeat(CATALOG_MAX_DESCRIPTION);
        let methods: Vec<CatalogEntry> = (0..5000)
            .map(|i| entry(&format!("m{i:05}"), &noisy))
            .collect();
        let failures: Vec<CatalogFailure> = (0..5000)
            .map(|i| failed(&format!("f{i:05}.wasm"), &"\u{1}".repeat(CATALOG_MAX_ERROR)))
            .collect();
        let catalog = Catalog::bounded(methods, failures);
        assert!(
            json_len(&catalog) <= CATALOG_MAX_BYTES,
            "{}",
            json_len(&catalog)
        );
        assert!(!catalog.methods.is_empty() && !catalog.failures.is_empty());
        assert_eq!(catalog.methods.len() + catalog.methods_omitted, 5000);
        assert_eq!(catalog.failures.len() + catalog.failures_omitted, 5000);
        assert_eq!(
            catalog.methods[0].name, "m00000",
            "the first by name are kept"
        );
        assert_eq!(catalog.failures[0].handler, "f00000.wasm");

        // Many short methods: only the count bounds them.
        let many: Vec<CatalogEntry> = (0..100_000).map(|i| entry(&format!("m{i}"), "")).collect();
        let catalog = Catalog::bounded(many, Vec::new());
        assert!(json_len(&catalog) <= CATALOG_MAX_BYTES);
        assert!(catalog.methods_omitted > 0);
        let read: Catalog =
            serde_json::from_slice(&serde_json::to_vec(&catalog).expect("serializes"))
                .expect("reads back");
        assert_eq!(read, catalog);
    }
}
