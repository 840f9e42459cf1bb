//! The studio's background work, each on a named thread that reports through a bounded channel
//! and wakes the UI: reading task data, tokenizing and packing for the previews, file dialogs,
//! answering a prompt with a finished model, exporting a run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};
use tokenizers::Tokenizer;

use crate::core::dataset::{TaskData, load_task};
use crate::core::events::Wake;
use crate::core::mixing::{PackingPreview, Prepared, load_template, load_tokenizer};
use crate::core::packing::PackPlan;
use crate::core::project::Project;
use crate::core::sampling::MixturePreview;

/// Starts a named thread; a failure to start is reported as text.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map(|_| ())
        .map_err(|e| format!("could not start the {name} thread: {e}"))
}

/// What the data worker reports.
pub enum LoadEvent {
    /// Progress through a task's files (0–1).
    Progress {
        /// Task index.
        task: usize,
        /// Share done.
        fraction: f32,
    },
    /// A task is read.
    Task {
        /// Task index.
        task: usize,
        /// Its records and import reports.
        data: Arc<TaskData>,
        /// The load generation it belongs to.
        generation: u64,
    },
}

/// Reads the data of `tasks` (indices into the project) on the `import` thread.
pub fn start_loading(
    project: Project,
    tasks: Vec<usize>,
    generation: u64,
    wake: Wake,
) -> Result<Receiver<LoadEvent>, String> {
    let (tx, rx) = bounded::<LoadEvent>(64);
    spawn("import", move || {
        for i in tasks {
            let Some(task) = project.tasks.get(i) else {
                continue;
            };
            let sources = task.sources.len().max(1) as f32;
            let data = load_task(&project, i, task, &mut |p| {
                let within = p.bytes.bytes_done as f32 / p.bytes.bytes_total.max(1) as f32;
                // Progress is advisory: when the UI is behind, skip it rather than block.
                if tx
                    .try_send(LoadEvent::Progress {
                        task: i,
                        fraction: (p.source as f32 + within) / sources,
                    })
                    .is_ok()
                {
                    wake();
                }
            });
            let event = LoadEvent::Task {
                task: i,
                data: Arc::new(data),
                generation,
            };
            if tx.send(event).is_err() {
                return;
            }
            wake();
        }
    })?;
    Ok(rx)
}

/// The project's tokenizer and every task tokenized: what the previews and token counts use.
pub struct PrepBundle {
    /// The tokenizer (the project's, or the built-in BPE trained on its text).
    pub tokenizer: Tokenizer,
    /// Tokenized tasks.
    pub prepared: Prepared,
}

/// The previews for one state of the settings.
pub struct PreviewResult {
    /// The settings key it was computed for.
    pub key: String,
    /// The tokenization key (tasks, prompts, template, labels).
    pub prep_key: String,
    /// Tokenizer and tokenized tasks, or why not.
    pub bundle: Result<Arc<PrepBundle>, String>,
    /// Sample and token shares per task.
    pub mixture: Option<MixturePreview>,
    /// Packing statistics.
    pub packing: Option<PackingPreview>,
    /// The epoch's plan, for the pack browser.
    pub plan: Option<Arc<PackPlan>>,
    /// Why packing failed, when it did.
    pub pack_error: Option<String>,
    /// The packing settings the plan was made with: the project's, cut to the model's context
    /// as the trainer will cut them.
    pub pack: crate::core::packing::PackSettings,
    /// Says so when the model's context cut the rows (or could not be read).
    pub context_note: Option<String>,
    /// The model this preview was for and the longest sequence it reads, when known.
    pub model_context: Option<(crate::train::worker::ModelChoice, usize)>,
    /// How long it took.
    pub took: Duration,
}

