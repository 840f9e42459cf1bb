//! The Train tab: model and hyperparameters, run controls with progress, live plots fed by the
//! worker's events (loss raw and smoothed, learning rate, tokens/s, per-task eval loss and exact
//! match under the task's prompt and the default prompt), and a "try it" box.

use std::sync::OnceLock;

use egui::RichText;
use egui_plot::{
    Bar, BarChart, Legend, Line, LineStyle, MarkerShape, Plot, PlotPoints, Points, VLine,
};

use crate::core::events::TrainCommand;
use crate::core::metrics::Series;
use crate::core::phases::{Difficulty, PhaseSchedule};
use crate::core::runs::RunHistory;
use crate::core::train_settings::{Decay, LoraTarget, LossNorm, SettingField};
use crate::ui::app::{ModelPick, StudioApp, task_color};
use crate::ui::jobs::{DialogKind, start_answer};

/// The device a run would use and why, found once on the `device` thread (opening a GPU can
/// take a moment).
fn device_line(wake: &crate::core::events::Wake) -> &'static str {
    static LINE: OnceLock<String> = OnceLock::new();
    static STARTED: std::sync::Once = std::sync::Once::new();
    if let Some(line) = LINE.get() {
        return line;
    }
    STARTED.call_once(|| {
        let wake = wake.clone();
        let _ = std::thread::Builder::new()
            .name("device".into())
            .spawn(move || {
                let d = crate::train::device::choose_device(false);
                let _ = LINE.set(format!("{} — {}", d.name, d.reason));
                wake();
            });
    });
    "checking…"
}

fn line(name: &str, points: Vec<[f64; 2]>) -> Line<'static> {
    Line::new(name.to_string(), PlotPoints::from(points))
}

