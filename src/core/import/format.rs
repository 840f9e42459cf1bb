//! Dataset formats: how the fields of one JSON object (or CSV row, or parquet row) become a
//! [`Record`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::core::record::{Origin, Record, Role, Turn};

/// The shape of the records in a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `instruction`, optional `input`, `output`, optional `system` and `history`.
    Alpaca,
    /// `conversations` holding `{from, value}` turns (human, gpt, system, tool, …).
    Sharegpt,
    /// `messages` holding `{role, content}` turns (OpenAI chat format).
    Openai,
    /// One prompt and one answer: `prompt`/`completion`, `question`/`answer` or `query`/`response`.
    PromptCompletion,
}

impl Format {
    /// Every format, in the order detection tries them.
    pub const ALL: [Format; 4] = [
        Format::Openai,
        Format::Sharegpt,
        Format::Alpaca,
        Format::PromptCompletion,
    ];

    /// The name used on the command line and in project files.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Sharegpt => "sharegpt",
            Format::Openai => "openai",
            Format::PromptCompletion => "prompt_completion",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "alpaca" => Ok(Format::Alpaca),
            "sharegpt" => Ok(Format::Sharegpt),
            "openai" | "messages" | "openai_messages" => Ok(Format::Openai),
            "prompt_completion" | "prompt" | "completion" | "qa" => Ok(Format::PromptCompletion),
            other => Err(format!(
                "unknown format '{other}': expected alpaca, sharegpt, openai or prompt_completion"
            )),
        }
    }
}

/// A role a column mapping can point a field at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapRole {
    /// The record's system message.
    System,
    /// The user's message (alpaca's `instruction`, `prompt`, `question`).
    User,
    /// Extra context appended to the user's message (alpaca's `input`).
    Input,
    /// The answer (alpaca's `output`, `completion`, `answer`).
    Assistant,
    /// A whole conversation: a list of `{role, content}` or `{from, value}` turns.
    Messages,
}

impl MapRole {
    /// The name used on the command line and in project files.
    pub fn as_str(self) -> &'static str {
        match self {
            MapRole::System => "system",
            MapRole::User => "user",
            MapRole::Input => "input",
            MapRole::Assistant => "assistant",
            MapRole::Messages => "messages",
        }
    }
}

impl FromStr for MapRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "system" => Ok(MapRole::System),
            "user" | "instruction" | "prompt" | "question" | "query" => Ok(MapRole::User),
            "input" | "context" => Ok(MapRole::Input),
            "assistant" | "output" | "completion" | "answer" | "response" => Ok(MapRole::Assistant),
            "messages" | "conversations" | "conversation" => Ok(MapRole::Messages),
            other => Err(format!(
                "unknown role '{other}': expected system, user, input, assistant or messages"
            )),
        }
    }
}

/// Which field of a record holds which role, for files whose field names are not the usual ones.
///
/// An empty mapping means "use the format's own field names".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ColumnMapping(pub BTreeMap<MapRole, String>);

impl ColumnMapping {
    /// True when no field is mapped.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The field mapped to `role`, if any.
    pub fn get(&self, role: MapRole) -> Option<&str> {
        self.0.get(&role).map(String::as_str)
    }

    /// Parses `role=field` pairs as given on the command line.
    pub fn parse_pairs<S: AsRef<str>>(pairs: &[S]) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for pair in pairs {
            let pair = pair.as_ref();
            let (role, field) = pair
                .split_once('=')
                .ok_or_else(|| format!("mapping '{pair}' is not of the form role=field"))?;
            let field = field.trim();
            if field.is_empty() {
                return Err(format!("mapping '{pair}' names no field"));
            }
            map.insert(role.trim().parse::<MapRole>()?, field.to_string());
        }
        Ok(Self(map))
    }

    /// The fields a record must have under this mapping (used to check CSV headers up front).
    pub fn required_fields(&self) -> Vec<&str> {
        if let Some(messages) = self.get(MapRole::Messages) {
            return vec![messages];
        }
        [MapRole::User, MapRole::Assistant]
            .iter()
            .filter_map(|r| self.get(*r))
            .collect()
    }
}

