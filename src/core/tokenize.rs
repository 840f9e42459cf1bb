//! From records to token ids and labels: the task's system-prompt rule, the chat template, the
//! tokenizer, and the label mask (assistant text and its end-of-turn marker trained, everything
//! else ignored).

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::core::packing::{IGNORE_INDEX, SampleTokens};
use crate::core::record::{Record, Role, SystemRule};
pub use crate::core::settings::LabelOptions;
use crate::core::template::{ChatMessage, ChatTemplate, TemplateError};

/// Why a record could not be tokenized.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The template renders a lone system message as nothing, so no row can start with it.
    #[error(
        "the chat template writes nothing for a conversation holding only a system message, so \
         the default system prompt cannot head MoI rows; choose another template"
    )]
    NoSystemTurn,
}

/// The messages a record is trained as: its system prompt chosen by the task's rule, then its
/// turns.
pub fn conversation(record: &Record, task_prompt: &str, rule: SystemRule) -> Vec<ChatMessage> {
    let mut messages = Vec::with_capacity(record.turns.len() + 1);
    if let Some(system) = rule.resolve(record.system.as_deref(), task_prompt) {
        messages.push(ChatMessage::new(Role::System, system));
    }
    messages.extend(
        record
            .turns
            .iter()
            .map(|t| ChatMessage::new(t.role, t.content.clone())),
    );
    messages
}

