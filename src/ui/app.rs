//! The studio's state: what it holds (project, tasks' data, previews, runs, jobs), the
//! accessors tests use, and eframe's entry points. The work is split by concern: opening and
//! saving in `project_actions`, the live preview in `preview`, draining the workers in
//! `events`, the window's frame in `shell`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use egui::Color32;

use crate::core::dataset::TaskData;
use crate::core::events::{TrainCommand, Wake};
use crate::core::mixing::PackingPreview;
use crate::core::packing::PackPlan;
use crate::core::project::Project;
use crate::core::runs::{RunEntry, RunHistory};
use crate::core::sampling::MixturePreview;
use crate::core::views::TokenChip;
use crate::train::worker::{ModelChoice, TrainHandle};
use crate::ui::jobs::{DialogKind, LoadEvent, PrepBundle, PreviewResult};

/// The central tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tab {
    /// Tasks, records, prompts.
    Data,
    /// Sampling shares.
    Mixture,
    /// Packing statistics and the pack browser.
    Packing,
    /// Training with live plots.
    Train,
    /// The paper's ablation on the project.
    Experiments,
    /// Past runs.
    Runs,
}

impl Tab {
    /// Every tab, in order.
    pub const ALL: [Tab; 6] = [
        Tab::Data,
        Tab::Mixture,
        Tab::Packing,
        Tab::Train,
        Tab::Experiments,
        Tab::Runs,
    ];

    /// Its title.
    pub fn title(self) -> &'static str {
        match self {
            Tab::Data => "Data",
            Tab::Mixture => "Mixture",
            Tab::Packing => "Packing",
            Tab::Train => "Train",
            Tab::Experiments => "Experiments",
            Tab::Runs => "Runs",
        }
    }
}

/// The colour of task `i`, the same in every view.
pub fn task_color(i: usize) -> Color32 {
    const PALETTE: [Color32; 8] = [
        Color32::from_rgb(86, 156, 214),
        Color32::from_rgb(229, 142, 60),
        Color32::from_rgb(106, 190, 110),
        Color32::from_rgb(204, 102, 178),
        Color32::from_rgb(222, 196, 72),
        Color32::from_rgb(120, 200, 210),
        Color32::from_rgb(200, 90, 90),
        Color32::from_rgb(150, 130, 220),
    ];
    PALETTE[i % PALETTE.len()]
}

/// The live preview: last results, the job computing the next ones.
#[derive(Default)]
pub struct PreviewState {
    /// The key of the settings shown.
    pub done_key: String,
    /// The running job and the key it computes.
    pub job: Option<(Receiver<PreviewResult>, String)>,
    /// Tokenizer and tokenized tasks, with the key they were made for.
    pub bundle: Option<(String, Arc<PrepBundle>)>,
    /// Mixture view.
    pub mixture: Option<MixturePreview>,
    /// Packing view.
    pub packing: Option<PackingPreview>,
    /// The epoch's plan.
    pub plan: Option<Arc<PackPlan>>,
    /// The packing settings of that plan (the browser builds rows with these, not with
    /// settings changed since).
    pub pack: crate::core::packing::PackSettings,
    /// Why the last preview failed.
    pub error: Option<String>,
    /// Says so when the model's context cut the rows.
    pub context_note: Option<String>,
    /// The model of the last preview and the longest sequence it reads.
    pub model_context: Option<(crate::train::worker::ModelChoice, usize)>,
    /// How long the last one took.
    pub took: Duration,
    /// The pack browser's row.
    pub row: usize,
    /// Chips of the shown row, cached by (key, row).
    pub chips: Option<(
        String,
        usize,
        Vec<TokenChip>,
        crate::core::packing::PackedRow,
    )>,
}

/// A training run in progress (or just ended) in this window.
pub struct TrainState {
    /// The worker.
    pub handle: Option<TrainHandle>,
    /// Its folder.
    pub run_dir: PathBuf,
    /// Paused by the user.
    pub paused: bool,
}

/// The "try it" box.
pub struct TryIt {
    /// The user's prompt.
    pub prompt: String,
    /// None = the default prompt; Some(i) = task i's prompt.
    pub system: Option<usize>,
    /// Longest answer.
    pub max_new: usize,
    /// The last answer.
    pub answer: String,
    /// An answer being computed by a finished model.
    pub job: Option<Receiver<Result<String, String>>>,
    /// Whether an answer was asked of the running trainer.
    pub asked_trainer: bool,
}

