//! The human-readable `report.md` written beside `results.json`.

use crate::results::RunResults;
use crate::sparsity::LayerStats;

/// A human-readable Markdown report of a run: headline (metric dense → pruned, remaining %, compression ×), per-layer table (params, non-zero, remaining %, compression ×), sizes table (dense / pruned safetensors, gzip -9, bzip2 -9, sparse format, with × vs dense), the rounds table, wall time, and the configuration as a JSON code block. `plot_file` (relative path) is linked as an image when given.
pub fn render_markdown(r: &RunResults, plot_file: Option<&str>) -> String {
    let mut md: Vec<String> = Vec::new();
    md.push(format!("# Run `{}`", r.experiment));
    md.push(String::new());
    md.push(headline(r));
    md.push(String::new());
    md.push(format!(
        "Dataset **{}**: train {} / valid {} / test {} examples. Pruned model: `{}`. \
         Wall time: {}.",
        escape(&r.dataset.name),
        thousands(r.dataset.train as u64),
        thousands(r.dataset.valid as u64),
        thousands(r.dataset.test as u64),
        r.model_file,
        wall_time(r.wall_seconds),
    ));
    md.push(String::new());
    if let Some(plot) = plot_file {
        md.push(format!("![{} vs remaining weights]({plot})", r.metric));
        md.push(String::new());
    }
    layers_section(r, &mut md);
    sizes_section(r, &mut md);
    rounds_section(r, &mut md);
    if !r.extra.is_empty() {
        md.push("## Extra".into());
        md.push(String::new());
        json_block(&serde_json::Value::Object(r.extra.clone()), &mut md);
    }
    md.push("## Configuration".into());
    md.push(String::new());
    json_block(&r.config, &mut md);
    md.join("\n")
}

/// Metric dense → pruned with its change, remaining % and compression.
fn headline(r: &RunResults) -> String {
    let (dense, pruned) = (r.dense.value, r.pruned.value);
    let direction = if r.higher_is_better {
        "higher is better"
    } else {
        "lower is better"
    };
    format!(
        "**{}** ({direction}): dense **{}** → pruned **{}** ({}) · remaining **{}** of {} \
         prunable weights ({} non-zero) · compression **{}**",
        r.metric,
        metric(dense),
        metric(pruned),
        signed(pruned - dense, dense.abs().max(pruned.abs())),
        pct(r.pruned.remaining_pct),
        thousands(r.pruned.params as u64),
        thousands(r.pruned.nonzero as u64),
        times(r.pruned.compression),
    )
}

/// Per-layer counts with a bold total row.
fn layers_section(r: &RunResults, md: &mut Vec<String>) {
    md.push("## Layers".into());
    md.push(String::new());
    md.push("| Layer | Params | Non-zero | Remaining % | Sparsity % | Compression × |".into());
    md.push("|---|---:|---:|---:|---:|---:|".into());
    let row = |l: &LayerStats, bold: bool| {
        let b = if bold { "**" } else { "" };
        format!(
            "| {b}{}{b} | {b}{}{b} | {b}{}{b} | {b}{}{b} | {b}{}{b} | {b}{}{b} |",
            escape(&l.name),
            thousands(l.params as u64),
            thousands(l.nonzero as u64),
            pct(l.remaining_pct()),
            pct(l.sparsity_pct()),
            times(l.compression()),
        )
    };
    for l in &r.layers {
        md.push(row(l, false));
    }
    let total = LayerStats {
        name: "total".into(),
        params: r.layers.iter().map(|l| l.params).sum(),
        nonzero: r.layers.iter().map(|l| l.nonzero).sum(),
    };
    md.push(row(&total, true));
    md.push(String::new());
    if !r.layer_groups.is_empty() {
        md.push("## By layer type".into());
        md.push(String::new());
        md.push("| Type | Params | Non-zero | Remaining % | Sparsity % | Compression × |".into());
        md.push("|---|---:|---:|---:|---:|---:|".into());
        for g in &r.layer_groups {
            md.push(row(g, false));
        }
        md.push(String::new());
    }
}

