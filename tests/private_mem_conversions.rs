//! Shared/private conversions requested by the guest with the
//! `KVM_HC_MAP_GPA_RANGE` hypercall, on a software-protected VM.
//!
//! Port of the kernel's `x86/private_mem_conversions_test.c`: the guest
//! (the agent payload, driven step by step) converts ranges of its memory
//! between shared and private with `KVM_HC_MAP_GPA_RANGE`; the host handles
//! each `KVM_EXIT_HYPERCALL` by fallocating the guest_memfd when asked
//! (allocate for private, PUNCH_HOLE for shared) and calling
//! `KVM_SET_MEMORY_ATTRIBUTES`, then completes the hypercall with 0. At every
//! checkpoint the host must see only shared data in its mapping, and the
//! guest must see the host's writes to shared ranges.
//!
//! The hypercall's `attrs` argument travels to userspace untouched (6.12's
//! `__kvm_emulate_hypercall` only validates the GPA and page count), so it
//! carries the x86 uAPI's `KVM_MAP_GPA_RANGE_ENCRYPTED` bit for "private"
//! plus two test-defined request bits, as upstream's arbitrary flags do.
//!
//! Environment (the concurrent scenario):
//! - `KVM_SELFTESTS_CONVERSION_VCPUS`: vCPUs converting concurrently, each on
//!   its own range (default 4, 1..=16).
//! - `KVM_SELFTESTS_CONVERSION_MEMSLOTS`: memslots sharing the one
//!   guest_memfd at consecutive offsets (default 2; must divide the
//!   guest_memfd size, 4 MiB per vCPU, into page-aligned slots).

use std::process::ExitCode;
use std::sync::{Arc, Barrier};

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::backing::Backing;
use kvm_harness::uapi::{
    KVM_EINVAL, KVM_EXIT_HYPERCALL_LONG_MODE, KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_2M, KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
};
use kvm_harness::{
    ensure, expect_errno, expect_ok, settings, sweep, threads, Agent, Cap, Errno, Error, Fill, GmemBinding, GuestMemfd,
    Kvm, Need, Region, Result, Suite, Vm, VmType,
};
use kvm_selftests::huge_regions::{self, Conversion};

/// Environment variable: number of concurrently converting vCPUs.
pub const VCPUS_ENV: &str = "KVM_SELFTESTS_CONVERSION_VCPUS";
/// Environment variable: number of memslots sharing the guest_memfd.
pub const MEMSLOTS_ENV: &str = "KVM_SELFTESTS_CONVERSION_MEMSLOTS";

const PAGE: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
const BASE_SLOT: u32 = 10;
const BASE_GPA: u64 = TEST_AREA_GPA;
/// Each vCPU's data: 2 MiB plus a page, so the 2 MiB ranges at offset 4 KiB
/// straddle a 2 MiB boundary.
const PER_CPU_DATA_SIZE: u64 = SZ_2M + PAGE;
/// Each vCPU's share of the guest_memfd, 2 MiB aligned.
const PER_CPU_SIZE: u64 = 2 * SZ_2M;

/// Test-defined `attrs` bit: the host calls `KVM_SET_MEMORY_ATTRIBUTES`.
const REQ_SET_ATTRIBUTES: u64 = 1 << 8;
/// Test-defined `attrs` bit: the host fallocates (private) or punches (shared).
const REQ_FALLOCATE: u64 = 1 << 9;

/// (offset, size) of the converted ranges inside a vCPU's data, as upstream.
const RANGES: [(u64, u64); 5] = [(0, PAGE), (0, SZ_2M), (PAGE, PAGE), (PAGE, SZ_2M), (SZ_2M, PAGE)];
/// Beyond upstream (whose odd-page loop only ever sees single pages): in
/// 2 MiB ranges, the first this-many pages alternate private/shared.
const HOLE_PAGES_IN_LARGE_RANGES: u64 = 8;

const DEF_P: u64 = 0xaaaa_aaaa_aaaa_aaaa;
const INIT_P: u64 = 0xcccc_cccc_cccc_cccc;
const P1: u64 = 0x1111_1111_1111_1111;
const P2: u64 = 0x2222_2222_2222_2222;
const P3: u64 = 0x3333_3333_3333_3333;
const P4: u64 = 0x4444_4444_4444_4444;

