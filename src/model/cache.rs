//! The generation cache, family-neutral: keys and values of every self-attention layer for the
//! positions seen so far, and of every cross-attention layer for the images (computed once, at
//! prefill, and reused by every generated token).
//!
//! A cache holds one or more sequences (rows). Caches of single prompts prefilled on their own can
//! be stacked into one batch ([`KvCache::stack`]) so that their generated tokens share each weight
//! read: shorter rows are left-padded with masked key slots, and every row keeps its own token
//! count, so its positions (RoPE) and what it attends to are exactly those it had alone.

use candle_core::{Tensor, D};

/// Keys and values of one attention layer: `[b, kv_heads, s, d]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Self-attention: append the new positions' keys/values and return all cached so far.
    pub fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = match &self.kv {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Cross-attention: the image keys/values, computed by `make` on first use only.
    pub fn get_or_compute(
        &mut self,
        make: impl FnOnce() -> candle_core::Result<(Tensor, Tensor)>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        if let Some(kv) = &self.kv {
            return Ok(kv.clone());
        }
        let kv = make()?;
        self.kv = Some(kv.clone());
        Ok(kv)
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_none()
    }

    /// The rows `idx` (u32 indices into the batch) of every cached tensor.
    fn select(&self, idx: &Tensor) -> candle_core::Result<Self> {
        let kv = match &self.kv {
            Some((k, v)) => Some((k.index_select(idx, 0)?, v.index_select(idx, 0)?)),
            None => None,
        };
        Ok(Self { kv })
    }
}

/// `layers[i]` of every cache, rows stacked along the batch; self-attention rows left-padded with
/// zeros to `pad_to` positions (`None`: cross-attention, whose shapes must agree).
fn stack_layers(layers: &[&LayerCache], pad_to: Option<usize>) -> candle_core::Result<LayerCache> {
    if layers.iter().all(|l| l.is_empty()) {
        return Ok(LayerCache::default());
    }
    let mut ks = Vec::with_capacity(layers.len());
    let mut vs = Vec::with_capacity(layers.len());
    for l in layers {
        let Some((k, v)) = &l.kv else {
            candle_core::bail!(
                "cannot batch a cache holding image states with one that has none (every \
                 prompt of a batch needs an image, or none does)"
            );
        };
        let (k, v) = match pad_to {
            Some(n) if k.dim(2)? < n => {
                let (b, h, s, d) = k.dims4()?;
                let pad = Tensor::zeros((b, h, n - s, d), k.dtype(), k.device())?;
                let vpad = Tensor::zeros((b, h, n - s, v.dim(D::Minus1)?), v.dtype(), v.device())?;
                (Tensor::cat(&[&pad, k], 2)?, Tensor::cat(&[&vpad, v], 2)?)
            }
            _ => (k.clone(), v.clone()),
        };
        ks.push(k);
        vs.push(v);
    }
    Ok(LayerCache {
        kv: Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)),
    })
}

/// One cache per generated batch: self- and cross-attention layers, and per row which cached
/// positions hold a real token.
#[derive(Debug, Clone)]
pub struct KvCache {
    self_attn: Vec<LayerCache>,
    cross_attn: Vec<LayerCache>,
    /// Per row, one entry per cached position: `false` for the left padding [`KvCache::stack`]
    /// adds. Empty until the first tokens are cached (the batch size is not known before).
    valid: Vec<Vec<bool>>,
    /// The cross-attention bias and row mask of the prompt's last position, which every
    /// generated token reuses (HF repeats the last row of the cross-attention mask).
    cross_rows: Option<(Tensor, Tensor)>,
}

impl KvCache {
    /// A cache for `self_layers` self-attention and `cross_layers` cross-attention layers.
    pub fn new(self_layers: usize, cross_layers: usize) -> Self {
        Self {
            self_attn: vec![LayerCache::default(); self_layers],
            cross_attn: vec![LayerCache::default(); cross_layers],
            valid: Vec::new(),
            cross_rows: None,
        }
    }

    /// Cached positions (the offset of the next token in the key tensors), padding included.
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows (sequences) in the cache; `None` before anything was cached.
    pub fn batch_size(&self) -> Option<usize> {
        (!self.valid.is_empty()).then_some(self.valid.len())
    }

    /// The `i`-th self-attention layer's cache.
    pub fn self_layer(&mut self, i: usize) -> &mut LayerCache {
        &mut self.self_attn[i]
    }

