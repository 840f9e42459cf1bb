//! The training loop on the demo project: resume is exact, Stop stops.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::{Device, Var};
use moi_studio::core::dataset::load_project;
use moi_studio::core::events::PromptKind;
use moi_studio::core::events::{StepMetrics, TrainEvent, event_channel};
use moi_studio::core::mixing::Prepared;
use moi_studio::core::packing::{PackMode, PackSettings};
use moi_studio::core::project::Project;
use moi_studio::core::template::ChatTemplate;
use moi_studio::core::train_settings::LoraSettings;
use moi_studio::train::config::ModelConfig;
use moi_studio::train::eval::EvalSet;
use moi_studio::train::model::{Decoder, named_vars, new_trainable};
use moi_studio::train::optim::AdamW;
use moi_studio::train::trainer::{
    Ending, TrainJob, TrainSettings, latest_checkpoint, load_checkpoint, train,
};

struct Demo {
    project: Project,
    prepared: Prepared,
    vocab: usize,
    tokenizer: tokenizers::Tokenizer,
    data: Vec<moi_studio::core::dataset::TaskData>,
}

fn demo() -> &'static Demo {
    static D: OnceLock<Demo> = OnceLock::new();
    D.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/benchmarks.moi.toml");
        let project = Project::load(&path).unwrap();
        let data = load_project(&project, &mut |_| {});
        let (tokenizer, prepared) = Prepared::for_project(&project, &data).unwrap();
        Demo {
            project,
            prepared,
            vocab: tokenizer.get_vocab_size(true),
            tokenizer,
            data,
        }
    })
}

fn model(seed: u64) -> (Decoder, Vec<(String, Var)>) {
    model_of_depth(seed, 1)
}

fn model_of_depth(seed: u64, layers: usize) -> (Decoder, Vec<(String, Var)>) {
    let config = ModelConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: layers,
        max_position_embeddings: 256,
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
    let (steps, _, ending, step) =
        run_with(m, params, settings, out, resume_from, stop_after, None).expect("training runs");
    (
        steps.iter().map(|m| (m.step, m.loss)).collect(),
        ending,
        step,
    )
}

type Outcome = (Vec<StepMetrics>, Vec<TrainEvent>, Ending, u64);

/// As `run`, with an optional eval set; returns the other events too, or the error.
fn run_with(
    m: &Decoder,
    params: &[(String, Var)],
    settings: &TrainSettings,
    out: &std::path::Path,
    resume_from: Option<&std::path::Path>,
    stop_after: Option<u64>,
    eval: Option<&EvalSet>,
) -> anyhow::Result<Outcome> {
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
        chat: None,
        eval,
        phases: None,
    };
    let mut opt = AdamW::new(params.to_vec(), settings.adamw).unwrap();
    let resume = resume_from.map(|dir| load_checkpoint(dir, params, &mut opt).unwrap());
    let (mut events, rx) = event_channel(1000, Arc::new(|| {}));
    let (_cmd_tx, cmd_rx) = crossbeam_channel::bounded(4);
    let stop = Arc::new(AtomicBool::new(false));
    let listener_stop = stop.clone();
    let listener = std::thread::spawn(move || {
        let mut losses = Vec::new();
        let mut others = Vec::new();
        while let Ok(e) = rx.recv() {
            if let TrainEvent::Step(m) = &e {
                assert_eq!(m.steps, 1, "nothing merged with a roomy channel");
                losses.push(m.clone());
                if stop_after == Some(m.step) {
                    listener_stop.store(true, Ordering::SeqCst);
                }
            } else {
                others.push(e);
            }
        }
        (losses, others)
    });
    let result = train(&job, &mut opt, resume, &mut events, &cmd_rx, &stop);
    drop(events);
    let (losses, others) = listener.join().unwrap();
    let (ending, state) = result?;
    Ok((losses, others, ending, state.step))
}

