//! A configuration update from the wire at a node: protobuf decode, the
//! store's checks and apply, the data path's view. Invariant: what a store
//! accepted, its snapshot (what the node persists) rebuilds exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_common::api;
use prost::Message as _;

fuzz_target!(
    init: {
        mesh_fuzz::write_seeds_if_asked(|| {
            mesh_fuzz::CONFIGS.iter().map(|c| mesh_fuzz::update_for(c).encode_to_vec()).collect()
        });
    },
    |data: &[u8]| {
        let Ok(update) = api::Update::decode(data) else { return };
        let state = mesh_proxy::state::State::default();
        if state.apply(&update).is_err() {
            return;
        }
        let snapshot = state.snapshot();
        let restored = mesh_proxy::state::State::default();
        restored.apply(&snapshot).expect("a snapshot of an accepted store is accepted");
        assert_eq!(restored.known(), state.known());
    }
);
