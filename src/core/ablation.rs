//! The paper's ablation on a project's own data: which runs it makes (variant × attention ×
//! seed, every run on the same token budget), and what their metrics say once read back —
//! per-task scores under the default and the task's prompt, mean ± spread over seeds, and the
//! system-prompt gap MoI is meant to close.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::core::events::{EvalMetrics, PromptKind, TrainEvent};
use crate::core::project::Project;
use crate::core::settings::{AttentionLayout, PackMode};

/// One of the paper's training variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// One conversation per row, natural proportions.
    Seq,
    /// Packed, natural proportions.
    Concat,
    /// Balanced sampling, packed.
    Balanced,
    /// Balanced, mixed chunks, the default prompt first in every row.
    Moi,
    /// MoI with each row's first instruction answered under the default prompt.
    MoiFirstDefault,
    /// MoI with a share of every task's records composed into chained instructions (SIT).
    Sit,
    /// MoI trained in phases of rising difficulty (Phased IFT).
    Phased,
    /// The phased run's control: phases of the same sizes, records assigned at random.
    PhasedRandom,
}

/// The share of each task's records the `sit` variant composes when the project sets none.
pub const SIT_SHARE: f64 = 0.25;

impl Variant {
    /// Every variant, in the paper's order.
    pub const ALL: [Variant; 8] = [
        Self::Seq,
        Self::Concat,
        Self::Balanced,
        Self::Moi,
        Self::MoiFirstDefault,
        Self::Sit,
        Self::Phased,
        Self::PhasedRandom,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Seq => "seq",
            Self::Concat => "concat",
            Self::Balanced => "balanced",
            Self::Moi => "moi",
            Self::MoiFirstDefault => "moi-first-default",
            Self::Sit => "sit",
            Self::Phased => "phased",
            Self::PhasedRandom => "phased-random",
        }
    }

    /// The packing mode it trains with.
    pub fn mode(self) -> PackMode {
        match self {
            Self::Seq => PackMode::Seq,
            Self::Concat => PackMode::Concat,
            Self::Balanced => PackMode::Balanced,
            Self::Moi | Self::MoiFirstDefault | Self::Sit | Self::Phased | Self::PhasedRandom => {
                PackMode::Moi
            }
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown variant '{s}': expected seq, concat, balanced, moi, \
                     moi-first-default, sit, phased or phased-random"
                )
            })
    }
}

/// The name of an attention layout.
pub fn attention_name(a: AttentionLayout) -> &'static str {
    match a {
        AttentionLayout::Full => "full",
        AttentionLayout::Isolated => "isolated",
        AttentionLayout::Chunk => "chunk",
    }
}

/// Parses an attention layout's name.
pub fn parse_attention(s: &str) -> Result<AttentionLayout, String> {
    match s.trim() {
        "full" => Ok(AttentionLayout::Full),
        "isolated" => Ok(AttentionLayout::Isolated),
        "chunk" => Ok(AttentionLayout::Chunk),
        other => Err(format!(
            "unknown attention '{other}': expected full, isolated or chunk"
        )),
    }
}

/// What an ablation runs; saved as `ablation.json` in its folder, so a second invocation
/// resumes the same plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationPlan {
    /// The variants compared.
    pub variants: Vec<Variant>,
    /// The attention layouts each variant is tried with.
    pub attentions: Vec<AttentionLayout>,
    /// Non-padding tokens every run trains on.
    pub tokens: u64,
    /// Seeds: each gives every variant the same initial weights and eval split.
    pub seeds: Vec<u64>,
    /// Evaluations per run, at the same token counts in every run.
    pub evals: u32,
    /// "tiny" or the model's path.
    pub model: String,
}

impl AblationPlan {
    /// Checks the plan can run.
    pub fn validate(&self) -> Result<(), String> {
        if self.variants.is_empty() || self.attentions.is_empty() || self.seeds.is_empty() {
            return Err("an ablation needs at least one variant, attention and seed".into());
        }
        if self.tokens < 1000 {
            return Err(format!(
                "a budget of {} tokens is too small to train on",
                self.tokens
            ));
        }
        if self.evals == 0 {
            return Err("an ablation needs at least one evaluation per run".into());
        }
        Ok(())
    }

