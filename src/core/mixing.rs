//! The mixing engine end to end: a project's records tokenized under their task prompts, sampled
//! by the chosen strategy, packed by the chosen mode; and the two previews the studio and the CLI
//! show (mixture and packing).

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::core::bpe::train_bpe;
use crate::core::chains::{compose_task, template_text};
use crate::core::dataset::TaskData;
use crate::core::packing::{
    ChunkMix, OverlongCounts, PackMode, PackPlan, PackSettings, PackedRow, SampleInfo,
    SampleTokens, SegmentKind, best_fit_decreasing_rows, build_row, chunk_mix, plan,
    trained_in_row,
};
use crate::core::project::Project;
use crate::core::record::{Origin, Record};
use crate::core::sampling::{MixturePreview, SampleRef, TaskSize, sample_epoch};
use crate::core::settings::MixSettings;
use crate::core::sit::Composed;
use crate::core::template::{ChatTemplate, TemplateChoice};
use crate::core::tokenize::{LabelOptions, conversation, tokenize_prefix, tokenize_records};

/// Vocabulary size of the built-in tokenizer trained on the project's text.
pub const BUILTIN_VOCAB: usize = 4096;

/// Why the engine could not get ready.
#[derive(Debug, thiserror::Error)]
pub enum MixError {
    /// The tokenizer could not be loaded or trained.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be loaded.
    #[error(transparent)]
    Template(#[from] crate::core::template::TemplateError),
    /// Rows are too short for the default-prompt prefix.
    #[error(
        "the default system prompt takes {prefix} tokens, more than half of a {max_seq_len}-token \
         row; raise packing.max_seq_len or shorten the prompt"
    )]
    TooShort { prefix: usize, max_seq_len: usize },
}

