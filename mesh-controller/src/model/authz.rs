//! AuthorizationPolicies compiled into the shared matchers of
//! `mesh_common::authz`, which the node proxy and `mesh-ctl` evaluate.

use ipnet::IpNet;
pub use mesh_common::authz::{
    Action, CompiledPolicy, CompiledRule, ConditionMatch, Connection, Decision, OperationMatch, SourceMatch,
    StringMatch, evaluate, parse_net,
};

use crate::config::objects::{AuthorizationPolicy, Condition, Operation, Rule, Source};

/// The annotation that makes a policy dry-run: evaluated, logged and
/// counted, not enforced.
pub const DRY_RUN: &str = "istio.io/dry-run";

/// Compiles a validated policy. Anything invalid was rejected before; a
/// condition mesh cannot evaluate (a key Istio has and mesh does not, such
/// as `connection.sni`, accepted with a warning) never widens access: an
/// ALLOW or AUDIT rule with one is dropped, a DENY rule denies without it.
pub fn compile(policy: &AuthorizationPolicy) -> CompiledPolicy {
    let action = match policy.spec.action.as_deref() {
        Some("DENY") => Action::Deny,
        Some("AUDIT") => Action::Audit,
        Some("CUSTOM") => Action::Custom,
        _ => Action::Allow,
    };
    CompiledPolicy {
        namespace: policy.metadata.namespace().to_owned(),
        name: policy.metadata.name.clone(),
        action,
        rules: policy.spec.rules.iter().flatten().filter_map(|r| compile_rule(r, action)).collect(),
        dry_run: policy.metadata.annotations.get(DRY_RUN).is_some_and(|v| v.eq_ignore_ascii_case("true")),
        provider: policy.spec.provider.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
    }
}

fn compile_rule(rule: &Rule, action: Action) -> Option<CompiledRule> {
    let when: Vec<Option<ConditionMatch>> = rule.when.iter().map(compile_condition).collect();
    // A CUSTOM rule that cannot be evaluated whole asks the authorizer (fails closed, as DENY does).
    if matches!(action, Action::Allow | Action::Audit) && when.iter().any(Option::is_none) {
        return None;
    }
    Some(CompiledRule {
        from: rule.from.iter().map(|f| compile_source(&f.source)).collect(),
        to: rule.to.iter().map(|t| compile_operation(&t.operation)).collect(),
        when: when.into_iter().flatten().collect(),
    })
}

fn compile_source(s: &Source) -> SourceMatch {
    let principals = |v: &[String]| v.iter().map(|p| StringMatch::principal(p)).collect();
    let patterns = |v: &[String]| v.iter().map(|p| StringMatch::parse(p)).collect();
    SourceMatch {
        principals: principals(&s.principals),
        not_principals: principals(&s.not_principals),
        namespaces: patterns(&s.namespaces),
        not_namespaces: patterns(&s.not_namespaces),
        ip_blocks: nets(&s.ip_blocks),
        not_ip_blocks: nets(&s.not_ip_blocks),
        request_principals: patterns(&s.request_principals),
        not_request_principals: patterns(&s.not_request_principals),
        remote_ip_blocks: nets(&s.remote_ip_blocks),
        not_remote_ip_blocks: nets(&s.not_remote_ip_blocks),
    }
}

fn compile_operation(o: &Operation) -> OperationMatch {
    let patterns = |v: &[String]| v.iter().map(|p| StringMatch::parse(p)).collect();
    OperationMatch {
        ports: ports(&o.ports),
        not_ports: ports(&o.not_ports),
        hosts: patterns(&o.hosts),
        not_hosts: patterns(&o.not_hosts),
        methods: patterns(&o.methods),
        not_methods: patterns(&o.not_methods),
        paths: patterns(&o.paths),
        not_paths: patterns(&o.not_paths),
    }
}

fn compile_condition(c: &Condition) -> Option<ConditionMatch> {
    // Keys mesh does not evaluate were rejected (or warned about) by validation.
    ConditionMatch::from_key(&c.key, &c.values, &c.not_values).ok()
}

fn nets(values: &[String]) -> Vec<IpNet> {
    values.iter().filter_map(|v| parse_net(v)).collect()
}

