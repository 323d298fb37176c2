//! `cargo xtask llm-baselines`: the one-shot baselines on a decoder LM (SmolLM2-135M by
//! default) with the anchors' calibration windows, each row's validation perplexity beside the
//! anchor figure measured by the PyTorch reference implementations, written as `llm.json` and
//! `llm.md`. Rows already in `llm.json` are kept (a rerun resumes).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use relprune_data::text::TextTokenizer;
use relprune_hf::llm::{self, Distill, Method, Pattern};
use relprune_models::hf::gguf;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::flags;

/// One measured row.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Row {
    method: String,
    pattern: String,
    linear_sparsity: f64,
    ppl_valid: f64,
    anchor_ppl_valid: Option<f64>,
    prune_seconds: f64,
    calibration_tokens: usize,
    peak_rss_mb: Option<f64>,
}

/// A pattern as the anchors name it (`unstructured 50%`, `2:4`).
fn anchor_label(p: Pattern, sparsity: f64) -> String {
    match p {
        Pattern::Unstructured => format!("unstructured {:.0}%", 100.0 * sparsity),
        _ => p.name().to_string(),
    }
}

/// Runs the task.
pub fn run(f: flags::LlmBaselines) -> Result<()> {
    // As `relprune prune-hf` does: large buffers go back to the system when freed, so that the
    // peak memory measured is the program's, not the allocator's fragmentation.
    relprune_hf::memory::return_freed_buffers();
    for (what, p) in [
        ("--calib", &f.calib),
        ("--valid", &f.valid),
        ("--anchors", &f.anchors),
    ] {
        if !p.is_file() {
            bail!("{what} {}: no such file", p.display());
        }
    }
    relprune_models::hf::detect_kind(&f.model, relprune_models::hf::Kind::CausalLm)?;
    let anchors: Value = serde_json::from_str(&std::fs::read_to_string(&f.anchors)?)
        .with_context(|| format!("--anchors {}", f.anchors.display()))?;
    let cal = &anchors["calibration"];
    let starts: Vec<usize> = serde_json::from_value(cal["window_starts"].clone())
        .context("the anchors list no calibration window_starts")?;
    let window = cal["window_tokens"].as_u64().unwrap_or(512) as usize;
    let anchor = |method: &str, pattern: &str| {
        anchors["rows"].as_array().and_then(|rows| {
            rows.iter()
                .find(|r| r["method"] == method && r["pattern"] == pattern)
                .and_then(|r| r["ppl_valid"].as_f64())
        })
    };
    std::fs::create_dir_all(&f.out)?;
    let json_path = f.out.join("llm.json");
    let mut rows: Vec<Row> = if json_path.exists() {
        serde_json::from_str(&std::fs::read_to_string(&json_path)?)
            .with_context(|| format!("{}: not this task's rows", json_path.display()))?
    } else {
        Vec::new()
    };
    let tokenizer = TextTokenizer::from_file(&gguf::model_dir(&f.model).join("tokenizer.json"))?;
    let calib = relprune_tasks::lm::text_tokens(&f.calib, &tokenizer)?;
    let valid = relprune_tasks::lm::text_tokens(&f.valid, &tokenizer)?;
    let windows = llm::windows_at(&calib, &starts, window)?;
    let distill = Distill {
        start: f.start,
        head_start: f.head_start,
        regularized_epochs: f.regularized_epochs,
        recovery_epochs: f.recovery_epochs,
        lr: f.lr,
        regularizer: Distill::default().regularizer.with_lambda(f.lambda),
        end_to_end: (f.end_to_end_epochs > 0).then(|| llm::EndToEnd {
            epochs: f.end_to_end_epochs,
            lr: f.end_to_end_lr,
            group: f.end_to_end_group,
            ..llm::EndToEnd::default()
        }),
    };
    let mut configs: Vec<(Option<Method>, Option<Pattern>, bool)> = vec![(None, None, false)];
    for &m in &f.methods {
        for &p in &f.patterns {
            configs.push((Some(m), Some(p), false));
            if f.owl && p == Pattern::Unstructured && m != Method::Magnitude {
                configs.push((Some(m), Some(p), true));
            }
        }
    }
    for (method, pattern, owl) in configs {
        let (mname, pname) = match (method, pattern) {
            (Some(m), Some(p)) if owl => (format!("{}+owl", m.name()), anchor_label(p, f.sparsity)),
            (Some(m), Some(p)) if f.scope.is_some() => (
                format!("{}+{}", m.name(), f.scope.map_or("", |s| s.name())),
                anchor_label(p, f.sparsity),
            ),
            (Some(Method::Relprune), Some(p)) if distill.end_to_end.is_some() => {
                ("relprune+e2e".to_string(), anchor_label(p, f.sparsity))
            }
            (Some(m), Some(p)) => (m.name().to_string(), anchor_label(p, f.sparsity)),
            _ => ("dense".to_string(), "dense".to_string()),
        };
        if rows.iter().any(|r| r.method == mname && r.pattern == pname) {
            eprintln!("{mname} {pname}: kept from {}", json_path.display());
            continue;
        }
        let (model, _, _) = relprune_hf::causal::load(&f.model)?;
        let t = Instant::now();
        let (sparsity, calibration_tokens) = match (method, pattern) {
            (Some(m), Some(p)) => {
                let s = p.at(f.sparsity);
                let progress = |d: &llm::LayerDone| {
                    let error = d.error.map_or(String::new(), |(a, b)| {
                        format!(" (output error {a:.2e} → {b:.2e})")
                    });
                    eprintln!(
                        "{mname} {pname}: {} {}/{}{error}",
                        d.stage, d.layer, d.layers
                    );
                    Ok(())
                };
                let plan = llm::Plan {
                    method: m,
                    sparsity: s,
                    owl: owl.then(llm::Owl::default),
                    distill,
                    scope: f.scope,
                };
                let r = llm::prune_with(&model, &windows, &plan, None, progress)?;
                (r.linear_sparsity(), r.calibration_tokens)
            }
            _ => (0.0, 0),
        };
        let prune_seconds = t.elapsed().as_secs_f64();
        let ppl = relprune_tasks::lm::perplexity(&model, &valid, window, |_, _| {})?;
        let row = Row {
            method: mname.clone(),
            pattern: pname.clone(),
            linear_sparsity: sparsity,
            ppl_valid: ppl.perplexity,
            anchor_ppl_valid: anchor(&mname, &pname),
            prune_seconds,
            calibration_tokens,
            peak_rss_mb: relprune_hf::memory::rss_mb().map(|(_, peak)| peak),
        };
        eprintln!(
            "{mname} {pname}: perplexity {:.2} (anchor {}), sparsity {:.4}, {:.0} s",
            row.ppl_valid,
            row.anchor_ppl_valid
                .map_or("-".into(), |a| format!("{a:.2}")),
            row.linear_sparsity,
            row.prune_seconds
        );
        rows.push(row);
        relprune_io::write(&json_path, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    let mut md = String::from(
        "| method | pattern | linear sparsity | perplexity (valid) | anchor | ours / anchor | \
         prune time | calibration tokens | peak RSS (process) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.4} | {:.2} | {} | {} | {:.0} s | {} | {} |\n",
            r.method,
            r.pattern,
            r.linear_sparsity,
            r.ppl_valid,
            r.anchor_ppl_valid.map_or("-".into(), |a| format!("{a:.2}")),
            r.anchor_ppl_valid
                .map_or("-".into(), |a| format!("{:.3}", r.ppl_valid / a)),
            r.prune_seconds,
            r.calibration_tokens,
            r.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0} MB")),
        ));
    }
    relprune_io::write(&f.out.join("llm.md"), md.as_bytes())?;
    print!("{md}");
    Ok(())
}
