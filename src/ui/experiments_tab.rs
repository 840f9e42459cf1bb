//! The Experiments tab: the paper's ablation on the open project, launched on the `ablation`
//! thread, its variants' curves overlaid live (default prompt solid, task prompt dashed, one
//! colour per variant), the results table once done, and past ablations reloaded from their
//! folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::Receiver;
use egui_plot::{Legend, Line, LineStyle, Plot, PlotPoints};

use crate::core::ablation::{AblationPlan, AblationResults, Metric, RunKey, RunRecord, Variant};
use crate::core::events::{PromptKind, TrainEvent};
use crate::core::settings::AttentionLayout;
use crate::train::ablate::{AblationProgress, load_ablation, run_ablation_in};
use crate::ui::app::StudioApp;

/// What the ablation thread tells the tab.
pub enum AblationMsg {
    /// Progress of the running ablation.
    Progress(AblationProgress),
    /// The ablation ended: all runs finished (`true`) or stopped.
    Done(Result<bool, String>),
    /// A past ablation was read.
    Loaded(PathBuf, Result<(AblationPlan, AblationResults), String>),
}

/// The tab's state.
pub struct ExperimentsState {
    /// Variants ticked, in [`Variant::ALL`] order.
    pub variants: [bool; Variant::ALL.len()],
    /// Attention layouts ticked: full, isolated, chunk.
    pub attentions: [bool; 3],
    /// Token budget per run.
    pub tokens: u64,
    /// Seeds, as typed.
    pub seeds: String,
    /// Evaluations per run.
    pub evals: u32,
    /// The running or shown ablation's folder.
    pub folder: Option<PathBuf>,
    /// Its plan.
    pub plan: Option<AblationPlan>,
    /// Its results so far.
    pub results: AblationResults,
    /// Steps → tokens of the run being absorbed.
    tokens_at: BTreeMap<u64, u64>,
    /// The current run: index, total, key, tokens so far.
    pub current: Option<(usize, usize, RunKey, u64)>,
    /// Whether the shown ablation finished every run.
    pub complete: bool,
    /// The task whose curves are shown.
    pub task: usize,
    /// Show eval loss rather than exact match.
    pub show_loss: bool,
    /// Messages from the worker.
    rx: Option<Receiver<AblationMsg>>,
    /// Set to stop the running ablation (after a checkpoint).
    stop: Option<Arc<AtomicBool>>,
    /// Past ablations found in the project's folder.
    pub past: Vec<PathBuf>,
    /// Whether `past` was listed for the open project.
    pub listed: bool,
    /// The last error.
    pub error: Option<String>,
}

impl Default for ExperimentsState {
    fn default() -> Self {
        Self {
            variants: [true, true, true, true, false, false, false, false],
            attentions: [false, false, true],
            tokens: 200_000,
            seeds: "1".to_string(),
            evals: 4,
            folder: None,
            plan: None,
            results: AblationResults::default(),
            tokens_at: BTreeMap::new(),
            current: None,
            complete: false,
            task: 0,
            show_loss: false,
            rx: None,
            stop: None,
            past: Vec::new(),
            listed: false,
            error: None,
        }
    }
}

const ATTENTIONS: [AttentionLayout; 3] = [
    AttentionLayout::Full,
    AttentionLayout::Isolated,
    AttentionLayout::Chunk,
];

/// The folder a project's ablations go in.
pub fn ablations_dir(project: &crate::core::project::Project) -> PathBuf {
    project.runs_dir().join("ablations")
}

/// Ablation folders in `dir`, newest first.
pub fn list_ablations(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("ablation.json").is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.reverse();
    out
}

impl ExperimentsState {
    /// Whether an ablation is running.
    pub fn is_running(&self) -> bool {
        self.stop.is_some()
    }

