//! Sequential instructions (SIT, arXiv 2403.07794): a share of a task's records turned into
//! chained instructions whose every step can be checked — a prefix step ("first repeat the
//! request word for word"), a suffix step ("then give the answer again in upper case"), or a
//! chain of two records of different tasks — and the SeqEval-style check that every expected part
//! of the answer is there, in order.
//!
//! A step template is two texts with placeholders: the instruction the user sends and the answer
//! the model should give. The answer's literal text and placeholders are, in order, the parts the
//! check looks for, so a template is checkable by construction.

use serde::{Deserialize, Serialize};

use crate::core::record::{Record, Role, Turn};

/// The placeholders a step template may use.
pub const PLACEHOLDERS: [&str; 6] = [
    "request",
    "answer",
    "answer_upper",
    "request_words",
    "request_b",
    "answer_b",
];

/// One way of turning a record into a chain of steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTemplate {
    /// Shown in the record and pack browsers ("repeat", "upper case", …).
    pub name: String,
    /// What the user asks; must hold `{request}`.
    pub instruction: String,
    /// What the model answers; must hold `{answer}`. Its text and placeholders, in order, are
    /// the parts the step check looks for.
    pub answer: String,
}

impl StepTemplate {
    fn new(name: &str, instruction: &str, answer: &str) -> Self {
        Self {
            name: name.into(),
            instruction: instruction.into(),
            answer: answer.into(),
        }
    }

    /// Whether it chains a second record (of another task).
    pub fn is_chain(&self) -> bool {
        self.instruction.contains("{request_b}") || self.answer.contains("{answer_b}")
    }

    /// Checks the placeholders: known ones only, `{request}` in the instruction, `{answer}` in
    /// the answer, and both `_b` halves or neither.
    pub fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        for text in [&self.instruction, &self.answer] {
            for piece in pieces(text) {
                if let Piece::Slot(slot) = piece
                    && !PLACEHOLDERS.contains(&slot)
                {
                    return Err(format!(
                        "step template '{name}' uses {{{slot}}}; the placeholders are {}",
                        PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                    ));
                }
            }
        }
        for slot in ["{answer}", "{answer_upper}", "{answer_b}"] {
            if self.instruction.contains(slot) {
                return Err(format!(
                    "step template '{name}': the instruction may not hold {slot}, it would give \
                     the answer away"
                ));
            }
        }
        if !self.instruction.contains("{request}") {
            return Err(format!(
                "step template '{name}': the instruction must hold {{request}}"
            ));
        }
        if !self.answer.contains("{answer}") {
            return Err(format!(
                "step template '{name}': the answer must hold {{answer}}"
            ));
        }
        if self.instruction.contains("{request_b}") != self.answer.contains("{answer_b}") {
            return Err(format!(
                "step template '{name}': a chain needs {{request_b}} in the instruction and \
                 {{answer_b}} in the answer"
            ));
        }
        Ok(())
    }
}

/// The step templates a task starts with: two prefix steps, a suffix step and a chain.
pub fn default_templates() -> Vec<StepTemplate> {
    vec![
        StepTemplate::new(
            "repeat",
            "First repeat the request word for word, then answer it.\n\n{request}",
            "Request: {request}\nAnswer: {answer}",
        ),
        StepTemplate::new(
            "count words",
            "First say how many words the request has, then answer it.\n\n{request}",
            "Words: {request_words}\nAnswer: {answer}",
        ),
        StepTemplate::new(
            "upper case",
            "{request}\n\nAnswer, then give the answer again in upper case.",
            "{answer}\nIn upper case: {answer_upper}",
        ),
        StepTemplate::new(
            "chain",
            "Do two things, in order.\nFirst: {request}\nThen: {request_b}",
            "First: {answer}\nThen: {answer_b}",
        ),
    ]
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A task's sequential-instruction settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SitSettings {
    /// Share of the task's training records turned into chained instructions (0 = none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub share: f64,
    /// The step templates. When not empty, evaluation also asks the task's held-out records as
    /// chained instructions and reports how many had every step done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepTemplate>,
}

