//! The im2col convolution gives candle's own results and gradients, on odd shapes too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * scale,
            "{what}[{i}]: {x} vs candle's {y}"
        );
    }
}

/// The gradients of the same scalar loss through each of two results: sum(y · r) for one
/// random r.
fn gradients(ours: Tensor, theirs: Tensor) -> (GradStore, GradStore) {
    let r = Tensor::rand(-1f32, 1., ours.dims(), ours.device()).unwrap();
    let loss = |y: Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    (loss(ours), loss(theirs))
}

/// How many values of `t` satisfy `keep`.
fn count(t: &Tensor, keep: impl Fn(f32) -> bool) -> usize {
    let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    values.into_iter().filter(|v| keep(*v)).count()
}

/// A plain convolution from slices and matrix multiplies, whose gradients come from ops with
/// simple, reliable backward passes (candle's own conv2d backward fails on some strided shapes).
fn reference(x: &Tensor, k: &Tensor, padding: usize, stride: usize) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    let (oc, _, kh, kw) = k.dims4().unwrap();
    let (oh, ow) = (
        (h + 2 * padding - kh) / stride + 1,
        (w + 2 * padding - kw) / stride + 1,
    );
    let xp = x
        .pad_with_zeros(2, padding, padding)
        .unwrap()
        .pad_with_zeros(3, padding, padding)
        .unwrap();
    let dev = x.device();
    let rows = |count: usize| {
        Tensor::new(
            (0..count).map(|i| (i * stride) as u32).collect::<Vec<_>>(),
            dev,
        )
        .unwrap()
    };
    let mut y: Option<Tensor> = None;
    for ky in 0..kh {
        for kx in 0..kw {
            let slice = xp
                .narrow(2, ky, (oh - 1) * stride + 1)
                .unwrap()
                .narrow(3, kx, (ow - 1) * stride + 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .index_select(&rows(oh), 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .index_select(&rows(ow), 3)
                .unwrap();
            let m = slice
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((n * oh * ow, c))
                .unwrap();
            let kk = k.narrow(2, ky, 1).unwrap().narrow(3, kx, 1).unwrap();
            let kk = kk.reshape((oc, c)).unwrap();
            let part = m.matmul(&kk.t().unwrap()).unwrap();
            y = Some(match y {
                Some(acc) => (acc + part).unwrap(),
                None => part,
            });
        }
    }
    y.unwrap()
        .reshape((n, oh, ow, oc))
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
}

/// (batch, channels in, height, width, channels out, kernel h, kernel w, padding, stride, bias)
type Case = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
);

fn check(case: Case) {
    let (n, c, h, w, oc, kh, kw, padding, stride, with_bias) = case;
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::rand(-1f32, 1., (n, c, h, w), &dev).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::rand(-1f32, 1., (oc, c, kh, kw), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::rand(-1f32, 1., oc, &dev).unwrap()).unwrap();
    let bias = with_bias.then_some(b.as_tensor());

    let ours = consilium_core::conv::conv2d(&x, &k, bias, padding, stride).unwrap();
    let with = |y: Tensor| match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, oc, 1, 1)).unwrap()).unwrap(),
        None => y,
    };
    let candle = with(x.conv2d(&k, padding, stride, 1, 1).unwrap());
    assert_close(&ours, &candle, &format!("{case:?} forward"));
    let theirs = with(reference(&x, &k, padding, stride));
    assert_close(&theirs, &candle, &format!("{case:?} reference forward"));

    // Gradients of the same scalar loss through each: sum(y · r) for a fixed random r.
    let (g1, g2) = gradients(ours, theirs);
    for (var, name) in [(&x, "input"), (&k, "weight")] {
        assert_close(
            g1.get(var).expect("gradient"),
            g2.get(var).expect("gradient"),
            &format!("{case:?} {name} gradient"),
        );
    }
    if with_bias {
        assert_close(
            g1.get(&b).expect("gradient"),
            g2.get(&b).expect("gradient"),
            &format!("{case:?} bias gradient"),
        );
    }
}

