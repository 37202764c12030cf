//! `POST /v1/alerts`: Alertmanager's webhook (payload version 4). Alertmanager
//! posts every alert to every agent; each acts only on alerts about its own host (a
//! `host` label carrying its `name`: evacuate it) or its own VMs (a `vm` label:
//! migrate that VM), and only on alerts a rule of its config matches.
//!
//! Alertmanager sends an alert again every `repeat_interval` and on every change of
//! its group, each time under the same fingerprint: a fingerprint already acted on
//! starts nothing. A `resolved` alert drops the VMs it queued that have not left yet.
//! This file holds the payload, the rules and the book of alerts; what the book
//! decides is carried out by the evacuation (evacuate.rs).

use std::collections::HashMap;

use ferry_api::agent::{AlertInfo, AlertOutcome};
use serde::Deserialize;

/// The webhook's payload, as Alertmanager sends it (fields Ferry does not use are
/// let through: Alertmanager adds some between versions of the same payload).
#[derive(Debug, Deserialize)]
pub struct Payload {
    pub version: String,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize)]
pub struct Alert {
    /// `firing` or `resolved`.
    pub status: String,
    pub labels: HashMap<String, String>,
    pub fingerprint: String,
}

impl Alert {
    fn name(&self) -> &str {
        self.labels.get("alertname").map_or("(no alertname)", |s| s)
    }
}

/// One of Alertmanager's matchers: `label="value"`, `!=`, `=~` or `!~`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    label: String,
    op: Op,
    /// For the regex forms: the alternatives (`warning|critical`).
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Equal,
    NotEqual,
    Matches,
    NotMatches,
}

impl Matcher {
    /// `label="value"` (quotes optional). The regex forms take alternations of
    /// literal values only (`severity=~"warning|critical"`): a full regex engine for
    /// this is more than a host agent should carry, and a matcher it cannot read is
    /// refused at start rather than read wrongly.
    pub fn parse(text: &str) -> Result<Self, String> {
        let at = text
            .find(['=', '!'])
            .ok_or_else(|| format!("{text:?}: not label=\"value\" (or !=, =~, !~)"))?;
        let label = text[..at].trim();
        let rest = &text[at..];
        let (op, value) = [
            ("=~", Op::Matches),
            ("!~", Op::NotMatches),
            ("!=", Op::NotEqual),
            ("=", Op::Equal),
        ]
        .into_iter()
        .find_map(|(s, op)| rest.strip_prefix(s).map(|v| (op, v)))
        .ok_or_else(|| format!("{text:?}: not label=\"value\" (or !=, =~, !~)"))?;
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("{text:?}: {label:?} is not a label name"));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let values: Vec<String> = match op {
            Op::Equal | Op::NotEqual => vec![value.to_owned()],
            Op::Matches | Op::NotMatches => {
                let alternatives: Vec<String> = value.split('|').map(str::to_owned).collect();
                if let Some(bad) = alternatives
                    .iter()
                    .find(|a| a.chars().any(|c| "\\.*+?()[]{}^$".contains(c)))
                {
                    return Err(format!(
                        "{text:?}: {bad:?} is not a literal value (only alternations such as \
                         \"warning|critical\" are supported)"
                    ));
                }
                alternatives
            }
        };
        Ok(Self {
            label: label.to_owned(),
            op,
            values,
        })
    }

    fn matches(&self, labels: &HashMap<String, String>) -> bool {
        // An absent label matches as the empty string, as in Alertmanager.
        let v = labels.get(&self.label).map_or("", |s| s);
        let any = self.values.iter().any(|x| x == v);
        match self.op {
            Op::Equal | Op::Matches => any,
            Op::NotEqual | Op::NotMatches => !any,
        }
    }
}

/// A rule of the agent's config: the alerts it acts on, and how the VMs move.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub matchers: Vec<Matcher>,
    /// The migration policy (None: the agent's default, adaptive).
    pub policy: Option<String>,
    /// Send the disks along (when the host's storage is what is failing, or is not
    /// shared with the peers).
    pub copy_storage: bool,
}

impl Rule {
    /// The rule an agent without `[[alert_rules]]` has: the alerts Ferry's own rules
    /// (dashboards/alerts.yml) mark as host health.
    pub fn default_rules() -> Vec<Rule> {
        vec![Rule {
            matchers: vec![Matcher {
                label: "ferry_action".into(),
                op: Op::Equal,
                values: vec!["migrate-away".into()],
            }],
            policy: None,
            copy_storage: false,
        }]
    }

