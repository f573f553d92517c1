//! A bounds-checked matrix multiply on slices, by the `gemm` crate candle itself uses (with its
//! AVX-512 kernels where the CPU has them). The convolution kernels multiply small per-image
//! matrices straight into their outputs, without building a tensor for each.

use candle_core::{Result, bail};

/// A matrix over a slice: element (i, j) is `data[i · row_stride + j · col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A contiguous row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside the slice.
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.row_stride)
            .zip((self.cols - 1).checked_mul(self.col_stride))
            .and_then(|(a, b)| a.checked_add(b));
        last.is_some_and(|last| last < self.data.len())
    }
}

/// `dst` (a.rows × b.cols, row-major) = a · b, or `dst += a · b` when `accumulate`. `threads`
/// above 1 splits the product over rayon's pool.
pub(crate) fn matmul(
    dst: &mut [f32],
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    matmul_strided(dst, b.cols, a, b, accumulate, threads)
}

/// `matmul` into a destination whose rows lie `dst_row_stride` apart (at least b.cols): the
/// columns of a wider matrix.
pub(crate) fn matmul_strided(
    dst: &mut [f32],
    dst_row_stride: usize,
    a: View<'_>,
    b: View<'_>,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        bail!(
            "matmul: a {m}×{k} matrix cannot multiply a {}×{n} one",
            b.rows
        )
    }
    let fits = dst_row_stride >= n
        && (m.saturating_sub(1))
            .checked_mul(dst_row_stride)
            .and_then(|last| last.checked_add(n))
            .is_some_and(|end| end <= dst.len());
    if !(a.fits() && b.fits()) || !(fits || m == 0 || n == 0) {
        bail!("matmul: a {m}×{k} by {k}×{n} product's operands or destination are out of bounds")
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_row_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let stride = |s: usize| s as isize;
    // SAFETY: every element gemm reads lies in `a.data` or `b.data` (checked by `fits`), every
    // element it writes lies in `dst` (m rows of n, `dst_row_stride` apart, checked above), and
    // `dst` is borrowed mutably, so it overlaps neither operand.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            stride(dst_row_stride),
            accumulate,
            a.data.as_ptr(),
            stride(a.col_stride),
            stride(a.row_stride),
            b.data.as_ptr(),
            stride(b.col_stride),
            stride(b.row_stride),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_transposes_and_accumulation() {
        // a = [[1, 2, 3], [4, 5, 6]], b = aᵀ.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut c = [0.0; 4];
        matmul(
            &mut c,
            View::rows(&a, 2, 3),
            View::rows(&a, 2, 3).t(),
            false,
            1,
        )
        .unwrap();
        assert_eq!(c, [14.0, 32.0, 32.0, 77.0]);
        matmul(
            &mut c,
            View::rows(&a, 2, 3),
            View::rows(&a, 2, 3).t(),
            true,
            2,
        )
        .unwrap();
        assert_eq!(c, [28.0, 64.0, 64.0, 154.0]);
        let mut d = [0.0; 9];
        matmul(
            &mut d,
            View::rows(&a, 2, 3).t(),
            View::rows(&a, 2, 3),
            false,
            1,
        )
        .unwrap();
        assert_eq!(d, [17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0]);
    }

    #[test]
    fn products_into_the_columns_of_a_wider_matrix() {
        // a = [[1, 2], [3, 4]] times the identity, into columns 1..3 of a 2 × 4 matrix.
        let (a, id) = ([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 1.0]);
        let mut dst = [9.0; 8];
        let (a, id) = (View::rows(&a, 2, 2), View::rows(&id, 2, 2));
        matmul_strided(&mut dst[1..], 4, a, id, false, 1).unwrap();
        assert_eq!(dst, [9.0, 1.0, 2.0, 9.0, 9.0, 3.0, 4.0, 9.0]);
        // A row stride shorter than a row, or rows past the end, are refused.
        assert!(matmul_strided(&mut dst, 1, a, id, false, 1).is_err());
        assert!(matmul_strided(&mut dst[3..], 4, a, id, false, 1).is_err());
    }

    #[test]
    fn out_of_bounds_views_are_errors() {
        let a = [1.0; 5];
        let mut c = [0.0; 4];
        let e = matmul(&mut c, View::rows(&a, 2, 3), View::rows(&a, 3, 2), false, 1);
        assert!(e.is_err());
        let e = matmul(&mut c, View::rows(&a, 2, 2), View::rows(&a, 3, 1), false, 1);
        assert!(e.unwrap_err().to_string().contains("cannot multiply"));
    }
}
