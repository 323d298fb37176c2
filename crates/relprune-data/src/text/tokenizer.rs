//! Hugging Face `tokenizer.json` files (WordPiece, BPE, Unigram, with their normalizers,
//! pre-tokenizers and post-processors) loaded through the `tokenizers` crate.
//!
//! Padding and truncation settings stored in the file are switched off at load: padding is the
//! batcher's job (it pads to the longest in the batch, not to a fixed length such as
//! all-MiniLM-L6-v2's 128), and a silent cut would hide over-long examples that
//! [`crate::text::TokenBatcher`] reports or skips explicitly.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The usual spellings of each special token, SentencePiece style first, then BERT style.
const PAD_TOKENS: [&str; 2] = ["<pad>", "[PAD]"];
const EOS_TOKENS: [&str; 2] = ["</s>", "[SEP]"];
const BOS_TOKENS: [&str; 2] = ["<s>", "[CLS]"];
const UNK_TOKENS: [&str; 2] = ["<unk>", "[UNK]"];

/// Ids of the special tokens a seq2seq trainer needs; `None` when the vocabulary has none of the usual spellings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    /// Padding: `<pad>` or `[PAD]`.
    pub pad: Option<u32>,
    /// End of sequence: `</s>` or, for BERT vocabularies, `[SEP]`.
    pub eos: Option<u32>,
    /// Beginning of sequence: `<s>` or, for BERT vocabularies, `[CLS]`.
    pub bos: Option<u32>,
    /// Unknown token: `<unk>` or `[UNK]`.
    pub unk: Option<u32>,
}

/// A Hugging Face tokenizer with the file it came from, its special ids and its id range.
#[derive(Clone, Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    source_name: String,
    special: SpecialIds,
    vocab_size: usize,
}

/// Most bytes of text read per token position by [`TextTokenizer::encode_at_most`]: longer
/// than any token of the vocabularies we run (WordPiece caps a word at 100 characters and makes
/// it one `[UNK]`, most tokens are under 16 bytes).
pub const BYTES_PER_POSITION: usize = 256;

