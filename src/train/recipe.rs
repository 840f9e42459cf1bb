//! `export-recipe`: the project's MoI data and settings handed to a real distributed trainer.
//!
//! The folder holds the packed rows exactly as our trainer would take them, step by step
//! (`train.parquet`), the held-out items of every task under its own and the default prompt
//! (`eval.parquet`), the hyperparameters (`recipe.json`), the initial model as a Hugging Face
//! folder where the project's model is not one already, a `train.py` for transformers +
//! accelerate that reproduces our mask, loss and schedule, launch configs for DDP, FSDP and
//! DeepSpeed ZeRO-3, and a README with the commands.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int32Array, RecordBatch};
use candle_core::Device;
use serde_json::json;

use crate::core::dataset::load_project;
use crate::core::fsutil::{set_readable, write_atomic};
use crate::core::mixing::Prepared;
use crate::core::packing::{PackedRow, SegmentKind};
use crate::core::project::Project;
use crate::train::eval::{EvalSet, PROMPT_KINDS};
use crate::train::export::{save_model_folder, tensors_of};
use crate::train::model::Decoder;
use crate::train::trainer::{TrainJob, planned_steps};
use crate::train::worker::{ModelChoice, eos_of, load_base, var_builder};

/// The training script, written into every recipe.
const TRAIN_PY: &str = include_str!("recipe/train.py");
/// accelerate configs: one machine, several GPUs.
const ACCELERATE_DDP: &str = include_str!("recipe/accelerate_ddp.yaml");
const ACCELERATE_FSDP: &str = include_str!("recipe/accelerate_fsdp.yaml");
const ACCELERATE_ZERO3: &str = include_str!("recipe/accelerate_zero3.yaml");

/// Rows per parquet row group (and rows built at a time).
const ROW_GROUP: usize = 1024;