    fn matches(&self, labels: &HashMap<String, String>) -> bool {
        self.matchers.iter().all(|m| m.matches(labels))
    }
}

/// What the book asks the evacuation to do for a firing alert.
#[derive(Debug, Clone, PartialEq)]
pub enum Act {
    /// Move every VM of this host.
    Evacuate,
    /// Move this VM.
    Migrate(String),
}

/// A firing alert the book acts on, for the evacuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub fingerprint: String,
    pub alertname: String,
    pub act: Act,
    pub rule: usize,
}

/// What one post asks for, once every alert in it was checked.
#[derive(Debug, Default)]
pub struct Verdict {
    pub outcomes: Vec<AlertOutcome>,
    pub orders: Vec<Order>,
    /// Fingerprints resolved: what they queued is dropped.
    pub resolved: Vec<String>,
}

/// Alerts kept at most: a fleet's firing alerts are far fewer; beyond this the
/// oldest resolved go first, then the oldest firing (they would act again if sent
/// again, which is a repeat's only risk).
const MAX_KEPT: usize = 10_000;

/// The alerts this agent was sent, by fingerprint.
pub struct Book {
    host: String,
    rules: Vec<Rule>,
    alerts: HashMap<String, AlertInfo>,
}

/// Why a payload is refused, whole: nothing in it is acted on.
#[derive(Debug, PartialEq)]
pub struct BadPayload(pub String);

impl Book {
    pub fn new(host: &str, rules: Vec<Rule>) -> Self {
        Self {
            host: host.to_owned(),
            rules,
            alerts: HashMap::new(),
        }
    }

    /// Checks every alert of `payload` first, so a bad one refuses the whole post
    /// and nothing happens; then books it: a new firing alert about this host or one
    /// of `is_here`'s VMs becomes an order, a repeat nothing, a resolved one drops
    /// what it queued.
    pub fn receive(
        &mut self,
        payload: &Payload,
        is_here: impl Fn(&str) -> bool,
        now_unix_ms: u64,
    ) -> Result<Verdict, BadPayload> {
        if payload.version != "4" {
            return Err(BadPayload(format!(
                "payload version {:?}: this agent reads Alertmanager's webhook version \"4\"",
                payload.version
            )));
        }
        let mut matched = Vec::with_capacity(payload.alerts.len());
        for (i, a) in payload.alerts.iter().enumerate() {
            if a.fingerprint.is_empty() {
                return Err(BadPayload(format!(
                    "alert {i} ({}) has no fingerprint",
                    a.name()
                )));
            }
            if a.status != "firing" && a.status != "resolved" {
                return Err(BadPayload(format!(
                    "alert {i} ({}): status {:?} is neither \"firing\" nor \"resolved\"",
                    a.name(),
                    a.status
                )));
            }
            let rule = self.rules.iter().position(|r| r.matches(&a.labels));
            if let Some(rule) = rule
                && !a.labels.contains_key("host")
                && !a.labels.contains_key("vm")
            {
                return Err(BadPayload(format!(
                    "alert {i} ({}) matches alert rule {rule} but has neither a `host` nor a \
                     `vm` label: nothing says what to move (Prometheus adds `host` per scrape \
                     target; see docs/API.md)",
                    a.name()
                )));
            }
            matched.push(rule);
        }
        let mut v = Verdict::default();
        for (a, rule) in payload.alerts.iter().zip(matched) {
            let outcome = |action: &str, reason: String| AlertOutcome {
                fingerprint: a.fingerprint.clone(),
                alertname: a.name().to_owned(),
                action: action.to_owned(),
                reason,
            };
            let Some(rule) = rule else {
                v.outcomes.push(outcome(
                    "ignored",
                    "no alert rule of this agent matches it".into(),
                ));
                continue;
            };
            let host = a.labels.get("host").cloned();
            let vm = a.labels.get("vm").cloned();
            if a.status == "resolved" {
                let known = self.alerts.get_mut(&a.fingerprint);
                // Only an alert that asked for moves has anything to cancel.
                let was_firing = known
                    .as_ref()
                    .is_some_and(|k| k.status == "firing" && k.action != "none");
                if let Some(k) = known {
                    k.status = "resolved".into();
                    k.queued.clear();
                }
                if was_firing {
                    v.resolved.push(a.fingerprint.clone());
                    v.outcomes.push(outcome(
                        "cancel",
                        "resolved: the VMs it queued that have not left yet stay".into(),
                    ));
                } else {
                    v.outcomes.push(outcome(
                        "ignored",
                        "resolved, and nothing was queued for it".into(),
                    ));
                }
                continue;
            }
            if let Some(k) = self.alerts.get_mut(&a.fingerprint)
                && k.status == "firing"
            {
                k.repeats += 1;
                v.outcomes.push(outcome(
                    "repeat",
                    format!("already acted on at {} (unix ms)", k.received_unix_ms),
                ));
                continue;
            }
            let (act, action, reason) = match (&vm, &host) {
                (Some(vm), _) if is_here(vm) => (
                    Some(Act::Migrate(vm.clone())),
                    "migrate",
                    format!("VM {vm} runs on this host"),
                ),
                (Some(vm), _) => (None, "none", format!("VM {vm} is not on this host")),
                (None, Some(h)) if *h == self.host => (
                    Some(Act::Evacuate),
                    "evacuate",
                    format!("it names this host ({h})"),
                ),
                (None, Some(h)) => (
                    None,
                    "none",
                    format!("it names host {h}, not this one: {h} takes no VM from here"),
                ),
                // Refused above; kept total rather than trusted.
                (None, None) => (None, "none", "it names neither a host nor a VM".into()),
            };
            self.alerts.insert(
                a.fingerprint.clone(),
                AlertInfo {
                    fingerprint: a.fingerprint.clone(),
                    alertname: a.name().to_owned(),
                    status: "firing".into(),
                    host,
                    vm,
                    action: action.to_owned(),
                    rule,
                    received_unix_ms: now_unix_ms,
                    repeats: 0,
                    queued: Vec::new(),
                    migrations: Vec::new(),
                    note: None,
                },
            );
            if let Some(act) = act {
                v.orders.push(Order {
                    fingerprint: a.fingerprint.clone(),
                    alertname: a.name().to_owned(),
                    act,
                    rule,
                });
            }
            v.outcomes.push(outcome(
                if action == "none" { "ignored" } else { action },
                reason,
            ));
        }
        self.prune();
        Ok(v)
    }

