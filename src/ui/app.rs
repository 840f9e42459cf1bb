//! The studio's state and top level: menu, task list, tabs, status bar; the channels from every
//! worker are drained here, a few milliseconds per frame at most.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use egui::Color32;

use crate::core::dataset::TaskData;
use crate::core::events::{TrainCommand, TrainEvent, Wake};
use crate::core::mixing::PackingPreview;
use crate::core::packing::PackPlan;
use crate::core::project::{Project, Source, Task};
use crate::core::runs::{RunEntry, RunHistory, list_runs};
use crate::core::sampling::MixturePreview;
use crate::core::views::TokenChip;
use crate::train::worker::{ModelChoice, TrainHandle};
use crate::ui::jobs::{
    DialogKind, LoadEvent, PrepBundle, PreviewResult, start_dialog, start_loading, start_preview,
};

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
    /// Past runs.
    Runs,
}

impl Tab {
    /// Every tab, in order.
    pub const ALL: [Tab; 5] = [Tab::Data, Tab::Mixture, Tab::Packing, Tab::Train, Tab::Runs];

    /// Its title.
    pub fn title(self) -> &'static str {
        match self {
            Tab::Data => "Data",
            Tab::Mixture => "Mixture",
            Tab::Packing => "Packing",
            Tab::Train => "Train",
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
    pub(crate) open_error: Option<String>,
    pub(crate) tab: Tab,
    pub(crate) selected_task: usize,
    pub(crate) data: Vec<Option<Arc<TaskData>>>,
    pub(crate) loading: Option<(Receiver<LoadEvent>, usize, f32)>,
    /// Bumped whenever task indices change; results of older loads are ignored.
    pub(crate) load_generation: u64,
    pub(crate) preview: PreviewState,
    pub(crate) train: Option<TrainState>,
    pub(crate) history: RunHistory,
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
    pub(crate) export_job: Option<Receiver<Result<bool, String>>>,
    pub(crate) dialog: Option<Receiver<(DialogKind, Vec<PathBuf>)>>,
    pub(crate) status: String,
    pub(crate) recent: Vec<PathBuf>,
    pub(crate) undo: HashMap<String, Undo>,
    pub(crate) import_path: String,
    pub(crate) model_path: String,
    pub(crate) record_index: usize,
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
            project,
            open_error: None,
            tab: Tab::Data,
            selected_task: 0,
            data: Vec::new(),
            loading: None,
            load_generation: 0,
            preview: PreviewState::default(),
            train: None,
            history: RunHistory::default(),
            model: ModelPick::Tiny,
            steps_override: Some(60),
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
            dialog: None,
            status: String::new(),
            recent: Vec::new(),
            undo: HashMap::new(),
            import_path: String::new(),
            model_path: String::new(),
            record_index: 0,
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

    fn all_data_loaded(&self) -> bool {
        !self.data.is_empty() && self.data.iter().all(Option::is_some)
    }

    /// Reads every task's data again.
    pub fn reload_all_data(&mut self) {
        self.load_generation += 1;
        self.data = vec![None; self.project.tasks.len()];
        let all = (0..self.project.tasks.len()).collect();
        self.load_tasks(all);
    }

    fn load_tasks(&mut self, tasks: Vec<usize>) {
        if tasks.is_empty() {
            self.loading = None;
            return;
        }
        for &t in &tasks {
            if let Some(slot) = self.data.get_mut(t) {
                *slot = None;
            }
        }
        match start_loading(
            self.project.clone(),
            tasks,
            self.load_generation,
            self.wake.clone(),
        ) {
            Ok(rx) => self.loading = Some((rx, 0, 0.0)),
            Err(e) => self.status = e,
        }
    }

    /// Imports dataset files, each as a new task named after the file (the test hook for the
    /// file dialog and drag and drop).
    pub fn import_paths(&mut self, paths: &[PathBuf]) {
        let mut added = Vec::new();
        for path in paths {
            let stem = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "task".to_string());
            let stem = stem
                .split('.')
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("task")
                .to_string();
            let mut name = stem.clone();
            let mut n = 2;
            while self.project.tasks.iter().any(|t| t.name == name) {
                name = format!("{stem} {n}");
                n += 1;
            }
            let mut task = Task::new(name, self.project.default_system_prompt.clone());
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            let base = std::path::absolute(&self.project.base_dir)
                .unwrap_or_else(|_| self.project.base_dir.clone());
            task.sources
                .push(Source::new(crate::core::fsutil::relative_to(&abs, &base)));
            self.project.tasks.push(task);
            self.data.push(None);
            added.push(self.project.tasks.len() - 1);
        }
        if let Some(&last) = added.last() {
            self.selected_task = last;
            self.record_index = 0;
            self.status = format!("importing {} file(s)", added.len());
        }
        // Tasks already being read are read again with the new ones.
        let mut pending: Vec<usize> = (0..self.data.len())
            .filter(|&i| self.data[i].is_none())
            .collect();
        pending.sort_unstable();
        self.load_tasks(pending);
    }

