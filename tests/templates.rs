//! The real Qwen3 chat template, rendered by us, against what Python's jinja2 renders.
//! Expected strings come from `scripts/render_golden_templates.py`.

use std::path::PathBuf;

use moi_studio::core::record::Role;
use moi_studio::core::template::{ChatMessage, ChatTemplate};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/templates")
}

#[test]
fn qwen3_template_matches_python_jinja2_byte_for_byte() {
    let template = ChatTemplate::from_tokenizer_config(&dir().join("qwen3_tokenizer_config.json"))
        .expect("the Qwen3 template compiles");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("qwen3_expected.json")).unwrap())
            .unwrap();
    let cases = cases.as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let got = template
            .render_json(
                &case["messages"],
                case.get("tools"),
                case["add_generation_prompt"].as_bool().unwrap_or(false),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, case["expected"].as_str().unwrap(), "case {name}");
    }
    assert_eq!(template.end_of_turn, "<|im_end|>");
}

#[test]
fn qwen3_spans_train_the_answer_and_its_end_marker() {
    let template =
        ChatTemplate::from_tokenizer_config(&dir().join("qwen3_tokenizer_config.json")).unwrap();
    let messages = [
        ChatMessage::new(Role::System, "You are a programmer."),
        ChatMessage::new(Role::User, "Add."),
        ChatMessage::new(Role::Assistant, "def add(a, b):\n    return a + b"),
    ];
    let r = template.render_with_spans(&messages).unwrap();
    let trained: Vec<&str> = r.assistant_ranges().map(|s| &r.text[s]).collect();
    assert_eq!(trained, ["def add(a, b):\n    return a + b<|im_end|>"]);
}
