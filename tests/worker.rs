//! The training worker end to end on the demo project with the built-in tiny model: events in
//! order, a run folder with every event, the model folder; Stop stops.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use moi_studio::core::events::{PromptKind, TrainCommand, TrainEvent};
use moi_studio::train::worker::{ModelChoice, RunSpec, resume_spec, spawn_run};

fn spec(runs: &std::path::Path, steps: u64) -> RunSpec {
    let mut project = common::quick_benchmarks();
    project.training.eval_items = 4;
    for task in &mut project.tasks {
        task.max_new_tokens = 8;
    }
    let mut spec = RunSpec::new(project, ModelChoice::Tiny);
    spec.max_steps = Some(steps);
    spec.runs_dir = runs.to_path_buf();
    spec.force_cpu = true;
    spec
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
    // The final evaluation: every task under its own prompt and the default one.
    let evals: Vec<_> = logged
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval(m) => Some(m),
            _ => None,
        })
        .collect();
    for task in ["math", "code", "tool use"] {
        for kind in [PromptKind::Task, PromptKind::Default] {
            let m = evals
                .iter()
                .find(|m| m.task == task && m.prompt == kind)
                .unwrap_or_else(|| panic!("no eval of {task} under the {kind:?} prompt"));
            assert_eq!(m.step, 4);
            assert!(m.loss.is_finite() && m.loss > 0.0);
            assert!((0.0..=1.0).contains(&m.accuracy));
            // Math and tool use declare answer checks in the demo; code does not.
            assert_eq!(m.exact_match.is_some(), task != "code", "{task}");
        }
    }
    assert!(logged.last().unwrap().is_terminal());
    for f in [
        "project.moi.toml",
        "run.json",
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

#[test]
fn a_lora_run_answers_eval_now_writes_an_adapter_and_resumes() {
    let runs = tempfile::tempdir().unwrap();
    let mut first = spec(runs.path(), 3);
    first.lora = Some(true);
    let handle = spawn_run(first, Arc::new(|| {})).unwrap();
    let run_dir = handle.run_dir.clone();
    // Synchronised on the protocol, not on timing: commands are read before every step, so a
    // pause sent now holds the run before its first step; "eval now" while paused evaluates at
    // once, and the run resumes only after its results came.
    handle.commands.send(TrainCommand::Pause).unwrap();
    handle.commands.send(TrainCommand::EvalNow).unwrap();
    let mut events = Vec::new();
    let mut resumed = false;
    while let Ok(e) = handle.events.recv() {
        if let TrainEvent::Step(m) = &e {
            assert!(resumed, "step {} ran while paused", m.step);
        }
        let evals_done = events
            .iter()
            .filter(|e| matches!(e, TrainEvent::Eval(_)))
            .count()
            + usize::from(matches!(e, TrainEvent::Eval(_)));
        let end = e.is_terminal();
        events.push(e);
        // Three tasks under two prompts each: the paused evaluation is complete.
        if !resumed && evals_done == 6 {
            handle.commands.send(TrainCommand::Resume).unwrap();
            resumed = true;
        }
        if end {
            break;
        }
    }
    handle.join();
    assert_eq!(events.last(), Some(&TrainEvent::Finished { step: 3 }));
    match events
        .iter()
        .find(|e| matches!(e, TrainEvent::Started { .. }))
    {
        Some(TrainEvent::Started {
            parameters,
            trainable,
            ..
        }) => assert!(*trainable > 0 && trainable * 20 < *parameters),
        other => panic!("{other:?}"),
    }
    // Eval now ran while paused before the first step, and again at the end of the run.
    let eval_steps: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval(m) => Some(m.step),
            _ => None,
        })
        .collect();
    assert_eq!(&eval_steps[..6], &[0; 6], "{eval_steps:?}");
    assert!(eval_steps.contains(&3), "{eval_steps:?}");

    // The PEFT adapter: config and PEFT-named tensors; the base it applies to is on disk.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    let base = PathBuf::from(config["base_model_name_or_path"].as_str().unwrap());
    assert!(base.join("model.safetensors").is_file());
    let names: Vec<String> = candle_core::safetensors::load(
        run_dir.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_keys()
    .collect();
    assert!(
        names.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        )
    );
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("base_model.model.model.layers."))
    );

    // Resuming the run carries on from its checkpoint to the new step count.
    let mut again = resume_spec(&run_dir).unwrap();
    again.max_steps = Some(5);
    let handle = spawn_run(again, Arc::new(|| {})).unwrap();
    assert_eq!(handle.run_dir, run_dir);
    let events = collect(&handle, None);
    handle.join();
    assert_eq!(events.last(), Some(&TrainEvent::Finished { step: 5 }));
    let first_step = events.iter().find_map(|e| match e {
        TrainEvent::Step(m) => Some(m.step),
        _ => None,
    });
    assert_eq!(first_step, Some(4));
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let steps = log
        .lines()
        .filter(|l| l.contains("\"event\":\"step\""))
        .count();
    assert_eq!(steps, 5, "one metrics file across both parts");
}

