//! Greedy and beam search: against `transformers`' ids on the Marian fixtures, against each other,
//! against teacher-forced rescoring, and on a toy model whose probabilities are known.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use candle_nn::VarMap;
use relprune_models::hf::generate::{
    beam_search, beam_search_nbest, generate, greedy, pad_rows, EarlyStopping, GenerateConfig,
    Generated, Seq2Seq, SpecialTokens,
};
use relprune_models::hf::marian::MarianModel;
use relprune_models::Result;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<u32>]) -> Tensor {
    Tensor::from_vec(rows.concat(), (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

fn load(name: &str) -> (MarianModel, Tensor, Tensor, Value) {
    let dir = fixture(name);
    let m = MarianModel::load(&dir, &VarMap::new(), &Device::Cpu).unwrap();
    let r = reference(&dir);
    let ids = tensor(&rows(&r["inputs"]["input_ids"]));
    let mask = tensor(&rows(&r["inputs"]["attention_mask"]));
    (m, ids, mask, r)
}

const FIXTURES: [&str; 2] = ["marian-tiny", "marian-tiny-pruned90"];

#[test]
fn greedy_equals_marian_greedy_and_transformers() {
    for name in FIXTURES {
        let (m, ids, mask, r) = load(name);
        let config = GenerateConfig::new(m.special_tokens(), 8);
        let got = pad_rows(&generate(&m, &ids, &mask, &config).unwrap(), 199);
        assert_eq!(got, m.greedy(&ids, &mask, 8).unwrap(), "{name}");
        assert_eq!(got, rows(&r["greedy"]["ids"]), "{name}");

        // With Marian's forced EOS at the last step: `model.generate`'s own output.
        let forced = GenerateConfig {
            forced_eos_token_id: Some(0),
            ..config
        };
        let got = pad_rows(&generate(&m, &ids, &mask, &forced).unwrap(), 199);
        assert_eq!(got, rows(&r["greedy"]["hf_generate_ids"]), "{name}");
    }
}

#[test]
fn beam_search_with_one_beam_is_greedy() {
    for name in FIXTURES {
        let (m, ids, mask, _) = load(name);
        for max_len in [1, 3, 8, 20] {
            let config = GenerateConfig::new(m.special_tokens(), max_len);
            let g = greedy(&m, &ids, &mask, &config).unwrap();
            let b = beam_search(&m, &ids, &mask, &config).unwrap();
            let ids_of =
                |v: &[Generated]| -> Vec<Vec<u32>> { v.iter().map(|x| x.ids.clone()).collect() };
            assert_eq!(ids_of(&g), ids_of(&b), "{name} max_len {max_len}");
            for (x, y) in g.iter().zip(&b) {
                assert!((x.score - y.score).abs() < 1e-4, "{} {}", x.score, y.score);
            }
        }
    }
}

/// Summed log-probability of `seq` (decoder start first) for source row `row`, by one
/// teacher-forced pass without the cache.
fn rescore(m: &MarianModel, ids: &Tensor, mask: &Tensor, row: usize, seq: &[u32]) -> f64 {
    let src = ids.narrow(0, row, 1).unwrap();
    let src_mask = mask.narrow(0, row, 1).unwrap();
    let enc = m.encode(&src, &src_mask).unwrap();
    let dec = tensor(&[seq[..seq.len() - 1].to_vec()]);
    let logits = m.decode(&dec, &enc, &src_mask).unwrap();
    let lp: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    seq[1..]
        .iter()
        .enumerate()
        .map(|(t, &tok)| f64::from(lp[t][tok as usize]))
        .sum()
}

#[test]
fn beam_search_returns_its_best_rescored_hypothesis() {
    for name in FIXTURES {
        let (m, ids, mask, _) = load(name);
        for (max_len, lp, stop) in [
            (8, 1.0, EarlyStopping::Heuristic),
            (12, 1.0, EarlyStopping::Never),
            (6, 0.0, EarlyStopping::Always),
        ] {
            let config = GenerateConfig {
                beam_size: 4,
                length_penalty: lp,
                early_stopping: stop,
                ..GenerateConfig::new(m.special_tokens(), max_len)
            };
            let all = beam_search_nbest(&m, &ids, &mask, &config).unwrap();
            let best = beam_search(&m, &ids, &mask, &config).unwrap();
            assert_eq!(all.len(), 2);
            let g = greedy(
                &m,
                &ids,
                &mask,
                &GenerateConfig::new(m.special_tokens(), max_len),
            )
            .unwrap();
            for (row, list) in all.iter().enumerate() {
                assert!(!list.is_empty() && list.len() <= 4);
                assert_eq!(list[0], best[row]);
                for w in list.windows(2) {
                    assert!(w[0].score >= w[1].score);
                }
                for h in list {
                    // The cached, reordered beams score what a fresh teacher-forced pass does.
                    let want =
                        rescore(&m, &ids, &mask, row, &h.ids) / ((h.ids.len() - 1) as f64).powf(lp);
                    assert!((h.score - want).abs() < 1e-3, "{name}: {h:?} vs {want}");
                    assert_eq!(h.ids[0], 199);
                    assert!(h.ids.len() <= max_len + 1);
                }
                // Exact search on this model does at least as well as greedy.
                if stop == EarlyStopping::Never && g[row].ids.last() == Some(&0) {
                    assert!(list[0].score >= g[row].score - 1e-6);
                }
            }
        }
    }
}

/// A model over 4 tokens (0 = EOS, 1 = A, 2 = B, 3 = start/pad) whose next-token probabilities
/// depend only on the tokens so far, as a table: the answers are known by hand.
struct Toy {
    probs: fn(&[u32]) -> [f64; 4],
}

impl Seq2Seq for Toy {
    type Cache = Vec<Vec<u32>>;

    fn encode(&self, input_ids: &Tensor, _: &Tensor) -> Result<Tensor> {
        Ok(Tensor::zeros(
            (input_ids.dim(0)?, 1, 1),
            candle_core::DType::F32,
            &Device::Cpu,
        )?)
    }

    fn new_cache(&self) -> Self::Cache {
        Vec::new()
    }

    fn decode_step(
        &self,
        ids: &Tensor,
        _: &Tensor,
        _: &Tensor,
        cache: &mut Self::Cache,
    ) -> Result<Tensor> {
        let ids: Vec<Vec<u32>> = ids.to_vec2()?;
        if cache.is_empty() {
            *cache = vec![Vec::new(); ids.len()];
        }
        let mut logits = Vec::new();
        for (prefix, id) in cache.iter_mut().zip(ids) {
            prefix.push(id[0]);
            logits.extend((self.probs)(prefix).map(|p| p.max(1e-12).ln() as f32));
        }
        Ok(Tensor::from_vec(logits, (cache.len(), 4), &Device::Cpu)?)
    }

    fn reorder_cache(&self, cache: &mut Self::Cache, indices: &Tensor) -> Result<()> {
        let idx: Vec<u32> = indices.to_vec1()?;
        *cache = idx.iter().map(|&i| cache[i as usize].clone()).collect();
        Ok(())
    }

    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            pad: 3,
            eos: 0,
            decoder_start: 3,
        }
    }

    /// Step by step through a fresh cache: the toy has no batched teacher-forced pass.
    fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        decoder_input_ids: &Tensor,
        _train: bool,
    ) -> Result<Tensor> {
        let enc = self.encode(input_ids, attention_mask)?;
        let mut cache = self.new_cache();
        let steps = (0..decoder_input_ids.dim(1)?)
            .map(|t| {
                let ids = decoder_input_ids.narrow(1, t, 1)?;
                self.decode_step(&ids, &enc, attention_mask, &mut cache)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&steps, 1)?)
    }
}

