//! A byte-level BPE tokenizer trained on the project's own text (the built-in tiny model's
//! tokenizer), with ChatML's special tokens.

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens every built-in tokenizer carries, ids 0, 1, 2.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Trains a byte-level BPE tokenizer of about `vocab_size` tokens on `texts`.
pub fn train_bpe(
    texts: impl Iterator<Item = String> + Send,
    vocab_size: usize,
) -> Result<Tokenizer, String> {
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(specials)
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    // Digits one by one, as Llama 3 and Qwen do: arithmetic is learnable digit by digit, not as
    // a table of whole numbers.
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| format!("training the tokenizer failed: {e}"))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_byte_level_tokenizer_with_chatml_specials() {
        let texts = (0..50).map(|i| format!("def add_{i}(a, b):\n    return a + b  # héllo"));
        let tok = train_bpe(texts, 500).unwrap();
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
        let text = "<|im_start|>user\ndef add_7(a, b): ünïcode<|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(
            enc.get_ids()[0],
            1,
            "special tokens are matched in raw text"
        );
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert!(tok.get_vocab_size(true) <= 500);
        let digits = tok.encode("add_7 1234", false).unwrap();
        let pieces: Vec<_> = digits
            .get_tokens()
            .iter()
            .filter(|t| t.chars().any(|c| c.is_ascii_digit()))
            .collect();
        assert!(
            pieces
                .iter()
                .all(|t| t.chars().filter(|c| c.is_ascii_digit()).count() == 1),
            "{pieces:?}"
        );
    }
}
