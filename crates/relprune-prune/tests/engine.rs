//! Engine tests on a tiny hand-built model: optimizer paths, mask invariants, search, export.

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use relprune_core::SelectiveDecay;
use relprune_prune::threshold::{search_global, BisectionConfig, Bounds};
use relprune_prune::{
    export, AdamConfig, Evaluation, MaskedAdam, MaskedSgd, Masks, MetricSpec, Optimizer, ParamSet,
    Selection, SgdConfig,
};

fn tiny_model(seed: u32) -> (VarMap, ParamSet) {
    let vm = VarMap::new();
    let mut x = seed.wrapping_mul(747796405).wrapping_add(2891336453);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x as f32 / u32::MAX as f32) - 0.5
    };
    let w: Vec<f32> = (0..6 * 8).map(|_| next()).collect();
    let b: Vec<f32> = (0..6).map(|_| next()).collect();
    {
        let mut d = vm.data().lock().unwrap();
        d.insert(
            "lin.weight".into(),
            Var::from_vec(w, (6, 8), &Device::Cpu).unwrap(),
        );
        d.insert(
            "lin.bias".into(),
            Var::from_vec(b, 6, &Device::Cpu).unwrap(),
        );
    }
    let ps = ParamSet::from_varmap(&vm, &Selection::default()).unwrap();
    (vm, ps)
}

fn input(step: usize) -> Tensor {
    let v: Vec<f32> = (0..4 * 8)
        .map(|i| (((i + 3 * step) % 7) as f32 - 3.0) / 3.0)
        .collect();
    Tensor::from_vec(v, (4, 8), &Device::Cpu).unwrap()
}

fn loss(ps: &ParamSet, step: usize) -> Tensor {
    let w = ps
        .iter()
        .find(|p| p.name == "lin.weight")
        .unwrap()
        .var
        .as_tensor()
        .clone();
    let b = ps
        .iter()
        .find(|p| p.name == "lin.bias")
        .unwrap()
        .var
        .as_tensor()
        .clone();
    let y = input(step)
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    (y.tanh().unwrap() - 0.3)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn values(ps: &ParamSet, name: &str) -> Vec<f32> {
    ps.iter()
        .find(|p| p.name == name)
        .unwrap()
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn half_pruned(ps: &ParamSet) -> Masks {
    let mut masks = Masks::dense(ps).unwrap();
    masks.prune_below(ps, 0.25).unwrap();
    masks
}

fn run(
    cfg: SgdConfig,
    reg: Option<SelectiveDecay>,
    fused: bool,
    steps: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Masks) {
    let (_vm, ps) = tiny_model(1);
    let masks = half_pruned(&ps);
    let mut opt = MaskedSgd::new(cfg, reg).unwrap();
    opt.set_fused(fused);
    for s in 0..steps {
        let grads = loss(&ps, s).backward().unwrap();
        opt.step(&ps, &masks, &grads).unwrap();
    }
    let v = opt
        .velocity("lin.weight")
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
        .unwrap_or_default();
    (values(&ps, "lin.weight"), values(&ps, "lin.bias"), v, masks)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{x} vs {y}");
    }
}

#[test]
fn fused_and_tensor_op_steps_agree_for_every_optimizer_and_regularizer_variant() {
    let hard = SelectiveDecay {
        lambda: 0.02,
        ..Default::default()
    };
    let variants = [
        None,
        Some(hard),
        Some(SelectiveDecay::lobster(0.02)),
        Some(SelectiveDecay::l1(0.002)),
        Some(SelectiveDecay {
            ema_beta: 0.9,
            ..hard
        }),
        Some(SelectiveDecay {
            ema_beta: 0.5,
            relevance: relprune_core::Relevance::Taylor,
            ..hard
        }),
    ];
    for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
        let cfg = SgdConfig {
            lr: 0.1,
            momentum,
            nesterov,
        };
        for r in variants {
            let (w1, b1, v1, _) = run(cfg, r, true, 25);
            let (w2, b2, v2, _) = run(cfg, r, false, 25);
            assert_close(&w1, &w2, 1e-6);
            assert_close(&b1, &b2, 1e-6);
            assert_close(&v1, &v2, 1e-6);
        }
    }
}

