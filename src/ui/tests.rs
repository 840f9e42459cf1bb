//! The studio driven through its widgets (egui_kittest, no GPU, no window): import, prompt
//! editing and saving, packing settings, training with live plots, Stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;

use crate::core::events::TrainEvent;
use crate::core::packing::PackMode;
use crate::core::project::Project;
use crate::ui::{StudioApp, Tab};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo project saved into `dir` (its sources still point at the shipped data), made quick
/// for training: short rows, few eval items, short answers.
fn demo_copy(dir: &Path) -> PathBuf {
    let mut p = Project::load(&root().join("presets/benchmarks.moi.toml")).unwrap();
    p.packing.max_seq_len = 128;
    p.training.batch_rows = 1;
    p.training.eval_items = 2;
    p.training.eval_generate = 1;
    p.training.eval_every_steps = 0;
    for t in &mut p.tasks {
        t.max_new_tokens = 4;
    }
    let path = dir.join("demo.moi.toml");
    p.save(&path).unwrap();
    path
}

/// A harness over the app, and the channel its workers wake it through.
fn harness(
    make: impl FnOnce(crate::core::events::Wake) -> StudioApp,
) -> (Harness<'static, StudioApp>, Receiver<()>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let app = make(Arc::new(move || {
        let _ = tx.send(());
    }));
    let mut h = Harness::builder()
        .with_size(egui::vec2(1360.0, 880.0))
        .build_ui_state(|ui, app: &mut StudioApp| app.ui_root(ui), app);
    h.run_steps(2);
    (h, rx)
}

/// Steps frames as workers report until `done` holds (a frame per wake; no sleeping).
fn wait_until(
    h: &mut Harness<'static, StudioApp>,
    wake: &Receiver<()>,
    what: &str,
    done: impl Fn(&StudioApp) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done(h.state()) {
        let left = deadline.saturating_duration_since(Instant::now());
        match wake.recv_timeout(left.min(Duration::from_secs(2))) {
            Ok(()) => {
                while wake.try_recv().is_ok() {}
                h.step();
            }
            Err(_) => {
                // Work that starts inside a frame (the next preview) needs one more frame.
                h.step();
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
            }
        }
    }
    h.run_steps(2);
}

fn settled(app: &StudioApp) -> bool {
    !app.is_loading() && !app.preview_pending()
}

#[test]
fn importing_a_file_by_path_shows_its_task_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut h, wake) = harness(|w| {
        let mut app = StudioApp::empty(w);
        app.project_mut().base_dir = dir.path().to_path_buf();
        app
    });
    h.state_mut()
        .import_paths(&[root().join("tests/data/bad_records.jsonl")]);
    h.step();
    wait_until(&mut h, &wake, "the import", |a| !a.is_loading());
    // The task list shows the new task with its counts; the report lists the rejections.
    assert!(
        h.query_all_by_label("bad_records").count() >= 2,
        "task list and table"
    );
    h.get_by_label("3 records, 7 rejected");
    assert_eq!(h.state().project().tasks.len(), 1);
    h.get_by_label("Show rejected").click();
    h.run_steps(2);
    assert!(
        h.query_by_label_contains("missing field \"output\"")
            .is_some()
    );
}

#[test]
fn an_edited_system_prompt_is_in_the_saved_project_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    let editor = h.get_by_role_and_label(Role::MultilineTextInput, "System prompt of math");
    editor.focus();
    editor.type_text(" Check your arithmetic.");
    h.run_steps(2);
    assert!(h.state().is_dirty());
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::S);
    h.run_steps(2);
    let saved = std::fs::read_to_string(&path).unwrap();
    assert!(
        saved.contains("give the final answer after ####. Check your arithmetic."),
        "{saved}"
    );
    assert!(!h.state().is_dirty());
    // A preset replaces the prompt; Undo brings the typed one back.
    let typed = h.state().project().tasks[0].system_prompt.clone();
    h.get_all_by_label("Presets")
        .nth(1)
        .expect("the task's presets")
        .click();
    h.run_steps(2);
    h.get_by_label("Programmer (code)").click();
    h.run_steps(2);
    assert_eq!(
        h.state().project().tasks[0].system_prompt,
        "You are a programmer."
    );
    h.get_all_by_label("Undo")
        .nth(1)
        .expect("the task's undo")
        .click();
    h.run_steps(2);
    assert_eq!(h.state().project().tasks[0].system_prompt, typed);
}

