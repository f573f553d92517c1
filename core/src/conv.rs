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

use crate::matmul::{View, matmul, matmul_strided};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::ops::Range;
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

    /// Unfolds output rows `band` of image `x` (C, H, W) into `cols` (rows × the band's
    /// positions): row (c, ky, kx) holds, for each output position, the pixel the kernel's
    /// (ky, kx) tap reads there (0 in padding).
    fn im2col(&self, x: &[f32], cols: &mut [f32], band: Range<usize>) {
        vectorised(
            #[inline(always)]
            || self.im2col_scalar(x, cols, band),
        )
    }

    #[inline(always)]
    fn im2col_scalar(&self, x: &[f32], cols: &mut [f32], band: Range<usize>) {
        let p = band.len() * self.ow;
        for (r, row) in cols
            .chunks_exact_mut(p.max(1))
            .take(self.patch())
            .enumerate()
        {
            let (c, ky, kx) = self.offsets(r);
            let span = self.span(kx);
            for (oy, line) in band.clone().zip(row.chunks_exact_mut(self.ow.max(1))) {
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

    /// The adjoint of `im2col`: adds each patch value of `cols` (patch × the band's positions)
    /// onto the pixel it came from in `dx` (C, H, W).
    fn col2im(&self, cols: &[f32], dx: &mut [f32], band: Range<usize>) {
        vectorised(
            #[inline(always)]
            || self.col2im_scalar(cols, dx, band),
        )
    }

    #[inline(always)]
    fn col2im_scalar(&self, cols: &[f32], dx: &mut [f32], band: Range<usize>) {
        let p = band.len() * self.ow;
        for (r, row) in cols.chunks_exact(p.max(1)).take(self.patch()).enumerate() {
            let (c, ky, kx) = self.offsets(r);
            let Some((ox, len, ix)) = self.span(kx) else {
                continue;
            };
            for (i, oy) in band.clone().enumerate() {
                let Some(iy) = self.input_row(oy, ky) else {
                    continue;
                };
                let src = &row[i * self.ow + ox..][..len];
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

    /// The image's output rows in bands whose patch matrix (rows × the band's positions) holds
    /// about `cached` values, so that it stays in a core's L2 cache between the unfolding and
    /// the multiply: a whole 64 × 64 image's did not, and went out to memory and back.
    fn bands(&self, cached: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let per = (cached / (self.rows() * self.ow).max(1)).clamp(1, self.oh.max(1));
        let oh = self.oh;
        (0..oh.div_ceil(per)).map(move |b| b * per..((b + 1) * per).min(oh))
    }
}

/// Values in a band's patch matrix (`Geometry::bands`): 512 KB, half of a recent core's L2
/// cache. Measured on the U-Net's 64 × 64 and 32 × 32 levels (one thread, `bench-train
/// --model unet`): 8 % more steps/s than whole images; 256 KB bands did about as well, 128 KB
/// ones worse.
const BAND: usize = 128 * 1024;

thread_local! {
    /// Each thread's patch matrices, kept between calls: they are several megabytes for a
    /// large image, and zero-filling fresh ones on every call cost more than refilling these.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Runs `f` on two scratch buffers of `a` and `b` values, whatever they held before: this
/// thread's, or fresh ones where a call further up this thread's stack holds those (rayon runs
/// other tasks while it waits).
fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (x, y) = &mut *bufs;
            if x.len() < a {
                x.resize(a, 0.0);
            }
            if y.len() < b {
                y.resize(b, 0.0);
            }
            f(&mut x[..a], &mut y[..b])
        }
        Err(_) => f(&mut vec![0f32; a], &mut vec![0f32; b]),
    })
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

/// Runs a backward pass's `task(first image, its share of the input gradient)` over a batch
/// of `n` images in rayon tasks of `per` images each. With `want_dx`, each task gets its
/// images' slice (`image` values each) of a zeroed input gradient, returned beside the tasks'
/// results (their partial weight gradients, in task order).
fn over_tasks<P: Send>(
    (n, per, image): (usize, usize, usize),
    want_dx: bool,
    task: impl Fn(usize, Option<&mut [f32]>) -> Result<P> + Sync,
) -> Result<(Option<Vec<f32>>, Vec<P>)> {
    if want_dx {
        let mut dx = vec![0f32; n * image];
        let partials = dx
            .par_chunks_mut((per * image).max(1))
            .enumerate()
            .map(|(t, d)| task(t * per, Some(d)))
            .collect::<Result<Vec<_>>>()?;
        Ok((Some(dx), partials))
    } else {
        let partials = (0..n.div_ceil(per.max(1)))
            .into_par_iter()
            .map(|t| task(t * per, None))
            .collect::<Result<Vec<_>>>()?;
        Ok((None, partials))
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
#[derive(Clone, Copy, Debug)]
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
                with_scratch(g.rows() * p, 0, |cols, _| {
                    for (i, yn) in ys.chunks_exact_mut(out.max(1)).enumerate() {
                        let n = t * per + i;
                        for band in g.bands(BAND) {
                            let bp = band.len() * g.ow;
                            let cols = &mut cols[..g.rows() * bp];
                            let at = band.start * g.ow;
                            g.im2col(&x[n * img..(n + 1) * img], cols, band);
                            let cols = View::rows(cols, g.rows(), bp);
                            matmul_strided(&mut yn[at..], p, w, cols, false, threads)?;
                        }
                    }
                    Ok(())
                })
            })?;
        Ok(y)
    }

    /// For stride 1, a square kernel wider than its padding and no more output channels than
    /// input ones, the convolution whose output is
    /// this one's input gradient, and its weight matrix: the output gradient convolved with the
    /// kernels flipped and transposed (`dx[c] = Σ_o dy[o] ⊛ rot180(W[o, c])`), padded by
    /// kernel − 1 − padding. One multiply per band with the kernel's taps as its inner
    /// dimension, where folding weightsᵀ · output-gradient back onto the image (col2im) made
    /// a product only OC deep and wrote, then re-read, a patch matrix of the input's size.
    fn adjoint(&self, wm: &[f32]) -> Option<(Conv, Vec<f32>)> {
        let (g, oc) = (self.g, self.oc);
        let k = g.kh;
        // Its patch matrix has a row per output channel and tap, the fold's one per input
        // channel and tap: where the layer widens, folding writes less (the small CNN's second
        // layer, 32 → 64 channels, trained 7 % slower through the adjoint).
        if g.stride != 1 || g.kw != k || g.padding >= k || oc > g.c {
            return None;
        }
        let a = Geometry {
            n: g.n,
            c: oc,
            h: g.oh,
            w: g.ow,
            kh: k,
            kw: k,
            stride: 1,
            padding: k - 1 - g.padding,
            oh: g.h,
            ow: g.w,
            ones: false,
        };
        // Stride 1: oh = h + 2·padding − k + 1, so the adjoint's output is the input's size.
        if a.h + 2 * a.padding + 1 != a.oh + k || a.w + 2 * a.padding + 1 != a.ow + k {
            return None;
        }
        let rows = g.rows();
        let mut weights = Vec::with_capacity(g.c * oc * k * k);
        for c in 0..g.c {
            for o in 0..oc {
                for ky in (0..k).rev() {
                    for kx in (0..k).rev() {
                        weights.push(wm[o * rows + (c * k + ky) * k + kx]);
                    }
                }
            }
        }
        Some((Conv { g: a, oc: g.c }, weights))
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
            let mut dwt = vec![0f32; k * oc];
            let dcols_len = if dxs.is_some() { g.patch() * p } else { 0 };
            with_scratch(k * p, dcols_len, |cols, dcols| {
                for n in first..(first + per).min(g.n) {
                    for band in g.bands(BAND) {
                        let bp = band.len() * g.ow;
                        let dyn_ = View {
                            data: &dy[n * out + band.start * g.ow..(n + 1) * out],
                            rows: oc,
                            cols: bp,
                            row_stride: p,
                            col_stride: 1,
                        };
                        let cols = &mut cols[..k * bp];
                        g.im2col(&x[n * img..(n + 1) * img], cols, band.clone());
                        // As dWᵀ = patches · dYᵀ: several times faster than dY · patchesᵀ where
                        // an image has many positions (gemm packs the patches' rows, not its
                        // columns).
                        matmul(&mut dwt, View::rows(cols, k, bp), dyn_.t(), true, threads)?;
                        if let Some(dxs) = dxs.as_deref_mut() {
                            let dcols = &mut dcols[..g.patch() * bp];
                            matmul(dcols, wt, dyn_, false, threads)?;
                            let at = (n - first) * img;
                            g.col2im(dcols, &mut dxs[at..at + img], band);
                        }
                    }
                }
                Result::Ok(())
            })?;
            Ok(dwt)
        };
        // With stride 1 the input gradient is itself a convolution (`Conv::adjoint`); other
        // strides fold each band's weightsᵀ · output-gradient back onto the image.
        let adjoint = if want_dx { self.adjoint(wm) } else { None };
        let (dx, partials) = over_tasks((g.n, per, img), want_dx && adjoint.is_none(), task)?;
        let dwt = partials
            .into_iter()
            .reduce(|mut sum, part| {
                sum.iter_mut().zip(&part).for_each(|(s, v)| *s += v);
                sum
            })
            .unwrap_or_else(|| vec![0f32; k * oc]);
        let dx = match adjoint {
            Some((conv, weights)) => Some(conv.forward(dy, &weights)?),
            None => dx,
        };
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

/// A convolution of a fixed shape on values, for a model differentiated by hand: the kernels
/// of `conv2d` without candle's autograd graph. Its weight matrix is (OC, C·KH·KW [+ 1]): each
/// output channel's kernel flattened, then its bias (`Convolution::matrix`).
#[derive(Clone, Copy, Debug)]
pub struct Convolution(Conv);

impl Convolution {
    /// A convolution of an (N, C, H, W) input by (OC, C, KH, KW) kernels.
    pub fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (oc, ic, kh, kw): (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
        bias: bool,
    ) -> Result<Self> {
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
            ones: bias,
        };
        Ok(Convolution(Conv { g, oc }))
    }

    /// The output's (N, OC, OH, OW).
    pub fn output(&self) -> (usize, usize, usize, usize) {
        let Conv { g, oc } = self.0;
        (g.n, oc, g.oh, g.ow)
    }

    /// The weight matrix of `weight` (OC × C·KH·KW values) and `bias` (OC, when the
    /// convolution has one).
    pub fn matrix(&self, weight: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>> {
        let Conv { g, oc } = self.0;
        if weight.len() != oc * g.patch() || bias.is_some() != g.ones {
            bail!("conv2d: the weights do not match the convolution's shape")
        }
        let mut wm = Vec::with_capacity(oc * g.rows());
        for (o, kernel) in weight.chunks_exact(g.patch().max(1)).enumerate() {
            wm.extend_from_slice(kernel);
            if let Some(b) = bias {
                wm.push(b.get(o).copied().unwrap_or_default());
            }
        }
        Ok(wm)
    }

    /// A weight matrix's gradient split into the kernels' and (when there is one) the bias's.
    pub fn split(&self, dwm: &[f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let Conv { g, .. } = self.0;
        let rows = dwm.chunks_exact(g.rows().max(1));
        let weight = rows
            .clone()
            .flat_map(|r| &r[..g.patch()])
            .copied()
            .collect();
        let bias = g.ones.then(|| rows.map(|r| r[g.patch()]).collect());
        (weight, bias)
    }

    /// The output (N, OC, OH, OW) of input `x` and weight matrix `wm`.
    pub fn forward(&self, x: &[f32], wm: &[f32]) -> Result<Vec<f32>> {
        self.check(x, wm)?;
        self.0.forward(x, wm)
    }

    /// The gradients of input `x` (when `want_dx`) and of the weight matrix `wm`, from the
    /// output's gradient `dy`.
    pub fn backward(
        &self,
        x: &[f32],
        wm: &[f32],
        dy: &[f32],
        want_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        self.check(x, wm)?;
        let (n, oc, oh, ow) = self.output();
        if dy.len() != n * oc * oh * ow {
            bail!("conv2d: the output gradient does not match the convolution's shape")
        }
        self.0.backward(x, wm, dy, want_dx)
    }

    fn check(&self, x: &[f32], wm: &[f32]) -> Result<()> {
        let Conv { g, oc } = self.0;
        if x.len() != g.n * g.image() || wm.len() != oc * g.rows() {
            bail!("conv2d: the input or the weights do not match the convolution's shape")
        }
        Ok(())
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
    let (oc, ic, kh, kw) = weight.dims4()?;
    let conv = Convolution::new(
        x.dims4()?,
        (oc, ic, kh, kw),
        padding,
        stride,
        bias.is_some(),
    )?;
    let g = conv.0.g;
    // The bias is the last column of the weight matrix, against the row of ones.
    let mut wm = weight.reshape((oc, g.patch()))?;
    if let Some(b) = bias {
        wm = Tensor::cat(&[&wm, &b.reshape((oc, 1))?], 1)?;
    }
    x.contiguous()?.apply_op2(&wm.contiguous()?, conv.0)
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

impl MaxPool2 {
    /// The pooled (N, C, H/2, W/2) values of `x`.
    fn forward_values(&self, x: &[f32]) -> Vec<f32> {
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
        out
    }

    /// The input's gradient from input `x`, output `y` and the output's gradient `g`.
    fn backward_values(&self, x: &[f32], y: &[f32], g: &[f32]) -> Vec<f32> {
        let (oh, ow) = self.out();
        let plane = self.h * self.w;
        let mut dx = vec![0f32; self.n * self.c * plane];
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
                        // Only the first of the window's values that is its maximum gets the
                        // gradient (none where the ReLU cut it to 0).
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
        );
        dx
    }
}

/// 2×2 max-pooling (optionally followed by a ReLU) of a fixed shape on values, for a model
/// differentiated by hand: the kernels of `max_pool2x2` without candle's autograd graph.
#[derive(Clone, Copy)]
pub struct Pool2x2(MaxPool2);

impl Pool2x2 {
    pub fn new((n, c, h, w): (usize, usize, usize, usize), relu: bool) -> Self {
        Pool2x2(MaxPool2 { n, c, h, w, relu })
    }

    /// The output's (N, C, H/2, W/2).
    pub fn output(&self) -> (usize, usize, usize, usize) {
        let (oh, ow) = self.0.out();
        (self.0.n, self.0.c, oh, ow)
    }

    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.check(x.len(), self.0.n * self.0.c * self.0.h * self.0.w)?;
        Ok(self.0.forward_values(x))
    }

    /// The input's gradient from input `x`, output `y` and the output's gradient `dy`.
    pub fn backward(&self, x: &[f32], y: &[f32], dy: &[f32]) -> Result<Vec<f32>> {
        let (n, c, oh, ow) = self.output();
        self.check(x.len(), n * c * self.0.h * self.0.w)?;
        self.check(y.len().min(dy.len()), n * c * oh * ow)?;
        Ok(self.0.backward_values(x, y, dy))
    }

    fn check(&self, len: usize, want: usize) -> Result<()> {
        if len != want {
            bail!("max_pool2x2: {len} values where the shape has {want}")
        }
        Ok(())
    }
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "consilium-max-pool-2x2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "max_pool2x2")?;
        let (oh, ow) = self.out();
        let out = self.forward_values(x);
        Ok((CpuStorage::F32(out), Shape::from((self.n, self.c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = with_values(arg, |x| {
            with_values(res, |y| {
                with_values(&grad, |g| self.backward_values(x, y, g))
            })
        })???;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The gradients of a transposed convolution's input (when asked for), weight and bias.
pub struct TransposedGradients {
    pub input: Option<Vec<f32>>,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// A 2×2 transposed convolution with stride 2 (PyTorch's `ConvTranspose2d(C, O, 2, stride=2)`):
/// `y[n, o, 2i + a, 2j + b] = bias[o] + Σ_c x[n, c, i, j] · weight[c, o, a, b]`, an (N, C, H, W)
/// input to (N, O, 2H, 2W). Each image is one matrix multiply of the weight (C, O·4), transposed,
/// by its pixels (C, H·W), whose rows are then interleaved into the output; the batch is split
/// over rayon's threads as the convolution's is.
#[derive(Clone, Copy, Debug)]
pub struct TransposedConv2x2 {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
}

impl TransposedConv2x2 {
    pub fn new(
        (n, c, h, w): (usize, usize, usize, usize),
        (wc, o): (usize, usize),
    ) -> Result<Self> {
        if wc != c {
            bail!("transposed_conv2x2: the input has {c} channels, the weights expect {wc}")
        }
        Ok(TransposedConv2x2 { n, c, h, w, o })
    }

    /// The output's (N, O, 2H, 2W).
    pub fn output(&self) -> (usize, usize, usize, usize) {
        (self.n, self.o, 2 * self.h, 2 * self.w)
    }

    fn pixels(&self) -> usize {
        self.h * self.w
    }

    fn check(&self, x: &[f32], weight: &[f32]) -> Result<()> {
        if x.len() != self.n * self.c * self.pixels() || weight.len() != self.c * self.o * 4 {
            bail!("transposed_conv2x2: the input or the weights do not match its shape")
        }
        Ok(())
    }

    /// Moves block row (o, a, b) of `z` (O·4 × H·W) to the pixels (2i + a, 2j + b) of `y`'s
    /// plane o (O, 2H, 2W), plus the bias.
    fn scatter(&self, z: &[f32], y: &mut [f32], bias: &[f32]) {
        let (h, w, p) = (self.h, self.w, self.pixels());
        for (r, row) in z.chunks_exact(p.max(1)).enumerate() {
            let (o, a, b) = (r / 4, (r / 2) % 2, r % 2);
            let plane = &mut y[o * 4 * p..(o + 1) * 4 * p];
            for (i, src) in row.chunks_exact(w.max(1)).enumerate().take(h) {
                let line = &mut plane[(2 * i + a) * 2 * w..][..2 * w];
                for (j, s) in src.iter().enumerate() {
                    line[2 * j + b] = s + bias[o];
                }
            }
        }
    }

    /// The adjoint of `scatter` without the bias: `z`'s block row (o, a, b) from the pixels
    /// (2i + a, 2j + b) of `y`'s plane o.
    fn gather(&self, y: &[f32], z: &mut [f32]) {
        let (h, w, p) = (self.h, self.w, self.pixels());
        for (r, row) in z.chunks_exact_mut(p.max(1)).enumerate() {
            let (o, a, b) = (r / 4, (r / 2) % 2, r % 2);
            let plane = &y[o * 4 * p..(o + 1) * 4 * p];
            for (i, dst) in row.chunks_exact_mut(w.max(1)).enumerate().take(h) {
                let line = &plane[(2 * i + a) * 2 * w..][..2 * w];
                for (j, d) in dst.iter_mut().enumerate() {
                    *d = line[2 * j + b];
                }
            }
        }
    }

    /// The output of input `x` with `weight` (C, O, 2, 2) and `bias` (O).
    pub fn forward(&self, x: &[f32], weight: &[f32], bias: &[f32]) -> Result<Vec<f32>> {
        self.check(x, weight)?;
        if bias.len() != self.o {
            bail!("transposed_conv2x2: the bias must have one value per output channel")
        }
        let (p, img, out) = (
            self.pixels(),
            self.c * self.pixels(),
            self.o * 4 * self.pixels(),
        );
        let wt = View::rows(weight, self.c, 4 * self.o).t();
        let mut y = vec![0f32; self.n * out];
        let (per, threads) = split(self.n);
        y.par_chunks_mut((per * out).max(1))
            .enumerate()
            .try_for_each(|(t, ys)| -> Result<()> {
                let mut z = vec![0f32; out];
                for (i, yn) in ys.chunks_exact_mut(out.max(1)).enumerate() {
                    let n = t * per + i;
                    let xn = View::rows(&x[n * img..(n + 1) * img], self.c, p);
                    matmul(&mut z, wt, xn, false, threads)?;
                    vectorised(
                        #[inline(always)]
                        || self.scatter(&z, yn, bias),
                    );
                }
                Ok(())
            })?;
        Ok(y)
    }

    /// The gradients of the input (when `want_dx`), the weight and the bias, from the output's
    /// gradient `dy`.
    pub fn backward(
        &self,
        x: &[f32],
        weight: &[f32],
        dy: &[f32],
        want_dx: bool,
    ) -> Result<TransposedGradients> {
        self.check(x, weight)?;
        let (p, img, out) = (
            self.pixels(),
            self.c * self.pixels(),
            self.o * 4 * self.pixels(),
        );
        if dy.len() != self.n * out {
            bail!("transposed_conv2x2: the output gradient does not match its shape")
        }
        let (c, o4) = (self.c, 4 * self.o);
        let wv = View::rows(weight, c, o4);
        let (per, threads) = split(self.n);
        // One task: images from `first` on, its partial weight and bias gradients.
        let task = |first: usize, mut dxs: Option<&mut [f32]>| -> Result<(Vec<f32>, Vec<f32>)> {
            let mut dz = vec![0f32; out];
            let mut dw = vec![0f32; c * o4];
            let mut db = vec![0f32; self.o];
            for n in first..(first + per).min(self.n) {
                let dyn_ = &dy[n * out..(n + 1) * out];
                vectorised(
                    #[inline(always)]
                    || {
                        self.gather(dyn_, &mut dz);
                        for (d, plane) in db.iter_mut().zip(dyn_.chunks_exact((4 * p).max(1))) {
                            *d += plane.iter().sum::<f32>();
                        }
                    },
                );
                let xn = View::rows(&x[n * img..(n + 1) * img], c, p);
                let dzv = View::rows(&dz, o4, p);
                matmul(&mut dw, xn, dzv.t(), true, threads)?;
                if let Some(dxs) = dxs.as_deref_mut() {
                    let at = (n - first) * img;
                    matmul(&mut dxs[at..at + img], wv, dzv, false, threads)?;
                }
            }
            Ok((dw, db))
        };
        let (dx, partials) = over_tasks((self.n, per, img), want_dx, task)?;
        let (dw, db) = partials
            .into_iter()
            .reduce(|(mut w, mut b), (pw, pb)| {
                w.iter_mut().zip(&pw).for_each(|(s, v)| *s += v);
                b.iter_mut().zip(&pb).for_each(|(s, v)| *s += v);
                (w, b)
            })
            .unwrap_or_else(|| (vec![0f32; c * o4], vec![0f32; self.o]));
        Ok(TransposedGradients {
            input: dx,
            weight: dw,
            bias: db,
        })
    }
}

impl candle_core::CustomOp3 for TransposedConv2x2 {
    fn name(&self) -> &'static str {
        "consilium-transposed-conv-2x2"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.forward(
            contiguous_f32(s1, l1, "transposed_conv2x2")?,
            contiguous_f32(s2, l2, "transposed_conv2x2")?,
            contiguous_f32(s3, l3, "transposed_conv2x2")?,
        )?;
        Ok((CpuStorage::F32(y), Shape::from(self.output())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let want_dx = x.track_op();
        let TransposedGradients {
            input: dx,
            weight: dw,
            bias: db,
        } = with_values(x, |x| {
            with_values(weight, |w| {
                with_values(&grad, |dy| self.backward(x, w, dy, want_dx))
            })
        })????;
        let dev = x.device();
        let dx = match dx {
            Some(dx) => Some(Tensor::from_vec(dx, x.shape(), dev)?),
            None => None,
        };
        Ok((
            dx,
            Some(Tensor::from_vec(dw, weight.shape(), dev)?),
            Some(Tensor::from_vec(db, self.o, dev)?),
        ))
    }
}

/// A 2×2 transposed convolution with stride 2 of `x` (N, C, H, W) by `weight` (C, O, 2, 2), as
/// PyTorch's `ConvTranspose2d`, plus `bias` (O): (N, O, 2H, 2W). On CPU one node of the
/// autograd graph (`TransposedConv2x2`); elsewhere candle's `conv_transpose2d`.
pub fn transposed_conv2x2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (c, o, kh, kw) = weight.dims4()?;
    if (kh, kw) != (2, 2) {
        bail!("transposed_conv2x2: the weight must be (C, O, 2, 2), not {kh}×{kw} kernels")
    }
    if !(cpu_kernels(x) && weight.dtype() == DType::F32) {
        return x
            .conv_transpose2d(weight, 0, 0, 2, 1)?
            .broadcast_add(&bias.reshape((1, o, 1, 1))?);
    }
    let op = TransposedConv2x2::new(x.dims4()?, (c, o))?;
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}
