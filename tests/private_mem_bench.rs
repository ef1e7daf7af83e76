//! Private-memory benchmark: prints figures, asserts nothing about time.
//!
//! 1. Conversion throughput on a software-protected VM: shared -> private ->
//!    shared round trips requested by the guest with `KVM_HC_MAP_GPA_RANGE`
//!    (the host sets the attributes and punches the private pages on the
//!    way back), with the guest writing every converted page, at 4 KiB and
//!    2 MiB granularity; next to the raw `KVM_SET_MEMORY_ATTRIBUTES` round
//!    trips on the same ranges with no guest involvement, in the same run.
//! 2. guest_memfd fault-in: pages per second for a guest first-touching a
//!    fresh guest_memfd-backed range (private on a protected VM; on a default
//!    VM only where the kernel lets it bind guest_memfd), next to a fresh
//!    anonymous-memory slot in the same run.
//!
//! 3. Setup costs per VM type: a bare `KVM_CREATE_VM`, a memslot created
//!    and deleted, and the whole setup every scenario pays (VM with its
//!    payload memslot and page tables, a vCPU, the agent's first guest call),
//!    that setup split into its stages (teardown included), the setup of the
//!    private_mem_* scenarios (plus a guest_memfd slot), and the cost of one
//!    memslot creation as slots accumulate.
//!
//! Run: `cargo bench -p kvm-selftests --bench private_mem_bench` (host), or
//! the built binary (`target/release/deps/private_mem_bench-*`) inside the
//! VM. `KVM_SELFTESTS_BENCH_SCALE` (default 1, up to 64) multiplies the
//! sizes. Anything the kernel lacks is reported as skipped, with the value
//! it reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::results::{Outcome, Record, ResultsFile};
use kvm_harness::uapi::{KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_DECRYPTED, KVM_MAP_GPA_RANGE_ENCRYPTED};
use kvm_harness::{settings, Agent, Cap, Error, GuestMemfd, Kvm, Result, Vm, VmType};

/// Environment variable: size multiplier (default 1).
pub const SCALE_ENV: &str = "KVM_SELFTESTS_BENCH_SCALE";

const PAGE: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
const SLOT: u32 = 10;
const REPEATS: usize = 3;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn rate(pages: u64, time: Duration) -> String {
    let per_sec = pages as f64 / time.as_secs_f64().max(1e-9);
    format!("{per_sec:>12.0} pages/s ({pages} pages in {:.3} s)", time.as_secs_f64())
}

/// A protected VM with one guest_memfd slot of `size` at `TEST_AREA_GPA`
/// and MAP_GPA_RANGE exits enabled.
fn protected(kvm: &Arc<Kvm>, size: u64) -> Result<(Vm, Arc<GuestMemfd>)> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    vm.enable_map_gpa_range_exits()?;
    let gmem = Arc::new(vm.create_guest_memfd(size, 0)?);
    vm.add_private_memory(SLOT, TEST_AREA_GPA, size, &gmem, 0)?;
    Ok((vm, gmem))
}

/// Guest-driven round trips over `[TEST_AREA_GPA, +size)` in chunks of
/// `granule`; returns the median time of one full pass.
fn guest_round_trips(kvm: &Arc<Kvm>, size: u64, granule: u64) -> Result<Duration> {
    let (vm, gmem) = protected(kvm, size)?;
    let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let mut samples = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        for gpa in (TEST_AREA_GPA..TEST_AREA_GPA + size).step_by(granule as usize) {
            for private in [true, false] {
                let attrs = if private { KVM_MAP_GPA_RANGE_ENCRYPTED } else { KVM_MAP_GPA_RANGE_DECRYPTED };
                let ret = guest.hypercall(KVM_HC_MAP_GPA_RANGE, [gpa, granule / PAGE, attrs, 0], |_, _, args| {
                    let (gpa, len) = (args[0], args[1] * PAGE);
                    if private {
                        vm.make_private(gpa, len)?;
                    } else {
                        gmem.punch_hole(gpa - TEST_AREA_GPA, len)?;
                        vm.make_shared(gpa, len)?;
                    }
                    Ok(0)
                })?;
                if ret != 0 {
                    return Err(Error::Guest(format!("KVM_HC_MAP_GPA_RANGE returned {ret:#x} to the guest")));
                }
                guest.touch(gpa, granule, PAGE, true)?;
            }
        }
        samples.push(start.elapsed());
    }
    guest.done()?;
    Ok(median(samples))
}

