//! T5 against the logits `transformers` wrote, plus loading, caching and gradient checks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use relprune_models::hf::t5::{relative_position_bucket, DecoderCache, T5Config, T5Model};
use relprune_models::{checkpoint, Error};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn reference(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Flattens nested JSON number arrays.
fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        other => panic!("not a number array: {other}"),
    }
}

fn ids(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| flat(r).into_iter().map(|x| x as u32).collect())
        .collect();
    let (b, l) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, l), &Device::Cpu).unwrap()
}

fn max_abs_diff(t: &Tensor, want: &[f64]) -> f64 {
    let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

fn tensor_diff(a: &Tensor, b: &Tensor) -> f32 {
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

fn load(dir: &Path) -> (T5Model, VarMap) {
    let vm = VarMap::new();
    let m = T5Model::load(dir, &vm, &Device::Cpu).unwrap();
    (m, vm)
}

struct Inputs {
    input_ids: Tensor,
    attention_mask: Tensor,
    decoder_input_ids: Tensor,
}

fn inputs(r: &Value) -> Inputs {
    Inputs {
        input_ids: ids(&r["inputs"]["input_ids"]),
        attention_mask: ids(&r["inputs"]["attention_mask"]),
        decoder_input_ids: ids(&r["inputs"]["decoder_input_ids"]),
    }
}

#[test]
fn logits_and_encoder_state_match_transformers() {
    let dir = fixture("t5-tiny");
    let r = reference(&dir);
    let (m, _) = load(&dir);
    let x = inputs(&r);
    let (logits, enc) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert_eq!(logits.dims(), &[2, 6, 196]);
    assert_eq!(enc.dims(), &[2, 7, 32]);
    let dl = max_abs_diff(&logits, &flat(&r["outputs"]["logits"]));
    let de = max_abs_diff(&enc, &flat(&r["outputs"]["encoder_last_hidden_state"]));
    println!("t5-tiny: max |Δlogits| = {dl:.3e}, max |Δencoder| = {de:.3e}");
    assert!(dl < 1e-4, "logits differ by {dl}");
    assert!(de < 1e-4, "encoder state differs by {de}");
}

#[test]
fn greedy_ids_match_transformers() {
    let dir = fixture("t5-tiny");
    let r = reference(&dir);
    let (m, _) = load(&dir);
    let x = inputs(&r);
    let want: Vec<Vec<u32>> = r["greedy"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| flat(row).into_iter().map(|v| v as u32).collect())
        .collect();
    let got = m.greedy(&x.input_ids, &x.attention_mask, 8).unwrap();
    assert_eq!(got, want);
}

#[test]
fn cached_incremental_decoding_equals_full_decode() {
    let dir = fixture("t5-tiny");
    let r = reference(&dir);
    let (m, _) = load(&dir);
    let x = inputs(&r);
    let enc = m.encode(&x.input_ids, &x.attention_mask).unwrap();
    let full = m
        .decode(&x.decoder_input_ids, &enc, &x.attention_mask)
        .unwrap();
    let mut cache = DecoderCache::new(&m);
    // Two tokens at once, then one at a time: both step sizes go through the cache and the
    // offset relative-position bias.
    let mut parts = vec![m
        .decode_step(
            &x.decoder_input_ids.narrow(1, 0, 2).unwrap(),
            &enc,
            &x.attention_mask,
            &mut cache,
        )
        .unwrap()];
    for t in 2..6 {
        parts.push(
            m.decode_step(
                &x.decoder_input_ids.narrow(1, t, 1).unwrap(),
                &enc,
                &x.attention_mask,
                &mut cache,
            )
            .unwrap(),
        );
    }
    assert_eq!(cache.len(), 6);
    let inc = Tensor::cat(&parts, 1).unwrap();
    let d = tensor_diff(&full, &inc);
    assert!(d < 1e-5, "cached decoding differs by {d}");
}

#[test]
fn a_reordered_cache_decodes_the_reordered_rows() {
    let dir = fixture("t5-tiny");
    let r = reference(&dir);
    let (m, _) = load(&dir);
    let x = inputs(&r);
    let enc = m.encode(&x.input_ids, &x.attention_mask).unwrap();
    let full = m
        .decode(&x.decoder_input_ids, &enc, &x.attention_mask)
        .unwrap();
    let mut cache = DecoderCache::new(&m);
    m.decode_step(
        &x.decoder_input_ids.narrow(1, 0, 3).unwrap(),
        &enc,
        &x.attention_mask,
        &mut cache,
    )
    .unwrap();
    let swap = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    cache.reorder(&swap).unwrap();
    // The cached cross keys moved with the rows: the (unread) encoder output need not.
    let next = x
        .decoder_input_ids
        .narrow(1, 3, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .index_select(&swap, 0)
        .unwrap();
    let swapped_mask = x.attention_mask.index_select(&swap, 0).unwrap();
    let got = m
        .decode_step(&next, &enc, &swapped_mask, &mut cache)
        .unwrap();
    let want = full
        .narrow(1, 3, 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .index_select(&swap, 0)
        .unwrap();
    let d = tensor_diff(&want, &got);
    assert!(d < 1e-5, "reordered decoding differs by {d}");
}

#[test]
fn relative_position_buckets_are_those_of_transformers() {
    // Values of transformers' `_relative_position_bucket` (32 buckets, max distance 128).
    let bi = |p| relative_position_bucket(p, true, 32, 128);
    let uni = |p| relative_position_bucket(p, false, 32, 128);
    let cases_bi = [
        (0, 0),
        (1, 17),
        (-1, 1),
        (7, 23),
        (-7, 7),
        (8, 24),
        (-8, 8),
        (12, 25),
        (-16, 10),
        (16, 26),
        (-32, 12),
        (-64, 14),
        (-127, 15),
        (-500, 15),
        (500, 31),
    ];
    for (p, want) in cases_bi {
        assert_eq!(bi(p), want, "bidirectional {p}");
    }
    let cases_uni = [
        (3, 0),
        (0, 0),
        (-1, 1),
        (-15, 15),
        (-16, 16),
        (-32, 21),
        (-64, 26),
        (-127, 31),
        (-1000, 31),
    ];
    for (p, want) in cases_uni {
        assert_eq!(uni(p), want, "unidirectional {p}");
    }
}

/// T5 v1.1 (gated-gelu, untied head), the variant the fixture is not.
fn v11_config() -> T5Config {
    T5Config {
        model_type: Some("t5".into()),
        vocab_size: 37,
        d_model: 24,
        d_kv: 5,
        d_ff: 40,
        num_layers: 3,
        num_decoder_layers: Some(1),
        num_heads: 3,
        relative_attention_num_buckets: 8,
        relative_attention_max_distance: 10,
        dropout_rate: 0.0,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: "gated-gelu".into(),
        tie_word_embeddings: false,
        scale_decoder_outputs: None,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: 0,
        is_encoder_decoder: None,
    }
}

fn write_model(dir: &Path, config: &Value, tensors: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    checkpoint::save_tensors(tensors, &dir.join("model.safetensors")).unwrap();
}

fn small_inputs() -> Inputs {
    let d = &Device::Cpu;
    Inputs {
        // Long enough (13) to reach the logarithmic buckets of max distance 10.
        input_ids: Tensor::new(
            &[
                [5u32, 9, 3, 2, 8, 30, 31, 4, 6, 7, 12, 1, 0],
                [7, 2, 36, 11, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            ],
            d,
        )
        .unwrap(),
        attention_mask: Tensor::new(
            &[
                [1u32, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            ],
            d,
        )
        .unwrap(),
        decoder_input_ids: Tensor::new(&[[0u32, 4, 8], [0, 11, 1]], d).unwrap(),
    }
}

#[test]
fn a_v11_model_saves_and_reloads_with_identical_outputs() {
    let config = v11_config();
    let vm = VarMap::new();
    let m = T5Model::new(config.clone(), &vm, 3, &Device::Cpu).unwrap();
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    assert!(names.contains(&"lm_head.weight".to_string()));
    assert!(names
        .iter()
        .any(|n| n.ends_with("DenseReluDense.wi_1.weight")));
    assert_eq!(
        names
            .iter()
            .filter(|n| n.contains("relative_attention_bias"))
            .count(),
        2
    );
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let (loaded, vm2) = load(dir.path());
    assert_eq!(loaded.config(), &config);
    assert_eq!(vm2.all_vars().len(), vm.all_vars().len());
    let x = small_inputs();
    let (a, ea) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    let (b, eb) = loaded
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert_eq!(a.dims(), &[2, 3, 37]);
    assert_eq!(ea.dims(), &[2, 13, 24]);
    assert_eq!(tensor_diff(&a, &b), 0.0);
    assert_eq!(tensor_diff(&ea, &eb), 0.0);
    assert!(a
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));

    // Saving writes the current values: a step on a variable (as an optimizer takes it) shows.
    let name = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let var = vm.data().lock().unwrap()[name].clone();
    var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
    let (stepped, _) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert!(tensor_diff(&a, &stepped) > 1e-6);
    m.save_pretrained(dir.path()).unwrap();
    let (reloaded, _) = load(dir.path());
    let (r, _) = reloaded
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert_eq!(tensor_diff(&stepped, &r), 0.0);
    var.set(&(var.as_tensor() / 1.5).unwrap()).unwrap();

    // Padding is hidden: changing a padded token leaves the real positions' states unchanged.
    let other_ids = Tensor::new(
        &[
            [5u32, 9, 3, 2, 8, 30, 31, 4, 6, 7, 12, 1, 20],
            [7, 2, 36, 11, 1, 3, 3, 3, 3, 3, 3, 3, 3],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let (c, ec) = m
        .forward(&other_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert!(tensor_diff(&a, &c) < 1e-5);
    let real = |t: &Tensor| t.get(1).unwrap().narrow(0, 0, 5).unwrap();
    assert!(tensor_diff(&real(&ea), &real(&ec)) < 1e-5);

    // Greedy decoding stops at max_len and pads after EOS.
    let g = m.greedy(&x.input_ids, &x.attention_mask, 4).unwrap();
    assert_eq!(g.len(), 2);
    for row in &g {
        assert!(row.len() <= 5 && row[0] == 0);
        if let Some(p) = row.iter().position(|&t| t == 1) {
            assert!(row[p + 1..].iter().all(|&t| t == 0));
        }
    }
}

#[test]
fn tied_weights_load_stored_once_or_under_every_alias() {
    let dir = fixture("t5-tiny");
    let r = reference(&dir);
    let x = inputs(&r);
    let (m, _) = load(&dir);
    let (want, _) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let shared = tensors.remove("shared.weight").unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Every alias, as older `save_pretrained` versions wrote them.
    let mut all = tensors.clone();
    for alias in [
        "shared.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    ] {
        all.insert(alias.into(), shared.clone());
    }
    // Only one alias, not the canonical name.
    let mut one = tensors.clone();
    one.insert("encoder.embed_tokens.weight".into(), shared.clone());
    for set in [all, one] {
        write_model(tmp.path(), &config, &set);
        let (m2, vm) = load(tmp.path());
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains(&"shared.weight".to_string()));
        assert!(!names.contains(&"lm_head.weight".to_string()));
        assert!(!names.iter().any(|n| n.contains("embed_tokens")));
        let (got, _) = m2
            .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
            .unwrap();
        assert_eq!(tensor_diff(&want, &got), 0.0);
    }
    // A tied config with a different `lm_head.weight` is an error, not a silently dropped head.
    let mut differing = tensors.clone();
    differing.insert("shared.weight".into(), shared.clone());
    differing.insert("lm_head.weight".into(), (&shared * 2.0).unwrap());
    write_model(tmp.path(), &config, &differing);
    let e = load_err(tmp.path());
    assert!(e.contains("`lm_head.weight` differs"), "{e}");
    // Saving writes the shared matrix once.
    let out = tempfile::tempdir().unwrap();
    m.save_pretrained(out.path()).unwrap();
    let saved =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(saved.len(), tensors.len() + 1);
    assert!(saved.contains_key("shared.weight"));
}

fn assert_all_gradients(m: &T5Model, vm: &VarMap, x: &Inputs, vocab: usize) {
    let (logits, _) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    let (b, t, _) = logits.dims3().unwrap();
    let loss = candle_nn::loss::cross_entropy(
        &logits.reshape((b * t, vocab)).unwrap(),
        &x.decoder_input_ids.flatten_all().unwrap(),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    assert!(data
        .keys()
        .any(|n| n.ends_with("relative_attention_bias.weight")));
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(g.dims(), var.dims(), "{name}");
        let norm: f32 = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
}

#[test]
fn every_weight_gets_a_gradient() {
    let dir = fixture("t5-tiny");
    let r = reference(&dir);
    let (m, vm) = load(&dir);
    assert_eq!(vm.all_vars().len(), 47);
    assert_all_gradients(&m, &vm, &inputs(&r), 196);
    let vm = VarMap::new();
    let m = T5Model::new(v11_config(), &vm, 5, &Device::Cpu).unwrap();
    assert_all_gradients(&m, &vm, &small_inputs(), 37);
}

#[test]
fn dropout_is_active_only_when_training() {
    let mut config = v11_config();
    config.dropout_rate = 0.3;
    let vm = VarMap::new();
    let m = T5Model::new(config, &vm, 7, &Device::Cpu).unwrap();
    let x = small_inputs();
    let (eval, _) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    let (not_train, _) = m
        .forward_t(&x.input_ids, &x.attention_mask, &x.decoder_input_ids, false)
        .unwrap();
    assert_eq!(tensor_diff(&eval, &not_train), 0.0);
    let (a, _) = m
        .forward_t(&x.input_ids, &x.attention_mask, &x.decoder_input_ids, true)
        .unwrap();
    let (b, _) = m
        .forward_t(&x.input_ids, &x.attention_mask, &x.decoder_input_ids, true)
        .unwrap();
    assert!(tensor_diff(&a, &eval) > 1e-4);
    assert!(tensor_diff(&a, &b) > 1e-4);
    let loss = candle_nn::loss::cross_entropy(
        &a.reshape((6, 37)).unwrap(),
        &x.decoder_input_ids.flatten_all().unwrap(),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in vm.data().lock().unwrap().iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let s: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s.is_finite(), "{name}");
    }
}

fn load_err(dir: &Path) -> String {
    match T5Model::load(dir, &VarMap::new(), &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn bad_configs_and_files_are_clear_errors() {
    let src = fixture("t5-tiny");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let write = |cfg: &Value, weights: &[u8]| {
        std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
        std::fs::write(tmp.path().join("model.safetensors"), weights).unwrap();
    };
    let with = |key: &str, v: Value| {
        let mut c = config.clone();
        c[key] = v;
        c
    };
    write(&with("model_type", "mt5".into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("`mt5`") && e.contains("t5"), "{e}");
    write(&with("feed_forward_proj", "gated-mish".into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("gated-mish") && e.contains("gated-gelu"), "{e}");
    write(&with("feed_forward_proj", "fancy-relu".into()), &bytes);
    assert!(load_err(tmp.path()).contains("fancy-relu"));
    // The gated variant needs wi_0/wi_1, which a v1.0 checkpoint lacks.
    write(&with("feed_forward_proj", "gated-gelu".into()), &bytes);
    let e = load_err(tmp.path());
    assert!(
        e.contains("missing tensor") && e.contains("wi_0.weight"),
        "{e}"
    );
    // Untied, the head must be stored: the shared matrix is no stand-in.
    write(&with("tie_word_embeddings", false.into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("missing tensor `lm_head.weight`"), "{e}");
    // A config of another size: the first mismatching tensor is named, with the file.
    write(&with("d_ff", 48.into()), &bytes);
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.safetensors") && e.contains("wi.weight") && e.contains("[48, 32]"),
        "{e}"
    );
    write(&with("num_layers", 3.into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("missing tensor `encoder.block.2."), "{e}");
    // A missing tensor.
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors.remove("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
    write_model(tmp.path(), &config, &tensors);
    let e = load_err(tmp.path());
    assert!(
        e.contains(
            "missing tensor `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`"
        ),
        "{e}"
    );
    write(&config, &bytes[..bytes.len() - 100]);
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
    write(&config, &bytes[..10]);
    assert!(load_err(tmp.path()).contains("model.safetensors"));
    write(&with("dropout_rate", 1.0.into()), &bytes);
    assert!(load_err(tmp.path()).contains("dropout_rate"));
    write(&with("vocab_size", 0.into()), &bytes);
    assert!(load_err(tmp.path()).contains("config.json"));
    std::fs::write(tmp.path().join("config.json"), "{\"model_type\": \"t").unwrap();
    assert!(load_err(tmp.path()).contains("config.json"));
    assert!(matches!(
        T5Model::load(&tmp.path().join("nope"), &VarMap::new(), &Device::Cpu),
        Err(Error::Checkpoint { .. })
    ));
}
