//! The Packing tab: packing settings, the statistics of one packed epoch, a row-length
//! histogram, and the pack browser — every token of a row as a chip coloured by task, trained
//! tokens bright and ignored ones dim, system prompts marked, segment and chunk boundaries drawn,
//! and the row's attention layout between segments.

use egui::text::{LayoutJob, TextFormat};
use egui::{Color32, RichText, Sense, Stroke};
use egui_plot::{Bar, BarChart, Plot};

use crate::core::packing::{AttentionLayout, Overlong, PackMode, SegmentKind};
use crate::core::views::{segment_attention, token_chips};
use crate::ui::app::{StudioApp, task_color};

const DEFAULT_PROMPT_COLOR: Color32 = Color32::from_rgb(150, 150, 150);

impl StudioApp {
    pub(crate) fn packing_tab(&mut self, ui: &mut egui::Ui) {
        self.packing_settings(ui);
        ui.separator();
        let Some(p) = self.preview.packing.clone() else {
            self.pending_note(ui);
            return;
        };
        if let Some(e) = &self.preview.error {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
        if let Some(note) = &self.preview.context_note {
            ui.colored_label(
                ui.visuals().warn_fg_color,
                format!("Shown as trained: {note}"),
            );
        }
        ui.horizontal_wrapped(|ui| {
            let stat = |ui: &mut egui::Ui, name: &str, value: String| {
                ui.label(format!("{name}:"));
                ui.strong(value);
                ui.add_space(10.0);
            };
            stat(ui, "mode", format!("{:?}", p.mode).to_lowercase());
            stat(ui, "rows", p.rows.to_string());
            stat(ui, "fill", format!("{:.1} %", p.fill * 100.0));
            stat(
                ui,
                "best-fit decreasing would fill",
                format!("{:.1} %", p.best_fit_fill * 100.0),
            );
            if p.mode == crate::core::packing::PackMode::Moi {
                stat(
                    ui,
                    "chunks mixing tasks",
                    format!(
                        "{} of {} ({:.0} % of the {} sizes allow)",
                        p.chunks.mixed,
                        p.chunks.chunks,
                        p.chunks.share_of_mixable() * 100.0,
                        p.chunks.chunks - p.chunks.unmixable
                    ),
                );
            }
            stat(ui, "padding", format!("{:.1} %", p.padding * 100.0));
            stat(
                ui,
                "trained tokens",
                format!("{:.1} %", p.trained_tokens * 100.0),
            );
            stat(ui, "truncated", p.overlong.truncated.to_string());
            stat(ui, "split", p.overlong.split.to_string());
            stat(ui, "dropped", p.overlong.dropped.to_string());
            if self.preview.job.is_some() {
                ui.spinner();
            } else {
                ui.weak(format!("computed in {} ms", self.preview.took.as_millis()));
            }
        });
        ui.columns(2, |cols| {
            cols[0].strong("Row lengths");
            let bucket = p.max_seq_len as f64 / 16.0;
            Plot::new("row_lengths")
                .height(130.0)
                .allow_drag(false)
                .allow_zoom(false)
                .allow_scroll(false)
                .x_axis_label("tokens")
                .show(&mut cols[0], |plot| {
                    let bars = p
                        .histogram
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| {
                            Bar::new((i as f64 + 0.5) * bucket, n as f64)
                                .width(bucket * 0.9)
                                .name(format!(
                                    "{}–{} tokens",
                                    (i as f64 * bucket) as usize,
                                    ((i + 1) as f64 * bucket) as usize
                                ))
                        })
                        .collect();
                    plot.bar_chart(
                        BarChart::new("rows", bars).color(Color32::from_rgb(86, 156, 214)),
                    );
                });
            cols[1].strong("Tasks in the packed rows");
            egui::Grid::new("packed_shares")
                .striped(true)
                .show(&mut cols[1], |ui| {
                    ui.strong("task");
                    ui.strong("instructions");
                    ui.strong("sample share");
                    ui.strong("token share");
                    ui.end_row();
                    for (i, t) in p.tasks.iter().enumerate() {
                        ui.colored_label(task_color(i), &t.task);
                        ui.label(t.samples.to_string());
                        ui.label(format!("{:.1} %", t.sample_share * 100.0));
                        ui.label(format!("{:.1} %", t.token_share * 100.0));
                        ui.end_row();
                    }
                });
        });
        ui.separator();
        self.pack_browser(ui);
    }

