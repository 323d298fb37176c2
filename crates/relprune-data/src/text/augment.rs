//! More distillation inputs from few lines: the teacher labels any text, so variants of the
//! training lines (a contiguous span of a line's words; a line followed by another) are extra
//! training examples at the cost of one teacher pass each. With 340 training sentences the
//! fine-tune overfits them; the variants keep the student matching the teacher on inputs it has
//! not memorized.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Shortest span, as a fraction of the line's words.
const SPAN_MIN: f64 = 0.5;
/// Longest span, as a fraction of the line's words.
const SPAN_MAX: f64 = 0.9;

/// `k` variants of every line, in line order, seeded: variant 0, 2, 4, ... is a contiguous span
/// of 50–90% of the line's words (at least two), variant 1, 3, ... the line followed by another
/// line drawn at random. Lines of fewer than two words give spans equal to themselves.
pub fn variants(lines: &[&str], k: usize, seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0061_7567_6d65_6e74);
    let mut out = Vec::with_capacity(lines.len() * k);
    for (i, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for v in 0..k {
            if v % 2 == 0 || lines.len() < 2 {
                let n = words.len();
                let len = ((n as f64 * rng.random_range(SPAN_MIN..SPAN_MAX)) as usize)
                    .max(2)
                    .min(n);
                let start = rng.random_range(0..=n - len);
                out.push(words[start..start + len].join(" "));
            } else {
                // Any other line: a pair of unrelated sentences is still text the teacher embeds.
                let mut j = rng.random_range(0..lines.len() - 1);
                if j >= i {
                    j += 1;
                }
                out.push(format!("{} {}", line.trim(), lines[j].trim()));
            }
        }
    }
    out
}

/// Fewest words replaced, as a fraction of the line's words.
const SWAP_MIN: f64 = 0.3;
/// Most words replaced.
const SWAP_MAX: f64 = 0.6;

/// `k` variants of every line, in line order, seeded: the line with 30–60% of its words (at
/// least one) replaced by words drawn uniformly from `vocabulary`. The sentence shapes of the
/// user's text, carrying the words it never uses: what makes a model distilled on one domain's
/// text hold up on another's. Empty when `vocabulary` is.
pub fn substituted(lines: &[&str], vocabulary: &[String], k: usize, seed: u64) -> Vec<String> {
    if vocabulary.is_empty() {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0076_6f63_6162);
    let mut out = Vec::with_capacity(lines.len() * k);
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        for _ in 0..k {
            let mut variant: Vec<&str> = words.clone();
            let n = words.len();
            let swaps =
                ((n as f64 * rng.random_range(SWAP_MIN..SWAP_MAX)) as usize).clamp(1, n.max(1));
            for _ in 0..swaps {
                let word = vocabulary[rng.random_range(0..vocabulary.len())].as_str();
                match n {
                    0 => variant.push(word),
                    _ => variant[rng.random_range(0..n)] = word,
                }
            }
            out.push(variant.join(" "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substituted_lines_keep_their_length_and_carry_vocabulary_words() {
        let lines = [
            "the quick brown fox jumps over the lazy dog",
            "one two three",
        ];
        let vocab: Vec<String> = ["alpha", "beta", "gamma"].map(String::from).to_vec();
        let v = substituted(&lines, &vocab, 2, 3);
        assert_eq!(v.len(), 4);
        for (i, variant) in v.iter().enumerate() {
            let line: Vec<&str> = lines[i / 2].split_whitespace().collect();
            let words: Vec<&str> = variant.split_whitespace().collect();
            assert_eq!(words.len(), line.len(), "{variant:?}");
            let new = words.iter().zip(&line).filter(|(w, l)| w != l).count();
            assert!(new >= 1 && words.iter().any(|w| vocab.iter().any(|v| v == w)));
            assert!(words
                .iter()
                .zip(&line)
                .all(|(w, l)| w == l || vocab.iter().any(|v| v == w)));
        }
        assert_eq!(v, substituted(&lines, &vocab, 2, 3));
        assert!(substituted(&lines, &[], 2, 3).is_empty());
    }

    #[test]
    fn spans_are_contiguous_word_runs_and_pairs_join_two_different_lines() {
        let lines = [
            "the quick brown fox jumps over the lazy dog",
            "a second line with several words in it",
            "third",
        ];
        let v = variants(&lines, 2, 5);
        assert_eq!(v.len(), 6);
        for (i, line) in lines.iter().enumerate() {
            let span = &v[2 * i];
            let words: Vec<&str> = line.split_whitespace().collect();
            let n = span.split_whitespace().count();
            assert!(line.contains(span.as_str()), "{span:?} not in {line:?}");
            if words.len() >= 2 {
                assert!(n >= 2 && n < words.len(), "{span:?}");
            } else {
                assert_eq!(span, line);
            }
            let pair = &v[2 * i + 1];
            let rest = pair
                .strip_prefix(line)
                .expect("a pair starts with its line")
                .trim();
            assert!(
                lines.iter().enumerate().any(|(j, l)| j != i && *l == rest),
                "{pair:?}"
            );
        }
    }

    #[test]
    fn variants_depend_on_the_seed_only() {
        let lines = ["one two three four five six", "seven eight nine ten"];
        assert_eq!(variants(&lines, 3, 1), variants(&lines, 3, 1));
        assert_ne!(variants(&lines, 3, 1), variants(&lines, 3, 2));
        assert!(variants(&lines, 0, 1).is_empty());
    }
}
