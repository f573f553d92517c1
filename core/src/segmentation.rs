//! Segmentation scores: a predicted label map against the reference mask of the same image.
//!
//! Dice and IoU of each class are computed over a split's pixels together (the counts of every
//! image added up before dividing, so an image without the class adds to the denominator only
//! through false positives, and a split without the class has no score for it). HD95 — the
//! 95th percentile Hausdorff distance — is per image and class, as MONAI computes it: the
//! boundary pixels of each mask (a foreground pixel with a 4-neighbour outside it or at the
//! image's edge), each one's Euclidean distance to the nearest boundary pixel of the other, the
//! 95th percentile of each direction (linear interpolation), and the larger of the two. It is
//! undefined where either image lacks the class; the split's value is the mean over the images
//! where both have it. Distances are in pixels of the plan's image size.

use serde::{Deserialize, Serialize};

/// The pixels of one class over a split: predicted, in the reference mask, and in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overlap {
    pub predicted: u64,
    pub reference: u64,
    pub both: u64,
}

impl Overlap {
    /// 2 |P ∩ R| / (|P| + |R|); none when the class is in neither.
    pub fn dice(&self) -> Option<f64> {
        let total = self.predicted + self.reference;
        (total > 0).then(|| 2.0 * self.both as f64 / total as f64)
    }

    /// |P ∩ R| / |P ∪ R|; none when the class is in neither.
    pub fn iou(&self) -> Option<f64> {
        let union = self.predicted + self.reference - self.both;
        (union > 0).then(|| self.both as f64 / union as f64)
    }
}

/// Adds one image's pixels to each class's counts (`overlaps[c]` for label `c`; labels beyond
/// the slice are not counted).
pub fn count(predicted: &[u8], reference: &[u8], overlaps: &mut [Overlap]) {
    for (&p, &r) in predicted.iter().zip(reference) {
        if let Some(o) = overlaps.get_mut(usize::from(p)) {
            o.predicted += 1;
            if p == r {
                o.both += 1;
            }
        }
        if let Some(o) = overlaps.get_mut(usize::from(r)) {
            o.reference += 1;
        }
    }
}

/// A split's segmentation scores, as a site reports them with its evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct SegmentationScores {
    /// Dice of each foreground class (label 1, 2, …); null where neither the model nor the
    /// masks have the class.
    pub dice: Vec<Option<f64>>,
    /// Mean Dice over the foreground classes that have one.
    pub mean_dice: Option<f64>,
    /// Mean IoU over the foreground classes that have one.
    pub mean_iou: Option<f64>,
    /// Mean HD95 in pixels over the foreground classes and the images where both the model and
    /// the mask have the class.
    pub hd95: Option<f64>,
}

impl SegmentationScores {
    /// The sample-weighted mean of several splits' scores (the sites' evaluations of one
    /// model), each value over the splits that have it; none when none has scores.
    pub fn weighted<'a>(
        all: impl Iterator<Item = (&'a SegmentationScores, u64)>,
    ) -> Option<SegmentationScores> {
        let all: Vec<(&SegmentationScores, f64)> = all.map(|(s, n)| (s, n as f64)).collect();
        if all.is_empty() {
            return None;
        }
        let mean_of = |f: &dyn Fn(&SegmentationScores) -> Option<f64>| {
            let (weight, sum) = all
                .iter()
                .filter_map(|(s, n)| f(s).map(|v| (*n, v * n)))
                .fold((0.0, 0.0), |(w, t), (n, v)| (w + n, t + v));
            (weight > 0.0).then(|| sum / weight)
        };
        let classes = all.iter().map(|(s, _)| s.dice.len()).max().unwrap_or(0);
        Some(SegmentationScores {
            dice: (0..classes)
                .map(|c| mean_of(&|s| s.dice.get(c).copied().flatten()))
                .collect(),
            mean_dice: mean_of(&|s| s.mean_dice),
            mean_iou: mean_of(&|s| s.mean_iou),
            hd95: mean_of(&|s| s.hd95),
        })
    }
}

/// What a split's images add up to, class by class: counts for Dice and IoU, and the HD95s of
/// the images where both have the class.
#[derive(Clone, Debug, PartialEq)]
pub struct Tally {
    width: usize,
    overlaps: Vec<Overlap>,
    distances: Vec<f64>,
}

impl Tally {
    /// For label maps of `classes` labels (background 0 included), `width` pixels wide.
    pub fn new(classes: usize, width: usize) -> Self {
        Tally {
            width,
            overlaps: vec![Overlap::default(); classes],
            distances: Vec::new(),
        }
    }

    /// Adds one image: its predicted label map and its reference mask, row-major.
    pub fn add(&mut self, predicted: &[u8], reference: &[u8]) {
        count(predicted, reference, &mut self.overlaps);
        for class in 1..self.overlaps.len() {
            let c = class as u8;
            let p: Vec<bool> = predicted.iter().map(|&v| v == c).collect();
            let r: Vec<bool> = reference.iter().map(|&v| v == c).collect();
            if let Some(d) = hd95(&p, &r, self.width) {
                self.distances.push(d);
            }
        }
    }