/// Loads the project's tokenizer, or trains the built-in one on its records.
pub fn load_tokenizer(
    project: &Project,
    settings: &MixSettings,
    data: &[TaskData],
) -> Result<Tokenizer, MixError> {
    match &settings.tokenizer {
        Some(path) => {
            let path = project.resolve(path);
            let mut tokenizer = Tokenizer::from_file(&path)
                .map_err(|e| MixError::Tokenizer(format!("{e} ({})", path.display())))?;
            // Packing decides lengths; a tokenizer's own truncation or padding would fight it.
            tokenizer
                .with_truncation(None)
                .map_err(|e| MixError::Tokenizer(e.to_string()))?;
            tokenizer.with_padding(None);
            Ok(tokenizer)
        }
        None => {
            let texts: Vec<String> = data
                .iter()
                .zip(&project.tasks)
                .flat_map(|(d, t)| {
                    d.records.iter().map(move |r| {
                        conversation(r, &t.system_prompt, t.system_rule)
                            .into_iter()
                            .map(|m| m.content)
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                })
                .chain(template_text(project))
                .chain(std::iter::once(project.default_system_prompt.clone()))
                .collect();
            train_bpe(texts.into_iter(), BUILTIN_VOCAB).map_err(MixError::Tokenizer)
        }
    }
}

/// Loads the chat template the settings name.
pub fn load_template(project: &Project, settings: &MixSettings) -> Result<ChatTemplate, MixError> {
    Ok(match settings.template {
        TemplateChoice::Chatml => ChatTemplate::chatml(),
        TemplateChoice::Llama3 => ChatTemplate::llama3(),
        TemplateChoice::Tokenizer => {
            let path = settings.tokenizer_config.as_deref().map_or_else(
                || {
                    settings
                        .tokenizer
                        .as_deref()
                        .and_then(Path::parent)
                        .map(|p| p.join("tokenizer_config.json"))
                        .unwrap_or_else(|| PathBuf::from("tokenizer_config.json"))
                },
                Path::to_path_buf,
            );
            ChatTemplate::from_tokenizer_config(&project.resolve(&path))?
        }
    })
}

/// One task's tokenized training samples.
#[derive(Debug, Clone)]
pub struct PreparedTask {
    /// The task's name.
    pub name: String,
    /// Tokenized training records, in the task's record order (eval records left out).
    pub samples: Vec<SampleTokens>,
    /// Where each sample came from.
    pub origins: Vec<Origin>,
    /// Index of each sample's record in the task's [`TaskData::records`].
    pub record_index: Vec<usize>,
    /// Records the template or tokenizer could not handle, with why.
    pub failed: Vec<(Origin, String)>,
    /// Sampling weight.
    pub weight: f64,
    /// For each sample, the step template it was composed with (sequential instructions).
    pub composed: Vec<Option<u32>>,
}

impl PreparedTask {
    /// Tokens in all samples.
    pub fn tokens(&self) -> u64 {
        self.samples.iter().map(|s| s.input_ids.len() as u64).sum()
    }

    /// Tokens trained on (label kept) in all samples.
    pub fn trained_tokens(&self) -> u64 {
        self.samples
            .iter()
            .map(|s| s.labels.iter().filter(|&&l| l >= 0).count() as u64)
            .sum()
    }
}

/// Everything packing needs: every task's samples and the default-prompt prefix.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Tasks in project order.
    pub tasks: Vec<PreparedTask>,
    /// The default system prompt, tokenized.
    pub prefix: SampleTokens,
}

impl Prepared {
    /// Tokenizes every task's training records.
    pub fn build(
        project: &Project,
        data: &[TaskData],
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        labels: LabelOptions,
    ) -> Result<Self, MixError> {
        let mut tasks = Vec::with_capacity(project.tasks.len());
        for (ti, (task, d)) in project.tasks.iter().zip(data).enumerate() {
            let split = d.eval_split(task, project.seed);
            let train: Vec<usize> = (0..d.records.len()).filter(|&i| !split[i]).collect();
            // A share of the records trains as chained instructions (SIT).
            let composed: std::collections::HashMap<usize, Composed> =
                compose_task(project, data, ti, false).into_iter().collect();
            let records: Vec<&Record> = train
                .iter()
                .map(|&i| composed.get(&i).map_or(&d.records[i], |c| &c.record))
                .collect();
            let results = tokenize_records(
                tokenizer,
                template,
                &records,
                &task.system_prompt,
                task.system_rule,
                labels,
            );
            let mut prepared = PreparedTask {
                name: task.name.clone(),
                samples: Vec::with_capacity(records.len()),
                origins: Vec::with_capacity(records.len()),
                record_index: Vec::with_capacity(records.len()),
                failed: Vec::new(),
                weight: task.weight,
                composed: Vec::with_capacity(records.len()),
            };
            for ((record, &index), result) in records.iter().zip(&train).zip(results) {
                match result {
                    Ok(s) => {
                        prepared.samples.push(s);
                        prepared.origins.push(record.origin);
                        prepared.record_index.push(index);
                        prepared
                            .composed
                            .push(composed.get(&index).map(|c| c.template as u32));
                    }
                    Err(e) => prepared.failed.push((record.origin, e.to_string())),
                }
            }
            tasks.push(prepared);
        }
        let prefix = tokenize_prefix(tokenizer, template, &project.default_system_prompt)
            .map_err(|e| MixError::Tokenizer(e.to_string()))?;
        Ok(Self { tasks, prefix })
    }

    /// The project's tokenizer (loaded, or trained on its text) and every task tokenized with
    /// the project's template and label options.
    pub fn for_project(
        project: &Project,
        data: &[TaskData],
    ) -> Result<(Tokenizer, Self), MixError> {
        let tokenizer = load_tokenizer(project, &project.mixing, data)?;
        let template = load_template(project, &project.mixing)?;
        let prepared = Self::build(project, data, &tokenizer, &template, project.mixing.labels)?;
        Ok((tokenizer, prepared))
    }

    /// The samples `keep(task, sample)` says yes to, every task kept (possibly empty): one
    /// phase of a phased run.
    pub fn subset(&self, keep: &dyn Fn(usize, usize) -> bool) -> Self {
        let tasks = self
            .tasks
            .iter()
            .enumerate()
            .map(|(ti, t)| {
                let idx: Vec<usize> = (0..t.samples.len()).filter(|&i| keep(ti, i)).collect();
                PreparedTask {
                    name: t.name.clone(),
                    samples: idx.iter().map(|&i| t.samples[i].clone()).collect(),
                    origins: idx.iter().map(|&i| t.origins[i]).collect(),
                    record_index: idx.iter().map(|&i| t.record_index[i]).collect(),
                    failed: Vec::new(),
                    weight: t.weight,
                    composed: idx.iter().map(|&i| t.composed[i]).collect(),
                }
            })
            .collect();
        Self {
            tasks,
            prefix: self.prefix.clone(),
        }
    }

    /// Checks the default-prompt prefix leaves room in a row: it may take at most half of it.
    pub fn check_fits(&self, pack: &PackSettings) -> Result<(), MixError> {
        check_prefix_fits(&self.prefix, pack)
    }

    /// Sizes for the sampler.
    pub fn task_sizes(&self) -> Vec<TaskSize> {
        self.tasks
            .iter()
            .map(|t| TaskSize {
                name: t.name.clone(),
                records: t.samples.len(),
                weight: t.weight,
            })
            .collect()
    }

    /// The sample a reference points at.
    pub fn sample(&self, s: SampleRef) -> &SampleTokens {
        &self.tasks[s.task as usize].samples[s.record as usize]
    }

    /// Lengths of a sample, for the planner.
    pub fn info(&self, s: SampleRef) -> SampleInfo {
        let t = self.sample(s);
        SampleInfo {
            len: t.input_ids.len() as u32,
            trained: t.labels.iter().filter(|&&l| l >= 0).count() as u32,
            system_len: t.system.end - t.system.start,
            system_end: t.system.end,
        }
    }

    /// The mixture preview for these settings.
    pub fn mixture(&self, mode: PackMode, settings: &MixSettings) -> MixturePreview {
        let tokens: Vec<u64> = self.tasks.iter().map(PreparedTask::tokens).collect();
        MixturePreview::build(
            &self.task_sizes(),
            &tokens,
            mode.strategy(settings.strategy()),
            settings.epochs,
        )
    }

    /// Samples and packs one epoch.
    pub fn pack_epoch(
        &self,
        mix: &MixSettings,
        pack: &PackSettings,
        seed: u64,
        epoch: u32,
    ) -> PackPlan {
        pack_epoch(
            &self.task_sizes(),
            &|s| self.info(s),
            self.prefix.input_ids.len() as u32,
            (mix, pack),
            seed,
            epoch,
        )
    }

    /// Builds row `i` of a plan.
    pub fn row(&self, plan: &PackPlan, i: usize, pack: &PackSettings) -> PackedRow {
        build_row(plan, i, &|s| self.sample(s), &self.prefix, pack)
    }
}

/// Checks a default-prompt prefix leaves room in a row: it may take at most half of it.
pub fn check_prefix_fits(prefix: &SampleTokens, pack: &PackSettings) -> Result<(), MixError> {
    let prefix = prefix.input_ids.len();
    if pack.mode == PackMode::Moi && prefix * 2 > pack.max_seq_len {
        return Err(MixError::TooShort {
            prefix,
            max_seq_len: pack.max_seq_len,
        });
    }
    Ok(())
}

/// Samples and packs one epoch of tasks of these sizes; `info` gives a sample's lengths and
/// `prefix_len` is the default prompt's token count. The one sampling-and-planning step of every
/// sample store (in memory or spilled to disk), so they all draw the same rows.
pub fn pack_epoch(
    sizes: &[TaskSize],
    info: &dyn Fn(SampleRef) -> SampleInfo,
    prefix_len: u32,
    (mix, pack): (&MixSettings, &PackSettings),
    seed: u64,
    epoch: u32,
) -> PackPlan {
    let strategy = pack.mode.strategy(mix.strategy());
    let refs = sample_epoch(sizes, strategy, seed, epoch);
    plan(
        &refs,
        info,
        sizes.len(),
        prefix_len,
        pack,
        seed ^ u64::from(epoch),
    )
}

/// Per-task shares after packing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PackedShare {
    /// The task.
    pub task: String,
    /// Instructions (pieces) of the task in the rows.
    pub samples: usize,
    /// Tokens of the task in the rows.
    pub tokens: u64,
    /// Share of instructions (0–1).
    pub sample_share: f64,
    /// Share of instruction tokens (0–1).
    pub token_share: f64,
}