/// Tokenizes (unless `cached` matches `prep_key`), samples and packs on the `preview` thread.
pub fn start_preview(
    project: Project,
    data: Vec<Arc<TaskData>>,
    cached: Option<Arc<PrepBundle>>,
    key: String,
    prep_key: String,
    model: crate::train::worker::ModelChoice,
    wake: Wake,
) -> Result<Receiver<PreviewResult>, String> {
    let (tx, rx) = bounded(1);
    spawn("preview", move || {
        let started = Instant::now();
        // Rows as the trainer will pack them for this model.
        let mut pack = project.packing.clone();
        let context = crate::train::worker::model_context(&model);
        let model_context = context.as_ref().ok().map(|&c| (model.clone(), c));
        let context_note = match context {
            Ok(context) => pack.fit_context(context),
            Err(e) => Some(format!(
                "rows not fitted to the model: cannot read its context ({e:#})"
            )),
        };
        let bundle = match cached {
            Some(b) => Ok(b),
            None => {
                let owned: Vec<TaskData> = data.iter().map(|d| (**d).clone()).collect();
                // The tokenizer and template the run will use: the model's own for a model
                // folder or GGUF file, the project's (built-in) otherwise.
                let text_side = match &model {
                    crate::train::worker::ModelChoice::Path(path) => {
                        crate::train::score::model_text_side(path)
                            .map_err(|e| crate::core::mixing::MixError::Tokenizer(format!("{e:#}")))
                    }
                    crate::train::worker::ModelChoice::Tiny => {
                        load_tokenizer(&project, &project.mixing, &owned).and_then(|tokenizer| {
                            Ok((tokenizer, load_template(&project, &project.mixing)?))
                        })
                    }
                };
                text_side
                    .and_then(|(tokenizer, template)| {
                        let prepared = Prepared::build(
                            &project,
                            &owned,
                            &tokenizer,
                            &template,
                            project.mixing.labels,
                        )?;
                        Ok(Arc::new(PrepBundle {
                            tokenizer,
                            prepared,
                        }))
                    })
                    .map_err(|e| e.to_string())
            }
        };
        let mut result = PreviewResult {
            key,
            prep_key,
            bundle,
            mixture: None,
            packing: None,
            plan: None,
            pack_error: None,
            pack: pack.clone(),
            context_note,
            model_context,
            took: Duration::ZERO,
        };
        if let Ok(b) = &result.bundle {
            let p = &b.prepared;
            result.mixture = Some(p.mixture(project.packing.mode, &project.mixing));
            match p.check_fits(&pack) {
                Ok(()) => {
                    // One plan for the statistics and the pack browser.
                    let plan = p.pack_epoch(&project.mixing, &pack, project.seed, 0);
                    result.packing = Some(PackingPreview::of_plan(p, &plan, &pack, 0));
                    result.plan = Some(Arc::new(plan));
                }
                Err(e) => result.pack_error = Some(e.to_string()),
            }
        }
        result.took = started.elapsed();
        if tx.send(result).is_ok() {
            wake();
        }
    })?;
    Ok(rx)
}

/// Which file dialog, and what its answer is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialogKind {
    /// Dataset files to import as new tasks.
    Import,
    /// A project to open.
    Open,
    /// Where to save the project.
    SaveAs,
    /// A Hugging Face model folder to train.
    ModelFolder,
    /// A GGUF file to train.
    Gguf,
    /// Where to export this run as a Hugging Face folder.
    Export(PathBuf),
    /// Where to write this run's GGUF file and Modelfile.
    ExportGguf(PathBuf, crate::train::gguf_export::Quant),
    /// Where to write the project's recipe for transformers/accelerate.
    ExportRecipe,
}

/// What an export job is.
#[derive(Debug, Clone)]
pub enum ExportKind {
    /// A run's model as a Hugging Face folder (and its PEFT adapter).
    HuggingFace,
    /// A run's model as a GGUF file with an Ollama Modelfile.
    Gguf(crate::train::gguf_export::Quant),
}