/// File sizes with their ratio to the dense safetensors file.
fn sizes_section(r: &RunResults, md: &mut Vec<String>) {
    let s = &r.sizes_bytes;
    md.push("## Model size".into());
    md.push(String::new());
    md.push("| File | Bytes | Size | × vs dense |".into());
    md.push("|---|---:|---:|---:|".into());
    for (label, bytes) in [
        ("dense safetensors", s.dense_safetensors),
        ("pruned safetensors", s.pruned_safetensors),
        ("pruned, gzip -9", s.pruned_gzip),
        ("pruned, bzip2 -9", s.pruned_bzip2),
        ("sparse format", s.sparse_format),
    ] {
        let ratio = if bytes == 0 {
            "n/a".to_string()
        } else {
            times(s.dense_safetensors as f64 / bytes as f64)
        };
        md.push(format!(
            "| {label} | {} | {} | {ratio} |",
            thousands(bytes),
            human_bytes(bytes)
        ));
    }
    md.push(String::new());
}

/// The metric-vs-sparsity curve as a table.
fn rounds_section(r: &RunResults, md: &mut Vec<String>) {
    md.push("## Pruning rounds".into());
    md.push(String::new());
    if r.rounds.is_empty() {
        md.push("_No pruning rounds recorded._".into());
        md.push(String::new());
        return;
    }
    md.push(format!(
        "| Round | Epoch | Threshold | Remaining % | Val loss | Val {} |",
        r.metric
    ));
    md.push("|---:|---:|---:|---:|---:|---:|".into());
    for x in &r.rounds {
        md.push(format!(
            "| {} | {} | {} | {} | {} | {} |",
            x.round,
            x.epoch,
            sci(x.threshold),
            pct(x.remaining_pct),
            sci(x.val_loss),
            metric(x.val_metric),
        ));
    }
    md.push(String::new());
}

/// A pretty-printed JSON code block.
fn json_block(v: &serde_json::Value, md: &mut Vec<String>) {
    // Serializing a Value cannot fail (its map keys are strings); fall back to compact form anyway.
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    md.push("```json".into());
    md.push(text);
    md.push("```".into());
    md.push(String::new());
}

/// Decimals for a metric of this magnitude: two for error % / BLEU, four below 1 (similarities).
fn metric_decimals(v: f64) -> usize {
    if v.abs() >= 1.0 || v == 0.0 {
        2
    } else {
        4
    }
}

/// A metric value.
fn metric(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    format!("{v:.*}", metric_decimals(v))
}

/// A signed metric change, with as many decimals as the values it compares.
fn signed(delta: f64, scale: f64) -> String {
    if !delta.is_finite() {
        return "n/a".into();
    }
    format!("{delta:+.*}", metric_decimals(scale))
}

/// A percentage; small values keep more decimals so 0.05% does not print as 0.0%.
fn pct(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v != 0.0 && v.abs() < 0.1 {
        format!("{v:.3}%")
    } else {
        format!("{v:.2}%")
    }
}

/// A ratio such as a compression factor.
fn times(v: f64) -> String {
    if v.is_infinite() && v > 0.0 {
        "∞×".into()
    } else if !v.is_finite() {
        "n/a".into()
    } else {
        format!("{v:.1}×")
    }
}

/// A value of unknown magnitude (thresholds, losses).
fn sci(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v == 0.0 || (1e-3..1e4).contains(&v.abs()) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// An integer with thousands separators.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    // The leading group has 1–3 digits, every following group exactly 3.
    let first = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        r => r,
    };
    let (head, mut rest) = digits.split_at(first);
    let mut out = head.to_string();
    while !rest.is_empty() {
        let (group, tail) = rest.split_at(3.min(rest.len()));
        out.push(',');
        out.push_str(group);
        rest = tail;
    }
    out
}

/// Bytes in binary units.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.2} {unit}")
}

/// Seconds, and h:mm:ss when that helps.
fn wall_time(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "n/a".into();
    }
    let whole = s.round() as u64;
    format!(
        "{s:.1} s ({}:{:02}:{:02})",
        whole / 3600,
        whole / 60 % 60,
        whole % 60
    )
}

