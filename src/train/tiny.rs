//! The built-in tiny model, so a laptop can train in minutes: a byte-level BPE tokenizer trained
//! on the project's own text and a small Llama-style decoder (`presets/tiny_model.json`) with
//! seeded random weights, written as a Hugging Face model folder.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use tokenizers::Tokenizer;

use crate::core::bpe::{SPECIAL_TOKENS, train_bpe};
use crate::core::train_settings::TinySize;
use crate::train::config::ModelConfig;
use crate::train::export::{CHATML_JINJA, save_model_folder, tensors_of};
use crate::train::model::{init_weights, named_vars};

const TINY_PRESET: &str = include_str!("../../presets/tiny_model.json");

/// The tiny model's configuration for a tokenizer of `vocab_size` tokens.
pub fn tiny_config(vocab_size: usize) -> anyhow::Result<ModelConfig> {
    tiny_config_sized(vocab_size, TinySize::default())
}

/// The tiny model's configuration with a project's size overrides.
pub fn tiny_config_sized(vocab_size: usize, size: TinySize) -> anyhow::Result<ModelConfig> {
    let mut config: ModelConfig = serde_json::from_str(TINY_PRESET)
        .context("presets/tiny_model.json is not a model config")?;
    if let Some(h) = size.hidden_size {
        if h == 0 || !h.is_multiple_of(8) {
            anyhow::bail!("training.tiny.hidden_size must be a positive multiple of 8, not {h}");
        }
        config.hidden_size = h;
        // The preset's MLP ratio (688 / 256), rounded to a multiple of 8.
        config.intermediate_size = (h * 43 / 16).div_ceil(8) * 8;
    }
    if let Some(l) = size.layers {
        if l == 0 {
            anyhow::bail!("training.tiny.layers must be at least 1");
        }
        config.num_hidden_layers = l;
    }
    config.vocab_size = vocab_size;
    config.eos_token_id = Some(serde_json::Value::from(2));
    config.check().map_err(anyhow::Error::msg)?;
    Ok(config)
}

/// Trains the tokenizer on `texts`, builds the tiny model with `seed`, and writes `config.json`,
/// `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` into `dir`.
pub fn create_tiny_model(
    texts: impl Iterator<Item = String> + Send,
    vocab_size: usize,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<(ModelConfig, Tokenizer)> {
    let tokenizer = train_bpe(texts, vocab_size).map_err(anyhow::Error::msg)?;
    let config = tiny_config(tokenizer.get_vocab_size(true))?;
    let weights = init_weights(&config, seed, &Device::Cpu)?;
    save_model_folder(
        dir,
        &config,
        &tensors_of(&named_vars(&weights)),
        &tokenizer,
        CHATML_JINJA,
        "",
        SPECIAL_TOKENS[2],
    )?;
    Ok((config, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::Role;
    use crate::core::template::{ChatMessage, ChatTemplate};
    use crate::train::score::load_bundle;

    #[test]
    fn tiny_model_folder_loads_back_with_its_tokenizer_and_template() {
        let dir = tempfile::tempdir().unwrap();
        let texts =
            (0..200).map(|i| format!("Question {i}: what is {i} plus {i}? Answer: {}.", 2 * i));
        let (config, _) = create_tiny_model(texts, 600, 7, dir.path()).unwrap();
        assert!(config.vocab_size <= 600);
        assert_eq!((config.hidden_size, config.num_hidden_layers), (256, 4));
        let bundle = load_bundle(dir.path(), &Device::Cpu).unwrap();
        let ids = bundle
            .encode("<|im_start|>user\nwhat is 3 plus 3?<|im_end|>")
            .unwrap();
        assert_eq!(ids[0], 1, "ChatML specials are single tokens");
        let template =
            ChatTemplate::from_source(bundle.chat_template.as_deref().unwrap(), "", "<|im_end|>")
                .unwrap();
        let text = template
            .render(&[ChatMessage::new(Role::User, "hi")], true)
            .unwrap();
        assert_eq!(
            text,
            ChatTemplate::chatml()
                .render(&[ChatMessage::new(Role::User, "hi")], true)
                .unwrap()
        );
        // Parameters: a few million.
        let params: usize = bundle
            .loaded
            .weights
            .all_vars()
            .iter()
            .map(|v| v.elem_count())
            .sum();
        assert!(
            (2_000_000..6_000_000).contains(&params),
            "{params} parameters"
        );
        // Same seed, same weights.
        let dir2 = tempfile::tempdir().unwrap();
        let texts =
            (0..200).map(|i| format!("Question {i}: what is {i} plus {i}? Answer: {}.", 2 * i));
        create_tiny_model(texts, 600, 7, dir2.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("model.safetensors")).unwrap(),
            std::fs::read(dir2.path().join("model.safetensors")).unwrap()
        );
    }
}
