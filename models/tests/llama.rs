//! The Llama-family causal LMs (`llama`, `mistral`, `qwen2`, `qwen3`) against the logits and
//! greedy tokens `transformers` computed for the tiny fixtures (GQA, tied and untied heads, q/k/v
//! biases, q/k norms, a head size that is not hidden / heads, left padding).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use relprune_models::attention::DecoderCache;
use relprune_models::hf::llama::{CausalLm, SampleConfig};
use serde_json::Value;

const FIXTURES: [&str; 4] = ["llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn reference(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (b, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (b, t), &Device::Cpu).unwrap()
}

fn load(name: &str) -> CausalLm {
    CausalLm::load(&fixture(name), &VarMap::new(), &Device::Cpu).unwrap()
}

/// The largest |ours − reference| over the positions whose mask is 1, and the largest |reference|.
fn logit_error(ours: &Tensor, r: &Value) -> (f32, f32) {
    let ours: Vec<Vec<Vec<f32>>> = ours.to_vec3().unwrap();
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(r["outputs"]["logits"].clone()).unwrap();
    let mask: Vec<Vec<u32>> =
        serde_json::from_value(r["inputs"]["attention_mask"].clone()).unwrap();
    let (mut err, mut scale) = (0f32, 0f32);
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in ours[b][t].iter().zip(&want[b][t]) {
                    err = err.max((x - y).abs());
                    scale = scale.max(y.abs());
                }
            }
        }
    }
    (err, scale)
}

#[test]
fn every_fixture_reproduces_transformers_logits_at_unpadded_positions() {
    for name in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        let model = load(name);
        let logits = model
            .forward(
                &ids(&r["inputs"]["input_ids"]),
                Some(&ids(&r["inputs"]["attention_mask"])),
            )
            .unwrap();
        let (err, scale) = logit_error(&logits, &r);
        eprintln!("{name}: max |Δlogit| {err:.2e} (largest logit {scale:.1})");
        assert!(err <= 1e-4, "{name}: {err} (largest logit {scale})");
    }
}

#[test]
fn every_fixture_generates_transformers_greedy_tokens() {
    for name in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        let g = &r["greedy"];
        let prompt = ids(&g["input_ids"]);
        let mask = Tensor::ones(prompt.dims(), DType::U32, &Device::Cpu).unwrap();
        let want: Vec<u32> = serde_json::from_value(g["generated_ids"].clone()).unwrap();
        let n = g["max_new_tokens"].as_u64().unwrap() as usize;
        // The fixtures' EOS is id 2; transformers stops there too, so compare what it produced.
        let got = load(name)
            .generate(&prompt, &mask, &SampleConfig::greedy(n))
            .unwrap();
        assert_eq!(got[0], want[..got[0].len()], "{name}");
        assert_eq!(got[0].len(), want.len(), "{name}");
    }
}

