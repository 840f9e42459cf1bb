//! Chat templates: built-in ChatML and Llama-3, or any tokenizer's own Jinja `chat_template`,
//! rendered with minijinja set up the way Hugging Face renders them (trim_blocks, lstrip_blocks,
//! loop controls, `raise_exception`, `tojson`, `strftime_now`, Python string methods).
//!
//! Rendering a conversation also finds where each message's text landed, so the tokenizer can
//! label exactly the assistant's words and its end-of-turn marker.

use std::ops::Range;
use std::path::Path;

use minijinja::{Environment, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::core::record::Role;

/// A built-in template, or the tokenizer's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    /// `<|im_start|>role\n…<|im_end|>\n` (Qwen, SmolLM2).
    #[default]
    Chatml,
    /// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>` (Llama 3).
    Llama3,
    /// The `chat_template` of the model's `tokenizer_config.json`.
    Tokenizer,
}

/// ChatML, written for this project.
const CHATML: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}";

/// Llama 3's header/eot layout, written for this project.
const LLAMA3: &str = "{{- bos_token -}}\
{%- for message in messages -%}\
{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}";

/// One message as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "tool".
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from a role and its text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role: role.as_str().to_string(),
            content: content.into(),
        }
    }
}

/// Where one message's text landed in the rendered string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpan {
    /// Index of the message in the conversation.
    pub message: usize,
    /// Its role.
    pub role: String,
    /// Byte range of its text in the rendered string; for assistant messages it also covers the
    /// end-of-turn marker that follows.
    pub range: Range<usize>,
}

/// A rendered conversation and where its messages are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The text the template produced.
    pub text: String,
    /// One span per message, in order.
    pub spans: Vec<MessageSpan>,
}

impl Rendered {
    /// Byte ranges to train on: assistant messages (with their end marker).
    pub fn assistant_ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.spans
            .iter()
            .filter(|s| s.role == "assistant")
            .map(|s| s.range.clone())
    }
}

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The Jinja source does not compile, or rendering raised an error.
    #[error("chat template error: {0}")]
    Jinja(String),
    /// The tokenizer config could not be read.
    #[error("cannot read the chat template from {}: {why}", path.display())]
    Config {
        path: std::path::PathBuf,
        why: String,
    },
    /// A message's text is not in the rendered string, so its tokens cannot be found.
    #[error(
        "the chat template changes the text of message {message} ({role}), so its tokens cannot \
         be found in the rendered conversation"
    )]
    Unlocatable { message: usize, role: String },
    /// An answer is not closed by the template's end-of-turn marker, so training it would
    /// teach the model never to stop.
    #[error(
        "the chat template writes no end-of-turn marker after message {message} (assistant), so \
         its label mask would be wrong"
    )]
    NoEndMarker { message: usize },
}

/// How many instructions one rendering may run: far above what any real chat template needs for
/// a long conversation (thousands), far below a hang.
const TEMPLATE_FUEL: u64 = 20_000_000;

impl From<minijinja::Error> for TemplateError {
    fn from(e: minijinja::Error) -> Self {
        if e.kind() == ErrorKind::OutOfFuel {
            return TemplateError::Jinja(format!(
                "the chat template ran more than {TEMPLATE_FUEL} steps for one conversation and \
                 was stopped; does it hold a loop that never ends?"
            ));
        }
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        TemplateError::Jinja(text)
    }
}

/// The special token texts a chat template may write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`, when the model has one.
    pub bos: Option<String>,
    /// `eos_token`, when the model names one.
    pub eos: Option<String>,
}

/// What a Hugging Face `tokenizer_config.json` says about BOS, EOS and the chat template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// `bos_token` / `eos_token`.
    pub special_tokens: SpecialTokens,
    /// `add_bos_token`, when the file states it.
    pub add_bos_token: Option<bool>,
    /// `chat_template` (the default one of a named list).
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads a `tokenizer_config.json`.
    pub fn read(path: &Path) -> Result<Self, TemplateError> {
        let config_err = |why: String| TemplateError::Config {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| config_err(e.to_string()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| config_err(e.to_string()))?;
        // A token is a string or an AddedToken object with its text under "content".
        let token = |key: &str| match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            special_tokens: SpecialTokens {
                bos: token("bos_token"),
                eos: token("eos_token"),
            },
            add_bos_token: config.get("add_bos_token").and_then(|v| v.as_bool()),
            chat_template,
        })
    }

    /// As [`TokenizerConfig::read`]; a missing file is an empty config (model folders may
    /// have none).
    pub fn read_if_present(path: &Path) -> Result<Self, TemplateError> {
        if path.exists() {
            Self::read(path)
        } else {
            Ok(Self::default())
        }
    }
}