#[test]
fn pruned_weights_and_their_momentum_stay_exactly_zero_after_many_steps() {
    for reg in [
        SelectiveDecay {
            lambda: 0.01,
            ..Default::default()
        },
        SelectiveDecay {
            lambda: 0.01,
            ema_beta: 0.9,
            ..Default::default()
        },
        SelectiveDecay::l1(0.001),
    ] {
        pruned_stay_zero(reg);
    }
}

fn pruned_stay_zero(reg: SelectiveDecay) {
    for fused in [true, false] {
        for nesterov in [false, true] {
            let cfg = SgdConfig {
                lr: 0.2,
                momentum: 0.9,
                nesterov,
            };
            let (w, _, v, masks) = run(cfg, Some(reg), fused, 300);
            let m: Vec<f32> = masks
                .get("lin.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let pruned = m.iter().filter(|&&x| x == 0.0).count();
            assert!(
                pruned > 5 && pruned < m.len() - 5,
                "the test needs a partly pruned tensor"
            );
            for i in 0..m.len() {
                if m[i] == 0.0 {
                    assert_eq!(w[i], 0.0, "pruned weight {i} came back (fused={fused})");
                    assert_eq!(v[i], 0.0, "pruned momentum {i} is not zero (fused={fused})");
                } else {
                    assert_ne!(w[i], 0.0);
                }
            }
        }
    }
}

#[test]
fn pruning_mid_training_without_a_state_reset_still_keeps_pruned_weights_at_zero() {
    for fused in [true, false] {
        let (_vm, ps) = tiny_model(11);
        let mut masks = Masks::dense(&ps).unwrap();
        let reg = SelectiveDecay {
            lambda: 0.01,
            ema_beta: 0.8,
            ..Default::default()
        };
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: true,
        };
        let mut opt = MaskedSgd::new(cfg, Some(reg)).unwrap();
        opt.set_fused(fused);
        for s in 0..10 {
            opt.step(&ps, &masks, &loss(&ps, s).backward().unwrap())
                .unwrap();
        }
        masks.prune_below(&ps, 0.25).unwrap();
        for s in 10..60 {
            opt.step(&ps, &masks, &loss(&ps, s).backward().unwrap())
                .unwrap();
        }
        let w = values(&ps, "lin.weight");
        let m: Vec<f32> = masks
            .get("lin.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(m.contains(&0.0));
        for (w, m) in w.iter().zip(&m) {
            assert!(
                *m != 0.0 || *w == 0.0,
                "a pruned weight moved (fused={fused})"
            );
        }
    }
}

#[test]
fn lambda_zero_equals_the_unregularized_optimizer_exactly() {
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        nesterov: false,
    };
    let reg = SelectiveDecay::default().with_lambda(0.0);
    let (w1, ..) = run(cfg, Some(reg), true, 20);
    let (w2, ..) = run(cfg, None, true, 20);
    assert_eq!(w1, w2);
}

#[test]
fn the_regularizer_leaves_biases_alone() {
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.0,
        nesterov: false,
    };
    let big = SelectiveDecay::l2(0.5);
    let (_, b1, ..) = run(cfg, Some(big), true, 1);
    let (_, b2, ..) = run(cfg, None, true, 1);
    assert_eq!(b1, b2);
}

