//! Frame time of the studio: how long the UI thread spends per frame (draining the workers'
//! channels, laying out and drawing the current tab) on a project of 100,000 records while the
//! tiny model trains on the other threads; and how long after a setting changes the preview
//! shows the new packing on the demo project. Frames are driven by egui_kittest (no window, no
//! GPU), so this is the CPU side of a frame, paced at 60 Hz.
//!
//!   cargo bench --bench frame_time -- [RECORDS (default 100000)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use moi_studio::core::packing::PackMode;
use moi_studio::core::project::{Project, Source, Task};
use moi_studio::ui::{StudioApp, Tab};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `n` alpaca-style records over three tasks and a project for them.
fn big_project(dir: &Path, n: usize) -> PathBuf {
    let mut project = Project::load(&root().join("presets/benchmarks.moi.toml")).expect("demo");
    let prompts: Vec<String> = project
        .tasks
        .iter()
        .map(|t| t.system_prompt.clone())
        .collect();
    project.tasks.clear();
    for (t, name) in ["math", "code", "tool use"].iter().enumerate() {
        let file = dir.join(format!("task{t}.jsonl"));
        let mut text = String::new();
        for i in 0..n / 3 {
            let rec = serde_json::json!({
                "instruction": format!("{name} question {i}: what is {i} plus {}?", i * 7 % 13),
                "input": "",
                "output": format!("We add {i} and {} step by step, carrying where needed.\n#### {}", i * 7 % 13, i + i * 7 % 13),
            });
            text.push_str(&rec.to_string());
            text.push('\n');
        }
        std::fs::write(&file, text).expect("writing records");
        let mut task = Task::new(*name, prompts[t].clone());
        task.sources.push(Source::new(file));
        task.eval_fraction = 0.01;
        project.tasks.push(task);
    }
    // The default row length: the pack browser shows 2,048 token chips (training cuts rows to
    // the tiny model's 512 positions).
    project.packing.max_seq_len = 2048;
    project.training.eval_every_steps = 10;
    project.training.eval_items = 8;
    project.training.eval_generate = 2;
    let path = dir.join("big.moi.toml");
    project.save(&path).expect("saving");
    path
}

struct Driver {
    harness: Harness<'static, StudioApp>,
    wake: crossbeam_channel::Receiver<()>,
}

impl Driver {
    fn open(path: PathBuf) -> Self {
        let (tx, wake) = crossbeam_channel::unbounded();
        let app = StudioApp::open(
            path,
            Arc::new(move || {
                let _ = tx.send(());
            }),
        );
        let mut harness = Harness::builder()
            .with_size(egui::vec2(1360.0, 880.0))
            .build_ui_state(|ui, app: &mut StudioApp| app.ui_root(ui), app);
        harness.run_steps(2);
        Self { harness, wake }
    }

    /// Frames, one per wake, until `done`.
    fn until(&mut self, done: impl Fn(&StudioApp) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(900);
        while !done(self.harness.state()) {
            assert!(Instant::now() < deadline, "timed out");
            let _ = self.wake.recv_timeout(Duration::from_millis(500));
            while self.wake.try_recv().is_ok() {}
            self.harness.step();
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(100_000);

    // Preview latency on the demo project.
    let mut demo = Driver::open(root().join("presets/benchmarks.moi.toml"));
    demo.harness.state_mut().set_tab(Tab::Packing);
    let t = Instant::now();
    demo.until(|a| !a.is_loading() && !a.preview_pending() && a.packing_preview().is_some());
    println!(
        "demo: data read, tokenized and packed in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    for mode in [PackMode::Seq, PackMode::Balanced, PackMode::Moi] {
        demo.harness.state_mut().project_mut().packing.mode = mode;
        let t = Instant::now();
        demo.harness.step();
        demo.until(|a| !a.preview_pending() && a.packing_preview().is_some_and(|p| p.mode == mode));
        println!(
            "demo: packing mode -> {mode:?}: new preview shown after {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
    }

    // A prompt edit needs tokenizing again (and the built-in tokenizer trained again).
    demo.harness.state_mut().project_mut().tasks[0]
        .system_prompt
        .push_str(" Be brief.");
    let t = Instant::now();
    demo.harness.step();
    demo.until(|a| !a.preview_pending());
    println!(
        "demo: system prompt edited: re-tokenized and new preview shown after {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );

    // Frame time on a big project while training.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = big_project(dir.path(), n);
    let mut big = Driver::open(path);
    let t = Instant::now();
    big.until(|a| !a.is_loading());
    println!("{n} records read in {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    big.until(|a| !a.preview_pending() && a.packing_preview().is_some());
    println!("tokenized and packed in {:.2} s", t.elapsed().as_secs_f64());
    big.harness.state_mut().set_max_steps(Some(40));
    big.harness.state_mut().start_training();
    big.until(|a| a.history().step >= 2);
    // Frames are paced at 60 Hz as a display would (the trainer keeps running meanwhile).
    let frame = Duration::from_micros(16_667);
    for tab in [Tab::Packing, Tab::Data, Tab::Mixture, Tab::Train] {
        big.harness.state_mut().set_tab(tab);
        big.harness.run_steps(3);
        let (mut ui_ms, mut frame_ms) = (Vec::new(), Vec::new());
        for _ in 0..240 {
            let t = Instant::now();
            big.harness.step();
            let took = t.elapsed();
            frame_ms.push(took.as_secs_f64() * 1000.0);
            ui_ms.push(big.harness.state().last_frame.as_secs_f64() * 1000.0);
            std::thread::sleep(frame.saturating_sub(took));
        }
        println!(
            "{:<8} while training (step {}): ui_root p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; whole frame p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            tab.title(),
            big.harness.state().history().step,
            percentile(&mut ui_ms.clone(), 0.5),
            percentile(&mut ui_ms.clone(), 0.99),
            percentile(&mut ui_ms, 1.0),
            percentile(&mut frame_ms.clone(), 0.5),
            percentile(&mut frame_ms.clone(), 0.99),
            percentile(&mut frame_ms, 1.0),
        );
    }
    big.harness
        .state_mut()
        .command(moi_studio::core::events::TrainCommand::Stop);
    big.until(|a| !a.is_training());
}
