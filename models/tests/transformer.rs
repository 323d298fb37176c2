//! The from-scratch Transformer: shapes, tying, masking, caching, gradients, and that it learns.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use relprune_models::hf::generate::{beam_search, greedy, GenerateConfig, Seq2Seq};
use relprune_models::transformer::{
    parameter_shapes, DecoderCache, Embeddings, Positions, Transformer, TransformerConfig,
};
use relprune_models::Error;

const PAD: u32 = 0;
const BOS: u32 = 1;
const EOS: u32 = 2;

fn tiny(embeddings: Embeddings, positions: Positions, pre_norm: bool) -> TransformerConfig {
    TransformerConfig {
        src_vocab: 12,
        tgt_vocab: if embeddings == Embeddings::Separate {
            14
        } else {
            12
        },
        d_model: 16,
        heads: 4,
        ffn_dim: 32,
        encoder_layers: 2,
        decoder_layers: 2,
        dropout: 0.1,
        attention_dropout: 0.1,
        positions,
        max_len: 16,
        embeddings,
        pre_norm,
        scale_embedding: true,
        pad_id: PAD,
        bos_id: BOS,
        eos_id: EOS,
    }
}

fn build(config: TransformerConfig) -> (Transformer, VarMap) {
    let vm = VarMap::new();
    let model = Transformer::new(config, &vm, 7, &Device::Cpu).unwrap();
    (model, vm)
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let (b, l) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, l), &Device::Cpu).unwrap()
}

