//! The CIFAR networks: published parameter counts, shapes, train/eval behaviour of batch norm.

use candle_core::{Device, ModuleT, Tensor};
use candle_nn::VarMap;
use relprune_models::{CifarResNet, Shortcut, Vgg16};

/// Trainable parameters (batch-norm running statistics excluded).
fn trainable(vm: &VarMap) -> usize {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.contains("running_"))
        .map(|(_, v)| v.elem_count())
        .sum()
}

fn images(n: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 3072)
        .map(|i| ((i * 37) % 101) as f32 / 101.0)
        .collect();
    Tensor::from_vec(v, (n, 3072), &Device::Cpu).unwrap()
}

#[test]
fn resnet20_and_32_with_option_a_have_the_published_parameter_counts() {
    // He et al.'s CIFAR ResNets as in the common PyTorch implementation: 0.27M and 0.46M.
    for (depth, params) in [(20, 269_722), (32, 464_154)] {
        let vm = VarMap::new();
        let net = CifarResNet::new(&vm, depth, Shortcut::A, 10, 0, &Device::Cpu).unwrap();
        assert_eq!(trainable(&vm), params, "ResNet-{depth}");
        let y = net.forward_t(&images(2), false).unwrap();
        assert_eq!(y.dims(), &[2, 10]);
    }
}

#[test]
fn option_b_adds_projection_shortcuts_and_bad_depths_are_refused() {
    let vm = VarMap::new();
    let net = CifarResNet::new(&vm, 20, Shortcut::B, 10, 0, &Device::Cpu).unwrap();
    // Two projections: 16→32 and 32→64 (1×1 conv + batch norm).
    let extra = 16 * 32 + 32 * 64 + 2 * (32 + 64);
    assert_eq!(trainable(&vm), 269_722 + extra);
    assert!(vm
        .data()
        .lock()
        .unwrap()
        .contains_key("layer2.0.shortcut.0.weight"));
    assert_eq!(net.forward_t(&images(1), true).unwrap().dims(), &[1, 10]);
    assert!(CifarResNet::new(&VarMap::new(), 21, Shortcut::A, 10, 0, &Device::Cpu).is_err());
}

#[test]
fn vgg16_has_13_conv_layers_and_its_published_size() {
    let vm = VarMap::new();
    let net = Vgg16::new(&vm, 10, 0, &Device::Cpu).unwrap();
    let data = vm.data().lock().unwrap();
    let convs = data.keys().filter(|k| k.ends_with(".conv.weight")).count();
    assert_eq!(convs, 13);
    drop(data);
    // 14.71M conv weights + 8,448 batch-norm parameters + 5,130 for the classifier.
    assert_eq!(trainable(&vm), 14_710_464 + 8_448 + 5_130);
    assert_eq!(net.forward_t(&images(2), false).unwrap().dims(), &[2, 10]);
}

#[test]
fn batch_norm_statistics_move_in_training_mode_only() {
    let vm = VarMap::new();
    let net = CifarResNet::new(&vm, 20, Shortcut::A, 10, 1, &Device::Cpu).unwrap();
    let stat = || {
        vm.data().lock().unwrap()["bn1.running_mean"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()
    };
    let before = stat();
    net.forward_t(&images(4), false).unwrap();
    assert_eq!(
        stat(),
        before,
        "evaluation must not touch the running statistics"
    );
    net.forward_t(&images(4), true).unwrap();
    assert_ne!(
        stat(),
        before,
        "training updates the registered running statistics"
    );
    // Training gradients reach the first convolution through every block.
    let y = net.forward_t(&images(2), true).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let w = vm.data().lock().unwrap()["conv1.weight"]
        .as_tensor()
        .clone();
    assert!(g.get(&w).is_some());
}
