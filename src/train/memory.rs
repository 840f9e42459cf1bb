//! Memory, planned before a run starts: what a step will hold (weights are loaded by then;
//! gradients, optimizer state, activations and logits are estimated from the model's shape),
//! against what the system has; and how the allocator keeps freed blocks.

use crate::core::train_settings::LoraSettings;
use crate::train::config::ModelConfig;

/// Tells the allocators to keep freed memory for reuse instead of handing large blocks back to
/// the kernel. A training step allocates and frees the same activation-sized buffers every time;
/// returned to the kernel, each is mapped again, zeroed page by page on first touch, and its
/// unmapping flushes the TLB of every core. The binaries allocate with mimalloc (glibc's bins
/// spent half of packing a million records): it is told never to purge. glibc's malloc, which
/// C libraries and the test binaries still use, is told to serve blocks up to 32 MiB from the
/// heap and never trim it. Together this took the tiny model's training from 3,600 to 4,900
/// tokens/s on the 2-core machine and SmolLM2's from 250 to 310 (BENCHMARKS.md). Peak resident
/// memory is what a step needs either way. `MOI_STUDIO_MALLOC=default` in the environment
/// leaves both allocators' defaults.
pub fn tune_allocator() {
    if std::env::var("MOI_STUDIO_MALLOC").is_ok_and(|v| v == "default") {
        return;
    }
    /// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 headers).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set only stores an option value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

const F32: u64 = 4;
const MIB: f64 = 1024.0 * 1024.0;

/// What one training step holds beyond what the process already has (the weights, the data and
/// the tokenizer are loaded before the plan is made), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepMemory {
    /// Gradients of the trained parameters, and their running sum over micro-batches.
    pub gradients: u64,
    /// AdamW's two moments.
    pub optimizer: u64,
    /// Activations the backward pass needs, over every layer of one micro-batch.
    pub activations: u64,
    /// The logits of one micro-batch and their gradient.
    pub logits: u64,
    /// What the allocator holds beyond the live blocks: freed memory it keeps for reuse (it is
    /// told never to purge) and its per-thread segments; measured at about 50 MiB on the
    /// tiny model, whatever the model.
    pub allocator: u64,
}

impl StepMemory {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.gradients + self.optimizer + self.activations + self.logits + self.allocator
    }
}

/// The shape of a run, as far as memory goes.
#[derive(Debug, Clone, Copy)]
pub struct RunShape<'a> {
    /// The model.
    pub config: &'a ModelConfig,
    /// Parameters trained (all of them, or the adapters').
    pub trainable: u64,
    /// LoRA adapters, when they are what is trained.
    pub lora: Option<&'a LoraSettings>,
    /// Whether the fused kernels run (the composite ops keep much more).
    pub fused: bool,
    /// Whether activations are checkpointed per layer (only each layer's input is kept).
    pub checkpointing: bool,
    /// The share of a micro-batch's tokens that are trained, with a margin for batches above
    /// the average (1 for every token): the fused path runs the vocabulary-sized head on the
    /// trained positions only, so the logits scale with them.
    pub trained_share: f64,
}

/// Floats kept per token and layer by the forward pass for the backward pass (the fused one
/// unless `composite`).
fn layer_floats_per_token(cfg: &ModelConfig, lora: Option<&LoraSettings>, composite: bool) -> u64 {
    let h = cfg.hidden_size as u64;
    let q = (cfg.num_attention_heads * cfg.head_size()) as u64;
    let kv = (cfg.kv_heads() * cfg.head_size()) as u64;
    let i = cfg.intermediate_size as u64;
    // Residual in and out of both blocks, both norms, the o and down outputs: 7 × hidden;
    // q, k, v before and after the rotation and the attention output: 3q + 3kv (v is not
    // rotated, the attention output is q-sized); gate, up and their product: 3 × intermediate.
    let mut floats = 7 * h + 3 * q + 3 * kv + 3 * i;
    if let Some(l) = lora {
        use crate::core::train_settings::LoraTarget as T;
        let r = l.rank as u64;
        for t in &l.targets {
            let (inp, out) = match t {
                T::Q => (h, q),
                T::K | T::V => (h, kv),
                T::O => (q, h),
                T::Gate | T::Up => (h, i),
                T::Down => (i, h),
            };
            floats += if composite {
                // x·A, (x·A)·B, its scaled copy and the sum with the base output; the
                // dropped-out input when dropout is on.
                r + 3 * out + if l.dropout > 0.0 { inp } else { 0 }
            } else {
                // One op over the frozen base and its adapter keeps x·A and, with dropout, a
                // byte per input of which inputs were kept (measured on SmolLM2-135M: the
                // dropout's part of a 4 × 512 step is about 70 MiB).
                r + if l.dropout > 0.0 { inp.div_ceil(4) } else { 0 }
            };
        }
    }
    floats
}