impl SitSettings {
    /// Whether nothing is set.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the share and every template.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.share) {
            return Err(format!(
                "sequential-instruction share {} is outside 0–1",
                self.share
            ));
        }
        if self.share > 0.0 && self.steps.is_empty() {
            return Err("a sequential-instruction share needs step templates".into());
        }
        self.steps.iter().try_for_each(StepTemplate::validate)
    }
}

enum Piece<'a> {
    Text(&'a str),
    Slot(&'a str),
}

/// Splits a template into literal text and `{placeholder}`s. `{{` and `}}` are not special: a
/// brace that does not open a well-formed name is literal text.
fn pieces(template: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close)
                if !after[..close].is_empty()
                    && after[..close]
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_') =>
            {
                if open > 0 {
                    out.push(Piece::Text(&rest[..open]));
                }
                out.push(Piece::Slot(&after[..close]));
                rest = &after[close + 1..];
            }
            _ => {
                out.push(Piece::Text(&rest[..=open]));
                rest = after;
            }
        }
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    out
}

/// The texts placeholders stand for.
#[derive(Debug, Clone, Default)]
pub struct StepValues {
    /// The record's request.
    pub request: String,
    /// Its answer.
    pub answer: String,
    /// The second record's request (chains).
    pub request_b: String,
    /// The second record's answer (chains).
    pub answer_b: String,
}

impl StepValues {
    fn get(&self, slot: &str) -> String {
        match slot {
            "request" => self.request.clone(),
            "answer" => self.answer.clone(),
            "answer_upper" => self.answer.to_uppercase(),
            "request_words" => self.request.split_whitespace().count().to_string(),
            "request_b" => self.request_b.clone(),
            "answer_b" => self.answer_b.clone(),
            _ => String::new(),
        }
    }
}

/// A template filled in.
pub fn render(template: &str, values: &StepValues) -> String {
    let mut out = String::new();
    for piece in pieces(template) {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Slot(s) => out.push_str(&values.get(s)),
        }
    }
    out
}

fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The parts a checked answer must hold, in order: the answer template's literal text and each
/// placeholder's value, white space collapsed, empty parts left out.
pub fn expected_parts(answer_template: &str, values: &StepValues) -> Vec<String> {
    pieces(answer_template)
        .into_iter()
        .map(|p| match p {
            Piece::Text(t) => collapse(t),
            Piece::Slot(s) => collapse(&values.get(s)),
        })
        .filter(|p| !p.is_empty())
        .collect()
}

/// The "did every step" check: every part present in `generated`, each after the one before
/// (white space collapsed on both sides).
pub fn every_step_done(generated: &str, parts: &[String]) -> bool {
    let text = collapse(generated);
    let mut from = 0;
    for part in parts {
        match text[from..].find(part.as_str()) {
            Some(at) => from += at + part.len(),
            None => return false,
        }
    }
    true
}

/// A record turned into a chain of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Composed {
    /// The chained record (same system message and origin as the one it came from).
    pub record: Record,
    /// Index of the template in the task's list.
    pub template: usize,
    /// What the check looks for.
    pub parts: Vec<String>,
}

/// The request and the answer of a single-exchange record (one user turn, one assistant turn),
/// the only kind that is composed.
pub(crate) fn exchange(record: &Record) -> Option<(&str, &str)> {
    match record.turns.as_slice() {
        [u, a] if u.role == Role::User && a.role == Role::Assistant => {
            Some((u.content.as_str(), a.content.as_str()))
        }
        _ => None,
    }
}

