//! The policy benchmark's verdicts (the figures, checked against the rows)
//! and `bench.md` with its SVG plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn ok(v: &Value) -> bool {
    v["outcome"] == "completed"
}

/// The distinct values of `key` in the rows, in the order they first appear.
fn distinct(rows: &[Value], key: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        let n = r[key].as_str().unwrap_or("").to_string();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

fn scenarios(rows: &[Value]) -> Vec<String> {
    distinct(rows, "scenario")
}

fn policies(rows: &[Value]) -> Vec<String> {
    distinct(rows, "policy")
}

/// The best preset that completed a scenario within its limits, by total time (a
/// preset configured as another here is that other's row, and is not counted twice).
fn best_static<'a>(rows: &'a [Value], scenario: &str) -> Option<&'a Value> {
    rows.iter()
        .filter(|r| {
            r["scenario"] == scenario
                && r["policy"] != "adaptive"
                && ok(r)
                && r["same_as"].is_null()
        })
        .min_by(|a, b| {
            f(a, "total_ms")
                .unwrap_or(f64::INFINITY)
                .total_cmp(&f(b, "total_ms").unwrap_or(f64::INFINITY))
        })
}

/// One line per figure the benchmark promises, each saying met or not.
pub fn summarize(rows: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let names = scenarios(rows);
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let adaptive: Vec<&Value> = rows.iter().filter(|r| r["policy"] == "adaptive").collect();
    if !adaptive.is_empty() {
        let done = adaptive.iter().filter(|r| ok(r)).count();
        out.push(format!(
            "adaptive completed {done} of {} scenario(s) within their limits: {}",
            adaptive.len(),
            verdict(done == adaptive.len())
        ));
    }
    let mut whole_grid = Vec::new();
    for p in policies(rows).iter().filter(|p| *p != "adaptive") {
        let mine: Vec<&Value> = rows.iter().filter(|r| &r["policy"] == p).collect();
        let done = mine.iter().filter(|r| ok(r)).count();
        let na = mine.iter().filter(|r| r["na"] == true).count();
        if done == mine.len() && done == names.len() {
            whole_grid.push(p.clone());
        }
        out.push(format!(
            "{p}: {done} of {} within limits{}{}",
            mine.len(),
            if na > 0 {
                format!(" ({na} n/a: post-copy not allowed)")
            } else {
                String::new()
            },
            if done == mine.len() && done == names.len() {
                " (completes the whole grid)"
            } else {
                ""
            }
        ));
    }
    if rows.iter().any(|r| r["policy"] != "adaptive") {
        out.push(format!(
            "no single preset completes every scenario: {}",
            if whole_grid.is_empty() {
                "met".to_string()
            } else {
                format!("NOT met ({})", whole_grid.join(", "))
            }
        ));
    }
    for s in &names {
        let groups = identical_groups(rows, s);
        if !groups.is_empty() {
            out.push(format!(
                "{s}: presets that behaved identically: {}",
                groups.join("; ")
            ));
        }
    }
    for s in &names {
        let Some(a) = adaptive.iter().find(|r| &r["scenario"] == s) else {
            continue;
        };
        let Some(b) = best_static(rows, s) else {
            out.push(format!("{s}: no static preset completed within the limits"));
            continue;
        };
        let (at, bt) = (f(a, "total_ms"), f(b, "total_ms"));
        let (ad, bd) = (f(a, "downtime_ms"), f(b, "downtime_ms"));
        let total_ratio = at.zip(bt).map(|(a, b)| a / b.max(1.0));
        let down_ok = match (ad, bd) {
            (Some(down), Some(best)) => {
                down <= 1.1 * best || down <= f(a, "max_downtime_ms").unwrap_or(0.0)
            }
            _ => false,
        };
        out.push(format!(
            "{s}: adaptive total {} vs best static ({}) {}: {:.2}x ({}); downtime {} vs {} ms ({})",
            fmt_s(at),
            b["policy"].as_str().unwrap_or(""),
            fmt_s(bt),
            total_ratio.unwrap_or(f64::NAN),
            verdict(ok(a) && total_ratio.is_some_and(|r| r <= 1.1)),
            fmt_ms(ad),
            fmt_ms(bd),
            verdict(ok(a) && down_ok),
        ));
    }
    for a in &adaptive {
        let s = a["scenario"].as_str().unwrap_or("");
        if let (Some(p), Some(m)) = (f(a, "predicted_total_ms"), f(a, "total_ms")) {
            let err = (p - m) / m;
            out.push(format!(
                "{s}: predicted total {} vs measured {} ({:+.0}%, goal within 25%: {})",
                fmt_s(Some(p)),
                fmt_s(Some(m)),
                err * 100.0,
                verdict(err.abs() <= 0.25)
            ));
        }
        if let (Some(p), Some(m)) = (f(a, "predicted_downtime_ms"), f(a, "downtime_ms")) {
            let within = (p - m).abs() <= (0.5 * m).max(5.0);
            out.push(format!(
                "{s}: predicted downtime {p:.1} ms vs measured {m:.1} ms (goal within 50% or 5 ms: {})",
                verdict(within)
            ));
        }
    }
    out
}