/// Host-only `KVM_SET_MEMORY_ATTRIBUTES` round trips over the same chunks.
fn raw_round_trips(kvm: &Arc<Kvm>, size: u64, granule: u64) -> Result<Duration> {
    let (vm, _gmem) = protected(kvm, size)?;
    let mut samples = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        for gpa in (TEST_AREA_GPA..TEST_AREA_GPA + size).step_by(granule as usize) {
            vm.make_private(gpa, granule)?;
            vm.make_shared(gpa, granule)?;
        }
        samples.push(start.elapsed());
    }
    Ok(median(samples))
}

/// Time for a guest to first-touch (write) every page of a fresh slot.
fn fault_in(kvm: &Arc<Kvm>, vm_type: VmType, size: u64, gmem_flags: Option<u64>) -> Result<Duration> {
    let mut samples = Vec::new();
    for _ in 0..REPEATS {
        let vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
        match gmem_flags {
            Some(flags) => {
                let gmem = Arc::new(vm.create_guest_memfd(size, flags)?);
                vm.add_private_memory(SLOT, TEST_AREA_GPA, size, &gmem, 0)?;
                if vm_type == VmType::SwProtected {
                    vm.make_private(TEST_AREA_GPA, size)?;
                }
            }
            None => drop(vm.add_memory(SLOT, TEST_AREA_GPA, size)?),
        }
        let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
        let start = Instant::now();
        guest.touch(TEST_AREA_GPA, size, PAGE, true)?;
        samples.push(start.elapsed());
        guest.done()?;
    }
    Ok(median(samples))
}

/// Prints one figure and, when the VM runner collects results
/// (`KVM_SELFTESTS_RESULTS`), records it as a passed entry whose message is
/// the figure (a failed measurement is a failed entry).
fn report(what: &str, outcome: Result<Duration>, pages: u64) {
    record(what, outcome.map(|time| rate(pages, time)));
}

/// [`report`] for per-operation costs: `ops` operations took the duration.
fn report_per_op(what: &str, outcome: Result<Duration>, ops: u64) {
    record(
        what,
        outcome.map(|time| {
            let us = time.as_secs_f64() * 1e6 / ops as f64;
            format!("{us:>12.1} us/op ({ops} ops in {:.3} s)", time.as_secs_f64())
        }),
    );
}

fn record(what: &str, figure: Result<String>) {
    let (outcome, line) = match figure {
        Ok(line) => (Outcome::Pass, line),
        Err(e) => (Outcome::Fail, format!("failed: {e}")),
    };
    println!("  {what:<76} {line}");
    let mut name: String =
        what.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    while name.contains("__") {
        name = name.replace("__", "_");
    }
    ResultsFile::from_env().record(&Record {
        binary: "private_mem_bench".into(),
        test: name.trim_matches('_').to_string(),
        outcome,
        duration_ms: 0,
        message: format!("{what}: {}", line.trim()),
    });
}

fn main() {
    let scale = match settings::count(SCALE_ENV, 1, 64) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("private_mem_bench: {e}");
            std::process::exit(2);
        }
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("private_mem_bench: kernel {}, scale {scale}, median of {REPEATS} runs", kernel.trim());
    let kvm = match Kvm::open() {
        Ok(kvm) => Arc::new(kvm),
        Err(e) => {
            println!("  all skipped: needs /dev/kvm: {e}");
            return;
        }
    };
    setup_figures(&kvm, scale);
    conversion_figures(&kvm, scale);
    fault_in_figures(&kvm, scale);
}

/// Operations per measured pass of the setup figures.
const SETUP_OPS: u64 = 20;

/// What setting up costs, per VM type the kernel offers, raw ioctls next to
/// a scenario's whole setup, in the same run.
fn setup_figures(kvm: &Arc<Kvm>, scale: u64) {
    println!("setup costs:");
    let ops = SETUP_OPS * scale;
    for vm_type in VmType::ALL {
        if !kvm.supports(vm_type) {
            println!("  {vm_type}: skipped: needs {vm_type}: {} = {:#x}", Cap::VmTypes, kvm.vm_types());
            continue;
        }
        report_per_op(&format!("{vm_type}: KVM_CREATE_VM"), timed(ops, || Vm::bare(kvm, vm_type).map(drop)), ops);
        let vm = match Vm::bare(kvm, vm_type) {
            Ok(vm) => vm,
            Err(e) => {
                record(&format!("{vm_type}: memslot create + delete"), Err(e));
                continue;
            }
        };
        report_per_op(
            &format!("{vm_type}: memslot create + delete (2 MiB)"),
            timed(ops, || {
                vm.add_memory(SLOT, TEST_AREA_GPA, SZ_2M)?;
                vm.delete_slot(SLOT)
            }),
            ops,
        );
        report_per_op(
            &format!("{vm_type}: VM + payload + vCPU + first guest call"),
            timed(ops, || {
                let vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
                Agent::start(vm.vcpu(0, [0; 4])?)?.done().map(drop)
            }),
            ops,
        );
        setup_stages(kvm, vm_type, ops);
        report_per_op(
            &format!("{vm_type}: one agent command (guest exit and re-entry)"),
            agent_round_trips(kvm, vm_type, 50 * ops),
            50 * ops,
        );
    }
    if kvm.supports(VmType::SwProtected) {
        report_per_op(
            "KVM_X86_SW_PROTECTED_VM: private_mem_* scenario setup (+ guest_memfd slot)",
            timed(ops, || {
                let (vm, _gmem) = protected(kvm, SZ_2M)?;
                Agent::start(vm.vcpu(0, [0; 4])?)?.done().map(drop)
            }),
            ops,
        );
    }
    memslot_scaling(kvm, scale);
}

