//! Another vendor's program on the same cgroup hook as ours, for the
//! coexistence test: a hand-assembled `cgroup/connect4` program that refuses
//! connects to port 9 (discard) and allows everything else. It is loaded with
//! raw bpf(2) calls, independently of aya, the way a CNI's loader would.
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

/// One eBPF instruction: opcode, dst/src registers, offset, immediate.
const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64) | (((dst | (src << 4)) as u64) << 8) | ((off as u16 as u64) << 16) | ((imm as u32 as u64) << 32)
}

/// `bpf_sock_addr.user_port` (network byte order in the low 16 bits).
const USER_PORT_OFFSET: i16 = 24;
/// Port 9 in network byte order, as a little-endian u32 load sees it.
const PORT_9_BE: i32 = 0x0900;

const PROGRAM: [u64; 6] = [
    insn(0x61, 2, 1, USER_PORT_OFFSET, 0), // r2 = *(u32 *)(r1 + user_port)
    insn(0x55, 2, 0, 2, PORT_9_BE),        // if r2 != port 9 goto allow
    insn(0xb7, 0, 0, 0, 0),                // r0 = 0 (refuse: EPERM)
    insn(0x95, 0, 0, 0, 0),                // exit
    insn(0xb7, 0, 0, 0, 1),                // allow: r0 = 1
    insn(0x95, 0, 0, 0, 0),                // exit
];

/// The foreign program, attached to a cgroup through a bpf link; dropping it detaches.
pub struct DenyPort9 {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl DenyPort9 {
    pub fn attach(cgroup: &Path) -> io::Result<DenyPort9> {
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        attr[4..8].copy_from_slice(&(PROGRAM.len() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(PROGRAM.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..57].copy_from_slice(b"other_cni");
        attr[68..72].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut attr)?;

        let cg = File::open(cgroup)?;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(cg.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_INET4_CONNECT.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut attr)?;
        Ok(DenyPort9 { _link: link, _prog: prog })
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of the size passed; the
    // pointers inside it (instructions, license) outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