fn needs() -> Vec<Need> {
    vec![Need::VmType(VmType::SwProtected), Need::Cap(Cap::ExitHypercall)]
}

/// A protected VM with `memslots` slots over one guest_memfd sized for `vcpus`.
struct Setup {
    vm: Vm,
    gmem: Arc<GuestMemfd>,
    size: u64,
}

fn setup(kvm: &Arc<Kvm>, vcpus: u64, memslots: u64, backing: Backing) -> Result<Setup> {
    let size = PER_CPU_SIZE * vcpus;
    let slot_size = size / memslots;
    if memslots == 0 || slot_size * memslots != size || slot_size % PAGE != 0 {
        return Err(Error::Config(format!(
            "{MEMSLOTS_ENV}={memslots}: the {size:#x}-byte guest_memfd must split into equal page-aligned slots"
        )));
    }
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    vm.enable_map_gpa_range_exits()?;
    let gmem = Arc::new(vm.create_guest_memfd(size, 0)?);
    for i in 0..memslots {
        let shared = Arc::new(backing.allocate(slot_size)?);
        let region = Region::new(BASE_SLOT + i as u32, BASE_GPA + slot_size * i, shared)
            .with_guest_memfd(GmemBinding::Memfd(gmem.clone()), slot_size * i);
        vm.set_region(&region)?;
    }
    Ok(Setup { vm, gmem, size })
}

/// One vCPU's conversion scenario: the agent, and the VM it converts in.
struct Conv<'a> {
    vm: &'a Vm,
    gmem: &'a GuestMemfd,
    guest: Agent,
    id: u64,
    base: u64,
}

