//! One-shot pruning of a decoder LM (the tiny Llama fixture): each method's pattern holds in
//! every pruned matrix, only the seven projections of each layer are touched, and the model
//! still runs.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use relprune_hf::llm::{prune, prune_distilled, windows_at, Distill, EndToEnd, OneShot, Sparsity};
use relprune_models::hf::llama::CausalLm;

fn model() -> (CausalLm, VarMap) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tests/data/llama-tiny");
    let vm = VarMap::new();
    (CausalLm::load(&dir, &vm, &Device::Cpu).unwrap(), vm)
}

fn values(vm: &VarMap, name: &str) -> Vec<Vec<f32>> {
    vm.data().lock().unwrap()[name]
        .as_tensor()
        .to_vec2()
        .unwrap()
}

fn calibration() -> Vec<Vec<u32>> {
    let tokens: Vec<u32> = (0..400).map(|i| (i * 37 % 94 + 3) as u32).collect();
    windows_at(&tokens, &[0, 100, 250], 64).unwrap()
}

#[test]
fn every_method_prunes_the_projections_to_its_pattern_and_nothing_else() {
    let proj = "model.layers.1.mlp.down_proj.weight";
    for method in [OneShot::Magnitude, OneShot::Wanda, OneShot::SparseGpt] {
        let (m, vm) = model();
        let embed_before = values(&vm, "model.embed_tokens.weight");
        let r = prune(
            &m,
            &calibration(),
            method,
            Sparsity::Unstructured(0.5),
            |_| {},
        )
        .unwrap();
        assert!(
            (0.5..0.52).contains(&r.linear_sparsity()),
            "{method:?}: {}",
            r.linear_sparsity()
        );
        assert_eq!(values(&vm, "model.embed_tokens.weight"), embed_before);
        let w = values(&vm, proj);
        if method == OneShot::Wanda {
            // Per output row: exactly half of each row.
            for row in &w {
                assert_eq!(row.iter().filter(|&&x| x == 0.0).count(), row.len() / 2);
            }
        }
        let x = Tensor::new(&[[5u32, 6, 7, 8]], &Device::Cpu).unwrap();
        let logits = m.forward(&x, None).unwrap();
        let finite = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(finite.iter().all(|v| v.is_finite()), "{method:?}");
    }
}

#[test]
fn two_of_four_keeps_two_of_every_four_inputs() {
    for method in [OneShot::Magnitude, OneShot::Wanda, OneShot::SparseGpt] {
        let (m, vm) = model();
        prune(&m, &calibration(), method, Sparsity::NM(2, 4), |_| {}).unwrap();
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
        ] {
            for row in values(&vm, name) {
                for g in row.chunks(4) {
                    assert!(
                        g.iter().filter(|&&x| x != 0.0).count() <= 2,
                        "{method:?} {name}"
                    );
                }
            }
        }
    }
}

#[test]
fn wanda_without_calibration_text_is_an_error() {
    let (m, _) = model();
    let e = prune(&m, &[], OneShot::Wanda, Sparsity::Unstructured(0.5), |_| {}).unwrap_err();
    assert!(e.to_string().contains("needs calibration text"), "{e}");
    assert!(windows_at(&[1, 2, 3], &[2], 4).is_err());
}

/// Mean squared difference of the two models' logits on the calibration windows.
fn logit_error(a: &CausalLm, b: &CausalLm) -> f32 {
    let mut total = 0.0;
    for w in calibration() {
        let x = Tensor::from_slice(&w, (1, w.len()), &Device::Cpu).unwrap();
        let d = (a.forward(&x, None).unwrap() - b.forward(&x, None).unwrap()).unwrap();
        total += d
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
    }
    total
}