#[test]
fn decoding_with_the_cache_gives_the_logits_of_one_full_pass() {
    for name in FIXTURES {
        let r = reference(&fixture(name));
        let model = load(name);
        let all = ids(&r["inputs"]["input_ids"]);
        let mask = ids(&r["inputs"]["attention_mask"]);
        let full = model.forward(&all, Some(&mask)).unwrap();
        let mut cache = DecoderCache::new(&model);
        let mut parts = Vec::new();
        for (start, len) in [(0, 6), (6, 1), (7, 4)] {
            let step = all.narrow(1, start, len).unwrap();
            let seen = mask.narrow(1, 0, start + len).unwrap();
            parts.push(
                model
                    .forward_t(&step, Some(&seen), Some(&mut cache), false)
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        // Row 0 only: row 1's first query positions see nothing but padding in both runs.
        let d = (full.get(0).unwrap() - cached.get(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{name}: {d}");
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    for name in FIXTURES {
        let r = reference(&fixture(name));
        let vm = VarMap::new();
        let model = CausalLm::load(&fixture(name), &vm, &Device::Cpu).unwrap();
        let logits = model
            .forward_t(
                &ids(&r["inputs"]["input_ids"]),
                Some(&ids(&r["inputs"]["attention_mask"])),
                None,
                true,
            )
            .unwrap();
        let loss = logits.sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        for (var_name, var) in vm.data().lock().unwrap().iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {var_name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm.is_finite() && norm > 0.0, "{name}: {var_name} {norm}");
        }
    }
}

#[test]
fn a_model_frozen_except_one_layer_gives_gradients_to_that_layer_alone_and_the_same_logits() {
    for name in FIXTURES {
        let r = reference(&fixture(name));
        let vm = VarMap::new();
        let model = CausalLm::load(&fixture(name), &vm, &Device::Cpu).unwrap();
        let x = ids(&r["inputs"]["input_ids"]).narrow(0, 0, 1).unwrap();
        let h = model.embed(&x).unwrap().detach();
        let full = model.logits_from_layer(0, &h).unwrap();
        let view = model.frozen_except(1..2);
        let logits = view.logits_from_layer(0, &h).unwrap();
        let same = (&full - &logits).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        let grads = logits
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .backward()
            .unwrap();
        for (var_name, var) in vm.data().lock().unwrap().iter() {
            let got = grads.get(var.as_tensor()).is_some();
            assert_eq!(
                got,
                var_name.starts_with("model.layers.1."),
                "{name}: {var_name}"
            );
        }
    }
}

#[test]
fn sampling_is_seeded_and_top_p_near_zero_is_greedy() {
    let model = load("llama-tiny");
    let prompt = Tensor::new(&[[5u32, 9, 17, 33]], &Device::Cpu).unwrap();
    let mask = Tensor::ones((1, 4), DType::U32, &Device::Cpu).unwrap();
    let sample = |temperature: f64, top_p: f64, seed: u64| {
        let cfg = SampleConfig {
            temperature,
            top_p,
            seed,
            ..SampleConfig::greedy(12)
        };
        model.generate(&prompt, &mask, &cfg).unwrap()
    };
    assert_eq!(sample(1.0, 1.0, 3), sample(1.0, 1.0, 3));
    let runs: Vec<_> = (0..4).map(|s| sample(1.5, 1.0, s)).collect();
    assert!(runs.iter().any(|r| *r != runs[0]), "{runs:?}");
    assert_eq!(sample(1.0, 1e-9, 5), sample(0.0, 1.0, 0));
    let bad = SampleConfig {
        top_p: 0.0,
        ..SampleConfig::greedy(1)
    };
    assert!(model.generate(&prompt, &mask, &bad).is_err());
}

/// The real SmolLM2-135M-Instruct GGUF of `../shared`, if present.
fn smollm2() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models/SmolLM2-135M-Instruct-Q4_1");
    dir.join("reference.json").exists().then_some(dir)
}

#[test]
fn smollm2_gguf_reproduces_transformers_logits_and_greedy_tokens() {
    let Some(dir) = smollm2() else {
        eprintln!("skipped: ../shared/models/SmolLM2-135M-Instruct-Q4_1 is absent");
        return;
    };
    let r = reference(&dir);
    // The directory as it is: the GGUF file, transformers' config and tokenizer beside it.
    let (arch, model) = relprune_models::hf::load(&dir, &VarMap::new(), &Device::Cpu).unwrap();
    assert_eq!(arch.model_type, "llama");
    let relprune_models::hf::HfModel::CausalLm(model) = model else {
        panic!("not a causal LM")
    };
    // The configuration built from the GGUF metadata is the one transformers derived.
    let theirs: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let ours = serde_json::to_value(model.config()).unwrap();
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rms_norm_eps",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(model.config().rope().unwrap().0, 100_000.0);
    for p in r["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(p["input_ids"].clone()).unwrap();
        let t = ids.len();
        let x = Tensor::from_vec(ids.clone(), (1, t), &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&x, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let first: Vec<Vec<f32>> = serde_json::from_value(p["logits_first_128"].clone()).unwrap();
        let last: Vec<f32> = serde_json::from_value(p["last_logits"].clone()).unwrap();
        let mut err = 0f32;
        for (ours, want) in logits.iter().zip(&first) {
            for (a, b) in ours.iter().zip(want) {
                err = err.max((a - b).abs());
            }
        }
        for (a, b) in logits[t - 1].iter().zip(&last) {
            err = err.max((a - b).abs());
        }
        eprintln!("{}: max |Δlogit| {err:.2e}", p["text"]);
        assert!(err <= 1e-3, "{}: {err}", p["text"]);
        let want: Vec<u32> = serde_json::from_value(p["greedy_16"].clone()).unwrap();
        let mask = Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap();
        let got = model
            .generate(&x, &mask, &SampleConfig::greedy(want.len()))
            .unwrap();
        assert_eq!(got[0], want, "{}", p["text"]);
    }
}

/// Writes llama-tiny as llama.cpp would (its names, q/k rows permuted for its RoPE kernel,
/// metadata instead of config.json) into `path`.
fn write_llama_tiny_gguf(path: &Path) {
    use candle_core::quantized::gguf_file::{write, Value as G};
    use candle_core::quantized::{GgmlDType, QTensor};
    let dir = fixture("llama-tiny");
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let permute = |t: &Tensor, heads: usize| {
        let (rows, cols) = t.dims2().unwrap();
        t.reshape((heads, 2, rows / heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, t: &Tensor| {
        tensors.push((name, QTensor::quantize(t, GgmlDType::F32).unwrap()));
    };
    add("token_embd.weight".into(), &st["model.embed_tokens.weight"]);
    add("output_norm.weight".into(), &st["model.norm.weight"]);
    for l in 0..2 {
        let hf = |n: &str| st[&format!("model.layers.{l}.{n}.weight")].clone();
        let mut put = |n: &str, t: Tensor| add(format!("blk.{l}.{n}.weight"), &t);
        put("attn_q", permute(&hf("self_attn.q_proj"), 4));
        put("attn_k", permute(&hf("self_attn.k_proj"), 2));
        put("attn_v", hf("self_attn.v_proj"));
        put("attn_output", hf("self_attn.o_proj"));
        put("ffn_gate", hf("mlp.gate_proj"));
        put("ffn_up", hf("mlp.up_proj"));
        put("ffn_down", hf("mlp.down_proj"));
        put("attn_norm", hf("input_layernorm"));
        put("ffn_norm", hf("post_attention_layernorm"));
    }
    let meta: Vec<(&str, G)> = vec![
        ("general.architecture", G::String("llama".into())),
        ("llama.block_count", G::U32(2)),
        ("llama.context_length", G::U32(256)),
        ("llama.embedding_length", G::U32(64)),
        ("llama.feed_forward_length", G::U32(160)),
        ("llama.attention.head_count", G::U32(4)),
        ("llama.attention.head_count_kv", G::U32(2)),
        ("llama.rope.freq_base", G::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", G::F32(1e-6)),
        ("tokenizer.ggml.bos_token_id", G::U32(1)),
        ("tokenizer.ggml.eos_token_id", G::U32(2)),
        ("tokenizer.ggml.padding_token_id", G::U32(0)),
    ];
    let meta_refs: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn a_llama_cpp_file_loads_as_the_model_it_was_converted_from() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_llama_tiny_gguf(&path);
    let r = reference(&fixture("llama-tiny"));
    // As a file and as the directory holding it.
    for given in [path.clone(), tmp.path().to_path_buf()] {
        let (arch, model) = relprune_models::hf::load(&given, &VarMap::new(), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", given.display()));
        assert_eq!(arch.model_type, "llama");
        let relprune_models::hf::HfModel::CausalLm(model) = model else {
            panic!("not a causal LM")
        };
        assert!(model.config().tie_word_embeddings);
        let logits = model
            .forward(
                &ids(&r["inputs"]["input_ids"]),
                Some(&ids(&r["inputs"]["attention_mask"])),
            )
            .unwrap();
        let (err, _) = logit_error(&logits, &r);
        assert!(err <= 1e-4, "{err}");
    }
}

#[test]
fn damaged_or_unsupported_gguf_files_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("tiny.gguf");
    write_llama_tiny_gguf(&good);
    let bytes = std::fs::read(&good).unwrap();
    let load = |name: &str, data: &[u8]| -> String {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).unwrap();
        match relprune_models::hf::load(&p, &VarMap::new(), &Device::Cpu) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(name), "{e}");
                e
            }
        }
    };
    let e = load("truncated.gguf", &bytes[..bytes.len() / 2]);
    assert!(e.contains("tensor"), "{e}");
    let e = load("header-only.gguf", &bytes[..40]);
    assert!(e.contains("not a readable GGUF file"), "{e}");
    // The first tensor's type field: after its name, its rank (u32) and two u64 dims.
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    let mut odd = bytes.clone();
    odd[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let e = load("unknown-type.gguf", &odd);
    assert!(e.contains("not a readable GGUF file"), "{e}");
    let mut arch = bytes.clone();
    // Three heads do not divide the 64-wide hidden state.
    let field = b"llama.attention.head_count";
    let at = arch
        .windows(field.len() + 4)
        .position(|w| &w[..field.len()] == field && w[field.len()..] == 4u32.to_le_bytes())
        .unwrap()
        + field.len()
        + 4;
    arch[at..at + 4].copy_from_slice(&3u32.to_le_bytes());
    let e = load("three-heads.gguf", &arch);
    assert!(e.contains("does not divide"), "{e}");
}
