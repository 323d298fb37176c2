//! The Hugging Face BERT encoder against outputs `transformers` and sentence-transformers wrote
//! (`tests/data/bert-tiny/reference.json`, and the real all-MiniLM-L6-v2 when it is present), on
//! other configurations, and on broken checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use relprune_models::hf::bert::{mean_pool, sentence_embeddings, BertConfig, BertModel};
use serde_json::Value;

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bert-tiny")
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

/// A (rows, cols) integer matrix of JSON as a u32 tensor.
fn ids(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

/// Every number of a nested JSON array, in order.
fn flat(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().unwrap() as f32),
    }
}

fn max_abs_diff(t: &Tensor, v: &Value) -> f32 {
    let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let mut want = Vec::new();
    flat(v, &mut want);
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn bert_tiny_reproduces_transformers() {
    let dir = tiny_dir();
    let r = reference(&dir);
    let model = BertModel::load(&dir, &Device::Cpu).unwrap();
    assert!(model.has_pooler());
    let inputs = &r["inputs"];
    let mask = ids(&inputs["attention_mask"]);
    let hidden = model
        .forward(
            &ids(&inputs["input_ids"]),
            Some(&mask),
            Some(&ids(&inputs["token_type_ids"])),
        )
        .unwrap();
    assert_eq!(hidden.dims(), [2, 7, 32]);
    let d = max_abs_diff(&hidden, &r["outputs"]["last_hidden_state"]);
    println!("bert-tiny last_hidden_state max abs diff {d:e}");
    assert!(d < 1e-4, "last_hidden_state differs by {d}");

    let pooled = model.pool(&hidden).unwrap().unwrap();
    let d = max_abs_diff(&pooled, &r["outputs"]["pooler_output"]);
    println!("bert-tiny pooler_output max abs diff {d:e}");
    assert!(d < 1e-4, "pooler_output differs by {d}");

    let mean = mean_pool(&hidden, &mask).unwrap();
    let d = max_abs_diff(&mean, &r["outputs"]["masked_mean_pooled"]);
    println!("bert-tiny masked_mean_pooled max abs diff {d:e}");
    assert!(d < 1e-4, "masked_mean_pooled differs by {d}");
}

#[test]
fn gradients_reach_every_parameter() {
    let dir = tiny_dir();
    let model = BertModel::load(&dir, &Device::Cpu).unwrap();
    let r = reference(&dir);
    let hidden = model
        .forward(
            &ids(&r["inputs"]["input_ids"]),
            Some(&ids(&r["inputs"]["attention_mask"])),
            None,
        )
        .unwrap();
    let grads = hidden.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let data = model.varmap().data().lock().unwrap();
    for (name, var) in data.iter() {
        if name.starts_with("pooler.") {
            continue;
        }
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm.is_finite(), "{name}");
    }
}

/// The largest absolute difference of two tensors of one shape.
fn tensor_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar().unwrap()
}

#[test]
fn frozen_embeddings_get_no_gradient_and_change_no_output() {
    let dir = tiny_dir();
    let mut model = BertModel::load(&dir, &Device::Cpu).unwrap();
    let r = reference(&dir);
    let (input, mask) = (
        ids(&r["inputs"]["input_ids"]),
        ids(&r["inputs"]["attention_mask"]),
    );
    let before = model.forward(&input, Some(&mask), None).unwrap();
    model.freeze_embeddings();
    let hidden = model.forward(&input, Some(&mask), None).unwrap();
    assert_eq!(tensor_diff(&hidden, &before), 0.0);
    let grads = hidden.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let data = model.varmap().data().lock().unwrap();
    for (name, var) in data.iter() {
        let frozen = name.starts_with("embeddings.") && !name.contains("LayerNorm");
        if name.starts_with("pooler.") {
            continue;
        }
        assert_eq!(grads.get(var.as_tensor()).is_none(), frozen, "{name}");
    }
    // The tables still share storage with their variables: a change shows in the output.
    let word = data["embeddings.word_embeddings.weight"].clone();
    drop(data);
    word.set(&word.as_tensor().zeros_like().unwrap()).unwrap();
    let after = model.forward(&input, Some(&mask), None).unwrap();
    let d = tensor_diff(&after, &before);
    assert!(d > 1e-3, "{d}");
}

