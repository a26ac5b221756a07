//! With the `api` feature, generates the controller/node API's messages from
//! proto/; with `grpc`, its client and server stubs too.
fn main() {
    #[cfg(feature = "api")]
    api();
}

#[cfg(feature = "api")]
fn api() {
    let stubs = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["mesh/v1/node.proto", "envoy/service/auth/v3/external_auth.proto", "istio/v1/auth/ca.proto"],
        ["proto"],
    )
    .unwrap_or_else(|e| panic!("proto/: {e}"));
    tonic_prost_build::configure()
        .build_client(stubs)
        .build_server(stubs)
        // BTreeMap: maps encode in key order, so a resource's bytes (and the
        // version hashed from them) are the same every time.
        .btree_map(".")
        // Deserialize too: `mesh-ctl` reads a node's config dump back into these types.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC code: {e}"));
}
