//! The Mixture tab: the sampling strategy and, per task, the share of samples and of tokens an
//! epoch gets — natural proportions against the chosen strategy.

use egui_plot::{Bar, BarChart, Legend, Plot};

use crate::core::settings::StrategyKind;
use crate::ui::app::{StudioApp, task_color};

impl StudioApp {
    pub(crate) fn mixture_tab(&mut self, ui: &mut egui::Ui) {
        let mix = &mut self.project.mixing;
        ui.horizontal(|ui| {
            let l = ui.label("Strategy");
            egui::ComboBox::from_id_salt("strategy")
                .selected_text(format!("{:?}", mix.strategy).to_lowercase())
                .show_ui(ui, |ui| {
                    for s in [
                        StrategyKind::Natural,
                        StrategyKind::Balanced,
                        StrategyKind::Temperature,
                        StrategyKind::Weights,
                    ] {
                        ui.selectable_value(&mut mix.strategy, s, format!("{s:?}").to_lowercase());
                    }
                })
                .response
                .labelled_by(l.id);
            if mix.strategy == StrategyKind::Temperature {
                let l = ui.label("T");
                ui.add(egui::Slider::new(&mut mix.temperature, 1.0..=10.0))
                    .labelled_by(l.id);
            }
            let l = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut self.project.seed))
                .labelled_by(l.id);
            let l = ui.label("Epochs");
            ui.add(egui::DragValue::new(&mut mix.epochs).range(1..=100))
                .labelled_by(l.id);
        });
        if mix.strategy == StrategyKind::Weights {
            ui.horizontal_wrapped(|ui| {
                for task in &mut self.project.tasks {
                    let l = ui.label(&task.name);
                    ui.add(
                        egui::DragValue::new(&mut task.weight)
                            .speed(0.05)
                            .range(0.0..=100.0),
                    )
                    .labelled_by(l.id);
                }
            });
        }
        if self.project.packing.mode != crate::core::packing::PackMode::Moi
            && self.project.packing.mode != crate::core::packing::PackMode::Balanced
        {
            ui.weak(format!(
                "Packing mode {:?} samples naturally; the strategy applies in balanced and moi modes.",
                self.project.packing.mode
            ));
        }
        ui.separator();
        let Some(m) = &self.preview.mixture else {
            self.pending_note(ui);
            return;
        };
        let names: Vec<String> = m.rows.iter().map(|r| r.task.clone()).collect();
        ui.columns(2, |cols| {
            for (col, title, natural, chosen) in [
                (
                    0,
                    "Sample share",
                    m.rows
                        .iter()
                        .map(|r| r.natural_sample_share)
                        .collect::<Vec<_>>(),
                    m.rows.iter().map(|r| r.sample_share).collect::<Vec<_>>(),
                ),
                (
                    1,
                    "Token share",
                    m.rows.iter().map(|r| r.natural_token_share).collect(),
                    m.rows.iter().map(|r| r.token_share).collect(),
                ),
            ] {
                let ui = &mut cols[col];
                ui.strong(title);
                let names = names.clone();
                Plot::new(title)
                    .height(220.0)
                    .legend(Legend::default())
                    .allow_drag(false)
                    .allow_zoom(false)
                    .allow_scroll(false)
                    .include_y(0.0)
                    .include_y(1.0)
                    .x_axis_formatter(move |mark, _| {
                        let i = mark.value.round();
                        if (mark.value - i).abs() < 1e-6 && i >= 0.0 {
                            names.get(i as usize).cloned().unwrap_or_default()
                        } else {
                            String::new()
                        }
                    })
                    .show(ui, |plot| {
                        let bars = |values: &[f64], offset: f64, dim: bool| {
                            values
                                .iter()
                                .enumerate()
                                .map(|(i, &v)| {
                                    let c = task_color(i);
                                    Bar::new(i as f64 + offset, v)
                                        .width(0.35)
                                        .fill(if dim { c.gamma_multiply(0.35) } else { c })
                                        .name(format!(
                                            "{} {:.1} %",
                                            names_or(&m.rows[i].task),
                                            v * 100.0
                                        ))
                                })
                                .collect::<Vec<_>>()
                        };
                        plot.bar_chart(BarChart::new("natural", bars(&natural, -0.2, true)));
                        plot.bar_chart(BarChart::new("chosen", bars(&chosen, 0.2, false)));
                    });
            }
        });
        ui.weak("Dim bars: natural proportions; bright bars: the chosen strategy.");
        egui::Grid::new("mixture_table")
            .striped(true)
            .show(ui, |ui| {
                for h in [
                    "task",
                    "records",
                    "tokens",
                    "samples / epoch (natural -> chosen)",
                    "sample share",
                    "token share",
                ] {
                    ui.strong(h);
                }
                ui.end_row();
                for (i, r) in m.rows.iter().enumerate() {
                    ui.colored_label(task_color(i), &r.task);
                    ui.label(r.records.to_string());
                    ui.label(r.tokens.to_string());
                    ui.label(format!("{} -> {}", r.natural_samples, r.samples));
                    ui.label(format!(
                        "{:.1} % -> {:.1} %",
                        r.natural_sample_share * 100.0,
                        r.sample_share * 100.0
                    ));
                    ui.label(format!(
                        "{:.1} % -> {:.1} %",
                        r.natural_token_share * 100.0,
                        r.token_share * 100.0
                    ));
                    ui.end_row();
                }
            });
    }

    /// What the previews are waiting for.
    pub(crate) fn pending_note(&self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            if let Some(e) = &self.preview.error {
                ui.colored_label(ui.visuals().error_fg_color, e);
            } else if self.project.tasks.is_empty() {
                ui.label("No tasks yet.");
            } else {
                ui.spinner();
                ui.label(if self.is_loading() {
                    "reading the data…"
                } else {
                    "tokenizing and packing…"
                });
            }
        });
    }
}

fn names_or(name: &str) -> &str {
    if name.is_empty() { "task" } else { name }
}