/// Keeps a table cell from breaking the Markdown table.
fn escape(s: &str) -> String {
    s.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::sample;

    #[test]
    fn report_has_headline_layer_rows_and_numbers() {
        let md = render_markdown(&sample(), Some("curve.svg"));
        assert!(md.contains("# Run `lenet300-mnist`"), "{md}");
        assert!(
            md.contains("dense **1.62** → pruned **1.87** (+0.25)"),
            "{md}"
        );
        // 3754 of 266200 → 1.41 %, 70.9×.
        assert!(md.contains("remaining **1.41%** of 266,200"), "{md}");
        assert!(md.contains("compression **70.9×**"), "{md}");
        assert!(
            md.contains("| fc1.weight | 235,200 | 2,258 | 0.96% | 99.04% | 104.2× |"),
            "{md}"
        );
        assert!(
            md.contains("| fc2.weight | 30,000 | 1,200 | 4.00% | 96.00% | 25.0× |"),
            "{md}"
        );
        assert!(
            md.contains("| fc3.weight | 1,000 | 296 | 29.60% | 70.40% | 3.4× |"),
            "{md}"
        );
        assert!(
            md.contains("| **total** | **266,200** | **3,754** |"),
            "{md}"
        );
        assert!(
            md.contains("![top1_error_pct vs remaining weights](curve.svg)"),
            "{md}"
        );
    }

    #[test]
    fn layer_groups_get_their_own_table_only_when_given() {
        let mut r = sample();
        assert!(!render_markdown(&r, None).contains("## By layer type"));
        r.layer_groups = vec![LayerStats {
            name: "attention".into(),
            params: 393_216,
            nonzero: 78_643,
        }];
        let md = render_markdown(&r, None);
        assert!(md.contains("## By layer type"), "{md}");
        assert!(
            md.contains("| attention | 393,216 | 78,643 | 20.00% | 80.00% | 5.0× |"),
            "{md}"
        );
        // A JSON without the field (older runs) still reads, and an empty list is not written.
        let json = serde_json::to_string(&sample()).unwrap();
        assert!(!json.contains("layer_groups"));
        let back: RunResults = serde_json::from_str(&json).unwrap();
        assert!(back.layer_groups.is_empty());
    }

    #[test]
    fn report_has_sizes_rounds_wall_time_and_config() {
        let md = render_markdown(&sample(), None);
        assert!(
            md.contains("| dense safetensors | 1,066,896 | 1.02 MiB | 1.0× |"),
            "{md}"
        );
        assert!(
            md.contains("| pruned, gzip -9 | 51,234 | 50.03 KiB | 20.8× |"),
            "{md}"
        );
        assert!(md.contains("| pruned, bzip2 -9 | 40,321 |"), "{md}");
        assert!(md.contains("| sparse format | 30,210 |"), "{md}");
        assert!(
            md.contains("| 2 | 9 | 0.0300 | 9.50% | 0.0720 | 1.80 |"),
            "{md}"
        );
        assert!(md.contains("276.5 s (0:04:37)"), "{md}");
        assert!(md.contains("## Configuration\n\n```json\n{"), "{md}");
        assert!(md.contains("\"gate\": \"hard\""), "{md}");
        assert!(!md.contains("!["), "{md}");
    }

    #[test]
    fn report_handles_full_pruning_and_no_rounds() {
        let mut r = sample();
        r.rounds.clear();
        r.pruned.compression = f64::INFINITY;
        r.sizes_bytes.sparse_format = 0;
        let md = render_markdown(&r, None);
        assert!(md.contains("∞×"), "{md}");
        assert!(md.contains("_No pruning rounds recorded._"), "{md}");
        assert!(md.contains("| sparse format | 0 | 0 B | n/a |"), "{md}");
    }

    #[test]
    fn number_helpers_format_as_documented() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(100000), "100,000");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(pct(0.05), "0.050%");
        assert_eq!(metric(0.98765), "0.9877");
        assert_eq!(sci(1e-6), "1.000e-6");
        assert_eq!(signed(0.25, 1.87), "+0.25");
        assert_eq!(signed(-0.0012, 0.95), "-0.0012");
    }
}
