//! What Istio's admission rejects in a Telemetry (its `validateTelemetry`):
//! a selector beside targetRefs, a provider without a name, a sampling
//! percentage outside [0, 100], custom tags without their value or name,
//! tag overrides whose value does not fit their operation, filter and tag
//! expressions that are not CEL (Istio compiles them); and what its
//! protobuf schema rejects: enum values it does not define.
use mesh_common::parse_duration;

use super::{Issues, check_selection};
use crate::objects::telemetry::{ISTIO_METRICS, ProviderRef, TelemetrySpec, TrafficMatch, WORKLOAD_MODES};

pub(super) fn check_telemetry(spec: &TelemetrySpec, out: &mut Issues) {
    let both = "only one of targetRefs or workloadSelector can be set";
    check_selection(spec.selector.as_ref(), spec.target_ref.as_ref(), &spec.target_refs, both, out);
    for (i, t) in spec.tracing.iter().enumerate() {
        let at = format!("spec.tracing[{i}]");
        check_match(&t.match_, &at, out);
        check_providers(&t.providers, &at, out);
        if let Some(p) = t.random_sampling_percentage
            && !(0.0..=100.0).contains(&p)
        {
            out.push((format!("{at}.randomSamplingPercentage"), format!("{p}: must be in range [0.0, 100.0]")));
        }
        for (name, tag) in &t.custom_tags {
            let field = format!("{at}.customTags[{name}]");
            if name.is_empty() {
                out.push((format!("{at}.customTags"), "tag name may not be empty".into()));
            }
            let set = [tag.literal.is_some(), tag.environment.is_some(), tag.header.is_some()];
            if set.iter().filter(|s| **s).count() > 1 {
                out.push((field.clone(), "set only one of literal, environment and header".into()));
            }
            if tag.literal.as_ref().is_some_and(|l| l.value.is_empty()) {
                out.push((format!("{field}.literal.value"), "literal tag value may not be empty".into()));
            }
            if tag.environment.as_ref().is_some_and(|e| e.name.is_empty()) {
                out.push((format!("{field}.environment.name"), "environment tag name may not be empty".into()));
            }
            if tag.header.as_ref().is_some_and(|h| h.name.is_empty()) {
                out.push((format!("{field}.header.name"), "header tag name may not be empty".into()));
            }
        }
    }
    for (i, m) in spec.metrics.iter().enumerate() {
        let at = format!("spec.metrics[{i}]");
        check_providers(&m.providers, &at, out);
        if let Some(interval) = &m.reporting_interval
            && let Err(e) = parse_duration(interval)
        {
            out.push((format!("{at}.reportingInterval"), e));
        }
        for (j, o) in m.overrides.iter().enumerate() {
            let at = format!("{at}.overrides[{j}]");
            if let Some(sel) = &o.match_ {
                if let Some(metric) = &sel.metric
                    && !ISTIO_METRICS.contains(&metric.as_str())
                {
                    out.push((format!("{at}.match.metric"), format!("{metric:?}: expected one of {ISTIO_METRICS:?}")));
                }
                if sel.metric.is_some() && sel.custom_metric.is_some() {
                    out.push((format!("{at}.match"), "set only one of metric and customMetric".into()));
                }
                if sel.custom_metric.as_deref() == Some("") {
                    out.push((format!("{at}.match.customMetric"), "customMetric may not be empty".into()));
                }
                check_mode(&sel.mode, &format!("{at}.match.mode"), out);
            }
            for (tag, op) in &o.tag_overrides {
                let field = format!("{at}.tagOverrides[{tag}]");
                match op.operation.as_deref().unwrap_or("UPSERT") {
                    "UPSERT" if op.value.as_deref().is_none_or(str::is_empty) => {
                        out.push((format!("{field}.value"), "must be set when operation is UPSERT".into()));
                    }
                    "UPSERT" => {
                        if let Err(e) = mesh_common::cel::compile(op.value.as_deref().unwrap_or_default()) {
                            out.push((format!("{field}.value"), format!("not a CEL expression: {e}")));
                        }
                    }
                    "REMOVE" if op.value.as_deref().is_some_and(|v| !v.is_empty()) => {
                        out.push((format!("{field}.value"), "must not be set when operation is REMOVE".into()));
                    }
                    "REMOVE" => {}
                    other => {
                        out.push((format!("{field}.operation"), format!("{other:?}: expected UPSERT or REMOVE")));
                    }
                }
            }
        }
    }
    for (i, l) in spec.access_logging.iter().enumerate() {
        let at = format!("spec.accessLogging[{i}]");
        check_match(&l.match_, &at, out);
        check_providers(&l.providers, &at, out);
        if let Some(f) = &l.filter {
            if f.expression.trim().is_empty() {
                out.push((format!("{at}.filter.expression"), "must not be empty".into()));
            } else if let Err(e) = mesh_common::cel::compile(&f.expression) {
                out.push((format!("{at}.filter.expression"), format!("not a CEL expression: {e}")));
            }
        }
    }
}

fn check_providers(providers: &[ProviderRef], at: &str, out: &mut Issues) {
    for (i, p) in providers.iter().enumerate() {
        if p.name.is_empty() {
            out.push((format!("{at}.providers[{i}].name"), "may not be empty".into()));
        }
    }
}

fn check_match(m: &Option<TrafficMatch>, at: &str, out: &mut Issues) {
    if let Some(m) = m {
        check_mode(&m.mode, &format!("{at}.match.mode"), out);
    }
}

fn check_mode(mode: &Option<String>, field: &str, out: &mut Issues) {
    if let Some(mode) = mode
        && !WORKLOAD_MODES.contains(&mode.as_str())
    {
        out.push((field.into(), format!("{mode:?}: expected one of {WORKLOAD_MODES:?}")));
    }
}
