//! Sparse inference (`to_sparse`) computes what the dense model computes, for every model of the
//! zoo: pruned by magnitude here (or already pruned, `marian-tiny-pruned90`), run both ways.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarMap;
use relprune_models::hf::bert::{sentence_embeddings, BertModel};
use relprune_models::hf::{HfModel, HfSeq2Seq};
use relprune_models::transformer::{Transformer, TransformerConfig};
use relprune_models::{Lenet300, Lenet5};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Zeroes the `sparsity` smallest magnitudes of every matrix named `*weight` of `varmap`
/// except embedding tables.
fn prune(varmap: &VarMap, sparsity: f64) {
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = var.as_tensor();
        if t.rank() < 2
            || !name.ends_with("weight")
            || name.contains("embed")
            || name == "shared.weight"
        {
            continue;
        }
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let cut = mags[((sparsity * mags.len() as f64) as usize).min(mags.len() - 1)];
        let p: Vec<f32> = v
            .iter()
            .map(|&x| if x.abs() < cut { 0.0 } else { x })
            .collect();
        var.set(&Tensor::from_vec(p, t.shape(), t.device()).unwrap())
            .unwrap();
    }
}

/// The largest difference relative to the largest magnitude of `a`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = a
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-30);
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / scale
}

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

fn inputs(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["inputs"].clone()
}

/// The relative difference of two models' outputs (of the same kind) on a fixture's inputs.
fn output_diff(a: &HfModel, b: &HfModel, inp: &Value) -> f32 {
    let (x, mask) = (ids(&inp["input_ids"]), ids(&inp["attention_mask"]));
    match (a, b) {
        (HfModel::Encoder(a), HfModel::Encoder(b)) => rel_diff(
            &a.forward(&x, Some(&mask), None).unwrap(),
            &b.forward(&x, Some(&mask), None).unwrap(),
        ),
        (HfModel::Seq2Seq(a), HfModel::Seq2Seq(b)) => {
            let dec = ids(&inp["decoder_input_ids"]);
            let run = |m: &dyn HfSeq2Seq| m.forward(&x, &mask, &dec).unwrap().0;
            rel_diff(&run(a.as_ref()), &run(b.as_ref()))
        }
        (HfModel::CausalLm(a), HfModel::CausalLm(b)) => rel_diff(
            &a.forward(&x, Some(&mask)).unwrap(),
            &b.forward(&x, Some(&mask)).unwrap(),
        ),
        _ => panic!("models of different kinds"),
    }
}

#[test]
fn sparse_lenets_compute_what_the_dense_ones_compute() {
    let dev = Device::Cpu;
    for batch in [1, 100, 130] {
        let x = Tensor::randn(0f32, 1.0, (batch, 784), &dev).unwrap();
        // At 99% the three layers run as one fused op; at 50% each dispatches on its own.
        for (sparsity, fused) in [(0.99, true), (0.5, false)] {
            let vm = VarMap::new();
            let net = Lenet300::new(&vm, 3, &dev).unwrap();
            prune(&vm, sparsity);
            let sparse = net.to_sparse().unwrap();
            assert_eq!(sparse.is_fused(), fused, "LeNet-300 at {sparsity}");
            let d = rel_diff(&net.forward(&x).unwrap(), &sparse.forward(&x).unwrap());
            assert!(d < 1e-5, "LeNet-300 at {sparsity}, batch {batch}: {d}");
        }
        let vm = VarMap::new();
        let net = Lenet5::new(&vm, 3, &dev).unwrap();
        prune(&vm, 0.95);
        let d = rel_diff(
            &net.forward(&x).unwrap(),
            &net.to_sparse().unwrap().forward(&x).unwrap(),
        );
        assert!(d < 1e-5, "LeNet-5, batch {batch}: {d}");
    }
}

#[test]
fn a_sparse_convolution_computes_what_the_dense_one_computes_at_any_stride_and_padding() {
    use relprune_models::ops::{Conv2d, SparseConv2d};
    let dev = Device::Cpu;
    // (channels in, out, input side, stride, padding): 576 output positions (nine 64-wide
    // tiles), 64 (one tile, read in place), 81 and 100 (a last tile padded to its width).
    for (cin, cout, side, stride, padding) in [
        (1, 6, 28, 1, 0),
        (4, 9, 12, 1, 0),
        (3, 5, 19, 2, 1),
        (2, 7, 10, 1, 2),
    ] {
        let w = Tensor::randn(0f32, 1.0, (cout, cin, 5, 5), &dev).unwrap();
        let keep = Tensor::rand(0f32, 1.0, (cout, cin, 5, 5), &dev)
            .unwrap()
            .lt(0.3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let conv = Conv2d {
            weight: (w * keep).unwrap(),
            bias: Some(Tensor::randn(0f32, 1.0, cout, &dev).unwrap()),
            stride,
            padding,
        };
        let sparse = SparseConv2d::from_dense(&conv).unwrap();
        for batch in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (batch, cin, side, side), &dev).unwrap();
            let (a, b) = (conv.forward(&x).unwrap(), sparse.forward(&x).unwrap());
            assert_eq!(a.dims(), b.dims());
            let d = rel_diff(&a, &b);
            assert!(
                d < 1e-5,
                "{cin}→{cout} on {side}², stride {stride}, pad {padding}: {d}"
            );
        }
    }
}

