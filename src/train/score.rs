//! Scoring text with a model: tokens, mean negative log-likelihood and perplexity, the text
//! tokenized exactly as the model's own tokenizer does it.

use std::path::Path;

use candle_core::{D, Device, IndexOp, Tensor};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::core::template::ChatTemplate;
pub use crate::core::template::{SpecialTokens, TokenizerConfig};
use crate::train::export::CHATML_JINJA;
use crate::train::gguf::load_gguf;
use crate::train::load::{LoadedModel, load_hf_folder};
use crate::train::model::attention_mask;

/// A model with the tokenizer and BOS rule that go with it.
pub struct ModelBundle {
    /// The model and its weights.
    pub loaded: LoadedModel,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// BOS id to put first, when the tokenizer or GGUF metadata asks for one and the tokenizer
    /// does not add it itself.
    pub bos: Option<u32>,
    /// The BOS and EOS token texts chat templates see as `bos_token` / `eos_token`
    /// (`tokenizer_config.json`, or the GGUF metadata's token ids); set whether or not plain
    /// text gets a BOS, as transformers passes them.
    pub special_tokens: SpecialTokens,
    /// The chat template text, when the model carries one.
    pub chat_template: Option<String>,
}

/// A model's chat template (ChatML when it carries none) with its special tokens; `eos_fallback`
/// is the EOS text from the model config, for configs that name no `eos_token`.
fn model_template(
    chat_template: Option<&str>,
    special: &SpecialTokens,
    eos_fallback: Option<String>,
) -> anyhow::Result<ChatTemplate> {
    let source = chat_template.unwrap_or(CHATML_JINJA);
    let eos = special
        .eos
        .clone()
        .or(eos_fallback)
        .unwrap_or_else(|| "<|im_end|>".to_string());
    let bos = special.bos.clone().unwrap_or_default();
    Ok(ChatTemplate::from_source(source, &bos, &eos)?)
}

/// The text of the EOS token a model config names (`eos_token_id`, a number or a list whose
/// first entry counts).
fn eos_text(config: &crate::train::config::ModelConfig, tokenizer: &Tokenizer) -> Option<String> {
    config
        .eos_token_id
        .as_ref()
        .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
        .and_then(|id| tokenizer.id_to_token(id as u32))
}

/// The tokenizer and chat template a run of the model at `path` (a Hugging Face folder or a
/// `.gguf` file) tokenizes with, read without loading a weight: what previews must show.
pub fn model_text_side(path: &Path) -> anyhow::Result<(Tokenizer, ChatTemplate)> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let extras = crate::train::gguf::gguf_text_side(path)?;
        let special = SpecialTokens {
            bos: extras.bos_token.clone(),
            eos: extras.eos_token.clone().filter(|e| !e.is_empty()),
        };
        let template = model_template(extras.chat_template.as_deref(), &special, None)?;
        return Ok((extras.tokenizer, template));
    }
    let tok_path = path.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot read the tokenizer: {e} ({})", tok_path.display()))?;
    let config = TokenizerConfig::read_if_present(&path.join("tokenizer_config.json"))?;
    let model = crate::train::config::ModelConfig::load(&path.join("config.json"))?;
    let template = model_template(
        config.chat_template.as_deref(),
        &config.special_tokens,
        eos_text(&model, &tokenizer),
    )?;
    Ok((tokenizer, template))
}

