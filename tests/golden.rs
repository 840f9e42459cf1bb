//! Our decoder against Python transformers: tiny random Qwen2- and Llama-style models made by
//! `scripts/make_golden_models.py`, whose logits must match within 1e-4.

use std::path::PathBuf;

use candle_core::{Device, IndexOp, Tensor};
use moi_studio::train::load::load_hf_folder;
use moi_studio::train::model::attention_mask;

fn check(name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/golden")
        .join(name);
    let loaded = load_hf_folder(&dir, &Device::Cpu).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
    let prompts = reference["prompts"].as_array().unwrap();
    let mut worst = 0f64;
    for (p, prompt) in prompts.iter().enumerate() {
        let ids: Vec<u32> = prompt
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let t = ids.len();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mask = attention_mask(&[vec![0; t]], t, &Device::Cpu).unwrap();
        let ours: Vec<Vec<f32>> = loaded
            .model
            .forward(&input, &pos, &mask)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let theirs = reference["logits"][p].as_array().unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (row, want) in ours.iter().zip(theirs) {
            for (a, b) in row.iter().zip(want.as_array().unwrap()) {
                worst = worst.max((f64::from(*a) - b.as_f64().unwrap()).abs());
            }
        }
    }
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
