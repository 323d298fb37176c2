//! A user's own candle training loop with relprune's regularizer and masks added in a few lines.

use candle_core::{Device, Module};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;
use relprune_core::SelectiveDecay;
use relprune_data::{DataSource, DatasetKind};
use relprune_models::Lenet300;
use relprune_prune::{MaskedSgd, Masks, Optimizer, ParamSet, Selection, SgdConfig};

#[test]
fn masked_regularized_sgd_trains_lenet_on_real_mnist_and_keeps_pruned_weights_at_zero() {
    let data = relprune_data::load(DatasetKind::Mnist, &DataSource::Embedded).unwrap();
    let train = data.train.take_first(3000).unwrap();
    let test = data.test.take_first(1000).unwrap();

    let varmap = VarMap::new();
    let net = Lenet300::new(&varmap, 0, &Device::Cpu).unwrap();
    // The relprune part: parameters, masks (here: prune the 50% smallest weights up front), optimizer.
    let params = ParamSet::from_varmap(&varmap, &Selection::default()).unwrap();
    let mut masks = Masks::dense(&params).unwrap();
    masks.prune_below(&params, 0.02).unwrap();
    let remaining = masks.remaining_fraction().unwrap();
    assert!(remaining > 0.2 && remaining < 0.8, "{remaining}");
    let reg = SelectiveDecay::default().with_lambda(1e-3);
    let mut opt = MaskedSgd::new(
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            nesterov: false,
        },
        Some(reg),
    )
    .unwrap();

    let error = |net: &Lenet300| {
        let logits = net.forward(&test.images).unwrap();
        let c = relprune_eval::count_correct(&logits, &test.labels).unwrap();
        relprune_eval::top1_error_pct(c, test.len()).unwrap()
    };
    let before = error(&net);
    let mut rng = StdRng::seed_from_u64(0);
    for _epoch in 0..3 {
        for batch in train.batches(100, Some(&mut rng)).unwrap() {
            let (x, y) = batch.unwrap();
            let loss = candle_nn::loss::cross_entropy(&net.forward(&x).unwrap(), &y).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&params, &masks, &grads).unwrap();
        }
    }
    let after = error(&net);
    assert!(
        after < 20.0 && after < before - 50.0,
        "error {before} -> {after}"
    );

    // Pruned weights are exactly zero after 90 momentum steps; the masks did not change.
    for (name, mask) in masks.iter() {
        let p = params.iter().find(|p| &p.name == name).unwrap();
        let w: Vec<f32> = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let m: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            w.iter().zip(&m).all(|(w, m)| *m != 0.0 || *w == 0.0),
            "{name}"
        );
    }
    assert_eq!(masks.remaining_fraction().unwrap(), remaining);
}
