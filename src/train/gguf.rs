//! Loading a llama-architecture GGUF file (what llama.cpp and Ollama users have): weights
//! dequantized to f32 with llama.cpp's Q/K permutation undone for rotate-half rotary, the
//! tokenizer rebuilt from the metadata, and the chat template taken from it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::train::config::ModelConfig;
use crate::train::load::LoadedModel;
use crate::train::model::{Decoder, weight_shapes};

/// Why a GGUF file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Reading or parsing the file failed.
    #[error("cannot read the GGUF file: {why} ({})", path.display())]
    Read { path: PathBuf, why: String },
    /// The metadata lacks something needed.
    #[error("GGUF metadata: {why} ({})", path.display())]
    Metadata { path: PathBuf, why: String },
    /// Not a llama-architecture model.
    #[error("unsupported GGUF architecture \"{arch}\": only llama is read ({})", path.display())]
    Architecture { path: PathBuf, arch: String },
    /// A tensor is missing or has the wrong shape.
    #[error("GGUF tensor \"{name}\": {why} ({})", path.display())]
    Tensor {
        path: PathBuf,
        name: String,
        why: String,
    },
}

/// What a GGUF file holds besides the weights: its tokenizer and chat template.
pub struct GgufExtras {
    /// The tokenizer rebuilt from `tokenizer.ggml.*`.
    pub tokenizer: Tokenizer,
    /// `tokenizer.chat_template`, if present.
    pub chat_template: Option<String>,
    /// BOS token text, if the model has one.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// Whether the tokenizer adds BOS in front of text (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
}

struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, why: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.to_path_buf(),
            why,
        }
    }

    fn get(&self, key: &str) -> Result<&Value, GgufError> {
        self.map
            .get(key)
            .ok_or_else(|| self.err(format!("missing \"{key}\"")))
    }

    fn u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.get(key)?;
        v.to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| self.err(format!("\"{key}\": {e}")))
    }

    fn f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get(key)?
            .to_f32()
            .map_err(|e| self.err(format!("\"{key}\": {e}")))
    }

    fn string(&self, key: &str) -> Result<String, GgufError> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|e| self.err(format!("\"{key}\": {e}")))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, GgufError> {
        self.get(key)?
            .to_vec()
            .map_err(|e| self.err(format!("\"{key}\": {e}")))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| self.err(format!("\"{key}\": {e}")))
            })
            .collect()
    }
}

/// Undoes llama.cpp's permutation of Q or K rows (made for its interleaved rotary) so the
/// weights fit rotate-half rotary: rows grouped `[head, pair, 2]` go back to `[head, 2, pair]`.
fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// The HF weight name for a GGUF tensor name of the llama layout.
fn hf_name(gguf: &str) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let mapped = match name {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{mapped}"))
}

/// Rebuilds a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata.
fn tokenizer_from_meta(meta: &Meta) -> Result<Tokenizer, GgufError> {
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(meta.err(format!(
            "tokenizer model \"{model}\" is not supported (only byte-level BPE, \"gpt2\")"
        )));
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| meta.err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = meta
        .string("tokenizer.ggml.pre")
        .unwrap_or_else(|_| "gpt2".to_string());
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        // SmolLM splits every digit on its own before the GPT-2 byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "default" => byte_level.into(),
        other => {
            return Err(meta.err(format!(
                "pre-tokenizer \"{other}\" is not supported yet (smollm and gpt2 are)"
            )));
        }
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Control tokens (type 3) are matched whole in raw text, as special tokens.
    if let Ok(types) = meta.get("tokenizer.ggml.token_type").and_then(|v| {
        v.to_vec()
            .map_err(|e| meta.err(format!("\"tokenizer.ggml.token_type\": {e}")))
    }) {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().is_ok_and(|x| x == 3 || x == 4))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| meta.err(format!("adding the control tokens: {e}")))?;
    }
    Ok(tokenizer)
}

