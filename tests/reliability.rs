//! Runs that survive a kill: a training run killed with SIGKILL and resumed with
//! `train --resume` trains the loss curve the uninterrupted run trains, with every step in
//! `metrics.jsonl` once; a checkpoint whose files no longer match their checksums is refused by
//! name and the one before it is used.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

mod common;
use common::quick_project;

const STEPS: u64 = 12;

fn studio() -> Command {
    Command::new(assert_cmd::cargo::cargo_bin("moi-studio"))
}

/// The quick benchmark project, a checkpoint every 4 steps, evaluation only at the end.
fn project(dir: &Path) -> PathBuf {
    quick_project(dir, |p| {
        p.training.checkpoint_every = 4;
        p.training.eval_every_steps = 0;
    })
}

/// The one run folder under `out`.
fn run_dir(out: &Path) -> PathBuf {
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("run.json").is_file())
        .expect("a run folder")
}

/// `train` with `args`, its JSON events read as they come; killed with SIGKILL once `kill_at`
/// says so of an event. Returns whether it was killed.
fn train_until(args: &[&str], kill_at: impl Fn(&Value) -> bool) -> bool {
    let mut child = studio()
        .args(args)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let Ok(event) = serde_json::from_str::<Value>(&line.unwrap()) else {
            continue;
        };
        if kill_at(&event) {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "train {args:?} failed: {status}");
    false
}

/// The quick project trained `steps` steps to the end in `dir`; its run folder.
fn finished_run(dir: &Path, steps: u64) -> PathBuf {
    let project = project(dir);
    let out = dir.join("run");
    let steps = steps.to_string();
    let args = [
        "train",
        project.to_str().unwrap(),
        "--steps",
        &steps,
        "--out",
        out.to_str().unwrap(),
    ];
    assert!(!train_until(&args, |_| false));
    run_dir(&out)
}

fn is(event: &Value, kind: &str, step: u64) -> bool {
    event["event"] == kind && event["step"] == step
}

/// The step losses in a run's `metrics.jsonl`, in file order.
fn logged_steps(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "step")
        .map(|e| (e["step"].as_u64().unwrap(), e["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_run_killed_twice_resumes_to_the_uninterrupted_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let project = project(dir.path());
    let project = project.to_str().unwrap();
    let steps = STEPS.to_string();

    let straight_out = dir.path().join("straight");
    let straight_out = straight_out.to_str().unwrap();
    assert!(!train_until(
        &["train", project, "--steps", &steps, "--out", straight_out],
        |_| false
    ));
    let straight = logged_steps(&run_dir(Path::new(straight_out)));
    assert_eq!(
        straight.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>()
    );

    let out = dir.path().join("killed");
    let out_s = out.to_str().unwrap();
    // Killed right after its first checkpoint is reported...
    assert!(train_until(
        &["train", project, "--steps", &steps, "--out", out_s],
        |e| is(e, "checkpoint", 4)
    ));
    let run = run_dir(&out);
    let run_s = run.to_str().unwrap();
    // ... then, resumed, killed in the middle of step 10: steps 9 and 10 come after the
    // checkpoint of step 8, and are trained again.
    assert!(train_until(
        &["train", "--resume", run_s, "--steps", &steps],
        |e| is(e, "step", 9)
    ));
    assert!(!train_until(
        &["train", "--resume", run_s, "--steps", &steps],
        |_| false
    ));
    let resumed = logged_steps(&run);
    assert_eq!(
        resumed.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>(),
        "every step once in metrics.jsonl"
    );
    for ((step, a), (_, b)) in straight.iter().zip(&resumed) {
        assert!(
            (a - b).abs() < 1e-5,
            "step {step}: {a} uninterrupted, {b} resumed"
        );
    }
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(summary["final_loss"].as_f64().is_some(), "{summary}");
}

#[test]
fn a_corrupt_checkpoint_is_refused_by_name_and_the_one_before_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let run = finished_run(dir.path(), 8);
    // One flipped byte in the newest checkpoint's optimizer state.
    let damaged = run.join("checkpoint-8/optimizer.safetensors");
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&damaged, bytes).unwrap();

    let events = resumed(&run, 10);
    let logs: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "log")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        logs.iter().any(|m| m.contains("refusing a checkpoint")
            && m.contains("checkpoint-8")
            && m.contains("optimizer.safetensors")),
        "{logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|m| m.contains("resuming from") && m.contains("checkpoint-4")),
        "{logs:#?}"
    );
    // Steps 5 to 10 are trained from the checkpoint of step 4, each logged once.
    let steps: Vec<u64> = logged_steps(&run).iter().map(|s| s.0).collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
}

