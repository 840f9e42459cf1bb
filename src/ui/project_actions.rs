//! Opening, importing, removing and saving: what the studio does to its project and tasks,
//! the data work handed to the `load` thread and file dialogs to theirs.

use std::path::PathBuf;

use crate::core::project::{Source, Task};
use crate::ui::app::{ModelPick, StudioApp};
use crate::ui::jobs::{DialogKind, start_dialog, start_loading};

/// What to do with a project file another program changed while the studio had it open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveConflict {
    /// Write the studio's project over it.
    Overwrite,
    /// Open the file as it is now, dropping the edits made in the studio.
    Reload,
    /// Leave the file as it is and keep editing.
    Cancel,
}

impl StudioApp {
    /// The question asked when a save finds the project file changed on disk.
    pub(crate) fn save_conflict_window(&mut self, ctx: &egui::Context) {
        let Some(path) = self.save_conflict.clone() else {
            return;
        };
        let mut choice = None;
        egui::Window::new("The project file changed on disk")
            .collapsible(false)
            .resizable(false)
            .anchor(egui::Align2::CENTER_CENTER, egui::vec2(0.0, 0.0))
            .show(ctx, |ui| {
                ui.label(format!(
                    "{} was changed by another program after the studio opened it. Saving \
                     now would overwrite those changes.",
                    path.display()
                ));
                ui.horizontal(|ui| {
                    if ui.button("Overwrite with mine").clicked() {
                        choice = Some(SaveConflict::Overwrite);
                    }
                    if ui
                        .button("Reload from disk")
                        .on_hover_text(
                            "Open the file as it is now; the edits made here are dropped",
                        )
                        .clicked()
                    {
                        choice = Some(SaveConflict::Reload);
                    }
                    if ui.button("Cancel").clicked() {
                        choice = Some(SaveConflict::Cancel);
                    }
                });
            });
        if let Some(c) = choice {
            self.resolve_save_conflict(c);
        }
    }

    /// Looks at the imported tasks' files again (one `stat` each) and notes those that changed
    /// or went away since they were read; the records already read stay.
    pub fn check_sources(&mut self) {
        self.drift_checked = Some(std::time::Instant::now());
        let drift: Vec<(usize, String)> = self
            .data
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (i, d)))
            .flat_map(|(i, d)| d.sources.iter().filter_map(move |s| Some((i, s.drift()?))))
            .collect();
        if let Some((_, why)) = drift.iter().find(|d| !self.source_drift.contains(d)) {
            self.status = why.clone();
        }
        self.source_drift = drift;
    }

    /// [`Self::check_sources`] at most every two seconds, from the frame loop.
    pub(crate) fn check_sources_now_and_then(&mut self) {
        if self
            .drift_checked
            .is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(2))
        {
            self.check_sources();
        }
    }

    /// Imports task `task`'s files again (after they changed on disk).
    pub fn reimport_task(&mut self, task: usize) {
        let Some(slot) = self.data.get_mut(task) else {
            return;
        };
        *slot = None;
        self.source_drift.retain(|(t, _)| *t != task);
        self.status = format!("importing {} again", self.project.tasks[task].name);
        let pending: Vec<usize> = (0..self.data.len())
            .filter(|&j| self.data[j].is_none())
            .collect();
        self.load_tasks(pending);
    }

    /// The warnings about changed dataset files, each with its Re-import button.
    pub(crate) fn drift_warnings(&mut self, ui: &mut egui::Ui) {
        let mut reimport = None;
        for (task, why) in &self.source_drift {
            ui.horizontal_wrapped(|ui| {
                ui.colored_label(ui.visuals().warn_fg_color, why);
                if ui
                    .button("Re-import")
                    .on_hover_text("Read this task's files again as they are now")
                    .clicked()
                {
                    reimport = Some(*task);
                }
            });
        }
        if let Some(t) = reimport {
            self.reimport_task(t);
        }
    }

    pub(crate) fn all_data_loaded(&self) -> bool {
        !self.data.is_empty() && self.data.iter().all(Option::is_some)
    }

    /// Reads every task's data again.
    pub fn reload_all_data(&mut self) {
        self.load_generation += 1;
        self.data = vec![None; self.project.tasks.len()];
        let all = (0..self.project.tasks.len()).collect();
        self.load_tasks(all);
    }

    pub(crate) fn load_tasks(&mut self, tasks: Vec<usize>) {
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

    /// Saves to `path`; when that is the open project's file and another program changed it
    /// since it was opened or saved, asks first instead of overwriting.
    pub fn save_as(&mut self, path: PathBuf) {
        self.save_checked(path, false);
    }

    /// Whether `path` is the open project's file and holds something else than the studio
    /// last read or wrote there.
    fn changed_on_disk(&self, path: &std::path::Path) -> bool {
        if self.path.as_deref() != Some(path) {
            return false;
        }
        match (&self.disk_bytes, std::fs::read(path)) {
            (Some(known), Ok(now)) => *known != now,
            // Deleted or unreadable since: saving puts it back, nothing is lost.
            _ => false,
        }
    }

    /// Answers the "changed on disk" question: overwrite with the studio's project, reload the
    /// file (dropping the edits made here), or neither.
    pub fn resolve_save_conflict(&mut self, choice: SaveConflict) {
        let Some(path) = self.save_conflict.take() else {
            return;
        };
        match choice {
            SaveConflict::Overwrite => self.save_checked(path, true),
            SaveConflict::Reload => self.open_project(path),
            SaveConflict::Cancel => {
                self.status = format!(
                    "not saved; {} is as the other program left it",
                    path.display()
                )
            }
        }
    }

    fn save_checked(&mut self, path: PathBuf, overwrite: bool) {
        let path = std::path::absolute(&path).unwrap_or(path);
        if !overwrite && self.changed_on_disk(&path) {
            self.status = format!(
                "not saved: {} was changed by another program since it was opened",
                path.display()
            );
            self.save_conflict = Some(path);
            return;
        }
        let mut saved = self.project.clone();
        match saved.save(&path) {
            Ok(()) => {
                self.project = saved;
                self.saved_toml = self.project.to_toml();
                self.disk_bytes = std::fs::read(&path).ok();
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

    pub(crate) fn on_dialog(&mut self, kind: DialogKind, paths: Vec<PathBuf>) {
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
                self.start_export(run, first, crate::ui::jobs::ExportKind::HuggingFace)
            }
            DialogKind::ExportGguf(run, quant) => {
                self.start_export(run, first, crate::ui::jobs::ExportKind::Gguf(quant))
            }
            DialogKind::ExportRecipe => self.start_recipe(first),
        }
    }

    fn start_export(&mut self, run: PathBuf, out: PathBuf, kind: crate::ui::jobs::ExportKind) {
        match crate::ui::jobs::start_export(run, out, kind, self.wake.clone()) {
            Ok(rx) => {
                self.export_job = Some(rx);
                self.status = "exporting…".to_string();
            }
            Err(e) => self.status = e,
        }
    }

    /// Writes the open project's recipe (as it is now, with the chosen model) to `out`.
    pub(crate) fn start_recipe(&mut self, out: PathBuf) {
        let model = self.model.choice();
        match crate::ui::jobs::start_recipe(self.project.clone(), model, out, self.wake.clone()) {
            Ok(rx) => {
                self.export_job = Some(rx);
                self.status = "writing the recipe (tokenizing and packing)…".to_string();
            }
            Err(e) => self.status = e,
        }
    }
}