/// Loads a model folder or a `.gguf` file with its tokenizer.
pub fn load_bundle(path: &Path, device: &Device) -> anyhow::Result<ModelBundle> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        let (loaded, extras) = load_gguf(path, device)?;
        let bos = if extras.add_bos {
            loaded.config.bos_token_id
        } else {
            None
        };
        let special_tokens = SpecialTokens {
            bos: loaded
                .config
                .bos_token_id
                .and_then(|id| extras.tokenizer.id_to_token(id)),
            eos: extras.eos_token.clone().filter(|e| !e.is_empty()),
        };
        return Ok(ModelBundle {
            loaded,
            tokenizer: extras.tokenizer,
            bos,
            special_tokens,
            chat_template: extras.chat_template,
        });
    }
    let loaded = load_hf_folder(path, device)?;
    let tok_path = path.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot read the tokenizer: {e} ({})", tok_path.display()))?;
    let config = TokenizerConfig::read_if_present(&path.join("tokenizer_config.json"))?;
    // HF tokenizers add BOS through their post-processor; where the config asks for a BOS the
    // post-processor does not add, `encode` puts it first (as transformers' Llama tokenizers do).
    let bos = match config.add_bos_token {
        Some(true) => config
            .special_tokens
            .bos
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t)),
        _ => None,
    };
    Ok(ModelBundle {
        loaded,
        tokenizer,
        bos,
        special_tokens: config.special_tokens,
        chat_template: config.chat_template,
    })
}

impl ModelBundle {
    /// The model's chat template (ChatML when it carries none) with its BOS and EOS tokens.
    pub fn template(&self) -> anyhow::Result<ChatTemplate> {
        model_template(
            self.chat_template.as_deref(),
            &self.special_tokens,
            eos_text(&self.loaded.config, &self.tokenizer),
        )
    }

    /// Token ids of `text` as the model's tokenizer makes them (BOS included where it says so):
    /// what transformers' tokenizer gives, a BOS put first where the model asks for one and the
    /// tokenizer's post-processor does not add it itself.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encode = |special: bool| {
            self.tokenizer
                .encode(text, special)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))
        };
        let mut ids = encode(true)?.get_ids().to_vec();
        if let Some(bos) = self.bos
            && ids.len() == encode(false)?.len()
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }
}

/// The score of a text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// Tokens in the text.
    pub tokens: usize,
    /// Mean negative log-likelihood of each token given those before it (nats).
    pub nll: f64,
    /// exp(nll).
    pub ppl: f64,
}

/// The model's logits at every position of `ids` (one row, full attention), for comparing with
/// another implementation.
pub fn logits_of(bundle: &ModelBundle, ids: &[u32]) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(decoder_logits(&bundle.loaded.model, ids)?)
}

/// A decoder's logits at every position of `ids` (one row, full attention).
pub fn decoder_logits(
    model: &crate::train::model::Decoder,
    ids: &[u32],
) -> candle_core::Result<Vec<Vec<f32>>> {
    let device = model.device();
    let t = ids.len();
    let input = Tensor::new(ids, device)?.unsqueeze(0)?;
    let positions = Tensor::arange(0u32, t as u32, device)?.unsqueeze(0)?;
    let mask = attention_mask(&[vec![0; t]], t, device)?;
    model
        .forward(&input, &positions, &mask)?
        .i(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()
}

/// Scores `ids` with one forward pass (the text must fit the model's context).
pub fn score_ids(bundle: &ModelBundle, ids: &[u32]) -> anyhow::Result<Score> {
    let model = &bundle.loaded.model;
    let limit = model.config.max_position_embeddings;
    if ids.len() < 2 {
        anyhow::bail!("the text has {} token(s); at least 2 are needed", ids.len());
    }
    if ids.len() > limit {
        anyhow::bail!(
            "the text has {} tokens, more than the model's {limit}",
            ids.len()
        );
    }
    let device = model.device();
    let t = ids.len();
    let input = Tensor::new(ids, device)?.unsqueeze(0)?;
    let positions = Tensor::arange(0u32, t as u32, device)?.unsqueeze(0)?;
    let mask = attention_mask(&[vec![0; t]], t, device)?;
    let logits = model.forward(&input, &positions, &mask)?.i(0)?;
    let logits = logits.narrow(0, 0, t - 1)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let targets = Tensor::new(&ids[1..], device)?.unsqueeze(1)?;
    let picked = log_probs.gather(&targets, 1)?.squeeze(1)?;
    let nll = -f64::from(picked.mean_all()?.to_scalar::<f32>()?);
    Ok(Score {
        tokens: t,
        nll,
        ppl: nll.exp(),
    })
}
