//! The training worker end to end on the demo project with the built-in tiny model: events in
//! order, a run folder with every event, the model folder; Stop stops.

use std::path::PathBuf;
use std::sync::Arc;

use moi_studio::core::events::{TrainCommand, TrainEvent};
use moi_studio::core::project::Project;
use moi_studio::train::worker::{ModelChoice, RunSpec, spawn_run};

fn spec(runs: &std::path::Path, steps: u64) -> RunSpec {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/demo.moi.toml");
    let mut project = Project::load(&path).unwrap();
    project.packing.max_seq_len = 128;
    project.training.batch_rows = 1;
    RunSpec {
        project,
        model: ModelChoice::Tiny,
        mode: None,
        max_steps: Some(steps),
        runs_dir: runs.to_path_buf(),
        force_cpu: true,
    }
}

fn collect(
    handle: &moi_studio::train::worker::TrainHandle,
    stop_after: Option<u64>,
) -> Vec<TrainEvent> {
    let mut events = Vec::new();
    while let Ok(e) = handle.events.recv() {
        if let (TrainEvent::Step(m), Some(n)) = (&e, stop_after)
            && m.step >= n
        {
            handle.commands.send(TrainCommand::Stop).unwrap();
        }
        let end = e.is_terminal();
        events.push(e);
        if end {
            break;
        }
    }
    events
}

#[test]
fn a_run_reports_in_order_and_leaves_a_complete_folder() {
    let runs = tempfile::tempdir().unwrap();
    let handle = spawn_run(spec(runs.path(), 4), Arc::new(|| {})).unwrap();
    let run_dir = handle.run_dir.clone();
    let events = collect(&handle, None);
    handle.join();
    let started = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Started { .. }))
        .expect("started");
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(m) => Some(m.step),
            _ => None,
        })
        .collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
    assert_eq!(steps.last(), Some(&4));
    let first_step = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Step(_)))
        .unwrap();
    assert!(started < first_step);
    assert_eq!(events.last(), Some(&TrainEvent::Finished { step: 4 }));
    match &events[started] {
        TrainEvent::Started {
            device,
            total_steps,
            parameters,
            ..
        } => {
            assert_eq!(device, "cpu");
            assert_eq!(*total_steps, 4);
            assert!(*parameters > 1_000_000);
        }
        _ => unreachable!(),
    }
    // metrics.jsonl holds every event, each step on its own line.
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let logged: Vec<TrainEvent> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let logged_steps = logged
        .iter()
        .filter(|e| matches!(e, TrainEvent::Step(_)))
        .count();
    assert_eq!(logged_steps, 4);
    assert!(logged.last().unwrap().is_terminal());
    for f in [
        "project.moi.toml",
        "summary.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "checkpoint-4/optimizer.safetensors",
    ] {
        assert!(run_dir.join(f).is_file(), "{f} missing");
    }
}

#[test]
fn stop_command_stops_the_run() {
    let runs = tempfile::tempdir().unwrap();
    let handle = spawn_run(spec(runs.path(), 500), Arc::new(|| {})).unwrap();
    let events = collect(&handle, Some(2));
    handle.join();
    match events.last() {
        Some(TrainEvent::Stopped { step }) => assert!((2..500).contains(step), "{step}"),
        other => panic!("expected a stop, got {other:?}"),
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainEvent::Checkpoint { .. }))
    );
}
