//! Grafana's dashboards without Grafana: every time-series, stat and gauge panel of the
//! dashboards' JSON drawn as a static SVG chart in one self-contained HTML page, from a
//! real Prometheus's data over a time range, with marked moments (a policy decision, a
//! migration's start and end, an alert) on every chart's time axis.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use ferry_tests::agent::request;
use serde_json::Value;

/// A moment to mark on every chart's time axis (a policy decision, a migration's start/end, an alert).
pub(crate) struct Mark {
    pub t_unix_ms: u64,
    pub label: String,
    pub detail: String,
}

/// What [`write`] drew.
pub(crate) struct Drawn {
    pub charts: usize,
    /// `dashboard / panel` of every chart without a point drawn (no data, or its query failed).
    pub empty: Vec<String>,
}

/// What a headless Chromium made of a report.
pub(crate) struct BrowserCheck {
    pub charts: usize,
    pub charts_with_data: usize,
    /// Every console message: the page itself writes none, so each is a fault.
    pub console_errors: Vec<String>,
}

/// Far under Prometheus's 11,000 per series: the page stays small and a line still reads as a curve.
const MAX_POINTS: f64 = 300.0;
/// The scrape interval of the lab's and the tests' Prometheus.
const SCRAPE_SECS: f64 = 1.0;
/// Beyond this a chart is a blur and its legend longer than the chart.
const MAX_SERIES: usize = 40;
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
];
const CHROMIUM_TIMEOUT_SECS: u32 = 90;

/// The time range of every query, and the step that keeps each series under [`MAX_POINTS`].
struct Range {
    start: f64,
    end: f64,
    step: f64,
}

impl Range {
    fn new(start: f64, end: f64) -> Self {
        let step = ((end - start) / (MAX_POINTS - 1.0)).ceil().max(1.0);
        Self { start, end, step }
    }

    fn contains(&self, t: f64) -> bool {
        (self.start..=self.end).contains(&t)
    }
}

/// Template variables by name, and what each becomes (None: all its values).
type Vars = [(String, Option<String>)];

/// One line of a chart.
struct Series {
    legend: String,
    points: Vec<(f64, f64)>,
}

struct Chart {
    title: String,
    kind: String,
    width: u32,
    unit: String,
    min: Option<f64>,
    max: Option<f64>,
    series: Vec<Series>,
    errors: Vec<String>,
    left_out: usize,
}

/// Queries `prometheus` (e.g. "127.0.0.1:9090", no scheme) over [start_unix, end_unix]
/// (seconds) for every panel target of every dashboard JSON file in `dashboards` (sorted
/// by file name), every template variable selecting all its values, and writes `out`:
/// one HTML page, a section per dashboard, a chart per panel, every mark on every chart.
pub(crate) fn write(
    prometheus: &str,
    dashboards: &Path,
    start_unix: f64,
    end_unix: f64,
    marks: &[Mark],
    out: &Path,
) -> Result<Drawn> {
    if !(start_unix.is_finite() && end_unix.is_finite() && start_unix < end_unix) {
        bail!("the report's range [{start_unix}, {end_unix}] is not a time range");
    }
    // A page of charts all saying "did not answer" helps nobody: say it once instead.
    if request(prometheus, "GET", "/api/v1/status/buildinfo", None, None).is_none() {
        bail!("Prometheus at {prometheus} does not answer");
    }
    let range = Range::new(start_unix, end_unix);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards)
        .with_context(|| format!("reading {}", dashboards.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no dashboard (*.json) in {}", dashboards.display());
    }
    let mut drawn = Drawn {
        charts: 0,
        empty: Vec::new(),
    };
    let (from, to) = (utc(start_unix), utc(end_unix));
    let mut html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Ferry dashboards, \
         {from} to {to} UTC</title><style>{STYLE}</style></head>\n<body>\n<h1>Ferry dashboards</h1>\n\
         <p class=\"range\">{from} to {to} UTC ({:.0} s, a point every {} s) from Prometheus at {}; \
         every template variable selects all its values.</p>\n",
        end_unix - start_unix,
        range.step,
        esc(prometheus),
    );
    if !marks.is_empty() {
        html.push_str("<table><tr><th>time (UTC)</th><th>mark</th><th>detail</th></tr>\n");
        for m in marks {
            let t = m.t_unix_ms as f64 / 1000.0;
            let outside = if range.contains(t) {
                ""
            } else {
                " (outside the range)"
            };
            let (label, detail) = (esc(&m.label), esc(&m.detail));
            let _ = writeln!(
                html,
                "<tr><td>{}{outside}</td><td>{label}</td><td>{detail}</td></tr>",
                utc(t)
            );
        }
        html.push_str("</table>\n");
    }
    for file in &files {
        section(&mut html, prometheus, file, &range, marks, &mut drawn);
    }
    html.push_str(SCRIPT);
    html.push_str("</body></html>\n");
    std::fs::write(out, html).with_context(|| format!("writing {}", out.display()))?;
    Ok(drawn)
}

