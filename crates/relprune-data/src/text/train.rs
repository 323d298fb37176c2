//! Training a BPE `tokenizer.json` on a corpus, for models trained from scratch (the
//! `transformer-gettext-en-de` experiment), so that no pretrained vocabulary has to be downloaded.
//!
//! The tokenizer is SentencePiece-like: NFC normalization, the Metaspace pre-tokenizer (a space
//! becomes `▁` and starts a word, so decoding restores the text exactly), byte-pair merges learned
//! from the corpus, `</s>` appended to every encoding, and the special tokens `<pad>` = 0,
//! `<s>` = 1, `</s>` = 2, `<unk>` = 3 — the ids [`relprune_models`]' Transformer expects by
//! default.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{unicode::NFC, NormalizerWrapper};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
use crate::text::tokenizer::TextTokenizer;

/// The special tokens of a trained tokenizer, in id order.
pub const TRAINED_SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// Options of [`train_bpe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpeOptions {
    /// Size of the vocabulary, special tokens and the initial alphabet included.
    pub vocab_size: usize,
    /// A merge must occur at least this often in the corpus.
    pub min_frequency: u64,
    /// At most this many distinct characters form the initial alphabet (the rarest fall back to
    /// `<unk>`); `None` keeps every character seen.
    pub limit_alphabet: Option<usize>,
}

impl Default for BpeOptions {
    fn default() -> Self {
        Self {
            vocab_size: 8000,
            min_frequency: 2,
            limit_alphabet: Some(200),
        }
    }
}

/// Learns a BPE tokenizer from `texts` (e.g. the source and target sides of a training split
/// together, for a shared vocabulary).
pub fn train_bpe<'a, I>(texts: I, options: &BpeOptions) -> Result<TextTokenizer>
where
    I: Iterator<Item = &'a str> + Send,
{
    if options.vocab_size <= TRAINED_SPECIALS.len() {
        return Err(Error::Invalid(format!(
            "tokenizer training: vocab_size {} leaves no room beside the {} special tokens",
            options.vocab_size,
            TRAINED_SPECIALS.len()
        )));
    }
    let specials: Vec<AddedToken> = TRAINED_SPECIALS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut builder = BpeTrainer::builder()
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency)
        .show_progress(false)
        .special_tokens(specials);
    if let Some(limit) = options.limit_alphabet {
        builder = builder.limit_alphabet(limit);
    }
    let mut trainer: TrainerWrapper = builder.build().into();
    let model = BPE::builder()
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| Error::Invalid(format!("tokenizer training: {e}")))?;
    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(NormalizerWrapper::from(NFC)))
        .map_err(|e| Error::Invalid(format!("tokenizer training: {e}")))?
        .with_pre_tokenizer(Some(PreTokenizerWrapper::from(metaspace.clone())))
        .with_decoder(Some(DecoderWrapper::from(metaspace)));
    let mut empty = true;
    tokenizer
        .train(
            &mut trainer,
            texts.inspect(|t| empty &= t.trim().is_empty()),
        )
        .map_err(|e| Error::Invalid(format!("tokenizer training: {e}")))?;
    if empty {
        return Err(Error::Invalid(
            "tokenizer training: the corpus has no text".into(),
        ));
    }
    let eos = tokenizer
        .token_to_id("</s>")
        .ok_or_else(|| Error::Invalid("tokenizer training: `</s>` missing".into()))?;
    let post = TemplateProcessing::builder()
        .try_single("$A </s>")
        .and_then(|b| b.try_pair("$A </s> $B </s>"))
        .map_err(|e| Error::Invalid(format!("tokenizer training: {e}")))?
        .special_tokens(vec![("</s>", eos)])
        .build()
        .map_err(|e| Error::Invalid(format!("tokenizer training: {e}")))?;
    tokenizer.with_post_processor(Some(PostProcessorWrapper::from(post)));
    let json = tokenizer
        .to_string(false)
        .map_err(|e| Error::Invalid(format!("tokenizer training: cannot serialize: {e}")))?;
    TextTokenizer::from_bytes(json.as_bytes(), "trained BPE tokenizer")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let words = [
            "open",
            "file",
            "save",
            "the",
            "document",
            "Datei",
            "öffnen",
            "speichern",
            "Dokument",
            "close",
            "window",
            "Fenster",
            "schließen",
        ];
        (0..400)
            .map(|i| {
                (0..6)
                    .map(|j| words[(i * 7 + j * 3) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn trained_tokenizer_round_trips_text_and_has_the_special_ids() {
        let texts = corpus();
        let tok = train_bpe(
            texts.iter().map(String::as_str),
            &BpeOptions {
                vocab_size: 150,
                ..BpeOptions::default()
            },
        )
        .unwrap();
        let s = tok.special_ids();
        assert_eq!(
            (s.pad, s.bos, s.eos, s.unk),
            (Some(0), Some(1), Some(2), Some(3))
        );
        let text = "Datei öffnen schließen the window";
        let ids = tok.encode(text).unwrap();
        assert_eq!(*ids.last().unwrap(), 2, "ends with </s>");
        assert!(!ids.contains(&3), "no <unk> for seen characters: {ids:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        // With room in the vocabulary, the corpus' words become single tokens.
        assert_eq!(ids.len(), 6, "{ids:?}");
        assert!(tok.vocab_size() <= 150);
    }

    #[test]
    fn the_same_corpus_gives_the_same_tokenizer() {
        let texts = corpus();
        let opts = BpeOptions {
            vocab_size: 50,
            ..BpeOptions::default()
        };
        let a = train_bpe(texts.iter().map(String::as_str), &opts).unwrap();
        let b = train_bpe(texts.iter().map(String::as_str), &opts).unwrap();
        assert_eq!(
            a.inner().to_string(false).unwrap(),
            b.inner().to_string(false).unwrap()
        );
    }

    #[test]
    fn empty_corpus_and_tiny_vocab_are_errors() {
        let err = train_bpe(["", " "].into_iter(), &BpeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("no text"), "{err}");
        let err = train_bpe(
            ["a b"].into_iter(),
            &BpeOptions {
                vocab_size: 4,
                ..BpeOptions::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }
}
