//! Corpus BLEU computed exactly as sacreBLEU 2.x computes it (version [`SACREBLEU_VERSION`]).
//!
//! Translation scores are only comparable when everything around the formula matches: the
//! tokenizer, the brevity penalty's reference length, the smoothing, and what happens on empty or
//! zero-match input. This module follows sacreBLEU's `metrics/bleu.py`, `metrics/helpers.py` and
//! `tokenizers/tokenizer_13a.py` / `tokenizer_re.py` line by line, including its quirks:
//!
//! - segments are lowercased (optionally), right-stripped, tokenized, then split on whitespace,
//!   with Python's definitions of whitespace (which include U+001C..U+001F) and of `str.lower`;
//! - per segment the reference length is the closest one to the hypothesis length, ties going to
//!   the shorter reference; n-gram matches are clipped by the maximum count over the references;
//! - if no n-gram of any order matches, the score is 0 and every precision is reported as 0;
//! - the orders are walked from 1 up and the walk stops at the first order with no hypothesis
//!   n-gram at all: that order and the ones after it keep precision 0, so the corpus score is 0
//!   unless `effective_order` is on (then the geometric mean is over the orders walked);
//! - a zero precision enters the geometric mean as `log = -9999999999` (sacreBLEU's `my_log`),
//!   which makes the score 0.
//!
//! `tests/bleu_sacrebleu.rs` checks all of this against vectors that sacreBLEU itself produced
//! (`tests/data/gen_sacrebleu_vectors.py`). Deliberate differences, all on input sacreBLEU's API
//! accepts silently or crashes on: mismatched numbers of lines and an empty corpus are errors here
//! (sacreBLEU's API truncates to the shortest stream, its CLI exits with an error); negative or
//! non-finite smoothing values are errors (sacreBLEU would take a log of a negative number).

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The sacreBLEU release this module reproduces; it ends every signature (`version:2.6.0`).
pub const SACREBLEU_VERSION: &str = "2.6.0";

/// The largest n-gram order BLEU counts (sacreBLEU's `MAX_NGRAM_ORDER`).
pub const MAX_NGRAM_ORDER: usize = 4;

/// sacreBLEU's stand-in for `log(0)`: finite, so the geometric mean becomes 0 instead of NaN.
const LOG_ZERO: f64 = -9_999_999_999.0;

/// How segments are split into tokens before n-grams are counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tokenizer {
    /// mteval-v13a's tokenization, sacreBLEU's default (`13a`).
    #[default]
    #[serde(rename = "13a")]
    Mteval13a,
    /// No tokenization: split on whitespace only (`none`), for already tokenized text.
    #[serde(rename = "none")]
    None,
}

impl Tokenizer {
    /// The name sacreBLEU uses on its command line and in the signature (`13a`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Mteval13a => "13a",
            Tokenizer::None => "none",
        }
    }

    /// Tokenizes one (already lowercased and right-stripped) segment.
    pub fn tokenize(self, line: &str) -> String {
        match self {
            Tokenizer::Mteval13a => tokenize_13a(line),
            Tokenizer::None => line.to_string(),
        }
    }
}

/// How orders without any match are smoothed (Chen & Cherry 2014, as named by sacreBLEU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Smoothing {
    /// NIST geometric decay: the k-th zero-match order gets precision `100 / (2^k · total)`.
    #[default]
    Exp,
    /// A zero-match order gets precision `100 · value / total` (sacreBLEU's default value 0.1).
    Floor(f64),
    /// `value` is added to matches and totals of every order above 1 (sacreBLEU's default 1).
    AddK(f64),
    /// No smoothing: one zero-match order makes the score 0.
    None,
}

impl Smoothing {
    /// `floor` with sacreBLEU's default value, 0.1.
    pub const FLOOR_DEFAULT: Smoothing = Smoothing::Floor(0.1);
    /// `add-k` with sacreBLEU's default value, 1.
    pub const ADD_K_DEFAULT: Smoothing = Smoothing::AddK(1.0);

