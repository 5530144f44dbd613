use image::{Rgb, Rgba};

use super::*;
use crate::data::processor::Resample;

/// A raw processor (no rescale, no normalise) so values are the uint8 pixels themselves.
fn raw_cfg(tile: usize, max_tiles: usize) -> MllamaProcessorConfig {
    MllamaProcessorConfig {
        tile_size: tile,
        max_image_tiles: max_tiles,
        do_rescale: false,
        do_normalize: false,
        ..MllamaProcessorConfig::default()
    }
}

fn ramp(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([x as u8, y as u8, (x * 7 + y * 3) as u8]))
}

fn at(t: &TiledImage, tile: usize, ch: usize, y: usize, x: usize) -> f32 {
    let (th, tw) = (t.tile_height, t.tile_width);
    t.data[((tile * 3 + ch) * th + y) * tw + x]
}

#[test]
fn tiles_are_row_major_padded_bottom_right_and_packed_with_zero_tiles() {
    // 8x3 (w x h) with 4 px tiles, 4 tiles: canvas 4x8 (1 row, 2 cols, the least upscale, 1);
    // the width is the limiting side (scale 8 / 8 = 1), so the picture keeps its size, height
    // floor(3 * 1) = 3, and is padded by one row at the bottom.
    let p = MllamaImageProcessor::new(raw_cfg(4, 4), AspectMode::Resize, None).unwrap();
    let img = ramp(8, 3);
    let t = p.preprocess(&img).unwrap();
    assert_eq!(t.aspect_ratio, (1, 2));
    assert_eq!((t.num_tiles, t.aspect_ratio_id, t.max_tiles), (2, 2, 4));
    assert_eq!(t.aspect_ratio_mask, vec![true, true, false, false]);
    assert_eq!(t.data.len(), 4 * 3 * 4 * 4);
    for y in 0..3 {
        for x in 0..4 {
            for ch in 0..3 {
                let left = f32::from(img.get_pixel(x, y).0[ch]);
                let right = f32::from(img.get_pixel(x + 4, y).0[ch]);
                assert_eq!(at(&t, 0, ch, y as usize, x as usize), left);
                assert_eq!(at(&t, 1, ch, y as usize, x as usize), right);
            }
        }
    }
    // Padding row (raw zeros here) and the two packing tiles.
    assert!((0..2).all(|tile| (0..4).all(|x| at(&t, tile, 0, 3, x) == 0.0)));
    assert!(t.data[2 * 48..].iter().all(|&v| v == 0.0));
}

#[test]
fn padding_is_normalised_black_but_packing_tiles_are_zero() {
    let cfg = MllamaProcessorConfig {
        tile_size: 4,
        max_image_tiles: 2,
        ..MllamaProcessorConfig::default()
    };
    let p = MllamaImageProcessor::new(cfg, AspectMode::Resize, None).unwrap();
    // 4x2: canvas 4x4, kept at 4x2 then padded by two rows.
    let t = p
        .preprocess(&RgbImage::from_pixel(4, 2, Rgb([255, 255, 255])))
        .unwrap();
    assert_eq!((t.aspect_ratio, t.num_tiles), ((1, 1), 1));
    // (255 / 255 - 0.5) / 0.5 = 1 on the picture, (0 - 0.5) / 0.5 = -1 on the padding.
    assert_eq!(at(&t, 0, 1, 1, 3), 1.0);
    assert_eq!(at(&t, 0, 1, 2, 0), -1.0);
    assert!(t.data[48..].iter().all(|&v| v == 0.0));
    assert_eq!(t.aspect_ratio_mask, vec![true, false]);
}

#[test]
fn grids_for_tall_wide_small_and_large_pictures() {
    let p = MllamaImageProcessor::new(raw_cfg(28, 2), AspectMode::Resize, None).unwrap();
    // (w, h) -> (grid, aspect ratio id) as HF's processor gives them.
    for (w, h, grid, id) in [
        (67, 45, (1, 2), 2),
        (33, 50, (2, 1), 3),
        (20, 26, (1, 1), 1),
        (12, 10, (1, 1), 1),
        (90, 200, (2, 1), 3),
    ] {
        let t = p.preprocess(&ramp(w, h)).unwrap();
        assert_eq!((t.aspect_ratio, t.aspect_ratio_id), (grid, id), "{w}x{h}");
    }
}

#[test]
fn squash_is_one_tile_whatever_the_tile_budget() {
    for max_tiles in [1, 2, 4] {
        let squash =
            MllamaImageProcessor::new(raw_cfg(28, max_tiles), AspectMode::Squash, None).unwrap();
        let resize =
            MllamaImageProcessor::new(raw_cfg(28, max_tiles), AspectMode::Resize, None).unwrap();
        let img = ramp(90, 31);
        let t = squash.preprocess(&img).unwrap();
        assert_eq!(
            (t.aspect_ratio, t.aspect_ratio_id, t.num_tiles),
            ((1, 1), 1, 1)
        );
        assert_eq!(t.max_tiles, max_tiles);
        // The same as HF's processor on the picture resized to one tile first.
        let pre = pil_resize(&img, 28, 28, Resample::Bilinear);
        assert_eq!(t, resize.preprocess(&pre).unwrap());
        // HF's own tiling of this wide picture: 1x2 with 2 tiles, 1x3 with 4 (HF's values).
        let own = resize.preprocess(&img).unwrap().aspect_ratio;
        let want = [(1, 1), (1, 2), (1, 3)][max_tiles.min(3) - 1];
        assert_eq!(own, want, "{max_tiles} tiles");
    }
}