const STYLE: &str = "body{font-family:sans-serif;margin:16px;color:#222;max-width:1400px}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 2px}\
h3{font-size:14px;margin:10px 0 0;grid-column:1/-1;border-bottom:1px solid #ddd}\
p{margin:2px 0 8px;font-size:13px}.range{color:#555}.err{color:#b00020;font-size:12px}\
.grid{display:grid;grid-template-columns:repeat(24,minmax(0,1fr));gap:10px}\
figure{margin:0;border:1px solid #ddd;border-radius:4px;padding:6px;min-width:0}\
figcaption{font-size:13px;font-weight:bold;margin-bottom:2px}\
svg.chart{width:100%;height:auto;display:block}\
ul.legend{list-style:none;margin:2px 0 0;padding:0;font-size:11px;line-height:1.35}\
ul.legend li{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}\
ul.legend i{display:inline-block;width:10px;height:3px;margin-right:4px;vertical-align:middle}\
ul.legend b{font-weight:normal;color:#555;margin-left:6px}\
table{border-collapse:collapse;font-size:12px;margin:6px 0}\
td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}";

/// Counts in the live DOM, so a headless browser's `--dump-dom` shows that the page loaded
/// and how many charts drew something; the height lets [`screenshot`] take the whole page.
const SCRIPT: &str = "<script>\n(function () {\n\
  var charts = document.querySelectorAll('svg.chart');\n  var withData = 0;\n\
  for (var i = 0; i < charts.length; i++) {\n\
    if (Number(charts[i].getAttribute('data-points')) > 0) { withData++; }\n  }\n\
  document.body.dataset.charts = String(charts.length);\n\
  document.body.dataset.chartsWithData = String(withData);\n\
  document.body.dataset.height = String(document.documentElement.scrollHeight);\n})();\n</script>\n";

/// A dashboard's section; one that cannot be read says why, and the others still show.
fn section(
    html: &mut String,
    prometheus: &str,
    file: &Path,
    range: &Range,
    marks: &[Mark],
    drawn: &mut Drawn,
) {
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let dashboard = match std::fs::read_to_string(file)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
    {
        Ok(d) => d,
        Err(e) => {
            let (name, e) = (esc(&name), esc(&e));
            let _ = writeln!(
                html,
                "<h2>{name}</h2><p class=\"err\">cannot read it: {e}</p>"
            );
            return;
        }
    };
    let title = dashboard["title"].as_str().unwrap_or(&name).to_owned();
    let _ = writeln!(
        html,
        "<section><h2>{} <small>({})</small></h2>",
        esc(&title),
        esc(&name)
    );
    if let Some(d) = dashboard["description"].as_str() {
        let _ = writeln!(html, "<p>{}</p>", esc(d));
    }
    let vars = template_vars(&dashboard, range);
    let mut panels = Vec::new();
    flatten(
        dashboard["panels"].as_array().map_or(&[], Vec::as_slice),
        &mut panels,
    );
    html.push_str("<div class=\"grid\">\n");
    for panel in panels {
        match panel["type"].as_str().unwrap_or_default() {
            "row" => {
                let _ = writeln!(
                    html,
                    "<h3>{}</h3>",
                    esc(panel["title"].as_str().unwrap_or_default())
                );
            }
            "timeseries" | "graph" | "stat" | "gauge" => {
                let chart = query_panel(prometheus, panel, &vars, range);
                let (figure, points) = figure(&chart, range, marks);
                html.push_str(&figure);
                drawn.charts += 1;
                if points == 0 {
                    drawn.empty.push(format!("{title} / {}", chart.title));
                }
            }
            // Text, tables, logs...: nothing a time range of Prometheus data draws.
            _ => {}
        }
    }
    html.push_str("</div></section>\n");
}

/// Panels in page order, rows among them; a collapsed row keeps its panels inside it.
fn flatten<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
    for p in panels {
        out.push(p);
        flatten(p["panels"].as_array().map_or(&[], Vec::as_slice), out);
    }
}

fn template_vars(dashboard: &Value, range: &Range) -> Vec<(String, Option<String>)> {
    let list = dashboard["templating"]["list"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let value = |v: &Value| match v["type"].as_str() {
        Some("interval") => Some(secs(rate_interval(range))),
        Some("constant" | "textbox") => v["query"].as_str().map(str::to_owned),
        _ => None,
    };
    list.iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), value(v))))
        .collect()
}

/// Grafana's own rule, with a floor of four scrapes so that a rate always sees two samples.
fn rate_interval(range: &Range) -> f64 {
    (range.step + SCRAPE_SECS).max(4.0 * SCRAPE_SECS)
}

fn secs(s: f64) -> String {
    format!("{}s", s.ceil() as u64)
}

