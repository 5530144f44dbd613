//! Pillow's resize (`libImaging/Resample.c` and, for NEAREST, `Geometry.c`), 8 bits per
//! channel: coefficients, fixed-point passes and Pillow 13's pass order, with the same rounding.

use image::RgbImage;

use super::filters::{kernel, Resample};

/// Fixed-point precision of Pillow's 8-bit convolution: `32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// `Image.resize((out_w, out_h), resample=filter, reducing_gap=None)` on an RGB image.
pub(super) fn pil_resize(img: &RgbImage, out_w: usize, out_h: usize, filter: Resample) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if (in_w, in_h) == (out_w, out_h) {
        // Pillow returns a copy without filtering.
        return img.clone();
    }
    let src = Plane {
        data: img.as_raw().clone(),
        width: in_w,
        height: in_h,
    };
    let out = match filter {
        Resample::Nearest => resize_nearest(&src, out_w, out_h),
        _ => resize_convolution(&src, out_w, out_h, filter),
    };
    // The buffer length is width * height * 3 by construction.
    RgbImage::from_raw(out.width as u32, out.height as u32, out.data)
        .unwrap_or_else(|| RgbImage::new(out_w as u32, out_h as u32))
}

/// Interleaved RGB8 pixels with their size, the working format of the resize passes.
struct Plane {
    data: Vec<u8>,
    width: usize,
    height: usize,
}

/// Per-output-pixel source window and weights for one axis (`precompute_coeffs`).
#[derive(Debug)]
struct Coeffs {
    /// Maximum window length; weights of output `i` live at `weights[i * ksize..]`.
    ksize: usize,
    /// `(first source index, window length)` per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<f64>,
}