/// A compiled chat template with its special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The BOS token text templates may insert (`bos_token`), empty if none.
    pub bos_token: String,
    /// The EOS token text (`eos_token`).
    pub eos_token: String,
    /// The marker that ends an assistant turn (e.g. `<|im_end|>`), found by probing the template.
    pub end_of_turn: String,
    /// Every marker that may close an assistant turn: the last turn's and an earlier turn's
    /// (gpt-oss style templates end them differently).
    end_markers: Vec<String>,
    /// The Jinja source, to write into exported tokenizer configs.
    pub source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("end_of_turn", &self.end_of_turn)
            .finish()
    }
}

/// Writes JSON the way Python's `json.dumps(ensure_ascii=False)` does: `", "` and `": "`
/// separators, or an indented layout when asked.
fn python_json(value: &serde_json::Value, indent: Option<usize>) -> String {
    fn write(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        match v {
            serde_json::Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(if indent.is_some() { "," } else { ", " });
                    }
                    newline(out, depth + 1);
                    write(item, indent, depth + 1, out);
                }
                newline(out, depth);
                out.push(']');
            }
            serde_json::Value::Object(map) if !map.is_empty() => {
                out.push('{');
                for (i, (k, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push_str(if indent.is_some() { "," } else { ", " });
                    }
                    newline(out, depth + 1);
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push_str(": ");
                    write(item, indent, depth + 1, out);
                }
                newline(out, depth);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, indent, 0, &mut out);
    out
}

/// The environment HF templates expect.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    // HF renders with trim_blocks and lstrip_blocks on; these options always build.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // A template is code from a model folder: bound how long one rendering may run, so a loop
    // that never ends gives a message instead of a hung import.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| -> String {
        jiff::Zoned::now().strftime(&format).to_string()
    });
    env.add_filter(
        "tojson",
        |value: Value, kwargs: minijinja::value::Kwargs| -> Result<Value, minijinja::Error> {
            let indent: Option<usize> = kwargs.get("indent")?;
            kwargs.assert_all_used()?;
            let json = serde_json::to_value(&value).map_err(|e| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
            })?;
            Ok(Value::from_safe_string(python_json(&json, indent)))
        },
    );
    env
}

impl ChatTemplate {
    /// A template from Jinja source and its special tokens.
    pub fn from_source(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, TemplateError> {
        let mut env = hf_environment();
        env.add_template_owned("chat", source.to_string())?;
        let mut template = Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            end_of_turn: String::new(),
            end_markers: Vec::new(),
            source: source.to_string(),
        };
        template.end_markers = template.probe_end_markers()?;
        template.end_of_turn = template.end_markers.first().cloned().unwrap_or_default();
        Ok(template)
    }

    /// The built-in ChatML template.
    pub fn chatml() -> Self {
        // The built-in source is fixed and covered by tests; it always compiles.
        Self::from_source(CHATML, "", "<|im_end|>").unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// The built-in Llama-3 template.
    pub fn llama3() -> Self {
        Self::from_source(LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
            .unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// Reads `chat_template`, `bos_token` and `eos_token` from a `tokenizer_config.json`.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self, TemplateError> {
        let config = TokenizerConfig::read(path)?;
        let source = config.chat_template.ok_or_else(|| TemplateError::Config {
            path: path.to_path_buf(),
            why: "it has no chat_template (or no template named \"default\")".to_string(),
        })?;
        let tokens = config.special_tokens;
        Self::from_source(
            &source,
            tokens.bos.as_deref().unwrap_or(""),
            tokens.eos.as_deref().unwrap_or(""),
        )
    }

    /// Renders `messages` to text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_value(
            Value::from(minijinja::value::Serde(messages)),
            Value::from(()),
            add_generation_prompt,
        )
    }

