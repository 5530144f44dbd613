//! The generation cache, family-neutral: keys and values of every self-attention layer for the
//! positions seen so far, and of every cross-attention layer for the images (computed once, at
//! prefill, and reused by every generated token).

use candle_core::Tensor;

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
}

/// One cache per generated sequence (batch): self- and cross-attention layers and the number of
/// cached positions.
#[derive(Debug, Clone)]
pub struct KvCache {
    self_attn: Vec<LayerCache>,
    cross_attn: Vec<LayerCache>,
    len: usize,
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
            len: 0,
            cross_rows: None,
        }
    }

    /// Positions already cached (the offset of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// Record that `s` more positions went through every self-attention layer.
    pub fn advance(&mut self, s: usize) {
        self.len += s;
    }
}
