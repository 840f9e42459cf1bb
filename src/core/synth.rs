//! A seeded synthetic task suite that mirrors the MoI paper's four domains — dialogue (under the
//! default prompt), math, code and tool use — small enough for the built-in tiny model to learn
//! on a laptop CPU in minutes, every answer checkable.
//!
//! Each generator draws the facts, numbers and names from the seed and words the request in one
//! of several phrasings, so a model has to learn the skill rather than memorise strings.

use std::fmt::Write as _;
use std::path::Path;

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::core::eval::AnswerCheck;

/// One of the suite's tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthTask {
    /// Short questions with one right answer (trained under the default prompt).
    General,
    /// Arithmetic word problems: a worked line, then `#### N`.
    Math,
    /// What a tiny list or string program prints.
    Code,
    /// A request and a list of functions → one JSON call.
    ToolUse,
}

impl SynthTask {
    /// Every task, in the order the project lists them.
    pub const ALL: [SynthTask; 4] = [Self::General, Self::Math, Self::Code, Self::ToolUse];

    /// The task's name in the project.
    pub fn name(self) -> &'static str {
        match self {
            Self::General => "general",
            Self::Math => "math",
            Self::Code => "code",
            Self::ToolUse => "tool use",
        }
    }

    /// The data file's name.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::General => "general.jsonl",
            Self::Math => "math.jsonl",
            Self::Code => "code.jsonl",
            Self::ToolUse => "tool_use.jsonl",
        }
    }

    /// The task's own system prompt: the default prompt for the dialogue-like task, as in the
    /// paper.
    pub fn system_prompt(self) -> &'static str {
        match self {
            Self::General => crate::core::project::DEFAULT_SYSTEM_PROMPT,
            Self::Math => "You are a mathematician.",
            Self::Code => "You are a programmer.",
            Self::ToolUse => "You are an assistant that calls functions.",
        }
    }

    /// How an answer is checked.
    pub fn check(self) -> AnswerCheck {
        match self {
            Self::General | Self::Code => AnswerCheck::Exact,
            Self::Math => AnswerCheck::Math,
            Self::ToolUse => AnswerCheck::Tool,
        }
    }

    /// Generation budget for evaluation: the longest answer the task has, with room.
    pub fn max_new_tokens(self) -> usize {
        match self {
            Self::General => 12,
            Self::Math => 24,
            Self::Code => 32,
            Self::ToolUse => 48,
        }
    }

    /// The task's size relative to the largest (general): real instruction mixes are uneven,
    /// which is what balanced sampling is for.
    pub fn share(self) -> f64 {
        match self {
            Self::General => 1.0,
            Self::Math | Self::Code => 0.5,
            Self::ToolUse => 0.25,
        }
    }

    /// Records of this task in a suite whose largest task has `records`.
    pub fn records_in(self, records: usize) -> usize {
        ((records as f64 * self.share()).round() as usize).max(1)
    }

    /// One record: the user's request and the right answer.
    pub fn record(self, rng: &mut ChaCha8Rng) -> (String, String) {
        match self {
            Self::General => general(rng),
            Self::Math => math(rng),
            Self::Code => code(rng),
            Self::ToolUse => tool_use(rng),
        }
    }
}

/// `records` records of `task`, from `seed` (each task has its own stream).
pub fn generate(task: SynthTask, seed: u64, records: usize) -> Vec<(String, String)> {
    let salt = match task {
        SynthTask::General => 0x67656e,
        SynthTask::Math => 0x6d6174,
        SynthTask::Code => 0x636f64,
        SynthTask::ToolUse => 0x746f6f,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    (0..records).map(|_| task.record(&mut rng)).collect()
}

/// Writes the suite into `dir`: one alpaca JSONL file per task (the largest with `records`
/// records, the others by [`SynthTask::share`]) and `synth.moi.toml`, a project that opens them
/// with the tiny model's settings. Returns the project file's path.
pub fn write_suite(dir: &Path, seed: u64, records: usize) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    for task in SynthTask::ALL {
        let mut text = String::new();
        for (instruction, output) in generate(task, seed, task.records_in(records)) {
            let line = json!({ "instruction": instruction, "output": output });
            let _ = writeln!(text, "{line}");
        }
        crate::core::fsutil::write_atomic(&dir.join(task.file_name()), text.as_bytes())?;
    }
    let project = dir.join("synth.moi.toml");
    crate::core::fsutil::write_atomic(&project, project_toml(seed, "").as_bytes())?;
    Ok(project)
}

