//! 2-D convolution and 2×2 max-pooling for training on CPU.
//!
//! candle's CPU convolution computes its input gradient with a direct transposed convolution
//! and its weight gradient as a convolution over the batch, both far slower than a matrix
//! multiply. Here each image is unfolded into a small matrix of patches (im2col) that stays in
//! cache, and one matrix multiply by the weights writes the image's output in place. The
//! backward pass accumulates the weight gradient as output-gradient · patchesᵀ image by image,
//! and folds weightsᵀ · output-gradient back onto the image (col2im) for the input gradient.
//! The batch is split over rayon's threads, each with its own patch buffer and partial weight
//! gradient, so nothing synchronises inside a multiply; a batch smaller than the pool spreads
//! each multiply over the pool instead. Other devices and dtypes keep candle's kernels.

use crate::matmul::{View, matmul};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static CANDLE_KERNELS: AtomicBool = AtomicBool::new(false);

/// Uses candle's own convolution and pooling kernels on CPU too (the benchmark's baseline).
pub fn use_candle_kernels(yes: bool) {
    CANDLE_KERNELS.store(yes, Ordering::Relaxed);
}

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX-512, AVX2, …), so
/// that its loops vectorise beyond the build's baseline.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Whether Consilium's kernels compute on `x`: f32 on the CPU, unless the benchmark asked for
/// candle's.
pub fn cpu_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !CANDLE_KERNELS.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
    /// The patch matrix ends with a row of ones, against the bias column of the weights.
    ones: bool,
}

impl Geometry {
    /// Values in one patch: the rows of the patch matrix (one per channel and kernel offset).
    fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Rows of the patch matrix: the patch, and a row of ones for the bias.
    fn rows(&self) -> usize {
        self.patch() + usize::from(self.ones)
    }
    /// Columns of the patch matrix: the output positions of one image.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Patch row `r` as (channel, kernel row, kernel column).
    fn offsets(&self, r: usize) -> (usize, usize, usize) {
        (
            r / (self.kh * self.kw),
            (r / self.kw) % self.kh,
            r % self.kw,
        )
    }

    /// The image row that output row `oy` reads at kernel row `ky`, unless it is padding.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky)
            .checked_sub(self.padding)
            .filter(|&iy| iy < self.h)
    }

    /// For kernel column `kx`: the first output column that reads inside the image, how many
    /// do, and the image column the first of them reads.
    fn span(&self, kx: usize) -> Option<(usize, usize, usize)> {
        // ox · stride + kx − padding must lie in 0..w.
        let first = self.padding.saturating_sub(kx).div_ceil(self.stride);
        let last_in = (self.w - 1 + self.padding).checked_sub(kx)? / self.stride;
        let last = last_in.min(self.ow.checked_sub(1)?);
        (first <= last).then(|| {
            (
                first,
                last + 1 - first,
                first * self.stride + kx - self.padding,
            )
        })
    }

    /// Unfolds image `x` (C, H, W) into `cols` (rows × positions): row (c, ky, kx) holds, for
    /// each output position, the pixel the kernel's (ky, kx) tap reads there (0 in padding).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        vectorised(
            #[inline(always)]
            || self.im2col_scalar(x, cols),
        )
    }

    #[inline(always)]
    fn im2col_scalar(&self, x: &[f32], cols: &mut [f32]) {
        let p = self.positions();
        for (r, row) in cols
            .chunks_exact_mut(p.max(1))
            .take(self.patch())
            .enumerate()
        {
            let (c, ky, kx) = self.offsets(r);
            let span = self.span(kx);
            for (oy, line) in row.chunks_exact_mut(self.ow.max(1)).enumerate() {
                let (Some(iy), Some((ox, len, ix))) = (self.input_row(oy, ky), span) else {
                    line.fill(0.0);
                    continue;
                };
                line[..ox].fill(0.0);
                line[ox + len..].fill(0.0);
                let src = &x[(c * self.h + iy) * self.w + ix..];
                let dst = &mut line[ox..ox + len];
                if self.stride == 1 {
                    dst.copy_from_slice(&src[..len]);
                } else {
                    for (i, d) in dst.iter_mut().enumerate() {
                        *d = src[i * self.stride];
                    }
                }
            }
        }
        if self.ones {
            cols[self.patch() * p..self.rows() * p].fill(1.0);
        }
    }

    /// The adjoint of `im2col`: sums each patch value of `cols` (patch × positions) onto the
    /// pixel it came from in `dx` (C, H, W).
    fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        vectorised(
            #[inline(always)]
            || self.col2im_scalar(cols, dx),
        )
    }

    #[inline(always)]
    fn col2im_scalar(&self, cols: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        let p = self.positions();
        for (r, row) in cols.chunks_exact(p.max(1)).take(self.patch()).enumerate() {
            let (c, ky, kx) = self.offsets(r);
            let Some((ox, len, ix)) = self.span(kx) else {
                continue;
            };
            for oy in 0..self.oh {
                let Some(iy) = self.input_row(oy, ky) else {
                    continue;
                };
                let src = &row[oy * self.ow + ox..][..len];
                let dst = &mut dx[(c * self.h + iy) * self.w + ix..];
                if self.stride == 1 {
                    for (d, s) in dst[..len].iter_mut().zip(src) {
                        *d += s;
                    }
                } else {
                    for (i, s) in src.iter().enumerate() {
                        dst[i * self.stride] += s;
                    }
                }
            }
        }
    }
}