    /// Renders messages given as JSON (any fields the template reads: `tool_calls`,
    /// `reasoning_content` …), with an optional list of tools.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_value(
            Value::from(minijinja::value::Serde(messages)),
            Value::from(minijinja::value::Serde(tools)),
            add_generation_prompt,
        )
    }

    fn render_value(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self.env.get_template("chat")?;
        Ok(template.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }

    /// Renders `messages` and finds each message's text in the result. Assistant spans are
    /// extended over the end-of-turn marker that follows them.
    ///
    /// Each message is first rendered as a unique placeholder, which shows the template's own
    /// text between messages; the real rendering is then cut at those separators. Only when the
    /// template's layout depends on the content (so the separators differ) is each message's text
    /// searched for in order instead.
    pub fn render_with_spans(&self, messages: &[ChatMessage]) -> Result<Rendered, TemplateError> {
        let text = self.render(messages, false)?;
        let ranges = match self.separators(messages)? {
            Some(parts) => locate_by_separators(&text, &parts),
            None => None,
        };
        let ranges = match ranges {
            Some(r) => r,
            None => locate_by_search(&text, messages)?,
        };
        let mut spans = Vec::with_capacity(messages.len());
        for (i, (m, range)) in messages.iter().zip(ranges).enumerate() {
            let mut range = range;
            if m.role == "assistant" && !self.end_markers.is_empty() {
                let rest = &text[range.end..];
                let gap = rest.len() - rest.trim_start().len();
                match self
                    .end_markers
                    .iter()
                    .find(|marker| rest[gap..].starts_with(marker.as_str()))
                {
                    Some(marker) => range.end += gap + marker.len(),
                    None => return Err(TemplateError::NoEndMarker { message: i + 1 }),
                }
            }
            spans.push(MessageSpan {
                message: i,
                role: m.role.clone(),
                range,
            });
        }
        Ok(Rendered { text, spans })
    }

    /// The template's text around each message: `parts[i]` comes before message `i`, the last
    /// part after the last message. `None` when a placeholder does not come through unchanged.
    fn separators(&self, messages: &[ChatMessage]) -> Result<Option<Vec<String>>, TemplateError> {
        let marks: Vec<String> = (0..messages.len())
            .map(|i| format!("\u{e000}MOI{i}\u{e001}"))
            .collect();
        let placeholders: Vec<ChatMessage> = messages
            .iter()
            .zip(&marks)
            .map(|(m, mark)| ChatMessage {
                role: m.role.clone(),
                content: mark.clone(),
            })
            .collect();
        let rendered = self.render(&placeholders, false)?;
        let mut parts = Vec::with_capacity(messages.len() + 1);
        let mut rest = rendered.as_str();
        for mark in &marks {
            let Some((before, after)) = rest.split_once(mark.as_str()) else {
                return Ok(None);
            };
            parts.push(before.to_string());
            rest = after;
        }
        parts.push(rest.to_string());
        Ok(Some(parts))
    }

    /// Finds the markers that close an assistant turn: the tag (`<…>`) the template writes
    /// right after the last answer of a conversation, and the one after an answer that a user
    /// turn follows. Text that follows a marker (a newline, the next header, a generation prompt
    /// written whatever `add_generation_prompt` says) is never part of it. A template that
    /// writes no tag after the last answer has no marker: a tag there before the next turn is
    /// that turn's header.
    fn probe_end_markers(&self) -> Result<Vec<String>, TemplateError> {
        const ANSWER: &str = "MOI_PROBE_ANSWER";
        let after_answer = |messages: &[ChatMessage]| -> Option<String> {
            let text = self.render(messages, false).ok()?;
            let at = text.find(ANSWER)?;
            leading_tag(text[at + ANSWER.len()..].trim_start()).map(str::to_string)
        };
        let question = ChatMessage::new(Role::User, "MOI_PROBE_QUESTION");
        let answer = ChatMessage::new(Role::Assistant, ANSWER);
        // The single-turn probe must render; a template that refuses it is unusable.
        self.render(&[question.clone(), answer.clone()], false)?;
        let mut markers = Vec::new();
        if let Some(last) = after_answer(&[question.clone(), answer.clone()]) {
            markers.push(last);
            let follow = ChatMessage::new(Role::User, "MOI_PROBE_FOLLOW_UP");
            if let Some(mid) = after_answer(&[question, answer, follow])
                && !markers.contains(&mid)
            {
                markers.push(mid);
            }
        }
        Ok(markers)
    }
}