/// Shows a native file dialog on the `dialog` thread (so the window keeps drawing); the
/// answer is the chosen paths (empty when cancelled).
pub fn start_dialog(
    kind: DialogKind,
    start_dir: PathBuf,
    wake: Wake,
) -> Result<Receiver<(DialogKind, Vec<PathBuf>)>, String> {
    let (tx, rx) = bounded(1);
    spawn("dialog", move || {
        let dialog = rfd::FileDialog::new().set_directory(&start_dir);
        let paths: Vec<PathBuf> = match &kind {
            DialogKind::Import => dialog
                .set_title("Import datasets")
                .add_filter(
                    "datasets",
                    &["jsonl", "json", "csv", "tsv", "parquet", "gz"],
                )
                .pick_files()
                .unwrap_or_default(),
            DialogKind::Open => dialog
                .set_title("Open project")
                .add_filter("MoI project", &["toml"])
                .pick_file()
                .into_iter()
                .collect(),
            DialogKind::SaveAs => dialog
                .set_title("Save project as")
                .set_file_name("project.moi.toml")
                .save_file()
                .into_iter()
                .collect(),
            DialogKind::ModelFolder => dialog
                .set_title("Hugging Face model folder")
                .pick_folder()
                .into_iter()
                .collect(),
            DialogKind::Gguf => dialog
                .set_title("GGUF model file")
                .add_filter("GGUF", &["gguf"])
                .pick_file()
                .into_iter()
                .collect(),
            DialogKind::ExportGguf(..) => dialog
                .set_title("Folder for the GGUF file and its Ollama Modelfile")
                .pick_folder()
                .into_iter()
                .collect(),
            DialogKind::ExportRecipe => dialog
                .set_title("Folder for the transformers/accelerate recipe")
                .pick_folder()
                .into_iter()
                .collect(),
            DialogKind::Export(_) => dialog
                .set_title("Export the model to a folder")
                .pick_folder()
                .into_iter()
                .collect(),
        };
        if tx.send((kind, paths)).is_ok() {
            wake();
        }
    })?;
    Ok(rx)
}

/// Loads a model folder and answers one prompt on the `try-it` thread.
pub fn start_answer(
    model: PathBuf,
    system: String,
    prompt: String,
    max_new: usize,
    wake: Wake,
) -> Result<Receiver<Result<String, String>>, String> {
    let (tx, rx) = bounded(1);
    spawn("try-it", move || {
        let answer = (|| -> anyhow::Result<String> {
            let device = crate::train::device::choose_device(false);
            let bundle = crate::train::score::load_bundle(&model, &device.device)?;
            let template = bundle.template()?;
            let chat = crate::train::chat::Chat {
                tokenizer: &bundle.tokenizer,
                template: &template,
            };
            chat.answer(&bundle.loaded.model, &system, &prompt, max_new)
        })();
        if tx.send(answer.map_err(|e| format!("{e:#}"))).is_ok() {
            wake();
        }
    })?;
    Ok(rx)
}

/// Exports a run on the `export` thread; the answer is the message to show.
pub fn start_export(
    run: PathBuf,
    out: PathBuf,
    kind: ExportKind,
    wake: Wake,
) -> Result<Receiver<Result<String, String>>, String> {
    let (tx, rx) = bounded(1);
    spawn("export", move || {
        let r = match kind {
            ExportKind::HuggingFace => {
                crate::train::export::export_run(&run, &out).map(|adapter| {
                    if adapter {
                        format!(
                            "exported the model and its PEFT adapter to {}",
                            out.display()
                        )
                    } else {
                        format!("exported the model to {}", out.display())
                    }
                })
            }
            ExportKind::Gguf(quant) => {
                crate::train::gguf_export::export_run_gguf(&run, &out, quant).map(|e| {
                    format!(
                        "wrote {} and {}{}",
                        e.gguf.display(),
                        e.modelfile.display(),
                        if e.template_translated {
                            ""
                        } else {
                            " (write its TEMPLATE by hand: the chat template has no Ollama form)"
                        }
                    )
                })
            }
        };
        if tx.send(r.map_err(|e| format!("{e:#}"))).is_ok() {
            wake();
        }
    })?;
    Ok(rx)
}

/// Writes the project's recipe on the `export` thread; the answer is the message to show.
pub fn start_recipe(
    project: crate::core::project::Project,
    model: crate::train::worker::ModelChoice,
    out: PathBuf,
    wake: Wake,
) -> Result<Receiver<Result<String, String>>, String> {
    let (tx, rx) = bounded(1);
    spawn("export", move || {
        let spec = crate::train::recipe::RecipeSpec {
            project,
            model,
            hub_model: None,
            out: out.clone(),
        };
        let r = crate::train::recipe::export_recipe(&spec, &mut |_| {}).map(|s| {
            let mut text = format!(
                "recipe written to {}: {} rows, {} steps; python train.py there trains it \
                 (README.md has the multi-GPU commands)",
                out.display(),
                s.rows,
                s.steps
            );
            for n in s.notes {
                text.push_str(&format!("; {n}"));
            }
            text
        });
        if tx.send(r.map_err(|e| format!("{e:#}"))).is_ok() {
            wake();
        }
    })?;
    Ok(rx)
}