    /// The method's name as sacreBLEU spells it (`exp`, `floor`, `add-k`, `none`).
    pub fn name(self) -> &'static str {
        match self {
            Smoothing::Exp => "exp",
            Smoothing::Floor(_) => "floor",
            Smoothing::AddK(_) => "add-k",
            Smoothing::None => "none",
        }
    }

    /// The signature's `smooth` field: the name, with the value in brackets where there is one.
    pub fn signature(self) -> String {
        match self {
            // Python's `{:.2f}` and Rust's `{:.2}` both round the exact binary value half-to-even.
            Smoothing::Floor(v) | Smoothing::AddK(v) => format!("{}[{v:.2}]", self.name()),
            Smoothing::Exp | Smoothing::None => self.name().to_string(),
        }
    }
}

/// The options of a BLEU computation; the default is sacreBLEU's corpus default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BleuConfig {
    /// The tokenizer (default `13a`).
    pub tokenizer: Tokenizer,
    /// The smoothing method (default `exp`).
    pub smoothing: Smoothing,
    /// Lowercase hypotheses and references first: case-insensitive BLEU (default false).
    pub lowercase: bool,
    /// Average only over the orders that have hypothesis n-grams (default false, as sacreBLEU's
    /// corpus score; sacreBLEU turns it on for sentence-level BLEU).
    pub effective_order: bool,
}

impl BleuConfig {
    /// sacreBLEU's signature for these options and `nrefs` reference streams, e.g.
    /// `nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0`.
    pub fn signature(&self, nrefs: usize) -> String {
        format!(
            "nrefs:{nrefs}|case:{}|eff:{}|tok:{}|smooth:{}|version:{SACREBLEU_VERSION}",
            if self.lowercase { "lc" } else { "mixed" },
            if self.effective_order { "yes" } else { "no" },
            self.tokenizer.name(),
            self.smoothing.signature(),
        )
    }

    /// Lowercases (if asked), right-strips and tokenizes one segment, as sacreBLEU's
    /// `_preprocess_segment` does (lowercasing comes first there too).
    pub fn preprocess(&self, segment: &str) -> String {
        let lowered;
        let s = if self.lowercase {
            lowered = segment.to_lowercase();
            lowered.as_str()
        } else {
            segment
        };
        self.tokenizer.tokenize(py_rstrip(s))
    }

    /// Checks the smoothing value: sacreBLEU would take the log of a negative precision.
    fn validate(&self) -> Result<()> {
        if let Smoothing::Floor(v) | Smoothing::AddK(v) = self.smoothing {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Invalid(format!(
                    "BLEU smoothing value for {} must be finite and non-negative, got {v}",
                    self.smoothing.name()
                )));
            }
        }
        Ok(())
    }
}

/// A corpus BLEU score with the statistics behind it, as sacreBLEU's `BLEUScore`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BleuScore {
    /// BLEU on sacreBLEU's scale, 0 to 100.
    pub score: f64,
    /// Clipped n-gram matches per order 1..=4, summed over the corpus. Always the raw counts:
    /// under `add-k`, sacreBLEU's own `counts` include the added k for orders above 1.
    pub counts: [u64; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams per order 1..=4, summed over the corpus (raw, as `counts`).
    pub totals: [u64; MAX_NGRAM_ORDER],
    /// Smoothed n-gram precisions per order, in percent.
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// The brevity penalty, in 0..=1.
    pub bp: f64,
    /// Total hypothesis length in tokens.
    pub sys_len: u64,
    /// Total of the per-segment closest reference lengths, in tokens.
    pub ref_len: u64,
    /// `sys_len / ref_len`, or 0 when `ref_len` is 0 (as sacreBLEU).
    pub ratio: f64,
    /// sacreBLEU's reproducibility signature of the options and the number of references.
    pub signature: String,
}

impl BleuScore {
    /// The part after the score: `65.2/41.1/28.6/20.1 (BP = 1.000 ratio = 1.012 hyp_len = 100
    /// ref_len = 99)`, sacreBLEU's `verbose_score`.
    pub fn verbose(&self) -> String {
        let precisions: Vec<String> = self.precisions.iter().map(|p| format!("{p:.1}")).collect();
        format!(
            "{} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
            precisions.join("/"),
            self.bp,
            self.ratio,
            self.sys_len,
            self.ref_len
        )
    }

