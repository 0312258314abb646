//! Text that devices supply (presence, catalogs, answers) made harmless on a terminal.
//!
//! A device chooses its presence's agent and reason, its methods' names and
//! descriptions, its failures' texts and its answers. Written raw, a control character
//! in any of them drives the operator's terminal: ESC sequences clear the screen,
//! retitle the window or rewrite the lines above, and the bidirectional formatting
//! characters reorder what is shown. Everything the output prints that did not come
//! from edge-invoker itself goes through one of these two functions:
//! - [`text`] for plain text, where such characters become visible escapes (`\u{1b}`);
//! - [`json`] for JSON text, where they become JSON escapes (`\u001b`), so that the
//!   document keeps its value and stays valid.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal as it is: a C0 control (newline and tab too:
/// in a table cell they would break the layout), DEL, a C1 control, or a
/// bidirectional formatting character.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `text` with every character that could drive a terminal written as a visible
/// escape: `\n`, `\t`, `\r`, or `\u{..}` (ESC is `\u{1b}`). Other text is unchanged.
pub fn text(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// JSON text with every character that could drive a terminal written as a JSON
/// escape (`\u001b`, `\u009b`, `\u202e`): the same JSON value, still valid.
///
/// Newline, tab and carriage return are left alone: in valid JSON they can only be
/// whitespace between tokens (inside strings they are escaped already), and the
/// indented output is laid out with them. The other C0 controls cannot appear in valid
/// JSON at all; should one come, it is escaped too.
pub fn json(json: &str) -> Cow<'_, str> {
    let escaped = |c: char| is_unsafe(c) && !matches!(c, '\n' | '\t' | '\r');
    if !json.chars().any(escaped) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if escaped(c) {
            // Every such character is in the Basic Multilingual Plane: one escape.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hostile device sends: clear the screen, retitle the window (OSC ... BEL),
    /// a C1 CSI, DEL, and a right-to-left override.
    const EVIL: &str = "a\u{1b}[2J\u{1b}]0;owned\u{7}b\u{9b}31mc\u{7f}d\u{202e}e";

    #[test]
    fn plain_text_keeps_no_control_character_and_shows_each_as_an_escape() {
        let out = text(EVIL);
        assert!(!out.chars().any(is_unsafe), "{out:?}");
        assert_eq!(
            out,
            "a\\u{1b}[2J\\u{1b}]0;owned\\u{7}b\\u{9b}31mc\\u{7f}d\\u{202e}e"
        );
        assert_eq!(text("two\nlines\tand a tab"), "two\\nlines\\tand a tab");
        assert!(matches!(text("café — ok"), Cow::Borrowed("café — ok")));
    }

    #[test]
    fn json_keeps_its_value_and_loses_every_control_character() {
        let document = serde_json::json!({ "msg": EVIL, "n": 1 });
        let raw = serde_json::to_string(&document).expect("serializes");
        // serde_json escapes C0 itself, but not DEL, C1 nor the bidirectional controls.
        assert!(
            raw.contains('\u{9b}') && raw.contains('\u{202e}'),
            "{raw:?}"
        );
        let out = json(&raw);
        assert!(!out.chars().any(is_unsafe), "{out:?}");
        let back: serde_json::Value = serde_json::from_str(&out).expect("still valid JSON");
        assert_eq!(back, document);
        let pretty = serde_json::to_string_pretty(&document).expect("serializes");
        assert!(json(&pretty).contains("\n  \"msg\""), "layout is kept");
    }
}
