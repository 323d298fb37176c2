//! Persistent pruning masks: 1 keeps a weight, 0 removes it for good.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Tensor};

use crate::{Error, ParamSet, Result};

/// One 0/1 mask (f32, the parameter's shape and device) per prunable parameter.
#[derive(Clone, Debug)]
pub struct Masks {
    masks: BTreeMap<String, Tensor>,
    // Names whose mask is all ones: the optimizer skips masking them (a pass per step saved).
    full: BTreeSet<String>,
}

impl Masks {
    /// All-ones masks for every prunable parameter of `params`.
    pub fn dense(params: &ParamSet) -> Result<Self> {
        let mut masks = BTreeMap::new();
        for p in params.prunable() {
            let t = p.var.as_tensor();
            masks.insert(
                p.name.clone(),
                Tensor::ones(t.shape(), DType::F32, t.device())?,
            );
        }
        let full = masks.keys().cloned().collect();
        Ok(Self { masks, full })
    }

    /// Masks that keep exactly the non-zero weights of `params` (e.g. of a loaded pruned model).
    pub fn from_nonzero(params: &ParamSet) -> Result<Self> {
        let mut masks = BTreeMap::new();
        for p in params.prunable() {
            let t = p.var.as_tensor();
            masks.insert(p.name.clone(), t.ne(0.0)?.to_dtype(DType::F32)?);
        }
        let mut m = Self {
            masks,
            full: BTreeSet::new(),
        };
        m.refresh_full()?;
        Ok(m)
    }

    /// Masks from saved tensors by parameter name (e.g. read back from a checkpoint); every
    /// value must be 0 or 1 (the optimizers' fused passes mask with them, and may apply a mask
    /// twice).
    pub fn from_tensors(masks: BTreeMap<String, Tensor>) -> Result<Self> {
        for (name, t) in &masks {
            let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if let Some(complaint) = not_binary(name, values) {
                return Err(Error::Config(complaint));
            }
        }
        let mut m = Self {
            masks,
            full: BTreeSet::new(),
        };
        m.refresh_full()?;
        Ok(m)
    }

