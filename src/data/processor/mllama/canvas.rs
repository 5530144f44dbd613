//! The tile-grid arithmetic of transformers' `image_processing_mllama.py`: which grids exist,
//! which one a picture gets, how large the picture is drawn on it, and the grid's id.
//!
//! Every comparison that picks a grid is a float64 comparison in numpy, ties included, so the
//! same IEEE operations are done here in `f64` (sizes are far below 2^53, so the integer-to-float
//! conversions are exact). A different but "equivalent" formulation (comparing cross products in
//! integers, say) would pick another grid on exact ties and change the aspect-ratio id.

/// HF's `get_all_supported_aspect_ratios(max_image_tiles)`: every grid `(a, b)` with
/// `a * b <= max_tiles`, `a` in the outer loop. HF's docstring calls the pair (width, height), but
/// every caller uses it as `(rows, cols)`: `get_optimal_tiled_canvas` multiplies the first entry
/// into the canvas height, and `resize` returns `(num_tiles_height, num_tiles_width)`, whose
/// index in this list is the aspect-ratio id. `a` runs over `1..=n`, `b` over `1..=n / a` (HF
/// loops `b` to `n` and filters; same pairs, same order).
pub fn supported_aspect_ratios(max_tiles: usize) -> Vec<(usize, usize)> {
    (1..=max_tiles)
        .flat_map(|a| (1..=max_tiles / a).map(move |b| (a, b)))
        .collect()
}

/// HF's `get_optimal_tiled_canvas`: `(canvas_height, canvas_width)` in pixels for an
/// `image_height` x `image_width` picture, `max_tiles` tiles of `tile` x `tile` px at most.
///
/// Per grid the scale is the smaller of `canvas_h / h` and `canvas_w / w` (the limiting side).
/// The smallest scale >= 1 wins (least upscaling); when every grid shrinks the picture, the
/// largest scale < 1 (least downscaling). Among grids with exactly that scale the one of least
/// area wins, the first in [`supported_aspect_ratios`] order on equal areas (`np.argmin`).
/// A zero dimension gives an infinite scale; callers reject empty images first.
pub fn optimal_tiled_canvas(
    image_height: usize,
    image_width: usize,
    max_tiles: usize,
    tile: usize,
) -> (usize, usize) {
    let canvases: Vec<(usize, usize)> = supported_aspect_ratios(max_tiles)
        .into_iter()
        .map(|(a, b)| (a * tile, b * tile))
        .collect();
    let scales: Vec<f64> = canvases
        .iter()
        .map(|&(ch, cw)| {
            let scale_h = ch as f64 / image_height as f64;
            let scale_w = cw as f64 / image_width as f64;
            // `np.where(scale_w > scale_h, scale_h, scale_w)`.
            if scale_w > scale_h {
                scale_h
            } else {
                scale_w
            }
        })
        .collect();
    let upscale = scales
        .iter()
        .copied()
        .filter(|&s| s >= 1.0)
        .reduce(f64::min);
    let selected = upscale.unwrap_or_else(|| {
        scales
            .iter()
            .copied()
            .filter(|&s| s < 1.0)
            .fold(f64::NEG_INFINITY, f64::max)
    });
    let mut best: Option<(usize, (usize, usize))> = None;
    for (&canvas, &scale) in canvases.iter().zip(&scales) {
        if scale != selected {
            continue;
        }
        let area = canvas.0 * canvas.1;
        if best.is_none_or(|(a, _)| area < a) {
            best = Some((area, canvas));
        }
    }
    // `max_tiles >= 1` always offers the 1x1 grid, and `selected` is one of `scales`.
    best.map_or((tile, tile), |(_, canvas)| canvas)
}

/// HF's `get_image_size_fit_to_canvas`: `(height, width)` the picture is resized to before it is
/// padded to the canvas. Each side's target is the image side clamped to `tile..=canvas side`,
/// so a picture is upscaled only up to one tile per side and otherwise kept at its own size
/// (a 300x800 picture on a 560x1120 canvas stays 300x800 and is padded), while one larger than
/// the canvas is shrunk to fit it. The limiting side takes its target; the other scales by the
/// same factor, `floor`ed, at least 1 px and at most its own target.
pub fn image_size_fit_to_canvas(
    image_height: usize,
    image_width: usize,
    canvas_height: usize,
    canvas_width: usize,
    tile: usize,
) -> (usize, usize) {
    // `np.clip(x, tile, canvas)` = `min(max(x, tile), canvas)`.
    let target_width = image_width.max(tile).min(canvas_width);
    let target_height = image_height.max(tile).min(canvas_height);
    let scale_h = target_height as f64 / image_height as f64;
    let scale_w = target_width as f64 / image_width as f64;
    // `math.floor(x) or 1`: a zero becomes 1.
    let floor_at_least_one = |x: f64| (x.floor() as usize).max(1);
    if scale_w < scale_h {
        let new_height = floor_at_least_one(image_height as f64 * scale_w).min(target_height);
        (new_height, target_width)
    } else {
        let new_width = floor_at_least_one(image_width as f64 * scale_h).min(target_width);
        (target_height, new_width)
    }
}