/// The whole setup split into its stages, each timed in the same passes:
/// which of them a scenario's fixed cost is made of. Each stage's wall time
/// is shown next to the CPU time of this thread: where the wall time is far
/// larger, the kernel waits (e.g. for grace periods at teardown) and another
/// test running meanwhile would not be slowed.
fn setup_stages(kvm: &Arc<Kvm>, vm_type: VmType, ops: u64) {
    const STAGES: [&str; 6] = [
        "KVM_CREATE_VM",
        "system memslot with tables and payload",
        "vCPU in long mode (create, CPUID, sregs, regs)",
        "first guest call (KVM_RUN to READY)",
        "KVM_CREATE_VCPU alone (a second vCPU, no state set)",
        "teardown (close both vCPUs and the VM)",
    ];
    let mut totals = [(Duration::ZERO, Duration::ZERO); 6];
    let mut pass = || -> Result<()> {
        let mut marks = vec![Mark::now()];
        let mut vm = Vm::bare(kvm, vm_type)?;
        marks.push(Mark::now());
        vm.load_payload(&GUEST_AGENT)?;
        marks.push(Mark::now());
        let vcpu = vm.vcpu(0, [0; 4])?;
        marks.push(Mark::now());
        let agent = Agent::start(vcpu)?;
        marks.push(Mark::now());
        let extra = vm.bare_vcpu(1)?;
        marks.push(Mark::now());
        drop((agent, extra, vm));
        marks.push(Mark::now());
        for (total, pair) in totals.iter_mut().zip(marks.windows(2)) {
            total.0 += pair[1].wall - pair[0].wall;
            total.1 += pair[1].cpu.saturating_sub(pair[0].cpu);
        }
        Ok(())
    };
    if let Err(e) = (0..ops).try_for_each(|_| pass()) {
        return record(&format!("{vm_type}:   setup stages"), Err(e));
    }
    let per_op = |d: Duration| d.as_secs_f64() * 1e6 / ops as f64;
    for (stage, (wall, cpu)) in STAGES.iter().zip(totals) {
        let line = format!("{:>12.1} us/op wall, {:>9.1} us/op CPU of this thread", per_op(wall), per_op(cpu));
        record(&format!("{vm_type}:   stage: {stage}"), Ok(line));
    }
}

/// `ops` agent reads of a mapped GPA: what one guest exit and re-entry
/// costs a scenario, against which per-command batching can be weighed.
fn agent_round_trips(kvm: &Arc<Kvm>, vm_type: VmType, ops: u64) -> Result<Duration> {
    let vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
    let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let gpa = guest_payloads::layout::MAILBOX_GPA;
    let time = timed(ops, || guest.read(gpa).map(drop));
    guest.done()?;
    time
}

/// A wall-clock and thread-CPU timestamp.
struct Mark {
    wall: Instant,
    cpu: Duration,
}

impl Mark {
    fn now() -> Self {
        let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
            .map_or(Duration::ZERO, Duration::from);
        Self { wall: Instant::now(), cpu }
    }
}

/// `KVM_SET_USER_MEMORY_REGION2` creating one 2 MiB memslot, as the slot
/// count grows: whether `set_memory_region`'s all-slots test pays per slot
/// or per slot already present.
fn memslot_scaling(kvm: &Arc<Kvm>, scale: u64) {
    const BATCH: u32 = 256;
    let vm = match Vm::bare(kvm, VmType::Default) {
        Ok(vm) => vm,
        Err(e) => return record("memslot create as slots accumulate", Err(e)),
    };
    let nr = (kvm.cap(Cap::NrMemslots).max(0) as u32).min(4096 * scale as u32);
    let memory = match kvm_harness::HostMemory::anonymous(u64::from(nr) * SZ_2M) {
        Ok(m) => Arc::new(m),
        Err(e) => return record("memslot create as slots accumulate", Err(e)),
    };
    let mut created = 0;
    while created + BATCH <= nr {
        let outcome = timed_once(|| {
            for slot in created..created + BATCH {
                let offset = u64::from(slot) * SZ_2M;
                let region = kvm_harness::Region {
                    memory_offset: offset,
                    size: SZ_2M,
                    ..kvm_harness::Region::new(slot, offset, memory.clone())
                };
                vm.set_region(&region)?;
            }
            Ok(())
        });
        if created == 0 || created + 2 * BATCH > nr || created.is_power_of_two() {
            report_per_op(&format!("memslot create (2 MiB) with {created} slots present"), outcome, BATCH.into());
        } else if let Err(e) = outcome {
            return record("memslot create as slots accumulate", Err(e));
        }
        created += BATCH;
    }
}

