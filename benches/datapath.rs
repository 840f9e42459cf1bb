//! The whole data path, ours beside Python's, in one invocation: a million records of the
//! synthetic suite from JSONL to packed parquet. Ours is `moi-studio pack` (read, template,
//! tokenize, label, sample, pack in `moi` mode with the default prompt first, write the rows and
//! the mixed conversations); Python's is `benches/datapath.py` (`datasets`, `apply_chat_template`,
//! the same tokenizer, prompt labels masked, TRL's BFD `pack_dataset`, `to_parquet`). Both use the
//! Qwen3 tokenizer and its own chat template, 2,048-token rows, two processes/threads.
//!
//!   bash scripts/fetch_models.sh                 # the Qwen3 tokenizer, among others
//!   cargo bench --bench datapath -- [RECORDS]    # default 1,000,000
//!
//! The Python side needs `~/.cache/moi-bench-venv` with `datasets trl transformers` (or
//! `MOI_BENCH_PYTHON`); see benches/train.rs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MOI_BENCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(&std::env::var("HOME").ok()?).join(".cache/moi-bench-venv/bin/python");
    p.exists().then_some(p)
}

/// Runs `cmd` to its end with its output in files under `dir`, and returns whether it succeeded,
/// its stdout and stderr, and its own peak resident memory in MiB (`ru_maxrss` of this child
/// alone, from `wait4`: the synth step before it is not counted).
fn run_measured(cmd: &mut Command, dir: &Path, name: &str) -> (bool, String, String, f64) {
    let out = dir.join(format!("{name}.stdout"));
    let err = dir.join(format!("{name}.stderr"));
    // Reaped by wait4 below, which std does not know of.
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let mut status = 0;
    // SAFETY: wait4 writes the exit status and the usage into the values it is given; the child
    // is reaped here and not waited for again.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let pid = libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage);
        assert!(pid > 0, "wait4 failed");
        usage
    };
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (ok, read(&out), read(&err), usage.ru_maxrss as f64 / 1024.0)
}

fn main() {
    let records: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let tokenizer = root().join(".cache/tokenizers/qwen3");
    if !tokenizer.join("tokenizer.json").is_file() {
        println!("run scripts/fetch_models.sh first (it fetches the Qwen3 tokenizer)");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_moi-studio");
    let dir = tempfile::tempdir().expect("temp dir");
    // The suite's largest task gets 4/9 of the records.
    let largest = (records * 4).div_ceil(9).to_string();
    let status = Command::new(bin)
        .args(["synth", "--records", &largest, "--out"])
        .arg(dir.path())
        .output()
        .expect("synth");
    assert!(status.status.success(), "synth failed");
    let tk = tokenizer.display();
    let project = std::fs::read_to_string(dir.path().join("synth.moi.toml"))
        .expect("project")
        .replace("strategy = \"balanced\"", "strategy = \"natural\"")
        .replace("epochs = 2", "epochs = 1")
        .replace(
            "template = \"chatml\"",
            &format!(
                "template = \"tokenizer\"\ntokenizer = \"{tk}/tokenizer.json\"\n\
                 tokenizer_config = \"{tk}/tokenizer_config.json\""
            ),
        )
        .replace("max_seq_len = 512", "max_seq_len = 2048")
        .replace("eval_fraction = 0.1", "eval_fraction = 0.0");
    let project_path = dir.path().join("bench.moi.toml");
    std::fs::write(&project_path, project).expect("write project");
    let count: usize = ["general", "math", "code", "tool_use"]
        .iter()
        .map(|t| {
            std::fs::read_to_string(dir.path().join(format!("{t}.jsonl")))
                .map_or(0, |s| s.lines().count())
        })
        .sum();
    println!("{count} records, 2,048-token rows, Qwen3 tokenizer and chat template");

    let start = Instant::now();
    let (ok, stdout, stderr, ours_mib) = run_measured(
        Command::new(bin)
            .arg("pack")
            .arg(&project_path)
            .arg("--out")
            .arg(dir.path().join("ours")),
        dir.path(),
        "pack",
    );
    let ours_s = start.elapsed().as_secs_f64();
    assert!(ok, "pack failed: {stderr}");
    let line = stdout;
    println!(
        "  ours (moi-studio pack)          {ours_s:>7.1} s  peak RSS {ours_mib:>6.0} MiB  {}",
        line.lines()
            .last()
            .unwrap_or("")
            .split(" written")
            .next()
            .unwrap_or("")
    );

    let Some(py) = python() else {
        println!("  Python: not measured (no virtualenv; see benches/train.rs)");
        return;
    };
    let mut cmd = Command::new(py);
    cmd.arg(root().join("benches/datapath.py"))
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--out")
        .arg(dir.path().join("python"))
        .current_dir(dir.path());
    for (prompt, file) in [
        ("You are a helpful assistant.", "general.jsonl"),
        ("You are a mathematician.", "math.jsonl"),
        ("You are a programmer.", "code.jsonl"),
        (
            "You are an assistant that calls functions.",
            "tool_use.jsonl",
        ),
    ] {
        cmd.arg("--task").arg(format!("{prompt}={file}"));
    }
    let start = Instant::now();
    let out = cmd.output().expect("python");
    let py_s = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(result) = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    else {
        println!(
            "  Python: no result: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return;
    };
    let py_mib = result["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
    println!(
        "  Python (datasets + TRL BFD)     {py_s:>7.1} s  peak RSS {py_mib:>6.0} MiB  {} rows; phases {}",
        result["rows"], result["phases"]
    );
    println!(
        "  => ours / Python: {:.2}x faster, peak memory {:.2}x",
        py_s / ours_s,
        ours_mib / py_mib
    );
}