    /// `BLEU = 35.12 65.2/...` with the score to `width` decimals, as sacreBLEU's `Score.format`
    /// without a signature (its `str(score)` uses width 2).
    pub fn format(&self, width: usize) -> String {
        format!("BLEU = {:.width$} {}", self.score, self.verbose())
    }

    /// `BLEU|nrefs:1|...|version:2.6.0 = 35.1 65.2/...`: what `sacrebleu REF -i HYP -f text`
    /// prints (its command line uses width 1 by default).
    pub fn format_with_signature(&self, width: usize) -> String {
        format!(
            "BLEU|{} = {:.width$} {}",
            self.signature,
            self.score,
            self.verbose()
        )
    }
}

impl fmt::Display for BleuScore {
    /// Same as [`BleuScore::format`] with width 2, as sacreBLEU's `str(score)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.format(2))
    }
}

/// Corpus BLEU of `hypotheses` against one or more reference streams, as sacreBLEU's
/// `BLEU(...).corpus_score(hypotheses, references)`.
///
/// `references[k][i]` is the k-th reference of segment `i` (sacreBLEU's layout: one stream per
/// reference set, each as long as the hypotheses). Errors if there are no hypotheses, no
/// reference streams, a stream of another length, or an invalid smoothing value.
pub fn corpus_bleu<H, R, S>(
    hypotheses: &[H],
    references: &[S],
    config: &BleuConfig,
) -> Result<BleuScore>
where
    H: AsRef<str>,
    R: AsRef<str>,
    S: AsRef<[R]>,
{
    config.validate()?;
    if references.is_empty() {
        return Err(Error::Invalid(
            "BLEU needs at least one reference stream".into(),
        ));
    }
    if hypotheses.is_empty() {
        // sacreBLEU's API fails on `hyps[0]` and its CLI refuses an empty system.
        return Err(Error::Invalid(
            "BLEU of an empty corpus is undefined: no hypotheses".into(),
        ));
    }
    for (k, stream) in references.iter().enumerate() {
        let n = stream.as_ref().len();
        if n != hypotheses.len() {
            return Err(Error::Invalid(format!(
                "reference stream {} has {n} lines but there are {} hypotheses",
                k + 1,
                hypotheses.len()
            )));
        }
    }

    let mut stats = Stats::default();
    for (i, hyp) in hypotheses.iter().enumerate() {
        let refs: Vec<String> = references
            .iter()
            .map(|stream| config.preprocess(stream.as_ref()[i].as_ref()))
            .collect();
        let hyp = config.preprocess(hyp.as_ref());
        stats.add_segment(&hyp, &refs);
    }
    Ok(stats.score(config, references.len()))
}

/// The corpus's sufficient statistics: lengths, and matches and totals per order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Stats {
    sys_len: u64,
    ref_len: u64,
    correct: [u64; MAX_NGRAM_ORDER],
    total: [u64; MAX_NGRAM_ORDER],
}

impl Stats {
    /// Adds one preprocessed segment (sacreBLEU's `_compute_segment_statistics`).
    fn add_segment(&mut self, hyp: &str, refs: &[String]) {
        let ref_tokens: Vec<Vec<&str>> = refs.iter().map(|r| py_split(r)).collect();
        // Clipping uses the maximum count of each n-gram over the references.
        let mut ref_ngrams: HashMap<&[&str], u64> = HashMap::new();
        for tokens in &ref_tokens {
            for (ngram, count) in ngram_counts(tokens) {
                let max = ref_ngrams.entry(ngram).or_insert(0);
                *max = (*max).max(count);
            }
        }
        let hyp_tokens = py_split(hyp);
        let ref_lens: Vec<usize> = ref_tokens.iter().map(Vec::len).collect();
        self.sys_len += hyp_tokens.len() as u64;
        self.ref_len += closest_ref_len(hyp_tokens.len(), &ref_lens) as u64;
        for (ngram, count) in ngram_counts(&hyp_tokens) {
            let n = ngram.len() - 1;
            self.total[n] += count;
            if let Some(&max) = ref_ngrams.get(ngram) {
                self.correct[n] += count.min(max);
            }
        }
    }