/// How records are read: a known format, or a column mapping (which wins when set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Field names of a known format.
    Format(Format),
    /// Field names chosen by the user.
    Mapped(ColumnMapping),
}

impl Layout {
    /// The name shown in reports.
    pub fn name(&self) -> String {
        match self {
            Layout::Format(f) => f.as_str().to_string(),
            Layout::Mapped(m) => {
                let pairs: Vec<String> =
                    m.0.iter()
                        .map(|(role, field)| format!("{}={field}", role.as_str()))
                        .collect();
                format!("mapped ({})", pairs.join(", "))
            }
        }
    }

    /// Fields that must be present in every record (empty when the format has alternatives).
    pub fn required_fields(&self) -> Vec<&str> {
        match self {
            Layout::Mapped(m) => m.required_fields(),
            Layout::Format(Format::Alpaca) => vec!["instruction", "output"],
            Layout::Format(Format::Sharegpt) => vec!["conversations"],
            Layout::Format(Format::Openai) => vec!["messages"],
            Layout::Format(Format::PromptCompletion) => vec![],
        }
    }

    /// Turns one JSON object into a record, or says why it cannot.
    pub fn parse(&self, value: &Value, origin: Origin) -> Result<Record, String> {
        let obj = value
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, found {}", kind_of(value)))?;
        let (system, turns) = match self {
            Layout::Format(Format::Alpaca) => parse_pair(
                obj,
                &["system"],
                &["instruction"],
                &["input"],
                &["output"],
                true,
            )?,
            Layout::Format(Format::PromptCompletion) => parse_pair(
                obj,
                &["system"],
                &["prompt", "question", "query"],
                &[],
                &["completion", "answer", "response"],
                false,
            )?,
            Layout::Format(Format::Sharegpt) => parse_conversation(obj, "conversations")?,
            Layout::Format(Format::Openai) => parse_conversation(obj, "messages")?,
            Layout::Mapped(map) => match map.get(MapRole::Messages) {
                Some(field) => {
                    let (own_system, turns) = parse_conversation(obj, field)?;
                    let system = match map.get(MapRole::System) {
                        Some(f) => optional_text(obj, f)?.or(own_system),
                        None => own_system,
                    };
                    (system, turns)
                }
                None => {
                    let need = |role: MapRole| {
                        map.get(role).ok_or_else(|| {
                            format!(
                                "the mapping names no field for '{}' (give --map {}=FIELD)",
                                role.as_str(),
                                role.as_str()
                            )
                        })
                    };
                    let user = need(MapRole::User)?;
                    let assistant = need(MapRole::Assistant)?;
                    let system: Vec<&str> = map.get(MapRole::System).into_iter().collect();
                    let input: Vec<&str> = map.get(MapRole::Input).into_iter().collect();
                    parse_pair(obj, &system, &[user], &input, &[assistant], false)?
                }
            },
        };
        check_turns(&turns)?;
        Ok(Record {
            system,
            turns,
            origin,
            score: None,
        })
    }
}

/// Guesses the format from the field names of the first records.
///
/// Returns `None` when no record matches any known format.
pub fn detect_format<'a>(samples: impl IntoIterator<Item = &'a Value>) -> Option<Format> {
    let mut votes: BTreeMap<u8, (usize, Format)> = BTreeMap::new();
    for value in samples {
        let Some(obj) = value.as_object() else {
            continue;
        };
        let found = if obj.get("messages").is_some_and(Value::is_array) {
            Some(Format::Openai)
        } else if obj.get("conversations").is_some_and(Value::is_array) {
            Some(Format::Sharegpt)
        } else if obj.contains_key("instruction") && obj.contains_key("output") {
            Some(Format::Alpaca)
        } else if [
            ("prompt", "completion"),
            ("question", "answer"),
            ("query", "response"),
            ("prompt", "response"),
        ]
        .iter()
        .any(|(a, b)| obj.contains_key(*a) && obj.contains_key(*b))
        {
            Some(Format::PromptCompletion)
        } else {
            None
        };
        if let Some(format) = found {
            let rank = Format::ALL.iter().position(|f| *f == format).unwrap_or(0) as u8;
            votes.entry(rank).or_insert((0, format)).0 += 1;
        }
    }
    votes
        .into_values()
        .max_by_key(|(count, _)| *count)
        .map(|(_, f)| f)
}

