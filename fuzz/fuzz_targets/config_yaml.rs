//! The controller's configuration: YAML text → documents → parse and
//! validate → store → model → the resources nodes are sent. Seeds: the
//! project's YAML fixtures (`cargo xtask fuzz` collects them).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        mesh_fuzz::read_config(text);
    }
});
