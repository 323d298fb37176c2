//! Top-1 accuracy: counting correct predictions batch by batch, then the error over a whole set.
//!
//! Ties: the prediction is candle's `argmax`, which keeps the *first* maximal column (it only
//! replaces the running best on a strictly greater value). A row whose logits are all equal
//! therefore predicts class 0. NaN logits never win a comparison, so they do not move the argmax
//! off an earlier finite maximum.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Number of rows whose argmax equals the label. logits (B, C) any float dtype, labels (B,) u32.
///
/// Labels of another integer dtype (u8, i64) are converted to u32 first; float labels are
/// rejected because a silently truncated label would corrupt the count.
pub fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let (batch, classes) = match logits.dims() {
        [b, c] => (*b, *c),
        dims => {
            return Err(Error::Invalid(format!(
                "logits must be (batch, classes), got shape {dims:?}"
            )))
        }
    };
    let label_len = match labels.dims() {
        [b] => *b,
        dims => {
            return Err(Error::Invalid(format!(
                "labels must be (batch,), got shape {dims:?}"
            )))
        }
    };
    if label_len != batch {
        return Err(Error::Invalid(format!(
            "logits have {batch} rows but there are {label_len} labels"
        )));
    }
    if batch == 0 {
        return Ok(0);
    }
    // candle's argmax indexes the first element unconditionally, so an empty class axis must be
    // refused here rather than reach it.
    if classes == 0 {
        return Err(Error::Invalid("logits have zero classes".into()));
    }
    let labels = match labels.dtype() {
        DType::U32 => labels.clone(),
        DType::U8 | DType::I64 => labels.to_dtype(DType::U32)?,
        other => {
            return Err(Error::Invalid(format!(
                "labels must be an integer dtype (u32), got {other:?}"
            )))
        }
    };
    let labels = labels.to_device(logits.device())?;
    let predicted = logits.argmax(1)?;
    let hits = predicted
        .eq(&labels)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok(hits as usize)
}

/// Top-1 error in percent over a whole set given total correct and total count (count 0 → Invalid error).
pub fn top1_error_pct(correct: usize, total: usize) -> Result<f64> {
    if total == 0 {
        return Err(Error::Invalid(
            "top-1 error of an empty set is undefined".into(),
        ));
    }
    if correct > total {
        return Err(Error::Invalid(format!(
            "{correct} correct out of only {total} examples"
        )));
    }
    Ok(100.0 * (total - correct) as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(rows: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn count_correct_counts_argmax_matches() {
        let l = logits(&[
            [0.1, 0.9, 0.0],
            [2.0, 1.0, 0.5],
            [0.0, 0.0, 3.0],
            [1.0, 5.0, 2.0],
        ]);
        let y = Tensor::new(&[1u32, 0, 1, 1], &Device::Cpu).unwrap();
        assert_eq!(count_correct(&l, &y).unwrap(), 3);
    }

    #[test]
    fn count_correct_works_for_f16_bf16_f64_logits() {
        let l = logits(&[[0.1, 0.9, 0.0], [2.0, 1.0, 0.5]]);
        let y = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        for dt in [DType::F16, DType::BF16, DType::F64] {
            assert_eq!(count_correct(&l.to_dtype(dt).unwrap(), &y).unwrap(), 1);
        }
    }

    #[test]
    fn count_correct_ties_pick_the_first_maximum() {
        let l = logits(&[[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]]);
        let first = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        assert_eq!(count_correct(&l, &first).unwrap(), 2);
        let later = Tensor::new(&[2u32, 2], &Device::Cpu).unwrap();
        assert_eq!(count_correct(&l, &later).unwrap(), 0);
    }

    #[test]
    fn count_correct_accepts_i64_labels() {
        let l = logits(&[[0.0, 1.0, 0.0]]);
        let y = Tensor::new(&[1i64], &Device::Cpu).unwrap();
        assert_eq!(count_correct(&l, &y).unwrap(), 1);
    }

    #[test]
    fn count_correct_rejects_bad_shapes_and_float_labels() {
        let l = logits(&[[0.0, 1.0, 0.0]]);
        let two = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
        assert!(matches!(count_correct(&l, &two), Err(Error::Invalid(_))));
        let flat = Tensor::new(&[0.0f32, 1.0, 0.0], &Device::Cpu).unwrap();
        let one = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        assert!(matches!(count_correct(&flat, &one), Err(Error::Invalid(_))));
        let float_labels = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        assert!(matches!(
            count_correct(&l, &float_labels),
            Err(Error::Invalid(_))
        ));
        let no_classes = Tensor::zeros((1, 0), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            count_correct(&no_classes, &one),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn count_correct_empty_batch_is_zero() {
        let l = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
        assert_eq!(count_correct(&l, &y).unwrap(), 0);
    }

    #[test]
    fn top1_error_pct_is_percent_wrong() {
        assert_eq!(top1_error_pct(9825, 10000).unwrap(), 1.75);
        assert_eq!(top1_error_pct(3, 4).unwrap(), 25.0);
        assert_eq!(top1_error_pct(0, 5).unwrap(), 100.0);
    }

    #[test]
    fn top1_error_pct_of_empty_set_is_an_error() {
        assert!(matches!(top1_error_pct(0, 0), Err(Error::Invalid(_))));
        assert!(matches!(top1_error_pct(5, 4), Err(Error::Invalid(_))));
    }
}
