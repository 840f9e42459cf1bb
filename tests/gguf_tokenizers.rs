//! GGUF files with the tokenizers of Llama 3 (`llama-bpe`), Qwen2/3 (`qwen2`) and Llama 2 /
//! Mistral (SentencePiece `llama`): the tokenizer we rebuild from the metadata must tokenize
//! exactly as the same model's `tokenizer.json` does. The tiny GGUFs carry the real
//! vocabularies and are made by llama.cpp's own `gguf` package (`scripts/make_gguf_fixtures.py`,
//! run by `scripts/fetch_models.sh`).

use std::path::PathBuf;

use candle_core::Device;
use moi_studio::train::score::load_bundle;
use tokenizers::Tokenizer;

mod common;
use common::{fetched, root};

fn fixture(family: &str) -> PathBuf {
    fetched(&format!(".cache/gguf/{family}.gguf"))
}

/// Our GGUF tokenizer against tokenizer.json on the fixture's sentences and on chat markup.
fn same_tokens(family: &str, markup: &str) {
    let bundle =
        load_bundle(&fixture(family), &Device::Cpu).unwrap_or_else(|e| panic!("{family}: {e:#}"));
    let reference =
        Tokenizer::from_file(root().join(format!(".cache/tokenizers/{family}/tokenizer.json")))
            .unwrap();
    let sentences: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(root().join(format!(".cache/gguf/{family}.expected.json")))
            .unwrap(),
    )
    .unwrap();
    let mut texts = sentences;
    texts.push(markup.to_string());
    for text in &texts {
        let ours = bundle.tokenizer.encode(text.as_str(), false).unwrap();
        let theirs = reference.encode(text.as_str(), false).unwrap();
        assert_eq!(ours.get_ids(), theirs.get_ids(), "{family}: {text:?}");
        // With special tokens: BOS exactly where the model's tokenizer puts one.
        let theirs = reference.encode(text.as_str(), true).unwrap();
        assert_eq!(
            bundle.encode(text).unwrap(),
            theirs.get_ids(),
            "{family} with BOS: {text:?}"
        );
        assert_eq!(
            bundle.tokenizer.decode(ours.get_ids(), false).unwrap(),
            reference.decode(ours.get_ids(), false).unwrap(),
            "{family} decodes: {text:?}"
        );
    }
}

#[test]
fn llama3_bpe_tokenizes_like_its_tokenizer_json() {
    same_tokens(
        "llama3_1",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 12345 + 678?<|eot_id|>",
    );
}

#[test]
fn qwen2_tokenizes_like_its_tokenizer_json() {
    same_tokens(
        "qwen3",
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    );
}

#[test]
fn sentencepiece_llama_tokenizes_like_its_tokenizer_json() {
    same_tokens("llama2", "<s>[INST] What is 12345 + 678? [/INST] 13023</s>");
}

#[test]
fn llama3_rotary_scaling_is_read_from_the_gguf() {
    let bundle = load_bundle(&fixture("llama3_1"), &Device::Cpu).unwrap();
    let rope = bundle
        .loaded
        .config
        .llama3_rope
        .expect("rope_freqs.weight read as Llama 3.1 scaling");
    assert_eq!(rope.factor, 8.0);
    assert_eq!(rope.original_max_position_embeddings, 8192.0);
    assert!(bundle.loaded.config.rope_theta == 500_000.0);
    // A model without the tensor has none.
    let plain = load_bundle(&fixture("qwen3"), &Device::Cpu).unwrap();
    assert!(plain.loaded.config.llama3_rope.is_none());
}

/// Previews read the tokenizer and template a run will use without loading the weights: the
/// same as the loaded model's.
#[test]
fn the_text_side_read_without_weights_is_the_loaded_models() {
    for family in ["llama3_1", "qwen3"] {
        let bundle = load_bundle(&fixture(family), &Device::Cpu).unwrap();
        let (tokenizer, template) =
            moi_studio::train::score::model_text_side(&fixture(family)).unwrap();
        let loaded = bundle.template().unwrap();
        assert_eq!(template.source, loaded.source, "{family}");
        assert_eq!(template.bos_token, loaded.bos_token, "{family}");
        assert_eq!(template.eos_token, loaded.eos_token, "{family}");
        let text = "Hello world, 12345 <|im_end|>";
        assert_eq!(
            tokenizer.encode(text, false).unwrap().get_ids(),
            bundle.tokenizer.encode(text, false).unwrap().get_ids()
        );
    }
}

/// A Hugging Face folder (Llama 3's real tokenizer files) trains with its BOS: the template
/// renders `bos_token`, and the conversation tokenized as the trainer tokenizes it (the rendered
/// text without added special tokens, as transformers' `apply_chat_template`) starts with BOS
/// exactly once.
#[test]
fn a_hugging_face_folder_trains_with_its_bos() {
    use moi_studio::core::record::Role;
    use moi_studio::core::template::ChatMessage;
    use moi_studio::core::tokenize::{LabelOptions, tokenize_messages};
    fixture("llama3_1");
    let folder = root().join(".cache/tokenizers/llama3_1");
    let (tokenizer, template) = moi_studio::train::score::model_text_side(&folder).unwrap();
    assert_eq!(template.bos_token, "<|begin_of_text|>");
    let bos = tokenizer.token_to_id("<|begin_of_text|>").unwrap();
    let messages = [
        ChatMessage::new(Role::System, "You are a helpful assistant."),
        ChatMessage::new(Role::User, "What is 2 + 3?"),
        ChatMessage::new(Role::Assistant, "5"),
    ];
    let sample =
        tokenize_messages(&tokenizer, &template, &messages, LabelOptions::default()).unwrap();
    assert_eq!(sample.input_ids[0], bos);
    assert_eq!(sample.input_ids.iter().filter(|&&id| id == bos).count(), 1);
    // The eval and "try it" prompt: rendered with the generation prompt, BOS first.
    let prompt = template.render(&messages[..2], true).unwrap();
    let ids = tokenizer.encode(prompt.as_str(), false).unwrap();
    assert_eq!(ids.get_ids()[0], bos);
}
