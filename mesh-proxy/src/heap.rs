//! Giving freed heap back to the system. glibc's malloc keeps what a burst
//! freed in its arenas: a thousand connections opened at once each leave a
//! few kilobytes of planning and dialing behind, interleaved with what the
//! connections keep, so the process stays at its high-water mark for good
//! (2 MiB of the agent's 23 MiB with a thousand idle connections, measured).
//! `malloc_trim` hands the free pages back (madvise), as Envoy's
//! `shrink_heap` and Go's scavenger do. It runs only when the free space
//! the arenas hold has grown well past its low since the last trim, so a
//! proxy whose heap holds steady never pays for it. (The heap in use is no
//! guide: sampled each second, it misses a burst that came and went between
//! two samples; the free space it left stays.)
use std::time::Duration;

/// How far the arenas' free space must grow past its low before a trim.
pub const TRIM_AFTER_FREEING: usize = 1 << 20;
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// When to trim (pure): once the arenas' free space is
/// [`TRIM_AFTER_FREEING`] above its lowest since the last trim. A trim
/// leaves the free space as it is (its pages are released, the chunks stay
/// free), so that is the new low. Before the first trim the low is nothing:
/// what start-up freed (loading the eBPF programs, the first configuration:
/// 2.3 MiB in the agent) goes back too.
#[derive(Debug, Default)]
pub struct Trimmer {
    low: usize,
}

impl Trimmer {
    /// Records the free space the arenas hold now; whether to trim.
    pub fn observe(&mut self, free: usize) -> bool {
        self.low = self.low.min(free);
        if free - self.low < TRIM_AFTER_FREEING {
            return false;
        }
        self.low = free;
        true
    }
}

/// Checks the heap every second, for the life of the runtime, and trims it
/// when [`Trimmer`] says so. Only glibc has these calls; elsewhere a no-op.
pub fn spawn_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async {
        let mut trimmer = Trimmer::default();
        let mut tick = tokio::time::interval(CHECK_EVERY);
        loop {
            tick.tick().await;
            if trimmer.observe(free()) {
                // Off the workers: it takes each arena's lock while it walks it.
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        }
    });
}

/// Bytes the arenas hold free (glibc's `mallinfo2`, all arenas).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn free() -> usize {
    // SAFETY: glibc's statistics call: no arguments, callable from any thread.
    unsafe { libc::mallinfo2() }.fordblks
}

/// Returns the arenas' free pages to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    // SAFETY: glibc's trim: callable from any thread at any time.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Each case: the arenas' free space at successive checks, and which checks trim.
    #[test]
    fn trims_once_free_space_has_grown() {
        let k = MIB / 4;
        let cases: &[(&str, &[usize], &[bool])] = &[
            ("steady", &[k, k, k], &[false, false, false]),
            ("start-up's leftovers", &[3 * MIB, 3 * MIB], &[true, false]),
            ("using more (less free)", &[4 * MIB, 3 * MIB, MIB], &[true, false, false]),
            ("wobbling", &[k, 3 * k, k, 3 * k], &[false, false, false, false]),
            ("a burst freed", &[k, k, 5 * MIB, 5 * MIB], &[false, false, true, false]),
            ("freed in steps", &[k, 3 * k, 5 * k], &[false, false, true]),
            ("reused, then freed again", &[k, 5 * MIB, 2 * MIB, 4 * MIB], &[false, true, false, true]),
        ];
        for (name, free, trims) in cases {
            let mut t = Trimmer::default();
            let got: Vec<bool> = free.iter().map(|f| t.observe(*f)).collect();
            assert_eq!(&got, trims, "{name}");
        }
    }

    /// A trim gives freed pages back: the process's resident size falls by
    /// most of what was freed between allocations that stay.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_freed_pages() {
        let resident = || {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            statm.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 4096
        };
        // 64 MiB of 64 KiB blocks (below glibc's mmap threshold), each
        // followed by a small one that stays, so nothing can be given back
        // from the top of the heap.
        let mut freed = Vec::new();
        let mut kept = Vec::new();
        for _ in 0..1024 {
            freed.push(vec![1u8; 64 << 10]);
            kept.push(vec![1u8; 16]);
        }
        drop(freed);
        let before = resident();
        trim();
        let after = resident();
        assert!(before.saturating_sub(after) > 32 * MIB, "resident {before} before the trim, {after} after");
        drop(kept);
    }
}
