//! The `results.json` every reproduction run writes (METHOD.md, section "results.json").
//!
//! Field names and units are exactly those of METHOD.md; other tools parse this file. JSON has no
//! infinities or NaN: serde_json writes them as `null`, so the float fields that can legitimately
//! be non-finite (a fully pruned model has infinite compression; a diverged round has a NaN loss)
//! read `null` back as `INFINITY` / `NaN` instead of failing.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::sparsity::LayerStats;

/// Reads a float that may have been written as `null` (a non-finite value) as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Reads a ratio that may have been written as `null` (nothing left, x/0) as infinity.
fn inf_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

/// The dataset and its split sizes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatasetInfo {
    /// Dataset name, e.g. `mnist`.
    pub name: String,
    /// Training examples.
    pub train: usize,
    /// Validation examples.
    pub valid: usize,
    /// Test examples.
    pub test: usize,
}

/// A metric value on the test split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricValue {
    /// The metric, in the run's unit (e.g. percent for `top1_error_pct`).
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
}

/// The pruned model: its metric and its prunable-parameter counts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PrunedSummary {
    /// Test metric of the pruned model.
    #[serde(deserialize_with = "nan_if_null")]
    pub value: f64,
    /// Prunable parameters in total.
    pub params: usize,
    /// Non-zero prunable parameters.
    pub nonzero: usize,
    /// 100 · nonzero / params.
    #[serde(deserialize_with = "nan_if_null")]
    pub remaining_pct: f64,
    /// params / nonzero (×).
    #[serde(deserialize_with = "inf_if_null")]
    pub compression: f64,
}

impl PrunedSummary {
    /// Builds the summary from the metric and the total of a sparsity report.
    pub fn new(value: f64, total: &LayerStats) -> Self {
        Self {
            value,
            params: total.params,
            nonzero: total.nonzero,
            remaining_pct: total.remaining_pct(),
            compression: total.compression(),
        }
    }
}

/// Model file sizes, in bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SizesBytes {
    /// The dense model's safetensors file.
    pub dense_safetensors: u64,
    /// The pruned model's safetensors file (same size: zeros are stored).
    pub pruned_safetensors: u64,
    /// gzip -9 of the pruned safetensors file.
    pub pruned_gzip: u64,
    /// bzip2 -9 of the pruned safetensors file.
    pub pruned_bzip2: u64,
    /// The compact sparse format of the pruned model.
    pub sparse_format: u64,
}

/// One pruning round, for the metric-vs-sparsity curve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RoundRecord {
    /// Round number, from 1.
    pub round: usize,
    /// Training epoch at which the round pruned.
    pub epoch: usize,
    /// Magnitude threshold used.
    #[serde(deserialize_with = "nan_if_null")]
    pub threshold: f64,
    /// Percentage of prunable weights left after the round.
    #[serde(deserialize_with = "nan_if_null")]
    pub remaining_pct: f64,
    /// Validation loss after the round.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_loss: f64,
    /// Validation metric after the round.
    #[serde(deserialize_with = "nan_if_null")]
    pub val_metric: f64,
}

