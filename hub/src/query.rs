//! The part of IoT Hub's query language the hub understands:
//! `SELECT * FROM devices [WHERE cond (AND|OR cond)...]`, where a condition compares a
//! top-level twin field (`deviceId`, `connectionState`, `status`, ...) with a quoted
//! string or a number, by `=`, `!=` or `<>`. AND binds tighter than OR; there are no
//! parentheses.

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Alternatives (OR) of conjunctions (AND) of conditions; empty matches all.
    any_of: Vec<Vec<Condition>>,
}

/// `field op value`.
#[derive(Debug, Clone, PartialEq)]
struct Condition {
    field: String,
    equal: bool,
    value: serde_json::Value,
}

/// Why a query is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unsupported query '{query}': {reason} (edge-hub understands SELECT * FROM devices [WHERE field = 'value' [AND|OR ...]])"
)]
pub struct QueryError {
    query: String,
    reason: String,
}

impl Query {
    /// Parses `text`.
    ///
    /// # Errors
    /// [`QueryError`] saying what is not understood.
    pub fn parse(text: &str) -> Result<Self, QueryError> {
        let error = |reason: &str| QueryError {
            query: text.to_owned(),
            reason: reason.to_owned(),
        };
        let tokens = tokenize(text).map_err(|r| error(&r))?;
        let mut at = tokens.iter().map(String::as_str).peekable();
        for word in ["select", "*", "from", "devices"] {
            match at.next() {
                Some(t) if t.eq_ignore_ascii_case(word) => {}
                _ => return Err(error(&format!("expected '{word}'"))),
            }
        }
        let mut any_of = Vec::new();
        match at.next() {
            None => return Ok(Self { any_of }),
            Some(t) if t.eq_ignore_ascii_case("where") => {}
            Some(t) => return Err(error(&format!("unexpected '{t}'"))),
        }
        let mut all_of = Vec::new();
        loop {
            let field = at.next().ok_or_else(|| error("a condition is missing"))?;
            if !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '$') {
                return Err(error(&format!("'{field}' is not a field name")));
            }
            let equal = match at.next() {
                Some("=") => true,
                Some("!=" | "<>") => false,
                _ => return Err(error("expected =, != or <> after a field")),
            };
            let value = at.next().ok_or_else(|| error("a value is missing"))?;
            let value = if let Some(quoted) = value.strip_prefix('\u{1}') {
                serde_json::Value::String(quoted.to_owned())
            } else if let Ok(number) = value.parse::<f64>() {
                serde_json::json!(number)
            } else if let Ok(boolean) = value.to_ascii_lowercase().parse::<bool>() {
                serde_json::Value::Bool(boolean)
            } else {
                return Err(error(&format!(
                    "'{value}' is not a quoted string or a number"
                )));
            };
            all_of.push(Condition {
                field: field.to_owned(),
                equal,
                value,
            });
            match at.next() {
                None => break,
                Some(t) if t.eq_ignore_ascii_case("and") => {}
                Some(t) if t.eq_ignore_ascii_case("or") => {
                    any_of.push(std::mem::take(&mut all_of));
                }
                Some(t) => return Err(error(&format!("unexpected '{t}'"))),
            }
        }
        any_of.push(all_of);
        Ok(Self { any_of })
    }

    /// Whether a twin (IoT Hub's JSON shape) matches.
    pub fn matches(&self, twin: &serde_json::Value) -> bool {
        self.any_of.is_empty()
            || self.any_of.iter().any(|all_of| {
                all_of.iter().all(|c| {
                    let field = twin.get(&c.field).unwrap_or(&serde_json::Value::Null);
                    let same = match (field, &c.value) {
                        (serde_json::Value::Number(a), serde_json::Value::Number(b)) => {
                            a.as_f64() == b.as_f64()
                        }
                        (a, b) => a == b,
                    };
                    same == c.equal
                })
            })
    }
}

/// Words, operators and quoted strings (marked with a leading `\u{1}`).
fn tokenize(text: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '\'' || c == '"' {
            chars.next();
            let mut value = String::from('\u{1}');
            loop {
                match chars.next() {
                    Some(q) if q == c => break,
                    Some(other) => value.push(other),
                    None => return Err("a quoted string is not closed".into()),
                }
            }
            tokens.push(value);
        } else if "=!<>".contains(c) {
            let mut op = String::new();
            while let Some(&o) = chars.peek() {
                if !"=!<>".contains(o) {
                    break;
                }
                op.push(o);
                chars.next();
            }
            tokens.push(op);
        } else if c == '*' {
            chars.next();
            tokens.push("*".into());
        } else {
            let mut word = String::new();
            while let Some(&w) = chars.peek() {
                if w.is_whitespace() || "=!<>'\"*".contains(w) {
                    break;
                }
                word.push(w);
                chars.next();
            }
            tokens.push(word);
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn where_clauses_select_the_right_twins() {
        let a = json!({"deviceId":"a","connectionState":"Connected"});
        let b = json!({"deviceId":"b","connectionState":"Disconnected"});
        let all = Query::parse("select * from devices").expect("parses");
        assert!(all.matches(&a) && all.matches(&b));
        let q = Query::parse("SELECT * FROM devices WHERE connectionState = 'Connected'")
            .expect("parses");
        assert!(q.matches(&a) && !q.matches(&b));
        let q = Query::parse("SELECT * FROM devices WHERE deviceId = \"b\" OR deviceId='a' AND connectionState != 'Connected'")
            .expect("parses");
        assert!(q.matches(&b) && !q.matches(&a));
        let q = Query::parse("SELECT * FROM devices WHERE deviceId <> 'a'").expect("parses");
        assert!(q.matches(&b) && !q.matches(&a));
    }

    #[test]
    fn what_is_not_understood_is_refused_with_a_reason() {
        for text in [
            "SELECT deviceId FROM devices",
            "SELECT * FROM devices.modules",
            "SELECT * FROM devices WHERE",
            "SELECT * FROM devices WHERE deviceId LIKE 'a'",
            "SELECT * FROM devices WHERE deviceId = 'a",
            "SELECT * FROM devices WHERE deviceId = a",
            "SELECT * FROM devices WHERE properties.reported.x = 1",
        ] {
            let error = Query::parse(text).expect_err(text).to_string();
            assert!(error.contains("unsupported query"), "{error}");
        }
    }
}