fn eval_set(max_len: usize) -> EvalSet {
    let d = demo();
    let mut project = d.project.clone();
    for task in &mut project.tasks {
        task.max_new_tokens = 4;
    }
    EvalSet::build(
        &project,
        &d.data,
        &d.tokenizer,
        &ChatTemplate::chatml(),
        3,
        1,
        max_len,
    )
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
fn a_checkpointed_run_trains_the_plain_run_and_resumes_exactly() {
    let settings = TrainSettings {
        grad_accum: 2,
        ..settings()
    };
    let (plain_model, plain_params) = model_of_depth(4, 3);
    let plain_dir = tempfile::tempdir().unwrap();
    let (plain, _, _) = run(
        &plain_model,
        &plain_params,
        &settings,
        plain_dir.path(),
        None,
        None,
    );
    let checkpointed_model = |seed| {
        let (mut m, params) = model_of_depth(seed, 3);
        m.set_activation_checkpointing(true);
        (m, params)
    };
    let (m, params) = checkpointed_model(4);
    let dir = tempfile::tempdir().unwrap();
    let (checkpointed, ending, steps) = run(&m, &params, &settings, dir.path(), None, None);
    assert_eq!((ending, steps), (Ending::Finished, 20));
    assert_eq!(plain.len(), checkpointed.len());
    for ((s, a), (_, b)) in plain.iter().zip(&checkpointed) {
        assert!(
            (a - b).abs() < 1e-5,
            "step {s}: plain {a}, checkpointed {b}"
        );
    }
    // Resumed from step 10 (into a model of another seed), it continues exactly.
    let (m2, params2) = checkpointed_model(77);
    let out2 = tempfile::tempdir().unwrap();
    let (resumed, _, _) = run(
        &m2,
        &params2,
        &settings,
        out2.path(),
        Some(&dir.path().join("checkpoint-10")),
        None,
    );
    assert_eq!(resumed.len(), 10);
    for ((s1, a), (s2, b)) in checkpointed[10..].iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-5, "step {s1}: {a} vs {b}");
    }
}

#[test]
fn the_same_seed_trains_the_same_run_bit_for_bit() {
    // Parallel reductions (a weight gradient summed over rows) must not depend on how the
    // threads split the work: a seed names one run, and the ablation compares runs by seed.
    let losses = |_: u8| {
        let dir = tempfile::tempdir().unwrap();
        let (m, params) = model(3);
        run(&m, &params, &settings(), dir.path(), None, None).0
    };
    let (a, b) = (losses(0), losses(1));
    assert_eq!(a.len(), 20);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.to_bits(), y.to_bits(), "step {s}: {x} vs {y}");
    }
}

#[test]
fn one_step_of_accumulation_equals_one_step_on_the_concatenated_batch() {
    use moi_studio::core::train_settings::LossNorm;
    for norm in [LossNorm::TokenMean, LossNorm::SampleMean] {
        let step_loss = |batch_rows: usize, grad_accum: usize| {
            let dir = tempfile::tempdir().unwrap();
            let (m, params) = model(5);
            let settings = TrainSettings {
                max_steps: Some(1),
                batch_rows,
                grad_accum,
                loss_norm: norm,
                checkpoint_every: 0,
                ..settings()
            };
            let (losses, _, _) = run(&m, &params, &settings, dir.path(), None, None);
            losses[0].1
        };
        let accumulated = step_loss(1, 4);
        let concatenated = step_loss(4, 1);
        assert!(
            (accumulated - concatenated).abs() < 1e-5,
            "{norm:?}: accumulation 4 gives {accumulated}, one batch of 4 rows {concatenated}"
        );
    }
}

