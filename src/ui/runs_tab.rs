//! The Runs tab: past runs from `runs/` beside the project — their settings and final metrics —
//! with several selectable to overlay their loss curves, a button to open a run's folder, and
//! exports: a run's model as a Hugging Face folder or a GGUF file, the project as a recipe.

use egui_plot::{Legend, Line, Plot, PlotPoints};

use crate::core::runs::RunHistory;
use crate::ui::app::{StudioApp, task_color};
use crate::ui::jobs::DialogKind;

fn summary_text(summary: Option<&serde_json::Value>, key: &str) -> String {
    match summary.and_then(|s| s.get(key)) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "—".to_string(),
        Some(serde_json::Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.fract() != 0.0)
            .map_or_else(|| n.to_string(), |f| format!("{f:.4}")),
        Some(v) => v.to_string(),
    }
}

/// "Export recipe…": the open project's packed MoI data and settings for transformers/accelerate.
pub(crate) fn recipe_button(app: &mut StudioApp, ui: &mut egui::Ui) {
    if ui
        .add_enabled(
            app.export_job.is_none(),
            egui::Button::new("Export recipe…"),
        )
        .on_hover_text(
            "Write the project's packed rows, held-out items and settings with a train.py for \
             Hugging Face transformers + accelerate (DDP, FSDP, DeepSpeed ZeRO-3), to train \
             it on a bigger machine",
        )
        .clicked()
    {
        app.export_to(DialogKind::ExportRecipe);
    }
}

impl StudioApp {
    /// An export to the folder typed in the Runs tab, or, with none typed, to one chosen in a
    /// file dialog.
    pub(crate) fn export_to(&mut self, kind: DialogKind) {
        let typed = self.export_path.trim();
        if typed.is_empty() {
            self.ask(kind);
        } else {
            let out = std::path::PathBuf::from(typed);
            self.on_dialog(kind, vec![out]);
        }
    }

