//! Leader election between controller replicas, with a `coordination.k8s.io`
//! Lease as client-go's leaderelection does: the holder renews it every
//! third of its duration; another replica takes it over only once it has
//! gone unrenewed for a whole duration; every write carries the
//! resourceVersion read, so two replicas cannot both win a race. Every
//! replica serves nodes and the webhook; only the leader writes objects'
//! status, so replicas never fight over it.
//!
//! [`decide`] is the rule (pure, table-tested); [`run`] applies it.
use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::sync::watch;
use tracing::{info, warn};

/// What a replica does with the lease as it finds it.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// It holds the lease: renew it.
    Renew,
    /// Nobody holds it, or its holder stopped renewing: take it.
    TakeOver,
    /// Someone else holds it.
    Follow(String),
}

/// The lease's holder, when it was last renewed (ms since the epoch) and
/// for how long a renewal holds.
#[derive(Debug)]
pub struct Held<'a> {
    pub holder: &'a str,
    pub renewed_ms: i64,
    pub duration_ms: i64,
}

pub fn decide(held: Option<Held<'_>>, me: &str, now_ms: i64) -> Decision {
    match held {
        None => Decision::TakeOver,
        Some(h) if h.holder.is_empty() => Decision::TakeOver,
        Some(h) if h.holder == me => Decision::Renew,
        Some(h) if h.renewed_ms + h.duration_ms < now_ms => Decision::TakeOver,
        Some(h) => Decision::Follow(h.holder.to_owned()),
    }
}

/// Campaigns for the lease `namespace/name` as `me` for as long as the
/// process lives, saying in `leader` whether this replica leads.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    me: String,
    duration: Duration,
    leader: watch::Sender<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    loop {
        let leads = match step(&api, &name, &me, duration).await {
            Ok(leads) => leads,
            Err(e) => {
                // Not knowing is not leading: another replica may take over.
                warn!(lease = %format!("{namespace}/{name}"), "leader election: {e}");
                false
            }
        };
        leader.send_if_modified(|was| {
            if *was != leads {
                info!(lease = %format!("{namespace}/{name}"), identity = %me, leads, "leadership changed");
            }
            std::mem::replace(was, leads) != leads
        });
        tokio::time::sleep(duration / 3).await;
    }
}

/// One round: read the lease, decide, write. Whether this replica leads after it.
async fn step(api: &Api<Lease>, name: &str, me: &str, duration: Duration) -> anyhow::Result<bool> {
    let now = Timestamp::now();
    let found = api.get_opt(name).await?;
    let spec = found.as_ref().and_then(|l| l.spec.as_ref());
    let held = spec.map(|s| Held {
        holder: s.holder_identity.as_deref().unwrap_or_default(),
        renewed_ms: s.renew_time.as_ref().or(s.acquire_time.as_ref()).map_or(0, |t| t.0.as_millisecond()),
        duration_ms: i64::from(s.lease_duration_seconds.unwrap_or(0)) * 1000,
    });
    let seconds = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
    match decide(held, me, now.as_millisecond()) {
        Decision::Follow(_) => Ok(false),
        Decision::Renew => {
            let mut lease = found.expect("a held lease exists");
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(seconds);
            api.replace(name, &PostParams::default(), &lease).await?;
            Ok(true)
        }
        Decision::TakeOver => {
            let transitions = spec.and_then(|s| s.lease_transitions).unwrap_or(0);
            let spec = LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions + i32::from(found.is_some())),
                ..Default::default()
            };
            match found {
                // The resourceVersion read goes with the write: if another
                // replica wrote meanwhile, this one is refused (409).
                Some(mut lease) => {
                    lease.spec = Some(spec);
                    api.replace(name, &PostParams::default(), &lease).await?;
                }
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
                        spec: Some(spec),
                    };
                    api.create(&PostParams::default(), &lease).await?;
                }
            }
            Ok(true)
        }
    }
}

/// This replica's name in the lease: its pod's name (`POD_NAME`, from the
/// downward API) or host name, and its process id.
pub fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "mesh-controller".into());
    format!("{host}_{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_only_when_free_or_expired() {
        let held = |holder, renewed_ms| Some(Held { holder, renewed_ms, duration_ms: 15_000 });
        let cases = [
            (None, Decision::TakeOver),
            (held("", 0), Decision::TakeOver),
            (held("me", 1_000), Decision::Renew),
            // Expired a long time ago, or just now: still mine to renew.
            (held("me", -100_000), Decision::Renew),
            (held("other", 90_000), Decision::Follow("other".into())),
            // Renewed 15 s ago exactly: still held.
            (held("other", 85_000), Decision::Follow("other".into())),
            (held("other", 84_999), Decision::TakeOver),
        ];
        for (held, want) in cases {
            let what = format!("{held:?}");
            assert_eq!(decide(held, "me", 100_000), want, "{what}");
        }
    }
}