/// A short description of a JSON value's type, for messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

type Parsed = (Option<String>, Vec<Turn>);

/// Reads a text field that must be present.
fn required_text(obj: &Map<String, Value>, names: &[&str]) -> Result<String, String> {
    for name in names {
        if let Some(value) = obj.get(*name) {
            return match value {
                Value::String(s) => Ok(s.clone()),
                Value::Null => Err(format!("\"{name}\" is null, expected text")),
                other => Err(format!("\"{name}\" is {}, expected text", kind_of(other))),
            };
        }
    }
    Err(match names {
        [one] => format!("missing field \"{one}\""),
        many => format!(
            "missing field: none of {}",
            many.iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Reads a text field that may be absent, null or empty.
fn optional_text(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("\"{name}\" is {}, expected text", kind_of(other))),
    }
}

/// An instruction/answer pair, with optional system, input and (for alpaca) history fields.
fn parse_pair(
    obj: &Map<String, Value>,
    system: &[&str],
    user: &[&str],
    input: &[&str],
    assistant: &[&str],
    with_history: bool,
) -> Result<Parsed, String> {
    let mut turns = Vec::with_capacity(2);
    let history = obj.get("history").filter(|v| with_history && !v.is_null());
    if let Some(history) = history {
        let pairs = history
            .as_array()
            .ok_or_else(|| format!("\"history\" is {}, expected a list", kind_of(history)))?;
        for (i, pair) in pairs.iter().enumerate() {
            match pair.as_array().map(Vec::as_slice) {
                Some([Value::String(q), Value::String(a)]) => {
                    turns.push(Turn::new(Role::User, q.clone()));
                    turns.push(Turn::new(Role::Assistant, a.clone()));
                }
                _ => {
                    return Err(format!(
                        "\"history\" item {} is not a [question, answer] pair of texts",
                        i + 1
                    ));
                }
            }
        }
    }
    let mut question = required_text(obj, user)?;
    for name in input {
        if let Some(extra) = optional_text(obj, name)? {
            if question.is_empty() {
                question = extra;
            } else {
                question = format!("{question}\n\n{extra}");
            }
        }
    }
    let answer = required_text(obj, assistant)?;
    turns.push(Turn::new(Role::User, question));
    turns.push(Turn::new(Role::Assistant, answer));
    let mut sys = None;
    for name in system {
        if let Some(s) = optional_text(obj, name)? {
            sys = Some(s);
        }
    }
    Ok((sys, turns))
}

/// Maps a role name as written in the many chat datasets to our roles.
fn role_from_name(name: &str) -> Option<Role> {
    match name.to_ascii_lowercase().as_str() {
        "system" | "developer" => Some(Role::System),
        "user" | "human" => Some(Role::User),
        "assistant" | "gpt" | "model" | "chatgpt" | "bard" | "bing" | "function_call" => {
            Some(Role::Assistant)
        }
        "tool" | "function" | "observation" | "ipython" => Some(Role::Tool),
        _ => None,
    }
}

/// Text of a message's content: a string, or a list of `{type: "text", text}` parts.
fn content_text(turn: &Map<String, Value>, key: &str, index: usize) -> Result<String, String> {
    match turn.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part {
                    Value::String(s) => text.push_str(s),
                    Value::Object(p) => match p.get("text") {
                        Some(Value::String(s)) => text.push_str(s),
                        _ => {
                            return Err(format!(
                                "message {index}: only text content parts are supported"
                            ));
                        }
                    },
                    other => {
                        return Err(format!(
                            "message {index}: a content part is {}, expected text",
                            kind_of(other)
                        ));
                    }
                }
            }
            Ok(text)
        }
        // An assistant turn that only calls tools: keep the calls as their JSON text.
        None | Some(Value::Null) => {
            match turn.get("tool_calls").or_else(|| turn.get("function_call")) {
                Some(calls) if !calls.is_null() => Ok(calls.to_string()),
                _ => Err(format!("message {index}: missing \"{key}\"")),
            }
        }
        Some(other) => Err(format!(
            "message {index}: \"{key}\" is {}, expected text",
            kind_of(other)
        )),
    }
}