    /// The plan the controls describe.
    pub fn plan_from_controls(&self) -> Result<AblationPlan, String> {
        let variants: Vec<Variant> = Variant::ALL
            .into_iter()
            .zip(self.variants)
            .filter_map(|(v, on)| on.then_some(v))
            .collect();
        let attentions: Vec<AttentionLayout> = ATTENTIONS
            .into_iter()
            .zip(self.attentions)
            .filter_map(|(a, on)| on.then_some(a))
            .collect();
        let seeds = self
            .seeds
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("seeds: '{}' is not a whole number", s.trim()))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        let plan = AblationPlan {
            variants,
            attentions,
            tokens: self.tokens,
            seeds,
            evals: self.evals,
            model: "tiny".to_string(),
        };
        plan.validate()?;
        Ok(plan)
    }

    fn absorb(&mut self, msg: AblationMsg) {
        match msg {
            AblationMsg::Progress(AblationProgress::RunStarted {
                index, total, key, ..
            }) => {
                self.current = Some((index, total, key, 0));
                self.tokens_at.clear();
                // A resumed run's earlier events are on disk.
                let record = self
                    .folder
                    .as_ref()
                    .and_then(|f| RunRecord::load(&f.join("runs").join(key.dir_name())).ok())
                    .unwrap_or_default();
                self.results.insert(key, record);
            }
            AblationMsg::Progress(AblationProgress::RunSkipped { key, .. }) => {
                if let Some(record) = self
                    .folder
                    .as_ref()
                    .and_then(|f| RunRecord::load(&f.join("runs").join(key.dir_name())).ok())
                {
                    self.results.insert(key, record);
                }
            }
            AblationMsg::Progress(AblationProgress::Event { key, event, .. }) => {
                if let TrainEvent::Step(m) = &event
                    && let Some(c) = &mut self.current
                {
                    c.3 = m.tokens_seen;
                }
                let new_task = match &event {
                    TrainEvent::Eval(e) if !self.results.tasks.contains(&e.task) => {
                        Some(e.task.clone())
                    }
                    _ => None,
                };
                if let Some(t) = new_task {
                    self.results.tasks.push(t);
                }
                let record = self.results.runs.entry(key).or_default();
                record.absorb(&event, &mut self.tokens_at);
            }
            AblationMsg::Done(r) => {
                self.stop = None;
                self.rx = None;
                self.current = None;
                self.listed = false;
                match r {
                    Ok(done) => self.complete = done,
                    Err(e) => self.error = Some(e),
                }
            }
            AblationMsg::Loaded(dir, r) => {
                self.rx = None;
                match r {
                    Ok((plan, results)) => {
                        self.complete = plan
                            .runs()
                            .iter()
                            .all(|k| results.runs.get(k).is_some_and(|r| r.finished));
                        self.folder = Some(dir);
                        self.plan = Some(plan);
                        self.results = results;
                        self.error = None;
                    }
                    Err(e) => self.error = Some(e),
                }
            }
        }
    }
}

impl StudioApp {
    /// Takes in the ablation thread's messages.
    pub(crate) fn drain_experiments(&mut self) {
        let Some(rx) = &self.experiments.rx else {
            return;
        };
        let msgs: Vec<AblationMsg> = rx.try_iter().take(512).collect();
        for m in msgs {
            self.experiments.absorb(m);
        }
    }

    fn start_ablation(&mut self) {
        match self.experiments.plan_from_controls() {
            Ok(plan) => {
                let folder = ablations_dir(&self.project)
                    .join(jiff::Zoned::now().strftime("%Y%m%d-%H%M%S").to_string());
                self.launch_ablation(plan, folder);
            }
            Err(e) => self.experiments.error = Some(e),
        }
    }

