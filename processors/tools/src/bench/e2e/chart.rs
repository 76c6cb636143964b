//! The latency-versus-throughput chart of `weir bench e2e`, as a self-contained SVG: achieved
//! throughput on a linear x axis, latency on a logarithmic y axis (decades), one line per
//! series, so the knee (where latency leaves the floor as throughput stops growing) shows.
//!
//! Invariants: the output depends on the input only (no clock, no randomness); a point with
//! a latency ≤ 0 or a non-finite coordinate is left out (a log axis has no place for it);
//! text is XML-escaped.

use std::fmt::Write as _;

/// One line of the chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Its label in the legend.
    pub label: String,
    /// Stroke colour (CSS).
    pub colour: &'static str,
    /// Dashed (p50) or solid (p99).
    pub dashed: bool,
    /// (throughput per second, latency in ms), in the order they are joined.
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 900.0;
const H: f64 = 500.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" step for about `n` ticks over `[0, max]`: 1, 2 or 5 times a power of ten.
fn nice_step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick label: 1,500 → "1.5k", 250 → "250", 0.5 → "0.5".
fn label(v: f64) -> String {
    if v >= 1000.0 {
        let k = v / 1000.0;
        if (k - k.round()).abs() < 1e-9 {
            format!("{}k", k.round())
        } else {
            format!("{k:.1}k")
        }
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round())
    } else {
        format!("{v}")
    }
}

/// The chart as an SVG document.
pub fn svg(title: &str, subtitle: &str, x_label: &str, series: &[Series]) -> String {
    let points = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0 && *x >= 0.0)
    };
    let x_max_data = points().map(|p| p.0).fold(0.0, f64::max);
    let x_step = nice_step(x_max_data.max(1.0), 6.0);
    let x_max = (x_max_data / x_step).ceil().max(1.0) * x_step;
    let y_lo = points().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_hi = points().map(|p| p.1).fold(0.0, f64::max);
    let (d_lo, d_hi) = if y_lo.is_finite() {
        (
            y_lo.log10().floor(),
            y_hi.log10().ceil().max(y_lo.log10().floor() + 1.0),
        )
    } else {
        (0.0, 3.0)
    };
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - (y.log10() - d_lo) / (d_hi - d_lo) * ph;

    let mut o = String::new();
    let _ = write!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="#ffffff"/>
<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text>
<text x="{LEFT}" y="40" fill="#555555">{}</text>
"##,
        escape(title),
        escape(subtitle)
    );
    // Horizontal grid: decades (labelled) and 2, 5 within each.
    let mut d = d_lo;
    while d <= d_hi + 1e-9 {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let y = 10f64.powf(d) * m;
            if y.log10() > d_hi + 1e-9 {
                continue;
            }
            let py = sy(y);
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="{}" stroke-width="1"/>"##,
                LEFT + pw,
                if major { "#cccccc" } else { "#eeeeee" }
            );
            let _ = writeln!(
                o,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{}">{} ms</text>"##,
                LEFT - 6.0,
                py + 4.0,
                if major { "#333333" } else { "#999999" },
                label(y)
            );
        }
        d += 1.0;
    }
    // Vertical grid.
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let px = sx(x);
        let _ = writeln!(
            o,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#eeeeee" stroke-width="1"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            o,
            r##"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph + 18.0,
            label(x)
        );
        x += x_step;
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency (log scale)</text>"##,
        LEFT + pw / 2.0,
        H - 18.0,
        escape(x_label),
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // Series and legend.
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && *y > 0.0 && *x >= 0.0)
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let colour = escape(s.colour);
        if !pts.is_empty() {
            let path: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
                .collect();
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                path.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"><title>{}: {} ms at {}/s</title></circle>"#,
                    sx(*x),
                    sy(*y),
                    escape(&s.label),
                    y,
                    x.round()
                );
            }
        }
        let ly = TOP + 10.0 + i as f64 * 22.0;
        let lx = LEFT + pw + 16.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/>
<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 28.0,
            lx + 34.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_has_a_line_per_series_on_a_log_axis() {
        let series = vec![
            Series {
                label: "patches p50".into(),
                colour: "#1f77b4",
                dashed: true,
                points: vec![(50.0, 4.0), (2000.0, 6.0), (8000.0, 40.0)],
            },
            Series {
                label: "patches p99 <&>".into(),
                colour: "#1f77b4",
                dashed: false,
                // The zero and the NaN are left out.
                points: vec![(50.0, 9.0), (2000.0, 0.0), (f64::NAN, 3.0), (8000.0, 900.0)],
            },
            Series {
                label: "empty".into(),
                colour: "#d62728",
                dashed: false,
                points: vec![],
            },
        ];
        let s = svg("t", "sub", "events/s", &series);
        assert!(s.starts_with("<svg ") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches("<circle").count(), 5);
        // Decades from 1 ms (below 4) to 1000 ms (above 900), with 2 and 5 between.
        for t in [">1 ms<", ">10 ms<", ">100 ms<", ">1k ms<", ">5 ms<"] {
            assert!(s.contains(t), "missing tick {t}");
        }
        assert!(s.contains(">8k<"), "x axis reaches the largest throughput");
        assert!(s.contains("patches p99 &lt;&amp;&gt;") && !s.contains("<&>"));
        assert_eq!(s, svg("t", "sub", "events/s", &series), "deterministic");
        // Nothing to draw still gives a valid document.
        let empty = svg("t", "", "x", &[]);
        assert!(empty.contains("</svg>") && !empty.contains("<polyline"));
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(nice_step(8000.0, 6.0), 2000.0);
        assert_eq!(nice_step(100.0, 6.0), 20.0);
        assert_eq!(nice_step(7.0, 6.0), 2.0);
        assert_eq!(label(1500.0), "1.5k");
        assert_eq!(label(2000.0), "2k");
        assert_eq!(label(250.0), "250");
        assert_eq!(label(0.5), "0.5");
    }
}