#[test]
fn same_results_as_candle_and_gradients_as_a_plain_convolution() {
    for case in [
        // The small CNN's layers.
        (4, 1, 28, 28, 32, 3, 3, 1, 1, true),
        (4, 32, 14, 14, 64, 3, 3, 1, 1, true),
        // Batch 1, non-square input, no padding.
        (1, 3, 5, 7, 4, 3, 3, 0, 1, true),
        // Stride 2 with padding (the ResNet's downsampling), no bias.
        (2, 8, 9, 8, 16, 3, 3, 1, 2, false),
        // 1×1 shortcut with stride 2.
        (3, 4, 7, 6, 8, 1, 1, 0, 2, false),
        // A non-square kernel, stride 3, wide padding.
        (2, 2, 11, 10, 3, 3, 2, 2, 3, true),
        // Narrowing layers with stride 1 (the U-Net's decoder, its 1×1 head), whose input
        // gradient is computed as the adjoint convolution rather than folded back.
        (2, 8, 12, 9, 4, 3, 3, 1, 1, true),
        (2, 6, 5, 4, 2, 1, 1, 0, 1, true),
    ] {
        check(case);
    }
}

#[test]
fn the_same_with_the_batch_split_over_threads_or_each_multiply_spread() {
    // Three threads: batch 4 and 5 split into tasks of two images (the last one short);
    // batch 2 and 1, smaller than the pool, spread each multiply over it instead.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    pool.install(|| {
        for case in [
            (4, 3, 9, 9, 8, 3, 3, 1, 1, true),
            (5, 2, 8, 11, 4, 3, 3, 1, 2, false),
            (2, 4, 10, 10, 16, 3, 3, 1, 1, true),
            (1, 5, 6, 6, 3, 3, 3, 0, 1, true),
        ] {
            check(case);
        }
    });
}

/// An image whose patch matrix would outgrow the cache is unfolded and multiplied a band of
/// output rows at a time (`BAND` in `consilium_core::conv`): the bands' seams, a short last
/// band and a strided band give the same results and gradients.
#[test]
fn the_same_on_images_unfolded_a_band_of_rows_at_a_time() {
    for case in [
        // The U-Net's first level: bands of 14 output rows, the last one of 8.
        (2, 16, 64, 64, 16, 3, 3, 1, 1, true),
        // Stride 2 over a non-square image: bands of 18 and 14 output rows.
        (1, 32, 64, 50, 4, 3, 3, 1, 2, false),
    ] {
        check(case);
    }
}

#[test]
fn shapes_that_do_not_fit_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 2, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let k = Tensor::zeros((4, 3, 3, 3), candle_core::DType::F32, &dev).unwrap();
    let e = consilium_core::conv::conv2d(&x, &k, None, 0, 1).unwrap_err();
    assert!(
        e.to_string()
            .contains("the input has 2 channels, the weights expect 3"),
        "{e}"
    );
    let k = Tensor::zeros((4, 2, 5, 5), candle_core::DType::F32, &dev).unwrap();
    let e = consilium_core::conv::conv2d(&x, &k, None, 0, 1).unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
}

/// Max-pooling as a reshape and a max over each window's four values: the gradient goes to
/// the window's maximum. (candle's own `max_pool2d` backward scales it by a quarter.)
fn reference_pool(x: &Tensor) -> Tensor {
    let (n, c, h, w) = x.dims4().unwrap();
    let (oh, ow) = (h / 2, w / 2);
    x.narrow(2, 0, oh * 2)
        .unwrap()
        .narrow(3, 0, ow * 2)
        .unwrap()
        .reshape((n, c, oh, 2, ow, 2))
        .unwrap()
        .permute((0, 1, 2, 4, 3, 5))
        .unwrap()
        .reshape((n, c, oh, ow, 4))
        .unwrap()
        .max(4)
        .unwrap()
}