/// What to export.
#[derive(Debug, Clone)]
pub struct RecipeSpec {
    /// The project, as it is now.
    pub project: Project,
    /// The model the data is tokenized for (the project's unless `--model` names a local one).
    pub model: ModelChoice,
    /// A Hugging Face hub id `train.py` should load instead of a local folder (it must share the
    /// tokenizer of `model`, since the rows are token ids).
    pub hub_model: Option<String>,
    /// The recipe folder (created; files in it are replaced).
    pub out: PathBuf,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct RecipeSummary {
    /// Packed rows in `train.parquet`.
    pub rows: usize,
    /// Optimizer steps they make.
    pub steps: u64,
    /// Tokens in them.
    pub tokens: u64,
    /// Held-out items in `eval.parquet` (both prompt kinds).
    pub eval_items: usize,
    /// The model `train.py` loads: a path or a hub id.
    pub model: String,
    /// Things the user should know (settings the recipe does not carry).
    pub notes: Vec<String>,
}

/// Writes a recipe folder for `spec`; `say` hears progress.
pub fn export_recipe(
    spec: &RecipeSpec,
    say: &mut dyn FnMut(String),
) -> anyhow::Result<RecipeSummary> {
    let project = &spec.project;
    let out = &spec.out;
    if let (Some(id), ModelChoice::Tiny) = (&spec.hub_model, &spec.model) {
        bail!(
            "{id} is not a local model, and the project's model is the built-in one, whose \
             tokenizer no hub model shares; set the project's model to a local copy of {id} \
             (a Hugging Face folder or GGUF file) so that the rows are its token ids, or pass \
             --model with that local path"
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    say("reading the tasks' data".into());
    let data = load_project(project, &mut |_| {});
    if data.iter().all(|d| d.records.is_empty()) {
        bail!("the project has no records to export");
    }
    let device = Device::Cpu;
    let base = load_base(&spec.model, project, &data, &device, None, say)?;
    let mut notes = Vec::new();
    let model = match (&spec.hub_model, &spec.model) {
        (Some(id), _) => {
            notes.push(format!(
                "train.py loads {id}; the rows are token ids of {}, so {id} must use the same \
                 tokenizer",
                match &spec.model {
                    ModelChoice::Tiny => "the built-in tokenizer".to_string(),
                    ModelChoice::Path(p) => p.display().to_string(),
                }
            ));
            id.clone()
        }
        (None, ModelChoice::Path(p)) if !is_gguf(p) => std::path::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string(),
        (None, _) => {
            // The built-in model's seeded weights (the ones our trainer starts from) or a GGUF's
            // dequantized weights, as a folder transformers loads.
            say("writing the initial model as a Hugging Face folder".into());
            save_model_folder(
                &out.join("model"),
                &base.config,
                &tensors_of(&base.weights),
                &base.tokenizer,
                &base.template.source,
                &base.template.bos_token,
                &eos_of(&base.template),
            )?;
            "model".to_string()
        }
    };
    say("tokenizing".into());
    let prepared = Prepared::build(
        project,
        &data,
        &base.tokenizer,
        &base.template,
        project.mixing.labels,
    )?;
    let mut pack = project.packing.clone();
    if let Some(note) = pack.fit_context(base.config.max_position_embeddings) {
        notes.push(note);
    }
    prepared.check_fits(&pack)?;
    if !project.training.phases.is_off() {
        notes.push(format!(
            "phased training ({}) is not part of the recipe: the rows are those of one phase",
            project.training.phases.describe()
        ));
    }
    let decoder = Decoder::new(&base.config, var_builder(&base.weights, &device))?;
    let job = TrainJob {
        model: &decoder,
        weights: &base.weights,
        prepared: &prepared,
        mix: &project.mixing,
        pack: &pack,
        train: &project.training,
        seed: project.seed,
        out_dir: out,
        eval: None,
        chat: None,
        phases: None,
    };
    let steps = planned_steps(&job);

    say(format!("packing and writing {steps} steps of rows"));
    let train_path = out.join("train.parquet");
    let mut sink = ParquetSink::new(out)?;
    let per_step = project.training.batch_rows.max(1) * project.training.grad_accum.max(1);
    let (mut rows, mut tokens, mut step) = (0usize, 0u64, 0u64);
    let mut epoch = 0u32;
    // The trainer's order: each epoch sampled and packed with its own seed, a step never
    // straddling two epochs, epochs past the planned ones counting on.
    while step < steps {
        let plan = prepared.pack_epoch(&project.mixing, &pack, project.seed, epoch);
        if plan.rows.is_empty() {
            bail!("epoch {epoch} packs no rows");
        }
        let mut start = 0;
        while start < plan.rows.len() && step < steps {
            let end = (start + per_step.max(ROW_GROUP / per_step * per_step)).min(plan.rows.len());
            let built: Vec<PackedRow> = (start..end)
                .map(|i| prepared.row(&plan, i, &pack))
                .collect();
            let mut keep = Vec::new();
            for chunk in built.chunks(per_step) {
                if step >= steps {
                    break;
                }
                for r in chunk {
                    tokens += r.input_ids.len() as u64;
                    keep.push((r, step, epoch));
                }
                step += 1;
            }
            rows += keep.len();
            sink.write(&row_batch(&keep)?)?;
            start = end;
        }
        epoch += 1;
    }
    sink.finish(&train_path)?;

    say("writing the held-out items".into());
    let eval_set = EvalSet::build(
        project,
        &data,
        &base.tokenizer,
        &base.template,
        project.training.eval_items,
        project.training.eval_generate,
        base.config.max_position_embeddings,
    );
    let eval_items = write_eval(&eval_set, &out.join("eval.parquet"))?;

    let training = &project.training;
    let recipe = json!({
        "written_by": format!("moi-studio {}", env!("CARGO_PKG_VERSION")),
        "project": project.name,
        "model": model,
        "lora": training.lora.enabled.then_some(&training.lora),
        "steps": steps,
        "rows": rows,
        "tokens": tokens,
        "batch_rows": training.batch_rows.max(1),
        "grad_accum": training.grad_accum.max(1),
        "lr": training.lr,
        "warmup_steps": training.warmup_steps,
        "decay": training.decay,
        "min_lr_ratio": training.min_lr_ratio,
        "clip_grad_norm": training.clip_grad_norm,
        "adamw": training.adamw,
        "loss_norm": training.loss_norm,
        "eval_every_steps": training.eval_every_steps,
        "eval_generate": training.eval_generate,
        "checkpoint_every": training.checkpoint_every,
        "seed": project.seed,
        "packing": pack,
        "stop_token_ids": eval_set.stop,
        "default_system_prompt": project.default_system_prompt,
        "tasks": project.tasks.iter().map(|t| json!({
            "name": t.name,
            "system_prompt": t.system_prompt,
            "check": t.answer_check.label(),
        })).collect::<Vec<_>>(),
        "columns": {
            "input_ids": "token ids of the packed row (not padded)",
            "labels": "the token id where trained, -100 elsewhere; not shifted (the logits at i-1 predict labels[i])",
            "position_ids": "positions as our trainer uses them (reset per instruction when the project says so)",
            "segment_ids": "token i attends to token j when j <= i and (segment_ids[j] == 0 or segment_ids[j] == segment_ids[i])",
            "sample_ids": "the instruction each token belongs to within the row (0: none), for per-sample loss means",
            "task_ids": "the task index of each token's instruction (-1: none), for per-task losses",
            "step": "the optimizer step the row belongs to",
            "epoch": "the epoch it was sampled in",
        },
    });
    write_atomic(
        &out.join("recipe.json"),
        serde_json::to_string_pretty(&recipe)?.as_bytes(),
    )?;
    write_atomic(&out.join("train.py"), TRAIN_PY.as_bytes())?;
    let accelerate = out.join("accelerate");
    std::fs::create_dir_all(&accelerate)?;
    write_atomic(&accelerate.join("ddp.yaml"), ACCELERATE_DDP.as_bytes())?;
    write_atomic(&accelerate.join("fsdp.yaml"), ACCELERATE_FSDP.as_bytes())?;
    write_atomic(&accelerate.join("zero3.yaml"), ACCELERATE_ZERO3.as_bytes())?;
    write_atomic(
        &out.join("README.md"),
        readme(project, &model, steps, rows, tokens, &notes).as_bytes(),
    )?;
    Ok(RecipeSummary {
        rows,
        steps,
        tokens,
        eval_items,
        model,
        notes,
    })
}

fn is_gguf(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A `list<int32>` column from one vector per row.
fn int_lists(values: impl Iterator<Item = Vec<i32>>) -> ArrayRef {
    let mut b = ListBuilder::new(Int32Builder::new());
    for v in values {
        b.values().append_slice(&v);
        b.append(true);
    }
    Arc::new(b.finish())
}

/// Packed rows with their step and epoch, as one record batch of `train.parquet`.
fn row_batch(rows: &[(&PackedRow, u64, u32)]) -> anyhow::Result<RecordBatch> {
    let per_token = |r: &PackedRow, f: &dyn Fn(usize, &crate::core::packing::Segment) -> i32| {
        let mut v = vec![0i32; r.input_ids.len()];
        for (s, seg) in r.segments.iter().enumerate() {
            for slot in &mut v[seg.tokens.start as usize..seg.tokens.end as usize] {
                *slot = f(s, seg);
            }
        }
        v
    };
    let as_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    Ok(RecordBatch::try_from_iter([
        (
            "input_ids",
            int_lists(rows.iter().map(|(r, ..)| as_i32(&r.input_ids))),
        ),
        (
            "labels",
            int_lists(rows.iter().map(|(r, ..)| r.labels.clone())),
        ),
        (
            "position_ids",
            int_lists(rows.iter().map(|(r, ..)| as_i32(&r.position_ids))),
        ),
        (
            "segment_ids",
            int_lists(rows.iter().map(|(r, ..)| as_i32(&r.segment_ids))),
        ),
        (
            "sample_ids",
            int_lists(rows.iter().map(|(r, ..)| {
                per_token(r, &|s, seg| {
                    if seg.kind == SegmentKind::Instruction {
                        s as i32 + 1
                    } else {
                        0
                    }
                })
            })),
        ),
        (
            "task_ids",
            int_lists(rows.iter().map(|(r, ..)| {
                let mut v = per_token(r, &|_, seg| seg.task.map_or(-1, |t| t as i32));
                // Tokens outside every segment (none today) belong to no task.
                v.resize(r.input_ids.len(), -1);
                v
            })),
        ),
        (
            "step",
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|(_, s, _)| *s as i32),
            )) as ArrayRef,
        ),
        (
            "epoch",
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|(.., e)| *e as i32),
            )) as ArrayRef,
        ),
    ])?)
}