/// The packing view: fill, padding, labels, over-long counts, row lengths and a few rows.
#[derive(Debug, Clone, Serialize)]
pub struct PackingPreview {
    /// The mode shown.
    pub mode: PackMode,
    /// Row length limit.
    pub max_seq_len: usize,
    /// Rows in one epoch.
    pub rows: usize,
    /// Tokens in the rows.
    pub tokens: u64,
    /// Share of slots filled (rows padded to `max_seq_len`).
    pub fill: f64,
    /// Share of slots that are padding.
    pub padding: f64,
    /// Share of row tokens that are trained.
    pub trained_tokens: f64,
    /// Chunks in the rows (instructions outside `moi` are a chunk each), how many mix tasks and
    /// how many the sizes keep from mixing.
    pub chunks: ChunkMix,
    /// Fill a plain best-fit-decreasing packing of the same pieces reaches (tasks ignored): the
    /// reference for `fill`.
    pub best_fit_fill: f64,
    /// Over-long samples and what was done.
    pub overlong: OverlongCounts,
    /// Row-length histogram: 16 buckets of `max_seq_len / 16` tokens.
    pub histogram: Vec<usize>,
    /// Per-task shares in the packed rows.
    pub tasks: Vec<PackedShare>,
    /// The first rows, built.
    #[serde(skip)]
    pub sample_rows: Vec<PackedRow>,
}