/// The project file of the suite, its data under `data_prefix` (relative to the project file).
pub fn project_toml(seed: u64, data_prefix: &str) -> String {
    let mut out = format!(
        "# The synthetic MoI suite (`moi-studio synth --seed {seed}`): the paper's four domains as \
         tasks the\n\
         # built-in tiny model learns on a laptop CPU, each with its own system prompt and a \
         checkable answer.\n\
         # Paths are relative to this file.\n\n\
         format_version = 1\n\
         name = \"Demo: synthetic MoI suite\"\n\
         default_system_prompt = \"{}\"\n\
         seed = {seed}\n\n",
        crate::core::project::DEFAULT_SYSTEM_PROMPT
    );
    out.push_str(SUITE_SETTINGS);
    for task in SynthTask::ALL {
        let _ = writeln!(
            out,
            "\n[[tasks]]\nname = \"{}\"\nsystem_prompt = \"{}\"\nsystem_rule = \"replace\"\n\
             weight = 1.0\neval_fraction = 0.1\nanswer_check = \"{}\"\nmax_new_tokens = {}\n\n\
             [[tasks.sources]]\npath = \"{data_prefix}{}\"\nformat = \"alpaca\"",
            task.name(),
            task.system_prompt(),
            task.check().label(),
            task.max_new_tokens(),
            task.file_name()
        );
    }
    out
}

/// The suite's mixing, packing and training settings: what gets the tiny model past 50 % exact
/// match on two tasks within minutes (see BENCHMARKS.md).
const SUITE_SETTINGS: &str = "\
[mixing]
strategy = \"balanced\"           # the tasks are uneven (general 4 : math 2 : code 2 : tool use 1)
epochs = 2
template = \"chatml\"

[packing]
mode = \"moi\"
max_seq_len = 512
attention = \"chunk\"

[training]
batch_rows = 2
lr = 4e-3
warmup_steps = 20
decay = \"cosine\"
loss_norm = \"sample_mean\"        # every answer counts alike: one-word answers are not starved
eval_every_steps = 100
eval_items = 24
eval_generate = 24
checkpoint_every = 100

[training.adamw]
beta2 = 0.95

[training.tiny]
hidden_size = 128                 # half the preset's width: twice the steps per minute
";

// ---- general: short questions with one right answer ----

const OPPOSITES: [(&str, &str); 24] = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("open", "closed"),
    ("light", "dark"),
    ("happy", "sad"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("old", "new"),
    ("wet", "dry"),
    ("high", "low"),
    ("loud", "quiet"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("win", "lose"),
    ("left", "right"),
    ("push", "pull"),
    ("first", "last"),
    ("near", "far"),
    ("clean", "dirty"),
];

const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    // The slices here are constants and never empty.
    items.choose(rng).unwrap_or(&items[0])
}

fn general(rng: &mut ChaCha8Rng) -> (String, String) {
    match rng.random_range(0..5) {
        0 => {
            let (a, b) = *pick(rng, &OPPOSITES);
            let (word, answer) = if rng.random_bool(0.5) { (a, b) } else { (b, a) };
            let ask = *pick(
                rng,
                &[
                    "What is the opposite of {w}?",
                    "Give the opposite of \"{w}\".",
                    "Which word means the opposite of {w}?",
                ],
            );
            (ask.replace("{w}", word), answer.to_string())
        }
        1 => {
            let i = rng.random_range(0..DAYS.len());
            let ask = *pick(
                rng,
                &[
                    "Which day comes after {w}?",
                    "What day follows {w}?",
                    "If today is {w}, what day is tomorrow?",
                ],
            );
            (ask.replace("{w}", DAYS[i]), DAYS[(i + 1) % 7].to_string())
        }
        2 => {
            let word = *pick(rng, &WORDS);
            let ask = *pick(
                rng,
                &[
                    "Repeat after me: {w}.",
                    "Say the word \"{w}\".",
                    "Echo this word: {w}",
                ],
            );
            (ask.replace("{w}", word), word.to_string())
        }
        3 => {
            let name = *pick(rng, &NAMES);
            let city = *pick(rng, &CITIES);
            let (story, ask_city) = match rng.random_range(0..3) {
                0 => (
                    format!("{name} flew to {city} last week."),
                    rng.random_bool(0.5),
                ),
                1 => (
                    format!("Last summer {name} visited {city}."),
                    rng.random_bool(0.5),
                ),
                _ => (format!("{name} lives in {city} now."), rng.random_bool(0.5)),
            };
            if ask_city {
                (format!("{story} Which city is it about?"), city.to_string())
            } else {
                (format!("{story} Who is it about?"), name.to_string())
            }
        }
        _ => {
            let n = rng.random_range(3..6);
            let words: Vec<&str> = (0..n).map(|_| *pick(rng, &WORDS)).collect();
            let sentence = words.join(" ");
            let first = rng.random_bool(0.5);
            let ask = if first {
                *pick(
                    rng,
                    &[
                        "What is the first word of \"{s}\"?",
                        "Which word comes first in \"{s}\"?",
                    ],
                )
            } else {
                *pick(
                    rng,
                    &[
                        "What is the last word of \"{s}\"?",
                        "Which word comes last in \"{s}\"?",
                    ],
                )
            };
            let answer = if first { words[0] } else { words[n - 1] };
            (ask.replace("{s}", &sentence), answer.to_string())
        }
    }
}