#[test]
fn switching_the_packing_mode_changes_the_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    h.state_mut().set_tab(Tab::Packing);
    // Rows longer than the tiny model reads: the preview shows them as the trainer cuts them,
    // and says so.
    h.state_mut().project_mut().packing.max_seq_len = 1024;
    wait_until(&mut h, &wake, "the first preview", |a| {
        settled(a) && a.packing_preview().is_some_and(|p| p.max_seq_len == 512)
    });
    assert_eq!(
        h.state().project().packing.max_seq_len,
        1024,
        "the setting stays"
    );
    assert!(
        h.query_all_by_label_contains("rows cut to 512 tokens")
            .count()
            >= 1,
        "the cut is shown"
    );
    let moi = h.state().packing_preview().cloned().expect("a preview");
    assert_eq!(moi.mode, PackMode::Moi);
    h.get_by_label("Mode").click();
    h.run_steps(2);
    h.get_by_label("seq").click();
    h.run_steps(1);
    assert_eq!(h.state().project().packing.mode, PackMode::Seq);
    wait_until(&mut h, &wake, "the new preview", |a| {
        settled(a) && a.packing_preview().is_some_and(|p| p.mode == PackMode::Seq)
    });
    let seq = h.state().packing_preview().cloned().unwrap();
    // One sample per row: many more rows, far more padding.
    assert!(seq.rows > moi.rows, "{} vs {}", seq.rows, moi.rows);
    assert!(seq.padding > moi.padding);
    assert!(h.query_all_by_label(&seq.rows.to_string()).count() >= 1);
}

#[test]
fn training_plots_its_loss_and_finishes_and_stop_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    h.state_mut().set_tab(Tab::Train);
    // Start trains the project's whole schedule unless the user asks for fewer steps.
    assert_eq!(h.state().steps_override, None);
    h.state_mut().steps_override = Some(3);
    h.run_steps(1);
    h.get_by_label("Start").click();
    h.run_steps(1);
    assert!(h.state().is_training());
    wait_until(&mut h, &wake, "the run's end", |a| {
        a.history().ending.is_some()
    });
    assert_eq!(
        h.state().history().ending,
        Some(TrainEvent::Finished { step: 3 })
    );
    // Three points in the loss plot, evaluation points for every task and prompt kind.
    assert_eq!(h.state().history().loss.points().len(), 3);
    assert_eq!(h.state().history().latest_eval.len(), 6);
    assert!(
        h.query_by_label_contains("finished · step 3/3 · epoch")
            .is_some()
    );
    let run = h.state().run_dir().unwrap().to_path_buf();
    assert!(run.join("model/model.safetensors").is_file());

    // A long run, stopped by the button.
    h.state_mut().steps_override = Some(10_000);
    h.run_steps(1);
    h.get_by_label("Start").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "a first step", |a| a.history().step >= 1);
    h.get_by_label("Stop").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the stop", |a| a.history().ending.is_some());
    match &h.state().history().ending {
        Some(TrainEvent::Stopped { step }) => assert!(*step < 10_000),
        other => panic!("expected a stop, got {other:?}"),
    }
    assert!(!h.state().is_training());
    // Both runs are listed in the Runs tab.
    h.state_mut().set_tab(Tab::Runs);
    h.run_steps(2);
    assert_eq!(h.state().runs.len(), 2);

    // The finished run exports to GGUF into the folder typed in the tab, and the project to a
    // recipe, each on a worker with the result in the status line.
    assert_eq!(h.query_all_by_label("GGUF…").count(), 2);
    h.get_by_label("Export recipe…");
    let gguf = dir.path().join("gguf");
    h.state_mut().gguf_quant = crate::train::gguf_export::Quant::Q8_0;
    h.get_by_label("Export to").click();
    h.run_steps(1);
    h.get_by_label("Export to")
        .type_text(gguf.to_str().unwrap());
    h.run_steps(1);
    assert_eq!(h.state().export_path, gguf.to_str().unwrap());
    // Each listed run has its button, in the list's order.
    let finished = h.state().runs.iter().position(|r| r.dir == run).unwrap();
    h.query_all_by_label("GGUF…").nth(finished).unwrap().click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the GGUF export", |a| a.export_job.is_none());
    assert!(
        gguf.join("model.q8_0.gguf").is_file(),
        "{}",
        h.state().status
    );
    assert!(gguf.join("Modelfile").is_file());
    assert!(h.query_by_label_contains("model.q8_0.gguf").is_some());
    let recipe = dir.path().join("recipe");
    h.state_mut().export_path = recipe.to_str().unwrap().to_string();
    h.run_steps(1);
    h.get_by_label("Export recipe…").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the recipe", |a| a.export_job.is_none());
    assert!(
        recipe.join("train.parquet").is_file(),
        "{}",
        h.state().status
    );
    assert!(recipe.join("train.py").is_file());
    assert!(
        h.query_by_label_contains("recipe written").is_some(),
        "{}",
        h.state().status
    );
}

