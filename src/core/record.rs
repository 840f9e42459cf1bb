//! A conversation record: what every importer produces, whatever the file looked like.

use serde::{Deserialize, Serialize};

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A system message (only ever the first message of a record).
    System,
    /// The person asking.
    User,
    /// The model answering; its text is what training learns.
    Assistant,
    /// A tool's result fed back to the model.
    Tool,
}

impl Role {
    /// The lower-case name used in files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// Who says it.
    pub role: Role,
    /// What is said, as plain text.
    pub content: String,
}

impl Turn {
    /// A turn from a role and its text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Where a record came from: the index of its source file in the task, and its line (text files)
/// or row (parquet), counted from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// Index into the task's list of source files.
    pub source: u32,
    /// Line (JSON, JSONL, CSV) or row (parquet) of the record, from 1.
    pub line: u64,
}

/// A conversation: an optional system message, then user/assistant (and tool) turns.
///
/// Invariants kept by the importers: no system role inside `turns`; at least one user turn and at
/// least one assistant turn with text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The record's own system message, if it carries one.
    pub system: Option<String>,
    /// The turns after the system message, in order.
    pub turns: Vec<Turn>,
    /// Where the record was read from.
    pub origin: Origin,
    /// A difficulty score read from a numeric column of the source, when the project's phased
    /// training asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

impl Record {
    /// Number of characters of text in the record, system message included.
    pub fn text_chars(&self) -> usize {
        self.system.as_deref().map_or(0, str::len)
            + self.turns.iter().map(|t| t.content.len()).sum::<usize>()
    }

    /// The first user message, used as a one-line summary in listings.
    pub fn first_user_text(&self) -> &str {
        self.turns
            .iter()
            .find(|t| t.role == Role::User)
            .map_or("", |t| t.content.as_str())
    }
}

/// What to do with a record's own system message, given its task's system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemRule {
    /// Keep the record's own system message as it is; a record without one gets no system prompt.
    Keep,
    /// Always use the task's system prompt, dropping the record's own.
    #[default]
    Replace,
    /// Keep the record's own system message; a record without one gets the task's system prompt.
    FillIfEmpty,
}

impl SystemRule {
    /// Every rule, in the order the UI lists them.
    pub const ALL: [SystemRule; 3] = [
        SystemRule::Replace,
        SystemRule::FillIfEmpty,
        SystemRule::Keep,
    ];

    /// The system prompt a record is trained under by this rule, if any.
    pub fn resolve<'a>(
        self,
        record_system: Option<&'a str>,
        task_prompt: &'a str,
    ) -> Option<&'a str> {
        let own = record_system.filter(|s| !s.trim().is_empty());
        match self {
            SystemRule::Replace => Some(task_prompt),
            SystemRule::Keep => own,
            SystemRule::FillIfEmpty => Some(own.unwrap_or(task_prompt)),
        }
    }

    /// A short label for menus and listings.
    pub fn label(self) -> &'static str {
        match self {
            SystemRule::Keep => "keep the record's own",
            SystemRule::Replace => "replace with the task prompt",
            SystemRule::FillIfEmpty => "task prompt only where the record has none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_rule_resolves_each_way() {
        assert_eq!(
            SystemRule::Replace.resolve(Some("own"), "task"),
            Some("task")
        );
        assert_eq!(SystemRule::Replace.resolve(None, "task"), Some("task"));
        assert_eq!(SystemRule::Keep.resolve(Some("own"), "task"), Some("own"));
        assert_eq!(SystemRule::Keep.resolve(None, "task"), None);
        assert_eq!(SystemRule::FillIfEmpty.resolve(None, "task"), Some("task"));
        assert_eq!(
            SystemRule::FillIfEmpty.resolve(Some("  "), "task"),
            Some("task")
        );
        assert_eq!(
            SystemRule::FillIfEmpty.resolve(Some("own"), "task"),
            Some("own")
        );
    }
}