    fn prune(&mut self) {
        while self.alerts.len() > MAX_KEPT {
            let oldest = self
                .alerts
                .values()
                .min_by_key(|a| (a.status == "firing", a.received_unix_ms))
                .map(|a| a.fingerprint.clone());
            match oldest {
                Some(f) => self.alerts.remove(&f),
                None => break,
            };
        }
    }

    pub fn rule(&self, i: usize) -> Option<&Rule> {
        self.rules.get(i)
    }

    pub fn get_mut(&mut self, fingerprint: &str) -> Option<&mut AlertInfo> {
        self.alerts.get_mut(fingerprint)
    }

    pub fn is_firing(&self, fingerprint: &str) -> bool {
        self.alerts
            .get(fingerprint)
            .is_some_and(|a| a.status == "firing")
    }

    /// A firing alert asks to evacuate this host.
    pub fn evacuating(&self) -> Option<&AlertInfo> {
        self.alerts
            .values()
            .find(|a| a.status == "firing" && a.action == "evacuate")
    }

    /// The firing alerts that ask for moves here, oldest first.
    pub fn firing_orders(&self) -> Vec<Order> {
        let mut firing: Vec<&AlertInfo> = self
            .alerts
            .values()
            .filter(|a| a.status == "firing")
            .collect();
        firing.sort_by(|a, b| {
            a.received_unix_ms
                .cmp(&b.received_unix_ms)
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        firing
            .into_iter()
            .filter_map(|a| {
                let act = match (a.action.as_str(), &a.vm) {
                    ("evacuate", _) => Act::Evacuate,
                    ("migrate", Some(vm)) => Act::Migrate(vm.clone()),
                    _ => return None,
                };
                Some(Order {
                    fingerprint: a.fingerprint.clone(),
                    alertname: a.alertname.clone(),
                    act,
                    rule: a.rule,
                })
            })
            .collect()
    }

    /// Sets each alert's `queued` to what `of(fingerprint)` says waits for it.
    pub fn set_queued(&mut self, of: impl Fn(&str) -> Vec<String>) {
        for a in self.alerts.values_mut() {
            a.queued = if a.status == "firing" {
                of(&a.fingerprint)
            } else {
                Vec::new()
            };
        }
    }

    /// Hosts other than this one that a firing host alert the rules match names:
    /// not a destination while it fires. (An alert about a VM names its host too,
    /// as every series does; it says nothing of the host.)
    pub fn alerting_hosts(&self) -> Vec<(String, String)> {
        self.alerts
            .values()
            .filter(|a| a.status == "firing" && a.vm.is_none())
            .filter_map(|a| a.host.clone().map(|h| (h, a.alertname.clone())))
            .filter(|(h, _)| *h != self.host)
            .collect()
    }

    /// Every alert kept, newest first.
    pub fn list(&self) -> Vec<AlertInfo> {
        let mut v: Vec<AlertInfo> = self.alerts.values().cloned().collect();
        v.sort_by(|a, b| {
            b.received_unix_ms
                .cmp(&a.received_unix_ms)
                .then(a.fingerprint.cmp(&b.fingerprint))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: &str) -> Payload {
        serde_json::from_str(json).unwrap()
    }

    fn alert(status: &str, fp: &str, labels: &str) -> String {
        format!(
            r#"{{"status":"{status}","labels":{labels},"annotations":{{}},"fingerprint":"{fp}","startsAt":"2026-12-07T10:00:00Z"}}"#
        )
    }

    fn post(alerts: &[String]) -> Payload {
        payload(&format!(
            r#"{{"version":"4","groupKey":"{{}}","status":"firing","receiver":"ferry","alerts":[{}]}}"#,
            alerts.join(",")
        ))
    }

    fn book() -> Book {
        Book::new("host-b", Rule::default_rules())
    }

    const DATASTORE: &str =
        r#"{"alertname":"FerryDatastoreFilling","ferry_action":"migrate-away","host":"host-b"}"#;

    #[test]
    fn an_alert_about_this_host_evacuates_it_once() {
        let mut b = book();
        let v = b
            .receive(&post(&[alert("firing", "f1", DATASTORE)]), |_| false, 1)
            .unwrap();
        assert_eq!(v.orders.len(), 1);
        assert_eq!(v.orders[0].act, Act::Evacuate);
        assert!(b.evacuating().is_some());
        // Alertmanager sends it again: nothing new.
        let again = b
            .receive(&post(&[alert("firing", "f1", DATASTORE)]), |_| false, 2)
            .unwrap();
        assert!(again.orders.is_empty());
        assert_eq!(again.outcomes[0].action, "repeat");
        assert_eq!(b.list()[0].repeats, 1);
        // Resolved: what it queued goes; firing again later acts again.
        let resolved = b
            .receive(&post(&[alert("resolved", "f1", DATASTORE)]), |_| false, 3)
            .unwrap();
        assert_eq!(resolved.resolved, vec!["f1".to_owned()]);
        assert!(b.evacuating().is_none());
        let refired = b
            .receive(&post(&[alert("firing", "f1", DATASTORE)]), |_| false, 4)
            .unwrap();
        assert_eq!(refired.orders.len(), 1);
    }

    #[test]
    fn an_alert_about_another_host_marks_it_and_moves_nothing() {
        let mut b = book();
        let other = DATASTORE.replace("host-b", "host-c");
        let v = b
            .receive(&post(&[alert("firing", "f2", &other)]), |_| false, 1)
            .unwrap();
        assert!(v.orders.is_empty());
        assert_eq!(v.outcomes[0].action, "ignored");
        assert_eq!(
            b.alerting_hosts(),
            vec![("host-c".into(), "FerryDatastoreFilling".into())]
        );
        assert!(b.firing_orders().is_empty());
        // Resolved, it had nothing to cancel.
        let resolved = b
            .receive(&post(&[alert("resolved", "f2", &other)]), |_| false, 2)
            .unwrap();
        assert_eq!(resolved.outcomes[0].action, "ignored");
        assert!(resolved.resolved.is_empty());
        assert!(b.alerting_hosts().is_empty());
    }

    #[test]
    fn a_vm_alert_moves_that_vm_if_it_is_here() {
        let mut b = book();
        let vm = r#"{"alertname":"GuestSlow","ferry_action":"migrate-away","vm":"web-1","host":"host-c"}"#;
        let v = b
            .receive(&post(&[alert("firing", "f3", vm)]), |n| n == "web-1", 1)
            .unwrap();
        assert_eq!(v.orders[0].act, Act::Migrate("web-1".into()));
        assert_eq!(b.firing_orders(), v.orders);
        // A VM's alert says nothing of its host as a destination.
        assert!(b.alerting_hosts().is_empty());
        let elsewhere = b
            .receive(
                &post(&[alert("firing", "f4", &vm.replace("web-1", "web-2"))]),
                |n| n == "web-1",
                1,
            )
            .unwrap();
        assert!(elsewhere.orders.is_empty());
    }

    #[test]
    fn a_bad_payload_is_refused_whole() {
        let mut b = book();
        let good = alert("firing", "f1", DATASTORE);
        let no_target = alert(
            "firing",
            "f5",
            r#"{"alertname":"X","ferry_action":"migrate-away"}"#,
        );
        let e = b.receive(&post(&[good.clone(), no_target]), |_| false, 1);
        assert!(e.unwrap_err().0.contains("neither a `host` nor a `vm`"));
        assert!(b.list().is_empty(), "nothing booked");
        let mut v3 = post(std::slice::from_ref(&good));
        v3.version = "3".into();
        assert!(
            b.receive(&v3, |_| false, 1)
                .unwrap_err()
                .0
                .contains("version")
        );
        let odd = alert("pending", "f6", DATASTORE);
        assert!(b.receive(&post(&[odd]), |_| false, 1).is_err());
        let nofp = alert("firing", "", DATASTORE);
        assert!(b.receive(&post(&[nofp]), |_| false, 1).is_err());
    }

    #[test]
    fn alerts_no_rule_matches_are_ignored() {
        let mut b = book();
        let v = b
            .receive(
                &post(&[alert(
                    "firing",
                    "f7",
                    r#"{"alertname":"FerryAgentDown","host":"host-b"}"#,
                )]),
                |_| false,
                1,
            )
            .unwrap();
        assert!(v.orders.is_empty());
        assert!(b.list().is_empty());
    }

    #[test]
    fn matchers_read_alertmanagers_forms() {
        let labels: HashMap<String, String> = [("severity", "critical"), ("team", "db")]
            .into_iter()
            .map(|(a, b)| (a.into(), b.into()))
            .collect();
        let m = |t: &str| Matcher::parse(t).unwrap().matches(&labels);
        assert!(m(r#"severity="critical""#));
        assert!(m("severity=critical"));
        assert!(!m(r#"severity!="critical""#));
        assert!(m(r#"severity=~"warning|critical""#));
        assert!(!m(r#"severity!~"warning|critical""#));
        assert!(m(r#"missing="""#));
        assert!(m(r#"team != "web""#));
        assert!(Matcher::parse(r#"severity=~"crit.*""#).is_err());
        assert!(Matcher::parse("no operator").is_err());
        assert!(Matcher::parse(r#"="x""#).is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            // The webhook reads whatever is posted: arbitrary bytes are refused (or
            // booked) without a panic.
            #[test]
            fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
                if let Ok(p) = serde_json::from_slice::<Payload>(&data) {
                    let mut book = Book::new("host-a", Rule::default_rules());
                    let _ = book.receive(&p, |_| true, 0);
                }
            }

            // Payloads of the right shape with arbitrary statuses, labels and
            // fingerprints, posted twice: booked or refused whole, never a panic, and
            // the book stays bounded.
            #[test]
            fn arbitrary_alerts_never_panic(
                alerts in proptest::collection::vec(
                    (
                        "(firing|resolved|[a-z]{0,6})",
                        proptest::collection::hash_map(
                            "(alertname|host|vm|ferry_action|[a-z]{1,4})",
                            "(host-a|web-1|migrate-away|[a-z0-9-]{0,6})",
                            0..5,
                        ),
                        "[0-9a-f]{0,8}",
                    ),
                    0..8,
                ),
                version in "(4|3|[0-9]{0,2})",
            ) {
                let p = Payload {
                    version,
                    alerts: alerts
                        .into_iter()
                        .map(|(status, labels, fingerprint)| Alert { status, labels, fingerprint })
                        .collect(),
                };
                let mut book = Book::new("host-a", Rule::default_rules());
                for _ in 0..2 {
                    let _ = book.receive(&p, |vm| vm == "web-1", 0);
                }
                prop_assert!(book.list().len() <= p.alerts.len());
            }
        }
    }
}
