//! Training settings, the project's `[training]` section. Plain data, so the project file and the
//! UI can hold them without the model code.

use serde::{Deserialize, Serialize};

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

/// Training settings, the project's `[training]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainSettings {
    /// Stop after this many optimizer steps (otherwise after the mixing epochs).
    pub max_steps: Option<u64>,
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
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            max_steps: None,
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
        }
    }
}