/// Writes every held-out item (task, prompt kind, conversation with labels, prompt for
/// generation, reference answer, check); returns how many.
fn write_eval(set: &EvalSet, path: &Path) -> anyhow::Result<usize> {
    let (mut task, mut prompt_kind, mut check, mut reference) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut ids, mut labels, mut prompts, mut index, mut max_new) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in &set.tasks {
        for (kind, items) in PROMPT_KINDS.iter().zip(&t.items) {
            for (i, item) in items.iter().enumerate() {
                task.append_value(&t.name);
                prompt_kind.append_value(kind.label());
                check.append_value(t.check.label());
                reference.append_value(&item.reference);
                ids.push(item.tokens.input_ids.iter().map(|&x| x as i32).collect());
                labels.push(item.tokens.labels.clone());
                prompts.push(item.prompt.iter().map(|&x| x as i32).collect());
                index.push(i as i32);
                max_new.push(t.max_new_tokens as i32);
            }
        }
    }
    let n = ids.len();
    if n == 0 {
        return Ok(0);
    }
    let generate = index
        .iter()
        .map(|&i| i32::from((i as usize) < set.generate));
    let batch = RecordBatch::try_from_iter([
        ("task", Arc::new(task.finish()) as ArrayRef),
        ("prompt", Arc::new(prompt_kind.finish()) as ArrayRef),
        ("check", Arc::new(check.finish()) as ArrayRef),
        ("input_ids", int_lists(ids.into_iter())),
        ("labels", int_lists(labels.into_iter())),
        ("prompt_ids", int_lists(prompts.into_iter())),
        ("reference", Arc::new(reference.finish()) as ArrayRef),
        (
            "generate",
            Arc::new(Int32Array::from_iter_values(generate)) as ArrayRef,
        ),
        (
            "max_new_tokens",
            Arc::new(Int32Array::from(max_new)) as ArrayRef,
        ),
    ])?;
    let mut sink = ParquetSink::new(path.parent().unwrap_or(Path::new(".")))?;
    sink.write(&batch)?;
    sink.finish(path)?;
    Ok(n)
}

