//! Giving freed heap back to the system. glibc's malloc keeps what a burst
//! freed in its arenas: a thousand connections opened at once each leave a
//! few kilobytes of planning and dialing behind, interleaved with what the
//! connections keep, so the process stays at its high-water mark for good
//! (2 MiB of the agent's 23 MiB with a thousand idle connections, measured,
//! and 2.3 MiB that start-up freed). `malloc_trim` hands the free pages back
//! (madvise), as Envoy's `shrink_heap` and Go's scavenger do.
//!
//! When: each second the resident size is read (`/proc/self/statm`, a
//! counter the kernel keeps), and once it has grown 1 MiB past its low
//! since the last trim and then held still for a second, the heap is
//! trimmed; the size after the trim is the new low. A proxy whose memory
//! holds steady never pays for it. glibc's own statistics (`mallinfo2`)
//! would say how much is free, but they walk every free chunk under each
//! arena's lock: 0.4 ms with 10 000 free chunks, 19 ms with 100 000,
//! measured, every second, stalling the workers that allocate meanwhile.
use std::time::Duration;

/// How far the resident size must grow past its low before a trim.
pub const TRIM_AFTER_GROWTH: usize = 1 << 20;
/// Growth within this much in a second counts as holding still.
pub const SETTLED: usize = 128 << 10;
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// When to trim (pure), from the resident size at each check. Before the
/// first trim the low is nothing: what start-up left goes back too.
#[derive(Debug, Default)]
pub struct Trimmer {
    low: usize,
    last: usize,
}

impl Trimmer {
    /// Records the resident size now; whether to trim (it has grown
    /// [`TRIM_AFTER_GROWTH`] past its low and held still since the last check).
    pub fn observe(&mut self, resident: usize) -> bool {
        let settled = resident <= self.last.saturating_add(SETTLED);
        self.last = resident;
        self.low = self.low.min(resident);
        settled && resident >= self.low + TRIM_AFTER_GROWTH
    }

    /// Records the resident size after a trim: the new low.
    pub fn trimmed(&mut self, resident: usize) {
        self.low = resident;
        self.last = resident;
    }
}

/// Checks every second, for the life of the runtime, and trims the heap
/// when [`Trimmer`] says so: once per process, however many proxies it
/// runs, as the heap is the process's. Only glibc has the call; elsewhere
/// a no-op.
pub fn spawn_trimmer() {
    static SPAWNED: std::sync::Once = std::sync::Once::new();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    SPAWNED.call_once(|| {
        tokio::spawn(trim_when_grown());
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_when_grown() {
    let mut trimmer = Trimmer::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        let Some(now) = resident() else { return };
        if trimmer.observe(now) {
            // Off the workers: it takes each arena's lock while it walks it.
            let _ = tokio::task::spawn_blocking(trim).await;
            trimmer.trimmed(resident().unwrap_or(now));
        }
    }
}

/// The process's resident size in bytes.
pub fn resident() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * usize::try_from(page).ok()?)
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

    /// Each case: the resident size at successive checks, and which checks
    /// trim (a trim here frees nothing: the size after it is the same).
    #[test]
    fn trims_after_growth_that_has_settled() {
        // A step of `s` holds still (`SETTLED`); one of `k` does not.
        let (m, k, s) = (MIB, MIB / 4, SETTLED);
        let cases: &[(&str, &[usize], &[bool])] = &[
            ("start-up's leftovers, then steady", &[12 * m, 12 * m, 12 * m, 12 * m], &[false, true, false, false]),
            (
                "growing: once it holds still",
                &[12 * m, 12 * m, 14 * m, 16 * m, 18 * m, 18 * m],
                &[false, true, false, false, false, true],
            ),
            (
                "growing slowly holds still",
                &[
                    12 * m,
                    12 * m,
                    12 * m + s,
                    12 * m + 2 * s,
                    12 * m + 3 * s,
                    12 * m + 4 * s,
                    12 * m + 5 * s,
                    12 * m + 6 * s,
                    12 * m + 7 * s,
                    13 * m,
                ],
                &[false, true, false, false, false, false, false, false, false, true],
            ),
            ("a little growth", &[12 * m, 12 * m, 12 * m + k, 12 * m + k], &[false, true, false, false]),
            ("a burst that came and went", &[12 * m, 12 * m, 20 * m, 20 * m], &[false, true, false, true]),
            (
                "from a new low",
                &[12 * m, 12 * m, 10 * m, 10 * m, 11 * m + k, 11 * m + k],
                &[false, true, false, false, false, true],
            ),
        ];
        for (name, resident, trims) in cases {
            let mut t = Trimmer::default();
            let got: Vec<bool> = resident
                .iter()
                .map(|r| {
                    let trim = t.observe(*r);
                    if trim {
                        t.trimmed(*r);
                    }
                    trim
                })
                .collect();
            assert_eq!(&got, trims, "{name}");
        }
    }

    /// A trim gives freed pages back: the process's resident size falls by
    /// most of what was freed between allocations that stay.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_freed_pages() {
        let resident = || resident().unwrap();
        // The resident size is the process's: the other tests, running on
        // other threads meanwhile, can grow it between the two readings.
        // A few tries; a trim that gives nothing back fails every one.
        let mut seen = Vec::new();
        for _ in 0..5 {
            // 64 MiB of 64 KiB blocks (below glibc's mmap threshold), each
            // followed by a small one that stays, so nothing can be given
            // back from the top of the heap.
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
            drop(kept);
            if before.saturating_sub(after) > 32 * MIB {
                return;
            }
            seen.push((before, after));
        }
        panic!("resident (before, after) each trim: {seen:?}");
    }
}