/// What a plot draws: lines, and markers for series with few points.
enum Item {
    Line(Line<'static>),
    Points(Points<'static>),
    VLine(VLine),
    Bars(BarChart),
}

/// Dotted vertical lines where a phased run's phases began (after the first).
fn phase_lines(history: &RunHistory) -> Vec<Item> {
    history
        .phase_starts
        .iter()
        .filter(|(p, _)| *p > 1)
        .map(|(p, step)| {
            Item::VLine(
                VLine::new(format!("phase {p}"), *step as f64)
                    .color(egui::Color32::from_gray(170))
                    .style(LineStyle::dotted_dense()),
            )
        })
        .collect()
}

/// Draws one small plot of named series (the exact-match plot always spans 0 to 1).
fn small_plot(ui: &mut egui::Ui, id: &str, title: &str, items: Vec<Item>, width: f32) {
    ui.vertical(|ui| {
        ui.set_width(width);
        ui.strong(title);
        let mut plot = Plot::new(id).height(170.0).width(width);
        if id == "exact" {
            // Scores rise to the right: the legend goes where the curves start, near zero.
            plot = plot
                .include_y(0.0)
                .include_y(1.0)
                .legend(Legend::default().position(egui_plot::Corner::LeftTop));
        } else {
            plot = plot.legend(Legend::default());
        }
        plot.show(ui, |plot| {
            for item in items {
                match item {
                    Item::Line(l) => plot.line(l),
                    Item::Points(p) => plot.points(p),
                    Item::VLine(v) => plot.vline(v),
                    Item::Bars(b) => plot.bar_chart(b),
                }
            }
        });
    });
}

/// Eval curves of every task under one metric: the task's own prompt solid, the default prompt
/// dashed, in the task's colour.
fn eval_lines(
    history: &RunHistory,
    task_names: &[String],
    pick: impl Fn(&crate::core::runs::TaskCurves) -> (&Series, &Series),
) -> Vec<Item> {
    let mut out = Vec::new();
    for (name, curves) in &history.tasks {
        let color = task_names
            .iter()
            .position(|n| n == name)
            .map_or(egui::Color32::GRAY, task_color);
        let (own, default) = pick(curves);
        // One legend entry per task, toggling both of its lines; the title says which is which.
        for (series, style, shape) in [
            (own, LineStyle::Solid, MarkerShape::Circle),
            (default, LineStyle::dashed_loose(), MarkerShape::Diamond),
        ] {
            if series.is_empty() {
                continue;
            }
            out.push(Item::Line(
                line(name, series.points())
                    .color(color)
                    .style(style)
                    .width(2.0),
            ));
            out.push(Item::Points(
                Points::new(name.as_str(), PlotPoints::from(series.points()))
                    .color(color)
                    .shape(shape)
                    .radius(3.5),
            ));
        }
    }
    out
}

impl StudioApp {
    pub(crate) fn train_tab(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical()
            .id_salt("train")
            .show(ui, |ui| {
                ui.add_enabled_ui(!self.is_training(), |ui| self.train_settings(ui));
                ui.separator();
                self.train_controls(ui);
                ui.separator();
                self.train_plots(ui);
                ui.separator();
                self.try_it_box(ui);
            });
    }

    fn train_settings(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("Model");
            if ui
                .radio(self.model == ModelPick::Tiny, "tiny (built-in)")
                .clicked()
            {
                self.model = ModelPick::Tiny;
            }
            let folder = match &self.model {
                ModelPick::Folder(p) => format!("folder: {}", p.display()),
                _ => "Hugging Face folder…".to_string(),
            };
            if ui
                .radio(matches!(self.model, ModelPick::Folder(_)), folder)
                .clicked()
            {
                self.ask(DialogKind::ModelFolder);
            }
            let gguf = match &self.model {
                ModelPick::Gguf(p) => format!("GGUF: {}", p.display()),
                _ => "GGUF file…".to_string(),
            };
            if ui
                .radio(matches!(self.model, ModelPick::Gguf(_)), gguf)
                .clicked()
            {
                self.ask(DialogKind::Gguf);
            }
            let l = ui.label("or a path:");
            ui.add(egui::TextEdit::singleline(&mut self.model_path).desired_width(240.0))
                .labelled_by(l.id);
            if ui.button("Use").clicked() && !self.model_path.trim().is_empty() {
                let p = std::path::PathBuf::from(self.model_path.trim());
                if p.is_dir() {
                    self.model = ModelPick::Folder(p);
                } else if p.is_file() {
                    self.model = ModelPick::Gguf(p);
                } else {
                    self.status = format!("no such model: {}", p.display());
                }
            }
        });
        ui.label(format!("Device: {}", device_line(&self.wake)));
        let t = &mut self.project.training;
        ui.horizontal_wrapped(|ui| {
            let mut limit = self.steps_override.is_some();
            ui.checkbox(&mut limit, "Stop after");
            let mut steps = self.steps_override.unwrap_or(100);
            let l = ui.label("steps");
            ui.add_enabled(limit, egui::DragValue::new(&mut steps).range(1..=1_000_000))
                .labelled_by(l.id);
            self.steps_override = limit.then_some(steps);
            if !limit {
                ui.weak(format!("({} epochs)", self.project.mixing.epochs));
            }
            // Typed values are kept as typed (within what the type holds) and refused here
            // with the reason, rather than quietly clamped.
            let refuse = |ui: &mut egui::Ui, why: Option<&str>| {
                if let Some(why) = why {
                    ui.colored_label(ui.visuals().error_fg_color, why);
                }
            };
            let l = ui.label("Rows per batch");
            ui.add(egui::DragValue::new(&mut t.batch_rows).range(0..=256))
                .labelled_by(l.id);
            refuse(ui, t.problem(SettingField::BatchRows));
            let l = ui.label("Accumulation");
            ui.add(egui::DragValue::new(&mut t.grad_accum).range(0..=256))
                .labelled_by(l.id);
            refuse(ui, t.problem(SettingField::GradAccum));
            let l = ui.label("Learning rate");
            ui.add(
                egui::DragValue::new(&mut t.lr)
                    .speed(1e-5)
                    .range(-1.0..=1.0)
                    .max_decimals(6),
            )
            .labelled_by(l.id);
            refuse(ui, t.problem(SettingField::LearningRate));
            let l = ui.label("Warm-up");
            ui.add(egui::DragValue::new(&mut t.warmup_steps))
                .labelled_by(l.id);
            let l = ui.label("Decay");
            egui::ComboBox::from_id_salt("decay")
                .selected_text(format!("{:?}", t.decay).to_lowercase())
                .show_ui(ui, |ui| {
                    for d in [Decay::Cosine, Decay::Linear, Decay::Constant] {
                        ui.selectable_value(&mut t.decay, d, format!("{d:?}").to_lowercase());
                    }
                })
                .response
                .labelled_by(l.id);
            let l = ui.label("Loss");
            egui::ComboBox::from_id_salt("loss_norm")
                .selected_text(match t.loss_norm {
                    LossNorm::TokenMean => "token mean",
                    LossNorm::SampleMean => "sample mean (MoI v2)",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut t.loss_norm, LossNorm::TokenMean, "token mean");
                    ui.selectable_value(
                        &mut t.loss_norm,
                        LossNorm::SampleMean,
                        "sample mean (MoI v2)",
                    );
                })
                .response
                .labelled_by(l.id);
        });
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Eval every");
            ui.add(egui::DragValue::new(&mut t.eval_every_steps))
                .labelled_by(l.id);
            let l = ui.label("eval items");
            ui.add(egui::DragValue::new(&mut t.eval_items).range(1..=10_000))
                .labelled_by(l.id);
            let l = ui.label("generated");
            ui.add(egui::DragValue::new(&mut t.eval_generate).range(0..=1000))
                .labelled_by(l.id);
            let l = ui.label("Early-stopping patience");
            ui.add(egui::DragValue::new(&mut t.early_stopping_patience))
                .labelled_by(l.id);
            let l = ui.label("Checkpoint every");
            ui.add(egui::DragValue::new(&mut t.checkpoint_every))
                .labelled_by(l.id);
            ui.checkbox(&mut t.activation_checkpointing, "recompute activations")
                .on_hover_text(
                    "Activation checkpointing: keep only each layer's input and run the layer \
                     again going backward. About a third more compute for much less memory on \
                     long rows and big models; the memory plan turns it on by itself when a \
                     row would not fit otherwise.",
                );
        });
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Phases");
            ui.add(egui::DragValue::new(&mut t.phases.count).range(1..=10))
                .labelled_by(l.id)
                .on_hover_text(
                    "Phased training: the records of every task cut into this many phases of \
                     rising difficulty, trained one after the other (1: one-off training)",
                );
            ui.add_enabled_ui(!t.phases.is_off(), |ui| {
                let l = ui.label("difficulty by");
                let current = match &t.phases.difficulty {
                    Difficulty::Length => "answer length",
                    Difficulty::Column(_) => "a column",
                    Difficulty::Loss => "the model's loss",
                };
                egui::ComboBox::from_id_salt("difficulty")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        let d = &mut t.phases.difficulty;
                        if ui
                            .selectable_label(*d == Difficulty::Length, "answer length")
                            .clicked()
                        {
                            *d = Difficulty::Length;
                        }
                        if ui
                            .selectable_label(d.column().is_some(), "a column")
                            .clicked()
                            && d.column().is_none()
                        {
                            *d = Difficulty::Column("difficulty".into());
                        }
                        if ui
                            .selectable_label(*d == Difficulty::Loss, "the model's loss")
                            .clicked()
                        {
                            *d = Difficulty::Loss;
                        }
                    })
                    .response
                    .labelled_by(l.id);
                if let Difficulty::Column(name) = &mut t.phases.difficulty {
                    let l = ui.label("column");
                    ui.add(egui::TextEdit::singleline(name).desired_width(100.0))
                        .labelled_by(l.id);
                }
                let l = ui.label("schedule");
                egui::ComboBox::from_id_salt("phase_schedule")
                    .selected_text(match t.phases.schedule {
                        PhaseSchedule::Continue => "one for the run",
                        PhaseSchedule::Fresh => "fresh each phase",
                    })
                    .show_ui(ui, |ui| {
                        let s = &mut t.phases.schedule;
                        ui.selectable_value(s, PhaseSchedule::Continue, "one for the run");
                        ui.selectable_value(s, PhaseSchedule::Fresh, "fresh each phase");
                    })
                    .response
                    .labelled_by(l.id);
                ui.checkbox(&mut t.phases.random, "random phases (control)");
            });
        });
        ui.horizontal_wrapped(|ui| {
            ui.checkbox(&mut t.lora.enabled, "LoRA (base frozen)");
            ui.add_enabled_ui(t.lora.enabled, |ui| {
                let l = ui.label("rank");
                ui.add(egui::DragValue::new(&mut t.lora.rank).range(1..=256))
                    .labelled_by(l.id);
                let l = ui.label("alpha");
                ui.add(egui::DragValue::new(&mut t.lora.alpha).range(0.1..=1024.0))
                    .labelled_by(l.id);
                let l = ui.label("dropout");
                ui.add(
                    egui::DragValue::new(&mut t.lora.dropout)
                        .speed(0.01)
                        .range(0.0..=0.9),
                )
                .labelled_by(l.id);
                for target in LoraTarget::ALL {
                    let mut on = t.lora.targets.contains(&target);
                    if ui.checkbox(&mut on, target.module()).changed() {
                        if on {
                            t.lora.targets.push(target);
                            t.lora.targets.sort();
                        } else if t.lora.targets.len() > 1 {
                            t.lora.targets.retain(|x| *x != target);
                        }
                    }
                }
            });
        });
    }

    fn train_controls(&mut self, ui: &mut egui::Ui) {
        let training = self.is_training();
        let paused = self.train.as_ref().is_some_and(|t| t.paused);
        ui.horizontal(|ui| {
            let refused = self.start_refusals();
            if ui
                .add_enabled(
                    !training && !self.project.tasks.is_empty() && refused.is_empty(),
                    egui::Button::new("Start"),
                )
                .on_disabled_hover_text(if refused.is_empty() {
                    "a run is going on, or the project has no task".to_string()
                } else {
                    format!("fix first: {}", refused.join("; "))
                })
                .clicked()
            {
                self.start_training();
            }
            if paused {
                if ui
                    .add_enabled(training, egui::Button::new("Resume"))
                    .clicked()
                {
                    self.command(TrainCommand::Resume);
                }
            } else if ui
                .add_enabled(training, egui::Button::new("Pause"))
                .clicked()
            {
                self.command(TrainCommand::Pause);
            }
            if ui
                .add_enabled(training, egui::Button::new("Stop"))
                .clicked()
            {
                self.command(TrainCommand::Stop);
            }
            if ui
                .add_enabled(training, egui::Button::new("Save checkpoint"))
                .clicked()
            {
                self.command(TrainCommand::SaveCheckpoint);
            }
            if ui
                .add_enabled(training, egui::Button::new("Eval now"))
                .clicked()
            {
                self.command(TrainCommand::EvalNow);
            }
        });
        let h = &self.history;
        let total = h.total_steps.unwrap_or(0);
        let state = match &h.ending {
            Some(crate::core::events::TrainEvent::Finished { .. }) => "finished",
            Some(crate::core::events::TrainEvent::Stopped { .. }) => "stopped",
            Some(crate::core::events::TrainEvent::Failed { .. }) => "failed",
            _ if paused => "paused",
            _ if training => "training",
            _ => "idle",
        };
        let tps = h.tokens_per_sec.last().map_or(0.0, |p| p[1]);
        let eta = h
            .eta_s()
            .map_or(String::new(), |s| format!(" · ETA {}", fmt_secs(s)));
        let text = format!(
            "{state} · step {}/{} · epoch {:.2} · {:.0} tokens/s · {} elapsed{eta}",
            h.step,
            total,
            h.epoch,
            tps,
            fmt_secs(h.elapsed_s)
        );
        ui.add(
            egui::ProgressBar::new(if total > 0 {
                h.step as f32 / total as f32
            } else {
                0.0
            })
            .text(text),
        );
        if let Some(crate::core::events::TrainEvent::Failed { error }) = &h.ending {
            ui.colored_label(ui.visuals().error_fg_color, error);
        }
        if let Some(dir) = self.run_dir() {
            ui.weak(format!("run folder: {}", dir.display()));
        }
    }

    fn train_plots(&mut self, ui: &mut egui::Ui) {
        let h = &self.history;
        let width = ((ui.available_width() - 24.0) / 3.0).max(160.0);
        let names: Vec<String> = self.project.tasks.iter().map(|t| t.name.clone()).collect();
        ui.horizontal(|ui| {
            let mut items = vec![
                Item::Line(line("raw", h.loss.points()).color(egui::Color32::from_gray(150))),
                Item::Line(
                    line("total", h.loss.smoothed(0.9))
                        .color(egui::Color32::from_rgb(86, 156, 214))
                        .width(2.5),
                ),
            ];
            // One line per task, smoothed: which task is learnt and which is starved.
            for (name, series) in &h.task_loss {
                let color = names
                    .iter()
                    .position(|n| n == name)
                    .map_or(egui::Color32::GRAY, task_color);
                items.push(Item::Line(
                    line(name, series.smoothed(0.9)).color(color).width(1.5),
                ));
            }
            items.extend(phase_lines(h));
            let title = if h.phase_starts.is_empty() {
                "Training loss, total and per task"
            } else {
                "Training loss, total and per task (dotted: a phase begins)"
            };
            small_plot(ui, "loss", title, items, width);
            let mut lr = vec![Item::Line(line("lr", h.lr.points()))];
            lr.extend(phase_lines(h));
            small_plot(ui, "lr", "Learning rate", lr, width);
            small_plot(
                ui,
                "tps",
                "Tokens/s",
                vec![Item::Line(line("tokens/s", h.tokens_per_sec.points()))],
                width,
            );
        });
        let chained = h
            .tasks
            .values()
            .any(|c| !c.steps_task.is_empty() || !c.steps_default.is_empty());
        let plots = if chained { 3.0 } else { 2.0 };
        let width2 = ((ui.available_width() - 8.0 * plots) / plots).max(200.0);
        ui.horizontal(|ui| {
            small_plot(
                ui,
                "eval_loss",
                "Eval loss per task (solid: task prompt, dashed: default prompt)",
                eval_lines(h, &names, |c| (&c.loss_task, &c.loss_default)),
                width2,
            );
            small_plot(
                ui,
                "exact",
                "Exact match per task (solid: task prompt, dashed: default prompt)",
                eval_lines(h, &names, |c| (&c.exact_task, &c.exact_default)),
                width2,
            );
            if chained {
                small_plot(
                    ui,
                    "steps",
                    "Chained instructions with every step done",
                    eval_lines(h, &names, |c| (&c.steps_task, &c.steps_default)),
                    width2,
                );
            }
        });
        if let Some(d) = &h.difficulty {
            difficulty_plot(ui, d, &names);
        }
        if !h.latest_eval.is_empty() {
            egui::CollapsingHeader::new("Latest evaluation")
                .default_open(false)
                .show(ui, |ui| {
                    egui::Grid::new("latest_eval").striped(true).show(ui, |ui| {
                        for head in [
                            "task",
                            "prompt",
                            "loss",
                            "perplexity",
                            "accuracy",
                            "exact match",
                            "every step",
                        ] {
                            ui.strong(head);
                        }
                        ui.end_row();
                        for m in &h.latest_eval {
                            ui.label(&m.task);
                            ui.label(m.prompt.label());
                            ui.label(format!("{:.4}", m.loss));
                            ui.label(format!("{:.2}", m.perplexity));
                            ui.label(format!("{:.1} %", m.accuracy * 100.0));
                            ui.label(m.exact_match.map_or("-".into(), |x| {
                                format!("{:.1} % of {}", x * 100.0, m.generated)
                            }));
                            ui.label(m.steps_done.map_or("-".into(), |x| {
                                format!("{:.1} % of {}", x * 100.0, m.steps_tried)
                            }));
                            ui.end_row();
                        }
                    });
                });
        }
    }

    fn try_it_box(&mut self, ui: &mut egui::Ui) {
        ui.strong("Try it");
        let training = self.is_training();
        let finished_model = self
            .run_dir()
            .map(|d| d.join("model"))
            .filter(|m| m.join("config.json").is_file());
        ui.horizontal(|ui| {
            let l = ui.label("System prompt");
            let selected = match self.try_it.system {
                None => "default".to_string(),
                Some(i) => self
                    .project
                    .tasks
                    .get(i)
                    .map_or("default".into(), |t| t.name.clone()),
            };
            egui::ComboBox::from_id_salt("tryit_system")
                .selected_text(selected)
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.try_it.system, None, "default");
                    for (i, t) in self.project.tasks.iter().enumerate() {
                        ui.selectable_value(&mut self.try_it.system, Some(i), &t.name);
                    }
                })
                .response
                .labelled_by(l.id);
            let l = ui.label("max tokens");
            ui.add(egui::DragValue::new(&mut self.try_it.max_new).range(1..=2048))
                .labelled_by(l.id);
        });
        let l = ui.label("Prompt");
        ui.add(
            egui::TextEdit::multiline(&mut self.try_it.prompt)
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(l.id);
        let busy = self.try_it.job.is_some() || self.try_it.asked_trainer;
        let can = training || finished_model.is_some();
        ui.horizontal(|ui| {
            if ui
                .add_enabled(can && !busy, egui::Button::new("Generate"))
                .clicked()
            {
                let system = match self.try_it.system {
                    Some(i) => self.project.tasks.get(i).map(|t| t.system_prompt.clone()),
                    None => None,
                }
                .unwrap_or_else(|| self.project.default_system_prompt.clone());
                if training {
                    let asked = self.command(TrainCommand::Generate {
                        system,
                        prompt: self.try_it.prompt.clone(),
                        max_new_tokens: self.try_it.max_new,
                    });
                    if asked {
                        self.try_it.asked_trainer = true;
                        self.try_it.answer = "(waiting for the next step)".into();
                    }
                } else if let Some(model) = finished_model.clone() {
                    match start_answer(
                        model,
                        system,
                        self.try_it.prompt.clone(),
                        self.try_it.max_new,
                        self.wake.clone(),
                    ) {
                        Ok(rx) => {
                            self.try_it.job = Some(rx);
                            self.try_it.answer = "(loading the model)".into();
                        }
                        Err(e) => self.try_it.answer = e,
                    }
                }
            }
            if busy {
                ui.spinner();
            }
            if !can {
                ui.weak("Start a run: the answer comes from its current weights.");
            } else if training {
                ui.weak("answers with the weights of the running step");
            } else {
                ui.weak("answers with the last run's model");
            }
        });
        if !self.try_it.answer.is_empty() {
            egui::Frame::group(ui.style()).show(ui, |ui| {
                ui.set_width(ui.available_width());
                let shown = if self.try_it.answer.trim().is_empty() {
                    "(an empty answer: the model ended its turn at once)"
                } else {
                    self.try_it.answer.as_str()
                };
                ui.label(RichText::new(shown).monospace());
            });
        }
    }
}