/// Pillow's `precompute_coeffs` for the full-image box `(0, in_size)`. C's `(int)` casts are
/// truncations toward zero, which `as i64` reproduces (a negative start is then clamped to 0).
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let (filter_fn, filter_support) = kernel(filter);
    // `(double)(in1 - in0) / outSize` with float box corners: exact for any real image size.
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter_support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let ss = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0.0; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let (xmin, count) = (xmin as usize, xmax.max(0) as usize);
        let k = &mut weights[xx * ksize..xx * ksize + count.min(ksize)];
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate() {
            *w = filter_fn((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        if total != 0.0 {
            k.iter_mut().for_each(|w| *w /= total);
        }
        bounds.push((xmin, count.min(ksize)));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

/// `normalize_coeffs_8bpc`: weights to fixed point, rounding half away from zero.
fn normalize_coeffs_8bpc(weights: &[f64]) -> Vec<i64> {
    let one = f64::from(1u32 << PRECISION_BITS);
    weights
        .iter()
        .map(|&k| {
            if k < 0.0 {
                (-0.5 + k * one) as i64
            } else {
                (0.5 + k * one) as i64
            }
        })
        .collect()
}

/// Pillow's `clip8`: undo the fixed point and saturate to 0..=255.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Weighted sum of `taps` RGB pixels (`pixel(i)` gives the i-th) with fixed-point weights,
/// starting from half a unit so the final shift rounds.
fn convolve(kk: &[i64], taps: usize, pixel: impl Fn(usize) -> [u8; 3]) -> [u8; 3] {
    let mut ss = [1i64 << (PRECISION_BITS - 1); 3];
    for (i, &k) in kk.iter().take(taps).enumerate() {
        let p = pixel(i);
        for c in 0..3 {
            ss[c] += i64::from(p[c]) * k;
        }
    }
    ss.map(clip8)
}

/// `ImagingResampleInner` as of Pillow 13: two separable passes, each rounding to 8 bits, a pass
/// whose size does not change skipped. Normally horizontal first, over only the source rows the
/// vertical pass will read; but when the height shrinks by more than twice as many pixels as the
/// width (tall images), Pillow 13 runs the vertical pass first (python-pillow/Pillow#9549).
/// Pillow <= 12.1 always went horizontal first, so for such images its output differs from
/// Pillow 13's by a grey level or so; we follow 13.0, the version the parity fixtures record.
fn resize_convolution(src: &Plane, out_w: usize, out_h: usize, filter: Resample) -> Plane {
    let horiz = precompute_coeffs(src.width, out_w, filter);
    let mut vert = precompute_coeffs(src.height, out_h, filter);
    let need_horizontal = out_w != src.width;
    let need_vertical = out_h != src.height;

    if !horizontal_first(src.width, src.height, out_w, out_h) {
        // Only reached when the height shrinks, so the vertical pass is always needed.
        let tall = resample_vertical(src, &vert);
        return if need_horizontal {
            resample_horizontal(&tall, 0..tall.height, &horiz)
        } else {
            tall
        };
    }

    let first_row = vert.bounds.first().map_or(0, |b| b.0);
    let last_row = vert.bounds.last().map_or(0, |b| b.0 + b.1);
    let mut current: Option<Plane> = None;
    if need_horizontal {
        for b in &mut vert.bounds {
            b.0 -= first_row;
        }
        current = Some(resample_horizontal(src, first_row..last_row, &horiz));
    }
    if need_vertical {
        let input = current.as_ref().unwrap_or(src);
        current = Some(resample_vertical(input, &vert));
    }
    current.unwrap_or_else(|| Plane {
        data: src.data.clone(),
        width: src.width,
        height: src.height,
    })
}

/// Pillow 13's pass order test: `!((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2)`,
/// in signed arithmetic (an upscale makes a difference negative).
fn horizontal_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let shrink_h = in_h as i64 - out_h as i64;
    let shrink_w = in_w as i64 - out_w as i64;
    !(shrink_h > 0 && shrink_h > shrink_w * 2)
}

/// `ImagingResampleHorizontal_8bpc` over source rows `rows`.
fn resample_horizontal(src: &Plane, rows: std::ops::Range<usize>, c: &Coeffs) -> Plane {
    let kk = normalize_coeffs_8bpc(&c.weights);
    let out_w = c.bounds.len();
    let mut data = Vec::with_capacity(rows.len() * out_w * 3);
    for y in rows.clone() {
        let row = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let k = &kk[xx * c.ksize..(xx + 1) * c.ksize];
            let p = convolve(k, taps, |i| {
                let o = (xmin + i) * 3;
                [row[o], row[o + 1], row[o + 2]]
            });
            data.extend_from_slice(&p);
        }
    }
    Plane {
        data,
        width: out_w,
        height: rows.len(),
    }
}

/// `ImagingResampleVertical_8bpc`.
fn resample_vertical(src: &Plane, c: &Coeffs) -> Plane {
    let kk = normalize_coeffs_8bpc(&c.weights);
    let out_h = c.bounds.len();
    let stride = src.width * 3;
    let mut data = Vec::with_capacity(out_h * stride);
    for (yy, &(ymin, taps)) in c.bounds.iter().enumerate() {
        let k = &kk[yy * c.ksize..(yy + 1) * c.ksize];
        for x in 0..src.width {
            let p = convolve(k, taps, |i| {
                let o = (ymin + i) * stride + x * 3;
                [src.data[o], src.data[o + 1], src.data[o + 2]]
            });
            data.extend_from_slice(&p);
        }
    }
    Plane {
        data,
        width: src.width,
        height: out_h,
    }
}

/// Source index per output index for NEAREST (`ImagingScaleAffine`): start at half a step and
/// accumulate the step in `f64` exactly as Pillow does (the accumulation error decides ties);
/// `None` where Pillow would fall outside the image and leave a zero.
fn nearest_table(in_size: usize, out_size: usize) -> Vec<Option<usize>> {
    let step = in_size as f32 as f64 / out_size as f64;
    let mut pos = step * 0.5;
    let mut table = Vec::with_capacity(out_size);
    for _ in 0..out_size {
        // Pillow's COORD: -1 for negatives, else truncation.
        let idx = if pos < 0.0 { None } else { Some(pos as usize) };
        table.push(idx.filter(|&i| i < in_size));
        pos += step;
    }
    table
}

/// `Image.resize` with `NEAREST`, which Pillow routes through an affine transform instead of the
/// convolution passes.
fn resize_nearest(src: &Plane, out_w: usize, out_h: usize) -> Plane {
    let xs = nearest_table(src.width, out_w);
    let ys = nearest_table(src.height, out_h);
    let mut data = vec![0u8; out_w * out_h * 3];
    for (y, sy) in ys.iter().enumerate() {
        let Some(sy) = sy else { continue };
        for (x, sx) in xs.iter().enumerate() {
            let Some(sx) = sx else { continue };
            let s = (sy * src.width + sx) * 3;
            let d = (y * out_w + x) * 3;
            data[d..d + 3].copy_from_slice(&src.data[s..s + 3]);
        }
    }
    Plane {
        data,
        width: out_w,
        height: out_h,
    }
}

#[cfg(test)]
mod tests {
    use image::Rgb;

    use super::*;
    use crate::data::processor::tests::gradient;

    fn row_image(values: &[u8]) -> RgbImage {
        RgbImage::from_fn(values.len() as u32, 1, |x, _| {
            let v = values[x as usize];
            Rgb([v, v, v])
        })
    }
    #[test]
    fn bicubic_coeffs_4_to_2_match_hand_computation() {
        let c = precompute_coeffs(4, 2, Resample::Bicubic);
        // scale 2, support 4: both outputs see all four inputs.
        assert_eq!(c.bounds, vec![(0, 4), (0, 4)]);
        // Unnormalised bicubic at (x + 0.5 - center) / 2 for center 1: -0.25, 0.25, 0.75, 1.25.
        let raw = [0.8671875, 0.8671875, 0.2265625, -0.0703125];
        let total: f64 = raw.iter().sum();
        for (x, r) in raw.iter().enumerate() {
            assert!((c.weights[x] - r / total).abs() < 1e-15);
            assert!((c.weights[c.ksize + 3 - x] - r / total).abs() < 1e-15);
        }
        // [10, 20, 30, 40]: 30 / 1.890625 = 15.87 -> 16 and 64.53125 / 1.890625 = 34.13 -> 34.
        let out = pil_resize(&row_image(&[10, 20, 30, 40]), 2, 1, Resample::Bicubic);
        assert_eq!(out.get_pixel(0, 0).0, [16; 3]);
        assert_eq!(out.get_pixel(1, 0).0, [34; 3]);
    }

    #[test]
    fn bilinear_coeffs_upscale_2_to_4() {
        let c = precompute_coeffs(2, 4, Resample::Bilinear);
        // Centers 0.25, 0.75, 1.25, 1.75; support 1.
        assert_eq!(c.bounds, vec![(0, 1), (0, 2), (0, 2), (1, 1)]);
        assert_eq!(&c.weights[c.ksize..c.ksize + 2], &[0.75, 0.25]);
        let out = pil_resize(&row_image(&[0, 100]), 4, 1, Resample::Bilinear);
        let values: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(values, vec![0, 25, 75, 100]);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        let one = f64::from(1u32 << PRECISION_BITS);
        assert_eq!(
            normalize_coeffs_8bpc(&[1.0, -0.25, 0.5 / one, -0.5 / one]),
            vec![1 << 22, -(1 << 20), 1, -1]
        );
    }

    #[test]
    fn identity_size_is_a_copy() {
        let img = gradient(7, 5);
        assert_eq!(pil_resize(&img, 7, 5, Resample::Bicubic), img);
        let c = precompute_coeffs(5, 5, Resample::Bicubic);
        for (i, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let w = &c.weights[i * c.ksize..i * c.ksize + taps];
            assert!((w[i - xmin] - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, Rgb([200, 3, 128]));
        for filter in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Nearest,
        ] {
            for (w, h) in [(11, 9), (80, 61), (37, 50), (10, 23)] {
                let out = pil_resize(&img, w, h, filter);
                assert_eq!(out.dimensions(), (w as u32, h as u32));
                assert!(
                    out.pixels().all(|p| p.0 == [200, 3, 128]),
                    "{filter:?} {w}x{h}"
                );
            }
        }
    }

    #[test]
    fn hard_edges_clip_like_pillow() {
        // Bicubic overshoots at a hard edge; the result must clip, not wrap around. Expected
        // values are Pillow 13's `Image.resize(..., BICUBIC)` output for this row.
        let img = row_image(&[0, 0, 255, 255, 0, 0, 255, 255]);
        let cases: [(usize, &[u8]); 3] = [
            (3, &[82, 127, 173]),
            (5, &[0, 202, 128, 53, 255]),
            (13, &[0, 0, 5, 176, 255, 255, 128, 0, 0, 79, 250, 255, 255]),
        ];
        for (w, expected) in cases {
            let out = pil_resize(&img, w, 1, Resample::Bicubic);
            let values: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
            assert_eq!(values, expected, "width {w}");
        }
    }

    /// Deterministic test pattern: `(x*53 + y*97 + x*y*31) % 256` in every channel.
    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let v = ((x * 53 + y * 97 + x * y * 31) % 256) as u8;
            Rgb([v, v, v])
        })
    }

    fn first_channel(img: &RgbImage) -> Vec<u8> {
        img.pixels().map(|p| p.0[0]).collect()
    }

    #[test]
    fn tall_images_resize_vertically_first_like_pillow_13() {
        assert!(!horizontal_first(4, 15, 3, 4));
        assert!(horizontal_first(15, 4, 4, 3));
        assert!(horizontal_first(4, 15, 8, 30));
        // Pillow 13.0 output; horizontal-first (Pillow <= 12.1) gives 129, 126 and 98 instead
        // of 130, 127 and 97.
        let out = pil_resize(&pattern(4, 15), 3, 4, Resample::Bicubic);
        assert_eq!(
            first_channel(&out),
            [99, 106, 111, 130, 127, 123, 108, 107, 105, 135, 117, 97]
        );
    }

    #[test]
    fn every_filter_matches_pillow_13() {
        // Pillow 13.0 `resize` of `pattern(9, 2)` to 4x1 (down) and 13x3 (up).
        let cases: [(Resample, [u8; 4], [u8; 39]); 4] = [
            (
                Resample::Hamming,
                [83, 119, 63, 113],
                [
                    0, 31, 56, 106, 146, 166, 212, 36, 22, 62, 112, 137, 168, 49, 89, 113, 58, 109,
                    135, 195, 32, 24, 76, 140, 120, 85, 97, 146, 170, 10, 72, 104, 177, 28, 26, 90,
                    168, 102, 1,
                ],
            ),
            (
                Resample::Mks2013,
                [73, 125, 82, 105],
                [
                    0, 5, 54, 112, 150, 202, 224, 56, 0, 56, 95, 153, 194, 45, 90, 111, 55, 88,
                    168, 203, 49, 1, 80, 145, 123, 88, 100, 174, 168, 0, 25, 133, 181, 41, 1, 104,
                    195, 92, 0,
                ],
            ),
            (
                Resample::Mks2021,
                [73, 125, 81, 105],
                [
                    0, 10, 58, 111, 143, 192, 216, 60, 2, 65, 94, 149, 189, 44, 90, 112, 59, 88,
                    161, 195, 53, 6, 84, 141, 120, 86, 97, 169, 166, 7, 32, 130, 173, 45, 10, 103,
                    188, 90, 0,
                ],
            ),
            (
                Resample::Lanczos,
                [71, 126, 83, 104],
                [
                    0, 5, 57, 114, 145, 200, 216, 65, 0, 65, 92, 153, 192, 43, 90, 111, 60, 81,
                    170, 195, 57, 1, 86, 144, 120, 86, 96, 175, 165, 6, 17, 139, 173, 48, 2, 106,
                    195, 86, 0,
                ],
            ),
        ];
        let img = pattern(9, 2);
        for (filter, down, up) in cases {
            assert_eq!(
                first_channel(&pil_resize(&img, 4, 1, filter)),
                down,
                "{filter:?}"
            );
            assert_eq!(
                first_channel(&pil_resize(&img, 13, 3, filter)),
                up,
                "{filter:?}"
            );
        }
    }

    #[test]
    fn nearest_picks_centre_samples() {
        let out = pil_resize(
            &row_image(&[0, 10, 20, 30, 40, 50]),
            3,
            1,
            Resample::Nearest,
        );
        let values: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(values, vec![10, 30, 50]);
    }
}
