//! Progress bars whose ETA suits steps that take minutes.
//!
//! indicatif's own `{eta}` weights the rate of the last seconds: with an epoch every few
//! minutes that rate decays towards zero between steps and the ETA read "1396y". Here the ETA is
//! the mean time per step since the bar first showed a position, so a resumed run (whose bar
//! starts at the saved epoch) is not credited with the steps it did before.

use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanDuration, ProgressState, ProgressStyle};

/// A bar style from `template` (indicatif syntax) whose `{eta}` is the mean-rate estimate.
pub fn style(template: &str) -> ProgressStyle {
    let anchor: Arc<Mutex<Option<(Instant, u64)>>> = Arc::default();
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
        .with_key("eta", move |s: &ProgressState, w: &mut dyn Write| {
            let mut a = anchor.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.write_str(&eta_text(&mut a, Instant::now(), s.pos(), s.len()));
        })
}

/// The ETA at `now` for position `pos` of `len`, from the mean rate since `anchor` (the first
/// position seen, and when). Re-anchors on the first call, after a reset, and on a jump within
/// the first second (a resumed bar set to its saved position); "-" until a step is timed.
pub fn eta_text(
    anchor: &mut Option<(Instant, u64)>,
    now: Instant,
    pos: u64,
    len: Option<u64>,
) -> String {
    let (at, from) = match *anchor {
        Some((at, from))
            if pos >= from
                && (pos == from || now.saturating_duration_since(at) >= Duration::from_secs(1)) =>
        {
            (at, from)
        }
        _ => {
            *anchor = Some((now, pos));
            (now, pos)
        }
    };
    match len {
        Some(len) if pos > from && len >= pos => {
            let per_step = now.saturating_duration_since(at).as_secs_f64() / (pos - from) as f64;
            HumanDuration(Duration::from_secs_f64(per_step * (len - pos) as f64)).to_string()
        }
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_with_an_epoch_every_four_minutes_estimates_minutes_left() {
        let t0 = Instant::now();
        let mut anchor = None;
        assert_eq!(eta_text(&mut anchor, t0, 0, Some(8)), "-");
        let t = t0 + Duration::from_secs(240);
        assert_eq!(eta_text(&mut anchor, t, 1, Some(8)), "28 minutes");
        // Between steps the estimate stays at the mean rate instead of decaying.
        let later = t0 + Duration::from_secs(360);
        assert_eq!(eta_text(&mut anchor, later, 1, Some(8)), "42 minutes");
    }

    #[test]
    fn a_resumed_bar_is_timed_from_its_saved_position() {
        let t0 = Instant::now();
        let mut anchor = None;
        eta_text(&mut anchor, t0, 0, Some(10));
        // set_position(6) right after creation: not six steps done in no time.
        let t = t0 + Duration::from_millis(5);
        assert_eq!(eta_text(&mut anchor, t, 6, Some(10)), "-");
        let t = t + Duration::from_secs(300);
        assert_eq!(eta_text(&mut anchor, t, 7, Some(10)), "15 minutes");
    }

    #[test]
    fn a_reset_bar_re_anchors() {
        let t0 = Instant::now();
        let mut anchor = None;
        eta_text(&mut anchor, t0, 0, Some(4));
        eta_text(&mut anchor, t0 + Duration::from_secs(60), 2, Some(4));
        let t = t0 + Duration::from_secs(120);
        assert_eq!(eta_text(&mut anchor, t, 0, Some(4)), "-");
        assert_eq!(eta_text(&mut anchor, t, 0, None), "-");
    }
}