    /// BLEU from the statistics (sacreBLEU's `compute_bleu`, with the same float operations in
    /// the same order, so the results agree to the last bit or nearly).
    fn score(&self, config: &BleuConfig, nrefs: usize) -> BleuScore {
        let (sys, reference) = (self.sys_len as f64, self.ref_len as f64);
        let bp = if self.sys_len < self.ref_len {
            if self.sys_len > 0 {
                (1.0 - reference / sys).exp()
            } else {
                0.0
            }
        } else {
            1.0
        };
        let mut precisions = [0.0; MAX_NGRAM_ORDER];
        let mut score = 0.0;
        // Early stop when nothing matches (sacreBLEU #141): score and precisions all 0.
        if self.correct.iter().any(|&c| c > 0) {
            let mut smooth_mteval = 1.0;
            let mut eff_order = MAX_NGRAM_ORDER;
            for (n, precision) in precisions.iter_mut().enumerate() {
                let (mut correct, mut total) = (self.correct[n] as f64, self.total[n] as f64);
                if let Smoothing::AddK(k) = config.smoothing {
                    if n > 0 {
                        correct += k;
                        total += k;
                    }
                }
                if total == 0.0 {
                    break;
                }
                if config.effective_order {
                    eff_order = n + 1;
                }
                if correct == 0.0 {
                    match config.smoothing {
                        Smoothing::Exp => {
                            smooth_mteval *= 2.0;
                            *precision = 100.0 / (smooth_mteval * total);
                        }
                        Smoothing::Floor(v) => *precision = 100.0 * v / total,
                        Smoothing::AddK(_) | Smoothing::None => {}
                    }
                } else {
                    *precision = 100.0 * correct / total;
                }
            }
            // Plain left-to-right sum, as Python's `sum` of a list (before 3.12).
            let log_sum = precisions[..eff_order].iter().fold(0.0, |acc, &p| {
                acc + if p == 0.0 { LOG_ZERO } else { p.ln() }
            });
            score = bp * (log_sum / eff_order as f64).exp();
        }
        BleuScore {
            score,
            counts: self.correct,
            totals: self.total,
            precisions,
            bp,
            sys_len: self.sys_len,
            ref_len: self.ref_len,
            ratio: if self.ref_len > 0 {
                sys / reference
            } else {
                0.0
            },
            signature: config.signature(nrefs),
        }
    }
}

/// The reference length closest to `hyp_len`, the shorter one on a tie (sacreBLEU's
/// `_get_closest_ref_len`).
fn closest_ref_len(hyp_len: usize, ref_lens: &[usize]) -> usize {
    let mut best: Option<(usize, usize)> = None; // (difference, length)
    for &len in ref_lens {
        let diff = hyp_len.abs_diff(len);
        best = match best {
            Some((d, l)) if diff > d || (diff == d && len >= l) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    best.map_or(0, |(_, len)| len)
}

/// Counts of every n-gram of orders 1..=4 in a token sequence.
fn ngram_counts<'a, 'b>(tokens: &'b [&'a str]) -> HashMap<&'b [&'a str], u64> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_NGRAM_ORDER.min(tokens.len()) {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// Python's `str.isspace`: Unicode White_Space plus U+001C..U+001F, which Python also counts.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` without arguments: split on whitespace runs, drop empty pieces.
fn py_split(s: &str) -> Vec<&str> {
    s.split(is_py_space).filter(|t| !t.is_empty()).collect()
}

/// Python's `str.rstrip()` without arguments.
fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(is_py_space)
}