    /// The `i`-th cross-attention layer's cache (in the order the layers run).
    pub fn cross_layer(&mut self, i: usize) -> &mut LayerCache {
        &mut self.cross_attn[i]
    }

    /// Whether the images' cross-attention keys/values are cached (prefill ran with images).
    pub fn has_image_states(&self) -> bool {
        self.cross_attn.iter().any(|l| !l.is_empty())
    }

    /// Keep the cross-attention mask row generated tokens reuse.
    pub fn set_cross_rows(&mut self, bias: Tensor, row_mask: Tensor) {
        self.cross_rows = Some((bias, row_mask));
    }

    pub fn cross_rows(&self) -> Option<&(Tensor, Tensor)> {
        self.cross_rows.as_ref()
    }

    fn check_batch(&self, b: usize) -> candle_core::Result<()> {
        match self.batch_size() {
            Some(n) if n != b => {
                candle_core::bail!("{b} new rows for a cache holding {n} sequences")
            }
            _ => Ok(()),
        }
    }

    /// Which keys `s` new tokens of each of the `b` rows see: the cached positions (padding
    /// false), then the new ones (`[b][len + s]`, as [`crate::model::llama::attention_mask`] takes).
    pub fn key_valid(&self, b: usize, s: usize) -> candle_core::Result<Vec<Vec<bool>>> {
        self.check_batch(b)?;
        if self.valid.is_empty() {
            return Ok(vec![vec![true; s]; b]);
        }
        Ok(self
            .valid
            .iter()
            .map(|row| {
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(true, s))
                    .collect()
            })
            .collect())
    }

    /// Whether some row has padded (masked) key slots: then even a single new token needs a mask.
    pub fn is_padded(&self) -> bool {
        self.valid.iter().any(|r| r.iter().any(|v| !v))
    }

    /// Position ids `[b * s]` (row-major) of `s` new tokens per row: each row counts its own real
    /// tokens, so padding never shifts a row's positions.
    pub fn positions(&self, b: usize, s: usize) -> candle_core::Result<Vec<u32>> {
        self.check_batch(b)?;
        let mut out = Vec::with_capacity(b * s);
        for r in 0..b {
            let seen = self
                .valid
                .get(r)
                .map_or(0, |row| row.iter().filter(|&&v| v).count());
            out.extend((seen..seen + s).map(|p| p as u32));
        }
        Ok(out)
    }

    /// Record that `s` more positions of each of the `b` rows went through every self-attention
    /// layer.
    pub fn advance(&mut self, b: usize, s: usize) {
        if self.valid.is_empty() {
            self.valid = vec![Vec::new(); b];
        }
        for row in &mut self.valid {
            row.extend(std::iter::repeat_n(true, s));
        }
    }

    /// One batch from caches of single sequences or batches (same model): rows in order, shorter
    /// ones left-padded with masked slots. Every cache must hold at least one position, and image
    /// states in all or none.
    pub fn stack(caches: &[KvCache]) -> candle_core::Result<KvCache> {
        let Some(first) = caches.first() else {
            candle_core::bail!("no caches to stack");
        };
        if caches.iter().any(|c| {
            c.is_empty()
                || c.self_attn.len() != first.self_attn.len()
                || c.cross_attn.len() != first.cross_attn.len()
        }) {
            candle_core::bail!("only non-empty caches of one model can be stacked");
        }
        let len = caches.iter().map(KvCache::len).max().unwrap_or(0);
        let layers = |pick: &dyn Fn(&KvCache) -> &[LayerCache], pad: Option<usize>| {
            (0..pick(first).len())
                .map(|i| {
                    let column: Vec<&LayerCache> = caches.iter().map(|c| &pick(c)[i]).collect();
                    stack_layers(&column, pad)
                })
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let self_attn = layers(&|c| &c.self_attn, Some(len))?;
        let cross_attn = layers(&|c| &c.cross_attn, None)?;
        let valid = caches
            .iter()
            .flat_map(|c| {
                c.valid.iter().map(|row| {
                    let mut r = vec![false; len - row.len()];
                    r.extend_from_slice(row);
                    r
                })
            })
            .collect();
        let cross_rows = if caches.iter().all(|c| c.cross_rows.is_some()) {
            let (bias, rows): (Vec<&Tensor>, Vec<&Tensor>) = caches
                .iter()
                .filter_map(|c| c.cross_rows.as_ref().map(|(b, r)| (b, r)))
                .unzip();
            Some((Tensor::cat(&bias, 0)?, Tensor::cat(&rows, 0)?))
        } else if caches.iter().any(|c| c.cross_rows.is_some()) {
            candle_core::bail!("cannot batch prompts with and without an image");
        } else {
            None
        };
        Ok(KvCache {
            self_attn,
            cross_attn,
            valid,
            cross_rows,
        })
    }

    /// The cache of rows `keep` only (in that order), e.g. to drop finished sequences from a
    /// batch. Leading positions no kept row uses are dropped.
    pub fn select_rows(&self, keep: &[usize]) -> candle_core::Result<KvCache> {
        let n = self.valid.len();
        if let Some(&bad) = keep.iter().find(|&&r| r >= n) {
            candle_core::bail!("row {bad} of a cache holding {n} sequences");
        }
        let valid: Vec<Vec<bool>> = keep.iter().map(|&r| self.valid[r].clone()).collect();
        // Left padding shared by every kept row carries nothing: cut it.
        let skip = valid
            .iter()
            .map(|row| row.iter().take_while(|v| !**v).count())
            .min()
            .unwrap_or(0);
        let device = self
            .self_attn
            .iter()
            .chain(&self.cross_attn)
            .find_map(|l| l.kv.as_ref().map(|(k, _)| k.device().clone()));
        let Some(device) = device else {
            candle_core::bail!("cannot select rows of an empty cache");
        };
        let idx: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, keep.len(), &device)?;
        let trim = |l: LayerCache| -> candle_core::Result<LayerCache> {
            match l.kv {
                Some((k, v)) if skip > 0 => {
                    let s = k.dim(2)?;
                    Ok(LayerCache {
                        kv: Some((k.narrow(2, skip, s - skip)?, v.narrow(2, skip, s - skip)?)),
                    })
                }
                kv => Ok(LayerCache { kv }),
            }
        };
        let self_attn = self
            .self_attn
            .iter()
            .map(|l| trim(l.select(&idx)?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cross_attn = self
            .cross_attn
            .iter()
            .map(|l| l.select(&idx))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let cross_rows = match &self.cross_rows {
            Some((b, r)) => Some((b.index_select(&idx, 0)?, r.index_select(&idx, 0)?)),
            None => None,
        };
        Ok(KvCache {
            self_attn,
            cross_attn,
            valid: valid.into_iter().map(|r| r[skip..].to_vec()).collect(),
            cross_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// A one-layer cache holding `n` positions whose keys are `first..first + n` (values negated).
    fn cache_of(first: f32, n: usize) -> KvCache {
        let mut c = KvCache::new(1, 0);
        let k: Vec<f32> = (0..n).map(|i| first + i as f32).collect();
        let k = Tensor::from_vec(k, (1, 1, n, 1), &Device::Cpu).unwrap();
        let v = k.neg().unwrap();
        c.self_layer(0).append(k, v).unwrap();
        c.advance(1, n);
        c
    }

    fn keys(c: &KvCache) -> Vec<Vec<f32>> {
        let (k, _) = c.self_attn[0].kv.as_ref().unwrap();
        k.squeeze(3).unwrap().squeeze(1).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn stacking_left_pads_and_keeps_each_rows_positions() {
        let c = KvCache::stack(&[cache_of(10.0, 2), cache_of(20.0, 3)]).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.batch_size(), Some(2));
        assert!(c.is_padded());
        assert_eq!(
            keys(&c),
            vec![vec![0.0, 10.0, 11.0], vec![20.0, 21.0, 22.0]]
        );
        assert_eq!(
            c.key_valid(2, 1).unwrap(),
            vec![vec![false, true, true, true], vec![true; 4]]
        );
        // Each row continues from its own token count.
        assert_eq!(c.positions(2, 2).unwrap(), vec![2, 3, 3, 4]);
        assert!(c.positions(3, 1).is_err());

        // Keeping the shorter row alone drops the padding it no longer shares.
        let first = c.select_rows(&[0]).unwrap();
        assert_eq!(keys(&first), vec![vec![10.0, 11.0]]);
        assert!(!first.is_padded());
        assert_eq!(first.positions(1, 1).unwrap(), vec![2]);
        let both = c.select_rows(&[1, 0]).unwrap();
        assert_eq!(
            keys(&both),
            vec![vec![20.0, 21.0, 22.0], vec![0.0, 10.0, 11.0]]
        );
        assert!(c.select_rows(&[2]).is_err());
        assert!(KvCache::stack(&[cache_of(1.0, 1), KvCache::new(1, 0)]).is_err());
    }
}