/// How to spread `n` images over rayon's pool: images per task, and threads per multiply.
fn split(n: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    if n >= threads {
        (n.div_ceil(threads), 1)
    } else {
        (1, threads)
    }
}

pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 tensors are supported")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// Runs `f` on a contiguous f32 CPU tensor's values.
pub(crate) fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("expected a CPU tensor")
    };
    Ok(f(contiguous_f32(cpu, layout, "a CPU kernel")?))
}

/// The whole convolution as one node of the autograd graph: (input, weight matrix) → output,
/// where the weight matrix is (OC, rows): the kernels flattened, then the bias column.
struct Conv {
    g: Geometry,
    oc: usize,
}

impl Conv {
    fn forward(&self, x: &[f32], wm: &[f32]) -> Result<Vec<f32>> {
        let (g, oc) = (self.g, self.oc);
        let (p, img, out) = (g.positions(), g.image(), self.oc * g.positions());
        let w = View::rows(wm, oc, g.rows());
        let mut y = vec![0f32; g.n * out];
        let (per, threads) = split(g.n);
        y.par_chunks_mut((per * out).max(1))
            .enumerate()
            .try_for_each(|(t, ys)| -> Result<()> {
                let mut cols = vec![0f32; g.rows() * p];
                for (i, yn) in ys.chunks_exact_mut(out.max(1)).enumerate() {
                    let n = t * per + i;
                    g.im2col(&x[n * img..(n + 1) * img], &mut cols);
                    matmul(yn, w, View::rows(&cols, g.rows(), p), false, threads)?;
                }
                Ok(())
            })?;
        Ok(y)
    }

    /// The input gradient (when asked for) and the weight matrix's gradient.
    fn backward(
        &self,
        x: &[f32],
        wm: &[f32],
        dy: &[f32],
        want_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let (g, oc) = (self.g, self.oc);
        let (p, img, out, k) = (g.positions(), g.image(), oc * g.positions(), g.rows());
        // Weightsᵀ without the bias column: (patch × OC).
        let wt = View {
            data: wm,
            rows: g.patch(),
            cols: oc,
            row_stride: 1,
            col_stride: k,
        };
        let (per, threads) = split(g.n);
        // One task: images from `first` on (as many as `dxs` holds, or `per`), its partial dW.
        let task = |first: usize, mut dxs: Option<&mut [f32]>| -> Result<Vec<f32>> {
            let mut cols = vec![0f32; k * p];
            let mut dcols = vec![0f32; if dxs.is_some() { g.patch() * p } else { 0 }];
            let mut dwt = vec![0f32; k * oc];
            for n in first..(first + per).min(g.n) {
                let dyn_ = View::rows(&dy[n * out..(n + 1) * out], oc, p);
                g.im2col(&x[n * img..(n + 1) * img], &mut cols);
                // As dWᵀ = patches · dYᵀ: several times faster than dY · patchesᵀ where an
                // image has many positions (gemm packs the patches' rows, not its columns).
                matmul(&mut dwt, View::rows(&cols, k, p), dyn_.t(), true, threads)?;
                if let Some(dxs) = dxs.as_deref_mut() {
                    matmul(&mut dcols, wt, dyn_, false, threads)?;
                    let at = (n - first) * img;
                    g.col2im(&dcols, &mut dxs[at..at + img]);
                }
            }
            Ok(dwt)
        };
        let (dx, partials) = if want_dx {
            let mut dx = vec![0f32; g.n * img];
            let partials = dx
                .par_chunks_mut((per * img).max(1))
                .enumerate()
                .map(|(t, d)| task(t * per, Some(d)))
                .collect::<Result<Vec<_>>>()?;
            (Some(dx), partials)
        } else {
            let partials = (0..g.n.div_ceil(per))
                .into_par_iter()
                .map(|t| task(t * per, None))
                .collect::<Result<Vec<_>>>()?;
            (None, partials)
        };
        let dwt = partials
            .into_iter()
            .reduce(|mut sum, part| {
                sum.iter_mut().zip(&part).for_each(|(s, v)| *s += v);
                sum
            })
            .unwrap_or_else(|| vec![0f32; k * oc]);
        let mut dw = vec![0f32; oc * k];
        for (r, row) in dwt.chunks_exact(oc.max(1)).enumerate() {
            for (o, v) in row.iter().enumerate() {
                dw[o * k + r] = *v;
            }
        }
        Ok((dx, dw))
    }
}

