//! The project's mixing and packing settings (its `[mixing]` and `[packing]` sections): one
//! home that the project file and the engine both read.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::core::sampling::Strategy;
use crate::core::template::TemplateChoice;

/// Which tokens get labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LabelOptions {
    /// Train on every token (system and user text too), not only on the answers.
    pub train_on_prompt: bool,
    /// Train only the last assistant turn of each conversation.
    pub last_turn_only: bool,
}

/// The sampling strategy as stored in the project file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Natural proportions.
    Natural,
    /// Equal samples per task.
    #[default]
    Balanced,
    /// size^(1/T).
    Temperature,
    /// Task weights.
    Weights,
}

/// Mixing settings, the project's `[mixing]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixSettings {
    /// Sampling strategy for the `balanced` and `moi` modes.
    pub strategy: StrategyKind,
    /// Temperature for the temperature strategy.
    pub temperature: f64,
    /// Epochs to train.
    pub epochs: u32,
    /// Chat template.
    pub template: TemplateChoice,
    /// A `tokenizer.json` (relative to the project file); the built-in tokenizer when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// The `tokenizer_config.json` holding the chat template, for `template = "tokenizer"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer_config: Option<PathBuf>,
    /// Which tokens are trained.
    pub labels: LabelOptions,
}

impl Default for MixSettings {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::Balanced,
            temperature: 2.0,
            epochs: 1,
            template: TemplateChoice::Chatml,
            tokenizer: None,
            tokenizer_config: None,
            labels: LabelOptions::default(),
        }
    }
}

impl MixSettings {
    /// The sampling strategy these settings describe.
    pub fn strategy(&self) -> Strategy {
        match self.strategy {
            StrategyKind::Natural => Strategy::Natural,
            StrategyKind::Balanced => Strategy::Balanced,
            StrategyKind::Temperature => Strategy::Temperature {
                t: self.temperature,
            },
            StrategyKind::Weights => Strategy::Weights,
        }
    }
}

/// The paper's packing variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackMode {
    /// One conversation per row.
    Seq,
    /// Samples in natural proportions, packed.
    Concat,
    /// Balanced sampling, then packing.
    Balanced,
    /// Balanced chunks of one instruction per task, the default system prompt first in each row.
    #[default]
    Moi,
}

impl PackMode {
    /// Every mode, in the paper's order.
    pub const ALL: [PackMode; 4] = [
        PackMode::Seq,
        PackMode::Concat,
        PackMode::Balanced,
        PackMode::Moi,
    ];

    /// The sampling strategy this mode implies, given the user's choice for the balanced modes.
    pub fn strategy(self, chosen: Strategy) -> Strategy {
        match self {
            PackMode::Seq | PackMode::Concat => Strategy::Natural,
            PackMode::Balanced | PackMode::Moi => chosen,
        }
    }

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            PackMode::Seq => "seq",
            PackMode::Concat => "concat",
            PackMode::Balanced => "balanced",
            PackMode::Moi => "moi",
        }
    }
}

impl std::str::FromStr for PackMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PackMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("unknown packing mode '{s}': expected seq, concat, balanced or moi")
            })
    }
}

/// Who may attend to whom inside a row.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AttentionLayout {
    /// Causal across the whole row.
    Full,
    /// Each instruction sees only itself (and the row's default-prompt prefix).
    Isolated,
    /// Each chunk of instructions sees only itself (and the prefix).
    #[default]
    Chunk,
}

/// What to do with a sample longer than a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    /// Keep its first tokens.
    #[default]
    Truncate,
    /// Cut it into row-sized pieces.
    Split,
    /// Leave it out.
    Drop,
}

/// Packing settings, saved in the project's `[packing]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PackSettings {
    /// The variant.
    pub mode: PackMode,
    /// Longest row in tokens.
    pub max_seq_len: usize,
    /// Instructions per chunk in `moi` mode; 0 means one per task.
    pub chunk_size: usize,
    /// In `moi` mode, answer each row's first instruction under the default prompt instead of
    /// its own task prompt.
    pub first_under_default: bool,
    /// Attention layout carried to the trainer as segment ids.
    pub attention: AttentionLayout,
    /// Restart position ids at each segment (after the shared prefix).
    pub reset_position_ids: bool,
    /// Over-long samples.
    pub overlong: Overlong,
}

impl PackSettings {
    /// Cuts rows to a model that reads at most `context` tokens, as the trainer does; returns
    /// the note to show when it did.
    pub fn fit_context(&mut self, context: usize) -> Option<String> {
        if context == 0 || self.max_seq_len <= context {
            return None;
        }
        let note = format!(
            "rows cut to {context} tokens, the model's longest sequence (packing.max_seq_len is {})",
            self.max_seq_len
        );
        self.max_seq_len = context;
        Some(note)
    }
}

impl Default for PackSettings {
    /// The MoI v2 recipe: `moi` rows with chunk attention.
    fn default() -> Self {
        Self {
            mode: PackMode::default(),
            max_seq_len: 2048,
            chunk_size: 0,
            first_under_default: false,
            attention: AttentionLayout::default(),
            reset_position_ids: false,
            overlong: Overlong::Truncate,
        }
    }
}