impl TextTokenizer {
    /// Loads a `tokenizer.json` file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::text::read_text_file(path)?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses `tokenizer.json` contents already in memory; `source_name` names them in errors.
    pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<Self> {
        let invalid = |e: String| {
            Error::format(
                source_name,
                None,
                format!("not a valid Hugging Face tokenizer.json: {e}"),
            )
        };
        // The tokenizers crate panics on some malformed files (its model deserializer turns
        // a syntax error into a panic; a template naming an undefined token panics when
        // encoding): syntax and templates are checked first, and a panic left is contained.
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if let Some(pp) = &probe.post_processor {
            check_post_processor(pp).map_err(invalid)?;
        }
        let mut inner = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
            .map_err(|_| invalid("the tokenizers library rejected it (panicked)".into()))?
            .map_err(|e| invalid(e.to_string()))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| {
            Error::format(
                source_name,
                None,
                format!("cannot switch off truncation: {e}"),
            )
        })?;
        let vocab = inner.get_vocab(true);
        // Ids need not be contiguous (added tokens may sit anywhere), so the range that an
        // embedding table must cover is the largest id + 1, not the number of tokens.
        let vocab_size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        if vocab_size == 0 {
            return Err(Error::format(source_name, None, "the vocabulary is empty"));
        }
        let find = |names: &[&str]| names.iter().find_map(|t| inner.token_to_id(t));
        let special = SpecialIds {
            pad: find(&PAD_TOKENS),
            eos: find(&EOS_TOKENS),
            bos: find(&BOS_TOKENS),
            unk: find(&UNK_TOKENS),
        };
        Ok(Self {
            inner,
            source_name: source_name.to_string(),
            special,
            vocab_size,
        })
    }

    /// The file (or name) the tokenizer was loaded from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The underlying `tokenizers` tokenizer, for anything this wrapper does not cover.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The vocabulary's whole words (letters only, at least three; in a vocabulary that marks
    /// word starts with `▁` or `Ġ`, only marked entries, the marker stripped; no sub-word
    /// continuations or special tokens), sorted: material for inputs the user's text lacks.
    pub fn words(&self) -> Vec<String> {
        let vocab = self.inner.get_vocab(false);
        let marker = ['\u{2581}', '\u{120}']
            .into_iter()
            .find(|m| vocab.keys().any(|t| t.starts_with(*m)));
        let mut words: Vec<String> = vocab
            .into_keys()
            .filter_map(|t| {
                let w = match marker {
                    Some(m) => t.strip_prefix(m)?.to_string(),
                    None => t,
                };
                (w.chars().count() >= 3 && w.chars().all(char::is_alphabetic)).then_some(w)
            })
            .collect();
        words.sort();
        words.dedup();
        words
    }

    /// Ids of `text` with the file's special tokens added (`[CLS] … [SEP]` for BERT, `… </s>` for Marian and T5).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Ids of `text` with special tokens, cut to `max_len` tokens keeping the last (as a
    /// tokenizer's own truncation does; 0: whole). Text beyond [`BYTES_PER_POSITION`] bytes per
    /// position is dropped before tokenizing: it could only become tokens the cut removes, and
    /// tokenizing it costs memory (a 10 MB line once took 1.8 GB).
    pub fn encode_at_most(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        Ok(self.encode_cut(text, max_len)?.0)
    }

    /// [`TextTokenizer::encode_at_most`], and whether `text` was cut (so that callers can say
    /// how many inputs were).
    pub fn encode_cut(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, bool)> {
        let (text, dropped) = match max_len.checked_mul(BYTES_PER_POSITION) {
            Some(cap) if max_len > 0 && text.len() > cap => {
                let mut end = cap;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                (&text[..end], true)
            }
            _ => (text, false),
        };
        let ids = self.encode(text)?;
        let cut = dropped || (max_len > 0 && ids.len() > max_len);
        Ok((super::truncate_keeping_last(ids, max_len), cut))
    }

    /// Ids of `text`, with or without the special tokens of the file's post-processor.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let fail = |e: String| {
            Error::Invalid(format!("{}: cannot encode {text:?}: {e}", self.source_name))
        };
        // A file the checks at load missed may still panic the tokenizers library: contained.
        let encoding = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.encode(text, add_special_tokens)
        }))
        .map_err(|_| fail("the tokenizers library failed (panicked) on this file".into()))?
        .map_err(|e| fail(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of each text, with special tokens, in order.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }

    /// The text of `ids`; `skip_special_tokens` leaves out padding, `</s>`, `[CLS]` and the like.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::Invalid(format!(
                "{}: cannot decode id {bad}: the vocabulary has ids 0..{}",
                self.source_name, self.vocab_size
            )));
        }
        let fail =
            |e: String| Error::Invalid(format!("{}: cannot decode {ids:?}: {e}", self.source_name));
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.decode(ids, skip_special_tokens)
        }))
        .map_err(|_| fail("the tokenizers library failed (panicked) on this file".into()))?
        .map_err(|e| fail(e.to_string()))
    }

    /// The id of `token` (exact vocabulary entry, e.g. `"▁the"` or `"##s"`), if it has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of `id`, if there is one.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The special ids found in the vocabulary.
    pub fn special_ids(&self) -> SpecialIds {
        self.special
    }

    /// The padding id (`<pad>` or `[PAD]`), if the vocabulary has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad
    }

    /// The end-of-sequence id (`</s>`, else `[SEP]`), if the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// The beginning-of-sequence id (`<s>`, else `[CLS]`), if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// The unknown-token id (`<unk>` or `[UNK]`), if the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        self.special.unk
    }

    /// The padding id, or an error naming the file when the vocabulary has none.
    pub fn require_pad_id(&self) -> Result<u32> {
        self.special.pad.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: no padding token (looked for {PAD_TOKENS:?}); pass a pad id explicitly",
                self.source_name
            ))
        })
    }

    /// Size of the id range: the largest id (vocabulary or added token) + 1.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Checks that every id this tokenizer can produce indexes a row of a model's embedding of
    /// `model_vocab_size` rows.
    ///
    /// A larger model vocabulary is fine (T5 checkpoints pad theirs to a multiple of 128); a
    /// smaller one means the tokenizer belongs to another model, and the first id past the end
    /// would fail or, on some backends, read garbage.
    pub fn check_vocab(&self, model_vocab_size: usize) -> Result<()> {
        if self.vocab_size <= model_vocab_size {
            return Ok(());
        }
        let out_of_range = self
            .inner
            .get_vocab(true)
            .values()
            .filter(|&&id| id as usize >= model_vocab_size)
            .count();
        Err(Error::Invalid(format!(
            "{}: the tokenizer's ids go up to {} but the model's vocabulary has {model_vocab_size} \
             entries ({out_of_range} token(s) would be out of range): this tokenizer does not \
             belong to this model",
            self.source_name,
            self.vocab_size - 1
        )))
    }
}

/// What [`TextTokenizer::from_bytes`] checks before the tokenizers library sees a file.
#[derive(serde::Deserialize)]
struct Probe {
    post_processor: Option<serde_json::Value>,
}

/// Checks what the tokenizers library assumes of a post-processor it deserialized without its
/// builder's checks: every special token a template names is defined, with as many ids as
/// tokens (else encoding panics).
fn check_post_processor(pp: &serde_json::Value) -> std::result::Result<(), String> {
    match pp.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for p in pp["processors"].as_array().into_iter().flatten() {
                check_post_processor(p)?;
            }
        }
        Some("TemplateProcessing") => {
            let defined = pp["special_tokens"].as_object();
            for (name, tok) in defined.into_iter().flatten() {
                let (ids, tokens) = (tok["ids"].as_array(), tok["tokens"].as_array());
                if ids.map(Vec::len) != tokens.map(Vec::len) {
                    return Err(format!(
                        "post_processor special token `{name}` has a different number of ids \
                         and tokens"
                    ));
                }
            }
            for template in ["single", "pair"] {
                for piece in pp[template].as_array().into_iter().flatten() {
                    if let Some(id) = piece["SpecialToken"]["id"].as_str() {
                        if !defined.is_some_and(|d| d.contains_key(id)) {
                            return Err(format!(
                                "post_processor template `{template}` uses the special token \
                                 `{id}`, which its special_tokens do not define"
                            ));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}
