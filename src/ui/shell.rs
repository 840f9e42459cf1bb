//! The window's frame: menu bar, status bar and the task list beside the tabs.

use std::path::PathBuf;
use std::time::Instant;

use egui::Color32;

use crate::ui::app::{StudioApp, Tab, task_color};
use crate::ui::jobs::DialogKind;

impl StudioApp {
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
        if !self.is_loading() {
            self.check_sources_now_and_then();
        }
        self.save_conflict_window(&ui.ctx().clone());
        egui::Panel::top("menu").show(ui, |ui| self.menu_bar(ui));
        egui::Panel::bottom("status").show(ui, |ui| self.status_bar(ui));
        egui::Panel::left("tasks")
            .default_size(250.0)
            .show(ui, |ui| self.task_list(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            if let Some(err) = &self.open_error {
                ui.colored_label(ui.visuals().error_fg_color, err);
            }
            self.drift_warnings(ui);
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
                Tab::Experiments => self.experiments_tab(ui),
                Tab::Runs => self.runs_tab(ui),
            }
        });
        if self.is_training()
            || self.experiments.is_running()
            || self.preview.job.is_some()
            || self.is_loading()
        {
            ui.ctx()
                .request_repaint_after(crate::ui::events::LIVE_WAKE_GAP);
        }
        self.last_frame = started.elapsed();
    }

    pub(crate) fn menu_bar(&mut self, ui: &mut egui::Ui) {
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

    pub(crate) fn status_bar(&mut self, ui: &mut egui::Ui) {
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

    pub(crate) fn task_list(&mut self, ui: &mut egui::Ui) {
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