/// Loads a llama-architecture GGUF file as trainable f32 weights, with its tokenizer.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(LoadedModel, GgufExtras), GgufError> {
    let read_err = |why: String| GgufError::Read {
        path: path.to_path_buf(),
        why,
    };
    let mut file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    let content = Content::read(&mut file).map_err(|e| read_err(e.to_string()))?;
    let meta = Meta {
        map: &content.metadata,
        path,
    };
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::Architecture {
            path: path.to_path_buf(),
            arch,
        });
    }
    let tokenizer = tokenizer_from_meta(&meta)?;
    let heads = meta.u32("llama.attention.head_count")? as usize;
    let kv_heads = meta
        .u32("llama.attention.head_count_kv")
        .map(|x| x as usize)
        .unwrap_or(heads);
    let vocab_size = tokenizer.get_vocab_size(true);
    let tied = !content.tensor_infos.contains_key("output.weight");
    let token_id = |key: &str| meta.u32(key).ok();
    let config = ModelConfig {
        model_type: "llama".to_string(),
        vocab_size: meta
            .u32("llama.vocab_size")
            .map(|x| x as usize)
            .unwrap_or(vocab_size),
        hidden_size: meta.u32("llama.embedding_length")? as usize,
        intermediate_size: meta.u32("llama.feed_forward_length")? as usize,
        num_hidden_layers: meta.u32("llama.block_count")? as usize,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        rms_norm_eps: f64::from(meta.f32("llama.attention.layer_norm_rms_epsilon")?),
        rope_theta: meta
            .f32("llama.rope.freq_base")
            .map(f64::from)
            .unwrap_or(10_000.0),
        max_position_embeddings: meta
            .u32("llama.context_length")
            .map(|x| x as usize)
            .unwrap_or(2048),
        tie_word_embeddings: tied,
        attention_bias: false,
        llama3_rope: None,
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id: token_id("tokenizer.ggml.eos_token_id").map(serde_json::Value::from),
    };
    config.check().map_err(|why| meta.err(why))?;

    let expected: HashMap<String, Vec<usize>> = weight_shapes(&config).into_iter().collect();
    let weights = VarMap::new();
    {
        let mut data = weights
            .data()
            .lock()
            .map_err(|_| read_err("weight map lock poisoned".to_string()))?;
        for gguf_name in content.tensor_infos.keys() {
            let Some(name) = hf_name(gguf_name) else {
                continue;
            };
            let Some(shape) = expected.get(&name) else {
                continue;
            };
            let tensor_err = |why: String| GgufError::Tensor {
                path: path.to_path_buf(),
                name: gguf_name.clone(),
                why,
            };
            let q = content
                .tensor(&mut file, gguf_name, &Device::Cpu)
                .map_err(|e| tensor_err(e.to_string()))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| tensor_err(e.to_string()))?;
            if t.dims() != shape.as_slice() {
                return Err(tensor_err(format!(
                    "shape {:?}, the metadata needs {:?}",
                    t.dims(),
                    shape
                )));
            }
            if gguf_name.ends_with("attn_q.weight") {
                t = unpermute(&t, heads).map_err(|e| tensor_err(e.to_string()))?;
            } else if gguf_name.ends_with("attn_k.weight") {
                t = unpermute(&t, kv_heads).map_err(|e| tensor_err(e.to_string()))?;
            }
            let t = t
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(device))
                .map_err(|e| tensor_err(e.to_string()))?;
            let var = Var::from_tensor(&t).map_err(|e| tensor_err(e.to_string()))?;
            data.insert(name, var);
        }
        for name in expected.keys() {
            if !data.contains_key(name) {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    why: "missing from the file".to_string(),
                });
            }
        }
    }
    let vb = VarBuilder::from_varmap(&weights, DType::F32, device);
    let model = Decoder::new(&config, vb).map_err(|e| read_err(e.to_string()))?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
    let extras = GgufExtras {
        chat_template: meta.string("tokenizer.chat_template").ok(),
        bos_token: token_text(config.bos_token_id),
        eos_token: token_text(token_id("tokenizer.ggml.eos_token_id")),
        add_bos: meta
            .get("tokenizer.ggml.add_bos_token")
            .ok()
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        tokenizer,
    };
    Ok((
        LoadedModel {
            model,
            weights,
            config,
        },
        extras,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, in).swapaxes(1, 2).reshape(out, in).
        let (heads, half, inp) = (2, 3, 1);
        let out = heads * 2 * half;
        let w = Tensor::arange(0f32, out as f32, &Device::Cpu)
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let permuted = w
            .reshape((heads, 2, half, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((out, inp))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
