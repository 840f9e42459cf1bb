//! Scoring text with a model: tokens, mean negative log-likelihood and perplexity, the text
//! tokenized exactly as the model's own tokenizer does it.

use std::path::Path;

use candle_core::{D, Device, IndexOp, Tensor};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::core::template::ChatTemplate;
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
    /// The chat template text, when the model carries one.
    pub chat_template: Option<String>,
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
        return Ok(ModelBundle {
            loaded,
            tokenizer: extras.tokenizer,
            bos,
            chat_template: extras.chat_template,
        });
    }
    let loaded = load_hf_folder(path, device)?;
    let tok_path = path.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot read the tokenizer: {e} ({})", tok_path.display()))?;
    let config_path = path.join("tokenizer_config.json");
    let chat_template = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| {
            c.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        });
    // HF tokenizers add BOS through their post-processor, so encoding with special tokens
    // already does what the model expects.
    Ok(ModelBundle {
        loaded,
        tokenizer,
        bos: None,
        chat_template,
    })
}

impl ModelBundle {
    /// The model's chat template (ChatML when it carries none) with its BOS and EOS tokens.
    pub fn template(&self) -> anyhow::Result<ChatTemplate> {
        let source = self
            .chat_template
            .clone()
            .unwrap_or_else(|| CHATML_JINJA.to_string());
        let eos = self
            .loaded
            .config
            .eos_token_id
            .as_ref()
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
            .and_then(|id| self.tokenizer.id_to_token(id as u32))
            .unwrap_or_else(|| "<|im_end|>".to_string());
        let bos = self
            .bos
            .and_then(|id| self.tokenizer.id_to_token(id))
            .unwrap_or_default();
        Ok(ChatTemplate::from_source(&source, &bos, &eos)?)
    }

    /// Token ids of `text` as the model's tokenizer makes them (BOS included where it says so).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.bos
            && ids.first() != Some(&bos)
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