    /// Removes task `i`.
    pub fn remove_task(&mut self, i: usize) {
        if i < self.project.tasks.len() {
            let name = self.project.tasks.remove(i).name;
            self.data.remove(i);
            // Indices moved: per-task state and loads in flight no longer fit.
            self.load_generation += 1;
            self.undo.retain(|k, _| !k.starts_with("task-"));
            self.report_open = None;
            self.try_it.system = None;
            self.record_index = 0;
            self.selected_task = self
                .selected_task
                .min(self.project.tasks.len().saturating_sub(1));
            self.status = format!("removed task {name}");
            let pending: Vec<usize> = (0..self.data.len())
                .filter(|&j| self.data[j].is_none())
                .collect();
            self.load_tasks(pending);
        }
    }

    /// Saves to the project's file (or asks where, for a new project).
    pub fn save_project(&mut self) {
        match self.path.clone() {
            Some(p) => self.save_as(p),
            None => self.ask(DialogKind::SaveAs),
        }
    }

    /// Saves to `path`.
    pub fn save_as(&mut self, path: PathBuf) {
        let path = std::path::absolute(&path).unwrap_or(path);
        let mut saved = self.project.clone();
        match saved.save(&path) {
            Ok(()) => {
                self.project = saved;
                self.saved_toml = self.project.to_toml();
                self.status = format!("saved {}", path.display());
                self.recent.retain(|p| p != &path);
                self.recent.insert(0, path.clone());
                self.path = Some(path);
            }
            Err(e) => self.status = format!("not saved: {e}"),
        }
    }

    /// Opens a file dialog on its thread.
    pub fn ask(&mut self, kind: DialogKind) {
        if self.dialog.is_some() {
            return;
        }
        let dir = std::path::absolute(&self.project.base_dir).unwrap_or_default();
        match start_dialog(kind, dir, self.wake.clone()) {
            Ok(rx) => self.dialog = Some(rx),
            Err(e) => self.status = e,
        }
    }

    fn on_dialog(&mut self, kind: DialogKind, paths: Vec<PathBuf>) {
        let Some(first) = paths.first().cloned() else {
            self.status = "nothing chosen (if no dialog appeared, this desktop lacks \
                           xdg-desktop-portal and zenity: type the path instead)"
                .to_string();
            return;
        };
        match kind {
            DialogKind::Import => self.import_paths(&paths),
            DialogKind::Open => self.open_project(first),
            DialogKind::SaveAs => self.save_as(first),
            DialogKind::ModelFolder => self.model = ModelPick::Folder(first),
            DialogKind::Gguf => self.model = ModelPick::Gguf(first),
            DialogKind::Export(run) => {
                match crate::ui::jobs::start_export(run, first, self.wake.clone()) {
                    Ok(rx) => {
                        self.export_job = Some(rx);
                        self.status = "exporting…".to_string();
                    }
                    Err(e) => self.status = e,
                }
            }
        }
    }

    /// The keys of the preview: everything it depends on, and what tokenizing depends on.
    pub(crate) fn preview_keys(&self) -> (String, String) {
        let p = &self.project;
        let tasks: Vec<_> = p
            .tasks
            .iter()
            .map(|t| {
                serde_json::json!([
                    t.name,
                    t.system_prompt,
                    t.system_rule,
                    t.eval_fraction,
                    t.sources
                        .iter()
                        .map(|s| s.path.display().to_string())
                        .collect::<Vec<_>>()
                ])
            })
            .collect();
        let prep = serde_json::json!({
            "tasks": tasks,
            "default": p.default_system_prompt,
            "template": p.mixing.template,
            "tokenizer": p.mixing.tokenizer,
            "tokenizer_config": p.mixing.tokenizer_config,
            "labels": p.mixing.labels,
            "seed": p.seed,
        })
        .to_string();
        let weights: Vec<f64> = p.tasks.iter().map(|t| t.weight).collect();
        let all = serde_json::json!({
            "prep": prep,
            "mixing": p.mixing,
            "packing": p.packing,
            "weights": weights,
        })
        .to_string();
        (all, prep)
    }

