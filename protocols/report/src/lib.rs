//! Maeum's HTML: the pages of the coordinator's read-only console and the offline
//! reports (`models export`'s `report.html`, `maeum-audit report --html`,
//! `maeum-site report`). A core crate: values in, HTML strings out; no files, sockets
//! or clocks. Templates are [`maud`] macros, so every interpolated value is escaped at
//! compile time; charts are inline SVG drawn here with a text equivalent beside each
//! (see [`chart`]); the one stylesheet and the live-update script are constants embedded
//! in every page, so a page needs nothing from the network. Depends on `maeum-tlog`
//! (model cards, log entries) and nothing that serves or trains.

pub mod card;
pub mod chart;

pub use maud::{Markup, PreEscaped, html};

/// A whole page.
#[derive(Debug, Clone)]
pub struct Page<'a> {
    /// The `<title>` and the page's heading.
    pub title: &'a str,
    /// A line under the heading (e.g. the consortium, what the report covers).
    pub subtitle: &'a str,
    /// Navigation links (href, label); the one equal to `current` is marked.
    pub nav: &'a [(&'a str, &'a str)],
    pub current: &'a str,
    /// Whether the page refreshes its `<main>` in place ([`LIVE_JS`]).
    pub live: bool,
    /// When the page was made (ms since the epoch), shown in the footer.
    pub generated_ms: i64,
    /// Who made it (e.g. `maeum-coordinator 0.1.0`).
    pub generator: &'a str,
    pub body: Markup,
}

/// The stylesheet of every page: system fonts, readable at 1280×800 and at phone width,
/// colours with at least 4.5:1 contrast for text.
pub const CSS: &str = include_str!("style.css");

/// The console's live update: every 2 s it fetches the page's `<main>` again (header
/// `X-Maeum-Fragment: 1`) and swaps it in when it changed, without a reload. The
/// status line says when it last updated, or that the console is unreachable.
pub const LIVE_JS: &str = include_str!("live.js");

/// The request header that asks for only the `<main>` of a page.
pub const FRAGMENT_HEADER: &str = "x-maeum-fragment";

impl Page<'_> {
    /// The whole document.
    pub fn render(&self) -> String {
        html! {
            (maud::DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    meta name="color-scheme" content="light";
                    title { (self.title) " · Maeum" }
                    style { (PreEscaped(CSS)) }
                }
                body {
                    a.skip href="#live" { "Skip to content" }
                    header.top {
                        div.brand { "Maeum" }
                        @if !self.nav.is_empty() {
                            nav aria-label="Pages" {
                                ul {
                                    @for (href, label) in self.nav {
                                        li { a href=(href) aria-current=[(*href == self.current).then_some("page")] { (label) } }
                                    }
                                }
                            }
                        }
                    }
                    div.wrap {
                        h1 { (self.title) }
                        @if !self.subtitle.is_empty() { p.subtitle { (self.subtitle) } }
                        @if self.live {
                            p #status .status role="status" aria-live="polite" data-state="live" { "Live: this page updates itself." }
                        }
                        main #live { (self.body) }
                        footer {
                            "Made by " (self.generator) " at " (maeum_tlog::rfc3339(self.generated_ms)) "."
                            @if !self.live { " A static report: it needs nothing from the network." }
                        }
                    }
                    @if self.live { script { (PreEscaped(LIVE_JS)) } }
                }
            }
        }
        .into_string()
    }

    /// Only what goes inside `<main>` (the live update's answer).
    pub fn fragment(&self) -> String {
        self.body.clone().into_string()
    }
}

/// A time for people (UTC, to the second).
pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    let t = maeum_tlog::rfc3339(ms);
    // 2026-12-06T11:25:09.123Z -> 2026-12-06 11:25:09 UTC
    match t.split_once('T') {
        Some((d, rest)) => format!("{d} {} UTC", rest.get(..8).unwrap_or(rest)),
        None => t,
    }
}