    pub fn overlaps(&self) -> &[Overlap] {
        &self.overlaps
    }

    pub fn scores(&self) -> SegmentationScores {
        let foreground = self.overlaps.get(1..).unwrap_or_default();
        let dice: Vec<Option<f64>> = foreground.iter().map(Overlap::dice).collect();
        SegmentationScores {
            mean_dice: mean(dice.iter().flatten().copied()),
            mean_iou: mean(foreground.iter().filter_map(Overlap::iou)),
            hd95: mean(self.distances.iter().copied()),
            dice,
        }
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (n, sum) = xs.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    (n > 0).then(|| sum / n as f64)
}

/// The 95th percentile Hausdorff distance between two masks of `width`-pixel rows, in pixels;
/// none when either is empty.
pub fn hd95(a: &[bool], b: &[bool], width: usize) -> Option<f64> {
    if width == 0 || a.len() != b.len() || !a.len().is_multiple_of(width) {
        return None;
    }
    let (edge_a, edge_b) = (boundary(a, width), boundary(b, width));
    if !edge_a.contains(&true) || !edge_b.contains(&true) {
        return None;
    }
    let to_b = squared_distances(&edge_b, width);
    let to_a = squared_distances(&edge_a, width);
    let directed = |edge: &[bool], to: &[f64]| {
        let mut d: Vec<f64> = edge
            .iter()
            .zip(to)
            .filter(|(on, _)| **on)
            .map(|(_, d)| d.sqrt())
            .collect();
        percentile(&mut d, 0.95)
    };
    Some(directed(&edge_a, &to_b).max(directed(&edge_b, &to_a)))
}

/// The mask's boundary: its pixels with a 4-neighbour outside the mask or outside the image.
fn boundary(mask: &[bool], width: usize) -> Vec<bool> {
    let height = mask.len() / width;
    let at = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < width
            && (y as usize) < height
            && mask[y as usize * width + x as usize]
    };
    (0..mask.len())
        .map(|i| {
            let (x, y) = ((i % width) as isize, (i / width) as isize);
            mask[i] && !(at(x - 1, y) && at(x + 1, y) && at(x, y - 1) && at(x, y + 1))
        })
        .collect()
}

/// The squared Euclidean distance of every pixel to the nearest `true` one (the exact
/// transform of Felzenszwalb and Huttenlocher 2012: a lower envelope of parabolas per column,
/// then per row).
fn squared_distances(mask: &[bool], width: usize) -> Vec<f64> {
    let height = mask.len() / width;
    let far = ((width * width + height * height) as f64) * 4.0 + 1.0;
    let mut d: Vec<f64> = mask.iter().map(|&m| if m { 0.0 } else { far }).collect();
    let mut line = Vec::new();
    for x in 0..width {
        line.clear();
        line.extend((0..height).map(|y| d[y * width + x]));
        let out = envelope(&line);
        for (y, v) in out.into_iter().enumerate() {
            d[y * width + x] = v;
        }
    }
    for y in 0..height {
        let row = &mut d[y * width..(y + 1) * width];
        let out = envelope(row);
        row.copy_from_slice(&out);
    }
    d
}