fn timed_once(op: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    op().map(|()| start.elapsed())
}

/// The median over [`REPEATS`] passes of `ops` calls of `op`.
fn timed(ops: u64, mut op: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut samples = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        for _ in 0..ops {
            op()?;
        }
        samples.push(start.elapsed());
    }
    Ok(median(samples))
}

/// Conversion round trips, guest-driven and raw, at 4 KiB and 2 MiB.
fn conversion_figures(kvm: &Arc<Kvm>, scale: u64) {
    let protected_ok = kvm.supports(VmType::SwProtected);
    println!("conversion round trips (shared -> private -> shared), guest writes every converted page:");
    let ranges = [(PAGE, 256 * PAGE * scale), (SZ_2M, 4 * SZ_2M * scale)];
    for (granule, size) in ranges {
        let label = if granule == PAGE { "4 KiB" } else { "2 MiB" };
        // Each page goes private and back once per pass.
        let pages = size / PAGE;
        if !protected_ok {
            println!(
                "  {label} granularity: skipped: needs {}: {} = {:#x}",
                VmType::SwProtected,
                Cap::VmTypes,
                kvm.vm_types()
            );
            continue;
        }
        report(
            &format!("{label} granularity, guest-driven (KVM_HC_MAP_GPA_RANGE)"),
            guest_round_trips(kvm, size, granule),
            pages,
        );
        report(
            &format!("{label} granularity, raw KVM_SET_MEMORY_ATTRIBUTES, no guest"),
            raw_round_trips(kvm, size, granule),
            pages,
        );
    }
}

/// First-touch fault-in rates: guest_memfd against anonymous memory.
fn fault_in_figures(kvm: &Arc<Kvm>, scale: u64) {
    let protected_ok = kvm.supports(VmType::SwProtected);
    let size = 16 * SZ_2M * scale;
    let pages = size / PAGE;
    println!("first-touch fault-in of a fresh {} MiB slot by the guest:", size >> 20);
    if protected_ok {
        report(
            "KVM_X86_SW_PROTECTED_VM, guest_memfd (private)",
            fault_in(kvm, VmType::SwProtected, size, Some(0)),
            pages,
        );
        report(
            "KVM_X86_SW_PROTECTED_VM, anonymous memory (shared)",
            fault_in(kvm, VmType::SwProtected, size, None),
            pages,
        );
    } else {
        println!(
            "  KVM_X86_SW_PROTECTED_VM: skipped: needs {}: {} = {:#x}",
            VmType::SwProtected,
            Cap::VmTypes,
            kvm.vm_types()
        );
    }
    // A default VM binds guest_memfd only on kernels that let it (shared,
    // mmap-able guest_memfd): decided by the VM fd's capabilities.
    let default_gmem = Vm::bare(kvm, VmType::Default).map(|vm| (vm.cap(Cap::GuestMemfd), vm.cap(Cap::GuestMemfdFlags)));
    match default_gmem {
        Ok((gmem, flags)) if gmem > 0 && flags as u64 & kvm_harness::uapi::GUEST_MEMFD_FLAG_INIT_SHARED != 0 => {
            let flags = kvm_harness::uapi::GUEST_MEMFD_FLAG_MMAP | kvm_harness::uapi::GUEST_MEMFD_FLAG_INIT_SHARED;
            report("KVM_X86_DEFAULT_VM, guest_memfd (MMAP|INIT_SHARED)", fault_in(kvm, VmType::Default, size, Some(flags)), pages);
        }
        Ok((gmem, flags)) => println!(
            "  KVM_X86_DEFAULT_VM, guest_memfd: skipped: needs {} and INIT_SHARED in {} on a default VM: {gmem}, {flags:#x}",
            Cap::GuestMemfd,
            Cap::GuestMemfdFlags
        ),
        Err(e) => println!("  KVM_X86_DEFAULT_VM, guest_memfd: skipped: {e}"),
    }
    report("KVM_X86_DEFAULT_VM, anonymous memory", fault_in(kvm, VmType::Default, size, None), pages);
}