#[test]
fn a_broken_project_shows_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.moi.toml");
    std::fs::write(&path, "name = \n").unwrap();
    let (h, _) = harness(|w| StudioApp::open(path.clone(), w));
    assert!(
        h.query_all_by_label_contains("bad project file")
            .next()
            .is_some()
    );
}

#[test]
fn looking_at_the_packing_tab_changes_no_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let mut p = Project::load(&path).unwrap();
    p.packing.attention = crate::core::packing::AttentionLayout::Full;
    p.packing.reset_position_ids = true;
    p.save(&path).unwrap();
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    h.state_mut().set_tab(Tab::Packing);
    wait_until(&mut h, &wake, "the preview", |a| {
        settled(a) && a.packing_preview().is_some()
    });
    h.run_steps(3);
    let shown = &h.state().project().packing;
    assert_eq!(shown, &p.packing, "the tab rewrote a setting");
    assert!(!h.state().is_dirty());
}

#[test]
fn editing_the_eval_share_redraws_the_split_the_preview_and_the_table_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the preview", |a| {
        settled(a) && a.packing_preview().is_some()
    });
    let records = h.state().data()[0].as_ref().unwrap().records.len();
    h.state_mut().project_mut().tasks[0].eval_fraction = 0.3;
    h.run_steps(2);
    wait_until(&mut h, &wake, "the new preview", settled);
    let held_out = crate::core::split::eval_count(records, 0.3);
    let data = h.state().data()[0].clone().unwrap();
    assert_eq!(data.eval_records(), held_out, "the table's split");
    let trained = h
        .state()
        .preview
        .bundle
        .as_ref()
        .map(|(_, b)| b.prepared.tasks[0].samples.len());
    assert_eq!(trained, Some(records - held_out), "the preview's split");
    // The trainer draws the same split from the project as it is now.
    let project = h.state().project().clone();
    let fresh = crate::core::dataset::load_task(&project, 0, &project.tasks[0], &mut |_| {});
    assert_eq!(fresh.is_eval, data.is_eval);
}

#[test]
fn a_past_ablation_shows_its_curves_and_results_in_the_experiments_tab() {
    use crate::core::ablation::{AblationPlan, RunKey, Variant};
    use crate::core::events::{EvalMetrics, PromptKind, StepMetrics};
    use crate::core::settings::AttentionLayout;
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let project = Project::load(&path).unwrap();
    let folder = crate::ui::experiments_tab::ablations_dir(&project).join("20260101-000000");
    let plan = AblationPlan {
        variants: vec![Variant::Concat, Variant::Moi],
        attentions: vec![AttentionLayout::Chunk],
        tokens: 2000,
        seeds: vec![1],
        evals: 1,
        model: "tiny".into(),
    };
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("ablation.json"),
        serde_json::to_string(&plan).unwrap(),
    )
    .unwrap();
    for (key, em) in plan.runs().into_iter().zip([0.25, 0.75]) {
        let run = folder.join("runs").join(RunKey::dir_name(&key));
        std::fs::create_dir_all(&run).unwrap();
        let mut events = vec![TrainEvent::Step(StepMetrics {
            step: 1,
            tokens_seen: 2000,
            steps: 1,
            ..StepMetrics::default()
        })];
        for prompt in [PromptKind::Default, PromptKind::Task] {
            events.push(TrainEvent::Eval(EvalMetrics {
                step: 1,
                task: "math".into(),
                prompt,
                loss: 1.0,
                perplexity: 1.0f64.exp(),
                accuracy: 0.5,
                exact_match: Some(if prompt == PromptKind::Task { 1.0 } else { em }),
                items: 4,
                generated: 4,
                tokens: 10,
                sample: None,
                steps_done: None,
                steps_tried: 0,
            }));
        }
        events.push(TrainEvent::Finished { step: 1 });
        let text: String = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        std::fs::write(run.join("metrics.jsonl"), text).unwrap();
    }
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    h.state_mut().set_tab(Tab::Experiments);
    h.run_steps(2);
    h.get_by_label("Show").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the ablation", |a| {
        a.experiments.plan.is_some()
    });
    assert!(h.state().experiments.complete);
    // One row per variant and prompt kind, the gap beside the default-prompt rows.
    assert_eq!(h.query_all_by_label("moi · chunk").count(), 2);
    assert!(h.query_by_label("+75.0").is_some(), "concat's gap");
    assert!(h.query_by_label("+25.0").is_some(), "moi's gap");
    assert!(h.query_by_label("Run ablation").is_some());
}