    /// Every run, seed by seed so that a first comparison of all variants is ready early.
    pub fn runs(&self) -> Vec<RunKey> {
        let mut out = Vec::new();
        for &seed in &self.seeds {
            for &attention in &self.attentions {
                for &variant in &self.variants {
                    out.push(RunKey {
                        variant,
                        attention,
                        seed,
                    });
                }
            }
        }
        out
    }

    /// The project one run trains: `base` with the variant's packing, the attention, the seed
    /// and the token budget with its evaluation marks.
    pub fn project_for(&self, base: &Project, key: &RunKey) -> Project {
        let mut p = base.clone();
        p.seed = key.seed;
        p.packing.mode = key.variant.mode();
        p.packing.first_under_default = key.variant == Variant::MoiFirstDefault;
        p.packing.attention = key.attention;
        p.training.max_steps = None;
        p.training.max_tokens = Some(self.tokens);
        p.training.eval_every_steps = 0;
        p.training.eval_every_tokens = self.tokens.div_ceil(u64::from(self.evals.max(1)));
        p.training.early_stopping_patience = 0;
        // Every run of a plan with `sit` is also asked chained instructions at evaluation, so
        // the step check compares all variants; only `sit` trains on them.
        let sit_plan = self.variants.contains(&Variant::Sit);
        for task in &mut p.tasks {
            if sit_plan && task.sit.steps.is_empty() {
                task.sit.steps = crate::core::sit::default_templates();
            }
            task.sit.share = match key.variant {
                Variant::Sit if task.sit.share > 0.0 => task.sit.share,
                Variant::Sit => SIT_SHARE,
                _ => 0.0,
            };
        }
        let phases = &mut p.training.phases;
        match key.variant {
            Variant::Phased | Variant::PhasedRandom => {
                if phases.is_off() {
                    phases.count = 3;
                }
                phases.random = key.variant == Variant::PhasedRandom;
            }
            _ => phases.count = 1,
        }
        p
    }
}

/// One run of an ablation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunKey {
    /// The variant.
    pub variant: Variant,
    /// The attention layout.
    pub attention: AttentionLayout,
    /// The seed.
    pub seed: u64,
}

impl RunKey {
    /// The run's folder name, e.g. `moi-chunk-s1`.
    pub fn dir_name(&self) -> String {
        format!(
            "{}-{}-s{}",
            self.variant.name(),
            attention_name(self.attention),
            self.seed
        )
    }

    /// What the variant and attention are called in reports (the seed left out).
    pub fn label(&self) -> String {
        format!(
            "{} · {}",
            self.variant.name(),
            attention_name(self.attention)
        )
    }
}

/// One evaluation of one run, at the tokens trained on by then.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalAt {
    /// Non-padding tokens trained on at the evaluation.
    pub tokens: u64,
    /// The metrics.
    pub metrics: EvalMetrics,
}

/// What one run reported, read from its `metrics.jsonl`.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    /// Every evaluation, in order (a resumed run's repeated steps counted once).
    pub evals: Vec<EvalAt>,
    /// Whether the run finished.
    pub finished: bool,
    /// The tokens trained on by its last step.
    pub tokens: u64,
    /// Each task's training loss per step: (tokens, loss).
    pub task_loss: BTreeMap<String, Vec<(u64, f64)>>,
}

