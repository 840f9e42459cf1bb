//! The ablation's reports on disk: `results.md`, `results.csv` and `figure.png` — one panel per
//! task, its default-prompt score against tokens trained on, one line per variant (the
//! task-prompt score dashed beside it), drawn with plotters and the font egui ships.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::core::ablation::{AblationPlan, AblationResults, Metric};
use crate::core::events::PromptKind;
use crate::core::fsutil::write_atomic;

/// One colour per line, the same order the studio uses for variants.
pub const VARIANT_COLOURS: [(u8, u8, u8); 8] = [
    (120, 120, 120),
    (230, 159, 0),
    (86, 180, 233),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (0, 114, 178),
    (240, 228, 66),
];

/// Writes `results.md`, `results.csv` and `figure.png` into `out`; returns their paths.
pub fn write_reports(
    out: &Path,
    plan: &AblationPlan,
    results: &AblationResults,
) -> anyhow::Result<Vec<PathBuf>> {
    let md = out.join("results.md");
    write_atomic(&md, results.markdown(plan).as_bytes())?;
    let csv = out.join("results.csv");
    write_atomic(&csv, results.csv().as_bytes())?;
    let png = out.join("figure.png");
    draw_figure(&png, results)?;
    Ok(vec![md, csv, png])
}

/// The metric a task's panel plots: exact match where any run has it, else eval loss.
pub fn metric_for(results: &AblationResults, task: &str) -> Metric {
    let has_em = results
        .runs
        .values()
        .flat_map(|r| r.evals.iter())
        .any(|e| e.metrics.task == task && e.metrics.exact_match.is_some());
    if has_em {
        Metric::ExactMatch
    } else {
        Metric::Loss
    }
}

fn font() {
    // The bytes are part of the binary; registering twice is harmless.
    let _ = register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    );
}

/// Draws the figure into `path` (PNG), written beside and renamed into place.
pub fn draw_figure(path: &Path, results: &AblationResults) -> anyhow::Result<()> {
    font();
    // One row per task: its exact match (where it has a check) and its eval loss.
    let panels_wanted: Vec<(String, Metric)> = results
        .tasks
        .iter()
        .flat_map(|t| {
            let mut v = Vec::new();
            if metric_for(results, t) == Metric::ExactMatch {
                v.push((t.clone(), Metric::ExactMatch));
            }
            v.push((t.clone(), Metric::Loss));
            v
        })
        .collect();
    let cols = 2usize;
    let rows = panels_wanted.len().div_ceil(cols).max(1);
    let (w, h) = (720 * cols as u32, 380 * rows as u32 + 40);
    // The encoder picks the format by extension, so the file beside keeps `.png`.
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let (title, body) = root.split_vertically(40);
        title.draw(&Text::new(
            "Held-out scores under the default prompt by tokens trained (thin dashed: the \
             task's own prompt); mean over seeds",
            (12, 10),
            ("sans-serif", 22).into_font(),
        ))?;
        let panels = body.split_evenly((rows, cols));
        for ((task, metric), panel) in panels_wanted.iter().zip(panels.iter()) {
            let (task, metric) = (task.as_str(), *metric);
            let default = results.curves(task, PromptKind::Default, metric);
            let own = results.curves(task, PromptKind::Task, metric);
            let all = default.iter().chain(&own).flat_map(|(_, p)| p.iter());
            let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
            let (mut y_min, mut y_max) = match metric {
                Metric::Loss => (f64::MAX, f64::MIN),
                _ => (0.0, 1.0),
            };
            if metric == Metric::Loss {
                for p in all {
                    y_min = y_min.min(p.1);
                    y_max = y_max.max(p.1);
                }
                if y_min > y_max {
                    (y_min, y_max) = (0.0, 1.0);
                }
                let pad = ((y_max - y_min) * 0.1).max(1e-3);
                (y_min, y_max) = ((y_min - pad).max(0.0), y_max + pad);
            }
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{task} ({})", metric.label()), ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .build_cartesian_2d(0f64..x_max * 1.02, y_min..y_max)?;
            chart
                .configure_mesh()
                .x_desc("tokens trained")
                .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
                .y_label_formatter(&|y| match metric {
                    Metric::Loss => format!("{y:.2}"),
                    _ => format!("{:.0}%", y * 100.0),
                })
                .label_style(("sans-serif", 14))
                .draw()?;
            for (i, (label, points)) in default.iter().enumerate() {
                let (r, g, b) = VARIANT_COLOURS[i % VARIANT_COLOURS.len()];
                let colour = RGBColor(r, g, b);
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        colour.stroke_width(3),
                    ))?
                    .label(label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
                if let Some((_, task_points)) = own.iter().find(|(l, _)| l == label) {
                    chart.draw_series(DashedLineSeries::new(
                        task_points.iter().copied(),
                        6,
                        4,
                        colour.stroke_width(1),
                    ))?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 14))
                .position(match metric {
                    Metric::Loss => SeriesLabelPosition::UpperRight,
                    _ => SeriesLabelPosition::LowerRight,
                })
                .draw()?;
        }
        root.present()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ablation::{RunKey, RunRecord, Variant};
    use crate::core::events::{EvalMetrics, StepMetrics, TrainEvent};
    use crate::core::settings::AttentionLayout;

    #[test]
    fn the_figure_is_a_png_with_a_line_per_variant() {
        let mut results = AblationResults::default();
        for (i, variant) in [Variant::Concat, Variant::Moi].into_iter().enumerate() {
            let mut r = RunRecord::default();
            let mut at = std::collections::BTreeMap::new();
            for step in 1..=3u64 {
                r.absorb(
                    &TrainEvent::Step(StepMetrics {
                        step,
                        tokens_seen: step * 1000,
                        steps: 1,
                        ..StepMetrics::default()
                    }),
                    &mut at,
                );
                for (task, em) in [
                    ("math", Some(0.2 * step as f64 + 0.1 * i as f64)),
                    ("chat", None),
                ] {
                    for prompt in [PromptKind::Default, PromptKind::Task] {
                        r.absorb(
                            &TrainEvent::Eval(EvalMetrics {
                                step,
                                task: task.into(),
                                prompt,
                                loss: 2.0 / step as f64,
                                perplexity: 1.0,
                                accuracy: 0.5,
                                exact_match: em,
                                items: 4,
                                generated: 4,
                                tokens: 10,
                                sample: None,
                                steps_done: None,
                                steps_tried: 0,
                            }),
                            &mut at,
                        );
                    }
                }
            }
            results.insert(
                RunKey {
                    variant,
                    attention: AttentionLayout::Chunk,
                    seed: 1,
                },
                r,
            );
        }
        assert_eq!(metric_for(&results, "math"), Metric::ExactMatch);
        assert_eq!(metric_for(&results, "chat"), Metric::Loss);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("figure.png");
        draw_figure(&path, &results).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        assert!(!dir.path().join("figure.tmp.png").exists());
    }
}