/// Groups of presets that behaved identically in a scenario (the rows' `behaved_as`
/// and `same_as`), each as "a = b = c".
fn identical_groups(rows: &[Value], scenario: &str) -> Vec<String> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for r in rows.iter().filter(|r| r["scenario"] == scenario) {
        let name = r["policy"].as_str().unwrap_or("").to_string();
        let mut group: Vec<String> = r["behaved_as"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&r["same_as"]))
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if group.is_empty() {
            continue;
        }
        group.push(name);
        group.sort();
        group.dedup();
        match groups
            .iter_mut()
            .find(|g| g.iter().any(|n| group.contains(n)))
        {
            Some(g) => {
                g.extend(group);
                g.sort();
                g.dedup();
            }
            None => groups.push(group),
        }
    }
    groups.iter().map(|g| g.join(" = ")).collect()
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |ms| format!("{:.1} s", ms / 1e3))
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |ms| format!("{ms:.1}"))
}

pub fn write_markdown(dir: &Path, rows: &[Value], summary: &[String]) -> Result<()> {
    let mut md = String::new();
    md.push_str("# Policy benchmark\n\n");
    md.push_str(
        "Real migrations of lab guests, each under the adaptive policy and under every peer \
         preset, with the scenario's operator limits. A row is *completed* only if every \
         run finished within the limits; figures are medians of the runs.\n\n",
    );
    md.push_str("## Verdicts\n\n");
    for line in summary {
        let _ = writeln!(md, "* {line}");
    }
    md.push_str("\n![total time](total_time.svg)\n\n![downtime](downtime.svg)\n\n");
    for s in scenarios(rows) {
        let first = rows.iter().find(|r| r["scenario"] == s.as_str());
        let _ = writeln!(
            md,
            "## {s}\n\nlink {}, limits: downtime {} ms, total {} s\n",
            first.map_or("", |r| r["link"].as_str().unwrap_or("")),
            first
                .and_then(|r| f(r, "max_downtime_ms"))
                .unwrap_or(f64::NAN),
            first
                .and_then(|r| f(r, "max_total_secs"))
                .unwrap_or(f64::NAN),
        );
        md.push_str(
            "| policy | outcome | runs | total | downtime ms | MB on wire | CPU ms | throttle % | \
             codec | predicted total | predicted downtime ms | behaved as |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in rows.iter().filter(|r| r["scenario"] == s.as_str()) {
            let same: Vec<&str> = r["behaved_as"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(std::iter::once(&r["same_as"]))
                .filter_map(Value::as_str)
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r["policy"].as_str().unwrap_or(""),
                match (r["na"] == true, r["same_as"].as_str()) {
                    (true, _) => "n/a (post-copy not allowed)".to_string(),
                    (false, Some(t)) => format!(
                        "configured as {t} here: {}",
                        r["outcome"].as_str().unwrap_or("")
                    ),
                    _ => r["outcome"].as_str().unwrap_or("").to_string(),
                },
                r["runs"],
                fmt_s(f(r, "total_ms")),
                fmt_ms(f(r, "downtime_ms")),
                f(r, "bytes_on_wire").map_or("-".into(), |b| format!("{:.0}", b / 1e6)),
                f(r, "cpu_ms").map_or("-".into(), |c| format!("{c:.0}")),
                f(r, "throttle_max_pct").map_or("-".into(), |t| format!("{t:.0}")),
                r["codec"].as_str().unwrap_or("-"),
                fmt_s(f(r, "predicted_total_ms")),
                fmt_ms(f(r, "predicted_downtime_ms")),
                if same.is_empty() {
                    "-".to_string()
                } else {
                    same.join(", ")
                },
            );
        }
        md.push('\n');
    }
    std::fs::write(dir.join("bench.md"), md)?;
    std::fs::write(
        dir.join("total_time.svg"),
        svg(rows, "total_ms", "total time", |v| {
            format!("{:.1} s", v / 1e3)
        }),
    )?;
    std::fs::write(
        dir.join("downtime.svg"),
        svg(rows, "downtime_ms", "downtime", |v| format!("{v:.1} ms")),
    )?;
    Ok(())
}

