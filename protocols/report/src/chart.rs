//! Charts as inline SVG, each with a text equivalent: a caption, a legend in text, and
//! the numbers in a table. No script draws them, so a static report shows them too.
//!
//! Series differ by colour *and* by marker and dash, so they read without colour; the
//! colours have at least 4.5:1 contrast against the white background.

use maud::{Markup, html};

/// One line of a [`LineChart`]: a value per x (`None`: not measured there).
#[derive(Debug, Clone)]
pub struct Series {
    /// Machine name (`data-series`, e.g. `accuracy`).
    pub key: String,
    /// What people read in the legend and the table.
    pub label: String,
    pub points: Vec<(u32, Option<f64>)>,
}

/// A line chart over rounds, y in [0, 1].
#[derive(Debug, Clone)]
pub struct LineChart {
    /// The SVG's id (tests and links find it by this).
    pub id: String,
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

/// A stacked bar per x: how many of each kind (e.g. sites that contributed, dropped).
#[derive(Debug, Clone)]
pub struct BarChart {
    pub id: String,
    pub title: String,
    pub x_label: String,
    /// The stacks, bottom first: (key, label).
    pub stacks: Vec<(String, String)>,
    /// Per x: the count of each stack, in `stacks` order.
    pub bars: Vec<(u32, Vec<u64>)>,
}

const W: f64 = 640.0;
const H: f64 = 260.0;
const LEFT: f64 = 44.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 36.0;

/// Colour, dash pattern, marker for series `i`.
fn style(i: usize) -> (&'static str, &'static str, Marker) {
    const STYLES: [(&str, &str, Marker); 4] = [
        ("#0b57d0", "", Marker::Circle),
        ("#7b1fa2", "6 3", Marker::Square),
        ("#b3261e", "2 3", Marker::Triangle),
        ("#1b6e20", "10 4", Marker::Diamond),
    ];
    STYLES[i % STYLES.len()]
}

#[derive(Debug, Clone, Copy)]
enum Marker {
    Circle,
    Square,
    Triangle,
    Diamond,
}

fn marker(m: Marker, x: f64, y: f64, colour: &str, key: &str, x_value: u32, title: &str) -> Markup {
    let points = |pts: &[(f64, f64)]| {
        pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x + a, y + b)).collect::<Vec<_>>().join(" ")
    };
    html! {
        @match m {
            Marker::Circle => circle class="pt" data-series=(key) data-x=(x_value) cx=(fmt(x)) cy=(fmt(y)) r="3.5" fill=(colour) { title { (title) } },
            Marker::Square => rect class="pt" data-series=(key) data-x=(x_value) x=(fmt(x - 3.5)) y=(fmt(y - 3.5)) width="7" height="7" fill=(colour) { title { (title) } },
            Marker::Triangle => polygon class="pt" data-series=(key) data-x=(x_value) points=(points(&[(0.0, -4.5), (4.0, 3.0), (-4.0, 3.0)])) fill=(colour) { title { (title) } },
            Marker::Diamond => polygon class="pt" data-series=(key) data-x=(x_value) points=(points(&[(0.0, -4.5), (4.5, 0.0), (0.0, 4.5), (-4.5, 0.0)])) fill=(colour) { title { (title) } },
        }
    }
}

fn fmt(v: f64) -> String {
    format!("{v:.1}")
}

/// A number for people: 3 decimals, or "—" when missing.
pub fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.3}"))
}

/// The x positions: every x in the data, evenly spaced in order.
fn x_scale(xs: &[u32]) -> impl Fn(u32) -> f64 + '_ {
    let (lo, hi) = (xs.first().copied().unwrap_or(0), xs.last().copied().unwrap_or(0));
    move |x| {
        if hi == lo {
            LEFT + (W - LEFT - RIGHT) / 2.0
        } else {
            LEFT + (f64::from(x - lo) / f64::from(hi - lo)) * (W - LEFT - RIGHT)
        }
    }
}

