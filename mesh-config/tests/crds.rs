//! deploy/crds/ is what mesh's kind table says it is: a kind, version or
//! name added to the table without `cargo xtask crds` fails here.
#[test]
fn deploy_crds_match_the_kind_table() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask crds`", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let files = mesh_config::crds::files();
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(on_disk, names, "deploy/crds/ has other files than the kind table makes; run `cargo xtask crds`");
    for (name, yaml) in &files {
        let written = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(written == *yaml, "deploy/crds/{name} differs from the kind table's CRDs; run `cargo xtask crds`");
    }
}
