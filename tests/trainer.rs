//! The training loop on the demo project: resume is exact, Stop stops.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Var};
use moi_studio::core::dataset::load_project;
use moi_studio::core::events::{TrainEvent, event_channel};
use moi_studio::core::mixing::Prepared;
use moi_studio::core::packing::{PackMode, PackSettings};
use moi_studio::core::project::Project;
use moi_studio::train::config::ModelConfig;
use moi_studio::train::model::{Decoder, named_vars, new_trainable};
use moi_studio::train::optim::AdamW;
use moi_studio::train::trainer::{
    Ending, TrainJob, TrainSettings, latest_checkpoint, load_checkpoint, train,
};

struct Demo {
    project: Project,
    prepared: Prepared,
    vocab: usize,
}

fn demo() -> &'static Demo {
    static D: OnceLock<Demo> = OnceLock::new();
    D.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/demo.moi.toml");
        let project = Project::load(&path).unwrap();
        let data = load_project(&project, &mut |_| {});
        let (tokenizer, prepared) = Prepared::for_project(&project, &data).unwrap();
        Demo {
            project,
            prepared,
            vocab: tokenizer.get_vocab_size(true),
        }
    })
}

fn model(seed: u64) -> (Decoder, Vec<(String, Var)>) {
    let config = ModelConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        max_position_embeddings: 128,
        ..ModelConfig::tiny(demo().vocab)
    };
    let (m, weights) = new_trainable(&config, seed, &Device::Cpu).unwrap();
    let params = named_vars(&weights);
    (m, params)
}

fn pack() -> PackSettings {
    PackSettings {
        mode: PackMode::Moi,
        max_seq_len: 128,
        ..demo().project.packing.clone()
    }
}

/// Runs `train` and returns the losses of its steps and how it ended.
fn run(
    m: &Decoder,
    params: &[(String, Var)],
    settings: &TrainSettings,
    out: &std::path::Path,
    resume_from: Option<&std::path::Path>,
    stop_after: Option<u64>,
) -> (Vec<(u64, f64)>, Ending, u64) {
    let d = demo();
    let pack = pack();
    let job = TrainJob {
        model: m,
        weights: params,
        prepared: &d.prepared,
        mix: &d.project.mixing,
        pack: &pack,
        train: settings,
        seed: d.project.seed,
        out_dir: out,
    };
    let mut opt = AdamW::new(params.to_vec(), settings.adamw).unwrap();
    let resume = resume_from.map(|dir| load_checkpoint(dir, params, &mut opt).unwrap());
    let (mut events, rx) = event_channel(1000, Arc::new(|| {}));
    let (_cmd_tx, cmd_rx) = crossbeam_channel::bounded(4);
    let stop = Arc::new(AtomicBool::new(false));
    let listener_stop = stop.clone();
    let listener = std::thread::spawn(move || {
        let mut losses = Vec::new();
        while let Ok(e) = rx.recv() {
            if let TrainEvent::Step(m) = e {
                assert_eq!(m.steps, 1, "nothing merged with a roomy channel");
                losses.push((m.step, m.loss));
                if stop_after == Some(m.step) {
                    listener_stop.store(true, Ordering::SeqCst);
                }
            }
        }
        losses
    });
    let (ending, state) = train(&job, &mut opt, resume, &mut events, &cmd_rx, &stop).unwrap();
    drop(events);
    (listener.join().unwrap(), ending, state.step)
}

fn settings() -> TrainSettings {
    TrainSettings {
        max_steps: Some(20),
        batch_rows: 2,
        lr: 3e-3,
        warmup_steps: 3,
        checkpoint_every: 10,
        ..TrainSettings::default()
    }
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (m, params) = model(1);
    let (straight, ending, steps) = run(&m, &params, &settings(), dir.path(), None, None);
    assert_eq!((ending, steps), (Ending::Finished, 20));
    assert_eq!(straight.len(), 20);
    assert!(dir.path().join("checkpoint-10").is_dir());
    assert_eq!(
        latest_checkpoint(dir.path()),
        Some(dir.path().join("checkpoint-20"))
    );

    // A fresh model (other seed) picks up at step 10 from the checkpoint.
    let (m2, params2) = model(99);
    let out2 = tempfile::tempdir().unwrap();
    let (resumed, ending, steps) = run(
        &m2,
        &params2,
        &settings(),
        out2.path(),
        Some(&dir.path().join("checkpoint-10")),
        None,
    );
    assert_eq!((ending, steps), (Ending::Finished, 20));
    assert_eq!(resumed.len(), 10);
    for ((s1, a), (s2, b)) in straight[10..].iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-5, "step {s1}: {a} vs {b}");
    }
}

#[test]
fn stop_ends_the_run_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (m, params) = model(2);
    let settings = TrainSettings {
        max_steps: Some(200),
        checkpoint_every: 0,
        ..settings()
    };
    let (losses, ending, steps) = run(&m, &params, &settings, dir.path(), None, Some(3));
    assert_eq!(ending, Ending::Stopped);
    assert!((3..200).contains(&steps), "stopped at {steps}");
    assert_eq!(losses.len() as u64, steps);
    assert!(dir.path().join(format!("checkpoint-{steps}")).is_dir());
}