fn toy_run(toy: &Toy, beam: usize, lp: f64, max_len: usize) -> Vec<u32> {
    let src = tensor(&[vec![1u32]]);
    let config = GenerateConfig {
        beam_size: beam,
        length_penalty: lp,
        early_stopping: EarlyStopping::Never,
        ..GenerateConfig::new(toy.special_tokens(), max_len)
    };
    generate(toy, &src, &src, &config).unwrap()[0].ids.clone()
}

#[test]
fn length_penalty_decides_between_short_and_long() {
    // Stop now with p = 0.5 (log -0.69 over 1 token), or "A" then EOS with p = 0.45
    // (log -0.80 over 2 tokens).
    let toy = Toy {
        probs: |prefix| match prefix {
            [3] => [0.5, 0.45, 0.05, 0.0],
            _ => [0.999, 0.0005, 0.0005, 0.0],
        },
    };
    // No length normalization: the higher probability, the short one.
    assert_eq!(toy_run(&toy, 2, 0.0, 5), [3, 0]);
    // Per-token average: -0.40 beats -0.69, the long one.
    assert_eq!(toy_run(&toy, 2, 1.0, 5), [3, 1, 0]);
    // A negative penalty favours short outputs even more.
    assert_eq!(toy_run(&toy, 2, -1.0, 5), [3, 0]);
    // Greedy takes the most likely first token, EOS, whatever the penalty.
    assert_eq!(toy_run(&toy, 1, 1.0, 5), [3, 0]);
}