/// The tag a text starts with: `<|im_end|>`, `</s>`, `<end_of_turn>`, `<｜end▁of▁sentence｜>`.
fn leading_tag(text: &str) -> Option<&str> {
    if !text.starts_with('<') {
        return None;
    }
    let end = text[1..].find(|c: char| c == '>' || c == '<' || c.is_whitespace())? + 1;
    (text.as_bytes()[end] == b'>' && end > 1).then(|| &text[..=end])
}

/// Cuts `text` at the template's separators; `None` when they are not where they should be.
fn locate_by_separators(text: &str, parts: &[String]) -> Option<Vec<Range<usize>>> {
    let n = parts.len() - 1;
    let mut ranges = Vec::with_capacity(n);
    let mut cursor = parts[0].len();
    if !text.starts_with(parts[0].as_str()) {
        return None;
    }
    for i in 0..n {
        let sep = parts[i + 1].as_str();
        let end = if i + 1 == n {
            if !text.ends_with(sep) || text.len() - sep.len() < cursor {
                return None;
            }
            text.len() - sep.len()
        } else {
            if sep.is_empty() {
                return None;
            }
            cursor + text[cursor..].find(sep)?
        };
        ranges.push(cursor..end);
        cursor = end + sep.len();
    }
    Some(ranges)
}