/// Positions of a `tokens`-token micro-batch that go through the head.
fn logit_rows(shape: &RunShape, tokens: u64) -> u64 {
    if !shape.fused {
        return tokens;
    }
    ((tokens as f64 * shape.trained_share.clamp(0.0, 1.0)).ceil() as u64).min(tokens)
}

/// The share of tokens trained in `samples` (trained, all), with a margin of a quarter for
/// micro-batches richer in trained tokens than the average, at most 1.
pub fn trained_share(trained: u64, tokens: u64) -> f64 {
    if tokens == 0 {
        return 1.0;
    }
    (1.25 * trained as f64 / tokens as f64).min(1.0)
}

/// The step's memory for micro-batches of `tokens` tokens (rows × row length) and `seq`-token
/// rows.
pub fn step_memory(shape: &RunShape, tokens: usize, seq: usize) -> StepMemory {
    let cfg = shape.config;
    let tokens = tokens as u64;
    let layers = cfg.num_hidden_layers as u64;
    let mut per_layer = layer_floats_per_token(cfg, shape.lora, !shape.fused) * tokens;
    if !shape.fused {
        // The composite path keeps the masked scores, their softmax and its intermediates
        // (about six t × t tensors per head), and its extra copies of every activation.
        let rows = tokens / seq.max(1) as u64;
        per_layer =
            per_layer * 2 + 6 * (cfg.num_attention_heads as u64) * rows * (seq as u64).pow(2);
    }
    let vocab = cfg.vocab_size as u64;
    let activations = if shape.checkpointing {
        // Every layer's input, and one layer's activations with their gradients while it is
        // run again going backward.
        (layers * tokens * cfg.hidden_size as u64 + 2 * per_layer) * F32
    } else {
        per_layer * layers * F32
    };
    StepMemory {
        gradients: 2 * shape.trainable * F32,
        optimizer: 2 * shape.trainable * F32,
        activations,
        logits: 2 * logit_rows(shape, tokens) * vocab * F32,
        allocator: 48 << 20,
    }
}

/// Memory the process may still take: what the kernel reports available, capped by the cgroup's
/// limit when there is one.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        * 1024;
    let cgroup = || -> Option<u64> {
        let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
        let max = max.trim().parse::<u64>().ok()?;
        let current = std::fs::read_to_string("/sys/fs/cgroup/memory.current").ok()?;
        Some(max.saturating_sub(current.trim().parse::<u64>().ok()?))
    };
    Some(cgroup().map_or(available, |c| c.min(available)))
}

/// What loading a model takes before any step: its weights as f32 (where they land in this
/// process's memory, on the CPU) and `buffers`, the bytes of the file held while it is read.
/// Refuses, with the numbers, when that is more than the memory available now, instead of
/// being killed half-way through the load.
pub fn check_load_fits(
    path: &std::path::Path,
    parameters: u64,
    on_cpu: bool,
    buffers: u64,
) -> Result<(), String> {
    let weights = if on_cpu { parameters * F32 } else { 0 };
    let needed = weights + buffers;
    match available_bytes() {
        Some(available) if needed > available => {
            Err(load_refusal(path, parameters, weights, buffers, available))
        }
        _ => Ok(()),
    }
}

fn load_refusal(
    path: &std::path::Path,
    parameters: u64,
    weights: u64,
    buffers: u64,
    available: u64,
) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    format!(
        "loading {} needs about {:.1} GiB ({:.2} billion parameters as f32: {:.1} GiB, the file's \
         buffers {:.1} GiB) but {:.1} GiB of memory is available; choose a smaller model or free \
         memory",
        path.display(),
        (weights + buffers) as f64 / GIB,
        parameters as f64 / 1e9,
        weights as f64 / GIB,
        buffers as f64 / GIB,
        available as f64 / GIB,
    )
}

/// This process's resident memory now and at its peak, in bytes.
pub fn resident_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How a run will use memory, decided before it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// Rows per micro-batch.
    pub batch_rows: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Whether activations are checkpointed per layer (chosen, or needed to fit).
    pub checkpointing: bool,
    /// What a step adds.
    pub step: StepMemory,
    /// Resident before the first step.
    pub resident: u64,
    /// What writing the model folder at the end adds (a merged copy of the weights and the
    /// file's buffer); it follows the last step, so the peak is the larger of the two.
    pub export: u64,
    /// Available to the process when planned (`None` where the system does not say).
    pub available: Option<u64>,
    /// What changed from the settings, in words.
    pub note: Option<String>,
}

