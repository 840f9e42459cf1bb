//! The studio's top level: for now the project's tasks, with record counts read on a worker.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};

use crate::core::dataset::load_task;
use crate::core::project::Project;

/// A callback that asks the UI to repaint; workers call it after sending an event.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// What the import worker reports.
#[derive(Debug)]
enum LoadEvent {
    /// Progress through one task's files.
    Progress { task: usize, fraction: f32 },
    /// A task's counts are known.
    Task {
        task: usize,
        records: usize,
        rejected: u64,
        failed_sources: usize,
    },
    /// Every task is read.
    Done,
}

/// Counts shown next to a task once its data is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskCounts {
    /// Records imported.
    pub records: usize,
    /// Records rejected.
    pub rejected: u64,
    /// Source files that could not be read.
    pub failed_sources: usize,
}

/// The studio application state.
pub struct StudioApp {
    project_path: PathBuf,
    project: Option<Project>,
    open_error: Option<String>,
    counts: Vec<Option<TaskCounts>>,
    loading: Option<(usize, f32)>,
    events: Option<Receiver<LoadEvent>>,
}

impl StudioApp {
    /// Opens the project at `path` and starts reading its data on a worker thread.
    pub fn open(project_path: PathBuf, wake: Wake) -> Self {
        let mut app = Self {
            project_path,
            project: None,
            open_error: None,
            counts: Vec::new(),
            loading: None,
            events: None,
        };
        match Project::load(&app.project_path) {
            Ok(project) => {
                app.counts = vec![None; project.tasks.len()];
                app.events = start_loading(project.clone(), wake);
                app.loading = Some((0, 0.0));
                app.project = Some(project);
            }
            Err(e) => app.open_error = Some(e.to_string()),
        }
        app
    }

    /// The counts of each task, `None` where not read yet.
    pub fn counts(&self) -> &[Option<TaskCounts>] {
        &self.counts
    }

    /// Whether the worker is still reading data.
    pub fn is_loading(&self) -> bool {
        self.events.is_some()
    }

    /// Takes the worker's events, spending at most a few milliseconds.
    pub fn drain_events(&mut self) {
        let Some(rx) = &self.events else {
            return;
        };
        let deadline = Instant::now() + Duration::from_millis(4);
        let mut finished = false;
        while Instant::now() < deadline {
            match rx.try_recv() {
                Ok(LoadEvent::Progress { task, fraction }) => self.loading = Some((task, fraction)),
                Ok(LoadEvent::Task {
                    task,
                    records,
                    rejected,
                    failed_sources,
                }) => {
                    if let Some(slot) = self.counts.get_mut(task) {
                        *slot = Some(TaskCounts {
                            records,
                            rejected,
                            failed_sources,
                        });
                    }
                }
                Ok(LoadEvent::Done) | Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    finished = true;
                    break;
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
            }
        }
        if finished {
            self.events = None;
            self.loading = None;
        }
    }