    pub(crate) fn runs_tab(&mut self, ui: &mut egui::Ui) {
        if !self.runs_loaded {
            self.refresh_runs();
        }
        ui.horizontal(|ui| {
            ui.strong(format!("Runs in {}", self.project.runs_dir().display()));
            if ui.button("Refresh").clicked() {
                self.refresh_runs();
            }
            ui.separator();
            recipe_button(self, ui);
            ui.separator();
            ui.label("GGUF weights");
            egui::ComboBox::from_id_salt("gguf_quant")
                .selected_text(self.gguf_quant.label())
                .show_ui(ui, |ui| {
                    use crate::train::gguf_export::Quant;
                    for q in [Quant::F16, Quant::Q8_0, Quant::Q4_0] {
                        ui.selectable_value(&mut self.gguf_quant, q, q.label());
                    }
                });
            ui.separator();
            let l = ui.label("Export to");
            ui.add(
                egui::TextEdit::singleline(&mut self.export_path)
                    .desired_width(260.0)
                    .hint_text("a folder (empty: choose in a dialog)"),
            )
            .labelled_by(l.id);
        });
        if self.runs.is_empty() {
            ui.label("No runs yet: start one in the Train tab.");
            return;
        }
        let mut toggled = None;
        let mut open = None;
        let mut export = None;
        let mut export_gguf = None;
        let mut resume = None;
        let can_start = !self.is_training() && !self.experiments.is_running();
        egui::ScrollArea::vertical()
            .id_salt("runs")
            .max_height(240.0)
            .show(ui, |ui| {
                egui::Grid::new("runs_table").striped(true).show(ui, |ui| {
                    for h in [
                        "",
                        "run",
                        "model",
                        "mode",
                        "LoRA",
                        "steps",
                        "ending",
                        "final loss",
                        "best eval loss",
                        "",
                    ] {
                        ui.strong(h);
                    }
                    ui.end_row();
                    for run in &self.runs {
                        // A run without a summary is going on, or was cut off: what it
                        // recorded when it started still says what it is.
                        let s = run.summary.as_ref().or(run.info.as_ref());
                        let mut on = self.selected_runs.contains(&run.dir);
                        if ui
                            .checkbox(&mut on, "")
                            .on_hover_text("Overlay its curves")
                            .changed()
                        {
                            toggled = Some((run.dir.clone(), on));
                        }
                        let settings = run
                            .summary
                            .as_ref()
                            .and_then(|s| s.get("training"))
                            .and_then(|t| serde_json::to_string_pretty(t).ok())
                            .unwrap_or_else(|| "settings in project.moi.toml".to_string());
                        ui.label(&run.id).on_hover_text(settings);
                        ui.label(summary_text(s, "model"));
                        ui.label(summary_text(s, "mode"));
                        ui.label(summary_text(s, "lora"));
                        ui.label(format!(
                            "{}/{}",
                            summary_text(s, "steps"),
                            summary_text(s, "total_steps")
                        ));
                        match (&run.summary, &run.failure) {
                            (Some(_), _) => {
                                ui.label(summary_text(s, "ending"));
                            }
                            (None, Some(error)) => {
                                ui.colored_label(ui.visuals().error_fg_color, "failed")
                                    .on_hover_text(error);
                            }
                            (None, None) => {
                                ui.label("running or cut off");
                            }
                        }
                        ui.label(summary_text(run.summary.as_ref(), "final_loss"));
                        ui.label(summary_text(s, "best_eval_loss"));
                        ui.horizontal(|ui| {
                            let has_model = run.has_model;
                            if run.resumable
                                && ui
                                    .add_enabled(can_start, egui::Button::new("Resume"))
                                    .on_hover_text(
                                        "Go on from its newest checkpoint, exactly where it \
                                         stopped, with the settings and model it ran with",
                                    )
                                    .clicked()
                            {
                                resume = Some(run.dir.clone());
                            }
                            if ui.button("Open folder").clicked() {
                                open = Some(run.dir.clone());
                            }
                            if ui
                                .add_enabled(has_model, egui::Button::new("Export…"))
                                .clicked()
                            {
                                export = Some(run.dir.clone());
                            }
                            if ui
                                .add_enabled(has_model, egui::Button::new("GGUF…"))
                                .on_hover_text(
                                    "Write the model as a llama.cpp GGUF file (the weight type \
                                     chosen above) with an Ollama Modelfile",
                                )
                                .clicked()
                            {
                                export_gguf = Some(run.dir.clone());
                            }
                        });
                        ui.end_row();
                    }
                });
            });
        if let Some((dir, on)) = toggled {
            if on {
                // Read on the `runs` thread; a run still going on is read again each time it
                // is ticked.
                let tx = self.history_channel.0.clone();
                let wake = self.wake.clone();
                let d = dir.clone();
                let spawned = std::thread::Builder::new()
                    .name("runs".into())
                    .spawn(move || {
                        let h = RunHistory::load(&d)
                            .map(|(h, _)| h)
                            .map_err(|e| format!("cannot read {}: {e}", d.display()));
                        if tx.send((d, h)).is_ok() {
                            wake();
                        }
                    });
                if let Err(e) = spawned {
                    self.status = format!("could not start the runs thread: {e}");
                }
                self.selected_runs.insert(dir);
            } else {
                self.selected_runs.remove(&dir);
            }
        }
        if let Some(dir) = open {
            let opener = if cfg!(target_os = "macos") {
                "open"
            } else if cfg!(target_os = "windows") {
                "explorer"
            } else {
                "xdg-open"
            };
            if let Err(e) = std::process::Command::new(opener).arg(&dir).spawn() {
                self.status = format!("cannot open {}: {e}", dir.display());
            }
        }
        if let Some(dir) = resume {
            self.resume_training(dir);
            return;
        }
        if let Some(dir) = export {
            self.export_to(DialogKind::Export(dir));
        }
        if let Some(dir) = export_gguf {
            self.export_to(DialogKind::ExportGguf(dir, self.gguf_quant));
        }
        ui.separator();
        if self.selected_runs.is_empty() {
            ui.weak("Tick runs to overlay their curves.");
            return;
        }
        let width = ((ui.available_width() - 16.0) / 2.0).max(200.0);
        let selected: Vec<_> = self.selected_runs.iter().cloned().collect();
        ui.horizontal(|ui| {
            for (title, id, default_prompt) in [
                ("Training loss (smoothed)", "runs_loss", None),
                (
                    "Mean eval loss under the default prompt",
                    "runs_eval",
                    Some(true),
                ),
            ] {
                ui.vertical(|ui| {
                    ui.strong(title);
                    Plot::new(id)
                        .height(220.0)
                        .width(width)
                        .legend(Legend::default())
                        .show(ui, |plot| {
                            for (k, dir) in selected.iter().enumerate() {
                                let Some(h) = self.run_histories.get(dir) else {
                                    continue;
                                };
                                let name = dir
                                    .file_name()
                                    .map(|n| n.to_string_lossy().into_owned())
                                    .unwrap_or_default();
                                let points = match default_prompt {
                                    None => h.loss.smoothed(0.9),
                                    Some(_) => mean_default_eval(h),
                                };
                                plot.line(
                                    Line::new(name, PlotPoints::from(points))
                                        .color(task_color(k + 3))
                                        .width(2.0),
                                );
                            }
                        });
                });
            }
        });
    }
}

/// The mean over tasks of the default-prompt eval loss, per evaluated step.
fn mean_default_eval(h: &RunHistory) -> Vec<[f64; 2]> {
    let mut by_step: std::collections::BTreeMap<u64, (f64, usize)> = Default::default();
    for curves in h.tasks.values() {
        for [x, y] in curves.loss_default.points() {
            let e = by_step.entry(x as u64).or_default();
            e.0 += y;
            e.1 += 1;
        }
    }
    by_step
        .into_iter()
        .map(|(s, (sum, n))| [s as f64, sum / n as f64])
        .collect()
}
