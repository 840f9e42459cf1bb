//! The Data tab: the task table, the selected task's prompt and settings, its import report and
//! a record browser showing conversations as the task trains them.

use egui::{Color32, RichText};

use crate::core::eval::AnswerCheck;
use crate::core::presets::prompt_presets;
use crate::core::record::SystemRule;
use crate::core::tokenize::conversation;
use crate::ui::app::{StudioApp, Undo, task_color};

/// A labelled multi-line editor with undo (Ctrl+Z inside, or the button) and a presets menu.
/// Returns whether the text changed.
pub(crate) fn prompt_editor(
    ui: &mut egui::Ui,
    label: &str,
    text: &mut String,
    undo: &mut Undo,
) -> bool {
    let mut changed = false;
    let label_id = ui
        .horizontal(|ui| {
            let l = ui.strong(label);
            ui.menu_button("Presets", |ui| {
                for p in prompt_presets() {
                    if ui
                        .button(format!("{} ({})", p.name, p.task))
                        .on_hover_text(&p.prompt)
                        .clicked()
                    {
                        undo.stack.push(text.clone());
                        *text = p.prompt.clone();
                        changed = true;
                        ui.close();
                    }
                }
            });
            let can_undo = !undo.stack.is_empty();
            if ui
                .add_enabled(can_undo, egui::Button::new("Undo"))
                .on_hover_text("Back to the text before the last edit")
                .clicked()
                && let Some(prev) = undo.stack.pop()
            {
                *text = prev;
                changed = true;
            }
            l.id
        })
        .inner;
    let response = ui
        .add(
            egui::TextEdit::multiline(text)
                .id_salt(label)
                .desired_rows(3)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(label_id);
    if response.gained_focus() {
        undo.before = Some(text.clone());
    }
    if response.changed() {
        changed = true;
    }
    if response.lost_focus()
        && let Some(before) = undo.before.take()
        && before != *text
    {
        undo.stack.push(before);
    }
    changed
}

impl StudioApp {
    pub(crate) fn data_tab(&mut self, ui: &mut egui::Ui) {
        egui::ScrollArea::vertical().id_salt("data").show(ui, |ui| {
            ui.horizontal(|ui| {
                if ui.button("Import dataset…").clicked() {
                    self.ask(crate::ui::jobs::DialogKind::Import);
                }
                let l = ui.label("or a path:");
                let edit = ui
                    .add(egui::TextEdit::singleline(&mut self.import_path).desired_width(360.0))
                    .labelled_by(l.id);
                let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                if (ui.button("Import").clicked() || enter) && !self.import_path.trim().is_empty() {
                    let path = std::path::PathBuf::from(self.import_path.trim());
                    if path.exists() {
                        self.import_paths(&[path]);
                        self.import_path.clear();
                    } else {
                        self.status = format!("no such file: {}", path.display());
                    }
                }
            });
            self.task_table(ui);
            ui.add_space(8.0);
            let mut undo = self.undo.remove("default").unwrap_or_default();
            let mut prompt = self.project.default_system_prompt.clone();
            if prompt_editor(ui, "Default system prompt", &mut prompt, &mut undo) {
                self.project.default_system_prompt = prompt;
            }
            self.undo.insert("default".into(), undo);
            ui.weak(
                "Put first in every MoI row and used at inference; the per-task prompts \
                     below teach each task under its own prompt.",
            );
            ui.separator();
            if self.project.tasks.is_empty() {
                ui.label("Import a dataset (Data, Import dataset…, or drop a file on the window).");
                return;
            }
            self.selected_task = self.selected_task.min(self.project.tasks.len() - 1);
            self.task_editor(ui);
            ui.separator();
            self.import_report(ui);
            ui.separator();
            self.record_browser(ui);
        });
    }

    fn task_table(&mut self, ui: &mut egui::Ui) {
        let tokens: Vec<Option<u64>> = match &self.preview.bundle {
            Some((key, b)) if *key == self.preview_keys().1 => {
                b.prepared.tasks.iter().map(|t| Some(t.tokens())).collect()
            }
            _ => vec![None; self.project.tasks.len()],
        };
        egui::Grid::new("task_table")
            .striped(true)
            .num_columns(7)
            .show(ui, |ui| {
                for h in [
                    "task",
                    "sources",
                    "format",
                    "records",
                    "rejected",
                    "tokens",
                    "eval split",
                ] {
                    ui.strong(h);
                }
                ui.end_row();
                for (i, task) in self.project.tasks.iter().enumerate() {
                    let name = RichText::new(&task.name).color(task_color(i));
                    if ui.selectable_label(i == self.selected_task, name).clicked() {
                        self.selected_task = i;
                        self.record_index = 0;
                    }
                    let files: Vec<String> = task
                        .sources
                        .iter()
                        .map(|s| {
                            s.path.file_name().map_or_else(
                                || s.path.display().to_string(),
                                |n| n.to_string_lossy().into_owned(),
                            )
                        })
                        .collect();
                    ui.label(files.join(", "));
                    match self.data.get(i).and_then(Option::as_ref) {
                        Some(d) => {
                            let formats: Vec<String> = d
                                .sources
                                .iter()
                                .filter_map(|s| s.report.as_ref().map(|r| r.format.clone()))
                                .collect();
                            ui.label(formats.join(", "));
                            ui.label(d.records.len().to_string());
                            let rejected = d.rejected();
                            if rejected > 0 || d.failed_sources() > 0 {
                                ui.colored_label(
                                    ui.visuals().warn_fg_color,
                                    format!(
                                        "{rejected}{}",
                                        if d.failed_sources() > 0 {
                                            " (file unreadable)"
                                        } else {
                                            ""
                                        }
                                    ),
                                );
                            } else {
                                ui.label("0");
                            }
                            ui.label(
                                tokens
                                    .get(i)
                                    .copied()
                                    .flatten()
                                    .map_or("…".into(), |t| t.to_string()),
                            );
                            ui.label(format!(
                                "{} ({:.0} %)",
                                d.eval_records(),
                                task.eval_fraction * 100.0
                            ));
                        }
                        None => {
                            ui.spinner();
                            for _ in 0..4 {
                                ui.label("");
                            }
                        }
                    }
                    ui.end_row();
                }
            });
    }

    fn task_editor(&mut self, ui: &mut egui::Ui) {
        let i = self.selected_task;
        let key = format!("task-{i}");
        let mut undo = self.undo.remove(&key).unwrap_or_default();
        let mut remove = false;
        {
            let task = &mut self.project.tasks[i];
            ui.horizontal(|ui| {
                let l = ui.label("Task name");
                ui.add(egui::TextEdit::singleline(&mut task.name).desired_width(180.0))
                    .labelled_by(l.id);
                if ui.button("Remove task").clicked() {
                    remove = true;
                }
            });
            let mut prompt = task.system_prompt.clone();
            if prompt_editor(
                ui,
                &format!("System prompt of {}", task.name),
                &mut prompt,
                &mut undo,
            ) {
                task.system_prompt = prompt;
            }
            ui.horizontal(|ui| {
                let l = ui.label("Record's own system prompt");
                egui::ComboBox::from_id_salt("rule")
                    .selected_text(rule_text(task.system_rule))
                    .show_ui(ui, |ui| {
                        for rule in [
                            SystemRule::Replace,
                            SystemRule::Keep,
                            SystemRule::FillIfEmpty,
                        ] {
                            ui.selectable_value(&mut task.system_rule, rule, rule_text(rule));
                        }
                    })
                    .response
                    .labelled_by(l.id);
            });
            ui.horizontal(|ui| {
                let l = ui.label("Weight");
                ui.add(
                    egui::DragValue::new(&mut task.weight)
                        .speed(0.05)
                        .range(0.0..=100.0),
                )
                .labelled_by(l.id);
                let l = ui.label("Eval share");
                ui.add(egui::Slider::new(&mut task.eval_fraction, 0.0..=0.5))
                    .labelled_by(l.id);
                let l = ui.label("Answer check");
                egui::ComboBox::from_id_salt("check")
                    .selected_text(task.answer_check.label())
                    .show_ui(ui, |ui| {
                        for c in AnswerCheck::ALL {
                            ui.selectable_value(&mut task.answer_check, c, c.label());
                        }
                    })
                    .response
                    .labelled_by(l.id);
                let l = ui.label("Max new tokens");
                ui.add(egui::DragValue::new(&mut task.max_new_tokens).range(1..=4096))
                    .labelled_by(l.id);
            });
            sit_editor(ui, &mut task.sit);
        }
        self.undo.insert(key, undo);
        if remove {
            self.remove_task(i);
        }
    }

    fn import_report(&mut self, ui: &mut egui::Ui) {
        let i = self.selected_task;
        let Some(d) = self.data.get(i).and_then(Option::as_ref).cloned() else {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("reading the task's files…");
            });
            return;
        };
        ui.strong("Import report");
        for (s, source) in d.sources.iter().enumerate() {
            match (&source.report, &source.error) {
                (Some(r), _) => {
                    ui.horizontal(|ui| {
                        ui.label(format!(
                            "{}: {} ({}), {} records, {} rejected",
                            r.file.display(),
                            r.format,
                            format!("{:?}", r.kind).to_lowercase(),
                            r.records,
                            r.rejected
                        ));
                        if r.rejected > 0 && ui.button("Show rejected").clicked() {
                            self.report_open = Some((i, s));
                        }
                    });
                    if let Some(why) = &r.stopped_early {
                        ui.colored_label(ui.visuals().warn_fg_color, why);
                    }
                }
                (None, Some(e)) => {
                    ui.colored_label(ui.visuals().error_fg_color, e);
                }
                (None, None) => {}
            }
        }
        // Records the chat template or tokenizer could not handle: left out of training, each
        // named, rather than trained on a wrong label mask.
        let failed = self
            .preview
            .bundle
            .as_ref()
            .and_then(|(_, b)| b.prepared.tasks.get(i))
            .map(|t| t.failed.clone())
            .unwrap_or_default();
        if !failed.is_empty() {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!(
                    "{} records left out of training: the template or tokenizer cannot label them",
                    failed.len()
                ),
            );
            for (origin, why) in failed.iter().take(20) {
                let file = d
                    .sources
                    .get(origin.source as usize)
                    .map(|s| s.path.display().to_string())
                    .unwrap_or_default();
                ui.label(format!("{file} line {}: {why}", origin.line));
            }
            if failed.len() > 20 {
                ui.weak(format!("… and {} more", failed.len() - 20));
            }
        }
        if let Some((t, s)) = self.report_open {
            let report = self
                .data
                .get(t)
                .and_then(Option::as_ref)
                .and_then(|d| d.sources.get(s))
                .and_then(|s| s.report.clone());
            let mut open = true;
            if let Some(r) = report {
                egui::Window::new(format!("Rejected records of {}", r.file.display()))
                    .open(&mut open)
                    .default_size([640.0, 360.0])
                    .show(ui.ctx(), |ui| {
                        ui.label(format!(
                            "{} rejected{}",
                            r.rejected,
                            if (r.rejections.len() as u64) < r.rejected {
                                format!(" ({} listed)", r.rejections.len())
                            } else {
                                String::new()
                            }
                        ));
                        egui::ScrollArea::vertical().show(ui, |ui| {
                            egui::Grid::new("rejections").striped(true).show(ui, |ui| {
                                ui.strong("line");
                                ui.strong("reason");
                                ui.end_row();
                                for rej in &r.rejections {
                                    ui.label(rej.line.to_string());
                                    ui.label(&rej.reason);
                                    ui.end_row();
                                }
                            });
                        });
                    });
            }
            if !open {
                self.report_open = None;
            }
        }
    }

    fn record_browser(&mut self, ui: &mut egui::Ui) {
        let i = self.selected_task;
        let Some(d) = self.data.get(i).and_then(Option::as_ref).cloned() else {
            return;
        };
        let n = d.records.len();
        ui.horizontal(|ui| {
            ui.strong("Records");
            if n == 0 {
                ui.label("none");
                return;
            }
            self.record_index = self.record_index.min(n - 1);
            if ui.button("<").clicked() {
                self.record_index = self.record_index.saturating_sub(1);
            }
            let l = ui.label("record");
            let mut shown = self.record_index + 1;
            ui.add(egui::DragValue::new(&mut shown).range(1..=n))
                .labelled_by(l.id);
            self.record_index = shown - 1;
            ui.label(format!("of {n}"));
            if ui.button(">").clicked() {
                self.record_index = (self.record_index + 1).min(n - 1);
            }
        });
        let Some(record) = d.records.get(self.record_index) else {
            return;
        };
        let held_out = d.is_eval.get(self.record_index).copied().unwrap_or(false);
        ui.weak(format!(
            "line {}{}",
            record.origin.line,
            if held_out {
                " · held out for evaluation"
            } else {
                ""
            }
        ));
        // Sequential instructions: what this record becomes in training (or at evaluation),
        // once every task is loaded (chains take their second record from another task).
        let composed = self.chained_view(i, self.record_index);
        let task = &self.project.tasks[i];
        let shown = match &composed {
            Some(c) => {
                let name = task
                    .sit
                    .steps
                    .get(c.template)
                    .map_or("?", |t| t.name.as_str());
                ui.horizontal(|ui| {
                    ui.label(
                        RichText::new(format!(
                            "» chained instruction ({name}){}",
                            if held_out {
                                ": held out; evaluation asks held-out records as chains like this"
                            } else {
                                ": trained this way"
                            }
                        ))
                        .color(task_color(i)),
                    );
                    ui.checkbox(&mut self.show_original, "show the record as imported");
                });
                if self.show_original {
                    record
                } else {
                    &c.record
                }
            }
            None => record,
        };
        let color = task_color(i);
        for m in conversation(shown, &task.system_prompt, task.system_rule) {
            let role = m.role.as_str();
            let (fill, align) = match role {
                "system" => (color.gamma_multiply(0.25), egui::Align::Center),
                "user" => (ui.visuals().faint_bg_color, egui::Align::Min),
                _ => (color.gamma_multiply(0.45), egui::Align::Max),
            };
            ui.with_layout(egui::Layout::top_down(align), |ui| {
                egui::Frame::new()
                    .fill(fill)
                    .corner_radius(8.0)
                    .inner_margin(8.0)
                    .show(ui, |ui| {
                        ui.set_max_width(ui.available_width() * 0.8);
                        ui.with_layout(egui::Layout::top_down(egui::Align::Min), |ui| {
                            ui.label(RichText::new(role).small().color(Color32::GRAY));
                            let text: String = m.content.chars().take(4000).collect();
                            ui.label(text);
                        });
                    });
            });
        }
    }
}