fn small_config() -> BertConfig {
    let mut c = BertConfig::new(50, 24, 3, 6, 40, 16);
    c.hidden_act = "gelu_new".into();
    c.type_vocab_size = 3;
    c.initializer_range = 0.3;
    c
}

#[test]
fn another_configuration_saves_loads_and_masks_padding() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let a = BertModel::new(small_config(), false, &vm, 7, &dev).unwrap();
    let dir = tempfile::tempdir().unwrap();
    a.save_pretrained(dir.path()).unwrap();
    let b = BertModel::load(dir.path(), &dev).unwrap();
    assert_eq!(b.config(), a.config());
    assert!(!b.has_pooler());

    let short = [2u32, 11, 17, 5, 3];
    let ids_one = Tensor::new(&[short], &dev).unwrap();
    let alone = b.forward(&ids_one, None, None).unwrap();
    assert_eq!(alone.dims(), [1, 5, 24]);
    assert_eq!(
        alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        a.forward(&ids_one, None, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );

    // The same sentence padded (with arbitrary ids) next to a longer one: its real positions must
    // not change.
    let padded = [short[0], short[1], short[2], short[3], short[4], 9, 9, 40];
    let batch = Tensor::new(&[[2u32, 4, 6, 8, 10, 12, 14, 3], padded], &dev).unwrap();
    let mask = Tensor::new(&[[1u32; 8], [1, 1, 1, 1, 1, 0, 0, 0]], &dev).unwrap();
    let out = b.forward(&batch, Some(&mask), None).unwrap();
    assert_eq!(out.dims(), [2, 8, 24]);
    let part = out.get(1).unwrap().narrow(0, 0, 5).unwrap();
    let d: f32 = (part - alone.get(0).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-5, "padding changed the real tokens by {d}");

    // Dropout only in training; the config's 0.1 changes the output.
    let train = b.forward_t(&batch, Some(&mask), None, true).unwrap();
    let d: f32 = (&train - &out)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d > 1e-3, "dropout changed nothing ({d})");
    let again = b.forward_t(&batch, Some(&mask), None, false).unwrap();
    assert_eq!(
        again.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    let emb = sentence_embeddings(&out, &mask).unwrap();
    let norms: Vec<f32> = emb.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
    for n in norms {
        assert!((n - 1.0).abs() < 1e-5, "{n}");
    }

    let types = Tensor::new(&[[0u32, 1, 2, 0, 1]], &dev).unwrap();
    assert_eq!(
        b.forward(&ids_one, None, Some(&types)).unwrap().dims(),
        [1, 5, 24]
    );
    let e = b
        .forward(&Tensor::new(&[[0u32; 17]], &dev).unwrap(), None, None)
        .unwrap_err();
    assert!(e.to_string().contains("max_position_embeddings 16"), "{e}");
    let empty = Tensor::zeros((1, 0), DType::U32, &dev).unwrap();
    let e = b.forward(&empty, None, None).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = b
        .forward(&Tensor::new(&[[50u32]], &dev).unwrap(), None, None)
        .unwrap_err();
    assert!(e.to_string().contains("token id 50"), "{e}");
}