/// A duration for people.
pub fn duration(ms: i64) -> String {
    match ms {
        ..0 => "—".into(),
        0..1_000 => format!("{ms} ms"),
        1_000..120_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

/// An audit-log entry's fields as `name: value` pairs (its canonical JSON without
/// `kind`), for tables of entries.
pub fn entry_fields(e: &maeum_tlog::Event) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(e) else { return String::new() };
    map.iter()
        .filter(|(k, _)| k.as_str() != "kind")
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => format!("{k}: {s}"),
            other => format!("{k}: {other}"),
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// A digest shortened for a table (the full one in its `title`).
pub fn short_digest(hex: &str) -> Markup {
    html! { code title=(hex) { (hex.get(..12).unwrap_or(hex)) "…" } }
}

/// A verdict badge: ok (green), bad (red), or neutral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Ok,
    Bad,
    Warn,
    Neutral,
}

pub fn badge(tone: Tone, text: &str) -> Markup {
    let class = match tone {
        Tone::Ok => "badge ok",
        Tone::Bad => "badge bad",
        Tone::Warn => "badge warn",
        Tone::Neutral => "badge",
    };
    // The word carries the meaning; the colour only repeats it.
    html! { span class=(class) { (text) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_one_self_contained_document() {
        let body = html! { p { "<script>alert(1)</script>" } };
        let p = Page {
            title: "Jobs & rounds",
            subtitle: "consortium \"x\"",
            nav: &[("/", "Overview"), ("/jobs", "Jobs")],
            current: "/jobs",
            live: true,
            generated_ms: 1_700_000_000_000,
            generator: "test",
            body,
        };
        let html = p.render();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "values are escaped");
        assert!(html.contains("Jobs &amp; rounds · Maeum"));
        assert!(html.contains("<a href=\"/jobs\" aria-current=\"page\">Jobs</a>"));
        assert!(html.contains("<a href=\"/\">Overview</a>"));
        // Nothing is fetched from elsewhere.
        for needle in ["http://", "https://", "src=", "<link"] {
            assert!(!html.contains(needle), "{needle} in the page");
        }
        assert_eq!(p.fragment(), "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>");
        let static_page = Page { live: false, ..p }.render();
        assert!(!static_page.contains("<script>"));
    }

    #[test]
    fn entries_read_as_fields() {
        let e = maeum_tlog::Event::JobDecision {
            job_id: "j".into(),
            site: "s".into(),
            accepted: false,
            reason: "no <b>".into(),
        };
        assert_eq!(entry_fields(&e), "accepted: false · job_id: j · reason: no <b> · site: s");
    }

    /// WCAG 2 contrast ratio of two `#rrggbb` colours.
    fn contrast(a: &str, b: &str) -> f64 {
        let lum = |hex: &str| {
            let c = |i: usize| {
                let v = f64::from(u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")) / 255.0;
                if v <= 0.03928 { v / 12.92 } else { ((v + 0.055) / 1.055).powf(2.4) }
            };
            0.2126 * c(1) + 0.7152 * c(3) + 0.0722 * c(5)
        };
        let (x, y) = (lum(a), lum(b));
        (x.max(y) + 0.05) / (x.min(y) + 0.05)
    }

    #[test]
    fn text_colours_pass_wcag_aa_contrast() {
        let var = |name: &str| {
            let at = CSS.find(&format!("--{name}: ")).expect(name) + name.len() + 4;
            CSS[at..at + 7].to_owned()
        };
        let (white, panel) = ("#ffffff", var("panel"));
        // Body text, muted text and links on the page and on panels.
        for fg in ["fg", "muted", "link", "ok", "bad", "warn"] {
            for bg in [white, panel.as_str()] {
                let r = contrast(&var(fg), bg);
                assert!(r >= 4.5, "--{fg} on {bg}: {r:.2}");
            }
        }
        // Badges (white on green/red), the warn badge, the header, the alert box.
        assert!(contrast("#ffffff", &var("ok")) >= 4.5);
        assert!(contrast("#ffffff", &var("bad")) >= 4.5);
        assert!(contrast(&var("warn"), "#fff4e0") >= 4.5);
        assert!(contrast("#ffffff", "#12263f") >= 4.5);
        assert!(contrast(&var("fg"), "#fdecea") >= 4.5);
        // Chart series against the chart panel (graphics: 3:1).
        for series in ["#0b57d0", "#7b1fa2", "#b3261e", "#1b6e20"] {
            assert!(contrast(series, &panel) >= 3.0, "{series}");
        }
        // The heat map (chart::confusion): dark text from 56% lightness up, white text
        // at 50% and below.
        assert!(contrast("#1a1a1a", &hsl_hex(215.0, 0.70, 0.56)) >= 4.5);
        assert!(contrast("#ffffff", &hsl_hex(215.0, 0.70, 0.50)) >= 4.5);
    }

    fn hsl_hex(h: f64, s: f64, l: f64) -> String {
        let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
        let x = c * (1.0 - ((h / 60.0) % 2.0 - 1.0).abs());
        let m = l - c / 2.0;
        let (r, g, b) = match (h / 60.0) as u32 {
            0 => (c, x, 0.0),
            1 => (x, c, 0.0),
            2 => (0.0, c, x),
            3 => (0.0, x, c),
            4 => (x, 0.0, c),
            _ => (c, 0.0, x),
        };
        let to = |v: f64| ((v + m) * 255.0).round() as u8;
        format!("#{:02x}{:02x}{:02x}", to(r), to(g), to(b))
    }

    #[test]
    fn times_and_durations_read_well() {
        assert_eq!(time(1_700_000_000_123), "2023-11-14 22:13:20 UTC");
        assert_eq!(time(0), "—");
        assert_eq!(duration(950), "950 ms");
        assert_eq!(duration(12_340), "12.3 s");
        assert_eq!(duration(185_000), "3 min 5 s");
        assert_eq!(duration(-1), "—");
    }
}