/// The model the Train tab will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelPick {
    /// The built-in tiny model.
    Tiny,
    /// A Hugging Face folder.
    Folder(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

impl ModelPick {
    /// What the worker gets.
    pub fn choice(&self) -> ModelChoice {
        match self {
            ModelPick::Tiny => ModelChoice::Tiny,
            ModelPick::Folder(p) | ModelPick::Gguf(p) => ModelChoice::Path(p.clone()),
        }
    }
}

/// Undo history of one text field.
#[derive(Default)]
pub struct Undo {
    /// Earlier values, oldest first.
    pub stack: Vec<String>,
    /// The value when the field gained focus.
    pub before: Option<String>,
}

/// A past run's history read on a worker, or why it could not be.
pub(crate) type LoadedHistory = (PathBuf, Result<RunHistory, String>);

/// The studio application state.
pub struct StudioApp {
    pub(crate) wake: Wake,
    pub(crate) path: Option<PathBuf>,
    pub(crate) project: Project,
    pub(crate) saved_toml: String,
    /// The project file's bytes when it was opened or last saved, to notice edits on disk.
    pub(crate) disk_bytes: Option<Vec<u8>>,
    /// A save refused because the file changed on disk: the studio asks what to keep.
    pub(crate) save_conflict: Option<PathBuf>,
    /// Dataset files changed or gone since they were imported: (task, what happened).
    pub(crate) source_drift: Vec<(usize, String)>,
    /// When the dataset files were last looked at.
    pub(crate) drift_checked: Option<std::time::Instant>,
    pub(crate) open_error: Option<String>,
    pub(crate) tab: Tab,
    pub(crate) selected_task: usize,
    pub(crate) data: Vec<Option<Arc<TaskData>>>,
    pub(crate) loading: Option<(Receiver<LoadEvent>, usize, f32)>,
    /// Bumped whenever task indices change; results of older loads are ignored.
    pub(crate) load_generation: u64,
    pub(crate) preview: PreviewState,
    pub(crate) train: Option<TrainState>,
    /// The process training runs in; None trains on a thread of this process (the tests' way).
    pub trainer_process: Option<crate::train::process::TrainerProcess>,
    pub(crate) history: RunHistory,
    pub(crate) experiments: crate::ui::experiments_tab::ExperimentsState,
    pub(crate) model: ModelPick,
    pub(crate) steps_override: Option<u64>,
    pub(crate) try_it: TryIt,
    pub(crate) runs: Vec<RunEntry>,
    pub(crate) runs_loaded: bool,
    pub(crate) selected_runs: BTreeSet<PathBuf>,
    pub(crate) run_histories: HashMap<PathBuf, RunHistory>,
    /// Past runs' histories read on the `runs` thread.
    pub(crate) history_channel: (
        crossbeam_channel::Sender<LoadedHistory>,
        Receiver<LoadedHistory>,
    ),
    pub(crate) export_job: Option<Receiver<Result<String, String>>>,
    /// The weight type the Runs tab's GGUF export writes.
    pub(crate) gguf_quant: crate::train::gguf_export::Quant,
    /// A folder typed in the Runs tab for exports (the file dialog when empty).
    pub(crate) export_path: String,
    pub(crate) dialog: Option<Receiver<(DialogKind, Vec<PathBuf>)>>,
    pub(crate) status: String,
    pub(crate) recent: Vec<PathBuf>,
    pub(crate) undo: HashMap<String, Undo>,
    pub(crate) import_path: String,
    pub(crate) model_path: String,
    pub(crate) record_index: usize,
    /// The record browser shows a chained record as imported rather than as trained.
    pub(crate) show_original: bool,
    /// The record browser's last chained view: its key and the record as composed.
    pub(crate) chained_cache: Option<(String, Option<crate::core::sit::Composed>)>,
    pub(crate) report_open: Option<(usize, usize)>,
    /// Time spent in the last frame's `ui_root`, for the frame-time measurement.
    pub last_frame: Duration,
}

impl StudioApp {
    /// Opens the project at `path` and starts reading its data on a worker thread.
    pub fn open(path: PathBuf, wake: Wake) -> Self {
        let mut app = Self::empty(wake);
        app.open_project(path);
        app
    }

    /// A window with a new, empty project.
    pub fn empty(wake: Wake) -> Self {
        let project = Project::default();
        Self {
            wake,
            path: None,
            saved_toml: project.to_toml(),
            disk_bytes: None,
            save_conflict: None,
            source_drift: Vec::new(),
            drift_checked: None,
            project,
            open_error: None,
            tab: Tab::Data,
            selected_task: 0,
            data: Vec::new(),
            loading: None,
            load_generation: 0,
            preview: PreviewState::default(),
            train: None,
            trainer_process: None,
            history: RunHistory::default(),
            experiments: Default::default(),
            model: ModelPick::Tiny,
            steps_override: None,
            try_it: TryIt {
                prompt: "What is 12 + 30?".to_string(),
                system: None,
                max_new: 48,
                answer: String::new(),
                job: None,
                asked_trainer: false,
            },
            runs: Vec::new(),
            runs_loaded: false,
            selected_runs: BTreeSet::new(),
            run_histories: HashMap::new(),
            history_channel: crossbeam_channel::bounded(64),
            export_job: None,
            gguf_quant: crate::train::gguf_export::Quant::default(),
            export_path: String::new(),
            dialog: None,
            status: String::new(),
            recent: Vec::new(),
            undo: HashMap::new(),
            import_path: String::new(),
            model_path: String::new(),
            record_index: 0,
            show_original: false,
            chained_cache: None,
            report_open: None,
            last_frame: Duration::ZERO,
        }
    }

    /// Replaces the open project with the one at `path` (a message on failure; the current
    /// project stays).
    pub fn open_project(&mut self, path: PathBuf) {
        // Remembered paths must work from any working directory.
        let path = std::path::absolute(&path).unwrap_or(path);
        if self.is_training() {
            self.status = "stop the run before opening another project".to_string();
            return;
        }
        match Project::load(&path) {
            Ok(project) => {
                self.saved_toml = project.to_toml();
                self.disk_bytes = std::fs::read(&path).ok();
                self.save_conflict = None;
                self.project = project;
                self.open_error = None;
                self.status = format!("opened {}", path.display());
                self.recent.retain(|p| p != &path);
                self.recent.insert(0, path.clone());
                self.recent.truncate(8);
                self.path = Some(path);
                self.selected_task = 0;
                self.record_index = 0;
                self.preview = PreviewState::default();
                self.history = RunHistory::default();
                self.model = match &self.project.training.model {
                    Some(p) => {
                        let p = self.project.resolve(p);
                        if p.extension()
                            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                        {
                            ModelPick::Gguf(p)
                        } else {
                            ModelPick::Folder(p)
                        }
                    }
                    None => ModelPick::Tiny,
                };
                if !self.experiments.is_running() {
                    self.experiments = Default::default();
                }
                self.runs_loaded = false;
                self.selected_runs.clear();
                self.run_histories.clear();
                self.reload_all_data();
            }
            Err(e) => {
                self.open_error = Some(e.to_string());
                self.status = e.to_string();
            }
        }
    }

    /// Restores the recent-projects list and the tab from an earlier session.
    pub(crate) fn remember(&mut self, recent: Vec<PathBuf>, tab: Tab) {
        for p in recent {
            if !self.recent.contains(&p) && self.recent.len() < 8 {
                self.recent.push(p);
            }
        }
        self.tab = tab;
    }

    /// Steps the next run stops after (`None`: the project's epochs).
    pub fn set_max_steps(&mut self, steps: Option<u64>) {
        self.steps_override = steps;
    }

    /// The project as edited.
    pub fn project(&self) -> &Project {
        &self.project
    }

    /// The project for edits (tests and panels).
    pub fn project_mut(&mut self) -> &mut Project {
        &mut self.project
    }

    /// Whether the project has unsaved changes.
    pub fn is_dirty(&self) -> bool {
        self.project.to_toml() != self.saved_toml
    }

    /// The current tab.
    pub fn tab(&self) -> Tab {
        self.tab
    }

    /// Switches tab.
    pub fn set_tab(&mut self, tab: Tab) {
        self.tab = tab;
    }

    /// The last status-bar message.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Each task's data, `None` where not read yet.
    pub fn data(&self) -> &[Option<Arc<TaskData>>] {
        &self.data
    }

    /// Whether a worker is still reading data.
    pub fn is_loading(&self) -> bool {
        self.loading.is_some()
    }

    /// Whether the previews are being computed or are out of date.
    pub fn preview_pending(&self) -> bool {
        self.preview.job.is_some()
            || self.is_loading()
            || (self.all_data_loaded() && self.preview.done_key != self.preview_keys().0)
    }

    /// The packing statistics shown.
    pub fn packing_preview(&self) -> Option<&PackingPreview> {
        self.preview.packing.as_ref()
    }

    /// The run's history (live or last).
    pub fn history(&self) -> &RunHistory {
        &self.history
    }

    /// Whether a run is going on.
    pub fn is_training(&self) -> bool {
        self.train.as_ref().is_some_and(|t| t.handle.is_some())
    }

    /// The folder of the current (or last) run.
    pub fn run_dir(&self) -> Option<&Path> {
        self.train.as_ref().map(|t| t.run_dir.as_path())
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.ui_root(ui);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // A run going on is stopped cleanly: checkpoint and model folder written.
        if let Some(TrainState {
            handle: Some(h), ..
        }) = &mut self.train
        {
            h.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = h.commands.try_send(TrainCommand::Stop);
        }
        if let Some(h) = self.train.as_mut().and_then(|t| t.handle.take()) {
            // Keep taking events so the worker never waits on a full channel.
            while let Ok(event) = h.events.recv() {
                if event.is_terminal() {
                    break;
                }
            }
            h.join();
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        let state = crate::ui::Persisted {
            last_project: self.path.clone(),
            recent: self.recent.clone(),
            tab: self.tab,
        };
        if let Ok(text) = serde_json::to_string(&state) {
            storage.set_string(crate::ui::STORAGE_KEY, text);
        }
    }
}