/// The mteval-v13a tokenizer as sacreBLEU implements it (`Tokenizer13a` then `TokenizerRegexp`).
///
/// The regular expressions are replayed as left-to-right scans over characters: each one matches
/// a fixed two-character (or one-character) window, and Python's `re.sub` resumes after a match,
/// which the scans reproduce by skipping the consumed characters.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let padded = format!(" {line} ");

    // ([\{-\~\[-\` -\&\(-\+\:-\@\/]) -> " \1 ": ASCII symbols except ' , - . become tokens.
    let mut chars = Vec::with_capacity(padded.len() * 2);
    for c in padded.chars() {
        if is_13a_symbol(c) {
            chars.extend([' ', c, ' ']);
        } else {
            chars.push(c);
        }
    }
    let is_digit = |c: char| c.is_ascii_digit();
    let is_period_comma = |c: char| c == '.' || c == ',';
    // ([^0-9])([\.,]) -> "\1 \2 ": period and comma unless preceded by a digit.
    let chars = sub_pairs(
        &chars,
        |a, b| !is_digit(a) && is_period_comma(b),
        |a, b| [a, ' ', b, ' '],
    );
    // ([\.,])([^0-9]) -> " \1 \2": period and comma unless followed by a digit.
    let chars = sub_pairs(
        &chars,
        |a, b| is_period_comma(a) && !is_digit(b),
        |a, b| [' ', a, ' ', b],
    );
    // ([0-9])(-) -> "\1 \2 ": a dash preceded by a digit.
    let chars = sub_pairs(
        &chars,
        |a, b| is_digit(a) && b == '-',
        |a, b| [a, ' ', b, ' '],
    );

    let s: String = chars.into_iter().collect();
    py_split(&s).join(" ")
}

/// The characters of 13a's first character class: `{|}~ [\]^_` space!"#$%& ()*+ :;<=>?@ /`.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

