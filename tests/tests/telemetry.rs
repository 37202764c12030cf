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

/// `node dashboards/schema/validate.mjs FILE...`: (passed, what it printed).
fn validate(files: &[&std::path::Path]) -> (bool, String) {
    let out = Command::new("node")
        .arg(dashboards().join("schema/validate.mjs"))
        .args(files)
        .output()
        .expect("node runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The schema check's npm packages are installed, or the test fails naming them.
fn require_schema_tools() -> bool {
    if !require_command(
        "node",
        "cargo xtask setup installs it (Debian package nodejs)",
    ) {
        return false;
    }
    dashboards()
        .join("schema/node_modules/@grafana/schema")
        .is_dir()
        || ferry_tests::missing(
            "the dashboard schema tools (dashboards/schema/node_modules)",
            "cargo xtask setup installs them (npm ci in dashboards/schema)",
        )
}

#[test]
fn both_dashboards_validate_against_grafanas_own_dashboard_type_and_a_misspelt_key_fails() {
    if !require_schema_tools() {
        return;
    }
    let fleet = dashboards().join("ferry-fleet.json");
    let migration = dashboards().join("ferry-migration.json");
    let (ok, said) = validate(&[&fleet, &migration]);
    assert!(ok, "{said}");
    assert_eq!(
        said.matches(": ok against @grafana/schema").count(),
        2,
        "{said}"
    );
    // Strict where the types are: an unknown key at the dashboard's level and at a
    // panel's each fail, named.
    let dir = ferry_tests::TempDir::new("dashboard-schema");
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fleet).unwrap()).unwrap();
    d["refresh_rate"] = "5s".into();
    let panel = d["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["type"] == "timeseries")
        .unwrap();
    panel["titel"] = "typo".into();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, d.to_string()).unwrap();
    let (ok, said) = validate(&[&bad]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("(refresh_rate)") && said.contains("(titel)"),
        "{said}"
    );
    // A target without its query fails too (the types leave targets open).
    let mut d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&migration).unwrap()).unwrap();
    d["panels"][0]["targets"][0]
        .as_object_mut()
        .unwrap()
        .remove("expr");
    std::fs::write(&bad, d.to_string()).unwrap();
    let (ok, said) = validate(&[&bad]);
    assert!(!ok && said.contains("no PromQL expr"), "{said}");
}
