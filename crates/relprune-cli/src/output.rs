//! Checks on what a command is about to write.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// `t` as nested rows, after checking every value is finite: JSON has no NaN (serde writes
/// `null`), and a NaN output is an error to report, not a file to write.
pub fn finite_rows3(what: &str, t: &Tensor) -> Result<Vec<Vec<Vec<f32>>>> {
    check(what, t)?;
    Ok(t.to_vec3()?)
}

/// [`finite_rows3`] for a matrix.
pub fn finite_rows2(what: &str, t: &Tensor) -> Result<Vec<Vec<f32>>> {
    check(what, t)?;
    Ok(t.to_vec2()?)
}

fn check(what: &str, t: &Tensor) -> Result<()> {
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        bail!(
            "the {what} hold {} at flat index {i} of shape {:?}; nothing was written",
            values[i],
            t.dims()
        );
    }
    Ok(())
}

/// Says on stderr how many of `lines` inputs were longer than the model's `positions` and cut
/// to them (the last token kept, as transformers truncates): never a silent change of input.
pub fn report_cuts(cut: usize, lines: usize, positions: usize) {
    if cut > 0 {
        eprintln!(
            "note: {cut} of {lines} input lines had more tokens than the model's {positions} \
             positions and were cut to them (their first {} tokens and the last kept)",
            positions.saturating_sub(1)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_outputs_are_refused_and_finite_ones_pass() {
        let dev = candle_core::Device::Cpu;
        let ok = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        assert_eq!(finite_rows2("x", &ok).unwrap(), [[1.0, 2.0], [3.0, 4.0]]);
        for bad in [f32::NAN, f32::NEG_INFINITY] {
            let t = Tensor::new(&[[[1f32, bad]]], &dev).unwrap();
            let e = finite_rows3("logits", &t).unwrap_err().to_string();
            assert!(e.contains("logits") && e.contains("flat index 1"), "{e}");
        }
    }
}