impl candle_core::CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "consilium-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let y = self.forward(
            contiguous_f32(s1, l1, "conv2d")?,
            contiguous_f32(s2, l2, "conv2d")?,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((g.n, self.oc, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wm: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let grad = grad.contiguous()?;
        // The first layer's input is data: no gradient to compute.
        let want_dx = x.track_op();
        let (dx, dw) = with_values(x, |x| {
            with_values(wm, |w| {
                with_values(&grad, |dy| self.backward(x, w, dy, want_dx))
            })
        })????;
        let dx = match dx {
            Some(dx) => Some(Tensor::from_vec(dx, (g.n, g.c, g.h, g.w), x.device())?),
            None => None,
        };
        Ok((
            dx,
            Some(Tensor::from_vec(dw, (self.oc, g.rows()), x.device())?),
        ))
    }
}

/// `x` (N, C, H, W) convolved with `weight` (OC, C, KH, KW), plus `bias` (OC), with zero
/// padding and a stride; the same result and gradients as candle's `conv2d`, faster to train
/// on CPU.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    if !(cpu_kernels(x) && weight.dtype() == DType::F32) {
        let y = x.conv2d(weight, padding, stride, 1, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        };
    }
    let (n, c, h, w) = x.dims4()?;
    let (oc, ic, kh, kw) = weight.dims4()?;
    if ic != c {
        bail!("conv2d: the input has {c} channels, the weights expect {ic}")
    }
    if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        bail!(
            "conv2d: a {kh}×{kw} kernel with stride {stride} and padding {padding} does not fit a {h}×{w} input"
        )
    }
    let g = Geometry {
        n,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        padding,
        oh: (h + 2 * padding - kh) / stride + 1,
        ow: (w + 2 * padding - kw) / stride + 1,
        ones: bias.is_some(),
    };
    // The bias is the last column of the weight matrix, against the row of ones.
    let mut wm = weight.reshape((oc, g.patch()))?;
    if let Some(b) = bias {
        wm = Tensor::cat(&[&wm, &b.reshape((oc, 1))?], 1)?;
    }
    x.contiguous()?.apply_op2(&wm.contiguous()?, Conv { g, oc })
}

/// 2×2 max-pooling with stride 2 (odd edges dropped, as candle's `max_pool2d(2)`); the
/// gradient goes to the first maximum of each window, as in PyTorch. One pass each way on CPU,
/// where candle's backward builds a mask from several whole-tensor operations.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    pool(x, false)
}

/// `max_pool2x2(x)` then ReLU, in one pass each way (the same values as ReLU then pooling,
/// both being monotone, on a quarter of the data); the gradient of a window whose maximum is
/// not positive is 0, as PyTorch's ReLU gives at 0.
pub fn max_pool2x2_relu(x: &Tensor) -> Result<Tensor> {
    pool(x, true)
}