    fn packing_settings(&mut self, ui: &mut egui::Ui) {
        let too_long = self.row_length_refusal();
        let context = self.chosen_model_context();
        let pack = &mut self.project.packing;
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Mode");
            egui::ComboBox::from_id_salt("mode")
                .selected_text(format!("{:?}", pack.mode).to_lowercase())
                .show_ui(ui, |ui| {
                    for m in [
                        PackMode::Seq,
                        PackMode::Concat,
                        PackMode::Balanced,
                        PackMode::Moi,
                    ] {
                        ui.selectable_value(&mut pack.mode, m, format!("{m:?}").to_lowercase());
                    }
                })
                .response
                .labelled_by(l.id);
            let l = ui.label("Max sequence length");
            ui.add(
                egui::DragValue::new(&mut pack.max_seq_len)
                    .range(32..=32768)
                    .speed(16),
            )
            .labelled_by(l.id);
            // Kept as typed and refused here (Start stays off), with the way out offered.
            if let (Some(why), Some(context)) = (&too_long, context) {
                ui.colored_label(ui.visuals().error_fg_color, why);
                if ui.button(format!("Use {context}")).clicked() {
                    pack.max_seq_len = context;
                }
            }
            let l = ui.label("Chunk size");
            ui.add(egui::DragValue::new(&mut pack.chunk_size).range(0..=64))
                .on_hover_text("Instructions per MoI chunk; 0 = one per task")
                .labelled_by(l.id);
            ui.checkbox(
                &mut pack.first_under_default,
                "First instruction under the default prompt",
            );
        });
        ui.horizontal_wrapped(|ui| {
            let l = ui.label("Attention");
            egui::ComboBox::from_id_salt("attention")
                .selected_text(format!("{:?}", pack.attention).to_lowercase())
                .show_ui(ui, |ui| {
                    for a in [
                        AttentionLayout::Full,
                        AttentionLayout::Isolated,
                        AttentionLayout::Chunk,
                    ] {
                        ui.selectable_value(
                            &mut pack.attention,
                            a,
                            format!("{a:?}").to_lowercase(),
                        );
                    }
                })
                .response
                .labelled_by(l.id);
            ui.checkbox(&mut pack.reset_position_ids, "Reset position ids")
                .on_hover_text(
                    "Positions restart at each instruction (each chunk with chunk attention), \
                     after the default prompt. With full attention a token then also sees \
                     earlier instructions whose positions run past its own.",
                );
            let l = ui.label("Over-long samples");
            egui::ComboBox::from_id_salt("overlong")
                .selected_text(format!("{:?}", pack.overlong).to_lowercase())
                .show_ui(ui, |ui| {
                    for o in [Overlong::Truncate, Overlong::Split, Overlong::Drop] {
                        ui.selectable_value(&mut pack.overlong, o, format!("{o:?}").to_lowercase());
                    }
                })
                .response
                .labelled_by(l.id);
        });
    }

    fn pack_browser(&mut self, ui: &mut egui::Ui) {
        let (Some(plan), Some((_, bundle))) =
            (self.preview.plan.clone(), self.preview.bundle.clone())
        else {
            return;
        };
        let rows = plan.rows.len();
        if rows == 0 {
            ui.label("No rows.");
            return;
        }
        ui.horizontal(|ui| {
            ui.strong("Pack browser");
            if ui.button("<").clicked() {
                self.preview.row = self.preview.row.saturating_sub(1);
            }
            let l = ui.label("row");
            let mut shown = self.preview.row + 1;
            ui.add(egui::DragValue::new(&mut shown).range(1..=rows))
                .labelled_by(l.id);
            self.preview.row = shown.clamp(1, rows) - 1;
            ui.label(format!("of {rows}"));
            if ui.button(">").clicked() {
                self.preview.row = (self.preview.row + 1).min(rows - 1);
            }
        });
        let key = self.preview.done_key.clone();
        let row_index = self.preview.row;
        let fresh =
            !matches!(&self.preview.chips, Some((k, r, _, _)) if *k == key && *r == row_index);
        if fresh {
            let row = bundle.prepared.row(&plan, row_index, &self.preview.pack);
            let chips = token_chips(&row, &bundle.tokenizer);
            self.preview.chips = Some((key, row_index, chips, row));
        }
        let Some((_, _, chips, row)) = &self.preview.chips else {
            return;
        };
        // Legend.
        ui.horizontal_wrapped(|ui| {
            for (i, t) in bundle.prepared.tasks.iter().enumerate() {
                ui.label(RichText::new(format!(" {} ", t.name)).background_color(task_color(i)).color(Color32::BLACK));
            }
            ui.label(RichText::new(" default prompt ").background_color(DEFAULT_PROMPT_COLOR).color(Color32::BLACK));
            ui.weak("bright = trained · dim = ignored · underlined = system prompt · thin white bar: segment · thick bar: new chunk · » chained instruction");
        });
        ui.columns(2, |cols| {
            // The attention layout between the row's segments.
            let ui = &mut cols[1];
            ui.strong("Attention between segments");
            ui.weak("row: query segment, column: key segment");
            let matrix = segment_attention(row);
            let n = matrix.len().min(48);
            let cell = (160.0 / n.max(1) as f32).clamp(3.0, 14.0);
            let (rect, _) = ui
                .allocate_exact_size(egui::vec2(cell * n as f32, cell * n as f32), Sense::hover());
            let painter = ui.painter_at(rect);
            let seg_color = |s: usize| match (row.segments[s].kind, row.segments[s].task) {
                (SegmentKind::DefaultPrompt, _) | (_, None) => DEFAULT_PROMPT_COLOR,
                (_, Some(t)) => task_color(t as usize),
            };
            for (q, line) in matrix.iter().enumerate().take(n) {
                for (k, &allowed) in line.iter().enumerate().take(n) {
                    let r = egui::Rect::from_min_size(
                        rect.min + egui::vec2(k as f32 * cell, q as f32 * cell),
                        egui::vec2(cell - 1.0, cell - 1.0),
                    );
                    let fill = if allowed {
                        seg_color(q)
                    } else {
                        Color32::from_gray(40)
                    };
                    painter.rect_filled(r, 1.0, fill);
                }
            }
            ui.label(format!(
                "{} segments{} · positions {}",
                matrix.len(),
                if matrix.len() > n {
                    format!(" (first {n} shown)")
                } else {
                    String::new()
                },
                if self.preview.pack.reset_position_ids {
                    "restart per segment"
                } else {
                    "continue"
                }
            ));
            // The tokens.
            let ui = &mut cols[0];
            egui::ScrollArea::vertical()
                .id_salt("chips")
                .max_height(420.0)
                .show(ui, |ui| {
                    // One galley for the whole row (a widget per token is too slow for
                    // 2,048-token rows); hovering finds the token under the pointer.
                    let width = ui.available_width();
                    // Segments trained as chained instructions (SIT) are marked with ».
                    let chained_template = |segment: usize| -> Option<u32> {
                        let seg = row.segments.get(segment)?;
                        let task = bundle.prepared.tasks.get(seg.task? as usize)?;
                        task.composed.get(seg.record? as usize).copied().flatten()
                    };
                    let (job, starts) =
                        chip_layout(chips, width, &|seg| chained_template(seg).is_some());
                    let galley = ui.painter().layout_job(job);
                    let (rect, response) = ui.allocate_exact_size(galley.size(), Sense::hover());
                    ui.painter()
                        .galley(rect.min, galley.clone(), Color32::WHITE);
                    if let Some(pos) = response.hover_pos() {
                        let index = galley.cursor_from_pos(pos - rect.min).index.0;
                        let n = starts.partition_point(|&s| s <= index).saturating_sub(1);
                        if let Some(c) = chips.get(n) {
                            response.on_hover_ui_at_pointer(|ui| {
                                ui.label(format!("token {:?}", c.text));
                                ui.label(format!("token id {}", c.id));
                                ui.label(format!("position id {}", c.position));
                                ui.label(if c.trained {
                                    format!("label {}", c.label)
                                } else {
                                    "label -100 (ignored)".to_string()
                                });
                                ui.label(format!(
                                    "segment {} (attention id {})",
                                    c.segment, c.segment_id
                                ));
                                if let Some(t) = c.task {
                                    ui.label(format!(
                                        "task {}",
                                        bundle.prepared.tasks[t as usize].name
                                    ));
                                }
                                if c.system {
                                    ui.label("system prompt");
                                }
                                if let Some(k) = chained_template(c.segment) {
                                    let name = c
                                        .task
                                        .and_then(|t| self.project.tasks.get(t as usize))
                                        .and_then(|t| t.sit.steps.get(k as usize))
                                        .map_or_else(|| format!("{}", k + 1), |s| s.name.clone());
                                    ui.label(format!("chained instruction (step template {name})"));
                                }
                            });
                        }
                    }
                });
        });
    }
}