    /// Continues an unfinished ablation in `dir` with its own plan (finished runs are reused,
    /// the interrupted one resumes from its checkpoint).
    fn resume_ablation(&mut self, dir: PathBuf) {
        let plan = std::fs::read_to_string(dir.join("ablation.json"))
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<AblationPlan>(&t).map_err(|e| e.to_string()));
        match plan {
            Ok(plan) => self.launch_ablation(plan, dir),
            Err(e) => {
                self.experiments.error =
                    Some(format!("{e} ({})", dir.join("ablation.json").display()))
            }
        }
    }

    fn launch_ablation(&mut self, plan: AblationPlan, folder: PathBuf) {
        if self.is_training() {
            self.experiments.error = Some("stop the training run first".into());
            return;
        }
        let (tx, rx) = crossbeam_channel::bounded(256);
        let stop = Arc::new(AtomicBool::new(false));
        let project = self.project.clone();
        // Each run in its own trainer process, as the Train tab's runs are.
        let trainer = self.trainer_process.clone();
        let wake =
            crate::core::events::rate_limited(self.wake.clone(), crate::ui::events::LIVE_WAKE_GAP);
        let (thread_plan, thread_folder, thread_stop) =
            (plan.clone(), folder.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("ablation".to_string())
            .spawn(move || {
                let result = run_ablation_in(
                    &project,
                    &thread_plan,
                    &thread_folder,
                    &thread_stop,
                    trainer.as_ref(),
                    &mut |p| {
                        let _ = tx.send(AblationMsg::Progress(p));
                        wake();
                    },
                )
                .and_then(|done| {
                    if done {
                        let (plan, results) = load_ablation(&thread_folder)?;
                        crate::core::figure::write_reports(&thread_folder, &plan, &results)?;
                    }
                    Ok(done)
                })
                .map_err(|e| format!("{e:#}"));
                let _ = tx.send(AblationMsg::Done(result));
                wake();
            });
        match spawned {
            Ok(_) => {
                let e = &mut self.experiments;
                e.rx = Some(rx);
                e.stop = Some(stop);
                e.folder = Some(folder);
                e.plan = Some(plan);
                e.results = AblationResults::default();
                e.complete = false;
                e.error = None;
            }
            Err(e) => self.experiments.error = Some(format!("cannot start the ablation: {e}")),
        }
    }

    fn load_past(&mut self, dir: PathBuf) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let wake = self.wake.clone();
        let spawned = std::thread::Builder::new()
            .name("ablation-load".to_string())
            .spawn(move || {
                let r = load_ablation(&dir).map_err(|e| format!("{e:#}"));
                let _ = tx.send(AblationMsg::Loaded(dir, r));
                wake();
            });
        if spawned.is_ok() {
            self.experiments.rx = Some(rx);
        }
    }

    pub(crate) fn experiments_tab(&mut self, ui: &mut egui::Ui) {
        if !self.experiments.listed {
            self.experiments.past = list_ablations(&ablations_dir(&self.project));
            self.experiments.listed = true;
        }
        egui::ScrollArea::vertical()
            .id_salt("experiments")
            .show(ui, |ui| {
                ui.label(
                    "The paper's ablation on this project: every variant from the same initial \
                     weights, on the same token budget, scored on each task's held-out records \
                     under the default prompt and under the task's own.",
                );
                let running = self.experiments.is_running();
                ui.add_enabled_ui(!running, |ui| self.ablation_controls(ui));
                ui.horizontal(|ui| {
                    if running {
                        if ui.button("Stop (resumable)").clicked()
                            && let Some(stop) = &self.experiments.stop
                        {
                            stop.store(true, Ordering::SeqCst);
                        }
                    } else if ui.button("Run ablation").clicked() {
                        self.start_ablation();
                    }
                    // Runs too big for this machine go to a real distributed trainer.
                    crate::ui::runs_tab::recipe_button(self, ui);
                    if let Some((i, n, key, tokens)) = &self.experiments.current {
                        let budget = self.experiments.plan.as_ref().map_or(1, |p| p.tokens);
                        ui.add(
                            egui::ProgressBar::new(*tokens as f32 / budget.max(1) as f32)
                                .desired_width(220.0)
                                .text(format!(
                                    "run {}/{n} {}: {tokens} tokens",
                                    i + 1,
                                    key.dir_name()
                                )),
                        );
                    }
                });
                if let Some(err) = &self.experiments.error {
                    ui.colored_label(ui.visuals().error_fg_color, err);
                }
                if let Some(folder) = &self.experiments.folder {
                    ui.weak(format!("folder: {}", folder.display()));
                }
                ui.separator();
                self.ablation_plot(ui);
                ui.separator();
                self.ablation_table(ui);
                ui.separator();
                self.past_ablations(ui);
            });
    }

    fn ablation_controls(&mut self, ui: &mut egui::Ui) {
        let e = &mut self.experiments;
        ui.horizontal_wrapped(|ui| {
            ui.label("Variants");
            for (v, on) in Variant::ALL.iter().zip(e.variants.iter_mut()) {
                ui.checkbox(on, v.name());
            }
        });
        ui.horizontal(|ui| {
            ui.label("Attention");
            for (a, on) in ATTENTIONS.iter().zip(e.attentions.iter_mut()) {
                ui.checkbox(on, crate::core::ablation::attention_name(*a));
            }
        });
        ui.horizontal(|ui| {
            let l = ui.label("Tokens per run");
            ui.add(
                egui::DragValue::new(&mut e.tokens)
                    .range(10_000..=100_000_000)
                    .speed(10_000),
            )
            .labelled_by(l.id);
            let l = ui.label("Seeds");
            ui.add(egui::TextEdit::singleline(&mut e.seeds).desired_width(80.0))
                .labelled_by(l.id);
            let l = ui.label("Evaluations per run");
            ui.add(egui::DragValue::new(&mut e.evals).range(1..=50))
                .labelled_by(l.id);
        });
    }

    fn ablation_plot(&mut self, ui: &mut egui::Ui) {
        let e = &mut self.experiments;
        if e.results.tasks.is_empty() {
            ui.weak("Curves appear here after each run's first evaluation.");
            return;
        }
        e.task = e.task.min(e.results.tasks.len() - 1);
        ui.horizontal(|ui| {
            ui.label("Task");
            for (i, t) in e.results.tasks.iter().enumerate() {
                ui.selectable_value(&mut e.task, i, t);
            }
        });
        let task = e.results.tasks[e.task].clone();
        let has_em = crate::core::figure::metric_for(&e.results, &task) == Metric::ExactMatch;
        ui.horizontal(|ui| {
            ui.label("Metric");
            ui.add_enabled_ui(has_em, |ui| {
                ui.selectable_value(&mut e.show_loss, false, "exact match")
            });
            ui.selectable_value(&mut e.show_loss, true, "eval loss");
        });
        let metric = if e.show_loss || !has_em {
            Metric::Loss
        } else {
            Metric::ExactMatch
        };
        let default = e.results.curves(&task, PromptKind::Default, metric);
        let own = e.results.curves(&task, PromptKind::Task, metric);
        let mut plot = Plot::new("ablation")
            .height(260.0)
            .legend(Legend::default())
            .x_axis_label("tokens trained")
            .y_axis_label(metric.label())
            // From the first token and from zero: one evaluation so far is a point, not a span
            // of one token and one loss value.
            .include_x(0.0)
            .include_y(0.0);
        if metric == Metric::ExactMatch {
            plot = plot.include_y(1.0);
        }
        plot.show(ui, |plot| {
            for (i, (label, points)) in default.iter().enumerate() {
                let (r, g, b) = crate::core::figure::VARIANT_COLOURS
                    [i % crate::core::figure::VARIANT_COLOURS.len()];
                let colour = egui::Color32::from_rgb(r, g, b);
                let pts: Vec<[f64; 2]> = points.iter().map(|&(x, y)| [x, y]).collect();
                plot.line(
                    Line::new(format!("{label} · default prompt"), PlotPoints::from(pts))
                        .color(colour)
                        .width(2.5),
                );
                if let Some((_, tp)) = own.iter().find(|(l, _)| l == label) {
                    let pts: Vec<[f64; 2]> = tp.iter().map(|&(x, y)| [x, y]).collect();
                    plot.line(
                        Line::new(format!("{label} · task prompt"), PlotPoints::from(pts))
                            .color(colour)
                            .style(LineStyle::dashed_loose())
                            .width(1.5),
                    );
                }
            }
        });
    }

    fn ablation_table(&mut self, ui: &mut egui::Ui) {
        let e = &self.experiments;
        let rows = e.results.rows();
        if rows.is_empty() {
            return;
        }
        ui.strong(if e.complete {
            "Results (final evaluation, mean ± sd over seeds)"
        } else {
            "Results so far (finished runs)"
        });
        egui::Grid::new("ablation_results")
            .striped(true)
            .show(ui, |ui| {
                for head in [
                    "variant",
                    "task",
                    "prompt",
                    "score %",
                    "loss",
                    "gap (task − default)",
                ] {
                    ui.strong(head);
                }
                ui.end_row();
                for r in &rows {
                    let key = RunKey {
                        variant: r.variant,
                        attention: match r.attention {
                            "full" => AttentionLayout::Full,
                            "isolated" => AttentionLayout::Isolated,
                            _ => AttentionLayout::Chunk,
                        },
                        seed: 0,
                    };
                    ui.label(key.label());
                    ui.label(&r.task);
                    ui.label(r.prompt);
                    ui.label(match r.exact_match {
                        Some(em) => em.show(100.0, 1),
                        None => r.accuracy.show(100.0, 1),
                    });
                    ui.label(r.loss.show(1.0, 3));
                    if r.prompt == "default" {
                        ui.label(
                            e.results
                                .gap(key.variant, key.attention, &r.task)
                                .map_or("–".to_string(), |g| format!("{:+.1}", g.mean * 100.0)),
                        );
                    } else {
                        ui.label("");
                    }
                    ui.end_row();
                }
            });
    }

    fn past_ablations(&mut self, ui: &mut egui::Ui) {
        ui.strong("Past ablations");
        if self.experiments.past.is_empty() {
            ui.weak("none yet for this project");
            return;
        }
        let mut open = None;
        let mut resume = None;
        let idle = !self.experiments.is_running();
        for dir in &self.experiments.past {
            ui.horizontal(|ui| {
                if ui.add_enabled(idle, egui::Button::new("Show")).clicked() {
                    open = Some(dir.clone());
                }
                ui.label(
                    dir.file_name()
                        .map(|n| n.to_string_lossy())
                        .unwrap_or_default(),
                );
                if dir.join("results.md").is_file() {
                    ui.weak("complete");
                } else {
                    ui.weak("unfinished");
                    if ui.add_enabled(idle, egui::Button::new("Resume")).clicked() {
                        resume = Some(dir.clone());
                    }
                }
            });
        }
        if let Some(dir) = open {
            self.load_past(dir);
        }
        if let Some(dir) = resume {
            self.resume_ablation(dir);
        }
    }
}