    /// The mask of a parameter, if it is prunable.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.masks.get(name)
    }

    /// The mask of a parameter if it prunes anything (`None` for all-ones or unmasked parameters).
    pub fn get_partial(&self, name: &str) -> Option<&Tensor> {
        if self.full.contains(name) {
            None
        } else {
            self.masks.get(name)
        }
    }

    /// The masks by parameter name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.masks.iter()
    }

    /// Zeroes the masked-out weights: `w ← w ⊙ mask`.
    pub fn apply(&self, params: &ParamSet) -> Result<()> {
        for p in params.prunable() {
            let m = self.mask_of(&p.name)?;
            p.var.set(&(p.var.as_tensor() * m)?)?;
        }
        Ok(())
    }

    /// Removes every alive weight with `|w| < threshold` (global threshold) and zeroes it.
    pub fn prune_below(&mut self, params: &ParamSet, threshold: f64) -> Result<()> {
        for p in params.prunable() {
            let m = self.mask_of(&p.name)?;
            let keep = p
                .var
                .as_tensor()
                .abs()?
                .ge(threshold)?
                .to_dtype(DType::F32)?;
            let m = (m * keep)?;
            p.var.set(&(p.var.as_tensor() * &m)?)?;
            self.masks.insert(p.name.clone(), m);
        }
        self.refresh_full()
    }

    fn refresh_full(&mut self) -> Result<()> {
        self.full.clear();
        for (name, total, alive) in self.alive_counts()? {
            if alive == total {
                self.full.insert(name);
            }
        }
        Ok(())
    }

    /// Prunes the smallest alive magnitudes until exactly `round(sparsity·n)` elements are pruned,
    /// over all prunable parameters together (`per_layer = false`) or in each one (`true`).
    ///
    /// Already pruned elements count towards the target; ties at the cut are broken by position,
    /// so the count is exact. Fails if the target is below what is already pruned.
    pub fn prune_to_sparsity(
        &mut self,
        params: &ParamSet,
        sparsity: f64,
        per_layer: bool,
    ) -> Result<()> {
        self.prune_by_scores(params, None, sparsity, per_layer)
    }

    /// Brings every prunable parameter to at least `sparsity` on its own: in each one with fewer
    /// than `round(sparsity·n)` of its `n` elements pruned, prunes its smallest alive magnitudes
    /// up to that count; sparser ones are left as they are. Returns how many weights it pruned.
    pub fn prune_each_to_at_least(&mut self, params: &ParamSet, sparsity: f64) -> Result<usize> {
        let before = self.totals()?.1;
        self.prune_ranked(params, None, sparsity, true, Landing::AtLeast)?;
        Ok(before - self.totals()?.1)
    }

    /// Like [`Masks::prune_to_sparsity`], ranking by `scores` (by parameter name, the
    /// parameter's shape; e.g. SNIP's `|w·g|`) instead of `|w|`.
    pub fn prune_by_scores(
        &mut self,
        params: &ParamSet,
        scores: Option<&BTreeMap<String, Tensor>>,
        sparsity: f64,
        per_layer: bool,
    ) -> Result<()> {
        self.prune_ranked(params, scores, sparsity, per_layer, Landing::Exact)
    }

    fn prune_ranked(
        &mut self,
        params: &ParamSet,
        scores: Option<&BTreeMap<String, Tensor>>,
        sparsity: f64,
        per_layer: bool,
        landing: Landing,
    ) -> Result<()> {
        if !(0.0..=1.0).contains(&sparsity) {
            return Err(Error::Config(format!(
                "sparsity must be in [0, 1], got {sparsity}"
            )));
        }
        // (|w| or -1 for pruned, layer index, element index): pruned elements sort first.
        let mut layers: Vec<(String, Vec<f32>, Vec<f32>)> = Vec::new();
        for p in params.prunable() {
            let m = self.mask_of(&p.name)?.flatten_all()?.to_vec1::<f32>()?;
            let score = match scores {
                Some(sc) => sc.get(&p.name).cloned().ok_or_else(|| Error::Param {
                    name: p.name.clone(),
                    msg: "no pruning score".into(),
                })?,
                None => p.var.as_tensor().clone(),
            };
            let a = score
                .abs()?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            layers.push((p.name.clone(), a, m));
        }
        let groups: Vec<Vec<usize>> = if per_layer {
            (0..layers.len()).map(|i| vec![i]).collect()
        } else {
            vec![(0..layers.len()).collect()]
        };
        for group in groups {
            let mut keys: Vec<(f32, usize, usize)> = Vec::new();
            for &l in &group {
                let (_, a, m) = &layers[l];
                keys.extend(
                    a.iter()
                        .zip(m)
                        .enumerate()
                        .map(|(i, (&a, &m))| (if m == 0.0 { -1.0 } else { a }, l, i)),
                );
            }
            let n = keys.len();
            let target = target_count(sparsity, n);
            let already = keys.iter().filter(|k| k.0 < 0.0).count();
            if target < already && landing == Landing::AtLeast {
                continue;
            }
            if target < already {
                return Err(Error::Config(format!(
                    "target sparsity {sparsity} is below the {:.4} already pruned",
                    already as f64 / n.max(1) as f64
                )));
            }
            if target > 0 {
                keys.select_nth_unstable_by(target - 1, |x, y| {
                    x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2)))
                });
                for &(_, l, i) in &keys[..target] {
                    layers[l].2[i] = 0.0;
                }
            }
        }
        for (p, (name, _, m)) in params.prunable().zip(layers) {
            let t = Tensor::from_vec(m, p.var.as_tensor().shape(), p.var.device())?;
            p.var.set(&(p.var.as_tensor() * &t)?)?;
            self.masks.insert(name, t);
        }
        self.refresh_full()
    }

    /// Removes every alive weight below its own layer's threshold (`thresholds` by parameter name;
    /// a layer without one is left alone).
    pub fn prune_below_per_layer(
        &mut self,
        params: &ParamSet,
        thresholds: &BTreeMap<String, f64>,
    ) -> Result<()> {
        for p in params.prunable() {
            let Some(&t) = thresholds.get(&p.name) else {
                continue;
            };
            let m = self.mask_of(&p.name)?;
            let keep = p.var.as_tensor().abs()?.ge(t)?.to_dtype(DType::F32)?;
            let m = (m * keep)?;
            p.var.set(&(p.var.as_tensor() * &m)?)?;
            self.masks.insert(p.name.clone(), m);
        }
        self.refresh_full()
    }

    /// Number of alive (unpruned) elements per parameter, in name order.
    pub fn alive_counts(&self) -> Result<Vec<(String, usize, usize)>> {
        let mut out = Vec::with_capacity(self.masks.len());
        for (name, m) in &self.masks {
            let alive = m.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? as usize;
            out.push((name.clone(), m.elem_count(), alive));
        }
        Ok(out)
    }

    /// Total number of elements under masks, and how many are alive.
    pub fn totals(&self) -> Result<(usize, usize)> {
        let c = self.alive_counts()?;
        Ok((c.iter().map(|x| x.1).sum(), c.iter().map(|x| x.2).sum()))
    }

    /// How many elements are pruned against how many [`Masks::prune_to_sparsity`] prunes for
    /// `sparsity` (`round(sparsity · total)`): compared as counts, since the fractions of an
    /// exact landing can differ in the last bit.
    pub fn pruned_vs_target(&self, sparsity: f64) -> Result<(usize, usize)> {
        let (total, alive) = self.totals()?;
        Ok((total - alive, target_count(sparsity, total)))
    }

    /// Fraction of the masked elements still alive, in `[0, 1]`.
    pub fn remaining_fraction(&self) -> Result<f64> {
        let (total, alive) = self.totals()?;
        Ok(if total == 0 {
            1.0
        } else {
            alive as f64 / total as f64
        })
    }

    /// The mask of prunable parameter `name`; an error naming it if there is none.
    pub fn mask_of(&self, name: &str) -> Result<&Tensor> {
        self.masks.get(name).ok_or_else(|| Error::Param {
            name: name.to_string(),
            msg: "prunable but has no mask".into(),
        })
    }
}

/// How many of `n` elements a sparsity of `sparsity` prunes: the one rounding rule for pruning to
/// a target and for checking that it was reached.
fn target_count(sparsity: f64, n: usize) -> usize {
    (sparsity * n as f64).round() as usize
}

/// Whether a group already sparser than the target is an error or left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Landing {
    /// Exactly the target: fewer alive than the target is a configuration error.
    Exact,
    /// At least the target.
    AtLeast,
}

/// What is wrong with the mask of `param` holding `values`, if anything but 0 and 1 is there.
pub(crate) fn not_binary(param: &str, values: impl IntoIterator<Item = f64>) -> Option<String> {
    let v = values.into_iter().find(|&v| v != 0.0 && v != 1.0)?;
    Some(format!("mask `{param}` holds {v}: masks hold only 0 and 1"))
}