/// Two sources, the second right-padded, and their masks.
fn batch() -> (Tensor, Tensor, Tensor) {
    let src = ids(&[&[5, 6, 7, 8, 2], &[9, 4, 2, 0, 0]]);
    let mask = ids(&[&[1, 1, 1, 1, 1], &[1, 1, 1, 0, 0]]);
    let tgt = ids(&[&[1, 3, 4, 5], &[1, 6, 7, 8]]);
    (src, mask, tgt)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn all_variants() -> Vec<TransformerConfig> {
    let mut out = Vec::new();
    for e in [
        Embeddings::Separate,
        Embeddings::SharedSourceTarget,
        Embeddings::SharedAll,
    ] {
        for p in [Positions::Sinusoidal, Positions::Learned { max_len: 20 }] {
            for pre in [false, true] {
                out.push(tiny(e, p, pre));
            }
        }
    }
    out
}

#[test]
fn logits_have_the_right_shape_for_every_variant() {
    let (src, mask, tgt) = batch();
    for config in all_variants() {
        let v = config.tgt_vocab;
        let (model, vm) = build(config.clone());
        for train in [false, true] {
            let logits = model.forward_t(&src, &mask, &tgt, train).unwrap();
            assert_eq!(logits.dims(), &[2, 4, v], "{config:?}");
            let vals: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            assert!(vals.iter().all(|x| x.is_finite()), "{config:?}");
        }
        // The VarMap holds exactly the listed parameters, with their shapes.
        let data = vm.data().lock().unwrap();
        let shapes = parameter_shapes(&config);
        assert_eq!(data.len(), shapes.len(), "{config:?}");
        for (name, shape) in shapes {
            assert_eq!(data[&name].as_tensor().dims(), shape.as_slice(), "{name}");
        }
    }
}

#[test]
fn training_dropout_repeats_per_seeded_stream_and_inference_has_none() {
    let (src, mask, tgt) = batch();
    let config = tiny(Embeddings::SharedAll, Positions::Sinusoidal, true);
    let (a, _) = build(config.clone());
    let (b, _) = build(config);
    let logits = |m: &Transformer, stream: u64| {
        m.seed_dropout(stream);
        m.forward_t(&src, &mask, &tgt, true).unwrap()
    };
    // Two models of one seed draw the same masks on the same stream: training repeats.
    let first = logits(&a, 5);
    assert_eq!(max_diff(&first, &logits(&b, 5)), 0.0);
    assert_eq!(max_diff(&first, &logits(&a, 5)), 0.0);
    // Another stream (the next epoch) draws other masks.
    assert!(max_diff(&first, &logits(&a, 6)) > 1e-4);
    let eval = a.forward_t(&src, &mask, &tgt, false).unwrap();
    assert!(max_diff(&first, &eval) > 1e-4, "dropout did nothing");
    assert_eq!(
        max_diff(&eval, &b.forward_t(&src, &mask, &tgt, false).unwrap()),
        0.0
    );
}

#[test]
fn parameter_names_follow_the_pytorch_layout() {
    let (_, vm) = build(tiny(
        Embeddings::Separate,
        Positions::Learned { max_len: 16 },
        true,
    ));
    let data = vm.data().lock().unwrap();
    for name in [
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "output_projection.weight",
        "encoder.embed_positions.weight",
        "decoder.embed_positions.weight",
        "encoder.layers.1.self_attn.q_proj.weight",
        "encoder.layers.1.self_attn.out_proj.bias",
        "encoder.layers.0.self_attn_layer_norm.weight",
        "encoder.layers.0.fc1.weight",
        "encoder.layers.0.fc2.bias",
        "encoder.layers.0.final_layer_norm.bias",
        "decoder.layers.1.encoder_attn.k_proj.weight",
        "decoder.layers.1.encoder_attn_layer_norm.weight",
        "encoder.layer_norm.weight",
        "decoder.layer_norm.bias",
    ] {
        assert!(data.contains_key(name), "missing {name}");
    }
    // The pad row of an embedding starts at zero.
    let emb = data["encoder.embed_tokens.weight"].as_tensor();
    let row: Vec<f32> = emb.get(PAD as usize).unwrap().to_vec1().unwrap();
    assert!(row.iter().all(|&x| x == 0.0));
}

/// Sum of |gradient| of `rows` of a (V, D) gradient.
fn row_grad(g: &Tensor, row: usize) -> f32 {
    g.get(row)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn tied_tables_are_one_variable_fed_by_every_use() {
    // Source-only token 11 and target-only token 10; token 9 appears nowhere.
    let src = ids(&[&[11, 5, 2]]);
    let mask = ids(&[&[1, 1, 1]]);
    let tgt_in = ids(&[&[1, 10, 3]]);
    let tgt_out = Tensor::from_vec(vec![10u32, 3, 2], 3, &Device::Cpu).unwrap();
    for (e, want_names) in [
        (Embeddings::SharedSourceTarget, 2),
        (Embeddings::SharedAll, 1),
    ] {
        let mut config = tiny(e, Positions::Sinusoidal, false);
        config.dropout = 0.0;
        config.attention_dropout = 0.0;
        let (model, vm) = build(config);
        let data = vm.data().lock().unwrap();
        let tables: Vec<&String> = data
            .keys()
            .filter(|n| n.contains("embed_tokens") || n.starts_with("output_projection"))
            .collect();
        assert_eq!(tables.len(), want_names, "{e:?}: {tables:?}");
        assert!(!data.contains_key("decoder.embed_tokens.weight"));
        let table = data["encoder.embed_tokens.weight"].as_tensor().clone();
        drop(data);
        let logits = model.forward_t(&src, &mask, &tgt_in, false).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits.squeeze(0).unwrap(), &tgt_out).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(&table).expect("the shared table has a gradient");
        assert!(row_grad(g, 11) > 0.0, "{e:?}: source use reaches the table");
        assert!(row_grad(g, 10) > 0.0, "{e:?}: target use reaches the table");
        let unused = row_grad(g, 9);
        if e == Embeddings::SharedAll {
            assert!(unused > 0.0, "the output projection use reaches the table");
        } else {
            assert_eq!(unused, 0.0);
        }
    }
}

#[test]
fn padded_source_tokens_do_not_change_real_positions() {
    let (src, mask, tgt) = batch();
    let other = ids(&[&[5, 6, 7, 8, 2], &[9, 4, 2, 11, 7]]);
    for config in all_variants() {
        let (model, _) = build(config.clone());
        let a = model.forward_t(&src, &mask, &tgt, false).unwrap();
        let b = model.forward_t(&other, &mask, &tgt, false).unwrap();
        // Every target position only sees real source positions.
        assert!(max_diff(&a, &b) < 1e-5, "{config:?}");
        let ea = model.encode(&src, &mask).unwrap().narrow(1, 0, 3).unwrap();
        let eb = model
            .encode(&other, &mask)
            .unwrap()
            .narrow(1, 0, 3)
            .unwrap();
        assert!(max_diff(&ea, &eb) < 1e-5, "{config:?}");
    }
}

#[test]
fn decoder_is_causal() {
    let (src, mask, tgt) = batch();
    let changed = ids(&[&[1, 3, 9, 11], &[1, 6, 7, 3]]);
    for config in all_variants() {
        let (model, _) = build(config.clone());
        let a = model.forward_t(&src, &mask, &tgt, false).unwrap();
        let b = model.forward_t(&src, &mask, &changed, false).unwrap();
        // Row 0 changed from position 2, row 1 at position 3.
        let same = |row: usize, upto: usize| {
            let x = a.get(row).unwrap().narrow(0, 0, upto).unwrap();
            let y = b.get(row).unwrap().narrow(0, 0, upto).unwrap();
            max_diff(&x, &y)
        };
        assert!(same(0, 2) < 1e-5, "{config:?}");
        assert!(same(1, 3) < 1e-5, "{config:?}");
        // ... and the changed positions do change.
        assert!(max_diff(&a, &b) > 1e-3);
    }
}

#[test]
fn target_padding_is_hidden_from_later_positions() {
    let (src, mask, _) = batch();
    let config = tiny(Embeddings::Separate, Positions::Sinusoidal, true);
    let (model, vm) = build(config);
    let with_pad = ids(&[&[1, 0, 4], &[1, 0, 7]]);
    let before = model.forward_t(&src, &mask, &with_pad, false).unwrap();
    // Changing the pad token's embedding changes what a pad key would carry; hidden, it cannot
    // reach the other positions (only the pad position's own query sees it).
    let table = vm.data().lock().unwrap()["decoder.embed_tokens.weight"].clone();
    let mut rows: Vec<Vec<f32>> = table.as_tensor().to_vec2().unwrap();
    // Not a constant row: layer norm would remove a constant shift.
    for (i, x) in rows[PAD as usize].iter_mut().enumerate() {
        *x = (i % 3) as f32 - 1.0;
    }
    let (v, d) = (rows.len(), rows[0].len());
    table
        .set(&Tensor::from_vec(rows.concat(), (v, d), &Device::Cpu).unwrap())
        .unwrap();
    let after = model.forward_t(&src, &mask, &with_pad, false).unwrap();
    for t in [0, 2] {
        let x = before.narrow(1, t, 1).unwrap();
        let y = after.narrow(1, t, 1).unwrap();
        assert!(max_diff(&x, &y) < 1e-5, "position {t}");
    }
    assert!(
        max_diff(
            &before.narrow(1, 1, 1).unwrap(),
            &after.narrow(1, 1, 1).unwrap()
        ) > 1e-4
    );
    // Cached decoding, fed the same tokens one by one, remembers the pad mask and agrees.
    let enc = model.encode(&src, &mask).unwrap();
    let mut cache = DecoderCache::new(&model);
    let mut steps = Vec::new();
    for t in 0..3 {
        let step = with_pad.narrow(1, t, 1).unwrap();
        steps.push(model.decode_step(&step, &enc, &mask, &mut cache).unwrap());
    }
    let inc = Tensor::cat(&steps, 1).unwrap();
    assert!(max_diff(&after, &inc) < 1e-5);
}

#[test]
fn cached_incremental_decoding_equals_full_decode() {
    let (src, mask, tgt) = batch();
    for config in all_variants() {
        let (model, _) = build(config.clone());
        let full = model.forward_t(&src, &mask, &tgt, false).unwrap();
        let enc = model.encode(&src, &mask).unwrap();
        let mut cache = DecoderCache::new(&model);
        let mut steps = Vec::new();
        // One token, then two at once, then one: any split gives the same logits.
        for (start, len) in [(0, 1), (1, 2), (3, 1)] {
            let part = tgt.narrow(1, start, len).unwrap();
            steps.push(model.decode_step(&part, &enc, &mask, &mut cache).unwrap());
        }
        assert_eq!(cache.len(), 4);
        let inc = Tensor::cat(&steps, 1).unwrap();
        let d = max_diff(&full, &inc);
        assert!(d < 1e-5, "{config:?}: {d}");

        // Reordering the cache swaps the rows' continuations.
        let mut a = DecoderCache::new(&model);
        model
            .decode_step(&tgt.narrow(1, 0, 2).unwrap(), &enc, &mask, &mut a)
            .unwrap();
        let mut swapped = a.clone();
        let idx = Tensor::from_vec(vec![1u32, 0], 2, &Device::Cpu).unwrap();
        swapped.reorder(&idx).unwrap();
        let next = tgt.narrow(1, 2, 1).unwrap().contiguous().unwrap();
        let la = model.decode_step(&next, &enc, &mask, &mut a).unwrap();
        // The cache's encoder rows moved with it; the source mask must move the same way.
        let ls = model
            .decode_step(
                &next.index_select(&idx, 0).unwrap(),
                &enc,
                &mask.index_select(&idx, 0).unwrap(),
                &mut swapped,
            )
            .unwrap();
        let d = max_diff(&la.index_select(&idx, 0).unwrap(), &ls);
        assert!(d < 1e-5, "{config:?}: {d}");
    }
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let (src, mask, tgt) = batch();
    let tgt_out = ids(&[&[3, 4, 5, 2], &[6, 7, 8, 2]]);
    for config in all_variants() {
        let (model, vm) = build(config.clone());
        let logits = model.forward_t(&src, &mask, &tgt, true).unwrap();
        let v = logits.dim(D::Minus1).unwrap();
        let loss = candle_nn::loss::cross_entropy(
            &logits.reshape(((), v)).unwrap(),
            &tgt_out.flatten_all().unwrap(),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vm.data().lock().unwrap().iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{config:?}: no gradient for {name}"));
            let vals: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(vals.iter().all(|x| x.is_finite()), "{name}");
            assert!(
                vals.iter().any(|&x| x != 0.0),
                "{config:?}: zero gradient {name}"
            );
        }
    }
}

/// A random copy-task batch: sources `seq EOS`, decoder inputs `BOS seq`, targets `seq EOS`.
fn copy_batch(rng: &mut StdRng, n: usize, len: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(3..vocab)).collect())
        .collect()
}