/// A list of chat turns, as `{role, content}` or `{from, value}` objects.
fn parse_conversation(obj: &Map<String, Value>, field: &str) -> Result<Parsed, String> {
    let raw = obj
        .get(field)
        .ok_or_else(|| format!("missing field \"{field}\""))?;
    // CSV cells and some parquet files carry the conversation as a JSON string.
    let parsed_from_text;
    let list = match raw {
        Value::Array(list) => list,
        Value::String(text) => {
            parsed_from_text = serde_json::from_str::<Value>(text)
                .map_err(|e| format!("\"{field}\" is text that is not a JSON list: {e}"))?;
            parsed_from_text
                .as_array()
                .ok_or_else(|| format!("\"{field}\" is text that is not a JSON list"))?
        }
        other => {
            return Err(format!(
                "\"{field}\" is {}, expected a list",
                kind_of(other)
            ));
        }
    };
    let mut system = optional_text(obj, "system")?;
    let mut turns = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let index = i + 1;
        let turn = item
            .as_object()
            .ok_or_else(|| format!("message {index} is {}, expected an object", kind_of(item)))?;
        let (role_key, content_key) = if turn.contains_key("from") {
            ("from", "value")
        } else {
            ("role", "content")
        };
        let role_name = match turn.get(role_key) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => {
                return Err(format!(
                    "message {index}: \"{role_key}\" is {}, expected text",
                    kind_of(other)
                ));
            }
            None => return Err(format!("message {index}: missing \"role\" or \"from\"")),
        };
        let role = role_from_name(role_name)
            .ok_or_else(|| format!("message {index}: unknown role \"{role_name}\""))?;
        let content = content_text(turn, content_key, index)?;
        if role == Role::System {
            if !turns.is_empty() {
                return Err(format!(
                    "message {index}: a system message after the conversation started"
                ));
            }
            system = Some(content).filter(|s| !s.trim().is_empty());
            continue;
        }
        turns.push(Turn::new(role, content));
    }
    Ok((system, turns))
}