#[test]
fn chained_instructions_are_set_per_task_and_marked_in_the_browsers() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the preview", |a| {
        settled(a) && a.packing_preview().is_some()
    });
    h.get_by_label_contains("Sequential instructions (off)")
        .click();
    h.run_steps(2);
    h.get_by_label("Add the standard step templates").click();
    h.run_steps(2);
    assert_eq!(
        h.state().project().tasks[0].sit.steps,
        crate::core::sit::default_templates()
    );
    // A template typed wrong is refused at the field, with the reason.
    h.state_mut().project_mut().tasks[0].sit.steps[0].answer = "{answr}".into();
    h.run_steps(2);
    assert!(
        h.query_by_label_contains("uses {answr}").is_some(),
        "the error under the field"
    );
    h.state_mut().project_mut().tasks[0].sit.steps[0] =
        crate::core::sit::default_templates()[0].clone();
    h.state_mut().project_mut().tasks[0].sit.share = 0.5;
    h.run_steps(2);
    wait_until(&mut h, &wake, "the new preview", settled);
    // The preview trains half of the task's records as chains, and saves them in the project.
    let chained = h
        .state()
        .preview
        .bundle
        .as_ref()
        .map(|(_, b)| {
            b.prepared.tasks[0]
                .composed
                .iter()
                .filter(|c| c.is_some())
                .count()
        })
        .unwrap();
    let trained = h
        .state()
        .preview
        .bundle
        .as_ref()
        .map(|(_, b)| b.prepared.tasks[0].samples.len())
        .unwrap();
    assert!(
        chained * 3 > trained && chained * 3 < trained * 2,
        "{chained} of {trained}"
    );
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::S);
    h.run_steps(2);
    let saved = Project::load(&path).unwrap();
    assert_eq!(saved.tasks[0].sit.share, 0.5);
    // The record browser says which records are chained.
    let data = h.state().data()[0].clone().unwrap();
    let loaded: Vec<Option<&crate::core::dataset::TaskData>> = vec![Some(&data)];
    let first = (0..data.records.len())
        .find(|&i| {
            !data.is_eval[i] && crate::core::chains::compose_one(&saved, &loaded, 0, i).is_some()
        })
        .unwrap();
    h.state_mut().record_index = first;
    h.run_steps(2);
    assert!(h.query_by_label_contains("chained instruction").is_some());
}

/// The losses of every step line in a run's `metrics.jsonl`, in order.
fn step_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<TrainEvent>(l).ok())
        .filter_map(|e| match e {
            TrainEvent::Step(m) => Some((m.step, m.loss)),
            _ => None,
        })
        .collect()
}