fn ports(values: &[String]) -> Vec<u16> {
    values.iter().filter_map(|v| v.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::objects::AuthorizationPolicySpec;

    /// A policy from YAML (the `spec` part), as users write it.
    fn policy(name: &str, spec: &str) -> CompiledPolicy {
        let spec: AuthorizationPolicySpec = serde_yaml_ng::from_str(spec).unwrap();
        let meta = serde_yaml_ng::from_str(&format!("name: {name}\nnamespace: shop")).unwrap();
        compile(&AuthorizationPolicy { metadata: meta, spec })
    }

    fn conn(source: Option<&str>, src_ip: &str, port: u16) -> Connection {
        Connection {
            source: source.map(|s| format!("spiffe://cluster.local/{s}").parse().unwrap()),
            source_ip: src_ip.parse().unwrap(),
            destination_ip: "10.0.0.9".parse().unwrap(),
            destination_port: port,
        }
    }

    const FRONTEND: Option<&str> = Some("ns/shop/sa/frontend");
    const OTHER: Option<&str> = Some("ns/shop/sa/other");
    const EVIL: Option<&str> = Some("ns/evil/sa/frontend");

    #[test]
    fn decisions() {
        let allow_frontend =
            policy("allow-fe", "rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]}]");
        let deny_evil = policy("deny-evil", "action: DENY\nrules: [{from: [{source: {namespaces: [evil]}}]}]");
        let allow_all_evil = policy("allow-evil", "rules: [{from: [{source: {namespaces: [evil]}}]}]");
        let allow_nothing = policy("allow-nothing", "{}");
        let allow_all = policy("allow-all", "rules: [{}]");
        let deny_nothing = policy("deny-nothing", "action: DENY");
        let allow_ports = policy("ports", "rules: [{to: [{operation: {ports: ['8080'], notPorts: ['9090']}}]}]");
        let allow_cidr =
            policy("cidr", "rules: [{from: [{source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.2.0/24]}}]}]");
        let not_principal = policy("not-other", "rules: [{from: [{source: {notPrincipals: ['*/sa/other']}}]}]");
        let when_port = policy(
            "when",
            "rules: [{when: [{key: destination.port, values: ['80']}, {key: source.ip, notValues: [10.9.0.0/16]}]}]",
        );
        let audit = policy("audit", "action: AUDIT\nrules: [{}]");
        let prefix = policy("prefix", "rules: [{from: [{source: {principals: ['cluster.local/ns/shop/*']}}]}]");

        type Case<'a> = (&'a str, Vec<&'a CompiledPolicy>, Connection, bool, Option<&'a str>);
        let cases: Vec<Case> = vec![
            ("no policy: allowed", vec![], conn(None, "10.1.1.1", 80), true, None),
            ("only AUDIT: allowed", vec![&audit], conn(None, "10.1.1.1", 80), true, None),
            (
                "ALLOW by principal admits it",
                vec![&allow_frontend],
                conn(FRONTEND, "10.1.1.1", 80),
                true,
                Some("shop/allow-fe"),
            ),
            ("ALLOW by principal refuses another SA", vec![&allow_frontend], conn(OTHER, "10.1.1.1", 80), false, None),
            ("ALLOW by principal refuses plaintext", vec![&allow_frontend], conn(None, "10.1.1.1", 80), false, None),
            (
                "DENY wins over ALLOW",
                vec![&allow_all_evil, &deny_evil],
                conn(EVIL, "10.1.1.1", 80),
                false,
                Some("shop/deny-evil"),
            ),
            (
                "DENY leaves others alone",
                vec![&allow_frontend, &deny_evil],
                conn(FRONTEND, "10.1.1.1", 80),
                true,
                Some("shop/allow-fe"),
            ),
            ("allow-nothing denies all", vec![&allow_nothing], conn(FRONTEND, "10.1.1.1", 80), false, None),
            (
                "allow-all allows plaintext",
                vec![&allow_all, &allow_nothing],
                conn(None, "10.1.1.1", 80),
                true,
                Some("shop/allow-all"),
            ),
            ("DENY without rules never matches", vec![&deny_nothing], conn(EVIL, "10.1.1.1", 80), true, None),
            ("port allowed", vec![&allow_ports], conn(None, "10.1.1.1", 8080), true, Some("shop/ports")),
            ("port not listed", vec![&allow_ports], conn(None, "10.1.1.1", 80), false, None),
            ("ipBlocks inside", vec![&allow_cidr], conn(None, "10.1.1.1", 80), true, Some("shop/cidr")),
            ("notIpBlocks carve-out", vec![&allow_cidr], conn(None, "10.1.2.7", 80), false, None),
            ("ipBlocks outside", vec![&allow_cidr], conn(None, "10.2.0.1", 80), false, None),
            ("notPrincipals excludes the pattern", vec![&not_principal], conn(OTHER, "10.1.1.1", 80), false, None),
            (
                "notPrincipals admits others",
                vec![&not_principal],
                conn(FRONTEND, "10.1.1.1", 80),
                true,
                Some("shop/not-other"),
            ),
            (
                "notPrincipals does not exclude plaintext",
                vec![&not_principal],
                conn(None, "10.1.1.1", 80),
                true,
                Some("shop/not-other"),
            ),
            ("when: all conditions hold", vec![&when_port], conn(None, "10.1.1.1", 80), true, Some("shop/when")),
            ("when: one condition fails", vec![&when_port], conn(None, "10.9.1.1", 80), false, None),
            ("when: wrong port", vec![&when_port], conn(None, "10.1.1.1", 81), false, None),
            ("prefix principal", vec![&prefix], conn(OTHER, "10.1.1.1", 80), true, Some("shop/prefix")),
            ("prefix principal, other namespace", vec![&prefix], conn(EVIL, "10.1.1.1", 80), false, None),
        ];
        for (what, policies, c, allowed, by) in cases {
            let d = evaluate(policies.iter().copied(), &c);
            assert_eq!(d.allowed, allowed, "{what}: {d:?}");
            assert_eq!(d.policy.as_deref(), by, "{what}: {d:?}");
        }
    }

    /// What the controller sends is what the node evaluates: every policy
    /// shape survives the trip through the node API's form unchanged.
    #[test]
    fn wire_round_trip() {
        for spec in [
            "rules: [{from: [{source: {principals: [spiffe://cluster.local/ns/shop/sa/frontend], notNamespaces: [x*]}}]}]",
            "action: DENY\nrules: [{from: [{source: {ipBlocks: [10.1.0.0/16, 10.2.3.4], notIpBlocks: ['*']}}]}]",
            "action: AUDIT\nrules: [{to: [{operation: {ports: ['80'], notPorts: ['9090']}}]}]",
            "rules: [{when: [{key: source.principal, values: ['*/sa/web']}, {key: destination.port, notValues: ['1']},
              {key: source.ip, values: [10.0.0.0/8]}, {key: destination.ip, values: [fd00::/8]},
              {key: source.namespace, notValues: [evil]}]}]",
            "rules: [{from: [{source: {requestPrincipals: ['*'], notRequestPrincipals: [a/b], remoteIpBlocks: [192.0.2.0/24]}}],
              to: [{operation: {methods: [GET], notMethods: [PUT], paths: ['/a*'], notPaths: [/b], hosts: [x], notHosts: ['*.y']}}],
              when: [{key: 'request.headers[X-A]', values: [b]}, {key: 'request.auth.claims[a][b]', notValues: [c]},
              {key: remote.ip, values: [10.0.0.0/8]}, {key: request.auth.audiences, values: [api]},
              {key: request.auth.presenter, values: [cli]}, {key: request.auth.principal, values: ['iss/*']}]}]",
            "{}",
        ] {
            let compiled = policy("p", spec);
            let wire = compiled.to_wire(mesh_common::api::Scope::Namespace, []);
            assert_eq!(CompiledPolicy::from_wire(&wire).unwrap(), compiled, "{spec}");
        }
    }

    #[test]
    fn string_matches() {
        for (pattern, value, want) in [
            ("*", "anything", true),
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("ab*", "abcd", true),
            ("*cd", "abcd", true),
            ("*cd", "abc", false),
        ] {
            assert_eq!(StringMatch::parse(pattern).matches(value), want, "{pattern} vs {value}");
        }
    }
}
