//! Device patterns: globs over device ids, as operators write them in a shell
//! (`pump-*`, `valve-?`): `*` stands for any run of characters, `?` for one.

use std::fmt;

/// A glob over device ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePattern {
    glob: String,
}

impl DevicePattern {
    /// The pattern `glob`; every string is one (there is nothing to escape).
    pub fn new(glob: impl Into<String>) -> Self {
        Self { glob: glob.into() }
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
        let pattern: Vec<char> = self.glob.chars().collect();
        let text: Vec<char> = device.chars().collect();
        let (mut p, mut t) = (0, 0);
        // Where the last `*` was, and where in the text it began to match: on a
        // mismatch the `*` takes one more character and matching goes on from there.
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some('*') => {
                    star = Some((p, t));
                    p += 1;
                }
                Some('?') => {
                    p += 1;
                    t += 1;
                }
                Some(&c) if c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match star {
                    Some((star_p, star_t)) => {
                        p = star_p + 1;
                        t = star_t + 1;
                        star = Some((star_p, star_t + 1));
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|&c| c == '*')
    }
}

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