/// The row as one text layout: each token a section with its colours, boundaries as coloured
/// gaps. Returns the layout and the character offset where each chip starts.
fn chip_layout(
    chips: &[crate::core::views::TokenChip],
    width: f32,
    chained: &dyn Fn(usize) -> bool,
) -> (LayoutJob, Vec<usize>) {
    let font = egui::FontId::monospace(12.0);
    let mut job = LayoutJob::default();
    job.wrap.max_width = width;
    let mut starts = Vec::with_capacity(chips.len());
    let mut chars = 0usize;
    for (n, c) in chips.iter().enumerate() {
        let base = c
            .task
            .map_or(DEFAULT_PROMPT_COLOR, |t| task_color(t as usize));
        if c.starts_segment {
            // A boundary: a white gap between segments, a wider one in the task's colour where
            // a new chunk starts.
            let (gap, color) = match (c.starts_chunk, chained(c.segment)) {
                (true, false) => ("  ", base),
                (true, true) => (" » ", base),
                (false, false) => (" ", Color32::WHITE),
                (false, true) => ("»", Color32::WHITE),
            };
            job.append(
                gap,
                2.0,
                TextFormat {
                    font_id: font.clone(),
                    background: color,
                    ..Default::default()
                },
            );
            chars += gap.chars().count();
        }
        // Neighbouring tokens alternate slightly in shade so their edges show.
        let shade = if n % 2 == 0 { 1.0 } else { 0.8 };
        let (background, color) = if c.trained {
            (base.gamma_multiply(shade), Color32::BLACK)
        } else {
            (base.gamma_multiply(0.22 * shade), Color32::from_gray(190))
        };
        starts.push(chars);
        job.append(
            &c.text,
            0.0,
            TextFormat {
                font_id: font.clone(),
                color,
                background,
                underline: if c.system {
                    Stroke::new(1.0, Color32::WHITE)
                } else {
                    Stroke::NONE
                },
                ..Default::default()
            },
        );
        chars += c.text.chars().count();
    }
    (job, starts)
}