#[test]
fn beam_search_finds_what_greedy_misses_and_brute_force_confirms() {
    // Greedy picks A (0.6) but everything after A is uncertain; B (0.4) leads to a sure end.
    let toy = Toy {
        probs: |prefix| match prefix {
            [3] => [0.0, 0.6, 0.4, 0.0],
            [3, 1] => [0.3, 0.35, 0.35, 0.0],
            [3, 2] => [0.95, 0.025, 0.025, 0.0],
            _ => [0.34, 0.33, 0.33, 0.0],
        },
    };
    let max_len = 3;
    // Brute force over every sequence of A/B ending in EOS or reaching max_len.
    let mut best = (f64::NEG_INFINITY, Vec::new());
    let mut stack = vec![(vec![3u32], 0f64)];
    while let Some((seq, logp)) = stack.pop() {
        let p = (toy.probs)(&seq);
        for tok in 0..3u32 {
            let mut s = seq.clone();
            s.push(tok);
            let l = logp + p[tok as usize].max(1e-12).ln();
            if tok == 0 || s.len() == max_len + 1 {
                let score = l / (s.len() - 1) as f64;
                if score > best.0 {
                    best = (score, s);
                }
            } else {
                stack.push((s, l));
            }
        }
    }
    assert_eq!(best.1, [3, 2, 0]);
    assert_eq!(toy_run(&toy, 4, 1.0, max_len), best.1);
    assert_eq!(toy_run(&toy, 1, 1.0, max_len)[1], 1);
}

#[test]
fn bad_settings_are_errors() {
    let (m, ids, mask, _) = load("marian-tiny");
    let config = GenerateConfig {
        beam_size: 0,
        ..GenerateConfig::new(m.special_tokens(), 4)
    };
    let e = generate(&m, &ids, &mask, &config).unwrap_err().to_string();
    assert!(e.contains("beam_size"), "{e}");
    // Longer than the position table: an error, not a panic.
    let config = GenerateConfig {
        beam_size: 2,
        early_stopping: EarlyStopping::Never,
        ..GenerateConfig::new(m.special_tokens(), 100)
    };
    let e = generate(&m, &ids, &mask, &config).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

#[test]
fn t5_greedy_and_one_beam_equal_t5_greedy_and_transformers() {
    let dir = fixture("t5-tiny");
    let m = relprune_models::hf::t5::T5Model::load(&dir, &VarMap::new(), &Device::Cpu).unwrap();
    let r = reference(&dir);
    let ids = tensor(&rows(&r["inputs"]["input_ids"]));
    let mask = tensor(&rows(&r["inputs"]["attention_mask"]));
    let config = GenerateConfig::new(m.special_tokens(), 8);
    let pad = m.config().pad_token_id;
    let got = pad_rows(&generate(&m, &ids, &mask, &config).unwrap(), pad);
    assert_eq!(got, m.greedy(&ids, &mask, 8).unwrap());
    assert_eq!(got, rows(&r["greedy"]["ids"]));
    let beam = pad_rows(&beam_search(&m, &ids, &mask, &config).unwrap(), pad);
    assert_eq!(beam, got);
}