impl RunRecord {
    /// Takes in one event. Steps and evaluations at or before a step already seen (a run that
    /// was killed after its last checkpoint and resumed) replace the old ones.
    pub fn absorb(&mut self, event: &TrainEvent, tokens_at: &mut BTreeMap<u64, u64>) {
        match event {
            TrainEvent::Step(m) => {
                tokens_at.split_off(&m.step);
                self.evals.retain(|e| e.metrics.step < m.step);
                for series in self.task_loss.values_mut() {
                    series.retain(|(t, _)| *t < m.tokens_seen);
                }
                tokens_at.insert(m.step, m.tokens_seen);
                self.tokens = m.tokens_seen;
                for t in &m.task_loss {
                    self.task_loss
                        .entry(t.task.clone())
                        .or_default()
                        .push((m.tokens_seen, t.loss));
                }
            }
            TrainEvent::Eval(e) => {
                let tokens = tokens_at.get(&e.step).copied().unwrap_or(0);
                self.evals.retain(|x| {
                    !(x.metrics.step == e.step
                        && x.metrics.task == e.task
                        && x.metrics.prompt == e.prompt)
                });
                self.evals.push(EvalAt {
                    tokens,
                    metrics: e.clone(),
                });
            }
            TrainEvent::Finished { .. } => self.finished = true,
            _ => {}
        }
    }

    /// Reads a run folder's `metrics.jsonl`; lines that do not parse are skipped.
    pub fn load(run_dir: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(run_dir.join("metrics.jsonl"))?;
        let mut record = Self::default();
        let mut tokens_at = BTreeMap::new();
        for line in std::io::BufReader::new(file).lines() {
            if let Ok(event) = serde_json::from_str::<TrainEvent>(&line?) {
                record.absorb(&event, &mut tokens_at);
            }
        }
        Ok(record)
    }

    /// The evaluations of one task under one prompt kind, in order.
    pub fn curve(&self, task: &str, prompt: PromptKind) -> Vec<&EvalAt> {
        self.evals
            .iter()
            .filter(|e| e.metrics.task == task && e.metrics.prompt == prompt)
            .collect()
    }
}

/// A mean and its spread (sample standard deviation; 0 for one value).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// Of `values` (none when empty).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self { mean, sd, n })
    }

    /// `12.5 ± 3.1` with `scale` applied (100 for percentages).
    pub fn show(&self, scale: f64, digits: usize) -> String {
        if self.n > 1 {
            format!(
                "{:.d$} ± {:.d$}",
                self.mean * scale,
                self.sd * scale,
                d = digits
            )
        } else {
            format!("{:.d$}", self.mean * scale, d = digits)
        }
    }
}

/// One row of `results.csv`: a variant and attention, a task, a prompt kind, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultRow {
    /// Variant.
    pub variant: Variant,
    /// Attention layout name.
    pub attention: &'static str,
    /// Task.
    pub task: String,
    /// "task" or "default".
    pub prompt: &'static str,
    /// Mean tokens trained on at the final evaluation.
    pub tokens: f64,
    /// Final eval loss.
    pub loss: Spread,
    /// Final token accuracy.
    pub accuracy: Spread,
    /// Final exact match, for tasks with a check.
    pub exact_match: Option<Spread>,
    /// Final share of chained instructions with every step done, for tasks asked them.
    pub steps_done: Option<Spread>,
}

/// The ablation's numbers: every finished run's record, by key.
#[derive(Debug, Clone, Default)]
pub struct AblationResults {
    /// Finished (or partial) runs.
    pub runs: BTreeMap<RunKey, RunRecord>,
    /// Task names, in the order first seen.
    pub tasks: Vec<String>,
}

/// A (variant, attention) pair and the records of its seeds.
type Group<'a> = ((Variant, AttentionLayout), Vec<&'a RunRecord>);

impl AblationResults {
    /// Collects the records of `plan`'s runs under `out/runs`; runs not started are absent.
    pub fn load(out: &Path, plan: &AblationPlan) -> Self {
        let mut results = Self::default();
        for key in plan.runs() {
            if let Ok(record) = RunRecord::load(&out.join("runs").join(key.dir_name())) {
                results.insert(key, record);
            }
        }
        results
    }

    /// Adds or replaces one run's record.
    pub fn insert(&mut self, key: RunKey, record: RunRecord) {
        for e in &record.evals {
            if !self.tasks.contains(&e.metrics.task) {
                self.tasks.push(e.metrics.task.clone());
            }
        }
        self.runs.insert(key, record);
    }

