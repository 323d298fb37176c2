//! `Seq2SeqTask` on a tiny from-scratch Transformer: batching, training steps, decoding order,
//! the BLEU metric and its errors.

use candle_core::Device;
use candle_nn::VarMap;
use relprune_data::text::{train_bpe, BpeOptions, TokenizedPair};
use relprune_eval::{corpus_bleu, BleuConfig};
use relprune_models::transformer::{Embeddings, Transformer, TransformerConfig};
use relprune_prune::{Split, Task};
use relprune_tasks::seq2seq::{DecodeConfig, EvalSplit, Seq2SeqConfig, Seq2SeqTask};

const SENTENCES: [&str; 8] = [
    "open the file",
    "save the document now",
    "close",
    "print the page",
    "open a new window please",
    "quit",
    "copy the selected text to the clipboard",
    "paste",
];

fn task_with_vars(decode_batch: usize) -> (Seq2SeqTask<Transformer>, VarMap) {
    let tok = train_bpe(
        SENTENCES.iter().copied(),
        &BpeOptions {
            vocab_size: 80,
            ..BpeOptions::default()
        },
    )
    .unwrap();
    let pairs: Vec<TokenizedPair> = SENTENCES
        .iter()
        .map(|s| {
            let ids = tok.encode(s).unwrap();
            TokenizedPair {
                source: ids.clone(),
                target: ids,
            }
        })
        .collect();
    let refs: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let config = TransformerConfig {
        d_model: 16,
        heads: 2,
        ffn_dim: 32,
        encoder_layers: 1,
        decoder_layers: 1,
        dropout: 0.0,
        max_len: 64,
        embeddings: Embeddings::SharedAll,
        pre_norm: true,
        ..TransformerConfig::base(tok.vocab_size(), tok.vocab_size())
    };
    let vm = VarMap::new();
    let model = Transformer::new(config, &vm, 3, &Device::Cpu).unwrap();
    let split = EvalSplit::new(pairs.clone(), refs).unwrap();
    let t = Seq2SeqTask::new(
        model,
        tok,
        pairs,
        split.clone(),
        split,
        Seq2SeqConfig {
            decode: DecodeConfig {
                batch_size: decode_batch,
                max_len_b: 4,
                ..DecodeConfig::default()
            },
            ..Seq2SeqConfig::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    (t, vm)
}

fn task(decode_batch: usize) -> Seq2SeqTask<Transformer> {
    task_with_vars(decode_batch).0
}

#[test]
fn translations_come_back_in_input_order_whatever_the_decoding_batch() {
    let one = task(1).translate(Split::Valid).unwrap();
    let three = task(3).translate(Split::Valid).unwrap();
    assert_eq!(one.len(), SENTENCES.len());
    assert_eq!(one, three);
}

#[test]
fn evaluation_reports_token_loss_and_the_bleu_of_the_translations() {
    let mut t = task(4);
    assert_eq!(t.metric().name, "bleu");
    assert!(t.metric().higher_is_better);
    let e = t.evaluate(Split::Test).unwrap();
    // An untrained model over a vocabulary of ≤ 80: loss near ln(80) ≈ 4.4.
    assert!(e.loss.is_finite() && e.loss > 2.0 && e.loss < 8.0, "{e:?}");
    let hyps = t.translate(Split::Test).unwrap();
    let refs = [SENTENCES.map(String::from).to_vec()];
    let want = corpus_bleu(&hyps, &refs, &BleuConfig::default()).unwrap();
    assert_eq!(e.metric, want.score);
}

#[test]
fn training_batches_give_differentiable_losses_and_epochs_are_reproducible() {
    let (mut t, vm) = task_with_vars(4);
    let n = t.begin_epoch(1).unwrap();
    assert!(n >= 1);
    let loss = t.batch_loss(0).unwrap();
    let grads = loss.backward().unwrap();
    // The shared embedding (input tables and output projection) and an attention projection
    // get gradients from the label-smoothed loss.
    let data = vm.data().lock().unwrap();
    for name in [
        "encoder.embed_tokens.weight",
        "decoder.layers.0.encoder_attn.k_proj.weight",
    ] {
        let g = grads.get(data[name].as_tensor()).expect(name);
        let norm = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}");
    }
    drop(data);
    let a = t.batch_loss(0).unwrap().to_scalar::<f32>().unwrap();
    t.begin_epoch(2).unwrap();
    t.begin_epoch(1).unwrap();
    let b = t.batch_loss(0).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(a, b, "epoch 1's first batch must be the same batch again");
    assert!(t.batch_loss(n).is_err(), "past the end of the epoch");
}

#[test]
fn mismatched_or_empty_splits_are_errors() {
    let p = TokenizedPair {
        source: vec![4, 2],
        target: vec![4, 2],
    };
    assert!(EvalSplit::new(vec![p.clone()], vec![]).is_err());
    assert!(EvalSplit::new(vec![], vec![]).is_err());
    assert!(EvalSplit::new(vec![p], vec!["x".into()]).is_ok());
}
