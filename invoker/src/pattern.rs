//! Device patterns: globs over device ids, as operators write them in a shell
//! (`pump-*`, `valve-?`): `*` stands for any run of characters, `?` for one.

use std::fmt;

use wildmatch::WildMatch;

/// A glob over device ids.
#[derive(Debug, Clone)]
pub struct DevicePattern {
    glob: String,
    matcher: WildMatch,
}

impl DevicePattern {
    /// The pattern `glob`; every string is one (there is nothing to escape).
    pub fn new(glob: impl Into<String>) -> Self {
        let glob = glob.into();
        let matcher = WildMatch::new(&glob);
        Self { glob, matcher }
    }

    /// The pattern that matches every device.
    pub fn any() -> Self {
        Self::new("*")
    }

    /// Whether the pattern holds no wildcard, and so names one device.
    pub fn is_literal(&self) -> bool {
        !self.glob.contains(['*', '?'])
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.glob
    }

    /// Whether `device` matches the whole pattern.
    pub fn matches(&self, device: &str) -> bool {
        self.matcher.matches(device)
    }
}

/// Two patterns are equal when written alike.
impl PartialEq for DevicePattern {
    fn eq(&self, other: &Self) -> bool {
        self.glob == other.glob
    }
}

impl Eq for DevicePattern {}

impl fmt::Display for DevicePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.glob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(glob: &str, device: &str) -> bool {
        DevicePattern::new(glob).matches(device)
    }

    #[test]
    fn star_matches_any_run_and_question_mark_one_character() {
        assert!(matches("pump-*", "pump-1"));
        assert!(matches("pump-*", "pump-"));
        assert!(matches("pump-*", "pump-12-b"));
        assert!(!matches("pump-*", "pump"));
        assert!(!matches("pump-*", "valve-1"));
        assert!(matches("*-1", "pump-1"));
        assert!(!matches("*-1", "pump-10"));
        assert!(matches("p*-*-b", "pump-12-b"));
        assert!(matches("*a*b*", "xxaxxbxx"));
        assert!(!matches("*a*b*", "xxbxxaxx"));
        assert!(matches("valve-?", "valve-7"));
        assert!(!matches("valve-?", "valve-17"));
        assert!(!matches("valve-?", "valve-"));
        assert!(matches("*", ""));
        assert!(matches("*", "anything"));
        assert!(matches("**", "a"));
        assert!(!matches("", "a"));
        assert!(matches("", ""));
    }

    #[test]
    fn a_pattern_without_wildcards_is_one_device_id() {
        assert!(DevicePattern::new("pump-7").is_literal());
        assert!(matches("pump-7", "pump-7"));
        assert!(!matches("pump-7", "pump-77"));
        assert!(
            !matches("pump-7", "Pump-7"),
            "device ids are case-sensitive"
        );
        assert!(!DevicePattern::new("pump-?").is_literal());
        assert!(!DevicePattern::any().is_literal());
    }

    #[test]
    fn backtracking_finds_a_match_after_false_starts() {
        assert!(matches("*aab", "aaaab"));
        assert!(matches("a*a*a", "aaa"));
        assert!(!matches("a*a*a", "aa"));
        assert!(matches("*?x", "abx"));
        assert!(!matches("*?x", "x"));
    }
}