fn tensor(rows: &[Vec<u32>]) -> Tensor {
    let (b, l) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, l), &Device::Cpu).unwrap()
}

/// Trains `config` (vocab 12, max_len ≥ 7) on the copy task for `steps` AdamW steps of 32
/// random length-5 sequences and checks that the loss falls below a fifth of its start and that
/// greedy decoding copies at least 90% of 32 held-out sequences (never trained on) exactly.
/// Returns the model and the held-out sources.
fn learns_to_copy(config: TransformerConfig, steps: usize, lr: f64) -> (Transformer, Tensor) {
    let started = Instant::now();
    let (vocab, len) = (config.src_vocab as u32, 5usize);
    let what = format!(
        "{:?}/{:?}/pre_norm {}",
        config.embeddings, config.positions, config.pre_norm
    );
    let (model, vm) = build(config);
    let mut opt = candle_nn::AdamW::new(
        vm.all_vars(),
        candle_nn::ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let held_out = copy_batch(&mut rng, 32, len, vocab);
    let mut first = None;
    let mut last = f32::NAN;
    for _ in 0..steps {
        let mut seqs = copy_batch(&mut rng, 32, len, vocab);
        seqs.retain(|s| !held_out.contains(s));
        let src: Vec<Vec<u32>> = seqs.iter().map(|s| [&s[..], &[EOS]].concat()).collect();
        let tgt_in: Vec<Vec<u32>> = seqs.iter().map(|s| [&[BOS], &s[..]].concat()).collect();
        let src = tensor(&src);
        let mask = src.ones_like().unwrap();
        // Targets = sources here (`seq EOS`).
        let tgt_out = src.flatten_all().unwrap();
        let logits = model
            .forward_t(&src, &mask, &tensor(&tgt_in), true)
            .unwrap();
        let loss = candle_nn::loss::cross_entropy(
            &logits.reshape(((), vocab as usize)).unwrap(),
            &tgt_out,
        )
        .unwrap();
        opt.backward_step(&loss).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        first.get_or_insert(last);
    }
    let first = first.unwrap();
    assert!(last < 0.2 * first, "{what}: loss {first} -> {last}");

    let src: Vec<Vec<u32>> = held_out.iter().map(|s| [&s[..], &[EOS]].concat()).collect();
    let src = tensor(&src);
    let mask = src.ones_like().unwrap();
    let gen = GenerateConfig::new(model.special_tokens(), len + 2);
    let out = greedy(&model, &src, &mask, &gen).unwrap();
    let correct = out
        .iter()
        .zip(&held_out)
        .filter(|(g, s)| g.tokens() == [&s[..], &[EOS]].concat().as_slice())
        .count();
    eprintln!(
        "copy task {what}: loss {first:.3} -> {last:.3}, greedy {correct}/{} exact, {:.1?}",
        held_out.len(),
        started.elapsed()
    );
    assert!(
        correct * 10 >= held_out.len() * 9,
        "{what}: {correct}/{}",
        held_out.len()
    );
    (model, src)
}

fn copy_config(embeddings: Embeddings, positions: Positions, pre_norm: bool) -> TransformerConfig {
    TransformerConfig {
        src_vocab: 12,
        tgt_vocab: 12,
        d_model: 32,
        heads: 4,
        ffn_dim: 64,
        encoder_layers: 2,
        decoder_layers: 2,
        dropout: 0.0,
        attention_dropout: 0.0,
        positions,
        max_len: 16,
        embeddings,
        pre_norm,
        scale_embedding: true,
        pad_id: PAD,
        bos_id: BOS,
        eos_id: EOS,
    }
}

#[test]
fn pre_norm_tied_model_learns_to_copy() {
    let config = copy_config(Embeddings::SharedAll, Positions::Sinusoidal, true);
    let (model, src) = learns_to_copy(config, 200, 3e-3);
    // Beam search runs on it too and agrees with greedy on these easy inputs.
    let src = src.narrow(0, 0, 4).unwrap();
    let mask = src.ones_like().unwrap();
    let gen = GenerateConfig::new(model.special_tokens(), 7);
    let greedy_out = greedy(&model, &src, &mask, &gen).unwrap();
    let beams = beam_search(
        &model,
        &src,
        &mask,
        &GenerateConfig {
            beam_size: 3,
            ..gen
        },
    )
    .unwrap();
    for (b, g) in beams.iter().zip(&greedy_out) {
        assert_eq!(b.tokens(), g.tokens());
    }
}

#[test]
fn post_norm_untied_model_learns_to_copy() {
    let config = copy_config(
        Embeddings::Separate,
        Positions::Learned { max_len: 16 },
        false,
    );
    learns_to_copy(config, 200, 3e-3);
}

fn config_err(config: TransformerConfig) -> String {
    match Transformer::new(config, &VarMap::new(), 0, &Device::Cpu) {
        Err(Error::Config(msg)) => msg,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("accepted a bad config"),
    }
}

/// A change to a valid config.
type Edit = Box<dyn Fn(&mut TransformerConfig)>;

#[test]
fn bad_configs_are_errors() {
    let ok = tiny(Embeddings::Separate, Positions::Sinusoidal, false);
    ok.validate().unwrap();
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c.heads = 3), "divisible"),
        (Box::new(|c| c.heads = 0), "divisible"),
        (
            Box::new(|c| c.embeddings = Embeddings::SharedAll),
            "equal vocabularies",
        ),
        (
            Box::new(|c| c.embeddings = Embeddings::SharedSourceTarget),
            "equal vocabularies",
        ),
        (Box::new(|c| c.dropout = 1.0), "dropout"),
        (
            Box::new(|c| c.attention_dropout = f32::NAN),
            "attention_dropout",
        ),
        (Box::new(|c| c.encoder_layers = 0), "at least 1"),
        (
            Box::new(|c| c.positions = Positions::Learned { max_len: 4 }),
            "fewer than max_len",
        ),
        (Box::new(|c| c.eos_id = 12), "outside"),
        (Box::new(|c| c.bos_id = c.pad_id), "bos_id equals pad_id"),
        (Box::new(|c| c.max_len = 0), "max_len"),
        (Box::new(|c| c.src_vocab = 0), "positive"),
    ];
    for (edit, want) in cases {
        let mut c = ok.clone();
        edit(&mut c);
        let msg = config_err(c);
        assert!(msg.contains(want), "{msg:?} should mention {want:?}");
    }
    // A model refuses inputs longer than max_len, and a VarMap that already holds its names.
    let (model, vm) = build(ok.clone());
    let long = Tensor::ones((1, 17), DType::U32, &Device::Cpu).unwrap();
    assert!(model.forward_t(&long, &long, &ids(&[&[1]]), false).is_err());
    let again = Transformer::new(ok.clone(), &vm, 0, &Device::Cpu);
    assert!(matches!(again, Err(Error::Config(m)) if m.contains("already holds")));
    // Out-of-vocabulary tokens are errors, not garbage.
    let oov = ids(&[&[13]]);
    assert!(model
        .forward_t(&oov, &oov.ones_like().unwrap(), &ids(&[&[1]]), false)
        .is_err());
}

#[test]
fn config_round_trips_through_json() {
    let c = tiny(
        Embeddings::SharedAll,
        Positions::Learned { max_len: 20 },
        true,
    );
    let text = serde_json::to_string(&c).unwrap();
    let back: TransformerConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, c);
    let base = TransformerConfig::base(100, 100);
    base.validate().unwrap();
}