#[test]
fn loss_term_form_and_decoupled_form_take_the_same_sgd_step() {
    let lr = 0.1;
    let reg = SelectiveDecay {
        lambda: 0.03,
        ..Default::default()
    };
    // Decoupled: the engine's step.
    let (_vm, ps) = tiny_model(3);
    let masks = Masks::dense(&ps).unwrap();
    let mut opt = MaskedSgd::new(
        SgdConfig {
            lr,
            momentum: 0.0,
            nesterov: false,
        },
        Some(reg),
    )
    .unwrap();
    opt.step(&ps, &masks, &loss(&ps, 0).backward().unwrap())
        .unwrap();
    let decoupled = values(&ps, "lin.weight");
    // Loss-term: plain SGD on L + R/lr, the gate computed from the plain loss gradient.
    let (_vm2, ps2) = tiny_model(3);
    let w = ps2
        .iter()
        .find(|p| p.name == "lin.weight")
        .unwrap()
        .var
        .clone();
    let g = loss(&ps2, 0)
        .backward()
        .unwrap()
        .get(w.as_tensor())
        .unwrap()
        .clone();
    let gate = reg.gate(w.as_tensor(), &g, None).unwrap();
    let total =
        (loss(&ps2, 0) + (reg.loss_term(w.as_tensor(), &gate).unwrap() / lr).unwrap()).unwrap();
    let g_total = total
        .backward()
        .unwrap()
        .get(w.as_tensor())
        .unwrap()
        .clone();
    w.set(&(w.as_tensor() - (g_total * lr).unwrap()).unwrap())
        .unwrap();
    assert_close(&decoupled, &values(&ps2, "lin.weight"), 1e-6);
}

#[test]
fn bisection_finds_the_largest_threshold_within_tolerance() {
    let (_vm, ps) = tiny_model(5);
    let masks = Masks::dense(&ps).unwrap();
    // A synthetic validation loss: base 1.0, growing linearly with the threshold; bound 1.05 → T = 0.2.
    let cfg = BisectionConfig {
        twt: 0.05,
        rel_stop: 0.001,
        ..Default::default()
    };
    let bounds = Bounds {
        base_loss: 1.0,
        reference_metric: 2.0,
        metric: MetricSpec {
            name: "error".into(),
            higher_is_better: false,
        },
    };
    let eval = |loss: f64, metric: f64| Ok(Evaluation { loss, metric });
    let s = search_global(&ps, &masks, &bounds, &cfg, |th| {
        eval(1.0 + 0.25 * th["lin.weight"], 2.0)
    })
    .unwrap();
    assert!((s.threshold - 0.2).abs() < 1e-3, "{s:?}");
    assert!(s.loss <= 1.05);
    // Nothing feasible: the threshold prunes nothing (it is the smallest alive magnitude).
    let s = search_global(&ps, &masks, &bounds, &cfg, |_| eval(2.0, 2.0)).unwrap();
    let min_alive = values(&ps, "lin.weight")
        .iter()
        .map(|x| x.abs())
        .fold(f32::INFINITY, f32::min);
    assert_eq!(s.threshold as f32, min_alive);
    let mut m2 = masks.clone();
    m2.prune_below(&ps, s.threshold).unwrap();
    assert_eq!(m2.totals().unwrap(), masks.totals().unwrap());

    // With a metric bound, the metric limits T even where the loss would allow more:
    // error = 2 + 10·T must stay within 0.5 of the reference 2.0 → T ≤ 0.05.
    let cfg = BisectionConfig {
        max_metric_worsening: Some(0.5),
        rel_bracket: 0.001,
        ..cfg
    };
    let s = search_global(&ps, &masks, &bounds, &cfg, |th| {
        eval(1.0, 2.0 + 10.0 * th["lin.weight"])
    })
    .unwrap();
    assert!((s.threshold - 0.05).abs() < 2e-4, "{s:?}");
}

#[test]
fn bisection_against_the_task_metric_ignores_the_loss_and_bounds_the_metric() {
    use relprune_prune::threshold::Criterion;
    let (_vm, ps) = tiny_model(5);
    let masks = Masks::dense(&ps).unwrap();
    let cfg = BisectionConfig {
        criterion: Criterion::Metric { tolerance: 0.3 },
        rel_bracket: 0.001,
        ..Default::default()
    };
    let bounds = Bounds {
        base_loss: 1.0,
        reference_metric: 1.0,
        metric: MetricSpec {
            name: "bleu".into(),
            higher_is_better: true,
        },
    };
    // BLEU = 30 − 4·T (the unpruned model: 30 at T = 0); the loss rises steeply and would stop
    // a loss search near T = 0. Within 0.3 BLEU of 30 → T ≤ 0.075.
    let mut calls = 0;
    let s = search_global(&ps, &masks, &bounds, &cfg, |th| {
        calls += 1;
        let t = th["lin.weight"];
        Ok(Evaluation {
            loss: 1.0 + 100.0 * t,
            metric: 30.0 - 4.0 * t,
        })
    })
    .unwrap();
    assert!((s.threshold - 0.075).abs() < 2e-4, "{s:?}");
    assert_eq!(s.evaluations, calls, "the base evaluation is counted");
}

