//! mesh's kernel programs. One module per attach point; each entry point is a
//! thin wrapper over a fallible body. See ARCHITECTURE.md for how they fit.
#![no_std]
#![no_main]

mod maps;
mod sk_lookup;
mod sock_addr;
mod sockops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