/// Finds each message's text in order (as written, or trimmed, as templates may trim it).
fn locate_by_search(
    text: &str,
    messages: &[ChatMessage],
) -> Result<Vec<Range<usize>>, TemplateError> {
    let mut ranges = Vec::with_capacity(messages.len());
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        // As written, or trimmed (templates may trim), or without a reasoning block that
        // templates drop from earlier turns (`<think>…</think>` in Qwen3 and DeepSeek-R1).
        let rest = &text[cursor..];
        let without_reasoning = m
            .content
            .rsplit_once("</think>")
            .map(|(_, answer)| answer.trim());
        let needle = [
            Some(m.content.as_str()),
            Some(m.content.trim()),
            without_reasoning,
        ]
        .into_iter()
        .flatten()
        .find(|n| rest.contains(n))
        .unwrap_or(m.content.trim());
        let start = if needle.is_empty() {
            cursor
        } else {
            cursor
                + text[cursor..]
                    .find(needle)
                    .ok_or_else(|| TemplateError::Unlocatable {
                        message: i + 1,
                        role: m.role.clone(),
                    })?
        };
        ranges.push(start..start + needle.len());
        cursor = start + needle.len();
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new(Role::System, "You are a programmer."),
            ChatMessage::new(Role::User, "Add 1 and 2."),
            ChatMessage::new(Role::Assistant, "3"),
        ]
    }

    #[test]
    fn chatml_renders_exactly() {
        let t = ChatTemplate::chatml();
        assert_eq!(
            t.render(&conv(), false).unwrap(),
            "<|im_start|>system\nYou are a programmer.<|im_end|>\n<|im_start|>user\nAdd 1 and 2.<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n"
        );
        assert!(
            t.render(&conv()[..2], true)
                .unwrap()
                .ends_with("<|im_start|>assistant\n")
        );
        assert_eq!(t.end_of_turn, "<|im_end|>");
    }

    #[test]
    fn llama3_renders_exactly() {
        let t = ChatTemplate::llama3();
        assert_eq!(
            t.render(&conv(), false).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a programmer.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAdd 1 and 2.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n3<|eot_id|>"
        );
        assert_eq!(t.end_of_turn, "<|eot_id|>");
    }

    #[test]
    fn spans_cover_assistant_text_and_end_marker() {
        let t = ChatTemplate::chatml();
        let r = t.render_with_spans(&conv()).unwrap();
        let trained: Vec<&str> = r.assistant_ranges().map(|s| &r.text[s]).collect();
        assert_eq!(trained, ["3<|im_end|>"]);
        assert_eq!(&r.text[r.spans[0].range.clone()], "You are a programmer.");
        // The answer "3" also appears nowhere earlier, but "1" would: spans follow message order.
        let tricky = vec![
            ChatMessage::new(Role::User, "Say 2 then 2"),
            ChatMessage::new(Role::Assistant, "2"),
        ];
        let r = t.render_with_spans(&tricky).unwrap();
        let span = r.assistant_ranges().next().unwrap();
        assert!(span.start > r.text.find("Say 2 then 2").unwrap() + 12);
    }

    #[test]
    fn short_and_empty_answers_land_on_their_own_text() {
        let t = ChatTemplate::chatml();
        let conv = vec![
            ChatMessage::new(Role::User, "Pick one: a or b?"),
            ChatMessage::new(Role::Assistant, "a"),
        ];
        let r = t.render_with_spans(&conv).unwrap();
        let span = r.assistant_ranges().next().unwrap();
        assert_eq!(&r.text[span.clone()], "a<|im_end|>");
        assert!(span.start > r.text.find("<|im_start|>assistant").unwrap());
        let conv = vec![
            ChatMessage::new(Role::User, "q1"),
            ChatMessage::new(Role::Assistant, ""),
            ChatMessage::new(Role::User, "q2"),
            ChatMessage::new(Role::Assistant, "x"),
        ];
        let r = t.render_with_spans(&conv).unwrap();
        let spans: Vec<&str> = r.assistant_ranges().map(|s| &r.text[s]).collect();
        assert_eq!(spans, ["<|im_end|>", "x<|im_end|>"]);
        let first = r.assistant_ranges().next().unwrap();
        assert!(first.start > r.text.find("<|im_start|>assistant").unwrap());
    }

    #[test]
    fn end_marker_after_a_space_is_found() {
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %} {{ m.content }} {{ eos_token }}{% endif %}{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(t.end_of_turn, "</s>");
        let r = t
            .render_with_spans(&[
                ChatMessage::new(Role::User, "hi"),
                ChatMessage::new(Role::Assistant, "hello"),
            ])
            .unwrap();
        let span = r.assistant_ranges().next().unwrap();
        assert_eq!(&r.text[span], "hello </s>");
    }

    #[test]
    fn each_turn_gets_the_marker_its_template_closes_it_with() {
        // gpt-oss style: earlier answers end in <|end|>, the last one in <|return|>.
        let t = ChatTemplate::from_source(
            "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}\
             {% if m.role == 'assistant' and loop.last %}<|return|>{% else %}<|end|>{% endif %}\
             {% endfor %}",
            "",
            "",
        )
        .unwrap();
        let r = t
            .render_with_spans(&[
                ChatMessage::new(Role::User, "q1"),
                ChatMessage::new(Role::Assistant, "a1"),
                ChatMessage::new(Role::User, "q2"),
                ChatMessage::new(Role::Assistant, "a2"),
            ])
            .unwrap();
        let trained: Vec<&str> = r.assistant_ranges().map(|s| &r.text[s]).collect();
        assert_eq!(trained, ["a1<|end|>", "a2<|return|>"]);
        // A template that closes the last answer but not an earlier one: refused, not trained
        // on a mask without the marker.
        let t = ChatTemplate::from_source(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\
             {% if loop.last %}<|eot|>{% endif %}\n{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render_with_spans(&[
                ChatMessage::new(Role::User, "q1"),
                ChatMessage::new(Role::Assistant, "a1"),
                ChatMessage::new(Role::User, "q2"),
                ChatMessage::new(Role::Assistant, "a2"),
            ])
            .unwrap_err();
        assert!(
            matches!(err, TemplateError::NoEndMarker { message: 2 }),
            "{err}"
        );
    }

    #[test]
    fn helpers_behave_like_hf() {
        let t = ChatTemplate::from_source(
            "{{ tools | tojson }}|{{ {'a': [1, 2]} | tojson(indent=2) }}|{% for x in [1,2,3] %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}|{{ 'abc'.startswith('a') }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .env
            .get_template("chat")
            .unwrap()
            .render(context! { tools => Value::from(minijinja::value::Serde(serde_json::json!([{"name": "f", "x": "é<"}]))) })
            .unwrap();
        assert_eq!(
            out,
            "[{\"name\": \"f\", \"x\": \"é<\"}]|{\n  \"a\": [\n    1,\n    2\n  ]\n}|13|True"
        );
        let dated = ChatTemplate::from_source("{{ strftime_now('%Y') }}", "", "").unwrap();
        let year = dated.render(&[], false).unwrap();
        assert!(year.len() == 4 && year.starts_with("20"), "{year}");
        let raising = ChatTemplate::from_source("{{ raise_exception('no tools here') }}", "", "");
        assert!(matches!(raising, Err(TemplateError::Jinja(m)) if m.contains("no tools here")));
    }
}