impl MemoryPlan {
    /// The expected peak resident memory of the run.
    pub fn peak(&self) -> u64 {
        self.resident + self.step.total().max(self.export)
    }
}

/// Why a run cannot start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "not enough memory for this run: even one {seq}-token row per micro-batch needs {need:.0} MiB \
     more ({what}), and {available:.0} MiB are available; choose shorter rows, LoRA, or a \
     smaller model"
)]
pub struct NotEnoughMemory {
    /// Row length.
    pub seq: usize,
    /// MiB one row would need.
    pub need: f64,
    /// MiB available.
    pub available: f64,
    /// The parts, in words.
    pub what: String,
}

fn describe(m: &StepMemory) -> String {
    format!(
        "activations {:.0} MiB, logits {:.0} MiB, gradients {:.0} MiB, optimizer {:.0} MiB, \
         allocator {:.0} MiB",
        m.activations as f64 / MIB,
        m.logits as f64 / MIB,
        m.gradients as f64 / MIB,
        m.optimizer as f64 / MIB,
        m.allocator as f64 / MIB
    )
}

/// Plans `batch_rows × grad_accum` rows of `seq` tokens per step within `available` bytes
/// (keeping a tenth in reserve), halving the micro-batch and raising the accumulation — the
/// same rows per step, the same loss — until a step fits. When even one row does not fit, it
/// checkpoints activations per layer (if the shape does not already) and plans again from the
/// requested micro-batch; it refuses when one checkpointed row cannot fit either.
pub fn plan(
    shape: &RunShape,
    batch_rows: usize,
    grad_accum: usize,
    seq: usize,
    (resident, export): (u64, u64),
    available: Option<u64>,
) -> Result<MemoryPlan, NotEnoughMemory> {
    let rows_per_step = batch_rows.max(1) * grad_accum.max(1);
    let budget = available.map(|a| a - a / 10);
    let fits = |shape: &RunShape, rows: usize| {
        let step = step_memory(shape, rows * seq, seq);
        (budget.is_none_or(|b| step.total().max(export) <= b), step)
    };
    let chosen = shape.checkpointing;
    let mut shape = *shape;
    loop {
        let mut rows = batch_rows.max(1);
        loop {
            let (ok, step) = fits(&shape, rows);
            if ok {
                let mut notes = Vec::new();
                if shape.checkpointing && !chosen {
                    notes.push(format!(
                        "one {seq}-token row would not fit in the {:.0} MiB available with \
                         every layer's activations kept; checkpointing them per layer instead \
                         (each layer is run again going backward: about a third more compute)",
                        available.unwrap_or(0) as f64 / MIB,
                    ));
                }
                if rows != batch_rows.max(1) {
                    notes.push(format!(
                        "{batch_rows} rows per micro-batch would not fit in the {:.0} MiB \
                         available; training {rows} rows at a time with {} micro-batches per \
                         step instead (the same {rows_per_step} rows and loss per step)",
                        available.unwrap_or(0) as f64 / MIB,
                        rows_per_step.div_ceil(rows)
                    ));
                }
                return Ok(MemoryPlan {
                    batch_rows: rows,
                    grad_accum: rows_per_step.div_ceil(rows),
                    checkpointing: shape.checkpointing,
                    step,
                    resident,
                    export,
                    available,
                    note: (!notes.is_empty()).then(|| format!("memory: {}", notes.join("; "))),
                });
            }
            if rows == 1 {
                break;
            }
            rows = rows.div_ceil(2);
        }
        if shape.checkpointing {
            let (_, step) = fits(&shape, 1);
            return Err(NotEnoughMemory {
                seq,
                need: step.total() as f64 / MIB,
                available: budget.unwrap_or(0) as f64 / MIB,
                what: describe(&step),
            });
        }
        shape.checkpointing = true;
    }
}