fn pool(x: &Tensor, relu: bool) -> Result<Tensor> {
    if !cpu_kernels(x) {
        let y = x.max_pool2d(2)?;
        return if relu { y.relu() } else { Ok(y) };
    }
    let (n, c, h, w) = x.dims4()?;
    x.contiguous()?.apply_op1(MaxPool2 { n, c, h, w, relu })
}

#[derive(Clone, Copy)]
struct MaxPool2 {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    relu: bool,
}

impl MaxPool2 {
    fn out(&self) -> (usize, usize) {
        (self.h / 2, self.w / 2)
    }

    /// Output row `oy` of `plane`: its two input rows, each cut to whole windows.
    #[inline(always)]
    fn rows<'a>(&self, plane: &'a [f32], oy: usize) -> (&'a [f32], &'a [f32]) {
        let width = 2 * (self.w / 2);
        (
            &plane[2 * oy * self.w..][..width],
            &plane[(2 * oy + 1) * self.w..][..width],
        )
    }

    /// Runs `f(input plane, output plane)` over the planes of (N, C), in parallel.
    fn planes<T: Send>(&self, out: &mut [T], per_plane: usize, f: impl Fn(usize, &mut [T]) + Sync) {
        out.par_chunks_mut(per_plane.max(1))
            .with_min_len(16)
            .enumerate()
            .for_each(|(i, o)| {
                vectorised(
                    #[inline(always)]
                    || f(i, o),
                )
            });
    }
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "consilium-max-pool-2x2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "max_pool2x2")?;
        let (oh, ow) = self.out();
        let plane = self.h * self.w;
        let floor = if self.relu { 0.0 } else { f32::NEG_INFINITY };
        let mut out = vec![0f32; self.n * self.c * oh * ow];
        self.planes(
            &mut out,
            oh * ow,
            #[inline(always)]
            |i, o| {
                let input = &x[i * plane..(i + 1) * plane];
                for (oy, line) in o.chunks_exact_mut(ow.max(1)).enumerate() {
                    let (r0, r1) = self.rows(input, oy);
                    for (i, d) in line.iter_mut().enumerate() {
                        let top = r0[2 * i].max(r0[2 * i + 1]);
                        let bottom = r1[2 * i].max(r1[2 * i + 1]);
                        *d = top.max(bottom).max(floor);
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((self.n, self.c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (oh, ow) = self.out();
        let plane = self.h * self.w;
        let grad = grad.contiguous()?;
        let mut dx = vec![0f32; self.n * self.c * plane];
        with_values(arg, |x| {
            with_values(res, |y| {
                with_values(&grad, |g| {
                    self.planes(
                        &mut dx,
                        plane,
                        #[inline(always)]
                        |i, d| {
                            let input = &x[i * plane..(i + 1) * plane];
                            let (y, g) = (&y[i * oh * ow..], &g[i * oh * ow..]);
                            for oy in 0..oh {
                                let (r0, r1) = self.rows(input, oy);
                                let (d0, d1) = d.split_at_mut((2 * oy + 1) * self.w);
                                let d0 = &mut d0[2 * oy * self.w..][..2 * ow];
                                let d1 = &mut d1[..2 * ow];
                                let (y, g) = (&y[oy * ow..][..ow], &g[oy * ow..][..ow]);
                                for i in 0..ow {
                                    let (m, dm) = (y[i], g[i]);
                                    let (a0, a1, b0) = (r0[2 * i], r0[2 * i + 1], r1[2 * i]);
                                    // Only the first of the window's values that is its maximum
                                    // gets the gradient (none where the ReLU cut it to 0).
                                    let dm = if self.relu && m <= 0.0 { 0.0 } else { dm };
                                    let e0 = a0 == m;
                                    let e1 = !e0 && a1 == m;
                                    let e2 = !(e0 || e1) && b0 == m;
                                    let e3 = !(e0 || e1 || e2);
                                    d0[2 * i] = if e0 { dm } else { 0.0 };
                                    d0[2 * i + 1] = if e1 { dm } else { 0.0 };
                                    d1[2 * i] = if e2 { dm } else { 0.0 };
                                    d1[2 * i + 1] = if e3 { dm } else { 0.0 };
                                }
                            }
                        },
                    )
                })
            })
        })???;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}