/// A copy of bert-tiny in a temporary directory with its tensors (renamed or dropped by `edit`).
fn edited_copy(edit: impl Fn(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        tiny_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn tiny_hidden(model: &BertModel) -> Vec<f32> {
    let x = Tensor::new(&[[2u32, 53, 70, 90, 3]], &Device::Cpu).unwrap();
    model
        .forward(&x, None, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bert_prefix_gamma_beta_and_half_precision_are_accepted() {
    let want = tiny_hidden(&BertModel::load(&tiny_dir(), &Device::Cpu).unwrap());
    let dir = edited_copy(|t| {
        let old = std::mem::take(t);
        for (k, v) in old {
            let k = k
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            t.insert(format!("bert.{k}"), v);
        }
        t.insert(
            "cls.predictions.bias".into(),
            Tensor::zeros(132, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let model = BertModel::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(tiny_hidden(&model), want);
    assert!(model
        .varmap()
        .data()
        .lock()
        .unwrap()
        .contains_key("encoder.layer.1.output.LayerNorm.weight"));

    let dir = edited_copy(|t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F16).unwrap();
        }
    });
    let got = tiny_hidden(&BertModel::load(dir.path(), &Device::Cpu).unwrap());
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 0.1, "{d}");
}

#[test]
fn broken_checkpoints_are_clear_errors() {
    let dev = Device::Cpu;
    let err = |dir: &Path| BertModel::load(dir, &dev).unwrap_err().to_string();

    let e = err(Path::new("/nonexistent/bert"));
    assert!(
        e.contains("/nonexistent/bert") && e.contains("no such model directory"),
        "{e}"
    );

    let dir = edited_copy(|t| {
        t.remove("encoder.layer.1.attention.self.key.bias");
    });
    let e = err(dir.path());
    assert!(
        e.contains("missing tensor `encoder.layer.1.attention.self.key.bias`")
            && e.contains("model.safetensors"),
        "{e}"
    );

    let dir = edited_copy(|t| {
        t.insert(
            "encoder.layer.0.intermediate.dense.weight".into(),
            Tensor::zeros((32, 64), DType::F32, &dev).unwrap(),
        );
    });
    let e = err(dir.path());
    assert!(
        e.contains("`encoder.layer.0.intermediate.dense.weight` has shape [32, 64]")
            && e.contains("[64, 32]"),
        "{e}"
    );

    // A NaN or infinite weight once made `forward` and `embed` write `null`s and succeed.
    for bad in [f32::NAN, f32::INFINITY] {
        let dir = edited_copy(|t| {
            let name = "encoder.layer.1.output.dense.weight";
            let mut v = t[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[7] = bad;
            let shape = t[name].dims().to_vec();
            t.insert(name.into(), Tensor::from_vec(v, shape, &dev).unwrap());
        });
        let e = err(dir.path());
        assert!(
            e.contains("`encoder.layer.1.output.dense.weight`")
                && e.contains("flat index 7")
                && e.contains("finite"),
            "{e}"
        );
    }

    // Truncated: the header promises more bytes than the file has.
    let dir = edited_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(err(dir.path()).contains("not a valid safetensors"));
    std::fs::remove_file(&path).unwrap();
    assert!(err(dir.path()).contains("no such file"));
}

#[test]
fn unsupported_configurations_are_clear_errors() {
    let base: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_dir().join("config.json")).unwrap())
            .unwrap();
    let with = |key: &str, value: Value| {
        let mut c = base.clone();
        c[key] = value;
        BertConfig::from_json(&c.to_string())
            .unwrap_err()
            .to_string()
    };
    let e = with("model_type", "marian".into());
    assert!(
        e.contains("\"marian\"") && e.contains("supported: bert"),
        "{e}"
    );
    for (key, value) in [
        ("max_position_embeddings", 1u64 << 59),
        ("num_hidden_layers", 0),
        ("vocab_size", 1 << 40),
    ] {
        let e = with(key, value.into());
        assert!(e.contains(key) && e.contains("outside 1..="), "{e}");
    }
    let e = with("hidden_act", "swish".into());
    assert!(
        e.contains("\"swish\"") && e.contains("gelu, gelu_new, relu"),
        "{e}"
    );
    let e = with("position_embedding_type", "relative_key".into());
    assert!(e.contains("relative_key") && e.contains("absolute"), "{e}");
    let e = with("num_attention_heads", 5.into());
    assert!(e.contains("not a multiple"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"t5\"}").unwrap();
    let e = BertModel::load(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("\"t5\""), "{e}");
}

#[test]
fn all_minilm_l6_v2_reproduces_sentence_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        println!(
            "skipped: {} is absent (the real all-MiniLM-L6-v2 checkpoint)",
            dir.display()
        );
        return;
    }
    let r = reference(&dir);
    let model = BertModel::load(&dir, &Device::Cpu).unwrap();
    let mask = ids(&r["attention_mask"]);
    let hidden = model
        .forward(&ids(&r["input_ids"]), Some(&mask), None)
        .unwrap();
    let emb = sentence_embeddings(&hidden, &mask).unwrap();
    assert_eq!(emb.dims(), [5, 384]);
    let d = max_abs_diff(&emb, &r["embeddings"]);
    println!("all-MiniLM-L6-v2 embeddings max abs diff {d:e}");
    assert!(d < 1e-4, "embeddings differ by {d}");
}
