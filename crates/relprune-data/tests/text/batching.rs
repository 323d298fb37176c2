use std::collections::BTreeMap;

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relprune_data::text::{
    gettext_en_de, tokenize_pairs, BatchConfig, Oversize, Split, TextPair, TokenBatcher,
    TokenizedPair,
};
use relprune_data::Error;

use crate::{fixture_tokenizer, ids, reference, shared_subdir, strings};

const PAD: u32 = 0;

/// A pair of `s` source and `t` target ids; ids encode (pair tag, position) so rows are traceable.
fn tp(tag: u32, s: usize, t: usize) -> TokenizedPair {
    TokenizedPair {
        source: (0..s as u32).map(|j| 1000 * tag + j + 1).collect(),
        target: (0..t as u32).map(|j| 1000 * tag + 500 + j + 1).collect(),
    }
}

/// `n` pairs of random lengths 1..=max_len on each side.
fn random_pairs(n: usize, max_len: usize, seed: u64) -> Vec<TokenizedPair> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            tp(
                i as u32,
                rng.random_range(1..=max_len),
                rng.random_range(1..=max_len),
            )
        })
        .collect()
}

fn config(max_tokens: usize, seed: u64) -> BatchConfig {
    BatchConfig {
        max_tokens,
        seed,
        ..BatchConfig::default()
    }
}

#[test]
fn every_batch_fits_the_token_budget_counting_padding_and_each_pair_comes_once() {
    let pairs = random_pairs(300, 40, 1);
    let b = TokenBatcher::new(pairs.clone(), PAD, config(120, 7)).unwrap();
    for epoch in 0..3 {
        let batches = b.epoch(epoch);
        let mut seen = vec![0usize; pairs.len()];
        for batch in &batches {
            assert!(
                batch.padded_tokens() <= 120,
                "{} rows × {}/{}",
                batch.len(),
                batch.source_len,
                batch.target_len
            );
            assert_eq!(batch.source_ids.len(), batch.len() * batch.source_len);
            assert_eq!(batch.target_ids.len(), batch.len() * batch.target_len);
            for &i in &batch.indices {
                seen[i] += 1;
            }
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "epoch {epoch}: every pair exactly once"
        );
    }
}

#[test]
fn same_seed_and_epoch_give_identical_batches_and_other_epochs_or_seeds_differ() {
    // Few distinct lengths, so many pairs tie and can be regrouped.
    let pairs = random_pairs(200, 5, 2);
    let a = TokenBatcher::new(pairs.clone(), PAD, config(12, 11)).unwrap();
    let again = TokenBatcher::new(pairs.clone(), PAD, config(12, 11)).unwrap();
    let other_seed = TokenBatcher::new(pairs, PAD, config(12, 12)).unwrap();
    // Epoch 3 directly equals epoch 3 after epochs 0..3: nothing depends on earlier epochs.
    for e in 0..3 {
        let _ = a.epoch(e);
    }
    assert_eq!(a.epoch(3), again.epoch(3));
    assert_eq!(a.plan(Some(3)), again.plan(Some(3)));
    assert_ne!(a.plan(Some(3)), a.plan(Some(4)));
    assert_ne!(a.plan(Some(3)), other_seed.plan(Some(3)));
    // Not only the batch order changes: equal-length pairs are regrouped.
    let sorted = |mut p: Vec<Vec<usize>>| {
        p.iter_mut().for_each(|b| b.sort_unstable());
        p.sort();
        p
    };
    assert_ne!(sorted(a.plan(Some(3))), sorted(a.plan(Some(4))));
}

#[test]
fn batches_group_pairs_of_similar_length() {
    // Four short pairs (2 tokens), four long ones (10): with a budget of 20 the short ones share
    // one batch and the long ones go two by two; no batch mixes them.
    let mut pairs: Vec<TokenizedPair> = (0..4).map(|i| tp(i, 10, 3)).collect();
    pairs.extend((4..8).map(|i| tp(i, 2, 1)));
    let b = TokenBatcher::new(pairs, PAD, config(20, 3)).unwrap();
    for plan in [b.plan(None), b.plan(Some(0)), b.plan(Some(1))] {
        let mut shapes: Vec<Vec<usize>> = plan
            .iter()
            .map(|batch| {
                let mut v: Vec<usize> = batch.iter().map(|&i| b.pairs()[i].max_len()).collect();
                v.sort_unstable();
                v
            })
            .collect();
        shapes.sort();
        assert_eq!(shapes, vec![vec![2, 2, 2, 2], vec![10, 10], vec![10, 10]]);
    }
    // Unshuffled: length order, short batch first.
    let in_order = b.in_order();
    assert_eq!(in_order[0].source_len, 2);
    assert_eq!(in_order[0].indices, vec![4, 5, 6, 7]);
}