/// Checks the invariants every record keeps: a user turn first among user/assistant turns, and
/// an assistant turn with text to learn.
fn check_turns(turns: &[Turn]) -> Result<(), String> {
    if turns.is_empty() {
        return Err("the conversation is empty".to_string());
    }
    if !turns.iter().any(|t| t.role == Role::User) {
        return Err("no user message".to_string());
    }
    match turns.iter().rposition(|t| t.role == Role::Assistant) {
        None => Err("no assistant message to learn from".to_string()),
        Some(last) if turns[last].content.trim().is_empty() => {
            Err("the last assistant message is empty".to_string())
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AT: Origin = Origin { source: 0, line: 1 };

    #[test]
    fn alpaca_joins_instruction_and_input() {
        let v = json!({"instruction": "Add", "input": "2 and 3", "output": "5", "system": "S"});
        let r = Layout::Format(Format::Alpaca).parse(&v, AT).unwrap();
        assert_eq!(r.system.as_deref(), Some("S"));
        assert_eq!(r.turns[0], Turn::new(Role::User, "Add\n\n2 and 3"));
        assert_eq!(r.turns[1], Turn::new(Role::Assistant, "5"));
    }

    #[test]
    fn alpaca_history_becomes_earlier_turns() {
        let v = json!({"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]});
        let r = Layout::Format(Format::Alpaca).parse(&v, AT).unwrap();
        let texts: Vec<&str> = r.turns.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(texts, ["q1", "a1", "q2", "a2"]);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let v = json!({"instruction": "Add", "output": 5});
        let err = Layout::Format(Format::Alpaca).parse(&v, AT).unwrap_err();
        assert_eq!(err, "\"output\" is a number, expected text");
    }

    #[test]
    fn sharegpt_roles_and_system() {
        let v = json!({"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "hi"},
            {"from": "function_call", "value": "{\"name\":\"f\"}"},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "It is 42."}
        ]});
        let r = Layout::Format(Format::Sharegpt).parse(&v, AT).unwrap();
        assert_eq!(r.system.as_deref(), Some("Be brief."));
        let roles: Vec<Role> = r.turns.iter().map(|t| t.role).collect();
        assert_eq!(
            roles,
            [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
        );
    }

    #[test]
    fn openai_content_parts_and_tool_calls() {
        let v = json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]},
            {"role": "tool", "content": "1"},
            {"role": "assistant", "content": "done"}
        ]});
        let r = Layout::Format(Format::Openai).parse(&v, AT).unwrap();
        assert_eq!(r.turns[0].content, "ab");
        assert!(r.turns[1].content.contains("\"name\":\"f\""));
        assert_eq!(r.turns[2].role, Role::Tool);
    }

    #[test]
    fn conversation_without_answer_is_rejected() {
        let v = json!({"messages": [{"role": "user", "content": "hi"}]});
        let err = Layout::Format(Format::Openai).parse(&v, AT).unwrap_err();
        assert_eq!(err, "no assistant message to learn from");
        let v = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]});
        let err = Layout::Format(Format::Openai).parse(&v, AT).unwrap_err();
        assert!(err.contains("system message after"), "{err}");
    }

    #[test]
    fn prompt_completion_alternatives() {
        for (q, a) in [
            ("prompt", "completion"),
            ("question", "answer"),
            ("query", "response"),
        ] {
            let v = json!({q: "Q", a: "A"});
            assert_eq!(detect_format([&v]), Some(Format::PromptCompletion));
            let r = Layout::Format(Format::PromptCompletion)
                .parse(&v, AT)
                .unwrap();
            assert_eq!(r.turns[1].content, "A");
        }
    }

    #[test]
    fn mapping_points_any_field_at_roles() {
        let map = ColumnMapping::parse_pairs(&["user=q", "assistant=a", "system=sys"]).unwrap();
        let v = json!({"q": "Q", "a": "A", "sys": "S"});
        let r = Layout::Mapped(map).parse(&v, AT).unwrap();
        assert_eq!(r.system.as_deref(), Some("S"));
        assert_eq!(r.turns[0].content, "Q");
        let bad = ColumnMapping::parse_pairs(&["nobody=q"]).unwrap_err();
        assert!(bad.contains("unknown role"), "{bad}");
    }

    #[test]
    fn mapped_messages_may_be_json_text() {
        let map = ColumnMapping::parse_pairs(&["messages=chat"]).unwrap();
        let v = json!({"chat": "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]"});
        let r = Layout::Mapped(map).parse(&v, AT).unwrap();
        assert_eq!(r.turns.len(), 2);
    }

    #[test]
    fn detection_follows_the_majority() {
        let a = json!({"instruction": "i", "output": "o"});
        let b = json!({"messages": []});
        assert_eq!(detect_format([&a, &a, &b]), Some(Format::Alpaca));
        assert_eq!(detect_format([&json!({"x": 1})]), None);
    }
}