/// Small multiples: a panel per scenario, a bar per policy on the panel's own scale;
/// green bars kept the limits, grey ones did not.
fn svg(rows: &[Value], key: &str, title: &str, label: impl Fn(f64) -> String) -> String {
    const PANEL_W: f64 = 460.0;
    const BAR_H: f64 = 15.0;
    const NAME_W: f64 = 200.0;
    let names = scenarios(rows);
    let pols = policies(rows);
    let panel_h = 28.0 + BAR_H * pols.len() as f64 + 10.0;
    let cols = 2usize;
    let nrows = names.len().div_ceil(cols);
    let (w, h) = (PANEL_W * cols as f64 + 20.0, 40.0 + panel_h * nrows as f64);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">{title} by scenario and policy \
         (green: within the limits; grey: not)</text>\n"
    );
    for (i, scen) in names.iter().enumerate() {
        let (x0, y0) = (
            10.0 + (i % cols) as f64 * PANEL_W,
            40.0 + (i / cols) as f64 * panel_h,
        );
        let _ = writeln!(
            s,
            "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{scen}</text>",
            y0 + 14.0
        );
        let mine: Vec<&Value> = rows.iter().filter(|r| &r["scenario"] == scen).collect();
        let max = mine
            .iter()
            .filter_map(|r| f(r, key))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        for (j, p) in pols.iter().enumerate() {
            let y = y0 + 22.0 + j as f64 * BAR_H;
            let _ = writeln!(s, "<text x=\"{x0}\" y=\"{}\">{p}</text>", y + BAR_H - 4.0);
            let Some(r) = mine.iter().find(|r| &r["policy"] == p) else {
                continue;
            };
            let (text, len) = match f(r, key) {
                Some(v) => (label(v), (PANEL_W - NAME_W - 80.0) * v / max),
                None => ("-".to_string(), 0.0),
            };
            let colour = if ok(r) { "#2a9d8f" } else { "#bbbbbb" };
            let _ = writeln!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"{len:.1}\" height=\"{}\" fill=\"{colour}\"/>\
                 <text x=\"{}\" y=\"{}\">{text}</text>",
                x0 + NAME_W,
                y + 2.0,
                BAR_H - 4.0,
                x0 + NAME_W + len + 4.0,
                y + BAR_H - 4.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(s: &str, p: &str, outcome: &str, total: f64, down: f64) -> Value {
        json!({"scenario": s, "policy": p, "outcome": outcome, "total_ms": total,
               "downtime_ms": down, "max_downtime_ms": 50.0, "max_total_secs": 60.0,
               "predicted_total_ms": total * 1.2, "predicted_downtime_ms": down + 20.0})
    }

    #[test]
    fn verdicts_compare_adaptive_with_the_best_static_preset_that_completed() {
        let rows = vec![
            r("a", "adaptive", "completed", 1000.0, 4.0),
            r("a", "qemu-default", "completed", 950.0, 3.0),
            r("a", "libvirt-default", "completed", 2000.0, 3.0),
            r("b", "adaptive", "completed", 3000.0, 10.0),
            r("b", "qemu-default", "over limits: downtime", 1000.0, 300.0),
            r("b", "libvirt-default", "completed", 2000.0, 8.0),
        ];
        let s = summarize(&rows).join("\n");
        assert!(s.contains("adaptive completed 2 of 2"), "{s}");
        // a: 1000 / 950 = 1.05x, downtime 4 ms is within the 50 ms limit.
        assert!(
            s.contains("a: adaptive total 1.0 s vs best static (qemu-default) 0.9 s: 1.05x (met)"),
            "{s}"
        );
        // b: the faster qemu-default broke a limit; libvirt-default is the yardstick.
        assert!(
            s.contains("(libvirt-default) 2.0 s: 1.50x (NOT met)"),
            "{s}"
        );
        // Predictions 20% over: met; downtime 20 ms over 4 ms: not.
        assert!(s.contains("(+20%, goal within 25%: met)"), "{s}");
        assert!(
            s.contains(
                "predicted downtime 24.0 ms vs measured 4.0 ms (goal within 50% or 5 ms: NOT met)"
            ),
            "{s}"
        );
        assert!(
            s.contains("no single preset completes every scenario: NOT met (libvirt-default)"),
            "{s}"
        );
        let svg = svg(&rows, "total_ms", "total", |v| format!("{v}"));
        assert!(svg.contains("#bbbbbb") && svg.contains("#2a9d8f") && svg.ends_with("</svg>\n"));
    }

    #[test]
    fn n_a_twins_and_identical_presets_are_said_so_and_not_counted_as_results() {
        let mut rows = vec![
            r("a", "adaptive", "completed", 1000.0, 4.0),
            r("a", "qemu-default", "completed", 900.0, 3.0),
            r("a", "libvirt-default", "completed", 950.0, 3.0),
            r("a", "cloud-hypervisor", "completed", 960.0, 3.0),
            r(
                "a",
                "kubevirt-default",
                "over limits: downtime",
                900.0,
                90.0,
            ),
            json!({"scenario": "a", "policy": "libvirt-postcopy-after-precopy", "runs": 0,
                   "outcome": "n/a: post-copy not allowed", "na": true}),
        ];
        rows[2]["behaved_as"] = json!(["cloud-hypervisor"]);
        rows[3]["behaved_as"] = json!(["libvirt-default"]);
        let mut twin = rows[4].clone();
        twin["policy"] = json!("kubevirt-dynamic-downtime");
        twin["same_as"] = json!("kubevirt-default");
        rows.push(twin);
        let s = summarize(&rows).join("\n");
        assert!(
            s.contains("libvirt-postcopy-after-precopy: 0 of 1 within limits (1 n/a"),
            "{s}"
        );
        assert!(
            s.contains(
                "a: presets that behaved identically: cloud-hypervisor = libvirt-default; \
                 kubevirt-default = kubevirt-dynamic-downtime"
            ),
            "{s}"
        );
        let dir = std::env::temp_dir().join(format!("ferry-bench-md-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_markdown(&dir, &rows, &[]).unwrap();
        let md = std::fs::read_to_string(dir.join("bench.md")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(md.contains("| n/a (post-copy not allowed) |"), "{md}");
        assert!(
            md.contains("configured as kubevirt-default here: over limits"),
            "{md}"
        );
        assert!(md.contains("| libvirt-default |"), "{md}");
    }
}
