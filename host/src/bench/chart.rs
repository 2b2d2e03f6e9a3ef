//! The sweep chart: achieved throughput, and p50/p99 latency, against offered load, as SVG.
//!
//! plotters with its SVG backend only: text goes into the file as `<text>` elements and the
//! viewer's fonts draw it, so the generator needs no font files, no font library and no
//! bitmap stack (plotters estimates text widths for layout, which is close enough for axis
//! labels). Several series (e.g. SQLite and PostgreSQL) share one chart for comparison.

use std::path::Path;

use plotters::prelude::*;

use super::report::FAILED_SHARE_SHOWN;

/// One offered rate of a sweep and what it achieved.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub offered: f64,
    pub achieved: f64,
    /// None when no saga of the step ended as expected.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The share of the step's sends that failed, 0 to 1: from [`FAILED_SHARE_SHOWN`] on, the
    /// point is marked (its latency is of the successes alone and would read as healthy).
    pub failed_share: f64,
}

/// The colour of the marks on points where sends failed.
const FAILED: RGBColor = RGBColor(200, 0, 0);

/// Draws a failure mark on each `(x, y, share)` whose share is marked: a cross over the point
/// and the share beside it. The legend entry is drawn once per chart, by the caller.
macro_rules! failure_marks {
    ($chart:expr, $points:expr) => {
        $chart
            .draw_series($points.filter(|&(_, _, share): &(f64, f64, f64)| share >= FAILED_SHARE_SHOWN).map(
                |(x, y, share)| {
                    EmptyElement::at((x, y))
                        + Cross::new((0, 0), 7, FAILED.stroke_width(2))
                        + Text::new(
                            format!("{:.0}% failed", share * 100.0),
                            (9, -18),
                            ("sans-serif", 12).into_font().color(&FAILED),
                        )
                },
            ))
            .map_err(err)?
    };
}

/// A sweep, named for the legend.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
}