/// A phased run's difficulty scores as a histogram, with each task's cut points between
/// phases in the task's colour.
fn difficulty_plot(ui: &mut egui::Ui, d: &crate::core::phases::DifficultyReport, names: &[String]) {
    let sizes: Vec<String> = d.records.iter().map(u64::to_string).collect();
    let mut items = Vec::new();
    let bars: Vec<Bar> = d
        .histogram
        .iter()
        .map(|b| {
            Bar::new((b.low + b.high) / 2.0, b.count as f64).width((b.high - b.low).max(1e-9) * 0.9)
        })
        .collect();
    items.push(Item::Bars(
        BarChart::new("records", bars).color(egui::Color32::from_gray(140)),
    ));
    for (task, cuts) in &d.cuts {
        let color = names
            .iter()
            .position(|n| n == task)
            .map_or(egui::Color32::GRAY, task_color);
        for c in cuts {
            items.push(Item::VLine(
                VLine::new(task.as_str(), *c).color(color).width(1.5),
            ));
        }
    }
    let width = ui.available_width().min(720.0);
    small_plot(
        ui,
        "difficulty",
        &format!(
            "Difficulty of the training records: {} (records per phase {}; lines: each task's \
             cut points)",
            d.by,
            sizes.join(" / ")
        ),
        items,
        width,
    );
}

/// Seconds as `1h 02m`, `3m 05s` or `12s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}
