//! Writing a model as a Hugging Face folder that Python `transformers` loads: `config.json`,
//! `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` with the chat template; and
//! LoRA adapters as a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;

use candle_core::{Tensor, Var};

use crate::core::train_settings::LoraSettings;
use serde_json::json;
use tokenizers::Tokenizer;

use crate::core::fsutil::write_atomic;
use crate::train::config::ModelConfig;
use crate::train::load::load_hf_folder;

/// Writes an HF model folder: config, weights, tokenizer and its config with the chat template.
pub fn save_model_folder(
    dir: &Path,
    config: &ModelConfig,
    weights: &[(String, Tensor)],
    tokenizer: &Tokenizer,
    chat_template: &str,
    bos: &str,
    eos: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut hf = serde_json::to_value(config)?;
    // Rotary scaling under the key transformers reads (`rope_scaling`; transformers 5 turns it
    // into `rope_parameters`), not under our own field name.
    if let Some(map) = hf.as_object_mut() {
        map.remove("llama3_rope");
    }
    if let Some(r) = &config.llama3_rope {
        hf["rope_scaling"] = json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            // transformers wants a whole number here.
            "original_max_position_embeddings": r.original_max_position_embeddings.round() as u64,
        });
    }
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
    let mut tok_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "chat_template": chat_template,
        "model_max_length": config.max_position_embeddings,
    });
    if !bos.is_empty() {
        // Templates that open with `{{ bos_token }}` need it; plain text gets a BOS only where
        // tokenizer.json's post-processor adds one, as before.
        tok_config["bos_token"] = json!(bos);
    }
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_config)?.as_bytes(),
    )?;
    Ok(())
}

/// [`save_model_folder`] as one atomic step: a kill while it writes leaves the folder that was
/// there before whole, or the new one (see [`crate::core::fsutil::write_dir_atomic`]). For
/// folders the studio owns (a run's `model/` and `base/`), since other files in `dir` go.
pub fn save_model_folder_atomic(
    dir: &Path,
    config: &ModelConfig,
    weights: &[(String, Tensor)],
    tokenizer: &Tokenizer,
    chat_template: &str,
    bos: &str,
    eos: &str,
) -> anyhow::Result<()> {
    crate::core::fsutil::write_dir_atomic(dir, |tmp| {
        save_model_folder(tmp, config, weights, tokenizer, chat_template, bos, eos)
    })
    .with_context(|| format!("writing {}", dir.display()))
}

/// [`save_peft_adapter`] as one atomic step, for a run's own `adapter/` folder.
pub fn save_peft_adapter_atomic(
    dir: &Path,
    adapters: &[(String, Tensor)],
    settings: &LoraSettings,
    base_model: &str,
) -> anyhow::Result<()> {
    crate::core::fsutil::write_dir_atomic(dir, |tmp| {
        save_peft_adapter(tmp, adapters, settings, base_model)
    })
    .with_context(|| format!("writing {}", dir.display()))
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

const MODEL_FILES: [&str; 4] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Copies `files` from `from` to `to`, each through a temporary file and a rename.
fn copy_files(from: &Path, to: &Path, files: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for f in files {
        let src = from.join(f);
        let tmp = to.join(format!(".{f}.tmp"));
        std::fs::copy(&src, &tmp).with_context(|| format!("copying {}", src.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to.join(f))?;
    }
    Ok(())
}

/// The model card: what the folder holds and how to load it with Python.
fn readme(run: &Path, adapter: bool) -> String {
    let mut text = format!(
        "# Model exported by MoI Studio\n\nFrom run `{}`.\n\n```python\n\
         from transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         tok = AutoTokenizer.from_pretrained(\"PATH\")\n\
         model = AutoModelForCausalLM.from_pretrained(\"PATH\")\n\
         messages = [{{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}},\n\
         \x20           {{\"role\": \"user\", \"content\": \"What is 2 + 3?\"}}]\n\
         ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")\n\
         out = model.generate(ids, max_new_tokens=64, do_sample=False)\n\
         print(tok.decode(out[0, ids.shape[-1]:], skip_special_tokens=True))\n```\n",
        run.display()
    );
    if adapter {
        text.push_str(
            "\n`adapter/` holds the LoRA adapter alone (the model above has it merged). Load it on \
             the base model with PEFT:\n\n```python\nfrom peft import PeftModel\n\
             model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"BASE\"), \
             \"PATH/adapter\")\n```\n",
        );
    }
    text
}

/// A run folder without a finished model.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} has no finished model ({} is missing); a run writes model/ when it finishes or is stopped",
    run.display(),
    missing.display()
)]
pub struct NoModel {
    /// The run folder.
    pub run: PathBuf,
    /// The first file not found.
    pub missing: PathBuf,
}

/// Copies a run's model to `out` as a Hugging Face folder with a model card, and its PEFT
/// adapter (LoRA runs) to `out/adapter`. Returns whether there was an adapter.
pub fn export_run(run: &Path, out: &Path) -> anyhow::Result<bool> {
    let model = run.join("model");
    if let Some(missing) = MODEL_FILES.iter().find(|f| !model.join(f).is_file()) {
        return Err(NoModel {
            run: run.to_path_buf(),
            missing: model.join(missing),
        }
        .into());
    }
    // Refuse to copy something that does not load.
    load_hf_folder(&model, &Device::Cpu)
        .with_context(|| format!("checking {}", model.display()))?;
    copy_files(&model, out, &MODEL_FILES)?;
    let adapter = run.join("adapter");
    let has_adapter = ADAPTER_FILES.iter().all(|f| adapter.join(f).is_file());
    if has_adapter {
        copy_files(&adapter, &out.join("adapter"), &ADAPTER_FILES)?;
        // A base the run wrote (built-in or GGUF model) goes along, and the adapter points at
        // the copy, so the export does not depend on the run folder.
        let base = run.join("base");
        if MODEL_FILES.iter().all(|f| base.join(f).is_file()) {
            let out_base = out.join("base");
            copy_files(&base, &out_base, &MODEL_FILES)?;
            let config_path = out.join("adapter").join("adapter_config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&config_path)?)?;
            let abs = std::path::absolute(&out_base).unwrap_or(out_base);
            config["base_model_name_or_path"] = json!(abs.display().to_string());
            write_atomic(
                &config_path,
                serde_json::to_string_pretty(&config)?.as_bytes(),
            )?;
        }
    }
    write_atomic(&out.join("README.md"), readme(run, has_adapter).as_bytes())?;
    Ok(has_adapter)
}
