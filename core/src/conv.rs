//! 2-D convolution for training on CPU as im2col and one matrix multiply.
//!
//! candle's CPU convolution computes its input gradient with a direct transposed convolution
//! and its weight gradient as a convolution over the batch, both far slower than a matrix
//! multiply. Here the forward pass unfolds the input into a matrix of patches (im2col) and
//! multiplies it by the weights with candle's multithreaded GEMM; the backward pass is then the
//! matrix multiply's own two products (patchesᵀ · grad for the weights, grad · weights for the
//! patches) and a fold of the patch gradient back onto the image (col2im). Other devices and
//! dtypes keep candle's kernels.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static CANDLE_KERNELS: AtomicBool = AtomicBool::new(false);

/// Uses candle's own convolution kernels on CPU too (the benchmark's baseline).
pub fn use_candle_kernels(yes: bool) {
    CANDLE_KERNELS.store(yes, Ordering::Relaxed);
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
    /// Each row of the patch matrix ends with a 1, for the bias.
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
    fn positions(&self) -> usize {
        self.oh * self.ow
    }
    /// Columns of the patch matrix: every output position of every image.
    fn columns(&self) -> usize {
        self.n * self.positions()
    }
    fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// For kernel offset `kx`: the output columns `ox` that read inside the image, and the
    /// image column the first of them reads.
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

    /// For patch row `r` = (c, ky, kx) and image `n`: calls `f(column, pixel, len)` for each
    /// output line, where `len` columns from `column` read pixels `pixel, pixel + stride, …`.
    fn lines(&self, r: usize, n: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (c, ky, kx) = (
            r / (self.kh * self.kw),
            (r / self.kw) % self.kh,
            r % self.kw,
        );
        let Some((ox, len, ix)) = self.span(kx) else {
            return;
        };
        for oy in 0..self.oh {
            let Some(iy) = (oy * self.stride + ky).checked_sub(self.padding) else {
                continue;
            };
            if iy >= self.h {
                continue;
            }
            let column = n * self.positions() + oy * self.ow + ox;
            let pixel = n * self.image() + (c * self.h + iy) * self.w + ix;
            f(column, pixel, len);
        }
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("{op}: only f32 tensors are supported")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// (N, C, H, W) → (C·KH·KW [+ 1], N·OH·OW): one row per channel and kernel offset, one
/// column per output position; each line of a row is a (strided) run of one image line.
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "consilium-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(storage, layout, "im2col")?;
        let cols = g.columns();
        let mut out = vec![0f32; g.rows() * cols];
        out.par_chunks_mut(cols.max(1))
            .enumerate()
            .for_each(|(r, row)| {
                if r == g.patch() {
                    row.fill(1.0);
                    return;
                }
                for n in 0..g.n {
                    g.lines(r, n, |column, pixel, len| {
                        let dst = &mut row[column..column + len];
                        if g.stride == 1 {
                            dst.copy_from_slice(&x[pixel..pixel + len]);
                        } else {
                            for (i, d) in dst.iter_mut().enumerate() {
                                *d = x[pixel + i * g.stride];
                            }
                        }
                    });
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((g.rows(), cols))))
    }
}

/// The adjoint of `Im2Col`: sums each patch value back onto its pixel, image by image.
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "consilium-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous_f32(storage, layout, "col2im")?;
        let width = g.columns();
        let mut out = vec![0f32; g.n * g.image()];
        out.par_chunks_mut(g.image().max(1))
            .enumerate()
            .for_each(|(n, img)| {
                let base = n * g.image();
                for r in 0..g.patch() {
                    let row = &cols[r * width..(r + 1) * width];
                    g.lines(r, n, |column, pixel, len| {
                        let src = &row[column..column + len];
                        let at = pixel - base;
                        if g.stride == 1 {
                            for (d, s) in img[at..at + len].iter_mut().zip(src) {
                                *d += s;
                            }
                        } else {
                            for (i, s) in src.iter().enumerate() {
                                img[at + i * g.stride] += s;
                            }
                        }
                    });
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// The whole convolution as one node of the autograd graph: (input, weight matrix) → output.
/// Its backward pass computes both gradients directly, instead of candle zero-filling and
/// accumulating a gradient for every intermediate tensor (patches, product, transpose).
struct Conv {
    g: Geometry,
    oc: usize,
    /// The forward pass's patch matrix, kept for the weight gradient.
    cols: std::sync::Mutex<Option<Tensor>>,
}

/// (A, B, P) → (B, A, P), in parallel runs of P contiguous values: between the GEMM's
/// channel-major layout and the images'.
fn swap_outer(src: &[f32], a: usize, b: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0f32; a * b * p];
    out.par_chunks_mut((a * p).max(1))
        .enumerate()
        .for_each(|(j, block)| {
            for i in 0..a {
                block[i * p..(i + 1) * p].copy_from_slice(&src[(i * b + j) * p..][..p]);
            }
        });
    out
}

/// Runs `f` on a contiguous f32 CPU tensor's values.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        bail!("conv2d: expected a CPU tensor")
    };
    Ok(f(contiguous_f32(cpu, layout, "conv2d")?))
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
        let (CpuStorage::F32(cols), _) = Im2Col(g).cpu_fwd(s1, l1)? else {
            bail!("conv2d: im2col produced a non-f32 matrix")
        };
        let cols = Tensor::from_vec(cols, (g.rows(), g.columns()), &candle_core::Device::Cpu)?;
        if let Ok(mut kept) = self.cols.lock() {
            *kept = Some(cols.clone());
        }
        let wm = Tensor::from_slice(
            contiguous_f32(s2, l2, "conv2d")?,
            (self.oc, g.rows()),
            &candle_core::Device::Cpu,
        )?;
        let y = with_values(&wm.matmul(&cols)?, |v| {
            swap_outer(v, self.oc, g.n, g.positions())
        })?;
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
        let dy = with_values(&grad.contiguous()?, |v| {
            swap_outer(v, g.n, self.oc, g.positions())
        })?;
        let dy = Tensor::from_vec(dy, (self.oc, g.columns()), grad.device())?;
        let kept = self.cols.lock().ok().and_then(|mut c| c.take());
        let cols = match kept {
            Some(c) => c,
            None => x.detach().contiguous()?.apply_op1_no_bwd(&Im2Col(self.g))?,
        };
        let dw = dy.matmul(&cols.t()?)?;
        // The first layer's input is data: no gradient to compute.
        let dx = if x.track_op() {
            Some(
                wm.detach()
                    .t()?
                    .matmul(&dy)?
                    .apply_op1_no_bwd(&Col2Im(self.g))?,
            )
        } else {
            None
        };
        Ok((dx, Some(dw)))
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
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && !CANDLE_KERNELS.load(Ordering::Relaxed);
    let y = if fast {
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
        return x.contiguous()?.apply_op2(
            &wm,
            Conv {
                g,
                oc,
                cols: Default::default(),
            },
        );
    } else {
        x.conv2d(weight, padding, stride, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// 2×2 max-pooling with stride 2 (odd edges dropped, as candle's `max_pool2d(2)`); the
/// gradient goes to the first maximum of each window. One pass each way on CPU, where
/// candle's backward builds a mask from several whole-tensor operations.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32) || CANDLE_KERNELS.load(Ordering::Relaxed) {
        return x.max_pool2d(2);
    }
    let (n, c, h, w) = x.dims4()?;
    x.contiguous()?.apply_op1(MaxPool2 { n, c, h, w })
}

#[derive(Clone, Copy)]
struct MaxPool2 {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl MaxPool2 {
    fn out(&self) -> (usize, usize) {
        (self.h / 2, self.w / 2)
    }

    /// The index in `plane` of the first maximum of output cell (oy, ox).
    fn argmax(&self, plane: &[f32], oy: usize, ox: usize) -> usize {
        let at = |dy: usize, dx: usize| (2 * oy + dy) * self.w + 2 * ox + dx;
        let mut best = at(0, 0);
        for i in [at(0, 1), at(1, 0), at(1, 1)] {
            if plane[i] > plane[best] {
                best = i;
            }
        }
        best
    }
}

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "consilium-max-pool-2x2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "max_pool2x2")?;
        let (oh, ow) = self.out();
        let mut out = vec![0f32; self.n * self.c * oh * ow];
        out.par_chunks_mut((oh * ow).max(1))
            .zip(x.par_chunks((self.h * self.w).max(1)))
            .for_each(|(o, plane)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        o[oy * ow + ox] = plane[self.argmax(plane, oy, ox)];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((self.n, self.c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad, &MaxPool2Grad(*self))?,
        ))
    }
}

/// (input, output gradient) → input gradient.
struct MaxPool2Grad(MaxPool2);

impl candle_core::CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "consilium-max-pool-2x2-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = &self.0;
        let x = contiguous_f32(s1, l1, "max_pool2x2 backward")?;
        let g = contiguous_f32(s2, l2, "max_pool2x2 backward")?;
        let (oh, ow) = p.out();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut((p.h * p.w).max(1))
            .zip(x.par_chunks((p.h * p.w).max(1)))
            .zip(g.par_chunks((oh * ow).max(1)))
            .for_each(|((o, plane), g)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        o[p.argmax(plane, oy, ox)] = g[oy * ow + ox];
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