#[test]
fn runs_past_the_planned_epochs_keep_counting_and_reshuffle() {
    let d = demo();
    let rows = d
        .prepared
        .pack_epoch(&d.project.mixing, &pack(), d.project.seed, 0)
        .rows
        .len();
    let later = d
        .prepared
        .pack_epoch(&d.project.mixing, &pack(), d.project.seed, 1);
    assert_ne!(
        later.pieces,
        d.prepared
            .pack_epoch(&d.project.mixing, &pack(), d.project.seed, 0)
            .pieces,
        "each epoch is sampled with its own seed"
    );
    // One step takes a whole epoch, so three steps run two epochs past the planned one.
    let dir = tempfile::tempdir().unwrap();
    let (m, params) = model(6);
    let settings = TrainSettings {
        max_steps: Some(3),
        batch_rows: rows,
        checkpoint_every: 0,
        ..settings()
    };
    let (steps, _, ending, _) =
        run_with(&m, &params, &settings, dir.path(), None, None, None).unwrap();
    assert_eq!(ending, Ending::Finished);
    let epochs: Vec<f64> = steps.iter().map(|m| m.epoch).collect();
    assert_eq!(epochs, [1.0, 2.0, 3.0]);
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

#[test]
fn evaluation_reports_every_task_and_early_stopping_ends_a_stalled_run() {
    let dir = tempfile::tempdir().unwrap();
    let (m, params) = model(3);
    let set = eval_set(256);
    assert_eq!(set.tasks.len(), 3);
    // With a zero learning rate the eval loss never improves: patience 1 stops at the second
    // evaluation (step 4).
    let settings = TrainSettings {
        max_steps: Some(50),
        lr: 0.0,
        eval_every_steps: 2,
        early_stopping_patience: 1,
        ..settings()
    };
    let (losses, events, ending, step) =
        run_with(&m, &params, &settings, dir.path(), None, None, Some(&set)).unwrap();
    assert_eq!((ending, step), (Ending::EarlyStopped, 4));
    assert_eq!(losses.len(), 4);
    let evals: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval(m) => Some(m),
            _ => None,
        })
        .collect();
    // Two evaluations × three tasks × two prompt kinds.
    assert_eq!(evals.len(), 12);
    for at in [2, 4] {
        for kind in [PromptKind::Task, PromptKind::Default] {
            assert_eq!(
                evals
                    .iter()
                    .filter(|e| e.step == at && e.prompt == kind)
                    .count(),
                3
            );
        }
    }
    for e in &evals {
        assert!((e.perplexity - e.loss.exp()).abs() < 1e-9 * e.perplexity);
        assert!(e.tokens > 0 && e.items > 0);
        assert_eq!(e.exact_match.is_some(), e.task != "code");
    }
    assert!(
        events.iter().any(
            |e| matches!(e, TrainEvent::Log { message } if message.contains("early stopping"))
        )
    );
    assert!(dir.path().join("checkpoint-4").is_dir());
}

#[test]
fn a_non_finite_loss_fails_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (m, params) = model(4);
    // An absurd learning rate blows the weights up after the first step.
    let settings = TrainSettings {
        max_steps: Some(20),
        lr: 1e30,
        warmup_steps: 0,
        clip_grad_norm: 0.0,
        checkpoint_every: 1,
        ..settings()
    };
    let err = run_with(&m, &params, &settings, dir.path(), None, None, None)
        .expect_err("the run must fail");
    let message = format!("{err:#}");
    assert!(
        message.contains("last good checkpoint is kept"),
        "{message}"
    );
    let good = latest_checkpoint(dir.path()).expect("a checkpoint from before the failure");
    let weights =
        candle_core::safetensors::load(good.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in weights {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name} is not finite in {}",
            good.display()
        );
    }
}

#[test]
fn lora_trains_only_the_adapters_and_merges_back() {
    use candle_core::{DType, Tensor};
    use candle_nn::VarBuilder;
    use moi_studio::train::model::merge_lora;

    let LoraFixture {
        model,
        trainable,
        base,
        config,
        settings: lora,
    } = lora_model(5, 0.0);
    let dev = Device::Cpu;
    let before: Vec<Vec<f32>> = base
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    // q, k, v and o of one layer, A and B each.
    assert_eq!(trainable.len(), 8);
    let settings = TrainSettings {
        max_steps: Some(15),
        lr: 1e-2,
        checkpoint_every: 0,
        ..settings()
    };
    let dir = tempfile::tempdir().unwrap();
    let (losses, ending, _) = run(&model, &trainable, &settings, dir.path(), None, None);
    assert_eq!(ending, Ending::Finished);
    let mean = |xs: &[(u64, f64)]| xs.iter().map(|x| x.1).sum::<f64>() / xs.len() as f64;
    assert!(mean(&losses[10..]) < mean(&losses[..5]), "{losses:?}");
    // The base did not move; every B did (it starts at zero).
    for ((name, t), old) in base.iter().zip(&before) {
        let now: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&now, old, "{name} changed");
    }
    for (name, v) in &trainable {
        if name.ends_with("lora_B.weight") {
            let b: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert!(b.iter().any(|x| *x != 0.0), "{name} never trained");
        }
    }
    // Folding the adapters into the base gives the same model.
    let trained: Vec<(String, Tensor)> = trainable
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let merged = merge_lora(&base, &trained, &lora).unwrap();
    let plain = Decoder::new(
        &config,
        VarBuilder::from_tensors(merged.into_iter().collect(), DType::F32, &dev),
    )
    .unwrap();
    let ids = Tensor::new(&[[3u32, 17, 42, 8, 99, 5]], &dev).unwrap();
    let pos = Tensor::new(&[[0u32, 1, 2, 3, 4, 5]], &dev).unwrap();
    let mask = moi_studio::train::model::attention_mask(&[vec![1; 6]], 6, &dev).unwrap();
    let a = model.forward(&ids, &pos, &mask).unwrap();
    let b = plain.forward(&ids, &pos, &mask).unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-4, "merged model differs by {diff}");
}

