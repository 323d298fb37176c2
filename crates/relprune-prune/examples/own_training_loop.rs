//! relprune's regularizer and masks in your own candle training loop: a small classifier whose
//! labels depend on 4 of its 32 inputs, trained with masked, regularized SGD. The regularizer
//! decays the weights that do not matter to the loss; magnitude pruning then removes them, and
//! training goes on with the pruned weights held at exactly zero.
//! `cargo run --release -p relprune-prune --example own_training_loop`

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, VarBuilder, VarMap};
use relprune_core::SelectiveDecay;
use relprune_prune::{MaskedSgd, Masks, Optimizer, ParamSet, Selection, SgdConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2048, 32), &dev)?;
    let y = x.narrow(1, 0, 4)?.argmax(D::Minus1)?;

    // Your model, as usual: its parameters in a VarMap.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let (fc1, fc2) = (linear(32, 64, vb.pp("fc1"))?, linear(64, 4, vb.pp("fc2"))?);
    let model = |x: &Tensor| fc2.forward(&fc1.forward(x)?.relu()?);

    // relprune: the prunable weights, their masks, and SGD with the selective decay.
    let params = ParamSet::from_varmap(&varmap, &Selection::default())?;
    let mut masks = Masks::dense(&params)?;
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: false,
    };
    let mut opt = MaskedSgd::new(sgd, Some(SelectiveDecay::default().with_lambda(1e-3)))?;
    let accuracy = |logits: Tensor| -> candle_core::Result<f32> {
        let hits = logits.argmax(D::Minus1)?.eq(&y)?.to_dtype(DType::F32)?;
        hits.mean_all()?.to_scalar::<f32>()
    };
    for epoch in 0..300 {
        if epoch == 200 {
            // Remove the 80% smallest weights for good; training continues without them.
            masks.prune_to_sparsity(&params, 0.8, false)?;
        }
        let loss = candle_nn::loss::cross_entropy(&model(&x)?, &y)?;
        opt.step(&params, &masks, &loss.backward()?)?;
    }
    println!(
        "training accuracy {:.3} with {:.1}% of the weights left",
        accuracy(model(&x)?)?,
        100.0 * masks.remaining_fraction()?
    );
    Ok(())
}
