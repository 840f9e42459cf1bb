//! Training settings, the project's `[training]` section. Plain data, so the project file and the
//! UI can hold them without the model code.

use serde::{Deserialize, Serialize};

pub use crate::core::phases::PhaseSettings;

/// Optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// How the learning rate decays after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Half a cosine down to the floor.
    #[default]
    Cosine,
    /// A straight line down to the floor.
    Linear,
    /// No decay.
    Constant,
}

/// How the loss averages over trained tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNorm {
    /// Mean over every trained token of the batch.
    #[default]
    TokenMean,
    /// Mean per sample, then mean over samples.
    SampleMean,
}

/// Which implementation of attention, norms, activations and the loss a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernels {
    /// Fused CPU kernels with their own backward passes (f32 on the CPU; elsewhere the
    /// composite forms run and the run's start says so).
    #[default]
    Fused,
    /// Candle's element-wise ops composed: slower, kept to compare against and to fall back on.
    Composite,
}

/// Training settings, the project's `[training]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSettings {
    /// The model a run trains when none is chosen: a Hugging Face folder or a .gguf file,
    /// relative to the project file; absent, the built-in tiny model.
    pub model: Option<std::path::PathBuf>,
    /// Stop after this many optimizer steps (otherwise after the mixing epochs).
    pub max_steps: Option<u64>,
    /// Stop once this many non-padding tokens were trained on (an ablation's budget); the
    /// schedule plans for it. Overrides `max_steps`.
    pub max_tokens: Option<u64>,
    /// Also evaluate each time this many more non-padding tokens were trained on (0 = off), so
    /// runs with different packing are compared at the same token counts.
    pub eval_every_tokens: u64,
    /// Packed rows per micro-batch.
    pub batch_rows: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Decay after warm-up.
    pub decay: Decay,
    /// Final learning rate as a share of the peak.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip_grad_norm: f64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Loss normalisation.
    pub loss_norm: LossNorm,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_every_steps: u64,
    /// Held-out records per task scored for loss and token accuracy (at most).
    pub eval_items: usize,
    /// Held-out records per task answered by greedy generation for exact match (at most).
    pub eval_generate: usize,
    /// Stop after this many evaluations without a better eval loss (0 = never).
    pub early_stopping_patience: u32,
    /// Low-rank adapters instead of full fine-tuning.
    pub lora: LoraSettings,
    /// The built-in tiny model's size, where a project wants another than
    /// `presets/tiny_model.json`'s.
    pub tiny: TinySize,
    /// Fused kernels or the composite ops.
    pub kernels: Kernels,
    /// Keep only each layer's input through the forward pass and recompute the layer's
    /// activations going backward: about a third more compute for a fraction of the
    /// activation memory (long rows, big models). The memory plan also turns it on by itself
    /// when even one row would not fit otherwise, and says so.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub activation_checkpointing: bool,
    /// Difficulty-phased training (one phase: off).
    #[serde(skip_serializing_if = "PhaseSettings::is_off")]
    pub phases: PhaseSettings,
}

/// Overrides of the built-in tiny model's size (`[training.tiny]`); absent fields keep the
/// preset's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TinySize {
    /// Width (the MLP is 2.7× as wide; 4 heads, 2 of them for keys and values).
    pub hidden_size: Option<usize>,
    /// Decoder layers.
    pub layers: Option<usize>,
}

/// A linear layer LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LoraTarget {
    /// Attention query.
    #[serde(rename = "q_proj")]
    Q,
    /// Attention key.
    #[serde(rename = "k_proj")]
    K,
    /// Attention value.
    #[serde(rename = "v_proj")]
    V,
    /// Attention output.
    #[serde(rename = "o_proj")]
    O,
    /// MLP gate.
    #[serde(rename = "gate_proj")]
    Gate,
    /// MLP up.
    #[serde(rename = "up_proj")]
    Up,
    /// MLP down.
    #[serde(rename = "down_proj")]
    Down,
}

impl LoraTarget {
    /// Every target, in model order.
    pub const ALL: [LoraTarget; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The module name, as in Hugging Face checkpoints and PEFT configs.
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "q_proj",
            Self::K => "k_proj",
            Self::V => "v_proj",
            Self::O => "o_proj",
            Self::Gate => "gate_proj",
            Self::Up => "up_proj",
            Self::Down => "down_proj",
        }
    }
}

/// LoRA settings: `W x + (alpha / rank) · B A dropout(x)` on each target, base weights frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraSettings {
    /// Train adapters instead of every weight.
    pub enabled: bool,
    /// Rank of A and B.
    pub rank: usize,
    /// Scale numerator: the update is multiplied by alpha / rank.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Which linear layers get adapters.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: vec![LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O],
        }
    }
}

impl LoraSettings {
    /// The update's scale, alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank.max(1) as f64
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            model: None,
            max_steps: None,
            max_tokens: None,
            eval_every_tokens: 0,
            batch_rows: 4,
            grad_accum: 1,
            lr: 1e-3,
            warmup_steps: 10,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
            clip_grad_norm: 1.0,
            adamw: AdamWConfig::default(),
            loss_norm: LossNorm::TokenMean,
            checkpoint_every: 0,
            eval_every_steps: 0,
            eval_items: 64,
            eval_generate: 4,
            early_stopping_patience: 0,
            lora: LoraSettings::default(),
            tiny: TinySize::default(),
            kernels: Kernels::Fused,
            activation_checkpointing: false,
            phases: PhaseSettings::default(),
        }
    }
}

/// Which of the training settings a person types can be wrong on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingField {
    /// `training.lr`.
    LearningRate,
    /// `training.batch_rows`.
    BatchRows,
    /// `training.grad_accum`.
    GradAccum,
}

impl TrainSettings {
    /// The reason each setting cannot be trained with, and whether it applies: what the Train
    /// tab shows at the field, what `Project::validate` refuses.
    pub fn problems(&self) -> [(&'static str, bool); 3] {
        [
            (
                "training.lr: the learning rate must be above 0 (at 0 nothing is learned)",
                !(self.lr.is_finite() && self.lr > 0.0),
            ),
            (
                "training.batch_rows: a batch needs at least 1 row",
                self.batch_rows == 0,
            ),
            (
                "training.grad_accum: accumulation must be at least 1 batch",
                self.grad_accum == 0,
            ),
        ]
    }

    /// Every reason the settings cannot be trained with; empty when they can.
    pub fn refusals(&self) -> Vec<&'static str> {
        self.problems()
            .into_iter()
            .filter_map(|(why, bad)| bad.then_some(why))
            .collect()
    }

    /// Why `field` cannot be used as it is, if it cannot.
    pub fn problem(&self, field: SettingField) -> Option<&'static str> {
        let (why, bad) = self.problems()[field as usize];
        bad.then_some(why)
    }
}