#[test]
fn closing_the_window_mid_run_stops_it_and_the_reopened_studio_resumes_it_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    // Close the window (the close path eframe calls) once a step is done. A run that ends
    // before the close takes effect proves nothing, so it is tried again with more steps.
    let mut steps = 24;
    let (run, stopped_at) = loop {
        let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
        wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
        h.state_mut().set_tab(Tab::Train);
        h.state_mut().steps_override = Some(steps);
        h.run_steps(1);
        h.get_by_label("Start").click();
        h.run_steps(1);
        wait_until(&mut h, &wake, "a first step", |a| a.history().step >= 1);
        eframe::App::on_exit(h.state_mut(), None);
        assert!(!h.state().is_training());
        let run = h.state().run_dir().unwrap().to_path_buf();
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        let at = summary["steps"].as_u64().unwrap();
        if summary["ending"] == "stopped" && at < steps {
            assert!(run.join(format!("checkpoint-{at}")).is_dir());
            break (run, at);
        }
        steps *= 4;
        assert!(steps < 10_000, "every run ended before the window closed");
    };

    // Reopened, the Runs tab shows it stopped and offers Resume.
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    h.state_mut().set_tab(Tab::Runs);
    h.run_steps(2);
    let listed = h.state().runs.iter().find(|r| r.dir == run).unwrap();
    assert!(listed.resumable);
    let row = h
        .state()
        .runs
        .iter()
        .filter(|r| r.resumable)
        .position(|r| r.dir == run)
        .unwrap();
    assert!(h.query_all_by_label("stopped").count() >= 1);
    h.query_all_by_label("Resume").nth(row).unwrap().click();
    h.run_steps(1);
    assert!(h.state().is_training(), "{}", h.state().status);
    assert_eq!(h.state().run_dir(), Some(run.as_path()));
    wait_until(&mut h, &wake, "the resumed run's end", |a| {
        a.history().ending.is_some()
    });
    assert_eq!(
        h.state().history().ending,
        Some(TrainEvent::Finished { step: steps })
    );
    // The curve is whole: the steps before the close were drawn again from the record.
    let drawn: Vec<f64> = h
        .state()
        .history()
        .loss
        .points()
        .iter()
        .map(|p| p[0])
        .collect();
    assert_eq!(drawn, (1..=steps).map(|s| s as f64).collect::<Vec<_>>());
    assert!(stopped_at < steps);

    // Every step once, each loss as in a run that was never interrupted.
    let resumed = step_losses(&run);
    assert_eq!(
        resumed.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    let project = Project::load(&run.join("project.moi.toml")).unwrap();
    let mut spec = crate::train::worker::RunSpec::new(project, h.state().model.choice());
    spec.runs_dir = dir.path().join("reference");
    spec.name = Some("whole".into());
    let handle = crate::train::worker::spawn_run(spec, Arc::new(|| {})).unwrap();
    while let Ok(event) = handle.events.recv() {
        if event.is_terminal() {
            assert_eq!(event, TrainEvent::Finished { step: steps });
            break;
        }
    }
    let whole_dir = handle.run_dir.clone();
    handle.join();
    let whole = step_losses(&whole_dir);
    assert_eq!(whole.len(), resumed.len());
    for ((s, a), (_, b)) in resumed.iter().zip(&whole) {
        assert!(
            (a - b).abs() < 1e-5,
            "step {s}: resumed {a}, uninterrupted {b}"
        );
    }
}

#[test]
fn a_project_file_changed_on_disk_is_not_overwritten_without_asking() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    h.state_mut().project.default_system_prompt = "Mine.".into();
    // Another program edits the file while the studio has it open.
    let theirs = std::fs::read_to_string(&path)
        .unwrap()
        .replace("You are a helpful assistant.", "Theirs.");
    assert!(theirs.contains("Theirs."));
    std::fs::write(&path, &theirs).unwrap();
    h.state_mut().save_project();
    h.run_steps(2);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), theirs);
    assert!(
        h.query_by_label_contains("Saving now would overwrite")
            .is_some()
    );
    h.get_by_label("Cancel").click();
    h.run_steps(2);
    assert!(h.state().save_conflict.is_none());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), theirs);

    // Asked again, "Overwrite with mine" writes the studio's project.
    h.state_mut().save_project();
    h.run_steps(2);
    h.get_by_label("Overwrite with mine").click();
    h.run_steps(2);
    let saved = Project::load(&path).unwrap();
    assert_eq!(saved.default_system_prompt, "Mine.");
    // Saving what the studio itself wrote asks nothing.
    h.state_mut().project.default_system_prompt = "Mine again.".into();
    h.state_mut().save_project();
    h.run_steps(2);
    assert!(h.state().save_conflict.is_none());
    assert_eq!(
        Project::load(&path).unwrap().default_system_prompt,
        "Mine again."
    );

    // "Reload from disk" takes the other program's version and drops the edit made here.
    let theirs = std::fs::read_to_string(&path)
        .unwrap()
        .replace("Mine again.", "Theirs again.");
    std::fs::write(&path, &theirs).unwrap();
    h.state_mut().project.default_system_prompt = "Lost.".into();
    h.state_mut().save_project();
    h.run_steps(2);
    h.get_by_label("Reload from disk").click();
    h.run_steps(2);
    assert_eq!(h.state().project.default_system_prompt, "Theirs again.");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), theirs);
}

