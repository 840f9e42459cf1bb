//! A tiny seeded CPU run on the demo project's packed MoI rows: the loss falls over 50 steps.
//! (The full trainer with its worker, checkpoints and evaluation comes with the trainer issue.)

use std::path::PathBuf;

use candle_core::Device;
use moi_studio::core::dataset::load_project;
use moi_studio::core::mixing::Prepared;
use moi_studio::core::packing::{PackMode, PackSettings};
use moi_studio::core::project::Project;
use moi_studio::train::batch::{LossNorm, batch_loss, make_batch};
use moi_studio::train::config::ModelConfig;
use moi_studio::train::model::{named_vars, new_trainable};
use moi_studio::train::optim::{AdamW, AdamWConfig, Decay, clip_grad_norm, lr_at};

#[test]
fn loss_falls_over_50_steps_on_the_demo_data() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/benchmarks.moi.toml");
    let project = Project::load(&path).unwrap();
    let data = load_project(&project, &mut |_| {});
    let (tokenizer, prepared) = Prepared::for_project(&project, &data).unwrap();
    let pack = PackSettings {
        mode: PackMode::Moi,
        max_seq_len: 256,
        ..project.packing.clone()
    };
    let plan = prepared.pack_epoch(&project.mixing, &pack, project.seed, 0);
    let rows: Vec<_> = (0..plan.rows.len())
        .map(|i| prepared.row(&plan, i, &pack))
        .collect();
    assert!(rows.len() > 100);

    let config = ModelConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        max_position_embeddings: 256,
        ..ModelConfig::tiny(tokenizer.get_vocab_size(true))
    };
    let (model, weights) = new_trainable(&config, 42, &Device::Cpu).unwrap();
    let params = named_vars(&weights);
    let vars: Vec<_> = params.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();

    let steps = 50u64;
    let mut losses = Vec::new();
    for step in 0..steps {
        let start = (step as usize * 4) % (rows.len() - 4);
        let batch = make_batch(&rows[start..start + 4], LossNorm::TokenMean, &Device::Cpu).unwrap();
        let loss = batch_loss(&model, &batch).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!(norm.is_finite());
        opt.step(&grads, lr_at(step, steps, 5, 3e-3, Decay::Cosine, 0.1))
            .unwrap();
    }
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[45..].iter().sum::<f32>() / 5.0;
    eprintln!("mean loss of the first 5 steps {first:.3}, of the last 5 {last:.3}");
    // A fresh model starts near ln(vocab); 50 steps must take a clear bite out of that.
    assert!(first > 7.0, "initial loss {first}");
    assert!(
        last < first - 1.5,
        "loss went from {first} to {last}: {losses:?}"
    );
}