/// Turns a rendered text and its trained byte ranges into token ids and labels.
fn label_tokens(
    tokenizer: &Tokenizer,
    text: &str,
    trained: &[Range<usize>],
    system: Option<Range<usize>>,
) -> Result<SampleTokens, TokenizeError> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(|e| TokenizeError::Tokenizer(e.to_string()))?;
    let ids = encoding.get_ids();
    let offsets = encoding.get_offsets();
    let overlaps = |(a, b): (usize, usize), r: &Range<usize>| a < r.end && b > r.start;
    let labels = ids
        .iter()
        .zip(offsets)
        .map(|(&id, &off)| {
            if trained.iter().any(|r| overlaps(off, r)) {
                id as i32
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    let system = match system {
        Some(r) => {
            let first = offsets
                .iter()
                .position(|&o| overlaps(o, &r) || o.0 >= r.start);
            let last = offsets.iter().rposition(|&o| overlaps(o, &r));
            match (first, last) {
                (Some(mut f), Some(mut l)) if l >= f => {
                    // Removing the block is ambiguous when it ends with the token before it
                    // (`…<|im_end|>\n<|im_start|>` after `<|im_start|>`): slide it back so it
                    // reads as a whole turn.
                    while f > 0 && ids[f - 1] == ids[l] {
                        f -= 1;
                        l -= 1;
                    }
                    f as u32..l as u32 + 1
                }
                _ => 0..0,
            }
        }
        None => 0..0,
    };
    Ok(SampleTokens {
        input_ids: ids.to_vec(),
        labels,
        system,
    })
}

/// The byte range of `with` that `without` lacks: what the template writes for the system
/// message, markers included. Removing it from `with` gives `without`.
fn system_block(with: &str, without: &str) -> Range<usize> {
    let mut prefix = with
        .bytes()
        .zip(without.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    while !with.is_char_boundary(prefix) {
        prefix -= 1;
    }
    let room = without.len().min(with.len()) - prefix;
    let mut suffix = with
        .bytes()
        .rev()
        .zip(without.bytes().rev())
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    while !with.is_char_boundary(with.len() - suffix) {
        suffix -= 1;
    }
    prefix..with.len() - suffix
}

/// Tokenizes one conversation with its labels.
pub fn tokenize_messages(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
    options: LabelOptions,
) -> Result<SampleTokens, TokenizeError> {
    let rendered = template.render_with_spans(messages)?;
    let mut trained: Vec<Range<usize>> = if options.train_on_prompt {
        std::iter::once(0..rendered.text.len()).collect()
    } else {
        rendered.assistant_ranges().collect()
    };
    if options.last_turn_only && !options.train_on_prompt && trained.len() > 1 {
        trained.drain(..trained.len() - 1);
    }
    let system = match messages.first() {
        Some(first) if first.role == "system" => Some(system_block(
            &rendered.text,
            &template.render(&messages[1..], false)?,
        )),
        _ => None,
    };
    label_tokens(tokenizer, &rendered.text, &trained, system)
}

/// Tokenizes the default system prompt alone: the prefix of every `moi` row (nothing trained).
pub fn tokenize_prefix(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    default_prompt: &str,
) -> Result<SampleTokens, TokenizeError> {
    let messages = [ChatMessage::new(Role::System, default_prompt)];
    let text = template.render(&messages, false)?;
    if !text.contains(default_prompt.trim()) {
        return Err(TokenizeError::NoSystemTurn);
    }
    let mut tokens = label_tokens(tokenizer, &text, &[], Some(0..text.len()))?;
    tokens.system = 0..tokens.input_ids.len() as u32;
    Ok(tokens)
}

/// Tokenizes many records of one task on all cores. Results are in input order; a record that
/// fails carries its error.
pub fn tokenize_records(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    records: &[&Record],
    task_prompt: &str,
    rule: SystemRule,
    options: LabelOptions,
) -> Vec<Result<SampleTokens, TokenizeError>> {
    use rayon::prelude::*;
    records
        .par_iter()
        .map(|r| {
            tokenize_messages(
                tokenizer,
                template,
                &conversation(r, task_prompt, rule),
                options,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bpe::train_bpe;
    use crate::core::record::{Origin, Turn};

    fn record() -> Record {
        Record {
            system: Some("Own prompt.".into()),
            turns: vec![
                Turn::new(Role::User, "What is 2 + 3?"),
                Turn::new(Role::Assistant, "5"),
                Turn::new(Role::User, "And 4 + 4?"),
                Turn::new(Role::Assistant, "8"),
            ],
            origin: Origin { source: 0, line: 1 },
            score: None,
        }
    }

    fn tokenizer() -> Tokenizer {
        let texts = ["What is 2 + 3? 5 And 4 + 4? 8 You are a helpful assistant. Own prompt."];
        train_bpe(texts.iter().map(|s| s.to_string()), 400).unwrap()
    }

    fn decode_trained(tok: &Tokenizer, s: &SampleTokens) -> String {
        let ids: Vec<u32> = s
            .labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        tok.decode(&ids, false).unwrap()
    }

    #[test]
    fn labels_cover_answers_and_end_markers_only() {
        let tok = tokenizer();
        let t = ChatTemplate::chatml();
        let msgs = conversation(&record(), "Task prompt.", SystemRule::Replace);
        assert_eq!(msgs[0].content, "Task prompt.");
        let s = tokenize_messages(&tok, &t, &msgs, LabelOptions::default()).unwrap();
        assert_eq!(s.input_ids.len(), s.labels.len());
        assert_eq!(decode_trained(&tok, &s), "5<|im_end|>8<|im_end|>");
        let system_text = tok
            .decode(
                &s.input_ids[s.system.start as usize..s.system.end as usize],
                false,
            )
            .unwrap();
        assert_eq!(system_text, "<|im_start|>system\nTask prompt.<|im_end|>\n");

        let last = LabelOptions {
            last_turn_only: true,
            ..LabelOptions::default()
        };
        let s = tokenize_messages(&tok, &t, &msgs, last).unwrap();
        assert_eq!(decode_trained(&tok, &s), "8<|im_end|>");

        let all = LabelOptions {
            train_on_prompt: true,
            ..LabelOptions::default()
        };
        let s = tokenize_messages(&tok, &t, &msgs, all).unwrap();
        assert!(s.labels.iter().all(|&l| l >= 0));
    }

    #[test]
    fn system_block_is_what_the_system_message_adds() {
        let t = ChatTemplate::llama3();
        let msgs = conversation(&record(), "Task prompt.", SystemRule::Replace);
        let with = t.render(&msgs, false).unwrap();
        let without = t.render(&msgs[1..], false).unwrap();
        let block = system_block(&with, &without);
        let mut cut = with.clone();
        cut.replace_range(block.clone(), "");
        assert_eq!(cut, without);
        assert!(with[block].contains("Task prompt."));
    }

    #[test]
    fn system_rules_apply() {
        let keep = conversation(&record(), "Task prompt.", SystemRule::Keep);
        assert_eq!(keep[0].content, "Own prompt.");
        let mut bare = record();
        bare.system = None;
        assert_eq!(conversation(&bare, "T", SystemRule::Keep)[0].role, "user");
        assert_eq!(
            conversation(&bare, "T", SystemRule::FillIfEmpty)[0].content,
            "T"
        );
    }

    #[test]
    fn prefix_is_the_default_prompt_untrained() {
        let tok = tokenizer();
        let p = tokenize_prefix(
            &tok,
            &ChatTemplate::chatml(),
            "You are a helpful assistant.",
        )
        .unwrap();
        assert!(p.labels.iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(
            tok.decode(&p.input_ids, false).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        );
        assert_eq!(p.system, 0..p.input_ids.len() as u32);
    }
}