#[test]
fn bad_training_settings_are_refused_at_their_field_and_never_start_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    h.state_mut().set_tab(Tab::Train);
    h.run_steps(2);
    assert!(!start_disabled(&h));
    // A negative learning rate typed into its field.
    type_into(&mut h, "Learning rate", "-0.01");
    h.run_steps(2);
    assert!(
        h.state().project.training.lr < 0.0,
        "{}",
        h.state().project.training.lr
    );
    assert!(
        h.query_by_label_contains("the learning rate must be above 0")
            .is_some()
    );
    assert!(start_disabled(&h));
    // Zero rows per batch, likewise.
    h.state_mut().project.training.lr = 1e-3;
    type_into(&mut h, "Rows per batch", "0");
    h.run_steps(2);
    assert_eq!(h.state().project.training.batch_rows, 0);
    assert!(
        h.query_by_label_contains("a batch needs at least 1 row")
            .is_some()
    );
    assert!(start_disabled(&h));
    // Nothing reaches the worker, whatever calls it; nor is such a project saved.
    h.state_mut().start_training();
    assert!(!h.state().is_training());
    assert!(
        h.state().status.contains("a batch needs at least 1 row"),
        "{}",
        h.state().status
    );
    h.state_mut().save_project();
    assert!(
        h.state().status.starts_with("not saved"),
        "{}",
        h.state().status
    );
    assert_eq!(Project::load(&path).unwrap().training.batch_rows, 1);
    h.state_mut().project.training.batch_rows = 2;
    h.run_steps(2);
    assert!(!start_disabled(&h));
}

#[test]
fn a_row_length_above_the_models_context_is_refused_at_its_field_with_a_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    h.state_mut().set_tab(Tab::Packing);
    h.run_steps(2);
    type_into(&mut h, "Max sequence length", "1024");
    h.run_steps(2);
    assert_eq!(h.state().project.packing.max_seq_len, 1024, "kept as typed");
    wait_until(&mut h, &wake, "the preview", |a| {
        settled(a) && a.preview.model_context.is_some()
    });
    let why = "the row length 1024 is above the 512 tokens the model reads";
    assert_eq!(h.query_all_by_label(why).count(), 1);
    h.state_mut().set_tab(Tab::Train);
    h.run_steps(2);
    assert!(start_disabled(&h));
    // Refused whatever calls it, also before any preview has read the model's context.
    let known = h.state_mut().preview.model_context.take();
    h.state_mut().start_training();
    assert!(!h.state().is_training());
    assert!(h.state().status.contains(why), "{}", h.state().status);
    h.state_mut().preview.model_context = known;
    // The way out: one click sets what the model reads.
    h.state_mut().set_tab(Tab::Packing);
    h.run_steps(2);
    h.get_by_label("Use 512").click();
    h.run_steps(2);
    assert_eq!(h.state().project.packing.max_seq_len, 512);
    assert_eq!(h.query_all_by_label(why).count(), 0);
    h.state_mut().set_tab(Tab::Train);
    h.run_steps(2);
    assert!(!start_disabled(&h));
}

/// Types `text` over the value of the number field labelled `label`, then Enter.
fn type_into(h: &mut Harness<'static, StudioApp>, label: &str, text: &str) {
    h.get_by_role_and_label(Role::SpinButton, label).click();
    h.run_steps(1);
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_role_and_label(Role::SpinButton, label)
        .type_text(text);
    h.key_press(egui::Key::Enter);
}

fn start_disabled(h: &Harness<'static, StudioApp>) -> bool {
    use egui_kittest::kittest::NodeT;
    h.get_by_label("Start").accesskit_node().is_disabled()
}