/// A task's sequential-instruction settings: the share of records trained as chained
/// instructions and the editable step templates, each checked as it is typed.
fn sit_editor(ui: &mut egui::Ui, sit: &mut crate::core::sit::SitSettings) {
    let title = if sit.share > 0.0 {
        format!(
            "Sequential instructions ({:.0} % trained as chains)",
            sit.share * 100.0
        )
    } else if sit.steps.is_empty() {
        "Sequential instructions (off)".to_string()
    } else {
        "Sequential instructions (evaluation only)".to_string()
    };
    egui::CollapsingHeader::new(title)
        .id_salt("sit")
        .show(ui, |ui| {
            ui.weak(
                "A share of the task's records is trained as a chain of checkable steps; with \
                 templates, evaluation also asks the held-out records as chains and reports how \
                 many had every step done.",
            );
            ui.horizontal(|ui| {
                let l = ui.label("Chained share");
                ui.add_enabled(
                    !sit.steps.is_empty(),
                    egui::Slider::new(&mut sit.share, 0.0..=1.0),
                )
                .labelled_by(l.id);
                if sit.steps.is_empty() && ui.button("Add the standard step templates").clicked() {
                    sit.steps = crate::core::sit::default_templates();
                }
            });
            let mut remove = None;
            for (k, step) in sit.steps.iter_mut().enumerate() {
                ui.push_id(k, |ui| {
                    ui.group(|ui| {
                        ui.horizontal(|ui| {
                            let l = ui.label("Step template");
                            ui.add(egui::TextEdit::singleline(&mut step.name).desired_width(140.0))
                                .labelled_by(l.id);
                            if ui.button("Remove").clicked() {
                                remove = Some(k);
                            }
                        });
                        let l = ui.label("Instruction");
                        ui.add(
                            egui::TextEdit::multiline(&mut step.instruction)
                                .desired_rows(2)
                                .desired_width(f32::INFINITY),
                        )
                        .labelled_by(l.id);
                        let l = ui.label("Answer");
                        ui.add(
                            egui::TextEdit::multiline(&mut step.answer)
                                .desired_rows(2)
                                .desired_width(f32::INFINITY),
                        )
                        .labelled_by(l.id);
                        if let Err(why) = step.validate() {
                            ui.colored_label(ui.visuals().error_fg_color, why);
                        }
                    });
                });
            }
            if let Some(k) = remove {
                sit.steps.remove(k);
                if sit.steps.is_empty() {
                    sit.share = 0.0;
                }
            }
            if !sit.steps.is_empty() && ui.button("Add a step template").clicked() {
                sit.steps
                    .push(crate::core::sit::default_templates().remove(0));
            }
            ui.weak(format!(
                "Placeholders: {}. The answer's text and placeholders, in order, are what the \
                 step check looks for.",
                crate::core::sit::PLACEHOLDERS
                    .map(|p| format!("{{{p}}}"))
                    .join(", ")
            ));
        });
}