impl Conv<'_> {
    /// The guest asks for `[gpa, gpa + size)` to become shared or private.
    fn map(&mut self, gpa: u64, size: u64, private: bool, fallocate: bool, set_attributes: bool) -> Result<()> {
        let page_size = if gpa % SZ_2M == 0 && size % SZ_2M == 0 {
            KVM_MAP_GPA_RANGE_PAGE_SZ_2M
        } else {
            KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        };
        let mut attrs = page_size | if private { KVM_MAP_GPA_RANGE_ENCRYPTED } else { KVM_MAP_GPA_RANGE_DECRYPTED };
        if fallocate {
            attrs |= REQ_FALLOCATE;
        }
        if set_attributes {
            attrs |= REQ_SET_ATTRIBUTES;
        }
        let npages = size / PAGE;
        let (vm, gmem) = (self.vm, self.gmem);
        let mut exits = 0;
        let ret = self.guest.hypercall(KVM_HC_MAP_GPA_RANGE, [gpa, npages, attrs, 0], |vcpu, nr, args| {
            exits += 1;
            let rule = "KVM_HC_MAP_GPA_RANGE exits to userspace with the guest's nr, GPA, page count and attrs";
            ensure!(
                nr == KVM_HC_MAP_GPA_RANGE && args[..3] == [gpa, npages, attrs],
                rule,
                "vCPU {}: exit nr {nr}, args {:#x?}; guest passed nr {KVM_HC_MAP_GPA_RANGE}, [{gpa:#x}, {npages:#x}, {attrs:#x}]",
                vcpu.id(),
                &args[..3]
            );
            handle_map_gpa_range(vm, gmem, args[0], args[1] * PAGE, args[2])?;
            Ok(0)
        })?;
        ensure!(
            exits == 1 && ret == 0,
            "one KVM_HC_MAP_GPA_RANGE is one KVM_EXIT_HYPERCALL, and the guest sees the host's return value",
            "{exits} exits, guest rax {ret:#x} (host returned 0)"
        );
        Ok(())
    }

    fn map_private(&mut self, gpa: u64, size: u64, fallocate: bool) -> Result<()> {
        self.map(gpa, size, true, fallocate, true)
    }

    fn map_shared(&mut self, gpa: u64, size: u64, fallocate: bool) -> Result<()> {
        self.map(gpa, size, false, fallocate, true)
    }

    /// Upstream's "punch hole": a shared request with fallocate only.
    fn punch_hole(&mut self, gpa: u64, size: u64) -> Result<()> {
        self.map(gpa, size, false, true, false)
    }

    /// Host checkpoint: its shared mapping of the range holds `expected`;
    /// for a shared range it then writes `new` there for the guest to see.
    fn host_sync(&self, gpa: u64, size: u64, expected: u64, new: Option<u64>) -> Result<()> {
        let mut at = gpa;
        while at < gpa + size {
            let region = self.vm.slot_at(at).ok_or_else(|| Error::misuse(format!("no memslot at {at:#x}")))?;
            let len = (gpa + size).min(region.gpa + region.size) - at;
            let (memory, offset) = self.vm.shared_view(at, len)?;
            if let Some((off, value)) = memory.find_mismatch(offset, len, Fill::U64(expected)) {
                let gpa_seen = at + off - offset;
                return Err(Error::rule(
                    "the host's mapping of a GPA only ever holds shared data",
                    format!(
                        "vCPU {} checkpoint on [{gpa:#x}, +{size:#x}): host sees {value:#x} at GPA {gpa_seen:#x}, \
                         expected the shared pattern {expected:#x}{}",
                        self.id,
                        leak_hint(value)
                    ),
                ));
            }
            if let Some(new) = new {
                memory.fill_u64(offset, len, new);
            }
            at += len;
        }
        Ok(())
    }

    /// The guest checks a pattern, naming the rule when it does not hold.
    fn guest_check(&mut self, gpa: u64, size: u64, pattern: u64, rule: &str) -> Result<()> {
        self.guest.check(gpa, size, pattern).map_err(|e| Error::rule(rule, e.to_string()))
    }

    fn explicit_conversion(&mut self, fallocate: bool) -> Result<()> {
        let (base, total) = (self.base, PER_CPU_DATA_SIZE);
        // Shared by default: the guest and the host see each other's writes.
        self.guest.fill(base, total, DEF_P)?;
        self.guest_check(base, total, DEF_P, "memory starts shared and readable by the guest")?;
        self.host_sync(base, total, DEF_P, Some(INIT_P))?;
        self.guest_check(base, total, INIT_P, "the guest sees the host's writes to shared memory")?;

        for (offset, size) in RANGES {
            let gpa = base + offset;
            let case = format!("range [{gpa:#x}, +{size:#x}), fallocate {fallocate}");
            self.guest.fill(gpa, size, P1)?;
            self.map_private(gpa, size, fallocate)?;
            let hole_pages = if size > PAGE {
                // Upstream only writes the first page of large ranges.
                self.guest.fill(gpa, PAGE, P2)?;
                self.host_sync(gpa, PAGE, P1, None)?;
                HOLE_PAGES_IN_LARGE_RANGES
            } else {
                self.guest.fill(gpa, size, P2)?;
                self.host_sync(gpa, size, P1, None)?;
                self.guest_check(gpa, size, P2, &format!("{case}: private memory holds what the guest wrote"))?;
                let rest = "converting a range leaves the rest of the data shared and intact";
                if gpa > base {
                    self.guest_check(base, gpa - base, INIT_P, &format!("{case}: {rest}"))?;
                }
                if gpa + size < base + total {
                    self.guest_check(gpa + size, base + total - (gpa + size), INIT_P, &format!("{case}: {rest}"))?;
                }
                size / PAGE
            };
            // Odd pages back to shared: holes in a private range.
            for page in 0..hole_pages {
                let at = gpa + page * PAGE;
                if page % 2 == 1 {
                    self.map_shared(at, PAGE, fallocate)?;
                    self.host_sync(at, PAGE, P1, Some(P3))?;
                    self.guest_check(
                        at,
                        PAGE,
                        P3,
                        &format!("{case}: a page converted back to shared shows host writes"),
                    )?;
                } else {
                    self.host_sync(at, PAGE, P1, None)?;
                }
            }
            // Whole range back to shared, filled by the guest, checked and
            // rewritten by the host.
            self.map_shared(gpa, size, fallocate)?;
            self.guest.fill(gpa, size, P3)?;
            self.host_sync(gpa, size, P3, Some(P4))?;
            self.guest_check(gpa, size, P4, &format!("{case}: shared again, the guest sees the host's writes"))?;
            self.guest.fill(gpa, size, INIT_P)?;
            // Free every private page so the next range starts clean.
            self.map_shared(base, total, true)?;
        }
        Ok(())
    }

    fn punch_holes(&mut self, precise: bool) -> Result<()> {
        let (base, total) = (self.base, PER_CPU_DATA_SIZE);
        self.map_private(base, total, false)?;
        for (offset, size) in RANGES {
            let gpa = base + offset;
            self.punch_hole(base, total)?;
            let (fill_at, fill_len) = if precise { (gpa, size) } else { (base, total) };
            self.guest.fill(fill_at, fill_len, INIT_P)?;
            self.guest_check(fill_at, fill_len, INIT_P, "private memory refaulted after PUNCH_HOLE holds new writes")?;
            self.punch_hole(gpa, size)?;
            self.guest_check(
                gpa,
                size,
                0,
                &format!(
                    "after PUNCH_HOLE of private [{gpa:#x}, +{size:#x}) ({} fault-in), the guest reads zeros",
                    if precise { "precise" } else { "imprecise" }
                ),
            )?;
        }
        Ok(())
    }
}

