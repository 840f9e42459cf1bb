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

/// Every family's real template (`scripts/render_golden_templates.py`): our rendering equals
/// Python jinja2's byte for byte, and the spans we train are exactly the assistant turns with
/// their end-of-turn markers — every turn of a multi-turn conversation, nothing after the last
/// one, nothing of system or user turns.
#[test]
fn real_templates_render_like_jinja2_and_train_exactly_the_assistant_turns() {
    let mut families = 0;
    let mut checked_spans = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("_golden.json"))
        .collect();
    entries.sort();
    for path in entries {
        let golden: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let family = golden["family"].as_str().unwrap().to_string();
        if golden["has_chat_template"] == false {
            continue;
        }
        let template = ChatTemplate::from_tokenizer_config(
            &dir().join(format!("{family}_tokenizer_config.json")),
        )
        .unwrap_or_else(|e| panic!("{family}: {e}"));
        families += 1;
        for case in golden["cases"].as_array().unwrap() {
            let name = format!("{family}/{}", case["name"].as_str().unwrap());
            let generation = case["add_generation_prompt"].as_bool().unwrap_or(false);
            let got = template
                .render_json(&case["messages"], case.get("tools"), generation)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, case["rendered"].as_str().unwrap(), "{name}");
            // Spans are for plain conversations (the records we import); tool calls given as
            // structured fields are not.
            let messages = case["messages"].as_array().unwrap();
            if generation || messages.iter().any(|m| m.get("tool_calls").is_some()) {
                continue;
            }
            let messages: Vec<ChatMessage> = messages
                .iter()
                .map(|m| ChatMessage {
                    role: m["role"].as_str().unwrap().to_string(),
                    content: m["content"].as_str().unwrap().to_string(),
                })
                .collect();
            let r = template
                .render_with_spans(&messages)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let trained: Vec<&str> = r.assistant_ranges().map(|s| &r.text[s]).collect();
            let want: Vec<&str> = case["trained"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(trained, want, "{name}");
            checked_spans += 1;
        }
    }
    assert!(families >= 5, "only {families} families with templates");
    assert!(checked_spans >= 20, "only {checked_spans} span checks");
}

/// Tokenized through a real tokenizer, the trained tokens decode to exactly the assistant turns
/// (a template's text after the last turn, here Llama 3's header, stays untrained).
#[test]
fn labels_on_a_real_template_cover_each_answer_and_its_marker() {
    use moi_studio::core::tokenize::{LabelOptions, tokenize_messages};
    let template =
        ChatTemplate::from_tokenizer_config(&dir().join("llama3_tokenizer_config.json")).unwrap();
    let tokenizer = moi_studio::core::bpe::train_bpe(
        ["What is 2 + 2? 4 And doubled? 8 You are a helpful assistant.".to_string()].into_iter(),
        400,
    )
    .unwrap();
    let mut tokenizer = tokenizer;
    tokenizer
        .add_special_tokens([
            tokenizers::AddedToken::from("<|begin_of_text|>", true),
            tokenizers::AddedToken::from("<|start_header_id|>", true),
            tokenizers::AddedToken::from("<|end_header_id|>", true),
            tokenizers::AddedToken::from("<|eot_id|>", true),
        ])
        .unwrap();
    let messages = [
        ChatMessage::new(Role::System, "You are a helpful assistant."),
        ChatMessage::new(Role::User, "What is 2 + 2?"),
        ChatMessage::new(Role::Assistant, "4"),
        ChatMessage::new(Role::User, "And doubled?"),
        ChatMessage::new(Role::Assistant, "8"),
    ];
    let s = tokenize_messages(&tokenizer, &template, &messages, LabelOptions::default()).unwrap();
    let mut runs: Vec<String> = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for (&id, &label) in s.input_ids.iter().zip(&s.labels) {
        if label >= 0 {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(tokenizer.decode(&current, false).unwrap());
            current.clear();
        }
    }
    if !current.is_empty() {
        runs.push(tokenizer.decode(&current, false).unwrap());
    }
    assert_eq!(runs, ["4<|eot_id|>", "8<|eot_id|>"]);
    assert!(
        s.labels.last() == Some(&-100),
        "the header after the last turn is not trained"
    );
}