/// `expr` with Grafana's variables replaced: the built-in intervals by durations that fit
/// the step, template variables by `.+` (a `=` or `!=` before one becoming `=~` or `!~`,
/// as Grafana does for a multi-value selection). An unknown one is left for Prometheus to
/// reject, in the chart.
fn substitute(expr: &str, vars: &Vars, range: &Range) -> String {
    let interval = range.step.max(4.0 * SCRAPE_SECS);
    let span = range.end - range.start;
    let mut out = String::with_capacity(expr.len() + 16);
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, used) = match after.strip_prefix('{') {
            // `${vm:regex}`: the format does not matter when every value is selected.
            Some(braced) => braced.find('}').map_or(("", 0), |end| {
                (braced[..end].split(':').next().unwrap_or_default(), end + 2)
            }),
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = match name {
            "__rate_interval" => Some(secs(rate_interval(range))),
            "__interval" => Some(secs(interval)),
            "__interval_ms" => Some(((interval * 1000.0) as u64).to_string()),
            "__range" => Some(secs(span)),
            "__range_s" => Some((span.ceil() as u64).to_string()),
            "__range_ms" => Some(((span * 1000.0) as u64).to_string()),
            _ => match vars.iter().find(|(n, _)| n == name) {
                Some((_, Some(v))) => Some(v.clone()),
                Some((_, None)) => {
                    if let Some(q) = out.chars().last().filter(|c| matches!(c, '"' | '\''))
                        && out[..out.len() - 1].ends_with('=')
                    {
                        out.truncate(out.len() - 2);
                        out.push_str(if out.ends_with('!') { "~" } else { "=~" });
                        out.push(q);
                    }
                    Some(".+".to_owned())
                }
                None => None,
            },
        };
        match value {
            Some(v) if used > 0 => {
                out.push_str(&v);
                rest = &after[used..];
            }
            _ => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn query_panel(prometheus: &str, panel: &Value, vars: &Vars, range: &Range) -> Chart {
    let defaults = &panel["fieldConfig"]["defaults"];
    let mut chart = Chart {
        title: panel["title"].as_str().unwrap_or("(untitled)").to_owned(),
        kind: panel["type"].as_str().unwrap_or_default().to_owned(),
        width: panel["gridPos"]["w"]
            .as_u64()
            .map_or(12, |w| w.clamp(4, 24) as u32),
        unit: defaults["unit"].as_str().unwrap_or_default().to_owned(),
        min: defaults["min"].as_f64(),
        max: defaults["max"].as_f64(),
        series: Vec::new(),
        errors: Vec::new(),
        left_out: 0,
    };
    let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
    let exprs: Vec<(&str, &Value)> = targets
        .iter()
        .filter(|t| t["hide"] != true)
        .filter_map(|t| Some((t["expr"].as_str().filter(|e| !e.trim().is_empty())?, t)))
        .collect();
    if exprs.is_empty() {
        chart
            .errors
            .push("the panel has no PromQL query".to_owned());
    }
    for (expr, target) in exprs {
        let expr = substitute(expr, vars, range);
        let raw: Vec<Raw> = match query_range(prometheus, &expr, range) {
            Ok(result) => result
                .iter()
                .map(parse_series)
                .filter(|r| !r.points.is_empty())
                .collect(),
            Err(e) => {
                chart.errors.push(format!("{expr}: {e}"));
                continue;
            }
        };
        let format = target["legendFormat"].as_str().unwrap_or_default();
        let names = legends(format, &raw_labels(&raw), &expr);
        for (r, legend) in raw.into_iter().zip(names) {
            if chart.series.len() < MAX_SERIES {
                chart.series.push(Series {
                    legend,
                    points: r.points,
                });
            } else {
                chart.left_out += 1;
            }
        }
    }
    chart
}

fn query_range(prometheus: &str, expr: &str, range: &Range) -> Result<Vec<Value>, String> {
    let path = format!(
        "/api/v1/query_range?query={}&start={:.3}&end={:.3}&step={}",
        ferry_tests::prometheus::encode(expr),
        range.start,
        range.end,
        range.step
    );
    let answer = request(prometheus, "GET", &path, None, None)
        .ok_or_else(|| format!("Prometheus at {prometheus} did not answer"))?;
    let v: Value = serde_json::from_str(&answer.body)
        .map_err(|_| format!("HTTP {}: {}", answer.status, clip(&answer.body, 200)))?;
    if v["status"] != "success" {
        let kind = v["errorType"].as_str().unwrap_or("error");
        return Err(format!(
            "{kind}: {}",
            v["error"].as_str().unwrap_or("(no message)")
        ));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// A returned series: its labels (sorted, `__name__` among them) and its finite points.
struct Raw {
    labels: Vec<(String, String)>,
    points: Vec<(f64, f64)>,
}

fn parse_series(v: &Value) -> Raw {
    let labels = v["metric"].as_object().map_or_else(Vec::new, |m| {
        let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
        m.iter().map(|(k, v)| (k.clone(), text(v))).collect()
    });
    let point = |p: &Value| {
        let t = p.get(0)?.as_f64()?;
        let y: f64 = p.get(1)?.as_str()?.parse().ok()?;
        (t.is_finite() && y.is_finite()).then_some((t, y))
    };
    let points = v["values"]
        .as_array()
        .map_or_else(Vec::new, |vs| vs.iter().filter_map(point).collect());
    Raw { labels, points }
}

fn raw_labels(raw: &[Raw]) -> Vec<&[(String, String)]> {
    raw.iter().map(|r| r.labels.as_slice()).collect()
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `name{k="v", ...}` of the `keys` a series has.
fn label_text(labels: &[(String, String)], keys: &[&str]) -> String {
    let name = keys
        .contains(&"__name__")
        .then(|| label(labels, "__name__"))
        .flatten();
    let pairs: Vec<String> = keys
        .iter()
        .filter(|k| **k != "__name__")
        .filter_map(|k| label(labels, k).map(|v| format!("{k}=\"{v}\"")))
        .collect();
    let name = name.unwrap_or_default();
    if pairs.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{}}}", pairs.join(", "))
    }
}

/// Legends as Grafana writes them (`{{label}}` in the target's legendFormat); without one,
/// only the labels that tell the series apart, which keeps them short.
fn legends(format: &str, series: &[&[(String, String)]], expr: &str) -> Vec<String> {
    let mut keys: Vec<&str> = series
        .iter()
        .flat_map(|l| l.iter().map(|(k, _)| k.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let varying: Vec<&str> = keys
        .iter()
        .copied()
        .filter(|k| series.iter().any(|l| label(l, k) != label(series[0], k)))
        .collect();
    let mut out: Vec<String> = series
        .iter()
        .map(|l| {
            if !format.trim().is_empty() && format != "__auto" {
                render_format(format, l)
            } else {
                let text = label_text(l, if varying.is_empty() { &keys } else { &varying });
                if text.is_empty() {
                    clip(expr, 80)
                } else {
                    text
                }
            }
        })
        .collect();
    // A fixed legend ("remaining") names every series alike once a variable selects them all.
    if (0..out.len()).any(|i| out[..i].contains(&out[i])) && !varying.is_empty() {
        for (legend, l) in out.iter_mut().zip(series) {
            let _ = write!(legend, " {}", label_text(l, &varying));
        }
    }
    out
}

fn render_format(format: &str, labels: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = format;
    while let Some(open) = rest.find("{{") {
        let Some(close) = rest[open..].find("}}").map(|c| open + c) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(label(labels, rest[open + 2..close].trim()).unwrap_or_default());
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}

/// A chart's `<figure>`, and the number of points its SVG draws.
fn figure(chart: &Chart, range: &Range, marks: &[Mark]) -> (String, usize) {
    let (svg, points) = svg(chart, range, marks);
    let mut f = format!(
        "<figure style=\"grid-column:span {}\"><figcaption>{}</figcaption>{svg}<ul class=\"legend\">",
        chart.width,
        esc(&chart.title)
    );
    for (s, color) in chart.series.iter().zip(PALETTE.iter().cycle()) {
        let last = s
            .points
            .last()
            .map_or_else(String::new, |p| fmt_value(p.1, &chart.unit));
        let (legend, last) = (esc(&s.legend), esc(&last));
        let swatch = format!("<i style=\"background:{color}\"></i>");
        let _ = write!(
            f,
            "<li title=\"{legend}\">{swatch}{legend}<b>{last}</b></li>"
        );
    }
    if chart.left_out > 0 {
        let _ = write!(
            f,
            "<li>… and {} more series, not drawn</li>",
            chart.left_out
        );
    }
    f.push_str("</ul>");
    for e in &chart.errors {
        let _ = write!(f, "<p class=\"err\">{}</p>", esc(e));
    }
    f.push_str("</figure>\n");
    (f, points)
}

/// Where a chart's plot sits in its SVG, and the values at its edges.
struct Plot {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    start: f64,
    end: f64,
    /// The value axis's ends, in the unit shown (MiB, ms...).
    y0: f64,
    y1: f64,
}

impl Plot {
    fn x(&self, t: f64) -> f64 {
        self.left + (t - self.start) / (self.end - self.start) * self.width
    }

    /// The top tick a little below the frame, so that a line at the maximum does not run along it.
    fn y(&self, shown: f64) -> f64 {
        let share = (shown - self.y0) / (self.y1 - self.y0);
        self.top + self.height - (share * (self.height - 6.0)).clamp(0.0, self.height)
    }
}

/// Time labels at a round interval that leaves each about 80 px.
const TIME_TICKS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    21600.0, 43200.0,
];

fn svg(chart: &Chart, range: &Range, marks: &[Mark]) -> (String, usize) {
    let stat = matches!(chart.kind.as_str(), "stat" | "gauge");
    // About a CSS pixel per unit at the page's width, so that text keeps its size.
    let w = f64::from(chart.width) * 57.0;
    let h = if stat { 120.0 } else { 220.0 };
    let values = chart.series.iter().flat_map(|s| &s.points).map(|p| p.1);
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (chart.min.unwrap_or(lo), chart.max.unwrap_or(hi));
    let hi = if hi > lo { hi } else { lo + 1.0 };
    let (base, scales) = units(&chart.unit);
    let (factor, suffix) = pick(&scales, lo.abs().max(hi.abs()) * base);
    let shown = base / factor;
    let tick = nice_step((hi - lo) * shown / if stat { 2.0 } else { 4.0 });
    let plot = Plot {
        left: 62.0,
        top: 8.0,
        width: w - 72.0,
        height: h - 28.0,
        start: range.start,
        end: range.end,
        y0: (lo * shown / tick).floor() * tick,
        y1: (hi * shown / tick).ceil() * tick,
    };
    let (left, top, right, bottom) = (plot.left, plot.top, w - 10.0, h - 20.0);
    let (lines, points) = lines_svg(chart, range, &plot, shown);
    let mut s = format!(
        "<svg class=\"chart\" data-points=\"{points}\" xmlns=\"http://www.w3.org/2000/svg\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\" fill=\"#555\">\
         <rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"#fcfcfc\" stroke=\"#ccc\"/>",
        plot.width, plot.height
    );
    // Counted, not accumulated: a step far smaller than the values would never advance them.
    let y_ticks = ((plot.y1 - plot.y0) / tick).round().min(20.0) as usize + 1;
    for v in (0..y_ticks)
        .filter(|_| points > 0)
        .map(|i| plot.y0 + i as f64 * tick)
    {
        let (yy, text) = (plot.y(v), esc(&format!("{}{suffix}", fmt_tick(v, tick))));
        let _ = write!(
            s,
            "<line x1=\"{left}\" x2=\"{right}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{text}</text>",
            left - 4.0,
            yy + 4.0,
        );
    }
    let fits = (plot.width / 80.0).floor().max(2.0);
    let span = range.end - range.start;
    let every = TIME_TICKS
        .into_iter()
        .find(|c| span / c <= fits)
        .unwrap_or(86400.0);
    let first = (range.start / every).ceil() * every;
    let count = ((range.end - first) / every).floor().clamp(0.0, 40.0) as usize + 1;
    for t in (0..count)
        .map(|i| first + i as f64 * every)
        .filter(|t| *t <= range.end)
    {
        let xx = plot.x(t);
        let anchor = if xx > w - 26.0 { "end" } else { "middle" };
        let _ = write!(
            s,
            "<line x1=\"{xx:.1}\" x2=\"{xx:.1}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#eee\"/>\
             <text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
            h - 5.0,
            hms(t),
        );
    }
    s.push_str(&lines);
    if points == 0 {
        let why = if chart.errors.is_empty() {
            "no data in this range"
        } else {
            "query error (below)"
        };
        let (cx, cy) = (left + plot.width / 2.0, top + plot.height / 2.0);
        let _ = write!(
            s,
            "<text x=\"{cx:.1}\" y=\"{cy:.1}\" text-anchor=\"middle\" font-size=\"13\" \
             fill=\"#999\">{why}</text>"
        );
    }
    s.push_str(&marks_svg(marks, range, &plot, stat));
    s.push_str("</svg>");
    (s, points)
}

/// A polyline per run of a series' points (`shown` converts them to the axis's unit), and
/// how many points they draw.
fn lines_svg(chart: &Chart, range: &Range, plot: &Plot, shown: f64) -> (String, usize) {
    let mut lines = String::new();
    let mut points = 0;
    for (s, color) in chart.series.iter().zip(PALETTE.iter().cycle()) {
        // Prometheus leaves out the steps without a sample: a line must not bridge them.
        let mut runs: Vec<Vec<String>> = Vec::new();
        let mut last = f64::NEG_INFINITY;
        for &(t, v) in s.points.iter().filter(|p| range.contains(p.0)) {
            if t - last > range.step * 1.5 {
                runs.push(Vec::new());
            }
            if let Some(run) = runs.last_mut() {
                run.push(format!("{:.1},{:.1}", plot.x(t), plot.y(v * shown)));
            }
            (last, points) = (t, points + 1);
        }
        for mut run in runs {
            // A lone point is a zero-length line, which round caps draw as a dot.
            let width = if run.len() == 1 {
                run.push(run[0].clone());
                4.0
            } else {
                1.5
            };
            let _ = write!(
                lines,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" \
                 stroke-linecap=\"round\" stroke-linejoin=\"round\"/>",
                run.join(" ")
            );
        }
    }
    (lines, points)
}

/// Each mark as a dashed line across the plot, its label on the highest row where it
/// prints over no earlier one, or none (its title and the page's table still give it)
/// when the marks crowd every row.
fn marks_svg(marks: &[Mark], range: &Range, plot: &Plot, stat: bool) -> String {
    let (top, bottom) = (plot.top, plot.top + plot.height);
    let mut shown: Vec<(f64, &Mark)> = marks
        .iter()
        .map(|m| (m.t_unix_ms as f64 / 1000.0, m))
        .filter(|(t, _)| range.contains(*t))
        .collect();
    shown.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut row_ends = vec![f64::NEG_INFINITY; if stat { 3 } else { 4 }];
    let mut s = String::new();
    for (at, m) in shown {
        let xx = plot.x(at);
        let short = clip(&m.label, if stat { 20 } else { 40 });
        // 10 px sans-serif averages under 6 px a character.
        let width = short.chars().count() as f64 * 6.0;
        let (tx, anchor, from, to) = if xx + 3.0 + width <= plot.left + plot.width {
            (xx + 3.0, "start", xx, xx + 3.0 + width)
        } else {
            (xx - 3.0, "end", xx - 3.0 - width, xx)
        };
        let (label, detail) = (esc(&m.label), esc(&m.detail));
        let _ = write!(
            s,
            "<g><title>{label} at {} UTC: {detail}</title><line x1=\"{xx:.1}\" x2=\"{xx:.1}\" \
             y1=\"{top}\" y2=\"{bottom}\" stroke=\"#222\" stroke-dasharray=\"4 3\"/>",
            hms(at),
        );
        if let Some(row) = row_ends.iter().position(|end| *end < from) {
            row_ends[row] = to + 4.0;
            let ty = top + 11.0 + row as f64 * 12.0;
            let _ = write!(
                s,
                "<text x=\"{tx:.1}\" y=\"{ty:.1}\" text-anchor=\"{anchor}\" font-size=\"10\" \
                 fill=\"#222\" stroke=\"#fff\" stroke-width=\"3\" paint-order=\"stroke\">{}</text>",
                esc(&short)
            );
        }
        s.push_str("</g>");
    }
    s
}

/// A unit's factor to its base unit (ms to s), and that unit's scales, smallest first.
fn units(unit: &str) -> (f64, Vec<(f64, &'static str)>) {
    let times = || {
        let names = [" ns", " µs", " ms", " s", " min", " h"];
        [1e-9, 1e-6, 1e-3, 1.0, 60.0, 3600.0]
            .into_iter()
            .zip(names)
            .collect()
    };
    let powers = |of: f64, names: &[&'static str]| {
        (0..)
            .map(|i| of.powi(i))
            .zip(names.iter().copied())
            .collect()
    };
    match unit {
        "bytes" => (1.0, powers(1024.0, &[" B", " KiB", " MiB", " GiB", " TiB"])),
        "Bps" => (
            1.0,
            powers(1000.0, &[" B/s", " kB/s", " MB/s", " GB/s", " TB/s"]),
        ),
        "s" => (1.0, times()),
        "ms" => (1e-3, times()),
        "percentunit" => (1.0, vec![(0.01, " %")]),
        "percent" => (1.0, vec![(1.0, " %")]),
        _ => (1.0, powers(1000.0, &["", " k", " M", " G", " T"])),
    }
}

/// The largest scale not above `magnitude` (in the base unit); zero takes the unscaled
/// unit ("0 s", not "0 ns").
fn pick(scales: &[(f64, &'static str)], magnitude: f64) -> (f64, &'static str) {
    let found = if magnitude > 0.0 {
        scales.iter().rev().find(|s| magnitude >= s.0)
    } else {
        scales.iter().find(|s| s.0 == 1.0)
    };
    found.or(scales.first()).copied().unwrap_or((1.0, ""))
}

/// 1, 2, 2.5 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0]
        .into_iter()
        .map(|m| m * p)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * p)
}

fn fmt_tick(v: f64, step: f64) -> String {
    let exact = |d: &usize| {
        let scaled = step * 10f64.powi(*d as i32);
        (scaled - scaled.round()).abs() < 1e-6
    };
    let decimals = (0..6).find(exact).unwrap_or(6);
    // -0.0 and 1e-17 print as the 0 they are.
    let v = if v.abs() < step / 1e6 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

/// A value with its unit, to three significant digits or so.
fn fmt_value(v: f64, unit: &str) -> String {
    let (base, scales) = units(unit);
    let (factor, suffix) = pick(&scales, v.abs() * base);
    let shown = v * base / factor;
    let decimals = match shown.abs() {
        a if a >= 100.0 || a == 0.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    };
    format!("{shown:.decimals$}{suffix}")
}

fn hms(t: f64) -> String {
    let s = (t.floor() as i64).rem_euclid(86400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time, by Howard Hinnant's days-to-civil algorithm.
fn utc(t: f64) -> String {
    let z = (t.floor() as i64).div_euclid(86400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {}", hms(t))
}

/// Text safe in HTML and SVG, as an element's content or a quoted attribute.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

fn clip(s: &str, chars: usize) -> String {
    match s.char_indices().nth(chars.saturating_sub(1)) {
        Some((cut, _)) if s.chars().count() > chars => format!("{}…", &s[..cut]),
        _ => s.to_owned(),
    }
}

/// Runs headless `chromium` with `args` on the page; its stdout and stderr.
fn chromium(args: &[&str], html: &Path) -> Result<(String, String)> {
    if !crate::util::have_command("chromium") {
        bail!("chromium is not installed (apt-get install chromium)");
    }
    let abs = html
        .canonicalize()
        .with_context(|| format!("finding {}", html.display()))?;
    let path = abs
        .to_str()
        .with_context(|| format!("{} is not UTF-8", abs.display()))?;
    let url = format!(
        "file://{}",
        path.split('/')
            .map(ferry_tests::prometheus::encode)
            .collect::<Vec<_>>()
            .join("/")
    );
    // coreutils' timeout, as a hung browser must not hang the lab.
    let out = Command::new("timeout")
        .arg(CHROMIUM_TIMEOUT_SECS.to_string())
        .args(["chromium", "--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--enable-logging=stderr", "--v=0"])
        .args(args)
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .context("running chromium")?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => Ok((String::from_utf8_lossy(&out.stdout).into_owned(), err)),
        Some(124) => bail!("chromium did not finish with {url} in {CHROMIUM_TIMEOUT_SECS} s"),
        _ => bail!(
            "chromium failed on {url} ({}): {}",
            out.status,
            clip(err.trim(), 2000)
        ),
    }
}

/// Loads the report in a headless Chromium: the charts its script counted, and every
/// console message (Chromium logs each as `…:INFO:CONSOLE:<line>] "<message>", source: …`).
pub(crate) fn check_in_browser(html: &Path) -> Result<BrowserCheck> {
    let (dom, log) = chromium(&["--dump-dom"], html)?;
    let body = body_attrs(&dom);
    let count = |name: &str| -> Result<usize> {
        let (_, v) = body.iter().find(|(k, _)| k == name).with_context(|| {
            format!("the page's script did not set {name} on <body>: did it run?")
        })?;
        v.parse()
            .with_context(|| format!("{name}={v:?} is not a count"))
    };
    Ok(BrowserCheck {
        charts: count("data-charts")?,
        charts_with_data: count("data-charts-with-data")?,
        console_errors: console_messages(&log),
    })
}

/// A PNG of the whole report, 1400 pixels wide and as tall as the page.
pub(crate) fn screenshot(html: &Path, png: &Path) -> Result<()> {
    let (dom, _) = chromium(&["--dump-dom", "--window-size=1400,1000"], html)?;
    let height = body_attrs(&dom)
        .into_iter()
        .find(|(k, _)| k == "data-height")
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .map_or(2400, |h| h.clamp(600, 16000));
    let _ = std::fs::remove_file(png);
    let size = format!("--window-size=1400,{height}");
    let to = format!("--screenshot={}", png.display());
    chromium(&["--hide-scrollbars", &size, &to], html)?;
    match std::fs::metadata(png) {
        Ok(m) if m.len() > 0 => Ok(()),
        _ => bail!("chromium wrote no screenshot at {}", png.display()),
    }
}

/// The attributes of the dumped DOM's `<body>` tag.
fn body_attrs(dom: &str) -> Vec<(String, String)> {
    let tag = dom
        .find("<body")
        .and_then(|i| dom[i + 5..].split_once('>'))
        .map_or("", |(t, _)| t);
    let mut out = Vec::new();
    let mut rest = tag;
    while let Some((name, after)) = rest.split_once("=\"") {
        let Some((value, next)) = after.split_once('"') else {
            break;
        };
        out.push((name.trim().to_owned(), value.to_owned()));
        rest = next;
    }
    out
}

fn console_messages(log: &str) -> Vec<String> {
    let message = |l: &str| l.split_once("] ").map_or(l, |(_, m)| m).to_owned();
    log.lines()
        .filter_map(|l| l.find(":CONSOLE").map(|i| message(&l[i..])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn variables_select_every_value_and_intervals_fit_the_step() {
        let vars = [("vm".to_owned(), None), ("instance".to_owned(), None)];
        let short = Range::new(0.0, 20.0);
        assert_eq!(short.step, 1.0);
        assert_eq!(
            substitute(
                r#"rate(x{vm="$vm",i=~"$instance",h!="${vm}"}[$__rate_interval])"#,
                &vars,
                &short
            ),
            r#"rate(x{vm=~".+",i=~".+",h!~".+"}[4s])"#
        );
        let hour = Range::new(0.0, 3600.0);
        assert_eq!(hour.step, 13.0, "at most 300 points");
        assert_eq!(
            substitute(
                "increase(y[$__interval]) $__range_s $unknown ${ $",
                &vars,
                &hour
            ),
            "increase(y[13s]) 3600 $unknown ${ $"
        );
        assert_eq!(
            substitute("rate(z[${__rate_interval}])", &vars, &hour),
            "rate(z[14s])"
        );
    }

    #[test]
    fn legends_use_the_format_and_tell_alike_series_apart() {
        let a = labels(&[("instance", "a:1"), ("vm", "web-0")]);
        let b = labels(&[("instance", "a:1"), ("vm", "web-1")]);
        let both = [a.as_slice(), b.as_slice()];
        assert_eq!(
            legends("{{vm}} ({{ instance }})", &both, "e"),
            ["web-0 (a:1)", "web-1 (a:1)"]
        );
        assert_eq!(
            legends("remaining", &both, "e"),
            ["remaining {vm=\"web-0\"}", "remaining {vm=\"web-1\"}"]
        );
        assert_eq!(
            legends("", &both, "e"),
            ["{vm=\"web-0\"}", "{vm=\"web-1\"}"]
        );
        let up = labels(&[("__name__", "up"), ("job", "p")]);
        assert_eq!(legends("", &[up.as_slice()], "e"), ["up{job=\"p\"}"]);
        assert_eq!(legends("", &[&[]], "sum(x)"), ["sum(x)"]);
        assert_eq!(render_format("{{vm}} {{open", &a), "web-0 {{open");
    }

    #[test]
    fn only_finite_points_are_kept() {
        let v = serde_json::json!({
            "metric": {"__name__": "m", "vm": "<b>"},
            "values": [[1.0, "1"], [2.0, "NaN"], [3.0, "+Inf"], [4.0, "-Inf"], [5.0, "2.5"], [6, 7]]
        });
        let r = parse_series(&v);
        assert_eq!(r.points, [(1.0, 1.0), (5.0, 2.5)]);
        assert_eq!(label(&r.labels, "vm"), Some("<b>"));
        assert!(parse_series(&Value::Null).points.is_empty());
    }

    #[test]
    fn values_and_ticks_carry_their_units() {
        assert_eq!(fmt_value(1536.0, "bytes"), "1.50 KiB");
        assert_eq!(fmt_value(0.0123, "s"), "12.3 ms");
        assert_eq!(fmt_value(0.5, "percentunit"), "50.0 %");
        assert_eq!(fmt_value(2.5e6, "Bps"), "2.50 MB/s");
        assert_eq!(fmt_value(0.0, "s"), "0 s");
        assert_eq!(fmt_value(12345.0, "short"), "12.3 k");
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(2.2), 2.5);
        assert_eq!(nice_step(f64::NAN), 1.0);
        assert_eq!(fmt_tick(7.5, 2.5), "7.5");
        assert_eq!(fmt_tick(0.3, 0.1), "0.3");
        assert_eq!(fmt_tick(4.0, 2.0), "4");
        assert_eq!(utc(1_700_000_000.0), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(hms(86_399.9), "23:59:59");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(clip("abcd", 4), "abcd");
    }

    fn chart(series: Vec<Series>, errors: Vec<String>) -> Chart {
        Chart {
            title: "T".to_owned(),
            kind: "timeseries".to_owned(),
            width: 8,
            unit: "bytes".to_owned(),
            min: None,
            max: None,
            series,
            errors,
            left_out: 0,
        }
    }

    #[test]
    fn charts_escape_text_count_points_and_say_when_they_are_empty() {
        let r = Range::new(100.0, 200.0);
        let mark = |t_unix_ms, label: &str, detail: &str| Mark {
            t_unix_ms,
            label: label.to_owned(),
            detail: detail.to_owned(),
        };
        let marks = [
            mark(
                150_000,
                "<script>alert(1)</script>",
                "a \"quoted\" & 'odd' detail",
            ),
            mark(999_000, "later", ""),
        ];
        // A gap of several steps after 102: two runs, the last a lone point.
        let points = vec![(100.0, 1.0), (101.0, 2.0), (102.0, 3.0), (150.0, 4.0)];
        let series = vec![Series {
            legend: "vm=\"<x>\"".to_owned(),
            points,
        }];
        let (html, points) = figure(&chart(series, Vec::new()), &r, &marks);
        assert_eq!(points, 4);
        assert!(html.contains("data-points=\"4\""));
        assert_eq!(html.matches("<polyline").count(), 2);
        assert!(!html.contains("<script>") && !html.contains("<x>"));
        assert!(
            html.contains("&lt;script&gt;")
                && html.contains("&quot;quoted&quot; &amp; &#39;odd&#39;")
        );
        assert!(
            !html.contains("later"),
            "a mark outside the range is not drawn"
        );

        let (empty, points) = figure(&chart(Vec::new(), Vec::new()), &r, &marks);
        assert_eq!(points, 0);
        assert!(empty.contains("no data in this range") && empty.contains("data-points=\"0\""));
        let (failed, _) = figure(
            &chart(Vec::new(), vec!["parse error <at> 3".to_owned()]),
            &r,
            &[],
        );
        assert!(failed.contains("query error") && failed.contains("parse error &lt;at&gt; 3"));
    }

    #[test]
    fn crowded_marks_keep_their_lines_and_leave_out_labels_that_would_overlap() {
        let marks: Vec<Mark> = (0..6)
            .map(|i| Mark {
                t_unix_ms: 50_000 + i,
                label: format!("m{i}"),
                detail: String::new(),
            })
            .collect();
        let range = Range::new(0.0, 100.0);
        let (start, end, y0, y1) = (range.start, range.end, 0.0, 1.0);
        let (left, top, width, height) = (0.0, 0.0, 500.0, 200.0);
        let plot = Plot {
            left,
            top,
            width,
            height,
            start,
            end,
            y0,
            y1,
        };
        let s = marks_svg(&marks, &range, &plot, false);
        assert_eq!(s.matches("<line").count(), 6);
        assert_eq!(s.matches("<text").count(), 4);
        assert_eq!(s.matches("<title>").count(), 6);
    }

    #[test]
    fn no_prometheus_and_no_range_are_errors_not_panics() {
        let dir = std::env::temp_dir();
        let out = dir.join(format!("ferry-report-{}.html", std::process::id()));
        let nobody = format!("127.0.0.1:{}", ferry_tests::free_port());
        let e = write(&nobody, &dir, 0.0, 10.0, &[], &out).err().unwrap();
        assert!(e.to_string().contains("does not answer"), "{e}");
        assert!(write(&nobody, &dir, 10.0, 10.0, &[], &out).is_err());
        assert!(write(&nobody, &dir, f64::NAN, 10.0, &[], &out).is_err());
        assert!(!out.exists());
    }

    #[test]
    fn a_browser_counts_the_charts_with_points_and_takes_the_whole_page() {
        let r = Range::new(100.0, 200.0);
        let points = vec![(100.0, 1.0), (101.0, 2.0)];
        let series = vec![Series {
            legend: "a".to_owned(),
            points,
        }];
        let (with_data, _) = figure(&chart(series, Vec::new()), &r, &[]);
        let (without, _) = figure(&chart(Vec::new(), Vec::new()), &r, &[]);
        let dir = std::env::temp_dir();
        let (html, png) = (
            dir.join(format!("ferry-report-{}-check.html", std::process::id())),
            dir.join(format!("ferry-report-{}-check.png", std::process::id())),
        );
        let page = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>{with_data}{without}{SCRIPT}</body></html>"
        );
        std::fs::write(&html, page).unwrap();
        let checked = check_in_browser(&html);
        let shot = screenshot(&html, &png);
        let png_head = std::fs::read(&png)
            .map(|b| b[..8.min(b.len())].to_vec())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&html);
        let _ = std::fs::remove_file(&png);
        if !crate::util::have_command("chromium") {
            // Without it, both say what is missing instead.
            assert!(checked.err().unwrap().to_string().contains("chromium"));
            assert!(shot.err().unwrap().to_string().contains("chromium"));
            return;
        }
        let checked = checked.unwrap();
        assert_eq!((checked.charts, checked.charts_with_data), (2, 1));
        assert_eq!(checked.console_errors, Vec::<String>::new());
        shot.unwrap();
        assert_eq!(png_head, b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn the_dumped_dom_and_the_console_log_are_read() {
        let dom = "<!DOCTYPE html>\n<html><head></head><body data-charts=\"3\" \
                   data-charts-with-data=\"1\" data-height=\"493\"><p>hi</p></body></html>";
        let attrs = body_attrs(dom);
        assert_eq!(attrs.len(), 3);
        assert_eq!(
            attrs[1],
            ("data-charts-with-data".to_owned(), "1".to_owned())
        );
        assert!(body_attrs("<html>").is_empty());
        let log = "[1:2:1207/140918.1:ERROR:dbus/bus.cc:405] Failed to connect to the bus\n\
                   [1:1:1207/140918.7:INFO:CONSOLE:1] \"Uncaught ReferenceError: f is not \
                   defined\", source: file:///tmp/r.html (1)\n";
        assert_eq!(
            console_messages(log),
            ["\"Uncaught ReferenceError: f is not defined\", source: file:///tmp/r.html (1)"]
        );
    }
}