#[test]
fn a_dataset_changed_or_deleted_while_open_gives_a_message_and_offers_re_import() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("facts.jsonl");
    let line = |i: usize| format!("{{\"instruction\":\"Fact {i}?\",\"output\":\"Yes {i}.\"}}\n");
    std::fs::write(&file, (0..5).map(line).collect::<String>()).unwrap();
    let (mut h, wake) = harness(StudioApp::empty);
    h.state_mut().import_paths(std::slice::from_ref(&file));
    wait_until(&mut h, &wake, "the import", |a| a.all_data_loaded());
    let records = |a: &StudioApp| a.data[0].as_ref().map(|d| d.records.len());
    assert_eq!(
        records(h.state()),
        Some(5),
        "{:?}",
        h.state().data[0].as_ref().map(|d| &d.sources)
    );
    h.state_mut().check_sources();
    assert!(h.state().source_drift.is_empty());

    // Another program adds records: the studio says so and keeps what it read.
    let mut more = std::fs::read_to_string(&file).unwrap();
    more.push_str(&line(5));
    more.push_str(&line(6));
    std::fs::write(&file, more).unwrap();
    h.state_mut().check_sources();
    h.run_steps(2);
    // Above the tabs, and in the status line.
    assert!(
        h.query_all_by_label_contains("changed on disk after it was imported")
            .count()
            >= 1
    );
    assert_eq!(records(h.state()), Some(5));
    h.get_by_label("Re-import").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the re-import", |a| a.all_data_loaded());
    assert_eq!(records(h.state()), Some(7));
    h.state_mut().check_sources();
    assert!(h.state().source_drift.is_empty());

    // Deleted: a message, the records stay, nothing breaks; re-importing names the file.
    std::fs::remove_file(&file).unwrap();
    h.state_mut().check_sources();
    h.run_steps(2);
    assert!(
        h.query_all_by_label_contains("was deleted or cannot be read")
            .count()
            >= 1
    );
    assert_eq!(records(h.state()), Some(7));
    h.get_by_label("Re-import").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the re-import", |a| a.all_data_loaded());
    let data = h.state().data[0].clone().unwrap();
    assert_eq!(data.records.len(), 0);
    let error = data.sources[0].error.clone().unwrap();
    assert!(error.contains("facts.jsonl"), "{error}");
    h.run_steps(2);
}

/// The trainer process of the memory-limit test: this test binary, run again, serves a run on
/// stdin and stdout as `moi-studio worker` does.
#[test]
#[ignore = "the memory-limit test runs it as its trainer process"]
fn trainer_child() {
    if std::env::var_os("MOI_TRAINER_CHILD").is_none() {
        return;
    }
    crate::train::process::serve(
        std::io::BufReader::new(std::io::stdin()),
        std::io::stdout().lock(),
    )
    .unwrap();
}

/// This test binary as the studio's trainer process, under a 4 GiB address-space limit.
fn child_trainer(env: &[(&str, &str)]) -> crate::train::process::TrainerProcess {
    const LIMIT: u64 = 4 << 30;
    let mut vars = vec![("MOI_TRAINER_CHILD", "1"), ("MALLOC_ARENA_MAX", "2")];
    vars.extend_from_slice(env);
    crate::train::process::TrainerProcess {
        program: std::env::current_exe().unwrap(),
        args: [
            "--exact",
            "ui::tests::trainer_child",
            "--ignored",
            "--nocapture",
        ]
        .map(Into::into)
        .to_vec(),
        env: vars.iter().map(|(k, v)| (k.into(), v.into())).collect(),
        memory_limit: Some(LIMIT),
    }
}