    /// Runs grouped by variant and attention, in plan order.
    fn groups(&self) -> Vec<Group<'_>> {
        let mut groups: Vec<Group<'_>> = Vec::new();
        for (key, record) in &self.runs {
            let k = (key.variant, key.attention);
            match groups.iter_mut().find(|(g, _)| *g == k) {
                Some((_, v)) => v.push(record),
                None => groups.push((k, vec![record])),
            }
        }
        groups
    }

    /// The final evaluation of every group × task × prompt kind, over the seeds whose runs
    /// finished (an unfinished run's latest evaluation is not its final one).
    pub fn rows(&self) -> Vec<ResultRow> {
        let mut out = Vec::new();
        for ((variant, attention), mut records) in self.groups() {
            records.retain(|r| r.finished);
            for task in &self.tasks {
                for prompt in [PromptKind::Default, PromptKind::Task] {
                    let last: Vec<&EvalAt> = records
                        .iter()
                        .filter_map(|r| r.curve(task, prompt).last().copied())
                        .collect();
                    let (Some(loss), Some(accuracy)) = (
                        Spread::of(&last.iter().map(|e| e.metrics.loss).collect::<Vec<_>>()),
                        Spread::of(&last.iter().map(|e| e.metrics.accuracy).collect::<Vec<_>>()),
                    ) else {
                        continue;
                    };
                    let exact: Vec<f64> =
                        last.iter().filter_map(|e| e.metrics.exact_match).collect();
                    let steps: Vec<f64> =
                        last.iter().filter_map(|e| e.metrics.steps_done).collect();
                    out.push(ResultRow {
                        variant,
                        attention: attention_name(attention),
                        task: task.clone(),
                        prompt: prompt.label(),
                        tokens: last.iter().map(|e| e.tokens as f64).sum::<f64>()
                            / last.len() as f64,
                        loss,
                        accuracy,
                        exact_match: Spread::of(&exact),
                        steps_done: Spread::of(&steps),
                    });
                }
            }
        }
        out
    }

    /// The system-prompt gap of a group and task: task-prompt score minus default-prompt score
    /// per seed (exact match where the task has a check, else token accuracy), over seeds.
    pub fn gap(&self, variant: Variant, attention: AttentionLayout, task: &str) -> Option<Spread> {
        self.per_seed_gap(variant, attention, task, |own, default| {
            score(own) - score(default)
        })
    }

    /// The loss gap of a group and task: default-prompt eval loss minus task-prompt eval loss
    /// per seed (positive: the model does better when told its task's prompt), over seeds.
    pub fn loss_gap(
        &self,
        variant: Variant,
        attention: AttentionLayout,
        task: &str,
    ) -> Option<Spread> {
        self.per_seed_gap(variant, attention, task, |own, default| {
            default.loss - own.loss
        })
    }

    /// `difference(task-prompt final eval, default-prompt final eval)` for every finished seed
    /// of a group, over seeds.
    fn per_seed_gap(
        &self,
        variant: Variant,
        attention: AttentionLayout,
        task: &str,
        difference: impl Fn(&EvalMetrics, &EvalMetrics) -> f64,
    ) -> Option<Spread> {
        let gaps: Vec<f64> = self
            .runs
            .iter()
            .filter(|(k, r)| k.variant == variant && k.attention == attention && r.finished)
            .filter_map(|(_, r)| {
                let own = r.curve(task, PromptKind::Task).last().copied()?;
                let default = r.curve(task, PromptKind::Default).last().copied()?;
                Some(difference(&own.metrics, &default.metrics))
            })
            .collect();
        Spread::of(&gaps)
    }

    /// Mean-over-seeds curves of one task's metric under one prompt kind, one per group:
    /// (label, points of (tokens, value)). The k-th evaluation of each seed is averaged.
    pub fn curves(
        &self,
        task: &str,
        prompt: PromptKind,
        metric: Metric,
    ) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut out = Vec::new();
        for ((variant, attention), records) in self.groups() {
            let per_seed: Vec<Vec<&EvalAt>> =
                records.iter().map(|r| r.curve(task, prompt)).collect();
            let len = per_seed.iter().map(Vec::len).max().unwrap_or(0);
            let mut points = Vec::new();
            for k in 0..len {
                let at: Vec<&EvalAt> = per_seed.iter().filter_map(|c| c.get(k).copied()).collect();
                let values: Vec<f64> = at.iter().filter_map(|e| metric.of(&e.metrics)).collect();
                if values.is_empty() {
                    continue;
                }
                let x = at.iter().map(|e| e.tokens as f64).sum::<f64>() / at.len() as f64;
                points.push((x, values.iter().sum::<f64>() / values.len() as f64));
            }
            if !points.is_empty() {
                out.push((group_label(variant, attention), points));
            }
        }
        out
    }

    /// `results.csv`: one line per [`ResultRow`].
    pub fn csv(&self) -> String {
        let mut out = String::from(
            "variant,attention,task,prompt,tokens,seeds,loss_mean,loss_sd,accuracy_mean,accuracy_sd,exact_match_mean,exact_match_sd,steps_done_mean,steps_done_sd\n",
        );
        for r in self.rows() {
            let cells = |x: Option<Spread>| {
                x.map_or((String::new(), String::new()), |s| {
                    (format!("{:.4}", s.mean), format!("{:.4}", s.sd))
                })
            };
            let (em, em_sd) = cells(r.exact_match);
            let (st, st_sd) = cells(r.steps_done);
            let _ = writeln!(
                out,
                "{},{},\"{}\",{},{:.0},{},{:.4},{:.4},{:.4},{:.4},{em},{em_sd},{st},{st_sd}",
                r.variant.name(),
                r.attention,
                r.task.replace('"', "\"\""),
                r.prompt,
                r.tokens,
                r.loss.n,
                r.loss.mean,
                r.loss.sd,
                r.accuracy.mean,
                r.accuracy.sd,
            );
        }
        out
    }

    /// A markdown table's title and header: variant, one column per task, then `last`.
    fn table_head(&self, out: &mut String, title: &str, last: &str) {
        let _ = write!(out, "{title}\n\n| variant |");
        for t in &self.tasks {
            let _ = write!(out, " {t} |");
        }
        let _ = write!(out, " {last} |\n|---|");
        for _ in &self.tasks {
            out.push_str("---|");
        }
        out.push_str("---|\n");
    }

    /// `results.md`: per task, the default-prompt score, the task-prompt score and the gap, for
    /// every variant; then the eval losses.
    pub fn markdown(&self, plan: &AblationPlan) -> String {
        let mut out = String::from("# Ablation results\n\n");
        let seeds: Vec<String> = plan.seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "Every run trained on {} non-padding tokens from the same initial weights per seed \
             (seeds {}); scores are the final evaluation on each task's held-out split, mean ± \
             standard deviation over seeds. Exact match where the task has a check, else token \
             accuracy, in %. The gap is the task-prompt score minus the default-prompt score: \
             what the model can do only when told its task's system prompt.\n",
            plan.tokens,
            seeds.join(", ")
        );
        let rows = self.rows();
        let find = |v: Variant, a: &str, t: &str, p: &str| {
            rows.iter()
                .find(|r| r.variant == v && r.attention == a && r.task == t && r.prompt == p)
        };
        let show = |r: Option<&ResultRow>| {
            r.map_or("–".to_string(), |r| match r.exact_match {
                Some(em) => em.show(100.0, 1),
                None => r.accuracy.show(100.0, 1),
            })
        };
        self.table_head(
            &mut out,
            "## Default-prompt score (task-prompt score; gap)",
            "mean default",
        );
        for ((variant, attention), _) in self.groups() {
            let a = attention_name(attention);
            let _ = write!(out, "| {} |", group_label(variant, attention));
            let mut defaults = Vec::new();
            for t in &self.tasks {
                let d = find(variant, a, t, "default");
                if let Some(r) = d {
                    defaults.push(r.exact_match.map_or(r.accuracy.mean, |e| e.mean));
                }
                let gap = self
                    .gap(variant, attention, t)
                    .map_or("–".to_string(), |g| format!("{:+.1}", g.mean * 100.0));
                let _ = write!(
                    out,
                    " {} ({}; {gap}) |",
                    show(d),
                    show(find(variant, a, t, "task"))
                );
            }
            let mean = Spread::of(&defaults)
                .map_or("–".to_string(), |s| format!("{:.1}", s.mean * 100.0));
            let _ = writeln!(out, " {mean} |");
        }
        self.table_head(
            &mut out,
            "\n## Eval loss under the default prompt (task prompt; loss gap = default − task)",
            "mean loss gap",
        );
        for ((variant, attention), _) in self.groups() {
            let a = attention_name(attention);
            let _ = write!(out, "| {} |", group_label(variant, attention));
            let mut gaps = Vec::new();
            for t in &self.tasks {
                let cell =
                    |p| find(variant, a, t, p).map_or("–".to_string(), |r| r.loss.show(1.0, 3));
                let gap = self.loss_gap(variant, attention, t);
                if let Some(g) = gap {
                    gaps.push(g.mean);
                }
                let gap = gap.map_or("–".to_string(), |g| format!("{:+.3}", g.mean));
                let _ = write!(out, " {} ({}; {gap}) |", cell("default"), cell("task"));
            }
            let mean = Spread::of(&gaps).map_or("–".to_string(), |s| format!("{:+.3}", s.mean));
            let _ = writeln!(out, " {mean} |");
        }
        if rows.iter().any(|r| r.steps_done.is_some()) {
            self.table_head(
                &mut out,
                "\n## Every step done, chained instructions under the default prompt (task prompt)",
                "mean default",
            );
            for ((variant, attention), _) in self.groups() {
                let a = attention_name(attention);
                let _ = write!(out, "| {} |", group_label(variant, attention));
                let mut defaults = Vec::new();
                for t in &self.tasks {
                    let cell = |p| {
                        find(variant, a, t, p)
                            .and_then(|r| r.steps_done)
                            .map_or("–".to_string(), |s| s.show(100.0, 1))
                    };
                    if let Some(s) = find(variant, a, t, "default").and_then(|r| r.steps_done) {
                        defaults.push(s.mean);
                    }
                    let _ = write!(out, " {} ({}) |", cell("default"), cell("task"));
                }
                let mean = Spread::of(&defaults)
                    .map_or("–".to_string(), |s| format!("{:.1}", s.mean * 100.0));
                let _ = writeln!(out, " {mean} |");
            }
        }
        out
    }
}