/// Record batches into a temporary parquet file that becomes the real one only when all is
/// written.
pub struct ParquetSink {
    tmp: tempfile::NamedTempFile,
    writer: Option<parquet::arrow::ArrowWriter<std::fs::File>>,
}

impl ParquetSink {
    /// A sink whose temporary file lies in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(".moi-parquet-")
            .tempfile_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        Ok(Self { tmp, writer: None })
    }

    /// Appends a batch (the first one sets the schema).
    pub fn write(&mut self, batch: &RecordBatch) -> anyhow::Result<()> {
        if self.writer.is_none() {
            let props = parquet::file::properties::WriterProperties::builder()
                .set_max_row_group_row_count(Some(ROW_GROUP))
                .build();
            self.writer = Some(parquet::arrow::ArrowWriter::try_new(
                self.tmp.as_file().try_clone()?,
                batch.schema(),
                Some(props),
            )?);
        }
        if let Some(w) = self.writer.as_mut() {
            w.write(batch)?;
        }
        Ok(())
    }

    /// Closes the file, syncs it and renames it to `path`.
    pub fn finish(self, path: &Path) -> anyhow::Result<()> {
        let Some(writer) = self.writer else {
            bail!("nothing to write to {}", path.display());
        };
        writer.close()?;
        self.tmp.as_file().sync_all()?;
        set_readable(self.tmp.path())?;
        self.tmp
            .persist(path)
            .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
        Ok(())
    }
}

