//! Pillow's resampling filters: their `Image.Resampling` codes and the convolution kernels of
//! `libImaging/Resample.c`, transcribed with Pillow's constants and branch order.

/// Pillow's resampling filters, with their `Image.Resampling` integer codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
    /// Magic Kernel Sharp 2013 (Pillow 13).
    Mks2013,
    /// Magic Kernel Sharp 2021 (Pillow 13).
    Mks2021,
}

impl Resample {
    /// Maps the integer stored in `resample` (PIL's enum value) to a filter.
    pub fn from_pil_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Resample::Nearest),
            1 => Some(Resample::Lanczos),
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            4 => Some(Resample::Box),
            5 => Some(Resample::Hamming),
            6 => Some(Resample::Mks2013),
            7 => Some(Resample::Mks2021),
            _ => None,
        }
    }
}

/// Convolution kernel of one Pillow filter and its support at scale 1.
pub(super) fn kernel(filter: Resample) -> (fn(f64) -> f64, f64) {
    match filter {
        Resample::Box | Resample::Nearest => (box_filter, 0.5),
        Resample::Bilinear => (bilinear_filter, 1.0),
        Resample::Hamming => (hamming_filter, 1.0),
        Resample::Bicubic => (bicubic_filter, 2.0),
        Resample::Lanczos => (lanczos_filter, 3.0),
        Resample::Mks2013 => (mks2013_filter, 2.5),
        Resample::Mks2021 => (mks2021_filter, 4.5),
    }
}

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Hamming-windowed sinc, as written in Pillow.
fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        1.0
    } else if x >= 1.0 {
        0.0
    } else {
        let x = x * std::f64::consts::PI;
        // Pillow writes the constants as C floats (`0.54f`, `0.46f`); their f32 rounding shows.
        x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
    }
}

/// Keys' cubic convolution with `a = -0.5`, as written in Pillow.
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc_filter(x) * sinc_filter(x / 3.0)
    } else {
        0.0
    }
}

/// Magic Kernel Sharp 2013, as written in Pillow 13 (`pow(x, 2)` is exact, hence `x * x`).
fn mks2013_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 0.5 {
        17.0 / 16.0 - 7.0 / 4.0 * (x * x)
    } else if x < 1.5 {
        (1.0 - x) * (7.0 / 4.0 - x)
    } else if x < 2.5 {
        -1.0 / 8.0 * ((x - 5.0 / 2.0) * (x - 5.0 / 2.0))
    } else {
        0.0
    }
}

/// Magic Kernel Sharp 2021, as written in Pillow 13.
fn mks2021_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 0.5 {
        577.0 / 576.0 - 239.0 / 144.0 * (x * x)
    } else if x < 1.5 {
        35.0 / 36.0 * (x - 1.0) * (x - 239.0 / 140.0)
    } else if x < 2.5 {
        1.0 / 6.0 * (x - 2.0) * (65.0 / 24.0 - x)
    } else if x < 3.5 {
        1.0 / 36.0 * (x - 3.0) * (x - 15.0 / 4.0)
    } else if x < 4.5 {
        -1.0 / 288.0 * ((x - 9.0 / 2.0) * (x - 9.0 / 2.0))
    } else {
        0.0
    }
}