#[test]
fn a_phased_run_trains_its_phases_in_order_and_asks_chained_instructions() {
    use moi_studio::core::sit::{SitSettings, default_templates};
    let runs = tempfile::tempdir().unwrap();
    let mut s = spec(runs.path(), 9);
    s.project.training.phases.count = 3;
    for task in &mut s.project.tasks {
        task.sit = SitSettings {
            share: 0.5,
            steps: default_templates(),
        };
    }
    let handle = spawn_run(s, Arc::new(|| {})).unwrap();
    let events = collect(&handle, None);
    handle.join();
    assert_eq!(events.last(), Some(&TrainEvent::Finished { step: 9 }));
    let first_step = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Step(_)))
        .unwrap();
    let report = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Difficulty(_)))
        .expect("the difficulty report");
    assert!(report < first_step);
    let TrainEvent::Difficulty(d) = &events[report] else {
        unreachable!()
    };
    assert_eq!(d.records.len(), 3);
    let spread = d.records.iter().max().unwrap() - d.records.iter().min().unwrap();
    assert!(spread <= 3, "one record per task at most: {:?}", d.records);
    for (task, cuts) in &d.cuts {
        assert!(cuts.windows(2).all(|w| w[0] <= w[1]), "{task}: {cuts:?}");
    }
    // Phase boundaries in order: each phase starts where the last ended, the last ends the run.
    let phases: Vec<(&str, u32, u64)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::PhaseStarted { phase, step, .. } => Some(("start", *phase, *step)),
            TrainEvent::PhaseEnded { phase, step, .. } => Some(("end", *phase, *step)),
            _ => None,
        })
        .collect();
    assert_eq!(phases.len(), 6, "{phases:?}");
    for (k, (kind, phase, _)) in phases.iter().enumerate() {
        assert_eq!(*kind, if k % 2 == 0 { "start" } else { "end" });
        assert_eq!(*phase as usize, k / 2 + 1);
    }
    assert_eq!(phases[0].2, 0);
    for k in 0..2 {
        assert_eq!(phases[2 * k + 1].2, phases[2 * k + 2].2, "{phases:?}");
        assert!(phases[2 * k + 1].2 > phases[2 * k].2, "{phases:?}");
    }
    assert_eq!(phases[5].2, 9);
    // A step of phase 2 comes after phase 2 started.
    let start2 = events
        .iter()
        .position(|e| matches!(e, TrainEvent::PhaseStarted { phase: 2, .. }))
        .unwrap();
    let step_after = events[start2..]
        .iter()
        .find_map(|e| match e {
            TrainEvent::Step(m) => Some(m.step),
            _ => None,
        })
        .unwrap();
    assert_eq!(step_after, phases[2].2 + 1);
    // Every task is also asked chained instructions, under both prompts.
    let evals: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval(m) => Some(m),
            _ => None,
        })
        .collect();
    assert!(!evals.is_empty());
    for m in &evals {
        let done = m
            .steps_done
            .unwrap_or_else(|| panic!("{} {:?}", m.task, m.prompt));
        assert!((0.0..=1.0).contains(&done) && m.steps_tried >= 1);
    }
}

/// `moi-studio worker`, the studio's trainer process.
fn worker_process() -> moi_studio::train::process::TrainerProcess {
    moi_studio::train::process::TrainerProcess {
        program: env!("CARGO_BIN_EXE_moi-studio").into(),
        args: vec!["worker".into()],
        env: Vec::new(),
        memory_limit: None,
    }
}

fn step_losses(events: &[TrainEvent]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(m) => Some((m.step, m.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_run_in_the_trainer_process_trains_as_the_thread_does_and_takes_stop() {
    use moi_studio::train::process::spawn_run_process;
    let runs = tempfile::tempdir().unwrap();
    let thread = spawn_run(spec(runs.path(), 4), Arc::new(|| {})).unwrap();
    let on_thread = collect(&thread, None);
    thread.join();
    let process =
        spawn_run_process(spec(runs.path(), 4), Arc::new(|| {}), &worker_process()).unwrap();
    let run_dir = process.run_dir.clone();
    let in_process = collect(&process, None);
    process.join();
    // The spec crossed whole: the same steps, the same losses, the same ending.
    assert_eq!(in_process.last(), Some(&TrainEvent::Finished { step: 4 }));
    let (a, b) = (step_losses(&on_thread), step_losses(&in_process));
    assert_eq!(a.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(a.len(), b.len());
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-6, "step {s}: thread {x}, process {y}");
    }
    assert!(run_dir.join("model").is_dir() && run_dir.join("summary.json").is_file());

    let process =
        spawn_run_process(spec(runs.path(), 500), Arc::new(|| {}), &worker_process()).unwrap();
    let events = collect(&process, Some(2));
    process.join();
    match events.last() {
        Some(TrainEvent::Stopped { step }) => assert!((2..500).contains(step), "{step}"),
        other => panic!("expected a stop, got {other:?}"),
    }
}

#[test]
fn a_trainer_process_whose_studio_goes_away_stops_after_a_checkpoint() {
    use moi_studio::train::worker::TrainHandle;
    let runs = tempfile::tempdir().unwrap();
    let handle = moi_studio::train::process::spawn_run_process(
        spec(runs.path(), 500),
        Arc::new(|| {}),
        &worker_process(),
    )
    .unwrap();
    let TrainHandle {
        events,
        commands,
        run_dir,
        ..
    } = handle;
    let mut commands = Some(commands);
    let mut ending = None;
    while let Ok(e) = events.recv() {
        if matches!(e, TrainEvent::Step(_)) {
            // What a studio that is killed or crashes leaves: the trainer's stdin closes.
            commands.take();
        }
        if e.is_terminal() {
            ending = Some(e);
            break;
        }
    }
    match ending {
        Some(TrainEvent::Stopped { step }) => {
            assert!(step < 500, "{step}");
            assert!(run_dir.join(format!("checkpoint-{step}")).is_dir());
        }
        other => panic!("expected a stop, got {other:?}"),
    }
}