#[test]
fn padding_uses_the_pad_id_and_masks_mark_the_real_tokens() {
    let pairs = vec![tp(1, 3, 1), tp(2, 1, 2)];
    let b = TokenBatcher::new(pairs, 9, config(100, 0)).unwrap();
    let batch = b.batch(&[0, 1]).unwrap();
    assert_eq!((batch.source_len, batch.target_len), (3, 2));
    assert_eq!(batch.source_ids, vec![1001, 1002, 1003, 2001, 9, 9]);
    assert_eq!(batch.source_mask, vec![1, 1, 1, 1, 0, 0]);
    assert_eq!(batch.target_ids, vec![1501, 9, 2501, 2502]);
    assert_eq!(batch.target_mask, vec![1, 0, 1, 1]);
    assert_eq!(batch.pad_id, 9);
    assert_eq!(batch.padded_tokens(), 6);
    assert_eq!(batch.decoder_inputs(7), vec![7, 1501, 7, 2501]);
    assert!(b.batch(&[]).is_err());
    let err = b.batch(&[0, 2]).unwrap_err().to_string();
    assert!(err.contains("index 2 is out of range for 2 pairs"), "{err}");
}

#[test]
fn oversize_pairs_are_an_error_or_skipped_or_get_their_own_batch() {
    let pairs = vec![tp(0, 3, 3), tp(1, 4, 12), tp(2, 2, 2), tp(3, 3, 1)];
    let err = TokenBatcher::new(pairs.clone(), PAD, config(10, 0)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(
        msg.contains("pair 1 has 4 source and 12 target ids") && msg.contains("max_tokens = 10"),
        "{msg}"
    );

    let skip = BatchConfig {
        oversize: Oversize::Skip,
        ..config(10, 0)
    };
    let b = TokenBatcher::new(pairs.clone(), PAD, skip).unwrap();
    assert_eq!(b.skipped_oversize(), &[1]);
    let all: Vec<usize> = b.plan(Some(0)).concat();
    assert_eq!(all.len(), 3);
    assert!(!all.contains(&1));

    let own = BatchConfig {
        oversize: Oversize::OwnBatch,
        ..config(10, 0)
    };
    let b = TokenBatcher::new(pairs, PAD, own).unwrap();
    let plan = b.plan(Some(0));
    assert!(plan.contains(&vec![1]), "{plan:?}");
    for batch in b.epoch(0) {
        assert!(batch.padded_tokens() <= 10 || batch.indices == [1]);
    }

    let only = BatchConfig {
        oversize: Oversize::Skip,
        ..config(2, 0)
    };
    let err = TokenBatcher::new(vec![tp(0, 3, 3)], PAD, only)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no pairs to batch (1 given, 1 skipped"),
        "{err}"
    );
}

#[test]
fn empty_sides_a_zero_budget_and_a_zero_cap_are_rejected() {
    let err = TokenBatcher::new(vec![tp(0, 2, 2), tp(1, 3, 0)], PAD, config(10, 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pair 1 has 3 source and 0 target ids"),
        "{err}"
    );
    assert!(TokenBatcher::new(vec![tp(0, 1, 1)], PAD, config(0, 0)).is_err());
    let cap0 = BatchConfig {
        max_batch_size: Some(0),
        ..config(10, 0)
    };
    assert!(TokenBatcher::new(vec![tp(0, 1, 1)], PAD, cap0).is_err());
    assert!(TokenBatcher::new(Vec::new(), PAD, config(10, 0)).is_err());
}

#[test]
fn max_batch_size_caps_the_rows_of_a_batch() {
    let pairs: Vec<TokenizedPair> = (0..10).map(|i| tp(i, 1, 1)).collect();
    let capped = BatchConfig {
        max_batch_size: Some(4),
        ..config(1000, 0)
    };
    let b = TokenBatcher::new(pairs, PAD, capped).unwrap();
    let mut sizes: Vec<usize> = b.plan(Some(0)).iter().map(Vec::len).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![2, 4, 4]);
}

#[test]
fn to_tensors_gives_u32_ids_and_u8_masks_of_the_batch_shape() {
    let b = TokenBatcher::new(vec![tp(1, 3, 1), tp(2, 1, 2)], PAD, config(100, 0)).unwrap();
    let batch = b.batch(&[1, 0]).unwrap();
    let t = batch.to_tensors(&Device::Cpu).unwrap();
    assert_eq!(t.source_ids.dims(), &[2, 3]);
    assert_eq!(t.target_ids.dims(), &[2, 2]);
    assert_eq!(t.source_ids.dtype(), DType::U32);
    assert_eq!(t.source_mask.dtype(), DType::U8);
    assert_eq!(
        t.source_ids.to_vec2::<u32>().unwrap(),
        vec![vec![2001, 0, 0], vec![1001, 1002, 1003]]
    );
    assert_eq!(
        t.target_mask.to_vec2::<u8>().unwrap(),
        vec![vec![1, 1], vec![1, 0]]
    );
}

/// The reference pair of the Marian and T5 fixtures, tokenized and batched: the rows are the
/// reference `input_ids` (padded with the model's pad id) and the decoder inputs begin like the
/// reference `decoder_input_ids`.
#[test]
fn fixture_pairs_batch_into_the_reference_input_ids_and_decoder_inputs() {
    for model in ["marian-tiny", "t5-tiny"] {
        let tok = fixture_tokenizer(model);
        let r = reference(model);
        let pairs: Vec<TextPair> = strings(&r["source_texts"])
            .into_iter()
            .zip(strings(&r["target_texts"]))
            .map(|(source, target)| TextPair { source, target })
            .collect();
        let tokenized = tokenize_pairs(&pairs, &tok, &tok).unwrap();
        let b = TokenBatcher::new(tokenized, tok.require_pad_id().unwrap(), config(64, 0)).unwrap();
        let batch = b.batch(&[0, 1]).unwrap();
        let want: Vec<u32> = (0..2).flat_map(|i| ids(&r["input_ids"][i])).collect();
        assert_eq!(batch.source_ids, want, "{model}");
        let want_mask: Vec<u8> = (0..2)
            .flat_map(|i| ids(&r["attention_mask"][i]))
            .map(|m| m as u8)
            .collect();
        assert_eq!(batch.source_mask, want_mask, "{model}");
        let start = r["decoder_start_token_id"].as_u64().unwrap() as u32;
        let dec = batch.decoder_inputs(start);
        for i in 0..2 {
            let want = ids(&r["decoder_input_ids"][i]);
            let row = &dec[i * batch.target_len..][..want.len()];
            assert_eq!(row, want.as_slice(), "{model} row {i}");
        }
    }
}

/// The real gettext-en-de validation split through the Marian fixture's tokenizer (tiny
/// vocabulary, so mostly characters and `<unk>`) into budgeted batches.
#[test]
fn real_gettext_valid_split_tokenizes_and_batches_within_the_budget() {
    let Some(dir) = shared_subdir("data/gettext-en-de") else {
        return;
    };
    let valid = gettext_en_de(&dir, Split::Valid).unwrap();
    let tok = fixture_tokenizer("marian-tiny");
    let tokenized = tokenize_pairs(&valid.pairs, &tok, &tok).unwrap();
    assert!(tokenized
        .iter()
        .all(|p| p.source.last() == Some(&0) && p.target.last() == Some(&0)));
    let cfg = BatchConfig {
        oversize: Oversize::Skip,
        ..config(2048, 5)
    };
    let b = TokenBatcher::new(tokenized, 199, cfg).unwrap();
    let batches = b.epoch(0);
    let rows: usize = batches.iter().map(|b| b.len()).sum();
    assert_eq!(rows + b.skipped_oversize().len(), 1000);
    let mut by_len: BTreeMap<usize, usize> = BTreeMap::new();
    for batch in &batches {
        assert!(batch.padded_tokens() <= 2048);
        *by_len
            .entry(batch.source_len.max(batch.target_len))
            .or_default() += 1;
        let real: usize = batch.source_mask.iter().map(|&m| m as usize).sum();
        let want: usize = batch
            .indices
            .iter()
            .map(|&i| b.pairs()[i].source.len())
            .sum();
        assert_eq!(real, want);
    }
    // Bucketing keeps padding low: most batches are far from a 1-row worst case.
    assert!(batches.len() < 100, "{} batches", batches.len());
}
