//! Writing a model as a Hugging Face folder that Python `transformers` loads: `config.json`,
//! `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` with the chat template; and
//! LoRA adapters as a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).

use std::path::Path;

use candle_core::{Tensor, Var};

use crate::core::train_settings::LoraSettings;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::core::fsutil::write_atomic;
use crate::train::config::ModelConfig;

/// Writes an HF model folder: config, weights, tokenizer and its config with the chat template.
pub fn save_model_folder(
    dir: &Path,
    config: &ModelConfig,
    weights: &[(String, Tensor)],
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
    save_safetensors(&dir.join("model.safetensors"), weights)?;
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

/// The tensors of named variables.
pub fn tensors_of(vars: &[(String, Var)]) -> Vec<(String, Tensor)> {
    vars.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Saves tensors as a safetensors file atomically (temp file, fsync, rename).
fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> anyhow::Result<()> {
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    crate::core::fsutil::set_readable(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The name PEFT gives an adapter tensor of a causal LM: `base_model.model.` + the HF name.
pub fn peft_name(name: &str) -> String {
    format!("base_model.model.{name}")
}

/// Writes LoRA adapters as a PEFT folder: `adapter_config.json` and `adapter_model.safetensors`
/// with PEFT's tensor names, loadable with `PeftModel.from_pretrained(base, dir)`.
pub fn save_peft_adapter(
    dir: &Path,
    adapters: &[(String, Tensor)],
    settings: &LoraSettings,
    base_model: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let renamed: Vec<(String, Tensor)> = adapters
        .iter()
        .map(|(k, t)| (peft_name(k), t.clone()))
        .collect();
    save_safetensors(&dir.join("adapter_model.safetensors"), &renamed)?;
    let targets: Vec<&str> = settings.targets.iter().map(|t| t.module()).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "use_rslora": false,
        "use_dora": false,
    });
    write_atomic(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(())
}