#[test]
fn pooling_with_relu_is_relu_after_pooling_both_ways() {
    let dev = Device::Cpu;
    for (n, c, h, w) in [(2, 3, 8, 8), (1, 2, 7, 5), (4, 16, 6, 10)] {
        // The first channel is all negative: the ReLU cuts its every window.
        let negative = Tensor::rand(-2f32, -1., (n, 1, h, w), &dev).unwrap();
        let mixed = Tensor::rand(-1f32, 1., (n, c - 1, h, w), &dev).unwrap();
        let x = Var::from_tensor(&Tensor::cat(&[&negative, &mixed], 1).unwrap()).unwrap();
        let ours = consilium_core::conv::max_pool2x2_relu(&x).unwrap();
        let theirs = reference_pool(&x).relu().unwrap();
        assert_close(&ours, &theirs, "max-pool + ReLU forward");
        let cut = count(&ours, |v| v == 0.0);
        assert!(
            cut >= n * (h / 2) * (w / 2),
            "the negative channel's windows are cut"
        );
        let (g1, g2) = gradients(ours, theirs);
        let g1 = g1.get(&x).expect("gradient");
        assert_close(
            g1,
            g2.get(&x).expect("gradient"),
            "max-pool + ReLU gradient",
        );
        // One input per window whose maximum is positive gets a gradient; none elsewhere.
        let nonzero = count(g1, |v| v != 0.0);
        assert_eq!(nonzero, n * c * (h / 2) * (w / 2) - cut);
    }
}

#[test]
fn max_pooling_matches_candle_and_sends_the_gradient_to_the_maximum() {
    let dev = Device::Cpu;
    for (n, c, h, w) in [(2, 3, 8, 8), (1, 2, 7, 5), (3, 1, 2, 2)] {
        let x = Var::from_tensor(&Tensor::rand(-1f32, 1., (n, c, h, w), &dev).unwrap()).unwrap();
        let ours = consilium_core::conv::max_pool2x2(&x).unwrap();
        assert_close(&ours, &x.max_pool2d(2).unwrap(), "max-pool forward");
        let theirs = reference_pool(&x);
        assert_close(&ours, &theirs, "max-pool reference forward");
        let (g1, g2) = gradients(ours, theirs);
        let g1 = g1.get(&x).expect("gradient");
        assert_close(g1, g2.get(&x).expect("gradient"), "max-pool gradient");
        // Exactly one input per window receives each output's gradient.
        let nonzero = count(g1, |v| v != 0.0);
        assert_eq!(nonzero, n * c * (h / 2) * (w / 2));
    }
}

#[test]
fn batch_norm_gives_candle_nns_values_gradients_and_statistics() {
    use candle_nn::{BatchNormConfig, ModuleT, VarBuilder, VarMap};
    let dev = Device::Cpu;
    for (n, c, h, w, relu) in [(4, 3, 5, 6, false), (2, 8, 4, 4, true), (1, 2, 3, 7, true)] {
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2., (n, c, h, w), &dev).unwrap()).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &dev);
        let bn = candle_nn::batch_norm(c, BatchNormConfig::default(), vb.pp("bn")).unwrap();
        // Not the initial 1 and 0, so that scaling and shifting are checked too.
        let (weight, bias) = bn.weight_and_bias().unwrap();
        let weight = Var::from_tensor(weight).unwrap();
        let bias = Var::from_tensor(bias).unwrap();
        weight
            .set(&Tensor::rand(0.5f32, 1.5, c, &dev).unwrap())
            .unwrap();
        bias.set(&Tensor::rand(-1f32, 1., c, &dev).unwrap())
            .unwrap();

        let (ours, stats) =
            consilium_core::norm::batch_norm_train(&x, &weight, &bias, 1e-5, relu).unwrap();
        let theirs = bn.forward_t(&x, true).unwrap();
        let theirs = if relu { theirs.relu().unwrap() } else { theirs };
        assert_close(&ours, &theirs, "batch-norm forward");

        // candle-nn updated its running averages from 0 and 1 with momentum 0.1.
        let m = (n * h * w) as f32;
        let mean = Tensor::new(stats.mean.as_slice(), &dev).unwrap();
        let var = Tensor::new(stats.var.as_slice(), &dev).unwrap();
        assert_close(&(mean * 0.1).unwrap(), bn.running_mean(), "the batch mean");
        assert_close(
            &((var * (0.1 * m / (m - 1.)) as f64).unwrap() + 0.9).unwrap(),
            bn.running_var(),
            "the batch variance",
        );

        let (g1, g2) = gradients(ours, theirs);
        for (var, name) in [(&x, "input"), (&weight, "weight"), (&bias, "bias")] {
            assert_close(
                g1.get(var).expect("gradient"),
                g2.get(var).expect("gradient"),
                &format!("batch-norm {name} gradient ({n}, {c}, {h}, {w}, relu {relu})"),
            );
        }
    }
}