#[test]
fn the_method_reaches_the_pattern_and_tracks_the_dense_model_closer_than_its_start() {
    let (dense, _) = model();
    // The regularized head start too: the regularizer, then the last pruning step.
    let cfg = Distill {
        head_start: 0.1,
        regularized_epochs: 3,
        recovery_epochs: 3,
        lr: 1e-3,
        ..Distill::default()
    };
    for sparsity in [Sparsity::Unstructured(0.5), Sparsity::NM(2, 4)] {
        let (start, _) = model();
        prune(&start, &calibration(), OneShot::SparseGpt, sparsity, |_| {}).unwrap();
        let (m, vm) = model();
        let embed_before = values(&vm, "model.embed_tokens.weight");
        let r = prune_distilled(&m, &calibration(), sparsity, &cfg, |_| {}).unwrap();
        assert!(
            (0.5..0.52).contains(&r.linear_sparsity()),
            "{sparsity:?}: {}",
            r.linear_sparsity()
        );
        assert_eq!(values(&vm, "model.embed_tokens.weight"), embed_before);
        let w = values(&vm, "model.layers.1.mlp.up_proj.weight");
        match sparsity {
            Sparsity::NM(..) => {
                for g in w.iter().flat_map(|row| row.chunks(4)) {
                    assert!(g.iter().filter(|&&x| x != 0.0).count() <= 2, "{g:?}");
                }
            }
            Sparsity::Unstructured(_) => {
                let zeros = w.iter().flatten().filter(|&&x| x == 0.0).count();
                assert!(zeros >= w.len() * w[0].len() / 2, "{zeros}");
            }
        }
        let (ours, theirs) = (logit_error(&m, &dense), logit_error(&start, &dense));
        assert!(
            ours < theirs,
            "{sparsity:?}: the method's logit error {ours} vs SparseGPT's {theirs}"
        );
    }
}

