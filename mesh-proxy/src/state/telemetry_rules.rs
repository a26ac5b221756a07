//! Istio's Telemetry `accessLogging` and `metrics`, as the controller
//! resolved them for a workload (its node proxy) or a service (its
//! waypoint), compiled once per configuration. Rules come least specific
//! first; the last one that applies to a side decides, as the more
//! specific Telemetry overrides the less.
use mesh_common::{
    api::{self, TrafficMode},
    cel::{Attributes, Expression},
};

/// Which side of the traffic a proxy reports: the client's (`reporter`
/// `source`) or the server's (`destination`; a waypoint is the server's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

fn applies(mode: i32, side: Side) -> bool {
    match TrafficMode::try_from(mode).unwrap_or(TrafficMode::ClientAndServer) {
        TrafficMode::ClientAndServer => true,
        TrafficMode::Client => side == Side::Client,
        TrafficMode::Server => side == Side::Server,
    }
}

#[derive(Debug)]
struct AccessLogRule {
    mode: i32,
    disabled: bool,
    /// `None` without a filter, or when the filter does not compile (logged
    /// then; the controller refuses such Telemetry, so only a skewed
    /// controller could send one).
    filter: Option<Expression>,
}

#[derive(Debug)]
struct Override {
    mode: i32,
    metric: String,
    disabled: Option<bool>,
    removed: Vec<String>,
    upserted: Vec<(String, Expression)>,
}

#[derive(Debug, Default)]
pub struct TelemetryRules {
    access_logs: Vec<AccessLogRule>,
    overrides: Vec<Override>,
}

/// What the overrides make of one metric on one side.
#[derive(Debug, Default)]
pub struct MetricRule<'a> {
    pub disabled: bool,
    /// Tags whose value is emptied (Prometheus reads an empty label as absent).
    pub removed: Vec<&'a str>,
    /// Standard tags whose value an expression gives.
    pub upserted: Vec<(&'a str, &'a Expression)>,
}

impl TelemetryRules {
    pub fn new(p: &api::TelemetryPolicy) -> TelemetryRules {
        let compile = |text: &str| match Expression::new(text) {
            Ok(e) => Some(e),
            Err(e) => {
                tracing::warn!(expression = text, "Telemetry expression ignored: {e}");
                None
            }
        };
        TelemetryRules {
            access_logs: p
                .access_logs
                .iter()
                .map(|r| AccessLogRule {
                    mode: r.mode,
                    disabled: r.disabled,
                    filter: (!r.filter.is_empty()).then(|| compile(&r.filter)).flatten(),
                })
                .collect(),
            overrides: p
                .metric_overrides
                .iter()
                .map(|o| Override {
                    mode: o.mode,
                    metric: o.metric.clone(),
                    disabled: o.disabled,
                    removed: o.removed_tags.clone(),
                    upserted: o.upserted_tags.iter().filter_map(|(k, v)| Some((k.clone(), compile(v)?))).collect(),
                })
                .collect(),
        }
    }

    /// Whether any rule has an expression (which may read the request's
    /// attributes, its headers among them).
    pub fn has_expressions(&self) -> bool {
        self.access_logs.iter().any(|r| r.filter.is_some()) || self.overrides.iter().any(|o| !o.upserted.is_empty())
    }

    /// Whether an access-log line is written: the last rule for `side`
    /// decides (disabled, or its filter over `attributes`); none: yes.
    pub fn logs(&self, side: Side, attributes: impl FnOnce() -> Attributes) -> bool {
        match self.access_logs.iter().rev().find(|r| applies(r.mode, side)) {
            None => true,
            Some(r) if r.disabled => false,
            Some(AccessLogRule { filter: Some(f), .. }) => attributes().admits(f),
            Some(_) => true,
        }
    }

    /// What the overrides for `metric` (Istio's name, `REQUEST_COUNT`, ...)
    /// on `side` say, in order: a later `disabled` wins, removals and
    /// upserts add up (a later upsert of a tag wins).
    pub fn metric(&self, side: Side, metric: &str) -> MetricRule<'_> {
        let mut rule = MetricRule::default();
        for o in self.overrides.iter().filter(|o| applies(o.mode, side)) {
            if o.metric != metric && o.metric != "ALL_METRICS" {
                continue;
            }
            if let Some(d) = o.disabled {
                rule.disabled = d;
            }
            rule.removed.extend(o.removed.iter().map(String::as_str));
            for (tag, e) in &o.upserted {
                rule.upserted.retain(|(t, _)| t != tag);
                rule.upserted.push((tag, e));
            }
        }
        rule
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(
        access: &[(TrafficMode, bool, &str)],
        overrides: &[(TrafficMode, &str, Option<bool>, &[&str])],
    ) -> TelemetryRules {
        TelemetryRules::new(&api::TelemetryPolicy {
            access_logs: access
                .iter()
                .map(|(m, d, f)| api::AccessLogRule { mode: *m as i32, disabled: *d, filter: f.to_string() })
                .collect(),
            metric_overrides: overrides
                .iter()
                .map(|(m, metric, disabled, removed)| api::MetricOverride {
                    mode: *m as i32,
                    metric: metric.to_string(),
                    disabled: *disabled,
                    removed_tags: removed.iter().map(|s| s.to_string()).collect(),
                    upserted_tags: Default::default(),
                })
                .collect(),
        })
    }

    fn code(c: i64) -> impl FnOnce() -> Attributes {
        move || {
            let mut a = Attributes::default();
            a.set("response", "code", c);
            a
        }
    }

    #[test]
    fn the_last_rule_for_a_side_decides_the_access_log() {
        use TrafficMode::*;
        // The mesh logs errors only; a namespace turns its server side off.
        let r = rules(&[(ClientAndServer, false, "response.code >= 400"), (Server, true, "")], &[]);
        let cases = [(Side::Client, 500, true), (Side::Client, 200, false), (Side::Server, 500, false)];
        for (side, c, want) in cases {
            assert_eq!(r.logs(side, code(c)), want, "{side:?} {c}");
        }
        assert!(rules(&[], &[]).logs(Side::Server, code(200)), "no rule: logged");
        let on_again = rules(&[(ClientAndServer, true, ""), (ClientAndServer, false, "")], &[]);
        assert!(on_again.logs(Side::Client, code(200)), "a more specific Telemetry turns it on again");
        // On a connection (no response.code) a filter on it is an error: not logged, as in Envoy.
        let tcp = rules(&[(ClientAndServer, false, "response.code >= 400")], &[]);
        assert!(!tcp.logs(Side::Client, Attributes::default));
    }

    #[test]
    fn metric_overrides_add_up_in_order() {
        use TrafficMode::*;
        let r = rules(
            &[],
            &[
                (ClientAndServer, "ALL_METRICS", None, &["request_protocol"]),
                (ClientAndServer, "REQUEST_COUNT", Some(true), &[]),
                (Server, "REQUEST_COUNT", Some(false), &["destination_principal"]),
                (Client, "TCP_SENT_BYTES", Some(true), &[]),
            ],
        );
        let count = r.metric(Side::Server, "REQUEST_COUNT");
        assert!(!count.disabled, "the server-side override turns it back on");
        assert_eq!(count.removed, ["request_protocol", "destination_principal"]);
        assert!(r.metric(Side::Client, "REQUEST_COUNT").disabled);
        assert_eq!(r.metric(Side::Server, "REQUEST_DURATION").removed, ["request_protocol"]);
        assert!(r.metric(Side::Client, "TCP_SENT_BYTES").disabled);
        assert!(!r.metric(Side::Server, "TCP_SENT_BYTES").disabled);
    }
}
