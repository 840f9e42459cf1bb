//! Training throughput of the built-in tiny model (4 layers × 256, ~4 M parameters) on the demo
//! project's MoI rows: 4 rows × 512 tokens per step, full fine-tuning and LoRA, on the CPU (or
//! the GPU with `--features cuda`). `benches/torch_train.py` trains the same configuration with
//! PyTorch for comparison.
//!
//!   cargo bench --bench train -- [STEPS (default 10)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::DType;
use candle_nn::VarBuilder;
use moi_studio::core::dataset::load_project;
use moi_studio::core::events::{TrainEvent, event_channel};
use moi_studio::core::mixing::Prepared;
use moi_studio::core::project::Project;
use moi_studio::train::device::choose_device;
use moi_studio::train::model::{Decoder, init_lora, init_weights, named_vars};
use moi_studio::train::optim::AdamW;
use moi_studio::train::tiny::tiny_config;
use moi_studio::train::trainer::{TrainJob, TrainSettings, train};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let steps: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(10);
    let warmup = 2;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/benchmarks.moi.toml");
    let project = Project::load(&path).expect("demo project");
    let data = load_project(&project, &mut |_| {});
    let (tokenizer, prepared) = Prepared::for_project(&project, &data).expect("tokenizing");
    let config = tiny_config(tokenizer.get_vocab_size(true)).expect("tiny config");
    let device = choose_device(false);
    let dev = &device.device;
    println!(
        "tiny model: vocab {}, {} layers × {}, rows of {} tokens, device {} ({})",
        config.vocab_size,
        config.num_hidden_layers,
        config.hidden_size,
        project.packing.max_seq_len,
        device.name,
        device.reason
    );
    let settings = TrainSettings {
        max_steps: Some(warmup + steps),
        batch_rows: 4,
        checkpoint_every: 0,
        ..project.training.clone()
    };
    for lora in [false, true] {
        let weights = init_weights(&config, 1, dev).expect("weights");
        let vars = named_vars(&weights);
        let (model, trainable) = if lora {
            let mut settings = project.training.lora.clone();
            settings.enabled = true;
            let base = vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
                .collect();
            let adapters = init_lora(&config, &settings, 1, dev).expect("adapters");
            let model = Decoder::with_lora(
                &config,
                VarBuilder::from_tensors(base, DType::F32, dev),
                &settings,
                VarBuilder::from_varmap(&adapters, DType::F32, dev),
            )
            .expect("model");
            (model, named_vars(&adapters))
        } else {
            let model = Decoder::new(&config, VarBuilder::from_varmap(&weights, DType::F32, dev))
                .expect("model");
            (model, vars)
        };
        let out = tempfile::tempdir().expect("temp dir");
        let job = TrainJob {
            model: &model,
            weights: &trainable,
            prepared: &prepared,
            mix: &project.mixing,
            pack: &project.packing,
            train: &settings,
            seed: project.seed,
            out_dir: out.path(),
            eval: None,
            chat: None,
        };
        let mut opt = AdamW::new(trainable.clone(), settings.adamw).expect("optimizer");
        let (mut events, rx) = event_channel(10_000, Arc::new(|| {}));
        let (_tx, commands) = crossbeam_channel::bounded(1);
        let stop = Arc::new(AtomicBool::new(false));
        train(&job, &mut opt, None, &mut events, &commands, &stop).expect("training");
        drop(events);
        let timed: Vec<_> = rx
            .try_iter()
            .filter_map(|e| match e {
                TrainEvent::Step(m) if m.step > warmup => Some(m),
                _ => None,
            })
            .collect();
        let rate = timed.iter().map(|m| m.tokens_per_sec).sum::<f64>() / timed.len() as f64;
        let first = timed.first().map_or(0.0, |m| m.loss);
        let last = timed.last().map_or(0.0, |m| m.loss);
        let trained: usize = trainable.iter().map(|(_, v)| v.elem_count()).sum();
        println!(
            "{}: {} timed steps after {warmup} untimed, {rate:.0} tokens/s ({trained} trained \
             parameters; loss {first:.3} -> {last:.3})",
            if lora {
                "LoRA r8 q,k,v,o"
            } else {
                "full fine-tuning"
            },
            timed.len()
        );
    }
}
