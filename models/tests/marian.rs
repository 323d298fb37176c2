//! Marian against the logits `transformers` wrote, plus loading, caching and gradient checks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use relprune_models::hf::marian::{sinusoidal_positions, DecoderCache, MarianConfig, MarianModel};
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

fn load(dir: &Path) -> (MarianModel, VarMap) {
    let vm = VarMap::new();
    let m = MarianModel::load(dir, &vm, &Device::Cpu).unwrap();
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
    for name in ["marian-tiny", "marian-tiny-pruned90"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let (m, _) = load(&dir);
        let x = inputs(&r);
        let (logits, enc) = m
            .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
            .unwrap();
        assert_eq!(logits.dims(), &[2, 6, 200]);
        assert_eq!(enc.dims(), &[2, 7, 32]);
        let dl = max_abs_diff(&logits, &flat(&r["outputs"]["logits"]));
        let de = max_abs_diff(&enc, &flat(&r["outputs"]["encoder_last_hidden_state"]));
        println!("{name}: max |Δlogits| = {dl:.3e}, max |Δencoder| = {de:.3e}");
        assert!(dl < 1e-4, "{name}: logits differ by {dl}");
        assert!(de < 1e-4, "{name}: encoder state differs by {de}");
    }
}

#[test]
fn greedy_ids_match_transformers() {
    for name in ["marian-tiny", "marian-tiny-pruned90"] {
        let dir = fixture(name);
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
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn cached_incremental_decoding_equals_full_decode() {
    let dir = fixture("marian-tiny");
    let r = reference(&dir);
    let (m, _) = load(&dir);
    let x = inputs(&r);
    let enc = m.encode(&x.input_ids, &x.attention_mask).unwrap();
    let full = m
        .decode(&x.decoder_input_ids, &enc, &x.attention_mask)
        .unwrap();
    let mut cache = DecoderCache::new(&m);
    // Two tokens at once, then one at a time: both step sizes go through the cache.
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
fn positions_are_the_transformers_sinusoids() {
    let r = reference(&fixture("marian-tiny"));
    let want = flat(&r["sinusoidal_positions_first8"]);
    let t = sinusoidal_positions(64, 32, &Device::Cpu).unwrap();
    let d = max_abs_diff(&t.narrow(0, 0, 8).unwrap(), &want);
    assert!(d < 1e-6, "positions differ by {d}");
}

fn small_config() -> MarianConfig {
    MarianConfig {
        model_type: Some("marian".into()),
        vocab_size: 37,
        decoder_vocab_size: None,
        d_model: 24,
        encoder_layers: 3,
        decoder_layers: 1,
        encoder_attention_heads: 3,
        decoder_attention_heads: 2,
        encoder_ffn_dim: 40,
        decoder_ffn_dim: 16,
        max_position_embeddings: 20,
        activation_function: "gelu".into(),
        scale_embedding: false,
        pad_token_id: 36,
        eos_token_id: 0,
        decoder_start_token_id: 36,
        tie_word_embeddings: false,
        share_encoder_decoder_embeddings: true,
        init_std: 0.3,
        normalize_before: None,
        normalize_embedding: None,
        add_final_layer_norm: None,
    }
}

fn write_model(dir: &Path, config: &MarianConfig, tensors: &HashMap<String, Tensor>) {
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(config).unwrap(),
    )
    .unwrap();
    checkpoint::save_tensors(tensors, &dir.join("model.safetensors")).unwrap();
}

fn var_tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

fn small_inputs() -> Inputs {
    let d = &Device::Cpu;
    Inputs {
        input_ids: Tensor::new(&[[5u32, 9, 3, 0, 36], [7, 2, 0, 36, 36]], d).unwrap(),
        attention_mask: Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 0, 0]], d).unwrap(),
        decoder_input_ids: Tensor::new(&[[36u32, 4, 8], [36, 11, 1]], d).unwrap(),
    }
}

