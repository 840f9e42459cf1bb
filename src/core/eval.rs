//! Answer checks for exact match by generation: the number a math answer ends on, the function
//! call a tool-use answer makes, or the text itself. Plain functions over strings, so they can be
//! tested without a model.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a task's generated answers are checked against the reference answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerCheck {
    /// No exact-match check: the task gets loss and token accuracy only.
    #[default]
    None,
    /// The number after `####`, or else the last number, must be equal.
    Math,
    /// The function name and arguments of the first JSON call must be equal.
    Tool,
    /// The text must be equal once white space is collapsed.
    Exact,
}

impl AnswerCheck {
    /// Every check, for menus.
    pub const ALL: [AnswerCheck; 4] = [Self::None, Self::Math, Self::Tool, Self::Exact];

    /// The name used in project files and on screen.
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Math => "math",
            Self::Tool => "tool",
            Self::Exact => "exact",
        }
    }

    /// Whether the task has a check at all.
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }

    /// Whether `generated` passes against `reference`; `None` when the task has no check.
    pub fn passes(self, generated: &str, reference: &str) -> Option<bool> {
        match self {
            Self::None => None,
            Self::Math => Some(match (math_answer(generated), math_answer(reference)) {
                (Some(a), Some(b)) => numbers_equal(&a, &b),
                _ => false,
            }),
            Self::Tool => Some(match (tool_call(generated), tool_call(reference)) {
                (Some(a), Some(b)) => a == b,
                _ => false,
            }),
            Self::Exact => Some(collapse(generated) == collapse(reference)),
        }
    }
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Numbers in `text`, in order, as written (commas and a leading `$` dropped).
fn numbers(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = bytes[i].is_ascii_digit()
            || (bytes[i] == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit));
        if !starts {
            i += 1;
            continue;
        }
        let mut s = String::new();
        if bytes[i] == b'-' {
            s.push('-');
            i += 1;
        }
        while i < bytes.len() {
            let c = bytes[i];
            let next_digit = bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            if c.is_ascii_digit() {
                s.push(c as char);
            } else if c == b',' && next_digit {
                // A thousands separator.
            } else if c == b'.' && next_digit && !s.contains('.') {
                s.push('.');
            } else {
                break;
            }
            i += 1;
        }
        out.push(s);
    }
    out
}

/// The final answer of a math solution: the first number after the last `####`, or else the
/// last number in the text.
pub fn math_answer(text: &str) -> Option<String> {
    if let Some(pos) = text.rfind("####")
        && let Some(n) = numbers(&text[pos + 4..]).into_iter().next()
    {
        return Some(n);
    }
    numbers(text).pop()
}

fn numbers_equal(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// A function call: its name and arguments, numbers compared by value.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments (an object), numbers as f64.
    pub arguments: Value,
}

/// Numbers as f64 everywhere, so `10` and `10.0` compare equal.
fn normalize(value: Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number),
        Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect())
        }
        other => other,
    }
}

/// Reads a call from one JSON value: `{"name", "arguments"}` (arguments as an object or as JSON
/// text), OpenAI's `{"function": {…}}`, or a list whose first item is a call.
fn call_from(value: Value) -> Option<ToolCall> {
    match value {
        Value::Array(items) => items.into_iter().next().and_then(call_from),
        Value::Object(mut map) => {
            if let Some(inner @ Value::Object(_)) = map.remove("function") {
                return call_from(inner);
            }
            let name = map.get("name")?.as_str()?.to_string();
            let arguments = match map.remove("arguments").or_else(|| map.remove("parameters")) {
                Some(Value::String(s)) => serde_json::from_str(&s).ok()?,
                Some(v) => v,
                None => Value::Object(Default::default()),
            };
            Some(ToolCall {
                name,
                arguments: normalize(arguments),
            })
        }
        _ => None,
    }
}

/// The first function call written as JSON in `text` (code fences and text around it ignored).
pub fn tool_call(text: &str) -> Option<ToolCall> {
    for (start, _) in text.match_indices(['{', '[']) {
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        if let Some(Ok(value)) = stream.next()
            && let Some(call) = call_from(value)
        {
            return Some(call);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn math_takes_the_marked_answer_then_the_last_number() {
        assert_eq!(math_answer("3 + 4 = 7\n#### 7").as_deref(), Some("7"));
        assert_eq!(
            math_answer("so 1,234 apples\n#### $1,234.").as_deref(),
            Some("1234")
        );
        assert_eq!(
            math_answer("first 3, then 12 and -5.5").as_deref(),
            Some("-5.5")
        );
        assert_eq!(math_answer("no numbers here"), None);
        let check = AnswerCheck::Math;
        assert_eq!(check.passes("it is 10.0", "...\n#### 10"), Some(true));
        assert_eq!(check.passes("#### 11", "#### 10"), Some(false));
        assert_eq!(check.passes("nothing", "#### 10"), Some(false));
    }

    #[test]
    fn tool_calls_compare_name_and_arguments() {
        let reference = r#"{"name": "area", "arguments": {"base": 10, "height": 5}}"#;
        let check = AnswerCheck::Tool;
        // Order of keys, number spelling and surrounding text do not matter.
        let same = "Sure:\n```json\n{\"arguments\": {\"height\": 5.0, \"base\": 10}, \"name\": \"area\"}\n```";
        assert_eq!(check.passes(same, reference), Some(true));
        let as_text =
            r#"[{"function": {"name": "area", "arguments": "{\"base\": 10, \"height\": 5}"}}]"#;
        assert_eq!(check.passes(as_text, reference), Some(true));
        let wrong = r#"{"name": "area", "arguments": {"base": 10, "height": 6}}"#;
        assert_eq!(check.passes(wrong, reference), Some(false));
        assert_eq!(
            check.passes(
                r#"{"name": "volume", "arguments": {"base": 10, "height": 5}}"#,
                reference
            ),
            Some(false)
        );
        assert_eq!(check.passes("{not json", reference), Some(false));
        assert_eq!(tool_call("no call"), None);
    }

    #[test]
    fn exact_collapses_white_space_and_none_checks_nothing() {
        assert_eq!(AnswerCheck::Exact.passes(" a  b\n", "a b"), Some(true));
        assert_eq!(AnswerCheck::Exact.passes("a b c", "a b"), Some(false));
        assert_eq!(AnswerCheck::None.passes("a", "a"), None);
    }
}
