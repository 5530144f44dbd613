//! Row slices of a weight trained on their own (Mllama's 8 embedding rows past the vocabulary,
//! which the reference recipe trains with the fusion layers while the rest of the table stays
//! frozen): their own `Var`s, their names among trainable tensors, and their way back into the
//! whole weight (exports, overrides).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::WeightStore;
use crate::error::{Error, Result};

/// The name a trained row slice goes by among the trainable tensors (checkpoints, overrides):
/// `{weight}[{start}:{end}]`.
pub fn row_param_name(weight: &str, start: usize, end: usize) -> String {
    format!("{weight}[{start}:{end}]")
}

/// `(weight, start, end)` of a [`row_param_name`].
pub fn parse_row_param(name: &str) -> Option<(&str, usize, usize)> {
    let (weight, rest) = name.strip_suffix(']')?.rsplit_once('[')?;
    let (a, b) = rest.split_once(':')?;
    let (start, end) = (a.parse().ok()?, b.parse().ok()?);
    (start < end).then_some((weight, start, end))
}

/// `base` with rows `start..start + rows.dim(0)` replaced by `rows` (cast to `base`'s dtype).
fn replace_rows(base: &Tensor, start: usize, rows: &Tensor) -> Result<Tensor> {
    let total = base.dim(0)?;
    let end = start + rows.dim(0)?;
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(base.narrow(0, 0, start)?);
    }
    parts.push(rows.to_dtype(base.dtype())?.to_device(base.device())?);
    if end < total {
        parts.push(base.narrow(0, end, total - end)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

impl WeightStore {
    /// Train rows `start..end` of these weights (as `Var`s of their own, see
    /// [`WeightStore::get_with_rows`]) while the rest of each weight stays frozen.
    pub fn with_trainable_rows(mut self, rows: Vec<(String, usize, usize)>) -> Self {
        self.trainable_rows = rows;
        self
    }

    /// Load a weight whose rows may train apart from it: the weight (frozen unless it trains
    /// whole) and, when a row slice of it trains, `(start, var)` with the slice's rows.
    pub fn get_with_rows(
        &self,
        name: &str,
        shape: &[usize],
    ) -> Result<(Tensor, Option<(usize, Var)>)> {
        let t = self.get(name, shape)?;
        let slice = self
            .trainable_rows
            .iter()
            .find(|(w, _, _)| w == name)
            .filter(|_| !self.is_trainable(name));
        let Some((_, start, end)) = slice else {
            return Ok((t, None));
        };
        if *end > shape[0] {
            return Err(Error::Weights(format!(
                "rows {start}..{end} of `{name}` are past its {} rows",
                shape[0]
            )));
        }
        let dtype = if self.dtype == DType::F64 {
            DType::F64
        } else {
            self.trainable_dtype
        };
        let var = Var::from_tensor(&t.narrow(0, *start, end - start)?.to_dtype(dtype)?)?;
        self.vars
            .lock()
            .expect("poisoned")
            .push((row_param_name(name, *start, *end), var.clone()));
        Ok((t, Some((*start, var))))
    }

    /// The weights whose trained row slices replace their rows, assembled (canonical name →
    /// whole weight): what a stage exports for them.
    pub fn assembled_row_weights(&self) -> Result<HashMap<String, Tensor>> {
        let vars = self.vars.lock().expect("poisoned");
        let frozen = self.frozen.lock().expect("poisoned");
        let mut out = HashMap::new();
        for (name, var) in vars.iter() {
            let Some((weight, start, end)) = parse_row_param(name) else {
                continue;
            };
            let Some((_, base)) = frozen.iter().find(|(n, _)| n == weight) else {
                continue;
            };
            debug_assert_eq!(var.dim(0).ok(), Some(end - start));
            // The trained rows keep the trainable dtype (f32), as whole trained weights do.
            let base = base.to_dtype(var.dtype())?;
            out.insert(
                weight.to_string(),
                replace_rows(&base, start, &var.as_tensor().detach())?,
            );
        }
        Ok(out)
    }

    /// Fold overrides of row slices (`{weight}[{start}:{end}]`, as checkpoints hold them) into
    /// whole-weight overrides of the stored (or already overridden) weight.
    pub(super) fn fold_row_overrides(
        &self,
        overrides: HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        let mut overrides = overrides;
        let row_keys: Vec<String> = overrides
            .keys()
            .filter(|k| parse_row_param(k).is_some())
            .cloned()
            .collect();
        for key in row_keys {
            let (Some(rows), Some((weight, start, end))) =
                (overrides.remove(&key), parse_row_param(&key))
            else {
                continue;
            };
            let base = match overrides.get(weight) {
                Some(t) => t.clone(),
                None => {
                    let stored = self.keys.get(weight).ok_or_else(|| {
                        Error::Weights(format!(
                            "override `{key}` names rows of `{weight}`, not a weight of {}",
                            self.dir.display()
                        ))
                    })?;
                    self.files
                        .load(stored, &self.device)
                        .map_err(|e| Error::Weights(format!("cannot load `{stored}`: {e}")))?
                }
            };
            let total = base.dim(0)?;
            if end > total || rows.dims().first() != Some(&(end - start)) {
                return Err(Error::Weights(format!(
                    "override `{key}` has shape {:?}, which does not fit rows {start}..{end} of \
                     `{weight}` {:?}",
                    rows.dims(),
                    base.dims()
                )));
            }
            overrides.insert(weight.to_string(), replace_rows(&base, start, &rows)?);
        }
        Ok(overrides)
    }
}