/// Zero positions of every projection of `vm`.
fn zero_pattern(vm: &VarMap) -> Vec<bool> {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().filter(|n| n.contains("_proj")).collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| {
            data[*n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .map(|v| v == 0.0)
        .collect()
}

#[test]
fn the_end_to_end_stage_brings_the_logits_closer_to_the_dense_model_with_the_masks_kept() {
    let (dense, _) = model();
    let layer_wise = Distill {
        recovery_epochs: 1,
        lr: 1e-3,
        ..Distill::default()
    };
    let (without, vm_without) = model();
    let s = Sparsity::Unstructured(0.6);
    prune_distilled(&without, &calibration(), s, &layer_wise, |_| {}).unwrap();
    let cfg = Distill {
        end_to_end: Some(EndToEnd {
            epochs: 3,
            lr: 1e-3,
            group: 1,
            window: 32,
            top_k: 8,
        }),
        ..layer_wise
    };
    let (with, vm_with) = model();
    let mut stages = Vec::new();
    let r = prune_distilled(&with, &calibration(), s, &cfg, |d| stages.push(d.stage)).unwrap();
    // One group per layer, each reported; the layer-wise pass is the same as without the stage.
    assert_eq!(r.end_to_end.len(), 2, "{:?}", r.end_to_end);
    assert_eq!(stages, ["layer", "layer", "end-to-end", "end-to-end"]);
    assert!(r
        .end_to_end
        .iter()
        .all(|g| g.after <= g.before && g.before > 0.0));
    assert!(
        r.end_to_end[1].after < r.end_to_end[0].before,
        "{:?}",
        r.end_to_end
    );
    // Training keeps the zeros where the layer-wise pass left them.
    assert_eq!(zero_pattern(&vm_with), zero_pattern(&vm_without));
    let (ours, theirs) = (logit_error(&with, &dense), logit_error(&without, &dense));
    assert!(ours < theirs, "with the stage {ours}, without {theirs}");
}

#[test]
fn the_method_rejects_magnitude_starts_and_bad_settings() {
    let (m, _) = model();
    for cfg in [
        Distill {
            start: OneShot::Magnitude,
            ..Distill::default()
        },
        Distill {
            lr: 0.0,
            ..Distill::default()
        },
        Distill {
            head_start: 1.5,
            ..Distill::default()
        },
        Distill {
            end_to_end: Some(EndToEnd {
                top_k: 0,
                ..EndToEnd::default()
            }),
            ..Distill::default()
        },
    ] {
        let s = Sparsity::Unstructured(0.5);
        assert!(prune_distilled(&m, &calibration(), s, &cfg, |_| {}).is_err());
    }
}

#[test]
fn owl_spreads_layer_sparsities_around_the_target_and_prunes_each_layer_to_its_own() {
    let (m, vm) = model();
    let owl = relprune_hf::llm::Owl::default();
    let s = relprune_hf::llm::owl_sparsities(&m, &calibration(), 0.5, &owl).unwrap();
    // Two layers: min-max scaling puts one at each end of target ± λ.
    let mut sorted = s.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(
        (sorted[0] - 0.42).abs() < 1e-9 && (sorted[1] - 0.58).abs() < 1e-9,
        "{s:?}"
    );
    let plan = relprune_hf::llm::Plan {
        method: relprune_hf::llm::Method::Wanda,
        sparsity: Sparsity::Unstructured(0.5),
        owl: Some(owl),
        distill: Distill::default(),
        scope: None,
    };
    let r = relprune_hf::llm::prune_with(&m, &calibration(), &plan, None, |_| Ok(())).unwrap();
    assert_eq!(r.layer_sparsity.as_deref(), Some(&s[..]));
    assert!(
        (r.linear_sparsity() - 0.5).abs() < 0.01,
        "{}",
        r.linear_sparsity()
    );
    for (l, want) in s.iter().enumerate() {
        let w = values(&vm, &format!("model.layers.{l}.mlp.gate_proj.weight"));
        let zeros = w.iter().flatten().filter(|&&x| x == 0.0).count() as f64;
        let got = zeros / (w.len() * w[0].len()) as f64;
        // Wanda zeroes ⌊s·64⌋ of each row's 64 inputs.
        assert_eq!(
            zeros as usize,
            w.len() * (want * 64.0) as usize,
            "layer {l}: {got} vs {want}"
        );
    }
    let nm = relprune_hf::llm::Plan {
        sparsity: Sparsity::NM(2, 4),
        ..plan
    };
    assert!(relprune_hf::llm::prune_with(&m, &calibration(), &nm, None, |_| Ok(())).is_err());
}

/// Fractions of zeros of each projection of `vm`, and of all of them.
fn projection_sparsities(vm: &VarMap) -> (Vec<f64>, f64) {
    let data = vm.data().lock().unwrap();
    let (mut each, mut zeros, mut all) = (Vec::new(), 0, 0);
    for (name, v) in data.iter().filter(|(n, _)| n.contains("_proj")) {
        let w = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let z = w.iter().filter(|&&x| x == 0.0).count();
        each.push(z as f64 / w.len() as f64);
        assert!(!name.is_empty());
        (zeros, all) = (zeros + z, all + w.len());
    }
    (each, zeros as f64 / all as f64)
}

#[test]
fn the_scope_sets_which_weights_are_compared() {
    use relprune_hf::llm::{prune_with, Method, Plan, Scope};
    let plan = |method, scope| Plan {
        method,
        sparsity: Sparsity::Unstructured(0.5),
        owl: None,
        distill: Distill::default(),
        scope,
    };
    // Global magnitude: half of all the weights, not half of each matrix.
    let (m, vm) = model();
    prune_with(
        &m,
        &[],
        &plan(Method::Magnitude, Some(Scope::Global)),
        None,
        |_| Ok(()),
    )
    .unwrap();
    let (each, all) = projection_sparsities(&vm);
    assert!((all - 0.5).abs() < 1e-3, "{all}");
    assert!(each.iter().any(|&s| (s - 0.5).abs() > 0.005), "{each:?}");
    // Wanda per layer: half of each matrix, not of each row.
    let (m, vm) = model();
    let p = plan(Method::Wanda, Some(Scope::Layer));
    prune_with(&m, &calibration(), &p, None, |_| Ok(())).unwrap();
    let (each, _) = projection_sparsities(&vm);
    assert!(each.iter().all(|&s| (s - 0.5).abs() < 1e-3), "{each:?}");
    let w = values(&vm, "model.layers.1.mlp.up_proj.weight");
    let rows: Vec<usize> = w
        .iter()
        .map(|r| r.iter().filter(|&&x| x == 0.0).count())
        .collect();
    assert!(rows.iter().any(|&z| z != w[0].len() / 2), "{rows:?}");
    // What a scope cannot mean is an error.
    let (m, _) = model();
    for (method, scope, sparsity) in [
        (Method::Wanda, Scope::Global, Sparsity::Unstructured(0.5)),
        (Method::SparseGpt, Scope::Row, Sparsity::Unstructured(0.5)),
        (Method::Relprune, Scope::Layer, Sparsity::Unstructured(0.5)),
        (Method::Magnitude, Scope::Row, Sparsity::NM(2, 4)),
    ] {
        let p = Plan {
            sparsity,
            ..plan(method, Some(scope))
        };
        let e = prune_with(&m, &calibration(), &p, None, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("scope"), "{e}");
    }
}