/// The recipe's README: what is in the folder and the launch commands.
fn readme(
    project: &Project,
    model: &str,
    steps: u64,
    rows: usize,
    tokens: u64,
    notes: &[String],
) -> String {
    let t = &project.training;
    let mut text = format!(
        "# MoI recipe: {name}\n\n\
         Written by MoI Studio. The packed Mixture-of-Instructions rows of the project, in the \
         order its own trainer takes them, for Hugging Face transformers + accelerate.\n\n\
         - `train.parquet`: {rows} rows, {tokens} tokens, {steps} optimizer steps of {b} rows × \
         {a} micro-batches; columns `input_ids`, `labels` (already masked, not shifted), \
         `position_ids`, `segment_ids` (the attention mask), `sample_ids`, `task_ids`, `step`, \
         `epoch`.\n\
         - `eval.parquet`: each task's held-out items under its own and the default system \
         prompt (`prompt` = task | default), for loss and greedy exact match.\n\
         - `recipe.json`: model, learning-rate schedule, AdamW, clipping, loss normalisation, \
         LoRA, tasks and prompts.\n\
         - `train.py`: the training loop; `accelerate/`: launch configs.\n\
         - Model: `{model}`{model_note}.\n\n\
         ## Set-up\n\n```sh\npython3 -m venv .venv && . .venv/bin/activate\n\
         pip install torch transformers accelerate pyarrow{peft}\n```\n\n\
         ## Launch\n\n```sh\n\
         # one process (CPU or one GPU)\npython train.py --output out\n\
         # one machine, every GPU, data parallel\n\
         accelerate launch --config_file accelerate/ddp.yaml --num_processes N train.py --output out\n\
         # sharded parameters, gradients and optimizer state (FSDP)\n\
         accelerate launch --config_file accelerate/fsdp.yaml --num_processes N train.py --output out\n\
         # DeepSpeed ZeRO-3 (pip install deepspeed)\n\
         accelerate launch --config_file accelerate/zero3.yaml --num_processes N train.py --output out\n\
         ```\n\n\
         `python train.py --help` lists the options: `--max-steps` for a short try, `--attn` \
         (sdpa, eager), `--dtype` (float32, bfloat16), `--eval-every`.\n\n\
         ## What train.py keeps from MoI Studio\n\n\
         - The attention mask: each token sees earlier tokens of its own instruction and the \
         row's shared prefix (segment 0: the default system prompt in moi rows, or the whole row \
         with full attention). It is passed to the model as a 4-D mask, so eager and SDPA \
         attention reproduce it exactly. Rows are packed, so a micro-batch pads only to its \
         longest row. `--attn flash_attention_2` is taken only for full attention without \
         position resets: FlashAttention cannot show a shared prefix, and transformers splits \
         its sequences where positions restart.\n\
         - The loss: next-token cross-entropy on trained tokens, weighted {norm} over the \
         whole optimizer step, as MoI Studio does.\n\
         - The schedule: {warmup} warm-up steps to {lr}, then {decay} decay to {floor} of it; \
         gradients clipped at {clip}.\n\
         - Every step uses the rows of its `step` value. With N processes each takes every N-th \
         micro-batch of a step, so a step's rows stay the same and the loss is normalised over \
         all of them; keep `batch_rows × grad_accum` a multiple of N.\n\
         - Evaluation: every task's held-out loss and exact match, under the task's prompt and \
         under the default prompt, written to `out/metrics.jsonl` beside the loss of every step.\n",
        name = project.name,
        b = t.batch_rows.max(1),
        a = t.grad_accum.max(1),
        model_note = if model == "model" {
            " (the folder beside this README: the project's initial weights)"
        } else {
            ""
        },
        peft = if t.lora.enabled { " peft" } else { "" },
        norm = match t.loss_norm {
            crate::core::train_settings::LossNorm::TokenMean => "per token",
            crate::core::train_settings::LossNorm::SampleMean => "per sample, then per step",
        },
        warmup = t.warmup_steps,
        lr = t.lr,
        decay = serde_json::to_value(t.decay)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        floor = t.min_lr_ratio,
        clip = t.clip_grad_norm,
    );
    if !notes.is_empty() {
        text.push_str("\n## Notes\n\n");
        for n in notes {
            text.push_str(&format!("- {n}\n"));
        }
    }
    text
}