// ---- math: arithmetic word problems ----

const NAMES: [&str; 16] = [
    "Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jack", "Kim", "Leo", "Mia",
    "Noah", "Omar", "Pia",
];

const THINGS: [&str; 12] = [
    "apples", "books", "coins", "marbles", "stickers", "pencils", "cards", "shells", "stamps",
    "cookies", "balloons", "shirts",
];

fn math(rng: &mut ChaCha8Rng) -> (String, String) {
    let name = *pick(rng, &NAMES);
    let thing = *pick(rng, &THINGS);
    let (question, line, answer) = match rng.random_range(0..3) {
        0 => {
            let a = rng.random_range(10..90u32);
            let b = rng.random_range(10..90u32);
            let ask = *pick(
                rng,
                &[
                    "{n} has {a} {t}. {n} gets {b} more. How many {t} does {n} have now?",
                    "{n} had {a} {t} and bought {b} more. How many {t} are there in all?",
                    "There are {a} {t} in one box and {b} in another. How many {t} are there altogether?",
                ],
            );
            (
                ask.replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string()),
                format!("{a} + {b} = {}", a + b),
                a + b,
            )
        }
        1 => {
            let a = rng.random_range(20..100u32);
            let b = rng.random_range(1..a);
            let ask = *pick(
                rng,
                &[
                    "{n} has {a} {t} and gives away {b}. How many {t} are left?",
                    "{n} had {a} {t}. {b} of them were lost. How many {t} does {n} have now?",
                    "A shelf holds {a} {t}. {n} takes {b}. How many {t} stay on the shelf?",
                ],
            );
            (
                ask.replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string()),
                format!("{a} - {b} = {}", a - b),
                a - b,
            )
        }
        _ => {
            let a = rng.random_range(2..10u32);
            let b = rng.random_range(2..10u32);
            let ask = *pick(
                rng,
                &[
                    "{n} has {a} bags with {b} {t} in each. How many {t} does {n} have?",
                    "There are {a} rows of {b} {t}. How many {t} are there?",
                    "{n} buys {a} packs of {t}, {b} in each pack. How many {t} is that?",
                ],
            );
            (
                ask.replace("{a}", &a.to_string())
                    .replace("{b}", &b.to_string()),
                format!("{a} * {b} = {}", a * b),
                a * b,
            )
        }
    };
    (
        question.replace("{n}", name).replace("{t}", thing),
        format!("{line}\n#### {answer}"),
    )
}

// ---- code: what a tiny program prints ----

const WORDS: [&str; 16] = [
    "red", "sun", "map", "cat", "box", "tea", "pen", "owl", "fig", "jam", "kit", "log", "net",
    "oak", "ray", "zip",
];

