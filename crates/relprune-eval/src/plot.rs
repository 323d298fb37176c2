//! SVG line charts (e.g. the metric-vs-remaining-weights curve of the pruning rounds).

use std::ops::Range;

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chart size in pixels.
const SIZE: (u32, u32) = (900, 560);

/// One labelled line of (x, y) points.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points in drawing order.
    pub points: Vec<(f64, f64)>,
}

/// An SVG line chart (x axis log-scale optional), as the text of the file: title, axis labels,
/// legend.
///
/// Non-finite points, and points with x ≤ 0 on a log axis, are skipped (they cannot be placed);
/// if nothing drawable is left the chart is refused with `Error::Invalid`.
pub fn line_chart_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> Result<String> {
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            label: s.label.clone(),
            points: s
                .points
                .iter()
                .copied()
                .filter(|&(x, y)| x.is_finite() && y.is_finite() && (!log_x || x > 0.0))
                .collect(),
        })
        .collect();
    let all = || series.iter().flat_map(|s| s.points.iter().copied());
    let (Some(x), Some(y)) = (span(all().map(|p| p.0)), span(all().map(|p| p.1))) else {
        return Err(Error::Invalid(format!(
            "chart {title:?} has no drawable points"
        )));
    };
    let y = pad_linear(y);
    let labels = Labels {
        title,
        x: x_label,
        y: y_label,
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        if log_x {
            let x = pad_log(x);
            let ticks = log_ticks(&x);
            draw(
                &root,
                x.log_scale().with_key_points(ticks),
                y,
                &labels,
                &series,
            )?;
        } else {
            draw(&root, pad_linear(x), y, &labels, &series)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Labelled ticks of a log axis: 1, 2 and 5 times each power of ten inside `r` (plotters' own
/// log axis labels only the powers of ten, leaving e.g. 1%–10% unlabelled).
fn log_ticks(r: &Range<f64>) -> Vec<f64> {
    let (lo, hi) = (r.start.min(r.end), r.start.max(r.end));
    if !(lo > 0.0 && hi.is_finite()) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for e in lo.log10().floor() as i32..=hi.log10().ceil() as i32 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(e);
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
    }
    out
}

/// Title and axis labels of a chart.
struct Labels<'a> {
    title: &'a str,
    x: &'a str,
    y: &'a str,
}

/// Draws the chart; generic over the x coordinate so linear and log axes share the code.
fn draw<XR>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    x: XR,
    y: Range<f64>,
    labels: &Labels<'_>,
    series: &[Series],
) -> Result<()>
where
    XR: AsRangedCoord<Value = f64>,
    XR::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x, y)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .x_label_formatter(&|v: &f64| short_number(*v))
        .x_desc(labels.x)
        .y_desc(labels.y)
        .draw()
        .map_err(plot_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), style))
            .map_err(plot_err)?
            .label(s.label.as_str())
            .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], style));
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// A tick label without trailing zeros: 0.5, 2, 100.
fn short_number(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

/// Turns any plotters error into ours.
fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Plot(e.to_string())
}

/// Smallest and largest value, if any.
fn span(values: impl Iterator<Item = f64>) -> Option<Range<f64>> {
    values.fold(None, |acc, v| match acc {
        None => Some(v..v),
        Some(r) => Some(r.start.min(v)..r.end.max(v)),
    })
}

/// Widens a linear range by 5% each side (or by 1 if it is a single value) so points at the
/// extremes are not drawn on the frame.
fn pad_linear(r: Range<f64>) -> Range<f64> {
    let w = r.end - r.start;
    if w > 0.0 {
        (r.start - 0.05 * w)..(r.end + 0.05 * w)
    } else {
        let d = if r.start == 0.0 {
            1.0
        } else {
            0.1 * r.start.abs()
        };
        (r.start - d)..(r.end + d)
    }
}

/// Widens a positive range multiplicatively, for a log axis.
fn pad_log(r: Range<f64>) -> Range<f64> {
    if r.end > r.start {
        let f = (r.end / r.start).powf(0.03);
        (r.start / f)..(r.end * f)
    } else {
        (r.start / 2.0)..(r.end * 2.0)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_ticks_label_one_two_five_of_every_decade_in_range() {
        assert_eq!(
            super::log_ticks(&(0.8..120.0)),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert!(super::log_ticks(&(0.0..10.0)).is_empty());
    }

    use super::*;

    fn curve() -> Vec<Series> {
        vec![
            Series {
                label: "hard gate".into(),
                points: vec![(100.0, 1.62), (40.0, 1.7), (9.5, 1.8), (1.41, 1.87)],
            },
            Series {
                label: "soft gate".into(),
                points: vec![(100.0, 1.62), (30.0, 1.75), (f64::NAN, 2.0)],
            },
        ]
    }

    #[test]
    fn line_chart_renders_title_labels_legend_and_lines() {
        for log_x in [false, true] {
            let svg = line_chart_svg(
                "Error vs remaining",
                "remaining %",
                "top-1 error %",
                &curve(),
                log_x,
            )
            .unwrap();
            assert!(svg.starts_with("<svg"), "{svg}");
            assert!(svg.contains("Error vs remaining"));
            assert!(svg.contains("remaining %"));
            assert!(svg.contains("top-1 error %"));
            assert!(svg.contains("hard gate") && svg.contains("soft gate"));
            assert!(svg.contains("<polyline") || svg.contains("<path"));
            assert!(svg.contains("<circle"));
        }
    }

    #[test]
    fn line_chart_single_point_is_drawn() {
        let s = [Series {
            label: "only".into(),
            points: vec![(5.0, 5.0)],
        }];
        let svg = line_chart_svg("One", "x", "y", &s, true).unwrap();
        assert!(svg.contains("<circle"));
    }

    #[test]
    fn line_chart_without_drawable_points_is_invalid() {
        let s = [Series {
            label: "neg".into(),
            points: vec![(-1.0, 1.0), (0.0, 2.0)],
        }];
        assert!(matches!(
            line_chart_svg("None", "x", "y", &s, true),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            line_chart_svg("None", "x", "y", &[], false),
            Err(Error::Invalid(_))
        ));
    }
}