    /// Draws the whole studio into `ui`.
    pub fn ui_root(&mut self, ui: &mut egui::Ui) {
        self.drain_events();
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| match (&self.loading, &self.project) {
                (Some((task, fraction)), Some(p)) => {
                    let name = p.tasks.get(*task).map_or("", |t| t.name.as_str());
                    ui.label(format!("Reading {name}"));
                    ui.add(egui::ProgressBar::new(*fraction).desired_width(200.0));
                }
                _ => {
                    ui.label(self.project_path.display().to_string());
                }
            });
        });
        egui::Panel::left("tasks")
            .default_size(260.0)
            .show(ui, |ui| {
                ui.heading("Tasks");
                ui.separator();
                let Some(project) = &self.project else {
                    ui.label("No project open.");
                    return;
                };
                if project.tasks.is_empty() {
                    ui.label("This project has no tasks yet.");
                }
                for (task, counts) in project.tasks.iter().zip(&self.counts) {
                    egui::Frame::group(ui.style()).show(ui, |ui| {
                        ui.set_width(ui.available_width());
                        ui.strong(&task.name);
                        match counts {
                            Some(c) => {
                                let mut line = format!("{} records", c.records);
                                if c.rejected > 0 {
                                    line.push_str(&format!(", {} rejected", c.rejected));
                                }
                                if c.failed_sources > 0 {
                                    line.push_str(&format!(
                                        ", {} files unreadable",
                                        c.failed_sources
                                    ));
                                }
                                ui.label(line);
                            }
                            None => {
                                ui.horizontal(|ui| {
                                    ui.spinner();
                                    ui.label("reading…");
                                });
                            }
                        }
                        ui.weak(&task.system_prompt);
                    });
                }
            });
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("MoI Studio");
            if let Some(err) = &self.open_error {
                ui.colored_label(ui.visuals().error_fg_color, err);
                return;
            }
            if let Some(p) = &self.project {
                if !p.name.is_empty() {
                    ui.label(format!("Project: {}", p.name));
                }
                ui.label(format!(
                    "Default system prompt: \"{}\"",
                    p.default_system_prompt
                ));
            }
        });
    }
}

/// Starts the named worker that imports every task and reports counts.
fn start_loading(project: Project, wake: Wake) -> Option<Receiver<LoadEvent>> {
    let (tx, rx) = bounded::<LoadEvent>(64);
    let spawned = std::thread::Builder::new()
        .name("import".to_string())
        .spawn(move || {
            for (i, task) in project.tasks.iter().enumerate() {
                let sources = task.sources.len().max(1) as f32;
                let data = load_task(&project, i, task, &mut |p| {
                    let within = p.bytes.bytes_done as f32 / p.bytes.bytes_total.max(1) as f32;
                    // Progress is advisory: when the UI is behind, skip it rather than block.
                    if tx
                        .try_send(LoadEvent::Progress {
                            task: i,
                            fraction: (p.source as f32 + within) / sources,
                        })
                        .is_ok()
                    {
                        wake();
                    }
                });
                let event = LoadEvent::Task {
                    task: i,
                    records: data.records.len(),
                    rejected: data.rejected(),
                    failed_sources: data.failed_sources(),
                };
                if tx.send(event).is_err() {
                    return;
                }
                wake();
            }
            let _ = tx.send(LoadEvent::Done);
            wake();
        });
    spawned.ok().map(|_| rx)
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.ui_root(ui);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable;

    fn demo_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/demo.moi.toml")
    }

    #[test]
    fn lists_the_demo_tasks_with_counts() {
        let (wake_tx, wake_rx) = crossbeam_channel::unbounded();
        let wake: Wake = Arc::new(move || {
            let _ = wake_tx.send(());
        });
        let app = StudioApp::open(demo_path(), wake);
        let mut harness = Harness::new_ui_state(|ui, app: &mut StudioApp| app.ui_root(ui), app);
        harness.run_steps(1);
        harness.get_by_label("math");
        harness.get_by_label("code");
        harness.get_by_label("tool use");
        // Each wake means the worker sent something; a frame drains it.
        while harness.state().is_loading() {
            wake_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the import worker went quiet");
            harness.step();
        }
        harness.run_steps(2);
        assert!(!harness.state().is_loading());
        harness.get_by_label("100 records");
        harness.get_by_label("164 records");
        harness.get_by_label("400 records");
    }

    #[test]
    fn a_broken_project_shows_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.moi.toml");
        std::fs::write(&path, "name = \n").unwrap();
        let app = StudioApp::open(path, Arc::new(|| {}));
        let mut harness = Harness::new_ui_state(|ui, app: &mut StudioApp| app.ui_root(ui), app);
        harness.run_steps(1);
        assert!(
            harness
                .query_all_by_label_contains("bad project file")
                .next()
                .is_some()
        );
    }
}
