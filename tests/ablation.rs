//! The synthetic demo suite and the ablation, from the command line: the shipped demo data is
//! what the generator writes, and a short ablation runs, resumes and reports.

use std::path::PathBuf;

use assert_cmd::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn studio() -> Command {
    let mut cmd = Command::cargo_bin("moi-studio").unwrap();
    cmd.current_dir(root());
    cmd
}

#[test]
fn the_shipped_demo_data_is_what_synth_writes_and_the_demo_opens_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = studio()
        .args(["synth", "--out"])
        .arg(dir.path())
        .args(["--seed", "42"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "general.jsonl",
        "math.jsonl",
        "code.jsonl",
        "tool_use.jsonl",
    ] {
        let made = std::fs::read(dir.path().join(name)).unwrap();
        let shipped = std::fs::read(root().join("assets/datasets/synth").join(name)).unwrap();
        assert!(
            made == shipped,
            "{name} differs from the generator's output"
        );
    }
    let demo =
        moi_studio::core::project::Project::load(&root().join("presets/demo.moi.toml")).unwrap();
    let names: Vec<&str> = demo.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["general", "math", "code", "tool use"]);
    for task in &demo.tasks {
        assert!(
            demo.resolve(&task.sources[0].path).is_file(),
            "{}",
            task.name
        );
    }
    // The generated project opens too.
    let made =
        moi_studio::core::project::Project::load(&dir.path().join("synth.moi.toml")).unwrap();
    assert_eq!(made.tasks.len(), 4);
}

/// A small copy of the demo: fewer records, short rows, quick evaluations.
fn small_suite(dir: &std::path::Path) -> std::path::PathBuf {
    let out = studio()
        .args(["synth", "--records", "160", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let path = dir.join("synth.moi.toml");
    let mut p = moi_studio::core::project::Project::load(&path).unwrap();
    p.packing.max_seq_len = 256;
    p.training.eval_items = 4;
    p.training.eval_generate = 2;
    p.training.checkpoint_every = 2;
    p.training.tiny.hidden_size = Some(32);
    p.training.tiny.layers = Some(1);
    for t in &mut p.tasks {
        t.max_new_tokens = 8;
    }
    p.save(&path).unwrap();
    path
}

#[test]
fn a_short_ablation_runs_reports_and_a_second_invocation_reuses_finished_runs() {
    let dir = tempfile::tempdir().unwrap();
    let project = small_suite(dir.path());
    let out = dir.path().join("ablation");
    let args = |cmd: &mut Command| {
        cmd.arg("ablate")
            .arg(&project)
            .arg("--out")
            .arg(&out)
            .args([
                "--variants",
                "concat,moi",
                "--tokens",
                "3000",
                "--seeds",
                "1",
                "--evals",
                "2",
            ]);
    };
    let mut cmd = studio();
    args(&mut cmd);
    let run = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    for name in ["results.md", "results.csv", "figure.png", "ablation.json"] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    // Two variants × four tasks × two prompt kinds.
    assert_eq!(csv.lines().count(), 1 + 2 * 4 * 2, "{csv}");
    assert!(csv.contains("moi,chunk,\"math\",default,"), "{csv}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        md.contains("| concat · chunk |") && md.contains("| moi · chunk |"),
        "{md}"
    );
    // Both runs trained on at least the budget, and evaluated twice under each prompt.
    let (plan, results) = moi_studio::train::ablate::load_ablation(&out).unwrap();
    assert_eq!(plan.runs().len(), 2);
    for (key, record) in &results.runs {
        assert!(record.finished, "{}", key.dir_name());
        assert!(
            record.tokens >= 3000,
            "{}: {}",
            key.dir_name(),
            record.tokens
        );
        let curve = record.curve("math", moi_studio::core::events::PromptKind::Default);
        assert_eq!(curve.len(), 2, "{}", key.dir_name());
        assert!(curve[0].tokens >= 1500 && curve[0].tokens < curve[1].tokens);
        // Per-task training losses were recorded at every step.
        assert!(record.task_loss.len() >= 3, "{:?}", record.task_loss.keys());
    }
    // Again with the same folder: nothing is retrained.
    let mut cmd = studio();
    args(&mut cmd);
    let again = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("finished before, reused").count(),
        2,
        "{stderr}"
    );
    // Another plan in the same folder is refused.
    let refused = studio()
        .arg("ablate")
        .arg(&project)
        .arg("--out")
        .arg(&out)
        .args(["--variants", "seq", "--tokens", "3000", "--seeds", "1"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("holds another ablation"));
}

#[test]
fn a_stopped_ablation_resumes_the_interrupted_run_from_its_checkpoint() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use moi_studio::core::ablation::{AblationPlan, Variant};
    use moi_studio::core::events::TrainEvent;
    use moi_studio::core::settings::AttentionLayout;
    use moi_studio::train::ablate::{AblationProgress, load_ablation, run_ablation};

    let dir = tempfile::tempdir().unwrap();
    let project_path = small_suite(dir.path());
    let project = moi_studio::core::project::Project::load(&project_path).unwrap();
    let out = dir.path().join("ablation");
    let plan = AblationPlan {
        variants: vec![Variant::Balanced, Variant::Moi],
        attentions: vec![AttentionLayout::Chunk],
        tokens: 4000,
        seeds: vec![7],
        evals: 1,
        model: "tiny".into(),
    };
    // Stop in the second run once it has written a checkpoint (every 2 steps here).
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let done = run_ablation(&project, &plan, &out, &stop, &mut |p| {
        if let AblationProgress::Event {
            index: 1,
            event: TrainEvent::Checkpoint { .. },
            ..
        } = p
        {
            flag.store(true, Ordering::SeqCst);
        }
    })
    .unwrap();
    assert!(!done, "the ablation was stopped");
    let (_, partial) = load_ablation(&out).unwrap();
    let second = &plan.runs()[1];
    assert!(!partial.runs[second].finished);
    let mut started = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let done = run_ablation(&project, &plan, &out, &stop, &mut |p| match p {
        AblationProgress::RunSkipped { index, .. } => started.push((index, false)),
        AblationProgress::RunStarted { index, resumed, .. } => started.push((index, resumed)),
        _ => {}
    })
    .unwrap();
    assert!(done);
    // The first run is reused, the second continues from its checkpoint.
    assert_eq!(started, [(0, false), (1, true)]);
    let (_, results) = load_ablation(&out).unwrap();
    let record = &results.runs[second];
    assert!(record.finished && record.tokens >= 4000);
    // The resumed run's metrics hold every step once: no duplicates, none missing.
    let text = std::fs::read_to_string(
        out.join("runs")
            .join(second.dir_name())
            .join("metrics.jsonl"),
    )
    .unwrap();
    let mut steps: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<TrainEvent>(l).ok())
        .filter_map(|e| match e {
            TrainEvent::Step(m) => Some(m.step),
            _ => None,
        })
        .collect();
    // Steps after the checkpoint may have been logged before the stop; the reader keeps the
    // later copy. Deduplicated, they run 1, 2, … without a gap.
    steps.dedup();
    let mut unique = steps.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique, (1..=*unique.last().unwrap()).collect::<Vec<_>>());
}