/// One line on a plan, for the run's log.
pub fn summary(plan: &MemoryPlan) -> String {
    format!(
        "memory plan: {:.0} MiB resident now + {:.0} MiB per step ({}{}) = {:.0} MiB peak{}",
        plan.resident as f64 / MIB,
        plan.step.total() as f64 / MIB,
        describe(&plan.step),
        if plan.checkpointing {
            ", activations checkpointed per layer"
        } else {
            ""
        },
        plan.peak() as f64 / MIB,
        plan.available.map_or(String::new(), |a| format!(
            ", {:.0} MiB available",
            a as f64 / MIB
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::tiny(4096)
    }

    /// The tiny model's width at SmolLM2's depth, where checkpointing pays.
    fn deep() -> ModelConfig {
        ModelConfig {
            num_hidden_layers: 30,
            ..tiny()
        }
    }

    #[test]
    fn memory_grows_with_tokens_and_lora_trains_less() {
        let cfg = tiny();
        let full = RunShape {
            config: &cfg,
            trainable: 4_000_000,
            lora: None,
            fused: true,
            checkpointing: false,
            trained_share: 1.0,
        };
        let a = step_memory(&full, 512, 512);
        let b = step_memory(&full, 2048, 512);
        assert_eq!(b.activations, 4 * a.activations);
        assert_eq!(b.logits, 4 * a.logits);
        assert_eq!(a.optimizer, 2 * 4_000_000 * 4);
        // The fused head sees the trained positions only; the composite one sees all.
        let quarter = RunShape {
            trained_share: 0.25,
            ..full
        };
        assert_eq!(4 * step_memory(&quarter, 2048, 512).logits, b.logits);
        let composite_quarter = RunShape {
            fused: false,
            ..quarter
        };
        assert_eq!(step_memory(&composite_quarter, 2048, 512).logits, b.logits);
        assert_eq!(trained_share(1, 4), 0.3125);
        assert_eq!(trained_share(9, 10), 1.0);
        assert_eq!(trained_share(0, 0), 1.0);
        let composite = RunShape {
            fused: false,
            ..full
        };
        assert!(step_memory(&composite, 512, 512).activations > 2 * a.activations);
        // Checkpointing keeps one hidden-sized tensor per layer and token, and one layer's
        // activations.
        let deep = deep();
        let plain = RunShape {
            config: &deep,
            ..full
        };
        let checkpointed = RunShape {
            checkpointing: true,
            ..plain
        };
        let (p, c) = (
            step_memory(&plain, 2048, 512),
            step_memory(&checkpointed, 2048, 512),
        );
        assert!(c.activations * 5 < p.activations, "{c:?} vs {p:?}");
        assert!(c.activations > (deep.num_hidden_layers * 2048 * deep.hidden_size * 4) as u64);
    }

    #[test]
    fn a_plan_lowers_the_micro_batch_before_it_refuses() {
        let cfg = deep();
        let shape = RunShape {
            config: &cfg,
            trainable: 4_000_000,
            lora: None,
            fused: true,
            checkpointing: false,
            trained_share: 1.0,
        };
        let one = step_memory(&shape, 512, 512).total();
        let four = step_memory(&shape, 4 * 512, 512).total();
        // Room for everything: the settings stand.
        let p = plan(&shape, 4, 2, 512, (0, 0), Some(four * 2)).unwrap();
        assert_eq!((p.batch_rows, p.grad_accum, p.note.is_none()), (4, 2, true));
        // Room for two rows: two at a time, four micro-batches, the same 8 rows per step.
        let two = step_memory(&shape, 2 * 512, 512).total();
        let p = plan(&shape, 4, 2, 512, (0, 0), Some(two + two / 9 + 1)).unwrap();
        assert_eq!((p.batch_rows, p.grad_accum), (2, 4));
        assert!(p.note.unwrap().contains("2 rows at a time"));
        // Not one row with every activation kept, but room for four checkpointed ones:
        // checkpointing turns on and the settings stand.
        let checkpointed = RunShape {
            checkpointing: true,
            ..shape
        };
        let four_checkpointed = step_memory(&checkpointed, 4 * 512, 512).total();
        assert!(four_checkpointed < one, "{four_checkpointed} vs {one}");
        let p = plan(&shape, 4, 1, 512, (0, 0), Some(one)).unwrap();
        assert_eq!((p.batch_rows, p.grad_accum, p.checkpointing), (4, 1, true));
        assert!(p.note.unwrap().contains("checkpointing"));
        // Chosen in the settings: no note.
        let p = plan(&checkpointed, 4, 1, 512, (0, 0), Some(one)).unwrap();
        assert!(p.checkpointing && p.note.is_none());
        // Not even one checkpointed row: refused, with the numbers.
        let one_checkpointed = step_memory(&checkpointed, 512, 512).total();
        let e = plan(&shape, 4, 1, 512, (0, 0), Some(one_checkpointed / 2)).unwrap_err();
        assert!(e.to_string().contains("512-token row"), "{e}");
        assert!(e.need > e.available);
        // No figure from the system: the settings stand.
        assert_eq!(plan(&shape, 4, 1, 512, (0, 0), None).unwrap().batch_rows, 4);
    }
}