#[test]
fn a_config_of_other_sizes_loads_runs_and_recomputes_positions() {
    let config = small_config();
    let vm = VarMap::new();
    let m = MarianModel::new(config.clone(), &vm, 3, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tensors = var_tensors(&vm);
    assert!(tensors.contains_key("lm_head.weight"));
    assert!(!tensors.keys().any(|k| k.contains("embed_positions")));
    write_model(dir.path(), &config, &tensors);
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
    assert_eq!(ea.dims(), &[2, 5, 24]);
    assert_eq!(tensor_diff(&a, &b), 0.0);
    assert_eq!(tensor_diff(&ea, &eb), 0.0);

    // Stored position tables are used: the sinusoids give the same result, others do not.
    let table = sinusoidal_positions(20, 24, &Device::Cpu).unwrap();
    let mut with_pos = tensors.clone();
    with_pos.insert("model.encoder.embed_positions.weight".into(), table.clone());
    with_pos.insert("model.decoder.embed_positions.weight".into(), table.clone());
    write_model(dir.path(), &config, &with_pos);
    let (same, _) = load(dir.path());
    let (c, _) = same
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert!(tensor_diff(&a, &c) < 1e-6);
    with_pos.insert(
        "model.encoder.embed_positions.weight".into(),
        (table * 2.0).unwrap(),
    );
    write_model(dir.path(), &config, &with_pos);
    let (other, _) = load(dir.path());
    let (_, ed) = other
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    assert!(tensor_diff(&ea, &ed) > 1e-3);

    // Greedy decoding stops at max_len and pads after EOS.
    let g = m.greedy(&x.input_ids, &x.attention_mask, 4).unwrap();
    assert_eq!(g.len(), 2);
    for row in &g {
        assert!(row.len() <= 5 && row[0] == 36);
        if let Some(p) = row.iter().position(|&t| t == 0) {
            assert!(row[p + 1..].iter().all(|&t| t == 36));
        }
    }
}

#[test]
fn tied_weights_load_stored_once_or_under_every_alias() {
    let dir = fixture("marian-tiny");
    let r = reference(&dir);
    let x = inputs(&r);
    let (m, _) = load(&dir);
    let (want, _) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    let mut tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let shared = tensors.remove("model.shared.weight").unwrap();
    let config = MarianConfig::from_file(&dir.join("config.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Every alias, as older `save_pretrained` versions wrote them.
    let mut all = tensors.clone();
    for alias in [
        "model.shared.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "lm_head.weight",
    ] {
        all.insert(alias.into(), shared.clone());
    }
    // Only one alias, not the canonical name.
    let mut one = tensors.clone();
    one.insert("lm_head.weight".into(), shared.clone());
    for set in [all, one] {
        write_model(tmp.path(), &config, &set);
        let (m2, vm) = load(tmp.path());
        let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains(&"model.shared.weight".to_string()));
        assert!(!names.contains(&"lm_head.weight".to_string()));
        let (got, _) = m2
            .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
            .unwrap();
        assert_eq!(tensor_diff(&want, &got), 0.0);
    }
}

#[test]
fn every_weight_gets_a_gradient() {
    let dir = fixture("marian-tiny");
    let r = reference(&dir);
    let x = inputs(&r);
    let (m, vm) = load(&dir);
    let (logits, _) = m
        .forward(&x.input_ids, &x.attention_mask, &x.decoder_input_ids)
        .unwrap();
    let labels = ids(&r["inputs"]["decoder_input_ids"]);
    let loss = candle_nn::loss::cross_entropy(
        &logits.reshape((12, 200)).unwrap(),
        &labels.flatten_all().unwrap(),
    )
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    assert!(data.len() > 50);
    for (name, var) in data.iter() {
        let g = grads.get(var.as_tensor());
        if name == "final_logits_bias" {
            // A buffer in transformers: stored with the model, never trained.
            assert!(g.is_none());
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("no gradient for {name}"));
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

fn load_err(dir: &Path) -> String {
    match MarianModel::load(dir, &VarMap::new(), &Device::Cpu) {
        Ok(_) => panic!("loaded"),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn bad_configs_and_files_are_clear_errors() {
    let src = fixture("marian-tiny");
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
    write(&with("model_type", "bert".into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("`bert`") && e.contains("marian"), "{e}");
    write(&with("activation_function", "mish".into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("mish") && e.contains("swish"), "{e}");
    write(&with("normalize_before", true.into()), &bytes);
    assert!(load_err(tmp.path()).contains("normalize_before"));
    // Sizes no file can hold are refused before anything is allocated: 2^59 positions once
    // panicked computing the table's size, 10^9 aborted allocating it.
    for positions in [1u64 << 59, 1_000_000_000, 0] {
        write(&with("max_position_embeddings", positions.into()), &bytes);
        let e = load_err(tmp.path());
        assert!(
            e.contains("max_position_embeddings") && e.contains("config.json"),
            "{e}"
        );
    }
    write(&with("encoder_layers", 0.into()), &bytes);
    assert!(load_err(tmp.path()).contains("encoder_layers 0"));
    // A config of another size: the first mismatching tensor is named, with the file.
    write(&with("encoder_ffn_dim", 48.into()), &bytes);
    let e = load_err(tmp.path());
    assert!(
        e.contains("model.safetensors") && e.contains("fc1.weight") && e.contains("[48, 32]"),
        "{e}"
    );
    write(&with("encoder_layers", 3.into()), &bytes);
    let e = load_err(tmp.path());
    assert!(e.contains("missing tensor `model.encoder.layers.2."), "{e}");
    write(&config, &bytes[..bytes.len() - 100]);
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
    write(&config, &bytes[..10]);
    assert!(load_err(tmp.path()).contains("model.safetensors"));
    std::fs::write(tmp.path().join("config.json"), "{\"model_type\": \"mar").unwrap();
    assert!(load_err(tmp.path()).contains("config.json"));
    assert!(matches!(
        MarianModel::load(&tmp.path().join("nope"), &VarMap::new(), &Device::Cpu),
        Err(Error::Checkpoint { .. })
    ));
}
