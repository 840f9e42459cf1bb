//! Our decoder against Python transformers: tiny random Qwen2- and Llama-style models made by
//! `scripts/make_golden_models.py`, whose logits must match within 1e-4.

use std::path::PathBuf;

use candle_core::Device;
use moi_studio::train::load::load_hf_folder;
use moi_studio::train::score::decoder_logits;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(name)
}

fn check(name: &str) {
    check_folder(name, &golden(name));
}

/// The model in `model_dir` gives the logits transformers gave for golden model `name`.
fn check_folder(name: &str, model_dir: &std::path::Path) {
    let loaded = load_hf_folder(model_dir, &Device::Cpu).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(name).join("logits.json")).unwrap())
            .unwrap();
    let want: Vec<f64> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p.as_array().unwrap())
        .flat_map(|row| row.as_array().unwrap())
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ours: Vec<f32> = prompt_logits(name, &loaded.model).concat();
    assert_eq!(ours.len(), want.len());
    let worst = ours
        .iter()
        .zip(&want)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0f64, f64::max);
    assert!(worst < 1e-4, "{name}: largest logit difference {worst}");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("qwen2");
}

#[test]
fn tiny_llama_matches_transformers() {
    check("llama");
}

#[test]
fn tiny_llama3_rope_scaling_matches_transformers() {
    check("llama3");
}

/// The golden Llama-3.1-scaled model, and the same written by our exporter into `out` as a
/// Hugging Face folder with a small trained tokenizer and a template.
fn export_golden_llama3(out: &std::path::Path) -> moi_studio::train::load::LoadedModel {
    use moi_studio::train::export::{save_model_folder, tensors_of};
    use moi_studio::train::model::named_vars;
    let loaded = load_hf_folder(&golden("llama3"), &Device::Cpu).unwrap();
    let tokenizer = moi_studio::core::bpe::train_bpe(
        ["a small text to train a tokenizer on".to_string()].into_iter(),
        300,
    )
    .unwrap();
    save_model_folder(
        out,
        &loaded.config,
        &tensors_of(&named_vars(&loaded.weights)),
        &tokenizer,
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
        "<s>",
        "</s>",
    )
    .unwrap();
    loaded
}

#[test]
fn an_exported_llama3_scaled_model_keeps_its_rotary_scaling() {
    let out = tempfile::tempdir().unwrap();
    // MOI_EXPORT_GOLDEN=DIR keeps the export for `scripts/check_export.py DIR --reference …`.
    let out_dir = std::env::var_os("MOI_EXPORT_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| out.path().to_path_buf());
    let loaded = export_golden_llama3(&out_dir);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap())
            .unwrap();
    // The keys transformers reads, not our own field name.
    assert!(config.get("llama3_rope").is_none(), "{config}");
    assert_eq!(config["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(config["rope_scaling"]["factor"], 8.0);
    assert_eq!(config["rope_theta"], 500000.0);
    let tok_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tok_config["bos_token"], "<s>");
    let reloaded = load_hf_folder(&out_dir, &Device::Cpu).unwrap();
    assert_eq!(reloaded.config.llama3_rope, loaded.config.llama3_rope);
    check_folder("llama3", &out_dir);
}

/// Logits of `model` on every reference prompt of golden model `name`, one row per position.
fn prompt_logits(name: &str, model: &moi_studio::train::model::Decoder) -> Vec<Vec<f32>> {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden(name).join("logits.json")).unwrap())
            .unwrap();
    let mut rows = Vec::new();
    for prompt in reference["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = prompt
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        rows.extend(decoder_logits(model, &ids).unwrap());
    }
    rows
}

#[test]
fn a_llama3_scaled_model_written_to_gguf_keeps_its_rotary_scaling() {
    use moi_studio::train::gguf_export::{Quant, write_gguf};
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let loaded = export_golden_llama3(&hf);
    let bundle = moi_studio::train::score::load_bundle(&hf, &Device::Cpu).unwrap();
    let file = dir.path().join("llama3.f16.gguf");
    write_gguf(&bundle, "golden-llama3", Quant::F16, &file).unwrap();
    let (back, _) = moi_studio::train::gguf::load_gguf(&file, &Device::Cpu).unwrap();
    assert_eq!(back.config.llama3_rope, loaded.config.llama3_rope);
    let want = prompt_logits("llama3", &loaded.model);
    let got = prompt_logits("llama3", &back.model);
    // The same model without its scaling, to show the prompts are long enough for it to matter.
    let mut plain_config = loaded.config.clone();
    plain_config.llama3_rope = None;
    let plain = moi_studio::train::model::Decoder::new(
        &plain_config,
        candle_nn::VarBuilder::from_varmap(&loaded.weights, candle_core::DType::F32, &Device::Cpu),
    )
    .unwrap();
    let unscaled = prompt_logits("llama3", &plain);
    let worst = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (f16_error, scaling_effect) = (worst(&want, &got), worst(&want, &unscaled));
    eprintln!("f16 GGUF: largest logit difference {f16_error}; without scaling {scaling_effect}");
    assert!(
        f16_error < 0.25 * scaling_effect && f16_error < 1e-3,
        "f16 GGUF differs by {f16_error}, dropping the scaling by {scaling_effect}"
    );
}
