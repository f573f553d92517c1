//! Synthetic, radiology-like data for demos and simulations: chest-radiograph-like phantoms
//! with or without a lesion, with scanner effects per site (gain, offset, noise, blur) and
//! label imbalance, so that sites differ as hospitals do. Written as PNG files with a
//! labels CSV, the format the `images` data handler reads; for segmentation with a PNG mask of
//! each lesion beside each image.

use std::io::Write;
use std::path::Path;

use crate::train::Rng;

/// How one simulated hospital's scanner and case mix differ.
#[derive(Clone, Debug)]
pub struct SiteProfile {
    pub images: usize,
    /// Fraction of images with a lesion (label 1).
    pub lesion_fraction: f64,
    pub gain: f32,
    pub offset: f32,
    pub noise: f32,
    /// Box-blur passes (a softer detector).
    pub blur: usize,
    pub seed: u64,
}

fn ellipse(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> bool {
    ((x - cx) / rx).powi(2) + ((y - cy) / ry).powi(2) <= 1.0
}

/// One phantom, `size × size`, values in [0, 1].
pub fn phantom(size: usize, lesion: bool, profile: &SiteProfile, rng: &mut Rng) -> Vec<f32> {
    phantom_with_mask(size, lesion, profile, rng).0
}

/// One phantom and its lesion mask (1 within 1.2 radii of the lesion's centre, where it
/// stands out by a third of its peak or more; all 0 without a lesion).
pub fn phantom_with_mask(
    size: usize,
    lesion: bool,
    profile: &SiteProfile,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<u8>) {
    let mut mask = vec![0u8; size * size];
    let s = size as f32;
    let jitter = |rng: &mut Rng, a: f32| (rng.unit() as f32 - 0.5) * a;
    let (bx, by) = (
        s / 2.0 + jitter(rng, s * 0.06),
        s / 2.0 + jitter(rng, s * 0.06),
    );
    let lung_w = s * (0.16 + jitter(rng, 0.03));
    let mut img = vec![0.05f32; size * size];
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32, y as f32);
            let mut v = 0.05;
            if ellipse(fx, fy, bx, by, s * 0.42, s * 0.46) {
                v = 0.62;
            }
            for side in [-1.0, 1.0] {
                if ellipse(fx, fy, bx + side * s * 0.19, by - s * 0.02, lung_w, s * 0.3) {
                    v = 0.22;
                }
            }
            if (fx - bx).abs() < s * 0.035 && ellipse(fx, fy, bx, by, s * 0.5, s * 0.46) {
                v = 0.85; // spine
            }
            img[y * size + x] = v;
        }
    }
    if lesion {
        let side = if rng.unit() < 0.5 { -1.0 } else { 1.0 };
        let (lx, ly) = (
            bx + side * s * 0.19 + jitter(rng, s * 0.12),
            by + jitter(rng, s * 0.3),
        );
        let r = s * (0.06 + rng.unit() as f32 * 0.04);
        for y in 0..size {
            for x in 0..size {
                let d2 = (x as f32 - lx).powi(2) + (y as f32 - ly).powi(2);
                img[y * size + x] += 0.6 * (-d2 / (2.0 * r * r)).exp();
                mask[y * size + x] = u8::from(d2 <= (1.2 * r).powi(2));
            }
        }
    }
    for _ in 0..profile.blur {
        let src = img.clone();
        for y in 1..size - 1 {
            for x in 1..size - 1 {
                let mut acc = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        acc += src[(y + dy - 1) * size + (x + dx - 1)];
                    }
                }
                img[y * size + x] = acc / 9.0;
            }
        }
    }
    for v in img.iter_mut() {
        *v = (*v * profile.gain + profile.offset + profile.noise * rng.normal() as f32)
            .clamp(0.0, 1.0);
    }
    (img, mask)
}

/// Writes a site's phantoms as PNG files and `labels.csv` into `dir`; returns the lesion count.
pub fn write_site(dir: &Path, size: usize, profile: &SiteProfile) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(profile.seed);
    let mut labels = std::fs::File::create(dir.join("labels.csv"))?;
    writeln!(labels, "file,label")?;
    let mut lesions = 0;
    for i in 0..profile.images {
        let lesion = rng.unit() < profile.lesion_fraction;
        lesions += usize::from(lesion);
        let px = phantom(size, lesion, profile, &mut rng);
        let bytes: Vec<u8> = px.iter().map(|v| (v * 255.0).round() as u8).collect();
        let img = image::GrayImage::from_raw(size as u32, size as u32, bytes)
            .ok_or_else(|| std::io::Error::other("image size"))?;
        let name = format!("img{i:05}.png");
        img.save(dir.join(&name)).map_err(std::io::Error::other)?;
        writeln!(labels, "{name},{}", u8::from(lesion))?;
    }
    Ok(lesions)
}

/// Writes a site's phantoms and their lesion masks as PNG files (`img00000.png`,
/// `img00000_mask.png`, …) and `labels.csv` pairing them into `dir`; returns the lesion count.
pub fn write_segmentation_site(
    dir: &Path,
    size: usize,
    profile: &SiteProfile,
) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(profile.seed);
    let mut labels = std::fs::File::create(dir.join("labels.csv"))?;
    writeln!(labels, "image,mask")?;
    let mut lesions = 0;
    let png = |values: Vec<u8>, path: &Path| {
        image::GrayImage::from_raw(size as u32, size as u32, values)
            .ok_or_else(|| std::io::Error::other("image size"))?
            .save(path)
            .map_err(std::io::Error::other)
    };
    for i in 0..profile.images {
        let lesion = rng.unit() < profile.lesion_fraction;
        lesions += usize::from(lesion);
        let (px, mask) = phantom_with_mask(size, lesion, profile, &mut rng);
        let (name, mask_name) = (format!("img{i:05}.png"), format!("img{i:05}_mask.png"));
        png(
            px.iter().map(|v| (v * 255.0).round() as u8).collect(),
            &dir.join(&name),
        )?;
        png(mask, &dir.join(&mask_name))?;
        writeln!(labels, "{name},{mask_name}")?;
    }
    Ok(lesions)
}

/// Three hospitals that differ: a large balanced one, a noisy one, a small imbalanced blurry one.
pub fn demo_sites(scale: usize) -> Vec<(&'static str, SiteProfile)> {
    vec![
        (
            "north",
            SiteProfile {
                images: 160 * scale,
                lesion_fraction: 0.5,
                gain: 1.0,
                offset: 0.0,
                noise: 0.03,
                blur: 0,
                seed: 11,
            },
        ),
        (
            "south",
            SiteProfile {
                images: 120 * scale,
                lesion_fraction: 0.35,
                gain: 0.85,
                offset: 0.08,
                noise: 0.07,
                blur: 0,
                seed: 22,
            },
        ),
        (
            "east",
            SiteProfile {
                images: 80 * scale,
                lesion_fraction: 0.2,
                gain: 1.1,
                offset: -0.04,
                noise: 0.04,
                blur: 1,
                seed: 33,
            },
        ),
    ]
}
