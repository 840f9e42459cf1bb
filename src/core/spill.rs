//! Tokenized samples kept in a file instead of in memory, for `moi-studio pack` over millions of
//! records. Records are read, templated and tokenized a batch at a time; each sample's token ids,
//! labels and conversation go to two unnamed temporary files, and only a 48-byte entry per sample
//! stays in memory. Rows are then built a group at a time from the files. The records themselves
//! are never all in memory, so peak memory grows by those 48 bytes per record, not by its text.
//!
//! It draws exactly the rows the in-memory path ([`crate::core::mixing::Prepared`]) draws: the
//! same records in the same order, the same eval split, the same sampler and planner.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;

use anyhow::Context;
use tokenizers::Tokenizer;

use crate::core::dataset::{LoadProgress, SourceOutcome, import_task_sources};
use crate::core::mixing::{check_prefix_fits, pack_epoch};
use crate::core::packing::{
    PackPlan, PackSettings, PackedRow, SampleInfo, SampleTokens, build_row,
};
use crate::core::project::{Project, Task};
use crate::core::record::{Origin, Record};
use crate::core::sampling::{SampleRef, TaskSize};
use crate::core::settings::MixSettings;
use crate::core::split::eval_mask;
use crate::core::template::{ChatMessage, ChatTemplate};
use crate::core::tokenize::{LabelOptions, conversation, tokenize_messages, tokenize_prefix};

/// Records templated and tokenized at a time (on all cores) before they are written out.
const BATCH: usize = 8192;

/// Where one sample lies in the files, and the lengths the planner needs.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Byte offset of the sample's ids (u32, little-endian), followed by as many labels (i32).
    tokens_at: u64,
    /// Byte offset of its conversation as JSON messages separated by commas.
    messages_at: u64,
    /// Tokens.
    len: u32,
    /// Tokens with a label.
    trained: u32,
    /// Token range of its system block.
    system: (u32, u32),
    /// Bytes of the messages.
    messages_len: u32,
    /// Bytes of the leading system message within them (0 when the first is not one).
    system_message: u32,
    /// The record's index among the task's records, eval ones included.
    record: u32,
}

/// One task's spilled training samples.
#[derive(Debug)]
pub struct SpilledTask {
    /// The task's name.
    pub name: String,
    /// Sampling weight.
    pub weight: f64,
    /// Records read, eval ones included.
    pub records: usize,
    /// Training records the template or tokenizer could not handle, with why.
    pub failed: Vec<(Origin, String)>,
    /// One outcome per source.
    pub sources: Vec<SourceOutcome>,
    entries: Vec<Entry>,
}

impl SpilledTask {
    /// Training samples.
    pub fn samples(&self) -> usize {
        self.entries.len()
    }
}

/// Every task's training samples, in files.
#[derive(Debug)]
pub struct Spilled {
    /// Tasks in project order.
    pub tasks: Vec<SpilledTask>,
    /// The default system prompt, tokenized.
    pub prefix: SampleTokens,
    tokens: File,
    messages: File,
}

/// A conversation as its JSON messages separated by commas (what goes between the brackets of a
/// `messages` array), and the bytes of the first message when it is a system one (else 0).
pub fn messages_json(conv: &[ChatMessage]) -> (Vec<u8>, u32) {
    let mut out = Vec::new();
    let mut system = 0;
    for (i, m) in conv.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, m).expect("writing JSON into memory");
        if i == 0 && m.role == "system" {
            system = out.len() as u32;
        }
    }
    (out, system)
}

/// Appends messages from [`messages_json`] to `out`, without the leading system message when
/// `keep_system` is false. Says whether it appended anything.
pub fn append_messages(
    json: &[u8],
    system_message: u32,
    keep_system: bool,
    out: &mut Vec<u8>,
) -> bool {
    let skip = if keep_system || system_message == 0 {
        0
    } else {
        // The system message and the comma after it.
        (system_message as usize + 1).min(json.len())
    };
    out.extend_from_slice(&json[skip..]);
    skip < json.len()
}

/// What a batch of records becomes before it is written: tokens and messages, or why not.
type Tokenized = Result<(SampleTokens, Vec<u8>, u32), String>;

/// What the reading thread hands over.
enum Read {
    /// Records, in file order.
    Batch(Vec<Record>),
    /// How far the reading is (dropped when the channel is full).
    Progress(LoadProgress),
}

/// The two files being written, and where each is.
struct Writers {
    tokens: BufWriter<File>,
    messages: BufWriter<File>,
    tokens_at: u64,
    messages_at: u64,
}

