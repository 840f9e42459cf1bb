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
    /// The weights would not fit in the memory available.
    #[error("{0}")]
    Memory(String),
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
pub(crate) fn unpermute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// The HF weight name for a GGUF tensor name of the llama layout.
pub(crate) fn hf_name(gguf: &str) -> Option<String> {
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

/// The pre-tokenizer split of Llama 3 (`llama-bpe`): contractions, words, runs of up to three
/// digits, punctuation, new lines and spaces.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: as Llama 3's, with every digit on its own.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (`tokenizer.ggml.token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Rebuilds the tokenizer from `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`, with the
/// `gpt2`, `smollm`, `llama-bpe` and `qwen2` pre-tokenizers) or a SentencePiece vocabulary
/// (`llama`: Llama 2, Mistral, TinyLlama).
fn tokenizer_from_meta(meta: &Meta) -> Result<Tokenizer, GgufError> {
    let model = meta.string("tokenizer.ggml.model")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match meta.get("tokenizer.ggml.token_type") {
        Ok(v) => v
            .to_vec()
            .map_err(|e| meta.err(format!("\"tokenizer.ggml.token_type\": {e}")))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(TOKEN_NORMAL))
            .collect(),
        Err(_) => vec![TOKEN_NORMAL; tokens.len()],
    };
    let mut tokenizer = match model.as_str() {
        "gpt2" => byte_level_tokenizer(meta, &tokens)?,
        "llama" => sentencepiece_tokenizer(meta, &tokens, &types)?,
        other => {
            return Err(meta.err(format!(
                "tokenizer model \"{other}\" is not supported (byte-level BPE \"gpt2\" and \
                 SentencePiece \"llama\" are)"
            )));
        }
    };
    // Control and user-defined tokens are matched whole in raw text, as special tokens.
    let special: Vec<AddedToken> = types
        .iter()
        .zip(&tokens)
        .filter(|(t, _)| **t == TOKEN_CONTROL || **t == TOKEN_USER_DEFINED)
        .map(|(_, tok)| AddedToken::from(tok.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| meta.err(format!("adding the control tokens: {e}")))?;
    Ok(tokenizer)
}

/// Byte-level BPE with the pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_tokenizer(meta: &Meta, tokens: &[String]) -> Result<Tokenizer, GgufError> {
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
    // The BPE builder indexes a buffer by the merged token's length and panics on a merge
    // whose halves or result are not tokens; such a file is refused here instead (found by
    // fuzzing: fuzz/regressions/gguf_header).
    if let Some((i, (a, b))) = merges.iter().enumerate().find(|(_, (a, b))| {
        !(vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}")))
    }) {
        return Err(meta.err(format!(
            "tokenizer.ggml.merges entry {} (\"{a} {b}\") joins tokens that are not in the \
             vocabulary",
            i + 1
        )));
    }
    let pre = meta
        .string("tokenizer.ggml.pre")
        .unwrap_or_else(|_| "gpt2".to_string());
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, GgufError> {
        let regex = tokenizers::pre_tokenizers::split::SplitPattern::Regex(pattern.to_string());
        let split = tokenizers::pre_tokenizers::split::Split::new(
            regex,
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.err(format!("building the {pre} pre-tokenizer: {e}")))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        // SmolLM splits every digit on its own before the GPT-2 byte-level split.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt2" | "default" => byte_level.into(),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT)?,
        "qwen2" => split(QWEN2_SPLIT)?,
        other => {
            return Err(meta.err(format!(
                "pre-tokenizer \"{other}\" is not supported (gpt2, smollm, llama-bpe and qwen2 \
                 are)"
            )));
        }
    };
    // Llama 3 takes a pre-token found whole in the vocabulary as it is, before any merge.
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre == "llama-bpe" || pre == "llama3")
        .build()
        .map_err(|e| meta.err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        tokenizer
            .with_normalizer(Some(tokenizers::normalizers::unicode::NFC))
            .map_err(|e| meta.err(format!("normalizer: {e}")))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// A SentencePiece vocabulary (pieces, scores, types) as the BPE with byte fallback that
/// Hugging Face builds for Llama 2 and Mistral: a merge for every split of a piece into two
/// pieces, ranked by the merged piece's score; spaces as `▁`, one put in front of the text.
fn sentencepiece_tokenizer(
    meta: &Meta,
    tokens: &[String],
    types: &[i32],
) -> Result<Tokenizer, GgufError> {
    let scores: Vec<f32> = match meta.get("tokenizer.ggml.scores") {
        Ok(v) => v
            .to_vec()
            .map_err(|e| meta.err(format!("\"tokenizer.ggml.scores\": {e}")))?
            .iter()
            .map(|s| s.to_f32().unwrap_or(0.0))
            .collect(),
        Err(_) => return Err(meta.err("a SentencePiece vocabulary needs scores".to_string())),
    };
    if scores.len() != tokens.len() {
        return Err(meta.err(format!(
            "{} token scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    // (score of the merged piece, its id, left id, right id) → best first.
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(TOKEN_NORMAL) != TOKEN_NORMAL {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..at]), vocab.get(&piece[at..])) {
                ranked.push((scores[id], id as u32, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|&(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect();
    let unk = meta
        .u32("tokenizer.ggml.unknown_token_id")
        .ok()
        .and_then(|id| tokens.get(id as usize).cloned())
        .unwrap_or_else(|| "<unk>".to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(
            tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| meta.err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    use tokenizers::normalizers::{Prepend, Replace};
    let add_space_prefix = meta
        .get("tokenizer.ggml.add_space_prefix")
        .ok()
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let replace =
        Replace::new(" ", "\u{2581}").map_err(|e| meta.err(format!("normalizer: {e}")))?;
    let normalizer: tokenizers::NormalizerWrapper = if add_space_prefix {
        tokenizers::normalizers::Sequence::new(vec![
            Prepend::new("\u{2581}".to_string()).into(),
            replace.into(),
        ])
        .into()
    } else {
        replace.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| meta.err(format!("normalizer: {e}")))?;
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as DecoderSequence,
        strip::Strip,
    };
    let space = tokenizers::normalizers::Replace::new("\u{2581}", " ")
        .map_err(|e| meta.err(format!("decoder: {e}")))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        space.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', usize::from(add_space_prefix), 0).into(),
    ])));
    Ok(tokenizer)
}

/// The rotary scaling a GGUF file declares: `llama.rope.scaling.type` in the metadata, and
/// llama.cpp's `rope_freqs.weight` (one divisor per frequency) for Llama 3.1-style scaling,
/// which is read back into its factors. Scalings the decoder does not implement are refused
/// with their name.
fn rope_scaling(
    meta: &Meta,
    content: &Content,
    file: &mut std::fs::File,
    config: &ModelConfig,
) -> Result<Option<crate::train::config::Llama3Rope>, GgufError> {
    if let Ok(kind) = meta.string("llama.rope.scaling.type")
        && kind != "none"
    {
        let factor = meta.f32("llama.rope.scaling.factor").unwrap_or(1.0);
        if factor != 1.0 {
            return Err(meta.err(format!(
                "rotary scaling \"{kind}\" (factor {factor}) is not supported yet; Llama 3.1's \
                 (rope_freqs) is"
            )));
        }
    }
    if !content.tensor_infos.contains_key("rope_freqs.weight") {
        return Ok(None);
    }
    let divisors: Vec<f32> = content
        .tensor(file, "rope_freqs.weight", &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1())
        .map_err(|e| meta.err(format!("\"rope_freqs.weight\": {e}")))?;
    if divisors.iter().all(|&d| (d - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    // Llama 3.1 and 3.2 scale with low/high frequency factors 1 and 4 from their pre-training
    // context; take the factor from the divisors and check every one of them.
    let factor = f64::from(divisors.iter().copied().fold(1.0, f32::max));
    let original = meta
        .u32("llama.rope.scaling.original_context_length")
        .map(f64::from)
        .unwrap_or(8192.0);
    let rope = crate::train::config::Llama3Rope {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: original,
    };
    let head_dim = config.hidden_size / config.num_attention_heads.max(1);
    let dims = meta
        .u32("llama.rope.dimension_count")
        .map(|d| d as usize)
        .unwrap_or(head_dim);
    if divisors.len() * 2 != dims {
        return Err(meta.err(format!(
            "\"rope_freqs.weight\" has {} divisors for {dims} rotary dimensions",
            divisors.len()
        )));
    }
    for (i, &d) in divisors.iter().enumerate() {
        let inv_freq = config.rope_theta.powf(-((2 * i) as f64) / dims as f64);
        let ours = inv_freq / rope.scale(inv_freq);
        if (ours - f64::from(d)).abs() > 1e-3 * f64::from(d) {
            return Err(meta.err(format!(
                "\"rope_freqs.weight\" is not Llama 3.1's rotary scaling (divisor {i} is {d}, \
                 expected {ours:.4}); it is not supported yet"
            )));
        }
    }
    Ok(Some(rope))
}

/// The tokenizer, chat template and special tokens of a GGUF file's metadata.
fn gguf_extras(meta: &Meta, tokenizer: Tokenizer) -> GgufExtras {
    let token_text = |key: &str| meta.u32(key).ok().and_then(|id| tokenizer.id_to_token(id));
    GgufExtras {
        chat_template: meta.string("tokenizer.chat_template").ok(),
        bos_token: token_text("tokenizer.ggml.bos_token_id"),
        eos_token: token_text("tokenizer.ggml.eos_token_id"),
        add_bos: meta
            .get("tokenizer.ggml.add_bos_token")
            .ok()
            .and_then(|v| v.to_bool().ok())
            .unwrap_or_else(|| {
                // Files without the key: llama.cpp's defaults (SentencePiece and Llama 3 add one).
                let model = meta.string("tokenizer.ggml.model").unwrap_or_default();
                let pre = meta.string("tokenizer.ggml.pre").unwrap_or_default();
                model == "llama" || matches!(pre.as_str(), "llama-bpe" | "llama3")
            }),
        tokenizer,
    }
}

/// Opens a GGUF file and reads its header (metadata and tensor index).
fn read_header(path: &Path) -> Result<(std::fs::File, Content), GgufError> {
    let read_err = |why: String| GgufError::Read {
        path: path.to_path_buf(),
        why,
    };
    let mut file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    let content = Content::read(&mut file).map_err(|e| read_err(e.to_string()))?;
    Ok((file, content))
}

/// The text side of a GGUF file — tokenizer, chat template, special tokens — read from its
/// header without loading a weight, for previews.
pub fn gguf_text_side(path: &Path) -> Result<GgufExtras, GgufError> {
    let (_file, content) = read_header(path)?;
    text_side_of(&content, path)
}

/// [`gguf_text_side`] for a GGUF header held in any reader; `path` is only used in messages.
pub fn gguf_text_side_from<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    path: &Path,
) -> Result<GgufExtras, GgufError> {
    let content = Content::read(reader).map_err(|e| GgufError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    text_side_of(&content, path)
}

fn text_side_of(content: &Content, path: &Path) -> Result<GgufExtras, GgufError> {
    let meta = Meta {
        map: &content.metadata,
        path,
    };
    let tokenizer = tokenizer_from_meta(&meta)?;
    Ok(gguf_extras(&meta, tokenizer))
}

/// The context length a GGUF file declares (`llama.context_length`, 2,048 when absent), read
/// from its header alone.
pub fn gguf_context_length(path: &Path) -> anyhow::Result<usize> {
    let (_file, content) = read_header(path)?;
    let meta = Meta {
        map: &content.metadata,
        path,
    };
    Ok(meta
        .u32("llama.context_length")
        .map(|x| x as usize)
        .unwrap_or(2048))
}

/// Loads a llama-architecture GGUF file as trainable f32 weights, with its tokenizer.
pub fn load_gguf(path: &Path, device: &Device) -> Result<(LoadedModel, GgufExtras), GgufError> {
    let read_err = |why: String| GgufError::Read {
        path: path.to_path_buf(),
        why,
    };
    let (mut file, content) = read_header(path)?;
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
    let mut config = ModelConfig {
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
    config.llama3_rope = rope_scaling(&meta, &content, &mut file, &config)?;
    config.check().map_err(|why| meta.err(why))?;
    // Tensors are read one at a time: the f32 weights and the largest quantized tensor.
    let largest = content
        .tensor_infos
        .values()
        .map(|t| {
            (t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
        })
        .max()
        .unwrap_or(0);
    crate::train::memory::check_load_fits(
        path,
        crate::train::load::parameter_count(&config),
        device.is_cpu(),
        2 * largest,
    )
    .map_err(GgufError::Memory)?;

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
    let extras = gguf_extras(&meta, tokenizer);
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