/// Hints at the worst case: a private pattern showing through to the host.
fn leak_hint(value: u64) -> &'static str {
    if value == P2 {
        " -- that is the guest's PRIVATE pattern: private data leaked into the shared mapping"
    } else {
        ""
    }
}

/// The host side of `KVM_HC_MAP_GPA_RANGE`, as upstream's handler.
fn handle_map_gpa_range(vm: &Vm, gmem: &GuestMemfd, gpa: u64, size: u64, attrs: u64) -> Result<()> {
    let private = attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0;
    if attrs & REQ_FALLOCATE != 0 {
        // Slots map the guest_memfd contiguously from BASE_GPA.
        let offset = gpa - BASE_GPA;
        if private {
            gmem.allocate(offset, size)?;
        } else {
            gmem.punch_hole(offset, size)?;
        }
    }
    if attrs & REQ_SET_ATTRIBUTES != 0 {
        if private {
            vm.make_private(gpa, size)?;
        } else {
            vm.make_shared(gpa, size)?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Explicit { fallocate: bool },
    PunchHole { precise: bool },
    All,
}

fn run_phase(conv: &mut Conv<'_>, phase: Phase) -> Result<()> {
    match phase {
        Phase::Explicit { fallocate } => conv.explicit_conversion(fallocate),
        Phase::PunchHole { precise } => conv.punch_holes(precise),
        Phase::All => {
            conv.explicit_conversion(false)?;
            conv.explicit_conversion(true)?;
            conv.punch_holes(false)?;
            conv.punch_holes(true)
        }
    }
}

/// Runs `phase` on `vcpus` vCPUs concurrently (each on its own range,
/// released together), then checks guest_memfd still works once the VM is gone.
fn conversions(kvm: &Arc<Kvm>, vcpus: u64, memslots: u64, phase: Phase) -> Result<()> {
    conversions_backed_by(kvm, vcpus, memslots, phase, Backing::Anonymous)
}

/// [`conversions`] with the memslots' shared side in `backing` (upstream's
/// `-s`): KVM's shared faults and mmu-notifier invalidations take other
/// paths for THP, shmem and hugetlb pages.
fn conversions_backed_by(kvm: &Arc<Kvm>, vcpus: u64, memslots: u64, phase: Phase, backing: Backing) -> Result<()> {
    let Setup { vm, gmem, size } = setup(kvm, vcpus, memslots, backing)?;
    let mut cpus = Vec::new();
    for i in 0..vcpus {
        cpus.push(vm.vcpu(i, [0; 4])?);
    }
    let start = Barrier::new(vcpus as usize);
    let outcomes: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = cpus
            .into_iter()
            .enumerate()
            .map(|(i, vcpu)| {
                let (vm, gmem, start) = (&vm, &*gmem, &start);
                s.spawn(move || -> Result<()> {
                    start.wait();
                    let guest = Agent::start(vcpu)?;
                    let mut conv = Conv { vm, gmem, guest, id: i as u64, base: BASE_GPA + i as u64 * PER_CPU_SIZE };
                    run_phase(&mut conv, phase)?;
                    conv.guest.done().map(drop)
                })
            })
            .collect();
        handles.into_iter().map(|h| threads::join_result(h, "vCPU thread")).collect()
    });
    let failures: Vec<String> = outcomes
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.err().map(|e| format!("vCPU {i} (data at {:#x}): {e}", BASE_GPA + i as u64 * PER_CPU_SIZE))
        })
        .collect();
    if !failures.is_empty() {
        return Err(Error::Guest(format!("{} of {vcpus} vCPUs failed: {}", failures.len(), failures.join(" | "))));
    }
    drop(vm);
    guest_memfd_outlives_vm(&gmem, size)
}