#[test]
fn pad_mode_squares_the_picture_with_the_mean_colour_first() {
    let p = MllamaImageProcessor::new(raw_cfg(4, 4), AspectMode::Pad, None).unwrap();
    // 4x2 -> 4x4 square: rows 1 and 2 hold the picture, rows 0 and 3 are int(0.5 * 255) = 127.
    let t = p
        .preprocess(&RgbImage::from_pixel(4, 2, Rgb([10, 20, 30])))
        .unwrap();
    assert_eq!(t.aspect_ratio, (1, 1));
    let col0: Vec<f32> = (0..4).map(|y| at(&t, 0, 0, y, 0)).collect();
    assert_eq!(col0, vec![127.0, 10.0, 10.0, 127.0]);
}

#[test]
fn max_tiles_override() {
    let p = MllamaImageProcessor::new(raw_cfg(28, 4), AspectMode::Resize, Some(1)).unwrap();
    let t = p.preprocess(&ramp(90, 31)).unwrap();
    assert_eq!(
        (t.max_tiles, t.aspect_ratio, t.aspect_ratio_id),
        (1, (1, 1), 1)
    );
    assert_eq!(t.data.len(), 3 * 28 * 28);
    assert_eq!(t.aspect_ratio_mask, vec![true]);
    let err = MllamaImageProcessor::new(raw_cfg(28, 4), AspectMode::Resize, Some(0)).unwrap_err();
    assert!(matches!(err, Error::Model(_)), "{err}");
    let err =
        MllamaImageProcessor::new(raw_cfg(560, 4), AspectMode::Resize, Some(1 << 20)).unwrap_err();
    assert!(err.to_string().contains("max_image_tiles"), "{err}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let p = MllamaImageProcessor::new(raw_cfg(28, 2), AspectMode::Resize, None).unwrap();
    for img in [
        RgbImage::new(0, 0),
        RgbImage::new(0, 5),
        RgbImage::new(5, 0),
    ] {
        assert!(matches!(p.preprocess(&img), Err(Error::Image { .. })));
    }
    // A config built in code is held to the file's rules.
    for cfg in [
        raw_cfg(0, 2),
        raw_cfg(28, 0),
        MllamaProcessorConfig {
            image_std: [0.5, 0.0, 0.5],
            ..MllamaProcessorConfig::default()
        },
    ] {
        let err = MllamaImageProcessor::new(cfg, AspectMode::Resize, None).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
    }
    // One-pixel-wide extremes.
    let t = p.preprocess(&ramp(1, 1000)).unwrap();
    assert_eq!(t.aspect_ratio, (2, 1));
}

#[test]
fn values_follow_numpy_dtypes() {
    let cfg = MllamaProcessorConfig {
        tile_size: 1,
        max_image_tiles: 1,
        image_mean: [0.48145466, 0.4578275, 0.40821073],
        image_std: [0.26862954, 0.26130258, 0.27577711],
        ..MllamaProcessorConfig::default()
    };
    let p = MllamaImageProcessor::new(cfg.clone(), AspectMode::Resize, None).unwrap();
    let t = p
        .preprocess(&RgbImage::from_pixel(1, 1, Rgb([0, 128, 255])))
        .unwrap();
    let expect = |v: u8, c: usize| {
        ((f64::from(v) * (1.0 / 255.0)) as f32 - cfg.image_mean[c] as f32) / cfg.image_std[c] as f32
    };
    assert_eq!(t.data, vec![expect(0, 0), expect(128, 1), expect(255, 2)]);
}

#[test]
fn alpha_is_composited_onto_white_as_pillow_does() {
    // `Image.alpha_composite(Image.new("RGBA", size, (255, 255, 255)), src).convert("RGB")`
    // in Pillow 13.
    let src = [
        ([0, 0, 0, 1], [254, 254, 254]),
        ([10, 200, 30, 128], [132, 227, 142]),
        ([255, 0, 77, 254], [255, 1, 78]),
        ([3, 4, 5, 0], [255, 255, 255]),
        ([100, 100, 100, 255], [100, 100, 100]),
        ([0, 128, 255, 77], [178, 217, 255]),
    ];
    let img = RgbaImage::from_fn(src.len() as u32, 1, |x, _| Rgba(src[x as usize].0));
    let out = flatten_alpha_on_white(&img);
    for (x, (_, want)) in src.iter().enumerate() {
        assert_eq!(out.get_pixel(x as u32, 0).0, *want, "pixel {x}");
    }
}
