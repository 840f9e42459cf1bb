//! The command line on real files: exit codes, text and JSON output.

mod common;

use std::path::PathBuf;

use assert_cmd::Command;
use serde_json::Value;

use common::root;

fn studio() -> Command {
    let mut cmd = Command::cargo_bin("moi-studio").unwrap();
    cmd.current_dir(root());
    cmd
}

fn json_of(output: &[u8]) -> Value {
    serde_json::from_slice(output)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(output)))
}

#[test]
fn import_json_report_of_a_good_file() {
    let out = studio()
        .args(["import", "assets/datasets/gsm8k.jsonl", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out.stdout);
    assert_eq!(v["format"], "alpaca");
    assert_eq!(v["records"], 100);
    assert_eq!(v["rejected"], 0);
    assert!(v["file"].as_str().unwrap().ends_with("gsm8k.jsonl"));
    assert_eq!(v["rejections"], Value::Array(vec![]));
}

#[test]
fn import_lists_rejections_with_lines() {
    let out = studio()
        .args(["import", "tests/data/bad_records.jsonl", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out.stdout);
    assert_eq!(v["records"], 3);
    assert_eq!(v["rejected"], 7);
    assert_eq!(v["rejections"][0]["line"], 2);
    assert_eq!(
        v["rejections"][0]["reason"],
        "\"output\" is a number, expected text"
    );

    let text = studio()
        .args(["import", "tests/data/bad_records.jsonl"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(text.stdout).unwrap();
    assert!(
        stdout.contains("3 records imported, 7 rejected"),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 2: \"output\" is a number, expected text"),
        "{stdout}"
    );
}

#[test]
fn import_exits_1_when_nothing_imports() {
    let out = studio()
        .args(["import", "tests/data/empty.jsonl", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out.stdout);
    assert_eq!(v["records"], 0);
    assert!(v["error"].as_str().unwrap().contains("empty"));

    let out = studio()
        .args(["import", "tests/data/image.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("PNG image") && stderr.contains("image.jsonl"),
        "{stderr}"
    );
}

#[test]
fn import_with_format_and_mapping() {
    let out = studio()
        .args([
            "import",
            "tests/data/code.csv",
            "--map",
            "user=question",
            "--map",
            "assistant=solution",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out.stdout);
    assert_eq!(v["records"], 3);
    assert_eq!(v["kind"], "csv");

    let bad = studio()
        .args(["import", "tests/data/code.csv", "--format", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown format 'nonsense'"));
}

#[test]
fn tasks_of_the_demo_project() {
    let out = studio()
        .args(["tasks", "presets/benchmarks.moi.toml", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out.stdout);
    assert_eq!(v["default_system_prompt"], "You are a helpful assistant.");
    let tasks = v["tasks"].as_array().unwrap();
    let summary: Vec<(String, u64, u64, u64)> = tasks
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["records"].as_u64().unwrap(),
                t["rejected"].as_u64().unwrap(),
                t["eval_records"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("math".to_string(), 100, 0, 10),
            ("code".to_string(), 164, 0, 16),
            ("tool use".to_string(), 400, 0, 40)
        ]
    );
    assert_eq!(tasks[1]["system_prompt"], "You are a programmer.");

    let text = studio()
        .args(["tasks", "presets/benchmarks.moi.toml"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(text.stdout).unwrap();
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("tool use") && l.contains("400")),
        "{stdout}"
    );
}

#[test]
fn tasks_reports_a_broken_project_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.moi.toml");
    std::fs::write(&path, "name = \"x\"\n[[tasks]]\nname = 3\n").unwrap();
    let out = studio().arg("tasks").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("line 3") && stderr.contains("p.moi.toml"),
        "{stderr}"
    );
}

#[test]
fn no_display_names_the_cli_commands() {
    let out = studio()
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("no display found"), "{stderr}");
    assert!(
        stderr.contains("moi-studio import") && stderr.contains("moi-studio tasks"),
        "{stderr}"
    );
}

/// The demo project, made quick: short rows, few eval items, short answers.
fn quick_demo(dir: &std::path::Path) -> PathBuf {
    common::quick_project(dir, |_| {})
}

#[test]
fn train_eval_export_and_resume_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let project = quick_demo(dir.path());
    let runs = dir.path().join("runs");
    let out = studio()
        .args([
            "train",
            project.to_str().unwrap(),
            "--steps",
            "2",
            "--lora",
            "--json",
            "--cpu",
        ])
        .args(["--out", runs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["event"], "finished");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "eval" && e["prompt"] == "default")
    );
    let run = std::fs::read_dir(&runs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();

    // eval: the per-task table, as JSON and as text.
    let out = studio()
        .args([
            "eval",
            project.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = json_of(&out.stdout);
    let results = table["results"].as_array().unwrap();
    assert_eq!(results.len(), 6, "3 tasks × 2 prompt kinds");
    assert!(
        results
            .iter()
            .all(|r| r["loss"].as_f64().unwrap() > 0.0 && r["step"] == 2)
    );
    let text = studio()
        .args([
            "eval",
            project.to_str().unwrap(),
            "--run",
            run.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("tool use") && text.contains("default") && text.contains("exact match"),
        "{text}"
    );

    // export: the HF folder and the PEFT adapter.
    let export = dir.path().join("export");
    let out = studio()
        .args([
            "export",
            "--run",
            run.to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "base/model.safetensors",
    ] {
        assert!(export.join(f).is_file(), "{f} missing");
    }
    // The adapter names the base copied beside it, not the run folder.
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(export.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let base = PathBuf::from(adapter["base_model_name_or_path"].as_str().unwrap());
    assert!(base.ends_with("export/base"), "{}", base.display());
    let tok_config: Value = serde_json::from_str(
        &std::fs::read_to_string(export.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        tok_config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    // The exported folder is a model `score` (and transformers) can load.
    let text_file = dir.path().join("t.txt");
    std::fs::write(&text_file, "What is 2 + 3? #### 5").unwrap();
    let out = studio()
        .args(["score", "--model", export.to_str().unwrap(), "--text-file"])
        .arg(&text_file)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(json_of(&out.stdout)["ppl"].as_f64().unwrap() > 1.0);

    // resume: two more steps in the same folder.
    let out = studio()
        .args([
            "train",
            "--resume",
            run.to_str().unwrap(),
            "--steps",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["event"], "finished");
    assert_eq!(last["step"], 4);

    // A folder that is not a run gets a message, not a panic.
    let out = studio()
        .args([
            "export",
            "--run",
            dir.path().to_str().unwrap(),
            "--out",
            export.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no finished model"));
}

#[test]
fn train_in_phases_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let project = quick_demo(dir.path());
    let runs = dir.path().join("runs");
    let train = |extra: &[&str]| {
        studio()
            .args(["train", project.to_str().unwrap(), "--steps", "6", "--json"])
            .args(["--cpu", "--out", runs.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = train(&[
        "--phases",
        "3",
        "--difficulty",
        "length",
        "--fresh-schedule",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let phases: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["event"] == "phase_started" || e["event"] == "phase_ended")
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["phase"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = (1..=3)
        .flat_map(|p| {
            [
                ("phase_started".to_string(), p),
                ("phase_ended".to_string(), p),
            ]
        })
        .collect();
    assert_eq!(phases, want);
    let difficulty = events.iter().find(|e| e["event"] == "difficulty").unwrap();
    assert!(
        difficulty["by"]
            .as_str()
            .unwrap()
            .contains("3 phases by length, a fresh schedule each"),
        "{difficulty}"
    );
    // A fresh schedule warms up again: the learning rate rises at the first step of each phase.
    let lr: Vec<f64> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .map(|e| e["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(lr.len(), 6);
    assert!(lr[2] < lr[1] || lr[4] < lr[3], "{lr:?}");

    // A column the files do not hold is named; phase options need phases.
    let out = train(&["--phases", "2", "--difficulty", "column:rating"]);
    assert!(!out.status.success());
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'rating'"), "{err}");
    // The loss difficulty scores every record with the model first, task by task, saying so.
    let out = train(&["--phases", "2", "--difficulty", "loss"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scored: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "log")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .filter(|m| m.starts_with("scored "))
        .collect();
    assert_eq!(scored.len(), 3, "{scored:?}");
    let last = scored.last().unwrap();
    let (done, total) = last
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(" records)"))
        .and_then(|r| r.split_once(" of "))
        .unwrap();
    assert_eq!(done, total, "{last}");

    let out = train(&["--difficulty", "loss"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need --phases 2 or more"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