/// The guest_memfd holds a reference to its VM: with the VM fd closed,
/// fallocate and PUNCH_HOLE still work.
fn guest_memfd_outlives_vm(gmem: &GuestMemfd, size: u64) -> Result<()> {
    let rule = "a guest_memfd stays usable after its VM fd is closed";
    expect_ok(rule, || gmem.punch_hole(0, size))?;
    expect_ok(rule, || gmem.allocate(0, size))?;
    expect_ok(rule, || gmem.punch_hole(0, size))
}

fn concurrent_vcpus_convert_own_ranges_of_one_guest_memfd_across_memslots(kvm: &Arc<Kvm>) -> Result<()> {
    let vcpus = settings::count(VCPUS_ENV, 4, 16)?;
    let memslots = settings::count(MEMSLOTS_ENV, 2, 64)?;
    println!("private_mem_conversions: {vcpus} vCPUs, {memslots} memslots over one guest_memfd");
    conversions(kvm, vcpus, memslots, Phase::All)
}

/// __kvm_emulate_hypercall(): KVM_HC_MAP_GPA_RANGE checks its range itself
/// and answers the guest -KVM_EINVAL without exiting to userspace.
fn map_gpa_range_rejected_in_guest(kvm: &Arc<Kvm>, cases: &[(u64, u64, &str)]) -> Result<()> {
    let Setup { vm, .. } = setup(kvm, 1, 1, Backing::Anonymous)?;
    let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let einval = KVM_EINVAL.wrapping_neg();
    for &(gpa, npages, what) in cases {
        let ret =
            guest.hypercall(KVM_HC_MAP_GPA_RANGE, [gpa, npages, KVM_MAP_GPA_RANGE_ENCRYPTED, 0], |_, nr, args| {
                Err(Error::rule(
                    format!("KVM_HC_MAP_GPA_RANGE with {what} fails in the guest without exiting"),
                    format!("got KVM_EXIT_HYPERCALL nr {nr} args {args:#x?}"),
                ))
            })?;
        ensure!(
            ret == einval,
            format!("KVM_HC_MAP_GPA_RANGE with {what} returns -KVM_EINVAL to the guest"),
            "guest rax {ret:#x}, expected {einval:#x} (gpa {gpa:#x}, npages {npages:#x})"
        );
    }
    guest.done().map(drop)
}

fn map_gpa_range_is_rejected_in_guest_for_unaligned_gpa_or_zero_pages(kvm: &Arc<Kvm>) -> Result<()> {
    map_gpa_range_rejected_in_guest(kvm, &[(BASE_GPA + 8, 1, "an unaligned GPA"), (BASE_GPA, 0, "zero pages")])
}

/// The page count is 64 bits: one that carries the end GFN past 2^64 wraps.
fn map_gpa_range_is_rejected_in_guest_for_a_wrapping_page_count(kvm: &Arc<Kvm>) -> Result<()> {
    let wraps_to_zero = (BASE_GPA >> 12).wrapping_neg();
    map_gpa_range_rejected_in_guest(
        kvm,
        &[(BASE_GPA, wraps_to_zero, "a page count whose end GFN wraps to 0"), (BASE_GPA, u64::MAX, "u64::MAX pages")],
    )
}

/// kvm_vm_ioctl_enable_cap() and kvm_vm_ioctl_check_extension(): the
/// hypercalls that may exit to userspace are exactly KVM_HC_MAP_GPA_RANGE,
/// advertised as that one bit; enabling any other bit fails with EINVAL,
/// enabling that bit or none succeeds.
fn exit_hypercall_cap_accepts_only_map_gpa_range(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let valid = 1u64 << KVM_HC_MAP_GPA_RANGE;
    let advertised = vm.cap(Cap::ExitHypercall) as u32 as u64;
    ensure!(
        advertised == valid,
        "KVM_CAP_EXIT_HYPERCALL advertises exactly the KVM_HC_MAP_GPA_RANGE bit",
        "{} = {advertised:#x}, expected {valid:#x}",
        Cap::ExitHypercall
    );
    sweep(
        "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) rejects every bit but KVM_HC_MAP_GPA_RANGE with EINVAL",
        (0..64).filter(|b| *b != KVM_HC_MAP_GPA_RANGE),
        |bit| {
            expect_errno(&format!("bit {bit}"), Errno::EINVAL, || {
                vm.enable_cap(Cap::ExitHypercall, [1 << bit, 0, 0, 0])
            })
        },
    )?;
    for args0 in [valid, 0] {
        expect_ok(&format!("KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, {args0:#x}) succeeds"), || {
            vm.enable_cap(Cap::ExitHypercall, [args0, 0, 0, 0])
        })?;
    }
    Ok(())
}

