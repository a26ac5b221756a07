//! The node's admin API request bodies (`POST /pods`, `PUT /netns`): JSON,
//! the pod's name, its namespace path. (The handlers then act on the
//! kernel, which is the kernel tests' subject.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_common::admin::{PodSpec, valid_pod_name};

fuzz_target!(
    init: {
        mesh_fuzz::write_seeds_if_asked(|| {
            [
                r#"{"name":"default/web","netns":"/run/netns/web"}"#,
                r#"{"name":"shop/api-1","netns":"/proc/4242/ns/net"}"#,
                r#"{"name":"x","netns":"relative"}"#,
            ]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect()
        });
    },
    |data: &[u8]| {
        if let Ok(spec) = serde_json::from_slice::<PodSpec>(data) {
            let _ = valid_pod_name(&spec.name) && spec.netns.is_absolute();
        }
    }
);