#[test]
fn sparse_format_round_trips_and_a_dense_file_is_rejected() {
    let (_vm, ps) = tiny_model(7);
    let masks = half_pruned(&ps);
    masks.apply(&ps).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("m.sparse.safetensors");
    let dense = dir.path().join("m.safetensors");
    export::save_sparse(&ps, &sparse).unwrap();
    export::save_dense(&ps, &dense).unwrap();
    let back = export::load_sparse(&sparse, &Device::Cpu).unwrap();
    for (name, t) in ps.tensors() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{name}");
        assert_eq!(t.dims(), back[&name].dims());
    }
    assert!(!dir.path().join("m.safetensors.tmp").exists());
    // A dense file is not mistaken for the sparse format.
    let e = export::load_sparse(&dense, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.safetensors") && e.contains(export::SPARSE_FORMAT),
        "{e}"
    );
}

#[test]
fn masks_from_nonzero_recover_the_pruning_of_a_loaded_model() {
    let (_vm, ps) = tiny_model(9);
    let masks = half_pruned(&ps);
    let again = Masks::from_nonzero(&ps).unwrap();
    assert_eq!(masks.totals().unwrap(), again.totals().unwrap());
}

fn run_adam(
    cfg: AdamConfig,
    reg: Option<SelectiveDecay>,
    fused: bool,
    steps: usize,
    prune_at: usize,
) -> (Vec<f32>, Vec<f32>, Masks, MaskedAdam) {
    run_adam_with(cfg, reg, fused, steps, prune_at, true)
}

fn run_adam_with(
    cfg: AdamConfig,
    reg: Option<SelectiveDecay>,
    fused: bool,
    steps: usize,
    prune_at: usize,
    keep_scratch: bool,
) -> (Vec<f32>, Vec<f32>, Masks, MaskedAdam) {
    let (_vm, ps) = tiny_model(13);
    let mut masks = Masks::dense(&ps).unwrap();
    let mut opt = MaskedAdam::new(cfg, reg).unwrap();
    opt.set_fused(fused);
    opt.set_keep_scratch(keep_scratch);
    for s in 0..steps {
        if s == prune_at {
            masks.prune_below(&ps, 0.25).unwrap();
        }
        let grads = loss(&ps, s).backward().unwrap();
        opt.step(&ps, &masks, &grads).unwrap();
    }
    (
        values(&ps, "lin.weight"),
        values(&ps, "lin.bias"),
        masks,
        opt,
    )
}

#[test]
fn adam_without_a_kept_scratch_buffer_takes_bit_identical_steps() {
    let reg = Some(SelectiveDecay::lobster(1e-3));
    let kept = run_adam_with(AdamConfig::default(), reg, true, 12, 5, true);
    let freed = run_adam_with(AdamConfig::default(), reg, true, 12, 5, false);
    assert_eq!((kept.0, kept.1), (freed.0, freed.1));
}

