//! The decoder's configuration, read from a Hugging Face `config.json` (Llama 2/3, SmolLM,
//! Qwen2/2.5, Mistral) or built for the tiny model.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Architectures the decoder implements.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "qwen2", "mistral", "smollm"];

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

/// What the decoder needs to know about a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// "llama", "qwen2", "mistral" …
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); equal to the query heads when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Size of one head; hidden_size / heads when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence the rotary tables cover.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 has it; Llama does not).
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama 3.1-style rotary frequency scaling, when the config asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llama3_rope: Option<Llama3Rope>,
    /// Token id of BOS, if the model has one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Token id(s) of EOS.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

/// Llama 3.1's rotary scaling: low frequencies divided by `factor`, high ones kept, a smooth
/// blend between.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    /// How much longer the context is than in pre-training.
    pub factor: f64,
    /// Wavelengths above original_context / low_freq_factor are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below original_context / high_freq_factor are kept.
    pub high_freq_factor: f64,
    /// The pre-training context length.
    pub original_max_position_embeddings: f64,
}

impl Llama3Rope {
    /// Scales one inverse frequency.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        let low_wavelen = self.original_max_position_embeddings / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < high_wavelen {
            inv_freq
        } else if wavelen > low_wavelen {
            inv_freq / self.factor
        } else {
            let smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

fn default_model_type() -> String {
    "llama".to_string()
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("cannot read the model config: {why} ({})", path.display())]
    Read {
        path: std::path::PathBuf,
        why: String,
    },
    /// The architecture is not one the decoder implements.
    #[error(
        "unsupported architecture \"{model_type}\": MoI Studio trains llama, qwen2, mistral and \
         smollm decoders ({})", path.display()
    )]
    Unsupported {
        path: std::path::PathBuf,
        model_type: String,
    },
    /// Sizes that do not fit together.
    #[error("inconsistent model config: {why} ({})", path.display())]
    Inconsistent {
        path: std::path::PathBuf,
        why: String,
    },
}

impl ModelConfig {
    /// Reads and checks a `config.json`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |why: String| ConfigError::Read {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| read(e.to_string()))?;
        let mut config: ModelConfig =
            serde_json::from_value(raw.clone()).map_err(|e| read(e.to_string()))?;
        // transformers 5 writes the rotary settings under `rope_parameters` (older files use
        // `rope_theta` and `rope_scaling`); only plain rotary is implemented.
        for key in ["rope_parameters", "rope_scaling"] {
            let Some(params) = raw.get(key).filter(|v| v.is_object()) else {
                continue;
            };
            if let Some(theta) = params.get("rope_theta").and_then(|v| v.as_f64()) {
                config.rope_theta = theta;
            }
            let kind = params
                .get("rope_type")
                .or_else(|| params.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            if kind == "llama3" {
                let num = |k: &str| params.get(k).and_then(|v| v.as_f64());
                match (
                    num("factor"),
                    num("low_freq_factor"),
                    num("high_freq_factor"),
                    num("original_max_position_embeddings"),
                ) {
                    (Some(factor), Some(low), Some(high), Some(original)) if high > low => {
                        config.llama3_rope = Some(Llama3Rope {
                            factor,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: original,
                        });
                    }
                    _ => {
                        return Err(ConfigError::Inconsistent {
                            path: path.to_path_buf(),
                            why: "llama3 rotary scaling needs factor, low_freq_factor, \
                                  high_freq_factor and original_max_position_embeddings"
                                .to_string(),
                        });
                    }
                }
            } else if kind != "default" {
                return Err(ConfigError::Inconsistent {
                    path: path.to_path_buf(),
                    why: format!("rotary scaling \"{kind}\" is not supported yet"),
                });
            }
        }
        if !SUPPORTED_MODEL_TYPES.contains(&config.model_type.as_str()) {
            return Err(ConfigError::Unsupported {
                path: path.to_path_buf(),
                model_type: config.model_type,
            });
        }
        if config.model_type == "qwen2" {
            // Qwen2 configs do not spell the bias out; the architecture always has it.
            config.attention_bias = true;
        }
        config.check().map_err(|why| ConfigError::Inconsistent {
            path: path.to_path_buf(),
            why,
        })?;
        Ok(config)
    }

    /// The built-in tiny model: 4 layers, width 256, 4 heads over 2 key/value heads, 512
    /// positions, tied embeddings.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            model_type: "llama".to_string(),
            vocab_size,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            attention_bias: false,
            llama3_rope: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Size of one attention head.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the sizes fit together.
    pub fn check(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return Err("a model needs at least one attention head".to_string());
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "{} query heads cannot share {} key/value heads evenly",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return Err(format!(
                "head size {} must be even for rotary embeddings",
                self.head_size()
            ));
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err(
                "vocab_size, hidden_size and num_hidden_layers must be positive".to_string(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hf_configs_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "rope_theta": 1000000.0, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let c = ModelConfig::load(&path).unwrap();
        assert!(c.attention_bias);
        assert_eq!((c.kv_heads(), c.head_size()), (2, 16));
        std::fs::write(&path, r#"{"model_type": "gpt2", "vocab_size": 1, "hidden_size": 2, "intermediate_size": 2, "num_hidden_layers": 1, "num_attention_heads": 1}"#).unwrap();
        let err = ModelConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("unsupported architecture \"gpt2\""), "{err}");
        std::fs::write(&path, r#"{"vocab_size": 1, "hidden_size": 12, "intermediate_size": 2, "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}"#).unwrap();
        let err = ModelConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("cannot share"), "{err}");
    }
}