/// `re.sub` of a two-character pattern: scans left to right, replaces each matching pair and
/// resumes after it, as Python does for non-overlapping matches.
fn sub_pairs(
    chars: &[char],
    matches: impl Fn(char, char) -> bool,
    replace: impl Fn(char, char) -> [char; 4],
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && matches(chars[i], chars[i + 1]) {
            out.extend(replace(chars[i], chars[i + 1]));
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bleu(hyps: &[&str], refs: &[&[&str]], config: &BleuConfig) -> BleuScore {
        corpus_bleu(hyps, refs, config).unwrap()
    }

    #[test]
    fn hand_computed_single_segment() {
        // hyp "a b c d e", ref "a b c x e f": 1-grams 4/5, 2-grams 2/4 (a b, b c), 3-grams 1/3
        // (a b c), 4-grams 0/2. exp smoothing: p4 = 100 / (2·2) = 25.
        // BP = exp(1 - 6/5); BLEU = BP · (80·50·33.33·25)^(1/4).
        let s = bleu(&["a b c d e"], &[&["a b c x e f"]], &BleuConfig::default());
        assert_eq!(s.counts, [4, 2, 1, 0]);
        assert_eq!(s.totals, [5, 4, 3, 2]);
        assert_eq!((s.sys_len, s.ref_len), (5, 6));
        let p = [80.0, 50.0, 100.0 / 3.0, 25.0];
        for (a, b) in s.precisions.iter().zip(p) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let bp = (1.0f64 - 6.0 / 5.0).exp();
        let expected = bp * (p.iter().map(|x: &f64| x.ln()).sum::<f64>() / 4.0).exp();
        assert!((s.bp - bp).abs() < 1e-15);
        assert!(
            (s.score - expected).abs() < 1e-9,
            "{} vs {expected}",
            s.score
        );
        // = 34.9833 (sacreBLEU 2.6.0 prints BLEU = 34.98 for this pair).
        assert!(
            (s.score - 34.983_301_252_722_53).abs() < 1e-9,
            "{}",
            s.score
        );
    }

    #[test]
    fn smoothing_variants_by_hand() {
        let hyps = ["a b c d e"];
        let refs: &[&[&str]] = &[&["a b c x e f"]];
        let mut cfg = BleuConfig {
            smoothing: Smoothing::None,
            ..Default::default()
        };
        let s = bleu(&hyps, refs, &cfg);
        assert_eq!(s.score, 0.0, "one zero precision without smoothing gives 0");
        assert_eq!(s.precisions[3], 0.0);
        cfg.smoothing = Smoothing::FLOOR_DEFAULT;
        assert!((bleu(&hyps, refs, &cfg).precisions[3] - 100.0 * 0.1 / 2.0).abs() < 1e-12);
        // add-k adds k to matches and totals of orders 2..=4 only.
        cfg.smoothing = Smoothing::ADD_K_DEFAULT;
        let s = bleu(&hyps, refs, &cfg);
        let p = [80.0, 300.0 / 5.0, 200.0 / 4.0, 100.0 / 3.0];
        for (a, b) in s.precisions.iter().zip(p) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(s.counts, [4, 2, 1, 0], "counts stay raw");
    }

    #[test]
    fn closest_reference_length_prefers_the_shorter_on_ties() {
        assert_eq!(closest_ref_len(5, &[4, 6]), 4);
        assert_eq!(closest_ref_len(5, &[6, 4]), 4);
        assert_eq!(closest_ref_len(5, &[7, 6, 9]), 6);
        assert_eq!(closest_ref_len(0, &[0, 3]), 0);
    }

    #[test]
    fn clipping_uses_the_max_count_over_references() {
        // "the" ×3 in the hypothesis, at most 2 in any one reference: 2 matches, not 3.
        let s = bleu(
            &["the the the"],
            &[&["the cat"], &["the the dog"]],
            &BleuConfig::default(),
        );
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.totals[0], 3);
    }

    #[test]
    fn tokenizer_13a_by_hand() {
        assert_eq!(tokenize_13a("Hello, world!"), "Hello , world !");
        assert_eq!(tokenize_13a("It costs 1,000.50."), "It costs 1,000.50 .");
        assert_eq!(tokenize_13a("10-20 a-b"), "10 - 20 a-b");
        assert_eq!(tokenize_13a("&quot;x&quot; &amp;amp;"), "\" x \" & amp ;");
        assert_eq!(tokenize_13a("a<skipped>b well-\nknown"), "ab wellknown");
        assert_eq!(tokenize_13a("U.S.A."), "U . S . A .");
    }

    #[test]
    fn python_whitespace_and_signature() {
        assert_eq!(py_split(" a\u{1c}b\u{a0}c \t"), ["a", "b", "c"]);
        assert_eq!(py_rstrip("x \r\u{1f}"), "x");
        assert_eq!(
            BleuConfig::default().signature(1),
            "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
        );
        let cfg = BleuConfig {
            tokenizer: Tokenizer::None,
            smoothing: Smoothing::FLOOR_DEFAULT,
            lowercase: true,
            effective_order: true,
        };
        assert_eq!(
            cfg.signature(3),
            "nrefs:3|case:lc|eff:yes|tok:none|smooth:floor[0.10]|version:2.6.0"
        );
    }

    #[test]
    fn format_matches_sacrebleu_layout() {
        let s = bleu(&["a b c d e"], &[&["a b c x e f"]], &BleuConfig::default());
        assert_eq!(
            s.to_string(),
            "BLEU = 34.98 80.0/50.0/33.3/25.0 (BP = 0.819 ratio = 0.833 hyp_len = 5 ref_len = 6)"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cfg = BleuConfig::default();
        let no_streams: &[&[&str]] = &[];
        assert!(corpus_bleu(&["a"], no_streams, &cfg).is_err());
        assert!(corpus_bleu(&["a", "b"], &[&["a"]], &cfg).is_err());
        let ragged: &[&[&str]] = &[&["a"], &["a", "b"]];
        assert!(corpus_bleu(&["a"], ragged, &cfg).is_err());
        let no_hyps: &[&str] = &[];
        let empty_stream: &[&[&str]] = &[&[]];
        assert!(corpus_bleu(no_hyps, empty_stream, &cfg).is_err());
        let negative = BleuConfig {
            smoothing: Smoothing::Floor(-1.0),
            ..cfg
        };
        assert!(corpus_bleu(&["a"], &[&["a"]], &negative).is_err());
        let nan = BleuConfig {
            smoothing: Smoothing::AddK(f64::NAN),
            ..cfg
        };
        assert!(corpus_bleu(&["a"], &[&["a"]], &nan).is_err());
    }
}
