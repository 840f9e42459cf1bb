//! Writing a model as a Hugging Face folder that Python `transformers` loads: `config.json`,
//! `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` with the chat template.

use std::path::Path;

use candle_core::Var;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::core::fsutil::write_atomic;
use crate::train::config::ModelConfig;

/// Writes an HF model folder: config, weights, tokenizer and its config with the chat template.
pub fn save_model_folder(
    dir: &Path,
    config: &ModelConfig,
    weights: &[(String, Var)],
    tokenizer: &Tokenizer,
    chat_template: &str,
    eos: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut hf = serde_json::to_value(config)?;
    hf["architectures"] = json!([match config.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    }]);
    hf["torch_dtype"] = json!("float32");
    hf["hidden_act"] = json!("silu");
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&hf)?.as_bytes(),
    )?;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let tmp = dir.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    crate::core::fsutil::set_readable(&tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    let tok = tokenizer
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
    let tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "chat_template": chat_template,
        "model_max_length": config.max_position_embeddings,
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_config)?.as_bytes(),
    )?;
    Ok(())
}

/// ChatML as Jinja, for models that carry no template of their own.
pub const CHATML_JINJA: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
