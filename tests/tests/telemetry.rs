//! The alert rules in `dashboards/`, checked by Prometheus' own tool.

use std::path::PathBuf;
use std::process::Command;

use ferry_tests::require_command;

fn dashboards() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dashboards())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_check_and_each_fires_on_what_it_is_for_and_not_before() {
    if !require_command(
        "promtool",
        "cargo xtask setup installs it (Debian package prometheus)",
    ) {
        return;
    }
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}

#[test]
fn every_metric_an_alert_rule_reads_is_one_the_agent_serves() {
    let rules = std::fs::read_to_string(dashboards().join("alerts.yml")).unwrap();
    let readme = std::fs::read_to_string(dashboards().join("../README.md")).unwrap();
    let mut names: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("ferry_") && !w.starts_with("ferry_action"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(!names.is_empty());
    for n in names {
        // A histogram's series are its name with _bucket, _count or _sum.
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(n);
        assert!(
            readme.contains(&format!("`{n}`")) || readme.contains(&format!("`{base}`")),
            "alerts.yml reads {n}, which the README's metrics table does not list"
        );
    }
}