/// What a variant and attention pair is called in reports.
fn group_label(variant: Variant, attention: AttentionLayout) -> String {
    RunKey {
        variant,
        attention,
        seed: 0,
    }
    .label()
}

/// What a curve plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Exact match (tasks with a check).
    ExactMatch,
    /// Eval loss.
    Loss,
    /// Token accuracy.
    Accuracy,
}

impl Metric {
    /// The value of `m`, if it has one.
    pub fn of(self, m: &EvalMetrics) -> Option<f64> {
        match self {
            Self::ExactMatch => m.exact_match,
            Self::Loss => Some(m.loss),
            Self::Accuracy => Some(m.accuracy),
        }
    }

    /// The name on axes.
    pub fn label(self) -> &'static str {
        match self {
            Self::ExactMatch => "exact match",
            Self::Loss => "eval loss",
            Self::Accuracy => "token accuracy",
        }
    }
}

/// A task's headline score: exact match where it has a check, else token accuracy.
fn score(m: &EvalMetrics) -> f64 {
    m.exact_match.unwrap_or(m.accuracy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::events::StepMetrics;

    fn step(n: u64, tokens: u64) -> TrainEvent {
        TrainEvent::Step(StepMetrics {
            step: n,
            loss: 1.0,
            tokens_seen: tokens,
            steps: 1,
            ..StepMetrics::default()
        })
    }

    fn eval(n: u64, task: &str, prompt: PromptKind, em: f64) -> TrainEvent {
        TrainEvent::Eval(EvalMetrics {
            step: n,
            task: task.into(),
            prompt,
            loss: 1.0 - em,
            perplexity: 1.0,
            accuracy: em,
            exact_match: Some(em),
            items: 4,
            generated: 4,
            tokens: 10,
            sample: None,
            steps_done: None,
            steps_tried: 0,
        })
    }

    fn record(events: &[TrainEvent]) -> RunRecord {
        let mut r = RunRecord::default();
        let mut at = BTreeMap::new();
        for e in events {
            r.absorb(e, &mut at);
        }
        r
    }

    #[test]
    fn a_resumed_runs_repeated_steps_count_once_and_evals_carry_tokens() {
        let r = record(&[
            step(1, 100),
            step(2, 200),
            eval(2, "math", PromptKind::Default, 0.1),
            step(3, 300),
            eval(3, "math", PromptKind::Default, 0.2),
            // Killed after step 3; the last checkpoint was step 2.
            step(3, 300),
            eval(3, "math", PromptKind::Default, 0.25),
            TrainEvent::Finished { step: 3 },
        ]);
        let curve = r.curve("math", PromptKind::Default);
        assert_eq!(curve.len(), 2);
        assert_eq!((curve[0].tokens, curve[1].tokens), (200, 300));
        assert_eq!(curve[1].metrics.exact_match, Some(0.25));
        assert!(r.finished);
    }

    #[test]
    fn rows_average_over_seeds_and_the_gap_is_task_minus_default() {
        let plan = AblationPlan {
            variants: vec![Variant::Concat, Variant::Moi],
            attentions: vec![AttentionLayout::Chunk],
            tokens: 10_000,
            seeds: vec![1, 2],
            evals: 1,
            model: "tiny".into(),
        };
        let mut results = AblationResults::default();
        for key in plan.runs() {
            let (d, t) = match (key.variant, key.seed) {
                (Variant::Moi, 1) => (0.5, 0.6),
                (Variant::Moi, _) => (0.7, 0.6),
                (_, 1) => (0.1, 0.5),
                _ => (0.3, 0.7),
            };
            results.insert(
                key,
                record(&[
                    step(1, 10_000),
                    eval(1, "math", PromptKind::Default, d),
                    eval(1, "math", PromptKind::Task, t),
                    TrainEvent::Finished { step: 1 },
                ]),
            );
        }
        let rows = results.rows();
        let moi = rows
            .iter()
            .find(|r| r.variant == Variant::Moi && r.prompt == "default")
            .unwrap();
        let em = moi.exact_match.unwrap();
        assert!((em.mean - 0.6).abs() < 1e-12 && em.n == 2);
        assert!((em.sd - 0.1414).abs() < 1e-3);
        let gap = results
            .gap(Variant::Concat, AttentionLayout::Chunk, "math")
            .unwrap();
        assert!((gap.mean - 0.4).abs() < 1e-12, "{gap:?}");
        let gap = results
            .gap(Variant::Moi, AttentionLayout::Chunk, "math")
            .unwrap();
        assert!((gap.mean - 0.0).abs() < 1e-12, "{gap:?}");
        // Losses are 1 − em here: concat's default loss exceeds its task loss by 0.4.
        let lg = results
            .loss_gap(Variant::Concat, AttentionLayout::Chunk, "math")
            .unwrap();
        assert!((lg.mean - 0.4).abs() < 1e-12, "{lg:?}");
        let md = results.markdown(&plan);
        assert!(md.contains("(0.400 ± 0.141; +0.400) | +0.400 |"), "{md}");
        assert!(
            md.contains("| moi · chunk | 60.0 ± 14.1 (60.0 ± 0.0; +0.0) | 60.0 |"),
            "{md}"
        );
        let csv = results.csv();
        assert_eq!(csv.lines().count(), 1 + 4);
        assert!(
            csv.contains("concat,chunk,\"math\",default,10000,2,"),
            "{csv}"
        );
        // An unfinished run's evaluations are curves, not results.
        let mut partial = record(&[step(1, 5_000), eval(1, "math", PromptKind::Default, 0.9)]);
        partial.finished = false;
        results.insert(
            RunKey {
                variant: Variant::Seq,
                attention: AttentionLayout::Chunk,
                seed: 1,
            },
            partial,
        );
        assert!(results.rows().iter().all(|r| r.variant != Variant::Seq));
        assert!(
            results
                .gap(Variant::Seq, AttentionLayout::Chunk, "math")
                .is_none()
        );
        let curves = results.curves("math", PromptKind::Default, Metric::ExactMatch);
        assert_eq!(curves.len(), 3);
        let curves: Vec<_> = curves
            .into_iter()
            .filter(|(l, _)| !l.starts_with("seq"))
            .collect();
        assert_eq!(curves.len(), 2);
        assert_eq!(curves[1].1, vec![(10_000.0, 0.6)]);
    }

    #[test]
    fn each_run_gets_its_variant_budget_and_seed() {
        let plan = AblationPlan {
            variants: vec![Variant::Seq, Variant::MoiFirstDefault],
            attentions: vec![AttentionLayout::Full, AttentionLayout::Chunk],
            tokens: 50_000,
            seeds: vec![3],
            evals: 4,
            model: "tiny".into(),
        };
        let runs = plan.runs();
        assert_eq!(runs.len(), 4);
        let p = plan.project_for(&Project::default(), &runs[1]);
        assert_eq!(runs[1].dir_name(), "moi-first-default-full-s3");
        assert!(p.packing.first_under_default);
        assert_eq!(p.packing.mode, PackMode::Moi);
        assert_eq!(p.seed, 3);
        assert_eq!(p.training.max_tokens, Some(50_000));
        assert_eq!(p.training.eval_every_tokens, 12_500);
        assert!("nope".parse::<Variant>().is_err());
        assert_eq!(
            "moi-first-default".parse::<Variant>(),
            Ok(Variant::MoiFirstDefault)
        );
    }

    #[test]
    fn sit_and_phased_variants_change_only_their_own_settings() {
        let plan = AblationPlan {
            variants: vec![
                Variant::Moi,
                Variant::Sit,
                Variant::Phased,
                Variant::PhasedRandom,
            ],
            attentions: vec![AttentionLayout::Chunk],
            tokens: 50_000,
            seeds: vec![1],
            evals: 2,
            model: "tiny".into(),
        };
        let base = Project {
            tasks: vec![crate::core::project::Task::new(
                "math",
                "You are a mathematician.",
            )],
            ..Project::default()
        };
        let runs = plan.runs();
        let projects: Vec<Project> = runs.iter().map(|k| plan.project_for(&base, k)).collect();
        // Every run is asked chained instructions at evaluation; only `sit` trains on them.
        for p in &projects {
            assert_eq!(p.tasks[0].sit.steps, crate::core::sit::default_templates());
            assert_eq!(p.packing.mode, PackMode::Moi);
        }
        let shares: Vec<f64> = projects.iter().map(|p| p.tasks[0].sit.share).collect();
        assert_eq!(shares, vec![0.0, SIT_SHARE, 0.0, 0.0]);
        let phases: Vec<(u32, bool)> = projects
            .iter()
            .map(|p| (p.training.phases.count, p.training.phases.random))
            .collect();
        assert_eq!(phases, vec![(1, false), (1, false), (3, false), (3, true)]);
        assert_eq!(runs[3].dir_name(), "phased-random-chunk-s1");
        assert_eq!("sit".parse::<Variant>(), Ok(Variant::Sit));
        // A plan without `sit` asks nothing chained.
        let plain = AblationPlan {
            variants: vec![Variant::Moi, Variant::Phased],
            ..plan
        };
        let p = plain.project_for(&base, &plain.runs()[1]);
        assert!(p.tasks[0].sit.steps.is_empty());
        assert_eq!(p.training.phases.count, 3);
    }
}