/// Ticks along x: at most about ten labels.
fn x_ticks(xs: &[u32]) -> Vec<u32> {
    let step = xs.len().div_ceil(10).max(1);
    xs.iter().copied().enumerate().filter(|(i, _)| i % step == 0 || *i == xs.len() - 1).map(|(_, x)| x).collect()
}

impl LineChart {
    pub fn render(&self) -> Markup {
        let mut xs: Vec<u32> = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
        xs.sort_unstable();
        xs.dedup();
        let sx = x_scale(&xs);
        let sy = |v: f64| TOP + (1.0 - v.clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
        let caption_id = format!("{}-caption", self.id);
        let measured = self.series.iter().map(|s| s.points.iter().filter(|p| p.1.is_some()).count()).sum::<usize>();
        html! {
            figure.chart {
                figcaption id=(caption_id) { (self.title) }
                @if measured == 0 {
                    p.muted { "Nothing measured yet." }
                }
                svg id=(self.id) viewBox=(format!("0 0 {W} {H}")) role="img" aria-labelledby=(caption_id) preserveAspectRatio="xMidYMid meet" {
                    // Grid and y axis: 0, 0.25, … 1.
                    @for i in 0..=4 {
                        @let v = f64::from(i) / 4.0;
                        line.grid x1=(fmt(LEFT)) x2=(fmt(W - RIGHT)) y1=(fmt(sy(v))) y2=(fmt(sy(v))) {}
                        text.tick x=(fmt(LEFT - 6.0)) y=(fmt(sy(v) + 4.0)) text-anchor="end" { (format!("{v:.2}")) }
                    }
                    @for x in x_ticks(&xs) {
                        text.tick x=(fmt(sx(x))) y=(fmt(H - BOTTOM + 16.0)) text-anchor="middle" { (x) }
                    }
                    text.axis x=(fmt(LEFT + (W - LEFT - RIGHT) / 2.0)) y=(fmt(H - 4.0)) text-anchor="middle" { (self.x_label) }
                    @for (i, s) in self.series.iter().enumerate() {
                        @let (colour, dash, m) = style(i);
                        @let pts: Vec<(u32, f64)> = s.points.iter().filter_map(|(x, v)| v.map(|v| (*x, v))).collect();
                        @if pts.len() > 1 {
                            polyline.line data-series=(s.key) fill="none" stroke=(colour) stroke-width="2" stroke-dasharray=(dash)
                                points=(pts.iter().map(|(x, v)| format!("{:.1},{:.1}", sx(*x), sy(*v))).collect::<Vec<_>>().join(" ")) {}
                        }
                        @for (x, v) in &pts {
                            (marker(m, sx(*x), sy(*v), colour, &s.key, *x, &format!("{} {} {}: {v:.3}", self.x_label, x, s.label)))
                        }
                    }
                }
                ul.legend {
                    @for (i, s) in self.series.iter().enumerate() {
                        @let (colour, dash, _) = style(i);
                        li {
                            svg.key width="28" height="10" aria-hidden="true" {
                                line x1="1" x2="27" y1="5" y2="5" stroke=(colour) stroke-width="2.5" stroke-dasharray=(dash) {}
                            }
                            (s.label)
                        }
                    }
                }
                details {
                    summary { "The numbers" }
                    div.scroll {
                        table.numbers {
                            thead { tr { th scope="col" { (self.x_label) } @for s in &self.series { th scope="col" { (s.label) } } } }
                            tbody {
                                @for x in &xs {
                                    tr {
                                        th scope="row" { (x) }
                                        @for s in &self.series {
                                            td.num { (num(s.points.iter().find(|p| p.0 == *x).and_then(|p| p.1))) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

impl BarChart {
    pub fn render(&self) -> Markup {
        let xs: Vec<u32> = self.bars.iter().map(|b| b.0).collect();
        let max = self.bars.iter().map(|b| b.1.iter().sum::<u64>()).max().unwrap_or(0).max(1);
        let slot = (W - LEFT - RIGHT) / self.bars.len().max(1) as f64;
        let bar_w = (slot * 0.7).clamp(2.0, 40.0);
        let sy = |v: f64| TOP + (1.0 - v / max as f64) * (H - TOP - BOTTOM);
        let caption_id = format!("{}-caption", self.id);
        let fills = ["#0b57d0", "url(#hatch)", "#7a4f00"];
        html! {
            figure.chart {
                figcaption id=(caption_id) { (self.title) }
                @if self.bars.is_empty() {
                    p.muted { "No rounds yet." }
                }
                svg id=(self.id) viewBox=(format!("0 0 {W} {H}")) role="img" aria-labelledby=(caption_id) {
                    defs {
                        pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)" {
                            rect width="6" height="6" fill="#fbe9e7" {}
                            line x1="0" y1="0" x2="0" y2="6" stroke="#b3261e" stroke-width="3" {}
                        }
                    }
                    @for v in [0, max / 2, max] {
                        line.grid x1=(fmt(LEFT)) x2=(fmt(W - RIGHT)) y1=(fmt(sy(v as f64))) y2=(fmt(sy(v as f64))) {}
                        text.tick x=(fmt(LEFT - 6.0)) y=(fmt(sy(v as f64) + 4.0)) text-anchor="end" { (v) }
                    }
                    @for (i, (x, counts)) in self.bars.iter().enumerate() {
                        @let cx = LEFT + slot * (i as f64 + 0.5);
                        // Each stack's (base, count), bottom first.
                        @let stacked: Vec<(u64, u64)> = counts.iter().scan(0u64, |base, c| { let b = *base; *base += c; Some((b, *c)) }).collect();
                        g.bar data-x=(x) {
                            title { (format!("{} {x}: ", self.x_label)) (self.stacks.iter().zip(counts).map(|((_, l), c)| format!("{c} {l}")).collect::<Vec<_>>().join(", ")) }
                            @for (j, &(base, c)) in stacked.iter().enumerate() {
                                @if c > 0 {
                                    rect data-stack=(self.stacks.get(j).map_or("", |s| s.0.as_str())) x=(fmt(cx - bar_w / 2.0)) y=(fmt(sy((base + c) as f64)))
                                        width=(fmt(bar_w)) height=(fmt(sy(base as f64) - sy((base + c) as f64))) fill=(fills[j % fills.len()]) stroke="#1a1a1a" stroke-width="0.5" {}
                                }
                            }
                        }
                    }
                    @for x in x_ticks(&xs) {
                        @let i = xs.iter().position(|v| *v == x).unwrap_or(0);
                        text.tick x=(fmt(LEFT + slot * (i as f64 + 0.5))) y=(fmt(H - BOTTOM + 16.0)) text-anchor="middle" { (x) }
                    }
                    text.axis x=(fmt(LEFT + (W - LEFT - RIGHT) / 2.0)) y=(fmt(H - 4.0)) text-anchor="middle" { (self.x_label) }
                }
                ul.legend {
                    @for (j, (_, label)) in self.stacks.iter().enumerate() {
                        li {
                            svg.key width="14" height="14" aria-hidden="true" {
                                @if j == 1 {
                                    rect width="14" height="14" fill="#fbe9e7" stroke="#b3261e" stroke-width="3" {}
                                } @else {
                                    rect width="14" height="14" fill=(fills[j % fills.len()]) {}
                                }
                            }
                            (label)
                        }
                    }
                }
                details {
                    summary { "The numbers" }
                    div.scroll {
                        table.numbers {
                            thead { tr { th scope="col" { (self.x_label) } @for (_, l) in &self.stacks { th scope="col" { (l) } } } }
                            tbody {
                                @for (x, counts) in &self.bars {
                                    tr { th scope="row" { (x) } @for c in counts { td.num { (c) } } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A confusion matrix as a table whose cells are shaded by the share of their row (the
/// table is its own text equivalent). Crisis classes are marked.
pub fn confusion(id: &str, labels: &[String], rows: &[Vec<u64>], crisis: impl Fn(&str) -> bool) -> Markup {
    html! {
        div.scroll {
            table.heat id=(id) {
                caption { "Confusion matrix: rows are the true class, columns the predicted class; shading is the share of the row" }
                thead {
                    tr {
                        th scope="col" { "true \\ predicted" }
                        @for l in labels { th.rot scope="col" title=(l) { span { (l) } } }
                    }
                }
                tbody {
                    @for (i, l) in labels.iter().enumerate() {
                        @let row = rows.get(i).cloned().unwrap_or_default();
                        @let total = row.iter().sum::<u64>().max(1) as f64;
                        tr {
                            th scope="row" class=[crisis(l).then_some("crisis")] { (l) @if crisis(l) { " " span.tag { "crisis" } } }
                            @for (j, c) in row.iter().enumerate() {
                                @let share = *c as f64 / total;
                                // Lightness from 98% (nothing) to 30% (the whole row). Dark
                                // text needs at least 56%, white text at most 50% (4.5:1 both):
                                // the band between snaps to 50%.
                                @let raw = 98.0 - share * 68.0;
                                @let light = if raw < 56.0 { raw.min(50.0) } else { raw };
                                td.num style=(format!("background:hsl(215 70% {light:.0}%);color:{}", if light <= 50.0 { "#fff" } else { "#1a1a1a" }))
                                    title=(format!("true {l}, predicted {}: {c} ({:.0}% of the row)", labels.get(j).map_or("?", |s| s.as_str()), share * 100.0))
                                    class=[(i == j).then_some("diag")] { (c) }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(u32, Option<f64>)>) -> String {
        LineChart {
            id: "c".into(),
            title: "t <b>".into(),
            x_label: "round".into(),
            series: vec![Series { key: "accuracy".into(), label: "Accuracy".into(), points }],
        }
        .render()
        .into_string()
    }

    #[test]
    fn a_point_per_measured_value_and_a_row_per_round() {
        let svg = chart(vec![(0, Some(0.1)), (1, None), (2, Some(0.5)), (3, Some(1.2))]);
        assert_eq!(svg.matches("class=\"pt\"").count(), 3, "{svg}");
        assert_eq!(svg.matches("<th scope=\"row\">").count(), 4);
        // Titles are escaped; the missing value reads as a dash in the table.
        assert!(svg.contains("t &lt;b&gt;") && !svg.contains("t <b>"));
        assert!(svg.contains("<td class=\"num\">—</td>"));
        // Values are clamped into the plot.
        assert!(!svg.contains("cy=\"-"));
    }

    #[test]
    fn empty_charts_say_so() {
        assert!(chart(vec![]).contains("Nothing measured yet."));
        let bars =
            BarChart { id: "b".into(), title: "p".into(), x_label: "round".into(), stacks: vec![], bars: vec![] };
        assert!(bars.render().into_string().contains("No rounds yet."));
    }

    #[test]
    fn bars_stack_their_counts() {
        let b = BarChart {
            id: "b".into(),
            title: "p".into(),
            x_label: "round".into(),
            stacks: vec![("in".into(), "contributed".into()), ("out".into(), "dropped".into())],
            bars: vec![(1, vec![3, 1]), (2, vec![4, 0])],
        }
        .render()
        .into_string();
        assert_eq!(b.matches("class=\"bar\"").count(), 2);
        assert_eq!(b.matches("data-stack=\"out\"").count(), 1, "a zero stack draws nothing");
        assert!(b.contains("round 1: 3 contributed, 1 dropped"));
    }

    #[test]
    fn confusion_cells_shade_by_row_and_stay_readable() {
        let labels = vec!["suicidewatch".to_owned(), "lonely".to_owned()];
        let h = confusion("m", &labels, &[vec![9, 1], vec![0, 0]], |l| l.contains("suicid")).into_string();
        assert!(h.contains("hsl(215 70% 37%);color:#fff"), "{h}");
        assert!(h.contains("hsl(215 70% 91%);color:#1a1a1a"));
        assert!(h.contains("class=\"crisis\""));
    }
}