#[test]
fn a_trainer_out_of_memory_fails_its_run_with_a_message_while_the_studio_stays_up_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let mut project = Project::load(&path).unwrap();
    project.training.checkpoint_every = 4;
    project.save(&path).unwrap();
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    // An edit not saved yet: it must outlive the trainer's death.
    h.state_mut().project.default_system_prompt = "You are a careful assistant.".into();
    // Step 6 asks for 8 GiB more, past the trainer's 4 GiB limit: the allocation fails and the
    // trainer process aborts, as it would when the machine's memory runs out.
    h.state_mut().trainer_process = Some(child_trainer(&[(
        "MOI_TEST_ALLOCATE_AT_STEP",
        "6:8589934592",
    )]));
    h.state_mut().set_tab(Tab::Train);
    h.state_mut().steps_override = Some(12);
    h.run_steps(1);
    h.get_by_label("Start").click();
    h.run_steps(1);
    assert!(h.state().is_training(), "{}", h.state().status);
    wait_until(&mut h, &wake, "the run's end", |a| {
        a.history().ending.is_some() && !a.is_training()
    });
    let Some(TrainEvent::Failed { error }) = h.state().history().ending.clone() else {
        panic!("expected a failure, got {:?}", h.state().history().ending);
    };
    for part in [
        "aborted (SIGABRT) after step 5",
        "ran out of memory",
        "memory allocation of 8589934592 bytes failed",
        "limit of 4.0 GiB",
        "checkpoint-4 (step 4)",
    ] {
        assert!(error.contains(part), "{part:?} not in {error:?}");
    }
    // The window is up and says so; the unsaved edit is still there.
    h.run_steps(2);
    assert!(h.query_all_by_label_contains("ran out of memory").count() >= 1);
    assert_eq!(
        h.state().project.default_system_prompt,
        "You are a careful assistant."
    );
    let run = h.state().run_dir().unwrap().to_path_buf();
    assert_eq!(
        step_losses(&run).iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>()
    );
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: TrainEvent = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last, TrainEvent::Failed { error });

    // The Runs tab offers Resume; without the fault the run goes on from step 4 to the end,
    // under the same limit.
    h.state_mut().trainer_process = Some(child_trainer(&[]));
    h.state_mut().set_tab(Tab::Runs);
    h.run_steps(2);
    let row = h
        .state()
        .runs
        .iter()
        .filter(|r| r.resumable)
        .position(|r| r.dir == run)
        .expect("the failed run is resumable");
    let listed = h.state().runs.iter().find(|r| r.dir == run).unwrap();
    assert!(
        listed
            .failure
            .as_ref()
            .is_some_and(|e| e.contains("ran out of memory")),
        "{:?}",
        listed.failure
    );
    assert!(h.query_all_by_label("failed").count() >= 1);
    h.query_all_by_label("Resume").nth(row).unwrap().click();
    h.run_steps(1);
    assert!(h.state().is_training(), "{}", h.state().status);
    wait_until(&mut h, &wake, "the resumed run's end", |a| {
        a.history().ending.is_some() && !a.is_training()
    });
    assert_eq!(
        h.state().history().ending,
        Some(TrainEvent::Finished { step: 12 })
    );
    assert_eq!(
        step_losses(&run).iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
}

#[test]
fn an_ablation_from_the_experiments_tab_trains_in_a_trainer_process_and_survives_its_death() {
    let dir = tempfile::tempdir().unwrap();
    let path = demo_copy(dir.path());
    let (mut h, wake) = harness(|w| StudioApp::open(path.clone(), w));
    wait_until(&mut h, &wake, "the data", |a| !a.is_loading());
    h.state_mut().project.default_system_prompt = "You are a careful assistant.".into();
    // The first run's first step asks for 8 GiB past the child's 4 GiB limit. A run on a thread
    // of this process would not see the variable and would finish.
    h.state_mut().trainer_process = Some(child_trainer(&[(
        "MOI_TEST_ALLOCATE_AT_STEP",
        "1:8589934592",
    )]));
    {
        let e = &mut h.state_mut().experiments;
        e.variants = [false; crate::core::ablation::Variant::ALL.len()];
        e.variants[crate::core::ablation::Variant::ALL
            .iter()
            .position(|v| *v == crate::core::ablation::Variant::Moi)
            .unwrap()] = true;
        e.attentions = [true, false, false];
        e.tokens = 1024;
        e.seeds = "1".into();
        e.evals = 1;
    }
    h.state_mut().set_tab(Tab::Experiments);
    h.run_steps(2);
    h.get_by_label("Run ablation").click();
    h.run_steps(1);
    assert!(
        h.state().experiments.is_running(),
        "{:?}",
        h.state().experiments.error
    );
    wait_until(&mut h, &wake, "the failed ablation", |a| {
        !a.experiments.is_running()
    });
    let error = h.state().experiments.error.clone().unwrap_or_default();
    assert!(error.contains("ran out of memory"), "{error}");
    assert!(!h.state().experiments.complete);
    h.run_steps(2);
    assert!(h.query_all_by_label_contains("ran out of memory").count() >= 1);
    assert_eq!(
        h.state().project.default_system_prompt,
        "You are a careful assistant."
    );

    // Without the fault the same plan runs to the end in the child and reports.
    h.state_mut().trainer_process = Some(child_trainer(&[]));
    h.get_by_label("Run ablation").click();
    h.run_steps(1);
    wait_until(&mut h, &wake, "the ablation", |a| {
        !a.experiments.is_running()
    });
    assert_eq!(h.state().experiments.error, None);
    assert!(h.state().experiments.complete);
    let folder = h.state().experiments.folder.clone().unwrap();
    let (plan, results) = crate::train::ablate::load_ablation(&folder).unwrap();
    assert!(plan.runs().iter().all(|k| results.runs[k].finished));
}