/// Series colours that stay apart on white, yellow-free (Tableau 10, reordered).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBAColor {
    PALETTE[i % PALETTE.len()].to_rgba()
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// An axis label: no decimals once they say nothing.
fn number(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The legend entry of the failure marks, on an empty series of a chart.
fn failed_legend<DB: DrawingBackend>(annotation: &mut plotters::chart::SeriesAnno<'_, DB>) {
    annotation
        .label(format!("{:.0}% or more of the sends failed", FAILED_SHARE_SHOWN * 100.0))
        .legend(|(x, y)| Cross::new((x + 9, y), 5, FAILED.stroke_width(2)));
}

/// Draws `series` into an SVG file at `path`.
pub fn render(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    // Lines join points in the order of the offered rate, whatever order the rates ran in
    // (`--rates 1000,100,500` drew a zigzag).
    let series: Vec<Series> = series
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.points.sort_by(|a, b| a.offered.total_cmp(&b.offered));
            s
        })
        .collect();
    let series = series.as_slice();
    let points = || series.iter().flat_map(|s| s.points.iter());
    if points().next().is_none() {
        return Err("nothing to draw: the sweep has no points".to_owned());
    }
    let max_x = points().map(|p| p.offered).fold(1.0, f64::max) * 1.05;
    let max_y = points().map(|p| p.achieved.max(p.offered)).fold(1.0, f64::max) * 1.05;
    let latencies: Vec<f64> = points().flat_map(|p| [p.p50_ms, p.p99_ms]).flatten().filter(|l| *l > 0.0).collect();
    let lat_min = latencies.iter().copied().fold(f64::INFINITY, f64::min);
    let lat_max = latencies.iter().copied().fold(0.0, f64::max);
    let (lat_min, lat_max) = if latencies.is_empty() { (1.0, 10.0) } else { (lat_min / 1.5, lat_max * 1.5) };

    let any_failed = points().any(|p| p.failed_share >= FAILED_SHARE_SHOWN);

    let root = SVGBackend::new(path, (900, 820)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let (top, bottom) = root.split_vertically(390);
    let font = ("sans-serif", 14);

    let mut chart = ChartBuilder::on(&top)
        .caption("Throughput: achieved against offered", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_x, 0f64..max_y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered load (sagas/s)")
        .y_desc("achieved (sagas/s)")
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        .light_line_style(BLACK.mix(0.03))
        .label_style(font)
        .draw()
        .map_err(err)?;
    let ideal = ShapeStyle { color: BLACK.mix(0.35), filled: false, stroke_width: 1 };
    chart
        .draw_series(DashedLineSeries::new([(0.0, 0.0), (max_x, max_x)], 6, 4, ideal))
        .map_err(err)?
        .label("achieved = offered")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], ideal));
    for (i, s) in series.iter().enumerate() {
        let color = colour(i);
        let line: Vec<(f64, f64)> = s.points.iter().map(|p| (p.offered, p.achieved)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                // A legend entry: a short line through the series' marker.
                EmptyElement::at((x, y))
                    + PathElement::new([(0, 0), (18, 0)], color.stroke_width(2))
                    + Circle::new((9, 0), 3, color.filled())
            });
        chart.draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(err)?;
        failure_marks!(chart, s.points.iter().map(|p| (p.offered, p.achieved, p.failed_share)));
    }
    if any_failed {
        failed_legend(chart.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>()).map_err(err)?);
    }
    chart
        .configure_series_labels()
        .label_font(font)
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption("Latency of the successes, from the scheduled send (log scale)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_x, (lat_min..lat_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered load (sagas/s)")
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| number(*v))
        .y_label_formatter(&|v| number(*v))
        // A log axis draws a light line per minor step; they only add noise here.
        .light_line_style(TRANSPARENT)
        .label_style(font)
        .draw()
        .map_err(err)?;
    for (i, s) in series.iter().enumerate() {
        let color = colour(i);
        let curve = |pick: fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
            s.points.iter().filter_map(|p| Some((p.offered, pick(p).filter(|l| *l > 0.0)?))).collect()
        };
        let p50 = curve(|p| p.p50_ms);
        let p99 = curve(|p| p.p99_ms);
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{} p50", s.label))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new([(0, 0), (18, 0)], color.stroke_width(2))
                    + Circle::new((9, 0), 3, color.filled())
            });
        chart.draw_series(p50.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(err)?;
        let dashed = color.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(p99.clone(), 8, 5, dashed))
            .map_err(err)?
            .label(format!("{} p99 (dashed)", s.label))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new([(0, 0), (18, 0)], dashed)
                    + TriangleMarker::new((9, 0), 4, color.filled())
            });
        chart.draw_series(p99.into_iter().map(|p| TriangleMarker::new(p, 4, color.filled()))).map_err(err)?;
        failure_marks!(
            chart,
            s.points.iter().filter_map(|p| Some((p.offered, p.p99_ms.filter(|l| *l > 0.0)?, p.failed_share)))
        );
    }
    if any_failed {
        failed_legend(chart.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>()).map_err(err)?);
    }
    chart
        .configure_series_labels()
        .label_font(font)
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    root.present().map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_renders_to_svg_with_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.svg");
        let points = vec![
            Point { offered: 100.0, achieved: 99.0, p50_ms: Some(12.0), p99_ms: Some(30.0), failed_share: 0.0 },
            Point { offered: 200.0, achieved: 180.0, p50_ms: Some(40.0), p99_ms: Some(900.0), failed_share: 0.0 },
            Point { offered: 400.0, achieved: 190.0, p50_ms: None, p99_ms: None, failed_share: 1.0 },
        ];
        render(&path, "sagahost bench: test", &[Series { label: "sqlite".into(), points }]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for text in ["sagahost bench: test", "offered load (sagas/s)", "sqlite p99", "achieved = offered"] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        assert!(render(&path, "empty", &[]).is_err());
    }

    /// A point where many sends failed draws healthy latencies (of the successes): it is
    /// marked, and the legend says what the mark means; a clean sweep has neither.
    #[test]
    fn points_where_sends_failed_are_marked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.svg");
        let point = |offered: f64, failed_share: f64| Point {
            offered,
            achieved: offered * (1.0 - failed_share),
            p50_ms: Some(1.0),
            p99_ms: Some(2.0),
            failed_share,
        };
        let legend = "1% or more of the sends failed";
        render(
            &path,
            "clean",
            &[Series { label: "sqlite".into(), points: vec![point(100.0, 0.0), point(200.0, 0.005)] }],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(!svg.contains(legend) && !svg.contains("% failed"), "a clean sweep is marked: {svg}");
        render(
            &path,
            "failing",
            &[Series { label: "sqlite".into(), points: vec![point(100.0, 0.0), point(200.0, 0.62)] }],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("62% failed").count(), 2, "the point is marked on both charts: {svg}");
        assert_eq!(svg.matches(legend).count(), 2, "each chart's legend explains the mark");
    }

    /// Rates swept in any order draw each line left to right.
    #[test]
    fn lines_join_points_in_the_order_of_the_offered_rate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.svg");
        let point = |offered: f64| Point {
            offered,
            achieved: offered,
            p50_ms: Some(1.0),
            p99_ms: Some(2.0),
            failed_share: 0.0,
        };
        let points = vec![point(1000.0), point(100.0), point(500.0)];
        render(&path, "rates in any order", &[Series { label: "sqlite".into(), points }]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Vec<f64>> = svg
            .split("<polyline")
            .skip(1)
            .filter_map(|p| p.split("points=\"").nth(1)?.split('"').next().map(str::to_owned))
            .map(|pts| pts.split_whitespace().filter_map(|xy| xy.split(',').next()?.parse().ok()).collect())
            .filter(|xs: &Vec<f64>| xs.len() == 3)
            .collect();
        assert!(!lines.is_empty(), "no line of three points in {svg}");
        for xs in lines {
            assert!(xs.windows(2).all(|w| w[0] < w[1]), "a line goes back: {xs:?}");
        }
    }
}