/// A LoRA decoder over a seeded base (its weights frozen), with adapters seeded by
/// `adapter_seed`.
struct LoraFixture {
    model: Decoder,
    trainable: Vec<(String, Var)>,
    base: Vec<(String, candle_core::Tensor)>,
    config: ModelConfig,
    settings: LoraSettings,
}

fn lora_model(adapter_seed: u64, dropout: f64) -> LoraFixture {
    use candle_core::DType;
    use candle_nn::VarBuilder;
    use moi_studio::train::model::{init_lora, init_weights};
    let config = ModelConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 1,
        max_position_embeddings: 128,
        ..ModelConfig::tiny(demo().vocab)
    };
    let dev = Device::Cpu;
    let base: Vec<(String, candle_core::Tensor)> =
        named_vars(&init_weights(&config, 5, &dev).unwrap())
            .into_iter()
            .map(|(k, v)| (k, v.as_detached_tensor()))
            .collect();
    let settings = LoraSettings {
        enabled: true,
        dropout,
        ..LoraSettings::default()
    };
    let adapters = init_lora(&config, &settings, adapter_seed, &dev).unwrap();
    let model = Decoder::with_lora(
        &config,
        VarBuilder::from_tensors(base.iter().cloned().collect(), DType::F32, &dev),
        &settings,
        VarBuilder::from_varmap(&adapters, DType::F32, &dev),
    )
    .unwrap();
    LoraFixture {
        model,
        trainable: named_vars(&adapters),
        base,
        config,
        settings,
    }
}

#[test]
fn a_lora_run_with_dropout_resumes_exactly() {
    let settings = TrainSettings {
        lr: 1e-2,
        grad_accum: 2,
        ..settings()
    };
    let dir = tempfile::tempdir().unwrap();
    let LoraFixture {
        model: m,
        trainable: params,
        ..
    } = lora_model(1, 0.2);
    let (straight, ending, _) = run(&m, &params, &settings, dir.path(), None, None);
    assert_eq!(ending, Ending::Finished);
    // Dropout draws seeded masks: the same run again gives the same losses.
    let LoraFixture {
        model: m_again,
        trainable: params_again,
        ..
    } = lora_model(1, 0.2);
    let again_dir = tempfile::tempdir().unwrap();
    let (again, _, _) = run(
        &m_again,
        &params_again,
        &settings,
        again_dir.path(),
        None,
        None,
    );
    assert_eq!(straight, again);
    // And dropout is really applied: without it the losses differ.
    let LoraFixture {
        model: m0,
        trainable: params0,
        ..
    } = lora_model(1, 0.0);
    let no_dropout_dir = tempfile::tempdir().unwrap();
    let (plain, _, _) = run(&m0, &params0, &settings, no_dropout_dir.path(), None, None);
    assert_ne!(straight, plain);
    // Adapters from another seed pick up at step 10 from the checkpoint.
    let LoraFixture {
        model: m2,
        trainable: params2,
        ..
    } = lora_model(77, 0.2);
    let out2 = tempfile::tempdir().unwrap();
    let (resumed, _, steps) = run(
        &m2,
        &params2,
        &settings,
        out2.path(),
        Some(&dir.path().join("checkpoint-10")),
        None,
    );
    assert_eq!(steps, 20);
    for ((s1, a), (s2, b)) in straight[10..].iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() < 1e-5, "step {s1}: {a} vs {b}");
    }
}