/// Everything a run reports; serialized as `results.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunResults {
    /// The experiment name given to `cargo xtask reproduce`.
    pub experiment: String,
    /// Dataset and split sizes.
    pub dataset: DatasetInfo,
    /// Metric name, e.g. `top1_error_pct` or `bleu`.
    pub metric: String,
    /// Whether a larger metric is better (BLEU) or worse (error).
    pub higher_is_better: bool,
    /// Metric of the unpruned model on the test split.
    pub dense: MetricValue,
    /// Metric and counts of the pruned model.
    pub pruned: PrunedSummary,
    /// Per prunable tensor counts.
    pub layers: Vec<LayerStats>,
    /// Counts summed over groups of tensors (e.g. attention, feed-forward, embeddings), for runs
    /// that report by layer type; each entry's `name` is the group's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_groups: Vec<LayerStats>,
    /// File sizes in bytes.
    pub sizes_bytes: SizesBytes,
    /// The pruned model file, relative to results.json.
    pub model_file: String,
    /// Wall-clock time of the run in seconds.
    #[serde(deserialize_with = "nan_if_null")]
    pub wall_seconds: f64,
    /// Everything needed to repeat the run.
    pub config: serde_json::Value,
    /// The pruning rounds, for the metric-vs-sparsity curve.
    #[serde(default)]
    pub rounds: Vec<RoundRecord>,
    /// Free-form extras (e.g. pruned-before-finetune metric, dense sizes).
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl RunResults {
    /// The pretty JSON text of `results.json` (`path` names the file in errors).
    pub fn to_json(&self, path: &Path) -> Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// Reads a results.json.
    pub fn read_json(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A realistic RunResults, shared with the report tests.
    pub(crate) fn sample() -> RunResults {
        let layers = vec![
            LayerStats {
                name: "fc1.weight".into(),
                params: 235200,
                nonzero: 2258,
            },
            LayerStats {
                name: "fc2.weight".into(),
                params: 30000,
                nonzero: 1200,
            },
            LayerStats {
                name: "fc3.weight".into(),
                params: 1000,
                nonzero: 296,
            },
        ];
        let total = crate::sparsity::SparsityReport {
            layers: layers.clone(),
        }
        .total();
        RunResults {
            experiment: "lenet300-mnist".into(),
            dataset: DatasetInfo {
                name: "mnist".into(),
                train: 55000,
                valid: 5000,
                test: 10000,
            },
            metric: "top1_error_pct".into(),
            higher_is_better: false,
            dense: MetricValue { value: 1.62 },
            pruned: PrunedSummary::new(1.87, &total),
            layers,
            layer_groups: Vec::new(),
            sizes_bytes: SizesBytes {
                dense_safetensors: 1066896,
                pruned_safetensors: 1066896,
                pruned_gzip: 51234,
                pruned_bzip2: 40321,
                sparse_format: 30210,
            },
            model_file: "model.safetensors".into(),
            wall_seconds: 276.5,
            config: serde_json::json!({"lr": 0.01, "twt": 0.05, "gate": "hard"}),
            rounds: vec![
                RoundRecord {
                    round: 1,
                    epoch: 4,
                    threshold: 0.01,
                    remaining_pct: 40.0,
                    val_loss: 0.07,
                    val_metric: 1.7,
                },
                RoundRecord {
                    round: 2,
                    epoch: 9,
                    threshold: 0.03,
                    remaining_pct: 9.5,
                    val_loss: 0.072,
                    val_metric: 1.8,
                },
            ],
            extra: serde_json::Map::new(),
        }
    }

    #[test]
    fn json_round_trip_preserves_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        let mut r = sample();
        r.extra.insert(
            "pruned_before_finetune".into(),
            serde_json::json!({"value": 1.9}),
        );
        std::fs::write(&path, r.to_json(&path).unwrap()).unwrap();
        assert_eq!(RunResults::read_json(&path).unwrap(), r);
    }

    #[test]
    fn json_has_exactly_the_method_md_top_level_keys() {
        let v = serde_json::to_value(sample()).unwrap();
        let obj = v.as_object().unwrap();
        for key in [
            "experiment",
            "dataset",
            "metric",
            "higher_is_better",
            "dense",
            "pruned",
            "layers",
            "sizes_bytes",
            "model_file",
            "wall_seconds",
            "config",
        ] {
            assert!(obj.contains_key(key), "missing {key}");
        }
        assert_eq!(
            obj["dataset"],
            serde_json::json!({"name": "mnist", "train": 55000, "valid": 5000, "test": 10000})
        );
        let pruned = obj["pruned"].as_object().unwrap();
        let mut keys: Vec<_> = pruned.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["compression", "nonzero", "params", "remaining_pct", "value"]
        );
        assert_eq!(
            obj["layers"][0],
            serde_json::json!({"name": "fc1.weight", "params": 235200, "nonzero": 2258})
        );
        let sizes = obj["sizes_bytes"].as_object().unwrap();
        let mut keys: Vec<_> = sizes.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "dense_safetensors",
                "pruned_bzip2",
                "pruned_gzip",
                "pruned_safetensors",
                "sparse_format"
            ]
        );
        assert_eq!(obj["dense"], serde_json::json!({"value": 1.62}));
    }

    #[test]
    fn json_without_rounds_or_extra_still_parses() {
        let mut v = serde_json::to_value(sample()).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("rounds");
        obj.remove("extra");
        let r: RunResults = serde_json::from_value(v).unwrap();
        assert!(r.rounds.is_empty() && r.extra.is_empty());
    }

    #[test]
    fn infinite_compression_survives_the_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        let mut r = sample();
        r.pruned.compression = f64::INFINITY;
        r.pruned.nonzero = 0;
        std::fs::write(&path, r.to_json(&path).unwrap()).unwrap();
        let back = RunResults::read_json(&path).unwrap();
        assert_eq!(back.pruned.compression, f64::INFINITY);
    }

    #[test]
    fn read_json_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.json");
        std::fs::write(&path, b"{\"experiment\": 3").unwrap();
        let err = RunResults::read_json(&path).unwrap_err();
        assert!(matches!(err, Error::Json { .. }));
        assert!(err.to_string().contains("broken.json"), "{err}");
        let err = RunResults::read_json(&dir.path().join("absent.json")).unwrap_err();
        assert!(err.to_string().contains("absent.json"), "{err}");
    }
}