fn map_gpa_range_without_exit_hypercall_returns_enosys_to_guest(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let enosys = 1000u64.wrapping_neg();
    let ret = guest.hypercall(KVM_HC_MAP_GPA_RANGE, [BASE_GPA, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, 0], |_, nr, _| {
        Err(Error::rule(
            "KVM_HC_MAP_GPA_RANGE exits to userspace only when KVM_CAP_EXIT_HYPERCALL enables it",
            format!("got KVM_EXIT_HYPERCALL nr {nr} without enabling it"),
        ))
    })?;
    ensure!(
        ret == enosys,
        "KVM_HC_MAP_GPA_RANGE without KVM_CAP_EXIT_HYPERCALL returns -KVM_ENOSYS to the guest",
        "guest rax {ret:#x}, expected {enosys:#x}"
    );
    guest.done().map(drop)
}

fn hypercall_exit_reports_long_mode(kvm: &Arc<Kvm>) -> Result<()> {
    let Setup { vm, .. } = setup(kvm, 1, 1, Backing::Anonymous)?;
    let mut guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    guest.submit(kvm_harness::Op::Hypercall {
        nr: KVM_HC_MAP_GPA_RANGE,
        args: [BASE_GPA, 1, KVM_MAP_GPA_RANGE_DECRYPTED, 0],
    })?;
    let flags = match guest.vcpu().run()? {
        kvm_harness::Exit::Hypercall { flags, .. } => flags,
        other => {
            return Err(Error::rule(
                "KVM_HC_MAP_GPA_RANGE exits with KVM_EXIT_HYPERCALL",
                guest.vcpu().report(other).to_string(),
            ))
        }
    };
    ensure!(
        flags == KVM_EXIT_HYPERCALL_LONG_MODE,
        "a 64-bit guest's KVM_EXIT_HYPERCALL has flags exactly KVM_EXIT_HYPERCALL_LONG_MODE",
        "hypercall.flags {flags:#x}"
    );
    guest.vcpu().set_hypercall_ret(0)?;
    guest.wait_ready("completing the hypercall")?;
    guest.done().map(drop)
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));

    for (name, phase) in [
        ("explicit_conversion_without_fallocate_keeps_host_view_shared", Phase::Explicit { fallocate: false }),
        ("explicit_conversion_with_fallocate_keeps_host_view_shared", Phase::Explicit { fallocate: true }),
        ("punch_hole_after_imprecise_fault_in_guest_reads_zeros", Phase::PunchHole { precise: false }),
        ("punch_hole_after_precise_fault_in_guest_reads_zeros", Phase::PunchHole { precise: true }),
    ] {
        suite.test(name, needs(), move |kvm| conversions(kvm, 1, 1, phase));
    }
    for backing in [Backing::AnonymousThp, Backing::Shmem, Backing::SharedHugetlb2M] {
        let mut needs = needs();
        needs.extend(backing.need(PER_CPU_SIZE));
        suite.test(format!("conversions_and_punch_holes_with_shared_side_in_{backing}"), needs, move |kvm| {
            conversions_backed_by(kvm, 1, 1, Phase::All, backing)
        });
    }

    huge_regions::register(&mut suite, "guest_conversions_inside_huge_regions", Conversion::GuestHypercall);

    kvm_harness::register!(suite, needs() =>
        concurrent_vcpus_convert_own_ranges_of_one_guest_memfd_across_memslots,
        map_gpa_range_is_rejected_in_guest_for_unaligned_gpa_or_zero_pages,
        map_gpa_range_is_rejected_in_guest_for_a_wrapping_page_count,
        map_gpa_range_without_exit_hypercall_returns_enosys_to_guest,
        hypercall_exit_reports_long_mode,
    );
    suite.per_vm_type(
        "exit_hypercall_cap_accepts_only_map_gpa_range",
        |_| vec![],
        exit_hypercall_cap_accepts_only_map_gpa_range,
    );
    suite.run()
}