#[test]
fn a_sparse_transformer_computes_what_the_dense_one_computes() {
    let dev = Device::Cpu;
    let cfg = TransformerConfig {
        d_model: 32,
        heads: 4,
        ffn_dim: 64,
        encoder_layers: 2,
        decoder_layers: 2,
        ..TransformerConfig::base(50, 50)
    };
    let vm = VarMap::new();
    let model = Transformer::new(cfg, &vm, 5, &dev).unwrap();
    prune(&vm, 0.8);
    let sparse = model.to_sparse().unwrap();
    let src = Tensor::new(&[[4u32, 9, 12, 3, 2], [7, 7, 8, 2, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &dev).unwrap();
    let tgt = Tensor::new(&[[1u32, 5, 6], [1, 9, 10]], &dev).unwrap();
    let a = model.forward_t(&src, &mask, &tgt, false).unwrap();
    let b = sparse.forward_t(&src, &mask, &tgt, false).unwrap();
    assert!(rel_diff(&a, &b) < 1e-5, "{}", rel_diff(&a, &b));
}

#[test]
fn sparse_hugging_face_models_compute_what_the_dense_ones_compute() {
    for (name, sparsity) in [
        ("bert-tiny", 0.8),
        ("marian-tiny-pruned90", 0.0),
        ("t5-tiny", 0.7),
        ("llama-tiny", 0.6),
        ("qwen3-tiny", 0.6),
    ] {
        let dir = fixture(name);
        let vm = VarMap::new();
        let (_, model) = relprune_models::hf::load(&dir, &vm, &Device::Cpu).unwrap();
        if sparsity > 0.0 {
            prune(&vm, sparsity);
        }
        let d = output_diff(&model, &model.to_sparse().unwrap(), &inputs(&dir));
        assert!(d < 1e-5, "{name}: {d}");
    }
}

#[test]
fn a_pruned_minilm_embeds_sparse_as_it_embeds_dense() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        println!("skipped: {} is absent", dir.display());
        return;
    }
    let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let r: Value = serde_json::from_str(&text).unwrap();
    let vm = VarMap::new();
    let model = BertModel::load_into(&vm, &dir, &Device::Cpu).unwrap();
    prune(&vm, 0.7);
    let (x, mask) = (ids(&r["input_ids"]), ids(&r["attention_mask"]));
    let embed = |m: &BertModel| {
        let h = m.forward(&x, Some(&mask), None).unwrap();
        sentence_embeddings(&h, &mask)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let d = rel_diff(&embed(&model), &embed(&model.to_sparse().unwrap()));
    assert!(d < 1e-5, "{d}");
}

/// `dir`'s checkpoint with `model.safetensors` replaced by `weights` compressed in `format`,
/// in a fresh directory.
fn compressed_copy(
    dir: &Path,
    weights: &[u8],
    format: relprune_sparse::file::Format,
) -> tempfile::TempDir {
    use relprune_sparse::file;
    let out = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("config.json"), out.path().join("config.json")).unwrap();
    let c = file::compress(weights, format, |_, _| true).unwrap();
    let bytes = file::serialize(&c.tensors, &c.metadata).unwrap();
    std::fs::write(out.path().join("model.safetensors"), bytes).unwrap();
    out
}

#[test]
fn compressed_checkpoints_load_straight_into_sparse_layers_that_compute_what_dense_ones_do() {
    use relprune_models::hf::Layers;
    use relprune_sparse::file::Format;
    for (name, sparsity, a_linear) in [
        (
            "bert-tiny",
            0.8,
            "encoder.layer.0.attention.self.query.weight",
        ),
        (
            "marian-tiny-pruned90",
            0.0,
            "model.encoder.layers.0.fc1.weight",
        ),
        (
            "t5-tiny",
            0.7,
            "encoder.block.0.layer.0.SelfAttention.q.weight",
        ),
    ] {
        let dir = fixture(name);
        let vm = VarMap::new();
        let (arch, dense) = relprune_models::hf::load(&dir, &vm, &Device::Cpu).unwrap();
        let weights = if sparsity > 0.0 {
            prune(&vm, sparsity);
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("w.safetensors");
            vm.save(&path).unwrap();
            std::fs::read(path).unwrap()
        } else {
            std::fs::read(dir.join("model.safetensors")).unwrap()
        };
        for format in [Format::SparseBitmask, Format::RelpruneSparse] {
            let copy = compressed_copy(&dir, &weights, format);
            let vars = VarMap::new();
            (arch.load)(copy.path(), &vars, &Device::Cpu, Layers::Sparse).unwrap();
            let data = vars.data().lock().unwrap();
            assert!(
                !data.contains_key(a_linear) && !data.is_empty(),
                "{name} {format:?}: {a_linear} went through a dense variable"
            );
            drop(data);
            let (_, sparse) = relprune_models::hf::load_sparse(copy.path(), &Device::Cpu).unwrap();
            let d = output_diff(&dense, &sparse, &inputs(&dir));
            assert!(d < 1e-5, "{name} {format:?}: {d}");
        }
    }
}
