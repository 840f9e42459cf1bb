//! SIGKILL at random points while the studio writes its files: the project file, a checkpoint,
//! a run's model folder and `metrics.jsonl`, 200 kills each. A child process (this test binary,
//! run again as `writer_child`) writes numbered versions one after another and says on stdout
//! when each is complete; the parent kills it at a random moment and checks that what is on disk
//! loads and is the last version reported complete or the one after it, whole.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use moi_studio::core::events::{StepMetrics, TrainEvent, event_channel};
use moi_studio::core::project::{Project, Task};
use moi_studio::core::runs::{RunHistory, cut_metrics};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Kills per kind of file.
const KILLS: usize = 200;

/// The child: writes versions of one kind of file until it is killed. Does nothing when run as a
/// plain test.
#[test]
#[ignore]
fn writer_child() {
    let (Ok(kind), Ok(dir), Ok(from)) = (
        std::env::var("MOI_KILL_KIND"),
        std::env::var("MOI_KILL_DIR"),
        std::env::var("MOI_KILL_FROM"),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let from: u64 = from.parse().unwrap();
    let mut writer = Writer::new(&kind, &dir);
    println!("ready");
    for version in from + 1.. {
        writer.write(version);
        println!("wrote {version}");
    }
}

/// What each kind needs between versions (one of each lives at a time: no need to box).
#[allow(clippy::large_enum_variant)]
enum Writer {
    Project(PathBuf),
    Checkpoint {
        dir: PathBuf,
        weights: Vec<(String, candle_core::Var)>,
        opt: moi_studio::train::optim::AdamW,
    },
    Model {
        dir: PathBuf,
        config: moi_studio::train::config::ModelConfig,
        tokenizer: tokenizers::Tokenizer,
        weights: Vec<(String, candle_core::Tensor)>,
    },
    Metrics(moi_studio::core::events::EventSender),
}

impl Writer {
    fn new(kind: &str, dir: &Path) -> Self {
        match kind {
            "project" => Writer::Project(dir.join("project.moi.toml")),
            "checkpoint" => {
                let dev = candle_core::Device::Cpu;
                let weights: Vec<(String, candle_core::Var)> = (0..4)
                    .map(|i| {
                        let t = candle_core::Tensor::randn(0f32, 1., (256, 256), &dev).unwrap();
                        (format!("w{i}"), candle_core::Var::from_tensor(&t).unwrap())
                    })
                    .collect();
                let opt = moi_studio::train::optim::AdamW::new(
                    weights.clone(),
                    moi_studio::train::optim::AdamWConfig::default(),
                )
                .unwrap();
                Writer::Checkpoint {
                    dir: dir.join("run"),
                    weights,
                    opt,
                }
            }
            "model" => {
                let base = dir.join("tiny");
                let config =
                    moi_studio::train::config::ModelConfig::load(&base.join("config.json"))
                        .unwrap();
                let tokenizer = tokenizers::Tokenizer::from_file(base.join("tokenizer.json"))
                    .map_err(|e| e.to_string())
                    .unwrap();
                let loaded =
                    moi_studio::train::load::load_hf_folder(&base, &candle_core::Device::Cpu)
                        .unwrap();
                let weights = moi_studio::train::export::tensors_of(
                    &moi_studio::train::model::named_vars(&loaded.weights),
                );
                Writer::Model {
                    dir: dir.join("run/model"),
                    config,
                    tokenizer,
                    weights,
                }
            }
            "metrics" => {
                let path = dir.join("metrics.jsonl");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap();
                let (mut events, rx) = event_channel(4, std::sync::Arc::new(|| {}));
                // Nobody listens: steps merge in the sender; every one is still recorded.
                std::mem::forget(rx);
                events.record_to(Box::new(std::io::BufWriter::new(file)));
                Writer::Metrics(events)
            }
            other => panic!("no kind {other}"),
        }
    }

    fn write(&mut self, version: u64) {
        match self {
            Writer::Project(path) => {
                let mut p = Project {
                    default_system_prompt: format!("version {version}"),
                    ..Project::default()
                };
                for i in 0..40 {
                    p.tasks.push(Task::new(
                        format!("task {i}"),
                        format!("You are task {i} of version {version}. ").repeat(8),
                    ));
                }
                p.save(path).unwrap();
            }
            Writer::Checkpoint { dir, weights, opt } => {
                let state = moi_studio::train::trainer::TrainerState {
                    step: version,
                    epoch: 0,
                    row: 0,
                    total_steps: u64::MAX,
                    best_eval: None,
                    evals_since_best: 0,
                    tokens: version,
                    phase: 0,
                    phase_step0: 0,
                };
                moi_studio::train::trainer::save_checkpoint(
                    &dir.join("checkpoint-1"),
                    weights,
                    opt,
                    &state,
                )
                .unwrap();
            }
            Writer::Model {
                dir,
                config,
                tokenizer,
                weights,
            } => {
                // The version is written into the final norm's weights.
                let mut w = weights.clone();
                for (name, t) in &mut w {
                    if name == "model.norm.weight" {
                        *t = (t.ones_like().unwrap() * version as f64).unwrap();
                    }
                }
                moi_studio::train::export::save_model_folder_atomic(
                    dir,
                    config,
                    &w,
                    tokenizer,
                    "{{ messages }}",
                    "",
                    "</s>",
                )
                .unwrap();
            }
            Writer::Metrics(events) => events.step(StepMetrics {
                step: version,
                epoch: 0.0,
                loss: version as f64,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens_per_sec: 1.0,
                elapsed_s: 0.0,
                tokens_seen: version,
                steps: 1,
                task_loss: Vec::new(),
            }),
        }
    }
}

/// The version on disk, checked whole the way the studio reads it (after what resume does to
/// tidy up). 0 before the first complete write.
fn version_on_disk(kind: &str, dir: &Path) -> u64 {
    match kind {
        "project" => {
            let path = dir.join("project.moi.toml");
            if !path.exists() {
                return 0;
            }
            let p =
                Project::load(&path).unwrap_or_else(|e| panic!("the project does not load: {e}"));
            assert_eq!(p.tasks.len(), 40, "a project file lost tasks");
            p.default_system_prompt
                .strip_prefix("version ")
                .unwrap()
                .parse()
                .unwrap()
        }
        "checkpoint" => {
            let run = dir.join("run");
            if !run.exists() {
                return 0;
            }
            moi_studio::train::trainer::recover_checkpoints(&run).unwrap();
            let (found, refused) = moi_studio::train::trainer::latest_good_checkpoint(&run);
            assert!(refused.is_empty(), "checkpoints refused: {refused:?}");
            match found {
                Some(c) => {
                    moi_studio::train::trainer::load_trainer_state(&c)
                        .unwrap()
                        .step
                }
                None => 0,
            }
        }
        "model" => {
            let model = dir.join("run/model");
            if !model.exists() {
                return 0;
            }
            let loaded = moi_studio::train::load::load_hf_folder(&model, &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("the model folder does not load: {e}"));
            let norm = moi_studio::train::model::named_vars(&loaded.weights)
                .into_iter()
                .find(|(n, _)| n == "model.norm.weight")
                .unwrap()
                .1;
            let values: Vec<f32> = norm.as_tensor().to_vec1().unwrap();
            assert!(
                values.iter().all(|v| *v == values[0]),
                "a model folder mixes versions"
            );
            values[0] as u64
        }
        "metrics" => {
            let path = dir.join("metrics.jsonl");
            if !path.exists() {
                return 0;
            }
            let (history, _) = RunHistory::load(dir).unwrap();
            // Resume cuts the file back to its checkpoint; here, to the last whole step.
            cut_metrics(&path, history.step).unwrap();
            let steps: Vec<u64> = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| match serde_json::from_str::<TrainEvent>(l) {
                    Ok(TrainEvent::Step(m)) => m.step,
                    other => panic!("metrics.jsonl holds a bad line {l:?}: {other:?}"),
                })
                .collect();
            assert_eq!(
                steps,
                (1..=history.step).collect::<Vec<_>>(),
                "steps lost or repeated"
            );
            history.step
        }
        other => panic!("no kind {other}"),
    }
}