impl PackingPreview {
    /// Packs one epoch and summarises it, building the first `show_rows` rows.
    pub fn build(
        prepared: &Prepared,
        mix: &MixSettings,
        pack: &PackSettings,
        seed: u64,
        show_rows: usize,
    ) -> Self {
        Self::of_plan(
            prepared,
            &prepared.pack_epoch(mix, pack, seed, 0),
            pack,
            show_rows,
        )
    }

    /// Summarises an epoch's plan packed with `pack`, building its first `show_rows` rows.
    pub fn of_plan(
        prepared: &Prepared,
        plan: &PackPlan,
        pack: &PackSettings,
        show_rows: usize,
    ) -> Self {
        let max = pack.max_seq_len.max(1);
        let mut histogram = vec![0usize; 16];
        for r in &plan.rows {
            let bucket = (r.len as usize * 16 / (max + 1)).min(15);
            histogram[bucket] += 1;
        }
        let mut samples = vec![0usize; prepared.tasks.len()];
        let mut tokens = vec![0u64; prepared.tasks.len()];
        for p in &plan.pieces {
            samples[p.sample.task as usize] += 1;
            tokens[p.sample.task as usize] += u64::from(p.len);
        }
        // Counted as the rows are built (first token of each segment and dropped system blocks
        // untrained), not from the samples' labels.
        let trained: u64 = (0..plan.rows.len())
            .map(|i| trained_in_row(plan, i, &|s| prepared.sample(s), pack))
            .sum();
        let all_samples: usize = samples.iter().sum();
        let all_tokens: u64 = tokens.iter().sum();
        let share = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let total = plan.tokens();
        let fill = plan.fill(max);
        let chunks = chunk_mix(plan, max as u32 - plan.prefix_len);
        let best_fit_fill = if pack.mode == PackMode::Seq || plan.rows.is_empty() {
            fill
        } else {
            let lens: Vec<u32> = plan.pieces.iter().map(|p| p.len).collect();
            let capacity = max as u32 - plan.prefix_len;
            let rows = best_fit_decreasing_rows(&lens, capacity).max(1) as u64;
            let pieces: u64 = lens.iter().map(|&l| u64::from(l)).sum();
            (pieces + u64::from(plan.prefix_len) * rows) as f64 / (rows as f64 * max as f64)
        };
        Self {
            mode: pack.mode,
            max_seq_len: max,
            rows: plan.rows.len(),
            tokens: total,
            fill,
            padding: if plan.rows.is_empty() {
                0.0
            } else {
                1.0 - fill
            },
            trained_tokens: share(trained as f64, total as f64),
            chunks,
            best_fit_fill,
            overlong: plan.overlong,
            histogram,
            tasks: prepared
                .tasks
                .iter()
                .enumerate()
                .map(|(i, t)| PackedShare {
                    task: t.name.clone(),
                    samples: samples[i],
                    tokens: tokens[i],
                    sample_share: share(samples[i] as f64, all_samples as f64),
                    token_share: share(tokens[i] as f64, all_tokens as f64),
                })
                .collect(),
            sample_rows: (0..show_rows.min(plan.rows.len()))
                .map(|i| prepared.row(plan, i, pack))
                .collect(),
        }
    }
}

/// A row as text with segment markers, for terminals and JSON: `⟦default prompt⟧…⟦math #12,
/// chunk 0⟧…`. Trained text is shown as is; the markers name each segment.
pub fn row_text(row: &PackedRow, tokenizer: &Tokenizer, prepared: &Prepared) -> String {
    let mut out = String::new();
    for seg in &row.segments {
        let marker = match (seg.kind, seg.task) {
            (SegmentKind::DefaultPrompt, _) => "⟦default prompt⟧".to_string(),
            (SegmentKind::Instruction, Some(t)) => {
                let task = &prepared.tasks[t as usize];
                let line = seg
                    .record
                    .and_then(|r| task.origins.get(r as usize))
                    .map_or(0, |o| o.line);
                let steps = seg
                    .record
                    .and_then(|r| task.composed.get(r as usize).copied().flatten())
                    .map_or(String::new(), |k| {
                        format!(", chained (step template {})", k + 1)
                    });
                format!("⟦{} line {line}, chunk {}{steps}⟧", task.name, seg.chunk)
            }
            (SegmentKind::Instruction, None) => "⟦?⟧".to_string(),
        };
        out.push_str(&marker);
        let ids = &row.input_ids[seg.tokens.start as usize..seg.tokens.end as usize];
        out.push_str(&tokenizer.decode(ids, false).unwrap_or_default());
    }
    out
}