/// The JSON events of a finished `train` command, and whether it succeeded.
fn events_of(output: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `train --resume run --steps steps --json`, which must succeed; its events.
fn resumed(run: &Path, steps: u64) -> Vec<Value> {
    let output = studio()
        .args(["train", "--resume", run.to_str().unwrap(), "--steps"])
        .arg(steps.to_string())
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    events_of(&output)
}

fn failure_of(events: &[Value]) -> String {
    events
        .iter()
        .find(|e| e["event"] == "failed")
        .and_then(|e| e["error"].as_str())
        .unwrap_or_else(|| panic!("no failed event in {events:#?}"))
        .to_string()
}

#[test]
fn a_full_disk_while_a_checkpoint_is_written_fails_the_run_and_keeps_the_last_one() {
    let dir = tempfile::tempdir().unwrap();
    let run = finished_run(dir.path(), 4);
    let run_s = run.to_str().unwrap();
    let model_bytes = std::fs::metadata(run.join("checkpoint-4/model.safetensors"))
        .unwrap()
        .len();
    // Resumed with no file allowed to grow past half a checkpoint's weights (a disk that
    // fills): SIGXFSZ is ignored, so the write fails with EFBIG as it would with ENOSPC.
    let limit_kib = model_bytes / 2 / 1024;
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f {limit_kib}; trap '' XFSZ; exec \"$0\" \"$@\""
        ))
        .arg(assert_cmd::cargo::cargo_bin("moi-studio"))
        .args(["train", "--resume", run_s, "--steps", "12", "--json"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let events = events_of(&output);
    let error = failure_of(&events);
    assert!(
        error.contains("could not write the checkpoint of step 8")
            && error.contains("checkpoint-4 is kept"),
        "{error}"
    );
    // Steps 5 to 8 trained; no checkpoint of step 8, no half-written folder; the last one whole.
    assert!(events.iter().any(|e| is(e, "step", 8)));
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint"))
        .collect();
    assert_eq!(names, ["checkpoint-4"]);
    // With room again, the run resumes from it to the end.
    assert!(!train_until(
        &["train", "--resume", run_s, "--steps", "12"],
        |_| false
    ));
    let steps: Vec<u64> = logged_steps(&run).iter().map(|s| s.0).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn a_nan_mid_run_stops_it_with_a_message_and_it_resumes_from_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let project = project(dir.path());
    let out = dir.path().join("run");
    let output = studio()
        .env("MOI_TEST_NAN_AT_STEP", "7")
        .args([
            "train",
            project.to_str().unwrap(),
            "--steps",
            "12",
            "--json",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let events = events_of(&output);
    let error = failure_of(&events);
    assert!(
        error.contains("became NaN at step 7") && error.contains("last good checkpoint"),
        "{error}"
    );
    assert!(
        !events.iter().any(|e| is(e, "step", 7)),
        "step 7 was not trained"
    );
    let run = run_dir(&out);
    assert!(run.join("checkpoint-4").is_dir());
    resumed(&run, 12);
    let steps = logged_steps(&run);
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert!(steps.iter().all(|(_, loss)| loss.is_finite()), "{steps:?}");
}

#[test]
fn checkpoints_left_half_replaced_by_a_kill_are_put_back() {
    use moi_studio::train::trainer::recover_checkpoints;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in [
        "checkpoint-4",
        ".checkpoint-8.old", // moved aside, its replacement never arrived
        "checkpoint-12",
        ".checkpoint-12.old", // moved aside, replaced
        ".checkpoint-x7Yq2a", // a temporary folder half written
    ] {
        std::fs::create_dir(d.join(name)).unwrap();
        std::fs::write(d.join(name).join("trainer_state.json"), name).unwrap();
    }
    recover_checkpoints(d).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-12", "checkpoint-4", "checkpoint-8"]);
    assert_eq!(
        std::fs::read_to_string(d.join("checkpoint-8/trainer_state.json")).unwrap(),
        ".checkpoint-8.old"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("checkpoint-12/trainer_state.json")).unwrap(),
        "checkpoint-12"
    );
}