/// Starts a writer of `kind` and kills it, [`KILLS`] times, checking the files after each kill;
/// returns the kills and how many versions were reported written in all.
fn kill_repeatedly(kind: &str) -> (usize, u64) {
    let dir = tempfile::tempdir().unwrap();
    if kind == "model" {
        let texts = (0..50).map(|i| format!("The number {i} is written as {i}."));
        moi_studio::train::tiny::create_tiny_model(texts, 300, 7, &dir.path().join("tiny"))
            .unwrap();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(kind.len() as u64 * 7919);
    let exe = std::env::current_exe().unwrap();
    let mut on_disk = 0;
    // The longest wait before a kill: grown while kills land before the first write is done,
    // shrunk while many writes fit in it, so kills keep falling inside writes.
    let mut window_us: u64 = 30_000;
    let mut written = 0;
    let mut mid_write = 0;
    for kill in 0..KILLS {
        let mut child = Command::new(&exe)
            .args(["--exact", "writer_child", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("MOI_KILL_KIND", kind)
            .env("MOI_KILL_DIR", dir.path())
            .env("MOI_KILL_FROM", on_disk.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the child ended before it was ready"
            );
            // libtest may have written "test writer_child ... " before it on the same line.
            if line.trim_end().ends_with("ready") {
                break;
            }
        }
        // The kill lands at a random moment of the writes (this only picks the point; nothing
        // below depends on when it landed).
        std::thread::sleep(Duration::from_micros(rng.random_range(0..window_us)));
        child.kill().unwrap();
        child.wait().unwrap();
        let mut reported = on_disk;
        for l in out.lines() {
            if let Some(v) = l.unwrap().strip_prefix("wrote ") {
                reported = reported.max(v.parse().unwrap());
            }
        }
        mid_write += usize::from(left_mid_write(kind, dir.path()));
        let now = version_on_disk(kind, dir.path());
        if kind == "project" && dir.path().join("project.moi.toml").exists() {
            // Opening the project removed what the killed save left (before the first save
            // there is no project to open).
            let left: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "kill {kill}: {left:?} left after loading");
        }
        assert!(
            now == reported || now == reported + 1,
            "kill {kill} of the {kind} writer: version {now} on disk, {reported} reported whole"
        );
        let done = reported - on_disk;
        written += done;
        if done == 0 {
            window_us = (window_us * 2).min(2_000_000);
        } else if done > 4 {
            window_us = (window_us / 2).max(1_000);
        }
        on_disk = now;
        if kind == "metrics" && on_disk > 5_000 {
            // Keep the file small enough to read back after every kill.
            std::fs::remove_file(dir.path().join("metrics.jsonl")).unwrap();
            on_disk = 0;
        }
    }
    eprintln!(
        "{kind}: {mid_write} of {KILLS} kills left a write half done (a temporary file or a cut line)"
    );
    (KILLS, written)
}

/// Whether the kill caught a write half done: a temporary file or folder beside the real one
/// (a model folder's is removed here, as resume would; a project save's goes when the project is
/// opened, which the caller checks), or a last line cut short.
fn left_mid_write(kind: &str, dir: &Path) -> bool {
    let (folder, prefix) = match kind {
        "project" => (dir.to_path_buf(), ".moi-"),
        "checkpoint" => (dir.join("run"), ".checkpoint-"),
        "model" => (dir.join("run"), ".model-"),
        _ => {
            return std::fs::read(dir.join("metrics.jsonl"))
                .is_ok_and(|b| !b.is_empty() && !b.ends_with(b"\n"));
        }
    };
    let mut found = false;
    for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && !name.ends_with(".old") {
            found = true;
            if kind == "model" {
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    found
}

#[test]
fn the_project_file_survives_200_kills_mid_write() {
    let (kills, versions) = kill_repeatedly("project");
    eprintln!("project: {kills} kills, {versions} versions written");
    assert!(versions > 0);
}

#[test]
fn a_checkpoint_survives_200_kills_mid_write() {
    let (kills, versions) = kill_repeatedly("checkpoint");
    eprintln!("checkpoint: {kills} kills, {versions} versions written");
    assert!(versions > 0);
}

#[test]
fn the_model_folder_survives_200_kills_mid_write() {
    let (kills, versions) = kill_repeatedly("model");
    eprintln!("model folder: {kills} kills, {versions} versions written");
    assert!(versions > 0);
}

#[test]
fn metrics_survive_200_kills_mid_write() {
    let (kills, versions) = kill_repeatedly("metrics");
    eprintln!("metrics: {kills} kills, {versions} steps written");
    assert!(versions > 0);
}