impl Writers {
    fn write(
        &mut self,
        record: u32,
        s: &SampleTokens,
        messages: &[u8],
        system_message: u32,
    ) -> std::io::Result<Entry> {
        let entry = Entry {
            record,
            tokens_at: self.tokens_at,
            messages_at: self.messages_at,
            len: s.input_ids.len() as u32,
            trained: s.labels.iter().filter(|&&l| l >= 0).count() as u32,
            system: (s.system.start, s.system.end),
            messages_len: messages.len() as u32,
            system_message,
        };
        for id in &s.input_ids {
            self.tokens.write_all(&id.to_le_bytes())?;
        }
        for l in &s.labels {
            self.tokens.write_all(&l.to_le_bytes())?;
        }
        self.messages.write_all(messages)?;
        self.tokens_at += 8 * s.input_ids.len() as u64;
        self.messages_at += messages.len() as u64;
        Ok(entry)
    }
}

impl Spilled {
    /// Reads, templates and tokenizes every task's training records into temporary files in
    /// `dir` (removed when this is dropped). Tasks must not compose chains
    /// ([`crate::core::chains::composes_training`]): a chain needs other records at hand.
    pub fn build(
        project: &Project,
        tokenizer: &Tokenizer,
        template: &ChatTemplate,
        labels: LabelOptions,
        dir: &Path,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> anyhow::Result<Self> {
        let temp = || {
            tempfile::tempfile_in(dir)
                .with_context(|| format!("creating a temporary file in {}", dir.display()))
        };
        let mut w = Writers {
            tokens: BufWriter::with_capacity(1 << 20, temp()?),
            messages: BufWriter::with_capacity(1 << 20, temp()?),
            tokens_at: 0,
            messages_at: 0,
        };
        let mut tasks = Vec::with_capacity(project.tasks.len());
        for (ti, task) in project.tasks.iter().enumerate() {
            tasks.push(spill_task(
                project,
                ti,
                task,
                (tokenizer, template, labels),
                &mut w,
                progress,
            )?);
        }
        let prefix = tokenize_prefix(tokenizer, template, &project.default_system_prompt)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let finish = |b: BufWriter<File>| -> anyhow::Result<File> {
            b.into_inner()
                .map_err(|e| e.into_error())
                .context("writing the temporary sample file")
        };
        Ok(Self {
            tasks,
            prefix,
            tokens: finish(w.tokens)?,
            messages: finish(w.messages)?,
        })
    }

    /// Checks the default-prompt prefix leaves room in a row.
    pub fn check_fits(&self, pack: &PackSettings) -> Result<(), crate::core::mixing::MixError> {
        check_prefix_fits(&self.prefix, pack)
    }

    /// Sizes for the sampler.
    pub fn task_sizes(&self) -> Vec<TaskSize> {
        self.tasks
            .iter()
            .map(|t| TaskSize {
                name: t.name.clone(),
                records: t.entries.len(),
                weight: t.weight,
            })
            .collect()
    }

    fn entry(&self, s: SampleRef) -> &Entry {
        &self.tasks[s.task as usize].entries[s.record as usize]
    }

    /// Lengths of a sample, for the planner.
    pub fn info(&self, s: SampleRef) -> SampleInfo {
        let e = self.entry(s);
        SampleInfo {
            len: e.len,
            trained: e.trained,
            system_len: e.system.1 - e.system.0,
            system_end: e.system.1,
        }
    }

    /// Samples and packs one epoch (the same plan [`crate::core::mixing::Prepared`] draws).
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

    /// Reads one sample's tokens back.
    fn sample(&self, e: &Entry) -> std::io::Result<SampleTokens> {
        let n = e.len as usize;
        let mut bytes = vec![0u8; 8 * n];
        read_at(&self.tokens, &mut bytes, e.tokens_at)?;
        let (ids, labels) = bytes.split_at(4 * n);
        let word = |c: &[u8]| [c[0], c[1], c[2], c[3]];
        Ok(SampleTokens {
            input_ids: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(word(c)))
                .collect(),
            labels: labels
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(word(c)))
                .collect(),
            system: e.system.0..e.system.1,
        })
    }

    /// Builds rows `range` of a plan, reading each sample they hold once.
    pub fn rows(
        &self,
        plan: &PackPlan,
        range: Range<usize>,
        pack: &PackSettings,
    ) -> anyhow::Result<Vec<PackedRow>> {
        let mut refs: Vec<SampleRef> = range
            .clone()
            .flat_map(|i| plan.row_pieces(i).iter().map(|p| p.sample))
            .collect();
        // In file order, so the reads move forward.
        refs.sort_unstable_by_key(|&s| (self.entry(s).tokens_at, s.task, s.record));
        refs.dedup();
        let mut loaded = HashMap::with_capacity(refs.len());
        for s in refs {
            let tokens = self
                .sample(self.entry(s))
                .context("reading back the temporary sample file")?;
            loaded.insert(s, tokens);
        }
        Ok(range
            .map(|i| build_row(plan, i, &|s| &loaded[&s], &self.prefix, pack))
            .collect())
    }

    /// Appends a sample's conversation as JSON messages separated by commas to `out`, without
    /// its leading system message when `keep_system` is false. Says whether it wrote anything.
    pub fn messages(
        &self,
        s: SampleRef,
        keep_system: bool,
        out: &mut Vec<u8>,
    ) -> anyhow::Result<bool> {
        let e = self.entry(s);
        let mut bytes = vec![0u8; e.messages_len as usize];
        read_at(&self.messages, &mut bytes, e.messages_at)
            .context("reading back the temporary conversation file")?;
        Ok(append_messages(&bytes, e.system_message, keep_system, out))
    }
}