impl StudioApp {
    /// What record `index` of task `task` becomes as a chained instruction, cached for the
    /// record browser; `None` until every task is loaded.
    fn chained_view(&mut self, task: usize, index: usize) -> Option<crate::core::sit::Composed> {
        if !self.all_data_loaded() {
            return None;
        }
        let t = self.project.tasks.get(task)?;
        let key = serde_json::json!([
            task,
            index,
            self.project.seed,
            self.load_generation,
            self.project
                .tasks
                .iter()
                .map(|t| (&t.name, t.eval_fraction, &t.sit))
                .collect::<Vec<_>>()
        ])
        .to_string();
        if t.sit.steps.is_empty() {
            return None;
        }
        if let Some((k, c)) = &self.chained_cache
            && *k == key
        {
            return c.clone();
        }
        let loaded: Vec<Option<&crate::core::dataset::TaskData>> =
            self.data.iter().map(|d| d.as_deref()).collect();
        let c = crate::core::chains::compose_one(&self.project, &loaded, task, index);
        self.chained_cache = Some((key, c.clone()));
        c
    }
}

fn rule_text(rule: SystemRule) -> &'static str {
    match rule {
        SystemRule::Replace => "replace it with the task's prompt",
        SystemRule::Keep => "keep it (none if absent)",
        SystemRule::FillIfEmpty => "keep it, or use the task's prompt",
    }
}