/// The record `index` of `task` composed with template `template`; `partner` is the second
/// record of a chain. `None` when the record is not a single exchange.
pub fn compose(
    record: &Record,
    template: &StepTemplate,
    template_index: usize,
    partner: Option<&Record>,
) -> Option<Composed> {
    let (request, answer) = exchange(record)?;
    let (request_b, answer_b) = match partner {
        Some(p) => exchange(p)?,
        None if template.is_chain() => return None,
        None => ("", ""),
    };
    let values = StepValues {
        request: request.to_string(),
        answer: answer.to_string(),
        request_b: request_b.to_string(),
        answer_b: answer_b.to_string(),
    };
    Some(Composed {
        record: Record {
            system: record.system.clone(),
            turns: vec![
                Turn::new(Role::User, render(&template.instruction, &values)),
                Turn::new(Role::Assistant, render(&template.answer, &values)),
            ],
            origin: record.origin,
            score: record.score,
        },
        template: template_index,
        parts: expected_parts(&template.answer, &values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::Origin;

    fn rec(q: &str, a: &str, line: u64) -> Record {
        Record {
            system: None,
            turns: vec![Turn::new(Role::User, q), Turn::new(Role::Assistant, a)],
            origin: Origin { source: 0, line },
            score: None,
        }
    }

    #[test]
    fn default_templates_are_valid_and_bad_ones_are_named() {
        for t in default_templates() {
            t.validate().unwrap();
        }
        let mut t = default_templates()[0].clone();
        t.answer = "{answer} {answr}".into();
        let err = t.validate().unwrap_err();
        assert!(err.contains("'repeat'") && err.contains("{answr}"), "{err}");
        t.answer = "no slot".into();
        assert!(t.validate().unwrap_err().contains("{answer}"));
        let mut chain = default_templates()[3].clone();
        chain.answer = "{answer}".into();
        assert!(chain.validate().unwrap_err().contains("chain"));
        // A brace that opens no placeholder is literal text.
        let json = StepTemplate::new("json", "{request} as {\"k\": 1}", "{answer} {x-y}");
        json.validate().unwrap();
        assert_eq!(
            render(
                &json.answer,
                &StepValues {
                    answer: "7".into(),
                    ..Default::default()
                }
            ),
            "7 {x-y}"
        );
    }

    #[test]
    fn every_template_passes_its_own_reference_and_fails_when_a_step_is_skipped() {
        let record = rec("What is 2 plus 2?", "2 + 2 = 4\n#### 4", 1);
        let partner = rec("print(len('abc'))", "3", 1);
        for (i, t) in default_templates().iter().enumerate() {
            let c = compose(&record, t, i, t.is_chain().then_some(&partner)).unwrap();
            let reference = &c.record.turns[1].content;
            assert!(
                every_step_done(reference, &c.parts),
                "{}: {reference}",
                t.name
            );
            // Extra words around the answer do not matter; white space neither.
            assert!(every_step_done(
                &format!("Sure.\n{}\n  Done.", reference.replace('\n', "\n\n")),
                &c.parts
            ));
            // The plain answer alone skips the chained step.
            assert!(
                !every_step_done("2 + 2 = 4\n#### 4", &c.parts),
                "{}",
                t.name
            );
            // Steps in the wrong order fail too.
            let lines: Vec<&str> = reference.lines().collect();
            let swapped = format!("{}\n{}", lines[1..].join("\n"), lines[0]);
            assert!(
                !every_step_done(&swapped, &c.parts),
                "{}: {swapped}",
                t.name
            );
        }
        let upper = compose(&record, &default_templates()[2], 2, None).unwrap();
        assert_eq!(
            upper.record.turns[1].content,
            "2 + 2 = 4\n#### 4\nIn upper case: 2 + 2 = 4\n#### 4"
        );
        let words = compose(&record, &default_templates()[1], 1, None).unwrap();
        assert!(words.record.turns[1].content.starts_with("Words: 5\n"));
        let chain = compose(&record, &default_templates()[3], 3, Some(&partner)).unwrap();
        assert_eq!(
            chain.record.turns[0].content,
            "Do two things, in order.\nFirst: What is 2 plus 2?\nThen: print(len('abc'))"
        );
        assert!(!every_step_done(
            "First: 2 + 2 = 4 #### 4 Then: 4",
            &chain.parts
        ));
        // A chain needs its second record; multi-turn records are never composed.
        assert!(compose(&record, &default_templates()[3], 3, None).is_none());
        let mut long = record.clone();
        long.turns.extend(record.turns.clone());
        assert!(compose(&long, &default_templates()[0], 0, None).is_none());
    }
}