/// A Python list literal of `items`.
fn py_list<T: std::fmt::Display>(items: &[T], quote: bool) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|x| {
            if quote {
                format!("'{x}'")
            } else {
                x.to_string()
            }
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn code(rng: &mut ChaCha8Rng) -> (String, String) {
    let var = *pick(rng, &["xs", "nums", "items", "data", "values"]);
    let n = rng.random_range(3..7);
    let (program, output) = if rng.random_bool(0.7) {
        let xs: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let lit = py_list(&xs, false);
        match rng.random_range(0..8) {
            6 => (format!("{var} = {lit}\nprint({var}[0])"), xs[0].to_string()),
            7 => (
                format!("{var} = {lit}\nprint({var}[-1])"),
                xs[xs.len() - 1].to_string(),
            ),
            0 => {
                let mut s = xs.clone();
                s.sort_unstable();
                (
                    format!("{var} = {lit}\nprint(sorted({var}))"),
                    py_list(&s, false),
                )
            }
            1 => {
                let r: Vec<u32> = xs.iter().rev().copied().collect();
                (
                    format!("{var} = {lit}\nprint({var}[::-1])"),
                    py_list(&r, false),
                )
            }
            2 => (
                format!("{var} = {lit}\nprint(len({var}))"),
                xs.len().to_string(),
            ),
            3 => (
                format!("{var} = {lit}\nprint(max({var}))"),
                xs.iter().max().copied().unwrap_or(0).to_string(),
            ),
            4 => (
                format!("{var} = {lit}\nprint(min({var}))"),
                xs.iter().min().copied().unwrap_or(0).to_string(),
            ),
            _ => {
                let k = rng.random_range(0..10u32);
                let f: Vec<u32> = xs.iter().filter(|&&x| x > k).copied().collect();
                (
                    format!("{var} = {lit}\nprint([x for x in {var} if x > {k}])"),
                    py_list(&f, false),
                )
            }
        }
    } else {
        let ws: Vec<&str> = (0..n.min(4)).map(|_| *pick(rng, &WORDS)).collect();
        let lit = py_list(&ws, true);
        if rng.random_bool(0.5) {
            let mut s = ws.clone();
            s.sort_unstable();
            (
                format!("{var} = {lit}\nprint(sorted({var}))"),
                py_list(&s, true),
            )
        } else {
            let w = ws[0];
            (format!("s = '{w}'\nprint(s.upper())"), w.to_uppercase())
        }
    };
    let ask = *pick(
        rng,
        &[
            "What does this program print?",
            "Give the output of this Python code.",
            "Run this in your head and write what it prints.",
        ],
    );
    (format!("{ask}\n```python\n{program}\n```"), output)
}

// ---- tool use: a request and the functions on offer → one JSON call ----

/// A function the assistant may call: its signature line and how a request for it is made.
struct Function {
    name: &'static str,
    signature: &'static str,
    make: fn(&mut ChaCha8Rng) -> (String, serde_json::Value),
}

const CITIES: [&str; 10] = [
    "Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Delhi", "Quito", "Seoul", "Accra",
];

const FUNCTIONS: [Function; 6] = [
    Function {
        name: "get_weather",
        signature: "get_weather(city): the weather in a city",
        make: |rng| {
            let city = *pick(rng, &CITIES);
            let ask = *pick(
                rng,
                &[
                    "What's the weather in {c}?",
                    "Is it raining in {c} today?",
                    "Tell me the forecast for {c}.",
                ],
            );
            (ask.replace("{c}", city), json!({ "city": city }))
        },
    },
    Function {
        name: "set_alarm",
        signature: "set_alarm(hour, minute): sets an alarm",
        make: |rng| {
            let hour = rng.random_range(5..12u32);
            let minute = *pick(rng, &[0u32, 15, 30, 45]);
            let ask = *pick(
                rng,
                &[
                    "Wake me up at {h}:{m:02}.",
                    "Set an alarm for {h}:{m:02}.",
                    "I need an alarm at {h}:{m:02} tomorrow.",
                ],
            );
            (
                ask.replace("{h}", &hour.to_string())
                    .replace("{m:02}", &format!("{minute:02}")),
                json!({ "hour": hour, "minute": minute }),
            )
        },
    },
    Function {
        name: "send_email",
        signature: "send_email(to, subject): emails a person",
        make: |rng| {
            let to = *pick(rng, &NAMES);
            let subject = *pick(
                rng,
                &["lunch", "the report", "the trip", "rent", "the game"],
            );
            let ask = *pick(
                rng,
                &[
                    "Email {p} about {s}.",
                    "Send {p} an email about {s}.",
                    "Write to {p} regarding {s}.",
                ],
            );
            (
                ask.replace("{p}", to).replace("{s}", subject),
                json!({ "to": to, "subject": subject }),
            )
        },
    },
    Function {
        name: "book_table",
        signature: "book_table(city, people): books a restaurant table",
        make: |rng| {
            let city = *pick(rng, &CITIES);
            let people = rng.random_range(2..9u32);
            let ask = *pick(
                rng,
                &[
                    "Book a table for {n} in {c}.",
                    "Reserve dinner for {n} people in {c}.",
                    "We are {n}; find us a table in {c}.",
                ],
            );
            (
                ask.replace("{n}", &people.to_string()).replace("{c}", city),
                json!({ "city": city, "people": people }),
            )
        },
    },
    Function {
        name: "play_music",
        signature: "play_music(genre): plays music",
        make: |rng| {
            let genre = *pick(rng, &["jazz", "rock", "salsa", "blues", "techno", "folk"]);
            let ask = *pick(
                rng,
                &[
                    "Play some {g}.",
                    "Put on {g} music, please.",
                    "I want to hear {g}.",
                ],
            );
            (ask.replace("{g}", genre), json!({ "genre": genre }))
        },
    },
    Function {
        name: "convert_currency",
        signature: "convert_currency(amount, to): converts dollars",
        make: |rng| {
            let amount = rng.random_range(2..100u32);
            let to = *pick(rng, &["EUR", "JPY", "GBP", "INR", "BRL"]);
            let ask = *pick(
                rng,
                &[
                    "How much is {a} dollars in {t}?",
                    "Convert {a} USD to {t}.",
                    "What are {a} dollars worth in {t}?",
                ],
            );
            (
                ask.replace("{a}", &amount.to_string()).replace("{t}", to),
                json!({ "amount": amount, "to": to }),
            )
        },
    },
];

fn tool_use(rng: &mut ChaCha8Rng) -> (String, String) {
    let right = rng.random_range(0..FUNCTIONS.len());
    let (request, arguments) = (FUNCTIONS[right].make)(rng);
    // The right function and two others, in a random order.
    let mut offered: Vec<usize> = (0..FUNCTIONS.len()).filter(|&i| i != right).collect();
    for i in (1..offered.len()).rev() {
        offered.swap(i, rng.random_range(0..=i));
    }
    offered.truncate(2);
    offered.insert(rng.random_range(0..=offered.len()), right);
    let mut prompt = format!("{request}\nFunctions:");
    for i in offered {
        let _ = write!(prompt, "\n- {}", FUNCTIONS[i].signature);
    }
    let call = json!({ "name": FUNCTIONS[right].name, "arguments": arguments });
    (prompt, call.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_suite_and_another_seed_another() {
        for task in SynthTask::ALL {
            let a = generate(task, 7, 50);
            assert_eq!(a, generate(task, 7, 50), "{}", task.name());
            assert_ne!(a, generate(task, 8, 50), "{}", task.name());
        }
    }

    #[test]
    fn every_answer_passes_its_tasks_check_and_a_wrong_one_fails() {
        for task in SynthTask::ALL {
            let records = generate(task, 1, 400);
            for (q, a) in &records {
                assert_eq!(
                    task.check().passes(a, a),
                    Some(true),
                    "{}: {q:?} → {a:?}",
                    task.name()
                );
            }
            // Answers differ between records, and the check tells them apart.
            let wrong = records
                .iter()
                .filter(|(_, a)| task.check().passes(a, &records[0].1) == Some(false))
                .count();
            assert!(wrong > 200, "{}: only {wrong} answers differ", task.name());
        }
    }

    #[test]
    fn answers_are_right() {
        for (q, a) in generate(SynthTask::Math, 3, 300) {
            let line = a.lines().next().unwrap();
            let mut parts = line.split_whitespace();
            let x: i64 = parts.next().unwrap().parse().unwrap();
            let op = parts.next().unwrap();
            let y: i64 = parts.next().unwrap().parse().unwrap();
            let want = match op {
                "+" => x + y,
                "-" => x - y,
                "*" => x * y,
                _ => panic!("{op}"),
            };
            assert!(a.ends_with(&format!("#### {want}")), "{q} → {a}");
            assert!(
                q.contains(&x.to_string()) && q.contains(&y.to_string()),
                "{q}"
            );
        }
        for (q, a) in generate(SynthTask::ToolUse, 3, 300) {
            let call = crate::core::eval::tool_call(&a).expect("a call");
            assert!(
                q.contains(&format!("- {}(", call.name)),
                "{q} offers {}",
                call.name
            );
            assert_eq!(q.matches("\n- ").count(), 3, "{q}");
        }
        for (q, a) in generate(SynthTask::Code, 3, 300) {
            if q.contains("sorted(") && !a.contains('\'') {
                let nums: Vec<u32> = a
                    .trim_matches(['[', ']'])
                    .split(", ")
                    .map(|x| x.parse().unwrap())
                    .collect();
                assert!(nums.windows(2).all(|w| w[0] <= w[1]), "{q} → {a}");
            }
        }
    }

    #[test]
    fn the_suite_writes_a_project_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_suite(dir.path(), 42, 30).unwrap();
        let project = crate::core::project::Project::load(&path).unwrap();
        assert_eq!(project.tasks.len(), 4);
        assert_eq!(project.tasks[1].system_prompt, "You are a mathematician.");
        let text = std::fs::read_to_string(dir.path().join("math.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 15);
    }
}