/// Reads, tokenizes and writes one task, then keeps its training samples (the eval split is drawn
/// once the record count is known, as [`crate::core::dataset::load_task`] draws it).
fn spill_task(
    project: &Project,
    ti: usize,
    task: &Task,
    (tokenizer, template, labels): (&Tokenizer, &ChatTemplate, LabelOptions),
    w: &mut Writers,
    progress: &mut dyn FnMut(LoadProgress),
) -> anyhow::Result<SpilledTask> {
    use rayon::prelude::*;
    let mut entries: Vec<Entry> = Vec::new();
    let mut failed: Vec<(u32, Origin, String)> = Vec::new();
    let mut error: Option<std::io::Error> = None;
    let mut records = 0usize;
    let mut flush = |batch: Vec<Record>, records: &mut usize| {
        let done: Vec<Tokenized> = batch
            .par_iter()
            .map(|r| {
                let conv = conversation(r, &task.system_prompt, task.system_rule);
                let tokens = tokenize_messages(tokenizer, template, &conv, labels)
                    .map_err(|e| e.to_string())?;
                let (json, system) = messages_json(&conv);
                Ok((tokens, json, system))
            })
            .collect();
        for (r, result) in batch.iter().zip(done) {
            let index = *records as u32;
            *records += 1;
            match result {
                Ok((tokens, json, system)) if error.is_none() => {
                    match w.write(index, &tokens, &json, system) {
                        Ok(e) => entries.push(e),
                        Err(e) => error = Some(e),
                    }
                }
                Ok(_) => {}
                Err(why) => failed.push((index, r.origin, why)),
            }
        }
    };
    // One named thread reads and parses the files while the pool tokenizes the batch before:
    // reading no longer leaves the other cores idle. Two batches in flight at most.
    let (tx, rx) = crossbeam_channel::bounded::<Read>(2);
    let sources = std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("moi-pack-read".into())
            .spawn_scoped(scope, move || {
                let mut batch = Vec::with_capacity(BATCH);
                let sources = import_task_sources(
                    project,
                    ti,
                    task,
                    &mut |r| {
                        batch.push(r);
                        if batch.len() == BATCH {
                            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                            // A closed channel means the tokenizing side stopped; reading on is
                            // harmless and the outcome is still returned.
                            let _ = tx.send(Read::Batch(full));
                        }
                    },
                    &mut |p| {
                        let _ = tx.try_send(Read::Progress(p));
                    },
                );
                let _ = tx.send(Read::Batch(batch));
                sources
            })
            .expect("starting the reading thread");
        for msg in rx {
            match msg {
                Read::Batch(batch) => flush(batch, &mut records),
                Read::Progress(p) => progress(p),
            }
        }
        reader.join().expect("the reading thread panicked")
    });
    if let Some(e) = error {
        return Err(e).context("writing the temporary sample file");
    }
    let eval = eval_mask(records, task.eval_fraction, project.seed, &task.name);
    entries.retain(|e| !eval[e.record as usize]);
    entries.shrink_to_fit();
    Ok(SpilledTask {
        name: task.name.clone(),
        weight: task.weight,
        records,
        failed: failed
            .into_iter()
            .filter(|(i, _, _)| !eval[*i as usize])
            .map(|(_, o, why)| (o, why))
            .collect(),
        sources,
        entries,
    })
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            let n = std::os::windows::fs::FileExt::seek_read(
                file,
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(())
    }
}
