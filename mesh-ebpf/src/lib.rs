#![no_std]
// Empty: lets mesh-node list this crate as a build-dependency so cargo rebuilds
// the eBPF object when it changes (the aya template does the same).
