//! Answering one chat prompt with a model: the "try it" box of the studio, during a run (the
//! trainer's current weights) or afterwards (a run's model folder).

use tokenizers::Tokenizer;

use crate::core::record::Role;
use crate::core::template::{ChatMessage, ChatTemplate};
use crate::train::model::Decoder;

/// The tokenizer and template a model is prompted with.
pub struct Chat<'a> {
    /// The tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The chat template.
    pub template: &'a ChatTemplate,
}

impl Chat<'_> {
    /// Greedy answer to `prompt` under `system`, at most `max_new` tokens.
    pub fn answer(
        &self,
        model: &Decoder,
        system: &str,
        prompt: &str,
        max_new: usize,
    ) -> anyhow::Result<String> {
        let mut messages = Vec::new();
        if !system.trim().is_empty() {
            messages.push(ChatMessage::new(Role::System, system));
        }
        messages.push(ChatMessage::new(Role::User, prompt));
        let text = self.template.render(&messages, true)?;
        let ids = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec();
        let limit = model.config.max_position_embeddings;
        if ids.len() >= limit {
            anyhow::bail!(
                "the prompt takes {} tokens; the model reads at most {limit}",
                ids.len()
            );
        }
        let stop: Vec<u32> = [&self.template.end_of_turn, &self.template.eos_token]
            .iter()
            .filter_map(|t| self.tokenizer.token_to_id(t.trim()))
            .collect();
        let out = model.generate(&ids, max_new.min(limit - ids.len()), &stop, 0.0, 0)?;
        self.tokenizer
            .decode(&out, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }
}