#[test]
fn adam_fused_and_tensor_op_steps_agree_for_adam_adamw_and_regularizers() {
    let hard = SelectiveDecay {
        lambda: 0.02,
        ..Default::default()
    };
    for (wd, decoupled) in [(0.0, true), (0.01, true), (0.01, false)] {
        let cfg = AdamConfig {
            lr: 0.01,
            weight_decay: wd,
            decoupled_weight_decay: decoupled,
            ..Default::default()
        };
        for r in [
            None,
            Some(hard),
            Some(SelectiveDecay::lobster(0.02)),
            Some(SelectiveDecay {
                ema_beta: 0.9,
                ..hard
            }),
        ] {
            let (w1, b1, _, o1) = run_adam(cfg, r, true, 20, 5);
            let (w2, b2, _, o2) = run_adam(cfg, r, false, 20, 5);
            assert_close(&w1, &w2, 2e-6);
            assert_close(&b1, &b2, 2e-6);
            let m = |o: &MaskedAdam| -> Vec<f32> {
                o.moments("lin.weight")
                    .unwrap()
                    .1
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_close(&m(&o1), &m(&o2), 1e-6);
        }
    }
}

#[test]
fn adam_keeps_pruned_weights_and_both_moments_at_zero_after_pruning_mid_training() {
    let reg = SelectiveDecay {
        lambda: 0.01,
        ..Default::default()
    };
    let cfg = AdamConfig {
        lr: 0.02,
        weight_decay: 0.01,
        ..Default::default()
    };
    for fused in [true, false] {
        let (w, _, masks, opt) = run_adam(cfg, Some(reg), fused, 200, 20);
        let m: Vec<f32> = masks
            .get("lin.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (m1, m2) = opt.moments("lin.weight").unwrap();
        let m1: Vec<f32> = m1.flatten_all().unwrap().to_vec1().unwrap();
        let m2: Vec<f32> = m2.flatten_all().unwrap().to_vec1().unwrap();
        assert!(m.contains(&0.0));
        for i in 0..m.len() {
            if m[i] == 0.0 {
                assert_eq!(
                    (w[i], m1[i], m2[i]),
                    (0.0, 0.0, 0.0),
                    "element {i} (fused={fused})"
                );
            }
        }
    }
}

#[test]
fn adams_first_step_moves_each_weight_by_the_learning_rate_against_its_gradient() {
    // With bias correction, step 1 is lr·g/(|g|+ε) = lr·sign(g) for |g| ≫ ε.
    let (_vm, ps) = tiny_model(17);
    let before = values(&ps, "lin.weight");
    let w = ps
        .iter()
        .find(|p| p.name == "lin.weight")
        .unwrap()
        .var
        .clone();
    let grads = loss(&ps, 0).backward().unwrap();
    let g: Vec<f32> = grads
        .get(w.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut opt = MaskedAdam::new(
        AdamConfig {
            lr: 0.01,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    opt.step(&ps, &Masks::dense(&ps).unwrap(), &grads).unwrap();
    let after = values(&ps, "lin.weight");
    for i in 0..g.len() {
        if g[i].abs() > 1e-4 {
            let want = before[i] - 0.01 * g[i].signum();
            assert!(
                (after[i] - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                after[i]
            );
        }
    }
}

#[test]
fn a_landing_on_a_target_that_is_no_whole_count_counts_as_reached() {
    let (_vm, ps) = tiny_model(19);
    let mut masks = Masks::dense(&ps).unwrap();
    masks.prune_to_sparsity(&ps, 0.8, false).unwrap();
    // round(0.8 · 48) = 38 pruned: 79.2% as a fraction, the target as a count.
    assert!(1.0 - masks.remaining_fraction().unwrap() < 0.8);
    assert_eq!(masks.pruned_vs_target(0.8).unwrap(), (38, 38));
}

#[test]
fn pruning_each_layer_to_at_least_a_target_leaves_sparser_layers_alone() {
    let (_vm, ps) = tiny_model(23);
    let mut masks = Masks::dense(&ps).unwrap();
    masks.prune_to_sparsity(&ps, 0.25, true).unwrap();
    // Already sparser than 10%: nothing to do, where the exact landing would refuse.
    assert_eq!(masks.prune_each_to_at_least(&ps, 0.1).unwrap(), 0);
    assert_eq!(masks.totals().unwrap(), (48, 36));
    // 50% of 48 = 24 pruned, 12 of them new, the smallest alive magnitudes.
    let before: Vec<f32> = values(&ps, "lin.weight");
    assert_eq!(masks.prune_each_to_at_least(&ps, 0.5).unwrap(), 12);
    assert_eq!(masks.totals().unwrap(), (48, 24));
    let after = values(&ps, "lin.weight");
    let largest_pruned = before
        .iter()
        .zip(&after)
        .filter(|(_, &a)| a == 0.0)
        .map(|(b, _)| b.abs())
        .fold(0.0f32, f32::max);
    let smallest_kept = after
        .iter()
        .filter(|a| **a != 0.0)
        .map(|a| a.abs())
        .fold(f32::INFINITY, f32::min);
    assert!(largest_pruned <= smallest_kept);
}

#[test]
fn prune_to_sparsity_hits_the_exact_count_globally_and_per_layer() {
    let (_vm, ps) = tiny_model(19);
    let mut masks = Masks::dense(&ps).unwrap();
    // 48 weights: 25% → 12 pruned, the 12 smallest magnitudes.
    masks.prune_to_sparsity(&ps, 0.25, false).unwrap();
    assert_eq!(masks.totals().unwrap(), (48, 36));
    let mut a: Vec<f32> = values(&ps, "lin.weight").iter().map(|x| x.abs()).collect();
    let zeros = a.iter().filter(|&&x| x == 0.0).count();
    assert_eq!(zeros, 12);
    a.sort_by(f32::total_cmp);
    // Raising the target keeps what was pruned and adds the next smallest.
    masks.prune_to_sparsity(&ps, 0.5, true).unwrap();
    assert_eq!(masks.totals().unwrap(), (48, 24));
    assert!(
        masks.prune_to_sparsity(&ps, 0.1, false).is_err(),
        "cannot un-prune"
    );
    assert!(masks.prune_to_sparsity(&ps, 1.5, false).is_err());
    // Masks and weights agree.
    let m: Vec<f32> = masks
        .get("lin.weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w = values(&ps, "lin.weight");
    assert!(w.iter().zip(&m).all(|(w, m)| (*w == 0.0) == (*m == 0.0)));
}

#[test]
fn per_layer_scope_scales_each_layers_threshold_by_its_mean_magnitude() {
    let vm = VarMap::new();
    {
        let mut d = vm.data().lock().unwrap();
        let big = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let small = Var::new(&[[0.01f32, 0.02], [0.03, 0.04]], &Device::Cpu).unwrap();
        d.insert("a.weight".into(), big);
        d.insert("b.weight".into(), small);
    }
    let ps = ParamSet::from_varmap(&vm, &Selection::default()).unwrap();
    let masks = Masks::dense(&ps).unwrap();
    let bounds = Bounds {
        base_loss: 1.0,
        reference_metric: 0.0,
        metric: MetricSpec {
            name: "error".into(),
            higher_is_better: false,
        },
    };
    let cfg = BisectionConfig {
        twt: 0.05,
        rel_stop: 0.001,
        scope: relprune_prune::threshold::Scope::PerLayer,
        ..Default::default()
    };
    // Loss grows with the factor t = threshold / layer mean (a: 2.5): bound 1.05 → t = 0.9.
    let s = search_global(&ps, &masks, &bounds, &cfg, |th| {
        Ok(Evaluation {
            loss: 1.0 + 0.05 * (th["a.weight"] / 2.5) / 0.9,
            metric: 0.0,
        })
    })
    .unwrap();
    assert!((s.threshold - 0.9).abs() < 2e-3, "{s:?}");
    assert!((s.thresholds["a.weight"] / s.thresholds["b.weight"] - 100.0).abs() < 1e-3);
    // Pruning with these thresholds removes the same two elements (the smallest) of both layers.
    let mut m = masks.clone();
    m.prune_below_per_layer(&ps, &s.thresholds).unwrap();
    let alive: Vec<usize> = m.alive_counts().unwrap().iter().map(|c| c.2).collect();
    assert_eq!(alive, vec![2, 2]);
}

/// The outputs `tanh(x Wᵀ + b)` of the tiny model (what the output sensitivity differentiates).
fn outputs(ps: &ParamSet, step: usize) -> Tensor {
    let get = |n: &str| {
        ps.iter()
            .find(|p| p.name == n)
            .unwrap()
            .var
            .as_tensor()
            .clone()
    };
    input(step)
        .matmul(&get("lin.weight").t().unwrap())
        .unwrap()
        .broadcast_add(&get("lin.bias"))
        .unwrap()
        .tanh()
        .unwrap()
}

fn run_scored(opt: &mut dyn Optimizer, steps: usize) -> (Vec<f32>, Masks) {
    let (_vm, ps) = tiny_model(3);
    let masks = half_pruned(&ps);
    for s in 0..steps {
        let grads = loss(&ps, s).backward().unwrap();
        let w = ps.iter().find(|p| p.name == "lin.weight").unwrap();
        let sens = relprune_core::output_sensitivity(&outputs(&ps, s), &[w.var.as_tensor()])
            .unwrap()
            .remove(0)
            .unwrap();
        let scores = [("lin.weight".to_string(), sens)].into_iter().collect();
        opt.step_scored(&ps, &masks, &grads, Some(&scores)).unwrap();
    }
    (values(&ps, "lin.weight"), masks)
}

#[test]
fn output_sensitivity_steps_agree_fused_and_tensor_and_keep_pruned_weights_zero() {
    let regs = [
        SelectiveDecay::output_sensitivity(0.05),
        SelectiveDecay {
            relevance: relprune_core::Relevance::OutputSensitivity,
            ema_beta: 0.8,
            ..SelectiveDecay::default().with_lambda(0.05)
        },
    ];
    for reg in regs {
        for nesterov in [false, true] {
            let cfg = SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov,
            };
            let mut a = MaskedSgd::new(cfg, Some(reg)).unwrap();
            let mut b = MaskedSgd::new(cfg, Some(reg)).unwrap();
            b.set_fused(false);
            let (w1, masks) = run_scored(&mut a, 20);
            let (w2, _) = run_scored(&mut b, 20);
            assert_close(&w1, &w2, 1e-6);
            let m: Vec<f32> = masks
                .get("lin.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(m.contains(&0.0));
            for (w, m) in w1.iter().zip(&m) {
                if *m == 0.0 {
                    assert_eq!(*w, 0.0);
                }
            }
        }
        let adam = AdamConfig {
            lr: 0.01,
            ..AdamConfig::default()
        };
        let mut a = MaskedAdam::new(adam, Some(reg)).unwrap();
        let mut b = MaskedAdam::new(adam, Some(reg)).unwrap();
        b.set_fused(false);
        // Adam's division by √v amplifies rounding differences of the two paths.
        assert_close(&run_scored(&mut a, 20).0, &run_scored(&mut b, 20).0, 1e-5);
    }
}

#[test]
fn output_sensitivity_decays_differently_from_the_gradient_rule() {
    // Same gate and λ, scores from the outputs instead of the loss: a different trajectory,
    // so the scores really are used.
    let cfg = SgdConfig::default();
    let sens = SelectiveDecay::output_sensitivity(0.05);
    let grad = SelectiveDecay::lobster(0.05);
    let (w_sens, _) = run_scored(&mut MaskedSgd::new(cfg, Some(sens)).unwrap(), 10);
    let (_vm, ps) = tiny_model(3);
    let masks = half_pruned(&ps);
    let mut opt = MaskedSgd::new(cfg, Some(grad)).unwrap();
    for s in 0..10 {
        let grads = loss(&ps, s).backward().unwrap();
        opt.step(&ps, &masks, &grads).unwrap();
    }
    assert_ne!(w_sens, values(&ps, "lin.weight"));
}

#[test]
fn output_sensitivity_without_precomputed_scores_is_a_clear_error() {
    let (_vm, ps) = tiny_model(3);
    let masks = Masks::dense(&ps).unwrap();
    let reg = SelectiveDecay::output_sensitivity(0.05);
    let mut opt = MaskedSgd::new(SgdConfig::default(), Some(reg)).unwrap();
    let grads = loss(&ps, 0).backward().unwrap();
    let err = opt.step(&ps, &masks, &grads).unwrap_err().to_string();
    assert!(
        err.contains("output-sensitivity") && err.contains("lin.weight"),
        "{err}"
    );
}

#[test]
fn the_dense_file_stores_pruned_weights_as_positive_zeros() {
    let (_vm, ps) = tiny_model(9);
    // A negative weight masked to zero becomes -0.0 in memory.
    let w = ps.iter().find(|p| p.name == "lin.weight").unwrap();
    let mut v = values(&ps, "lin.weight");
    v[0] = -0.0;
    v[1] = -0.0;
    w.var
        .set(&Tensor::from_vec(v, (6, 8), &Device::Cpu).unwrap())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    export::save_dense(&ps, &path).unwrap();
    let back = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let bits: Vec<u32> = back["lin.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(
        &bits[..2],
        &[0, 0],
        "negative zeros must be written as +0.0"
    );
    assert!(!bits.contains(&0x8000_0000));
}

/// Weights after `steps` steps of `opt` on a 300×400 layer (large enough for the fused kernels
/// to split it over the pool), half pruned, run on a pool of `threads` threads.
fn large_layer_run(threads: usize, mut opt: Box<dyn Optimizer + Send>, steps: usize) -> Vec<f32> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(move || {
        let n: usize = 300 * 400;
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0)
            .collect();
        let var = Var::from_vec(w, (300, 400), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(x, (300, 400), &Device::Cpu).unwrap();
        let vm = VarMap::new();
        vm.data()
            .lock()
            .unwrap()
            .insert("big.weight".into(), var.clone());
        let ps = ParamSet::from_varmap(&vm, &Selection::default()).unwrap();
        let mut masks = Masks::dense(&ps).unwrap();
        masks.prune_to_sparsity(&ps, 0.5, true).unwrap();
        masks.apply(&ps).unwrap();
        for s in 0..steps {
            let l = ((var.as_tensor() * &x).unwrap() - 0.1 * s as f64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&ps, &masks, &l.backward().unwrap()).unwrap();
        }
        values(&ps, "big.weight")
    })
}

#[test]
fn optimizer_steps_give_the_same_bits_on_one_thread_and_on_two() {
    let reg = SelectiveDecay::default().with_lambda(0.05);
    let adam = AdamConfig {
        lr: 0.01,
        weight_decay: 0.01,
        ..AdamConfig::default()
    };
    let sgd = SgdConfig {
        lr: 0.01,
        momentum: 0.9,
        nesterov: true,
    };
    type Make = Box<dyn Fn() -> Box<dyn Optimizer + Send>>;
    let makes: Vec<(&str, Make)> = vec![
        (
            "adam",
            Box::new(move || Box::new(MaskedAdam::new(adam, None).unwrap())),
        ),
        (
            "adam + regularizer",
            Box::new(move || Box::new(MaskedAdam::new(adam, Some(reg)).unwrap())),
        ),
        (
            "sgd + regularizer",
            Box::new(move || Box::new(MaskedSgd::new(sgd, Some(reg)).unwrap())),
        ),
    ];
    for (name, make) in makes {
        let one = large_layer_run(1, make(), 3);
        let two = large_layer_run(2, make(), 3);
        assert!(
            one.contains(&0.0) && one.iter().any(|&w| w != 0.0),
            "{name}"
        );
        let same = one
            .iter()
            .zip(&two)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: the steps differ between one thread and two");
    }
}

#[test]
fn masks_from_tensors_refuse_values_other_than_zero_and_one_naming_the_parameter() {
    let ok = Tensor::new(&[1f32, 0.0, 1.0], &Device::Cpu).unwrap();
    let half = Tensor::new(&[1f32, 0.5, 0.0], &Device::Cpu).unwrap();
    let masks = |t: &Tensor| {
        let mut m = std::collections::BTreeMap::new();
        m.insert("lin.weight".to_string(), t.clone());
        Masks::from_tensors(m)
    };
    assert!(masks(&ok).is_ok());
    let err = masks(&half).unwrap_err().to_string();
    assert!(err.contains("lin.weight") && err.contains("0.5"), "{err}");
}