/// HF's `convert_aspect_ratios_to_ids` for one picture: the grid's index in
/// [`supported_aspect_ratios`] plus one (0 is HF's id for a missing picture in a batch).
/// `None` when the grid is not in the list. The id depends on `max_tiles`: grid (2, 1) is id 3
/// of 2 tiles but id 5 of 4, so ids only mean the same to the model when the processor's
/// `max_image_tiles` equals the one the model was trained with (or every grid is 1x1, id 1).
pub fn aspect_ratio_id(aspect_ratio: (usize, usize), max_tiles: usize) -> Option<usize> {
    supported_aspect_ratios(max_tiles)
        .iter()
        .position(|&r| r == aspect_ratio)
        .map(|i| i + 1)
}

/// HF's `build_aspect_ratio_mask` for one picture: the first `rows * cols` tiles are real; the
/// first is marked real even for a missing picture (HF: "in original implementation aspect
/// ratios are padded with (1, 1)").
pub fn aspect_ratio_mask(aspect_ratio: (usize, usize), max_tiles: usize) -> Vec<bool> {
    let real = (aspect_ratio.0 * aspect_ratio.1).max(1);
    (0..max_tiles).map(|t| t < real).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by transformers 4.57.1's own helpers
    // (`transformers.models.mllama.image_processing_mllama`).

    #[test]
    fn supported_aspect_ratios_match_hf() {
        assert_eq!(supported_aspect_ratios(1), vec![(1, 1)]);
        assert_eq!(supported_aspect_ratios(2), vec![(1, 1), (1, 2), (2, 1)]);
        assert_eq!(
            supported_aspect_ratios(3),
            vec![(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)]
        );
        assert_eq!(
            supported_aspect_ratios(4),
            vec![
                (1, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (2, 1),
                (2, 2),
                (3, 1),
                (4, 1)
            ]
        );
        assert_eq!(
            supported_aspect_ratios(6),
            vec![
                (1, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (1, 5),
                (1, 6),
                (2, 1),
                (2, 2),
                (2, 3),
                (3, 1),
                (3, 2),
                (4, 1),
                (5, 1),
                (6, 1)
            ]
        );
    }

    /// `(h, w, max_tiles, tile)`, then `(height, width)` pairs.
    type Case = ((usize, usize, usize, usize), (usize, usize), (usize, usize));

    /// `(input, get_optimal_tiled_canvas, get_image_size_fit_to_canvas)`.
    const HF_CASES: &[Case] = &[
        ((45, 67, 2, 28), (28, 56), (28, 41)),
        ((26, 20, 2, 28), (28, 28), (28, 21)),
        ((40, 40, 2, 28), (28, 28), (28, 28)),
        ((50, 33, 2, 28), (56, 28), (42, 28)),
        ((100, 30, 2, 28), (56, 28), (56, 16)),
        ((30, 100, 2, 28), (28, 56), (16, 56)),
        ((10, 12, 2, 28), (28, 28), (23, 28)),
        ((200, 90, 2, 28), (56, 28), (56, 25)),
        ((560, 560, 4, 560), (560, 560), (560, 560)),
        ((300, 800, 4, 560), (560, 1120), (300, 800)),
        ((1200, 500, 4, 560), (1680, 560), (1200, 500)),
        ((67, 45, 4, 560), (560, 560), (560, 376)),
        ((28, 28, 2, 28), (28, 28), (28, 28)),
        ((57, 28, 2, 28), (56, 28), (56, 27)),
        ((56, 28, 2, 28), (56, 28), (56, 28)),
        ((29, 60, 4, 28), (28, 84), (28, 57)),
        ((1, 1000, 4, 28), (28, 112), (1, 112)),
        ((1000, 1, 4, 28), (112, 28), (112, 1)),
        ((1, 1, 4, 28), (28, 28), (28, 28)),
    ];

    #[test]
    fn canvas_and_fit_match_hf() {
        for &((h, w, n, tile), canvas, fit) in HF_CASES {
            let got = optimal_tiled_canvas(h, w, n, tile);
            assert_eq!(got, canvas, "canvas of {h}x{w}, {n} tiles of {tile}");
            let got = image_size_fit_to_canvas(h, w, canvas.0, canvas.1, tile);
            assert_eq!(got, fit, "fit of {h}x{w} on {canvas:?}");
        }
    }

    #[test]
    fn ids_and_masks_follow_the_supported_list() {
        assert_eq!(aspect_ratio_id((1, 1), 1), Some(1));
        assert_eq!(aspect_ratio_id((2, 1), 2), Some(3));
        assert_eq!(aspect_ratio_id((2, 1), 4), Some(5));
        assert_eq!(aspect_ratio_id((2, 2), 4), Some(6));
        assert_eq!(aspect_ratio_id((2, 2), 3), None);
        assert_eq!(aspect_ratio_mask((1, 2), 4), vec![true, true, false, false]);
        assert_eq!(aspect_ratio_mask((0, 0), 2), vec![true, false]);
    }
}
