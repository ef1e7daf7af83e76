//! How much of a host CPU QEMU had while each test binary ran.
//!
//! Under TCG the guest's clocks follow the host's wall clock, so when the
//! host starves QEMU every deadline inside the guest (the `KVM_RUN`
//! watchdog, the prefault hang deadline) passes with less guest work done.
//! The share does not change a verdict; it is printed next to each binary's
//! wall time, and next to a failure, so a deadline that fired on a starved
//! emulator is told from one that fired on a kernel that hung.

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use kvm_harness::task_state::Stat;

/// A binary whose QEMU share was below this many percent of a host CPU
/// gets a note when it failed.
pub const STARVED_PERCENT: u32 = 50;

/// QEMU's CPU time at each binary's start, and each finished binary's share.
#[derive(Debug)]
pub struct HostShare {
    pid: u32,
    ticks_per_second: f64,
    started: BTreeMap<String, (Instant, u64)>,
    /// Finished binaries: QEMU's CPU time over the binary's wall time, in
    /// percent (100 is one host CPU all the time).
    pub per_binary: BTreeMap<String, u32>,
}

impl HostShare {
    /// Tracks the QEMU process `pid`.
    pub fn new(pid: u32) -> Self {
        let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
            Ok(Some(hz)) if hz > 0 => hz as f64,
            // USER_HZ has been 100 on every Linux architecture since 2.6.
            _ => 100.0,
        };
        Self { pid, ticks_per_second: hz, started: BTreeMap::new(), per_binary: BTreeMap::new() }
    }

    /// A binary started (the guest's `run NAME` marker).
    pub fn start(&mut self, name: &str) {
        if let Some(ticks) = cpu_ticks(self.pid) {
            self.started.insert(name.to_string(), (Instant::now(), ticks));
        }
    }

    /// A binary ended (the guest's `end NAME RC` marker).
    pub fn end(&mut self, name: &str) {
        let (Some((at, before)), Some(now)) = (self.started.remove(name), cpu_ticks(self.pid)) else { return };
        let wall = at.elapsed().as_secs_f64();
        if wall > 0.0 {
            let cpu = now.saturating_sub(before) as f64 / self.ticks_per_second;
            self.per_binary.insert(name.to_string(), (100.0 * cpu / wall).round() as u32);
        }
    }
}

/// User plus system time of every thread of process `pid`, in clock ticks
/// (utime and stime of `/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Stat::parse(&stat).map(|s| s.user_ticks + s.kernel_ticks)
}

/// The notes for failed binaries that ran on a starved emulator.
pub fn starvation_notes(failed_binaries: &[&str], shares: &BTreeMap<String, u32>) -> String {
    let mut notes = String::new();
    for binary in failed_binaries {
        if let Some(share) = shares.get(*binary).filter(|s| **s < STARVED_PERCENT) {
            notes.push_str(&format!(
                "xtask: note: QEMU had {share}% of a host CPU while {binary} ran: a deadline that fired in it \
                 (a watchdog timeout, a prefault hang) may be the host's starvation, not the kernel's; \
                 rerun it on an idle machine\n"
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_accrues_cpu_time_and_gets_a_share() {
        let mut share = HostShare::new(std::process::id());
        share.start("spin");
        let until = Instant::now() + std::time::Duration::from_millis(300);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        share.end("spin");
        let s = share.per_binary["spin"];
        // One thread spinning: at most one CPU, and surely some of one.
        assert!(s > 0 && s < 150, "{s}");
    }

    #[test]
    fn only_failed_binaries_below_the_threshold_get_a_note() {
        let shares = BTreeMap::from([("model".to_string(), 20), ("guest_memfd".to_string(), 90)]);
        let notes = starvation_notes(&["model", "guest_memfd", "vm_types"], &shares);
        assert_eq!(notes.lines().count(), 1, "{notes}");
        assert!(notes.contains("QEMU had 20% of a host CPU while model ran"), "{notes}");
    }
}