    /// Starts a preview when the settings changed and none is running.
    fn refresh_preview(&mut self) {
        if self.preview.job.is_some() || !self.all_data_loaded() {
            return;
        }
        let (key, prep_key) = self.preview_keys();
        if key == self.preview.done_key {
            return;
        }
        let cached = self
            .preview
            .bundle
            .as_ref()
            .filter(|(k, _)| *k == prep_key)
            .map(|(_, b)| b.clone());
        let data: Vec<Arc<TaskData>> = self.data.iter().flatten().cloned().collect();
        match start_preview(
            self.project.clone(),
            data,
            cached,
            key.clone(),
            prep_key,
            self.wake.clone(),
        ) {
            Ok(rx) => self.preview.job = Some((rx, key)),
            Err(e) => self.status = e,
        }
    }

    /// Takes what the workers sent, spending at most a few milliseconds.
    pub fn drain_events(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(6);
        // Data.
        if let Some((rx, _, _)) = &self.loading {
            let mut finished = false;
            let mut got = Vec::new();
            while Instant::now() < deadline {
                match rx.try_recv() {
                    Ok(e) => got.push(e),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        finished = true;
                        break;
                    }
                }
            }
            for e in got {
                match e {
                    LoadEvent::Progress { task, fraction } => {
                        if let Some((_, t, f)) = &mut self.loading {
                            (*t, *f) = (task, fraction);
                        }
                    }
                    LoadEvent::Task {
                        task,
                        data,
                        generation,
                    } => {
                        if generation == self.load_generation
                            && let Some(slot) = self.data.get_mut(task)
                        {
                            let rejected = data.rejected();
                            if rejected > 0 || data.failed_sources() > 0 {
                                self.status = format!(
                                    "{}: {} records, {rejected} rejected",
                                    data.name,
                                    data.records.len()
                                );
                            }
                            *slot = Some(data);
                        }
                    }
                }
            }
            if finished {
                self.loading = None;
                if self.all_data_loaded() && self.status.starts_with("importing") {
                    self.status = "import finished".to_string();
                }
            }
        }
        // Previews.
        if let Some((rx, _)) = &self.preview.job
            && let Ok(r) = rx.try_recv()
        {
            self.preview.job = None;
            self.preview.done_key = r.key;
            self.preview.took = r.took;
            match r.bundle {
                Ok(b) => {
                    self.preview.bundle = Some((r.prep_key, b));
                    self.preview.error = r.pack_error;
                }
                Err(e) => self.preview.error = Some(e),
            }
            self.preview.mixture = r.mixture;
            self.preview.packing = r.packing;
            self.preview.plan = r.plan;
            self.preview.pack = r.pack;
            self.preview.chips = None;
            if let Some(plan) = &self.preview.plan {
                self.preview.row = self.preview.row.min(plan.rows.len().saturating_sub(1));
            }
        }
        // Dialogs and small jobs.
        if let Some(rx) = &self.dialog
            && let Ok((kind, paths)) = rx.try_recv()
        {
            self.dialog = None;
            self.on_dialog(kind, paths);
        }
        if let Some(rx) = &self.export_job
            && let Ok(r) = rx.try_recv()
        {
            self.export_job = None;
            self.status = match r {
                Ok(true) => "exported the model and its PEFT adapter".to_string(),
                Ok(false) => "exported the model".to_string(),
                Err(e) => format!("export failed: {e}"),
            };
        }
        if let Some(rx) = &self.try_it.job
            && let Ok(r) = rx.try_recv()
        {
            self.try_it.job = None;
            self.try_it.answer = r.unwrap_or_else(|e| format!("(no answer: {e})"));
        }
        while let Ok((dir, h)) = self.history_channel.1.try_recv() {
            match h {
                Ok(h) => {
                    self.run_histories.insert(dir, h);
                }
                Err(e) => {
                    self.selected_runs.remove(&dir);
                    self.status = e;
                }
            }
        }
        // Training: every event is taken in; steps arrive merged when the UI was slow.
        self.drain_training(deadline);
    }

    fn drain_training(&mut self, deadline: Instant) {
        let Some(train) = &mut self.train else {
            return;
        };
        let Some(handle) = &train.handle else {
            return;
        };
        let mut ended = false;
        loop {
            match handle.events.try_recv() {
                Ok(event) => {
                    self.history.absorb(&event);
                    match &event {
                        TrainEvent::Generated { step, text, .. } => {
                            self.try_it.answer = if text.trim().is_empty() {
                                format!(
                                    "(step {step}: an empty answer, the model ended its turn at once)"
                                )
                            } else {
                                format!("(step {step}) {text}")
                            };
                            self.try_it.asked_trainer = false;
                        }
                        TrainEvent::Log { message } => self.status = message.clone(),
                        TrainEvent::Checkpoint { step, .. } => {
                            self.status = format!("checkpoint at step {step}");
                        }
                        TrainEvent::Finished { step } => {
                            self.status = format!("training finished at step {step}");
                        }
                        TrainEvent::Stopped { step } => {
                            self.status = format!("training stopped at step {step}");
                        }
                        TrainEvent::Failed { error } => {
                            self.status = format!("training failed: {error}");
                        }
                        _ => {}
                    }
                    if event.is_terminal() {
                        ended = true;
                        break;
                    }
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
            if Instant::now() > deadline {
                // More is waiting: come back next frame.
                (self.wake)();
                break;
            }
        }
        if ended {
            if let Some(h) = train.handle.take() {
                h.join();
            }
            train.paused = false;
            self.try_it.asked_trainer = false;
            self.runs_loaded = false;
        }
    }

    /// Starts training the project with the chosen model.
    pub fn start_training(&mut self) {
        if self.is_training() {
            return;
        }
        let mut spec =
            crate::train::worker::RunSpec::new(self.project.clone(), self.model.choice());
        spec.max_steps = self.steps_override;
        match crate::train::worker::spawn_run(spec, self.wake.clone()) {
            Ok(handle) => {
                self.history = RunHistory::default();
                self.status = format!("training in {}", handle.run_dir.display());
                self.train = Some(TrainState {
                    run_dir: handle.run_dir.clone(),
                    handle: Some(handle),
                    paused: false,
                });
            }
            Err(e) => self.status = format!("could not start training: {e:#}"),
        }
    }

    /// Sends a command to the running trainer; whether it was taken.
    pub fn command(&mut self, command: TrainCommand) -> bool {
        if let Some(TrainState {
            handle: Some(h),
            paused,
            ..
        }) = &mut self.train
        {
            if matches!(command, TrainCommand::Stop) {
                h.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let kind = std::mem::discriminant(&command);
            if h.commands.try_send(command).is_err() {
                // The state below only changes once the worker has the command.
                self.status = "the trainer is busy; try again".to_string();
                return false;
            }
            if kind == std::mem::discriminant(&TrainCommand::Pause) {
                *paused = true;
            } else if kind == std::mem::discriminant(&TrainCommand::Resume) {
                *paused = false;
            }
            return true;
        }
        false
    }

    /// The past runs beside the project.
    pub(crate) fn refresh_runs(&mut self) {
        self.runs = list_runs(&self.project.base_dir.join("runs"));
        self.runs_loaded = true;
    }

    /// Draws the whole studio into `ui`.
    pub fn ui_root(&mut self, ui: &mut egui::Ui) {
        let started = Instant::now();
        self.drain_events();
        self.refresh_preview();
        let dropped: Vec<PathBuf> = ui.ctx().input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect()
        });
        if !dropped.is_empty() {
            self.import_paths(&dropped);
        }
        if ui.ctx().input_mut(|i| {
            i.consume_shortcut(&egui::KeyboardShortcut::new(
                egui::Modifiers::COMMAND,
                egui::Key::S,
            ))
        }) {
            self.save_project();
        }
        egui::Panel::top("menu").show(ui, |ui| self.menu_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("tasks")
            .default_size(250.0)
            .show(ui, |ui| self.task_list(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            if let Some(err) = &self.open_error {
                ui.colored_label(ui.visuals().error_fg_color, err);
            }
            ui.horizontal(|ui| {
                for tab in Tab::ALL {
                    ui.selectable_value(&mut self.tab, tab, tab.title());
                }
            });
            ui.separator();
            match self.tab {
                Tab::Data => self.data_tab(ui),
                Tab::Mixture => self.mixture_tab(ui),
                Tab::Packing => self.packing_tab(ui),
                Tab::Train => self.train_tab(ui),
                Tab::Runs => self.runs_tab(ui),
            }
        });
        if self.is_training() || self.preview.job.is_some() || self.is_loading() {
            ui.ctx().request_repaint_after(Duration::from_millis(250));
        }
        self.last_frame = started.elapsed();
    }

    fn menu_bar(&mut self, ui: &mut egui::Ui) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("Project", |ui| {
                if ui.button("New").clicked() {
                    if self.is_training() {
                        self.status = "stop the run before starting a new project".to_string();
                    } else {
                        let wake = self.wake.clone();
                        let recent = std::mem::take(&mut self.recent);
                        *self = Self::empty(wake);
                        self.recent = recent;
                        self.status = "new project".to_string();
                    }
                }
                if ui.button("Open…").clicked() {
                    self.ask(DialogKind::Open);
                }
                if ui.button("Save").clicked() {
                    self.save_project();
                }
                if ui.button("Save as…").clicked() {
                    self.ask(DialogKind::SaveAs);
                }
                ui.menu_button("Recent projects", |ui| {
                    if self.recent.is_empty() {
                        ui.weak("none yet");
                    }
                    for p in self.recent.clone() {
                        if ui.button(p.display().to_string()).clicked() {
                            self.open_project(p);
                        }
                    }
                });
            });
            ui.menu_button("Data", |ui| {
                if ui.button("Import dataset…").clicked() {
                    self.ask(DialogKind::Import);
                }
                if ui.button("Read all data again").clicked() {
                    self.reload_all_data();
                }
            });
            ui.separator();
            let name = if self.project.name.is_empty() {
                self.path
                    .as_ref()
                    .map_or("(new project)".to_string(), |p| p.display().to_string())
            } else {
                self.project.name.clone()
            };
            ui.strong(name);
            if self.is_dirty() {
                ui.weak("(unsaved changes)");
            }
        });
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some((_, task, fraction)) = &self.loading {
                let name = self
                    .project
                    .tasks
                    .get(*task)
                    .map_or("", |t| t.name.as_str());
                ui.label(format!("Reading {name}"));
                ui.add(egui::ProgressBar::new(*fraction).desired_width(160.0));
                ui.separator();
            }
            if self.preview.job.is_some() {
                ui.spinner();
                ui.label("Tokenizing and packing");
                ui.separator();
            }
            if self.is_training() {
                let h = &self.history;
                let total = h.total_steps.unwrap_or(0).max(1);
                ui.label(format!("Training step {}/{total}", h.step));
                ui.add(egui::ProgressBar::new(h.step as f32 / total as f32).desired_width(160.0));
                ui.separator();
            }
            if self.export_job.is_some() || self.try_it.job.is_some() {
                ui.spinner();
            }
            ui.label(&self.status);
        });
    }

    fn task_list(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            ui.heading("Tasks");
            if ui
                .button("Import…")
                .on_hover_text("Import dataset files as new tasks (or drop files on the window)")
                .clicked()
            {
                self.ask(DialogKind::Import);
            }
        });
        ui.separator();
        if self.project.tasks.is_empty() {
            ui.label("This project has no tasks yet. Import a dataset or drop files here.");
        }
        egui::ScrollArea::vertical().show(ui, |ui| {
            for i in 0..self.project.tasks.len() {
                let task = &self.project.tasks[i];
                let selected = i == self.selected_task;
                let frame = egui::Frame::group(ui.style()).fill(if selected {
                    ui.visuals().selection.bg_fill.gamma_multiply(0.35)
                } else {
                    Color32::TRANSPARENT
                });
                let response = frame
                    .show(ui, |ui| {
                        ui.set_width(ui.available_width());
                        ui.horizontal(|ui| {
                            let (rect, _) = ui
                                .allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
                            ui.painter().rect_filled(rect, 2.0, task_color(i));
                            ui.strong(&task.name);
                        });
                        match self.data.get(i).and_then(Option::as_ref) {
                            Some(d) => {
                                let mut line = format!("{} records", d.records.len());
                                if d.rejected() > 0 {
                                    line.push_str(&format!(", {} rejected", d.rejected()));
                                }
                                if d.failed_sources() > 0 {
                                    line.push_str(&format!(
                                        ", {} files unreadable",
                                        d.failed_sources()
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
                        ui.add(
                            egui::Label::new(egui::RichText::new(&task.system_prompt).weak())
                                .truncate(),
                        );
                    })
                    .response;
                if response.interact(egui::Sense::click()).clicked() {
                    self.selected_task = i;
                    self.record_index = 0;
                }
            }
        });
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