/// One dimension of the transform: `min over q of (p − q)² + f(q)` for every `p`.
fn envelope(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let mut out = vec![0.0; n];
    if n == 0 {
        return out;
    }
    let mut v = vec![0usize; n];
    let mut z = vec![0.0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    let meet = |q: usize, p: usize| {
        ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * q as f64 - 2.0 * p as f64)
    };
    for q in 1..n {
        let mut s = meet(q, v[k]);
        while s <= z[k] {
            k -= 1;
            s = meet(q, v[k]);
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (p, o) in out.iter_mut().enumerate() {
        while z[k + 1] < p as f64 {
            k += 1;
        }
        let dp = p as f64 - v[k] as f64;
        *o = dp * dp + f[v[k]];
    }
    out
}

/// The `q` quantile of `xs` with linear interpolation between order statistics (numpy's and
/// torch's default); 0 for an empty slice.
fn percentile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(f64::total_cmp);
    let pos = q * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(rows: &[&str]) -> (Vec<bool>, usize) {
        let width = rows[0].len();
        (
            rows.iter()
                .flat_map(|r| r.chars().map(|c| c == '#'))
                .collect(),
            width,
        )
    }

    #[test]
    fn dice_and_iou_by_hand() {
        // Reference: class 1 on 4 pixels, class 2 on 2. Prediction: class 1 on 3 of those 4
        // and 1 more, class 2 nowhere.
        let reference = [1, 1, 1, 1, 2, 2, 0, 0];
        let predicted = [1, 1, 1, 0, 0, 0, 1, 0];
        let mut tally = Tally::new(3, 4);
        tally.add(&predicted, &reference);
        assert_eq!(
            tally.overlaps()[1],
            Overlap {
                predicted: 4,
                reference: 4,
                both: 3
            }
        );
        let s = tally.scores();
        // class 1: 2·3/(4+4) = 0.75, IoU 3/5; class 2: 0/(0+2) = 0, IoU 0.
        assert_eq!(s.dice, vec![Some(0.75), Some(0.0)]);
        assert_eq!(s.mean_dice, Some(0.375));
        assert_eq!(s.mean_iou, Some(0.3));
        // A class in neither has no score, and is left out of the means.
        let mut t = Tally::new(3, 2);
        t.add(&[1, 0], &[1, 0]);
        assert_eq!(t.scores().dice, vec![Some(1.0), None]);
        assert_eq!(t.scores().mean_dice, Some(1.0));
    }

    #[test]
    fn hd95_of_shifted_squares() {
        // A: an L of 12 boundary pixels; B: a 3×3 square two pixels right, 8 boundary pixels.
        let (a, w) = mask(&[
            "#####..", //
            "###....", //
            "###....", //
            "###....", //
        ]);
        let (b, _) = mask(&[
            "..###..", //
            "..###..", //
            "..###..", //
            ".......", //
        ]);
        // Brute force over the boundaries as the definition says.
        let brute = |x: &[bool], y: &[bool]| {
            let (ex, ey) = (boundary(x, w), boundary(y, w));
            let pts = |e: &[bool]| -> Vec<(f64, f64)> {
                e.iter()
                    .enumerate()
                    .filter(|(_, on)| **on)
                    .map(|(i, _)| ((i % w) as f64, (i / w) as f64))
                    .collect()
            };
            let (px, py) = (pts(&ex), pts(&ey));
            let mut d: Vec<f64> = px
                .iter()
                .map(|p| {
                    py.iter()
                        .map(|q| ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt())
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            percentile(&mut d, 0.95)
        };
        let expected = brute(&a, &b).max(brute(&b, &a));
        let got = hd95(&a, &b, w).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // By hand. A's boundary to B's: five on it (0), (2, 1) and (2, 2) at 1, (2, 3) at √2,
        // (0, 1), (0, 2) and (1, 3) at 2, (0, 3) at √5; the 95th percentile of 12 sorted values
        // sits at 0.95 · 11 = 10.45, between the 2 and the √5: 2 + 0.45 (√5 − 2). B's to A's:
        // 0 ×5, 1, 1, 2 ⇒ at 6.65: 1 + 0.65 · 1 = 1.65. HD95 is the larger.
        let by_hand = 2.0 + 0.45 * (5f64.sqrt() - 2.0);
        assert!((got - by_hand).abs() < 1e-12, "{got} vs {by_hand}");
        // Identical masks are 0 apart; an empty one has no distance.
        assert_eq!(hd95(&a, &a, w), Some(0.0));
        assert_eq!(hd95(&a, &vec![false; a.len()], w), None);
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let (m, w) = mask(&[
            "#.......", //
            "........", //
            "....#...", //
            "........", //
            ".......#", //
        ]);
        let d = squared_distances(&m, w);
        for (i, got) in d.iter().enumerate() {
            let (x, y) = ((i % w) as f64, (i / w) as f64);
            let want = m
                .iter()
                .enumerate()
                .filter(|(_, on)| **on)
                .map(|(j, _)| (x - (j % w) as f64).powi(2) + (y - (j / w) as f64).powi(2))
                .fold(f64::INFINITY, f64::min);
            assert_eq!(*got, want, "pixel {i}");
        }
    }

    #[test]
    fn sites_scores_are_weighted_by_their_images() {
        let a = SegmentationScores {
            dice: vec![Some(0.5), None],
            mean_dice: Some(0.5),
            mean_iou: Some(0.25),
            hd95: None,
        };
        let b = SegmentationScores {
            dice: vec![Some(1.0), Some(0.8)],
            mean_dice: Some(0.9),
            mean_iou: Some(0.75),
            hd95: Some(2.0),
        };
        let w = SegmentationScores::weighted([(&a, 30), (&b, 10)].into_iter())
            .unwrap_or_else(|| panic!("no scores"));
        // (0.5·30 + 1·10)/40 = 0.625; class 2 and HD95 from b alone.
        assert_eq!(w.dice, vec![Some(0.625), Some(0.8)]);
        assert_eq!(w.mean_dice, Some((0.5 * 30.0 + 0.9 * 10.0) / 40.0));
        assert_eq!(w.mean_iou, Some(0.375));
        assert_eq!(w.hd95, Some(2.0));
        assert_eq!(SegmentationScores::weighted(std::iter::empty()), None);
    }

    #[test]
    fn percentile_interpolates() {
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
        // 95 % of the way from 1 to 2 over two points.
        assert!((percentile(&mut [1.0, 2.0], 0.95) - 1.95).abs() < 1e-12);
    }
}
