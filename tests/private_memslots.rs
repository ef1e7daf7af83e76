//! Private-memslot binding rules: what a `KVM_MEM_GUEST_MEMFD` memslot may
//! bind, ported from the private phases of upstream's
//! `set_memory_region_test.c` and checked against `kvm_set_memory_region()`,
//! `check_memory_region_flags()` and `kvm_gmem_bind()`.
//!
//! Runs for every VM type whose VM fd reports `KVM_CAP_GUEST_MEMFD` (6.12:
//! only VMs with private memory; newer kernels: every VM). Each negative case
//! changes exactly one field of a binding that is otherwise valid, and then
//! shows the valid binding is accepted, so the rejection can only come from
//! the rule under test.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;

use kvm_harness::bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_harness::kernel_rules::{
    with_fix_hints, Fix, ForRunningKernel, GMEM_BINDING_OFFSET_SIGNEDNESS, GMEM_BINDING_OVERLAP,
};
use kvm_harness::{
    expect_errno, expect_ok, page_size, sweep, Body, Cap, Errno, GmemBinding, GuestMemfd, HostMemory, Kvm, Need,
    Region, Result, Suite, SysResult, Vm, VmType,
};
use kvm_selftests::BEYOND_MAX_GPA;

/// Slot, GPA and size of the binding under test (upstream's MEM_REGION_*).
const SLOT: u32 = 10;
const GPA: u64 = 0xc000_0000;
const SIZE: u64 = 0x20_0000;

/// A memslot at `gpa` of `size` bytes backed by fresh anonymous memory and
/// bound to `binding` at `offset`.
fn bound(slot: u32, gpa: u64, size: u64, binding: GmemBinding, offset: u64) -> Result<Region> {
    let memory = Arc::new(HostMemory::anonymous(size)?);
    Ok(Region::new(slot, gpa, memory).with_guest_memfd(binding, offset))
}

/// A VM of the type and a guest_memfd of `gmem_size` on it.
fn vm_and_gmem(kvm: &Arc<Kvm>, vm_type: VmType, gmem_size: u64) -> Result<(Vm, Arc<GuestMemfd>)> {
    let vm = Vm::bare(kvm, vm_type)?;
    let gmem = Arc::new(vm.create_guest_memfd(gmem_size, 0)?);
    Ok((vm, gmem))
}

/// Requires `bad` to fail with `errno`, then the same slot bound to `gmem`
/// at offset 0 to succeed.
fn rejects_then_valid(vm: &Vm, gmem: &Arc<GuestMemfd>, rule: &str, errno: Errno, bad: &Region) -> Result<()> {
    expect_errno(rule, errno, || vm.set_region(bad))?;
    let valid = Region { guest_memfd: Some((GmemBinding::Memfd(gmem.clone()), 0)), ..bad.clone() };
    expect_ok(&format!("control for \"{rule}\": the same memslot with a valid guest_memfd binding is accepted"), || {
        vm.set_region(&valid)
    })
}

#[derive(Debug, Clone, Copy)]
enum WrongFd {
    DevKvm,
    VmFd,
    PlainMemfd,
    OtherVmsGuestMemfd,
    NotOpen(u32),
}

fn binding_rejects_fd(kvm: &Arc<Kvm>, vm_type: VmType, which: WrongFd) -> Result<()> {
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, SIZE)?;
    let dev_kvm = File::open("/dev/kvm").sys(|| "open(/dev/kvm)".into())?;
    let memfd: OwnedFd = nix::sys::memfd::memfd_create(c"plain", nix::sys::memfd::MFdFlags::empty())
        .sys(|| "memfd_create(plain)".into())?;
    nix::unistd::ftruncate(&memfd, SIZE as i64).sys(|| format!("ftruncate(memfd, {SIZE:#x})"))?;
    let other_vm = Vm::bare(kvm, vm_type)?;
    let other_gmem = Arc::new(other_vm.create_guest_memfd(SIZE, 0)?);
    let (fd, what, errno) = match which {
        WrongFd::DevKvm => (dev_kvm.as_raw_fd(), "the /dev/kvm fd", Errno::EINVAL),
        WrongFd::VmFd => (vm.raw_fd(), "the VM's own fd", Errno::EINVAL),
        WrongFd::PlainMemfd => (memfd.as_raw_fd(), "a plain memfd", Errno::EINVAL),
        WrongFd::OtherVmsGuestMemfd => (other_gmem.as_raw_fd(), "another VM's guest_memfd", Errno::EINVAL),
        // fget() finds nothing: EBADF, before any other binding check.
        WrongFd::NotOpen(fd) => (fd as i32, "an fd number that is not open", Errno::EBADF),
    };
    let rule = format!("{vm_type}: a GUEST_MEMFD memslot bound to {what} (fd {fd}) is rejected with {errno:?}");
    let bad = bound(SLOT, GPA, SIZE, GmemBinding::RawFd(fd), 0)?;
    rejects_then_valid(&vm, &gmem, &rule, errno, &bad)?;
    if let WrongFd::OtherVmsGuestMemfd = which {
        // The guest_memfd itself is fine: its own VM binds it.
        let own = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(other_gmem.clone()), 0)?;
        expect_ok(&format!("{vm_type}: a guest_memfd binds to a memslot of the VM that created it"), || {
            other_vm.set_region(&own)
        })?;
    }
    Ok(())
}

/// Every offset 1..page-1: in bounds (the guest_memfd is twice the slot), only misaligned.
fn binding_rejects_unaligned_offsets(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, 2 * SIZE)?;
    let rule = format!("{vm_type}: a guest_memfd offset that is not page-aligned is rejected with EINVAL");
    sweep(&rule, 1..page_size(), |offset| {
        let bad = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem.clone()), offset)?;
        expect_errno(&rule, Errno::EINVAL, || vm.set_region(&bad))
    })?;
    let valid = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem.clone()), page_size())?;
    expect_ok(&format!("{vm_type}: control: the page-aligned offset {:#x} is accepted", page_size()), || {
        vm.set_region(&valid)
    })
}

/// Offsets whose binding would reach past the guest_memfd, or that are
/// negative as a file offset.
fn binding_rejects_offset(kvm: &Arc<Kvm>, vm_type: VmType, offset: u64, what: &str) -> Result<()> {
    let gmem_size = 2 * SIZE;
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, gmem_size)?;
    let rule = format!(
        "{vm_type}: a guest_memfd offset {offset:#x} ({what}; guest_memfd {gmem_size:#x} bytes, slot {SIZE:#x}) \
         is rejected with EINVAL"
    );
    let bad = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem.clone()), offset)?;
    rejects_then_valid(&vm, &gmem, &rule, Errno::EINVAL, &bad)
}

fn valid_binding_lifecycle(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let gmem_size = 2 * SIZE;
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, gmem_size)?;
    let first = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem.clone()), 0)?;
    expect_ok(&format!("{vm_type}: a GUEST_MEMFD memslot at guest_memfd offset 0 is accepted"), || {
        vm.set_region(&first)
    })?;
    expect_ok(&format!("{vm_type}: the GUEST_MEMFD memslot can be deleted"), || vm.set_region(&first.deletion()))?;
    expect_ok(&format!("{vm_type}: the deleted GUEST_MEMFD memslot can be added again"), || vm.set_region(&first))?;
    // The last offset that fits, in a second slot at a disjoint GPA.
    let last = bound(SLOT + 1, GPA + SIZE, SIZE, GmemBinding::Memfd(gmem.clone()), gmem_size - SIZE)?;
    expect_ok(&format!("{vm_type}: a binding that ends exactly at the end of the guest_memfd is accepted"), || {
        vm.set_region(&last)
    })
}

/// Overlap geometry: the guest_memfd is 6 units, slot B binds [2, 4) at a
/// GPA far from the candidate's, so GPA ranges never overlap.
#[derive(Debug, Clone, Copy)]
struct Overlap {
    name: &'static str,
    /// Candidate's offset and size, in bytes.
    offset: fn(u64) -> u64,
    size: fn(u64) -> u64,
    overlaps: bool,
}

const OVERLAPS: [Overlap; 7] = [
    Overlap { name: "head", offset: |u| u, size: |u| 2 * u, overlaps: true },
    Overlap { name: "tail", offset: |u| 3 * u, size: |u| 2 * u, overlaps: true },
    Overlap { name: "identical", offset: |u| 2 * u, size: |u| 2 * u, overlaps: true },
    Overlap { name: "containing", offset: |u| u, size: |u| 4 * u, overlaps: true },
    Overlap { name: "first_page_only", offset: |_| page_size(), size: |u| 2 * u, overlaps: true },
    Overlap { name: "last_page_only", offset: |u| 4 * u - page_size(), size: |u| 2 * u, overlaps: true },
    Overlap { name: "adjacent_below_and_above", offset: |_| 0, size: |u| 2 * u, overlaps: false },
];

fn overlapping_binding(kvm: &Arc<Kvm>, vm_type: VmType, case: Overlap) -> Result<()> {
    let unit = SIZE;
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, 6 * unit)?;
    let b_gpa = 2 * GPA;
    let b = bound(SLOT + 1, b_gpa, 2 * unit, GmemBinding::Memfd(gmem.clone()), 2 * unit)?;
    vm.set_region(&b)?;
    let (offset, size) = ((case.offset)(unit), (case.size)(unit));
    let candidate = bound(SLOT, GPA, size, GmemBinding::Memfd(gmem.clone()), offset)?;
    assert!(GPA + size <= b_gpa, "the candidate's GPA range must not touch slot B's");
    if case.overlaps {
        // The errno changed upstream (see kernel_rules::GMEM_BINDING_OVERLAP).
        let expected = GMEM_BINDING_OVERLAP.expected()?;
        let rule = format!(
            "{vm_type}: binding guest_memfd [{offset:#x}, +{size:#x}) while another memslot binds \
             [{:#x}, +{:#x}) (GPA ranges disjoint) is rejected; {}",
            2 * unit,
            2 * unit,
            expected.why
        );
        expected.expect_errno(&rule, || vm.set_region(&candidate))?;
        // Control: the same slot bound to the free range [0, 2 units) is accepted.
        let valid = bound(SLOT, GPA, 2 * unit, GmemBinding::Memfd(gmem.clone()), 0)?;
        expect_ok(&format!("{vm_type}: control: a binding of the free range [0, {:#x}) is accepted", 2 * unit), || {
            vm.set_region(&valid)
        })
    } else {
        expect_ok(
            &format!("{vm_type}: a binding of [0, {:#x}) right below another binding is accepted", 2 * unit),
            || vm.set_region(&candidate),
        )?;
        let above = bound(SLOT + 2, 3 * GPA, 2 * unit, GmemBinding::Memfd(gmem.clone()), 4 * unit)?;
        expect_ok(
            &format!(
                "{vm_type}: a binding of [{:#x}, {:#x}) right above another binding is accepted",
                4 * unit,
                6 * unit
            ),
            || vm.set_region(&above),
        )
    }
}

/// What upstream's overlap test really exercised: GPA ranges that overlap,
/// the other slot's front half (`head`) or back half (`tail`), with disjoint
/// guest_memfd ranges. EEXIST on every kernel: `kvm_set_memory_region()`
/// finds the GPA overlap before any guest_memfd check.
fn gpa_overlap_is_eexist(kvm: &Arc<Kvm>, vm_type: VmType, half: &str) -> Result<()> {
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, 4 * SIZE)?;
    vm.set_region(&bound(SLOT + 1, 2 * GPA, 2 * SIZE, GmemBinding::Memfd(gmem.clone()), 2 * SIZE)?)?;
    let gpa = match half {
        "head" => 2 * GPA - SIZE,
        _ => 2 * GPA + SIZE,
    };
    let candidate = bound(SLOT, gpa, 2 * SIZE, GmemBinding::Memfd(gmem.clone()), 0)?;
    expect_errno(
        &format!(
            "{vm_type}: a memslot at GPA [{gpa:#x}, +{:#x}) overlapping the {half} of another memslot's \
             [{:#x}, +{:#x}) is rejected with EEXIST",
            2 * SIZE,
            2 * GPA,
            2 * SIZE
        ),
        Errno::EEXIST,
        || vm.set_region(&candidate),
    )?;
    let free = bound(SLOT, 4 * GPA, 2 * SIZE, GmemBinding::Memfd(gmem.clone()), 0)?;
    expect_ok(&format!("{vm_type}: control: the same memslot at a free GPA is accepted"), || vm.set_region(&free))
}

#[derive(Debug, Clone, Copy)]
enum FlagCombo {
    LogDirty,
    Readonly,
}

fn flag_combo_rejected(kvm: &Arc<Kvm>, vm_type: VmType, combo: FlagCombo) -> Result<()> {
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, SIZE)?;
    let (flag, name, why) = match combo {
        FlagCombo::LogDirty => {
            (KVM_MEM_LOG_DIRTY_PAGES, "KVM_MEM_LOG_DIRTY_PAGES", "dirty logging of private memory is unsupported")
        }
        FlagCombo::Readonly => (
            KVM_MEM_READONLY,
            "KVM_MEM_READONLY",
            "read-only memslots emulate MMIO on writes, which private memory cannot",
        ),
    };
    // Controls first: each flag alone is accepted, so only the combination can be refused.
    let mut plain = Region::new(SLOT, GPA, Arc::new(HostMemory::anonymous(SIZE)?));
    plain.flags = flag;
    expect_ok(&format!("{vm_type}: control: {name} without KVM_MEM_GUEST_MEMFD is accepted"), || {
        vm.set_region(&plain)
    })?;
    vm.set_region(&plain.deletion())?;
    let gmem_only = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem.clone()), 0)?;
    let mut both = gmem_only.clone();
    both.flags |= flag;
    expect_errno(
        &format!("{vm_type}: KVM_MEM_GUEST_MEMFD | {name} is rejected with EINVAL ({why})"),
        Errno::EINVAL,
        || vm.set_region(&both),
    )?;
    expect_ok(&format!("{vm_type}: control: KVM_MEM_GUEST_MEMFD alone is accepted"), || vm.set_region(&gmem_only))
}

fn v1_rejects_guest_memfd_flag(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, SIZE)?;
    let region = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem.clone()), 0)?;
    expect_errno(
        &format!("{vm_type}: KVM_SET_USER_MEMORY_REGION (v1) rejects KVM_MEM_GUEST_MEMFD with EINVAL"),
        Errno::EINVAL,
        || vm.set_region_v1(&region),
    )?;
    expect_ok(&format!("{vm_type}: control: the same memslot via KVM_SET_USER_MEMORY_REGION2 is accepted"), || {
        vm.set_region(&region)
    })
}

/// __kvm_set_memory_region(): when creating a guest_memfd memslot fails
/// after its binding was made (kvm_arch_prepare_memory_region() refuses a
/// GFN past the maximum), the binding is undone: the same guest_memfd range
/// binds to a valid memslot right after.
fn failed_memslot_creation_releases_its_guest_memfd_binding(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (vm, gmem) = vm_and_gmem(kvm, vm_type, SIZE)?;
    let beyond = bound(SLOT, BEYOND_MAX_GPA, SIZE, GmemBinding::Memfd(gmem.clone()), 0)?;
    expect_errno(
        &format!("{vm_type}: a guest_memfd memslot at {BEYOND_MAX_GPA:#x} is rejected with EINVAL"),
        Errno::EINVAL,
        || vm.set_region(&beyond),
    )?;
    let valid = bound(SLOT, GPA, SIZE, GmemBinding::Memfd(gmem), 0)?;
    expect_ok(
        &format!("{vm_type}: the guest_memfd range a rejected memslot would have bound can be bound again"),
        || vm.set_region(&valid),
    )
}

/// Whether a fresh VM of the type reports `KVM_CAP_GUEST_MEMFD` on its fd.
fn binds_guest_memfd(kvm: &Arc<Kvm>, vm_type: VmType) -> bool {
    Vm::bare(kvm, vm_type).is_ok_and(|vm| vm.cap(Cap::GuestMemfd) != 0)
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    for vm_type in VmType::ALL {
        // A type the kernel lacks is listed (and skipped with the reason); a
        // type whose VM fd reports no KVM_CAP_GUEST_MEMFD has no private
        // memslots to check (vm_types checks that its binding is refused).
        if let Some(kvm) = suite.kvm() {
            if kvm.supports(vm_type) && !binds_guest_memfd(kvm, vm_type) {
                continue;
            }
        }
        for (rule, extra, body) in binding_rules(vm_type).into_iter().chain(overlap_and_flag_rules(vm_type)) {
            let mut needs = vec![Need::VmCap(vm_type, Cap::GuestMemfd)];
            needs.extend(extra);
            suite.for_vm_type(vm_type, &rule, needs, move |kvm, _| body(kvm));
        }
    }
    suite.run()
}

/// What a binding may point at: fds, offsets, and a valid binding's lifecycle.
fn binding_rules(vm_type: VmType) -> Vec<(String, Vec<Need>, Body)> {
    let mut rules: Vec<(String, Vec<Need>, Body)> = Vec::new();
    for (name, which) in [
        ("dev_kvm_fd", WrongFd::DevKvm),
        ("vm_fd", WrongFd::VmFd),
        ("plain_memfd", WrongFd::PlainMemfd),
        ("other_vms_guest_memfd", WrongFd::OtherVmsGuestMemfd),
        ("fd_not_open_0x7fffffff", WrongFd::NotOpen(0x7fff_ffff)),
        ("fd_not_open_u32_max", WrongFd::NotOpen(u32::MAX)),
    ] {
        rules.push((
            format!("binding_rejects_{name}"),
            vec![],
            Box::new(move |kvm| binding_rejects_fd(kvm, vm_type, which)),
        ));
    }
    rules.push((
        "binding_rejects_offsets_1_to_page_minus_1".into(),
        vec![],
        Box::new(move |kvm| binding_rejects_unaligned_offsets(kvm, vm_type)),
    ));
    rules.push((
        "failed_memslot_creation_releases_its_guest_memfd_binding".into(),
        vec![],
        Box::new(move |kvm| failed_memslot_creation_releases_its_guest_memfd_binding(kvm, vm_type)),
    ));
    let page = page_size();
    let none: &'static [Fix] = &[];
    for (name, offset, what, fixes) in [
        ("offset_ending_one_page_past_end", SIZE + page, "the range ends one page past the guest_memfd", none),
        ("offset_at_end", 2 * SIZE, "the range starts at the end of the guest_memfd", none),
        ("offset_with_bit_63", 1 << 63, "negative as a file offset", none),
        ("offset_wrapping_u64", !(page - 1), "offset + size wraps around", none),
        // Upstream's test_invalid_binding: offset and size each valid as a
        // signed file offset, their sum not.
        (
            "offset_align_down_i64_max",
            (i64::MAX as u64) & !(page - 1),
            "offset + size crosses 2^63",
            GMEM_BINDING_OFFSET_SIGNEDNESS,
        ),
        (
            "offset_ending_exactly_at_2_63",
            (1 << 63) - SIZE,
            "offset + size is exactly 2^63",
            GMEM_BINDING_OFFSET_SIGNEDNESS,
        ),
    ] {
        rules.push((
            format!("binding_rejects_{name}"),
            vec![],
            Box::new(move |kvm| with_fix_hints(fixes, || binding_rejects_offset(kvm, vm_type, offset, what))),
        ));
    }
    rules.push((
        "valid_binding_can_be_deleted_and_readded".into(),
        vec![],
        Box::new(move |kvm| valid_binding_lifecycle(kvm, vm_type)),
    ));
    rules
}

/// Overlapping bindings and GPA ranges, flag combinations, the v1 ioctl.
fn overlap_and_flag_rules(vm_type: VmType) -> Vec<(String, Vec<Need>, Body)> {
    let mut rules: Vec<(String, Vec<Need>, Body)> = Vec::new();
    for case in OVERLAPS {
        let rule = if case.overlaps {
            format!("binding_rejects_guest_memfd_overlap_{}", case.name)
        } else {
            format!("binding_accepts_guest_memfd_ranges_{}", case.name)
        };
        rules.push((rule.clone(), vec![], Box::new(move |kvm| overlapping_binding(kvm, vm_type, case))));
    }
    rules.push((
        "memslot_gpa_overlap_rejected_with_eexist".into(),
        vec![],
        Box::new(move |kvm| gpa_overlap_is_eexist(kvm, vm_type, "head")),
    ));
    rules.push((
        "memslot_gpa_overlap_back_half_rejected_with_eexist".into(),
        vec![],
        Box::new(move |kvm| gpa_overlap_is_eexist(kvm, vm_type, "tail")),
    ));
    rules.push((
        "guest_memfd_with_log_dirty_pages_rejected".into(),
        vec![],
        Box::new(move |kvm| flag_combo_rejected(kvm, vm_type, FlagCombo::LogDirty)),
    ));
    // READONLY | GUEST_MEMFD is refused since the fix that made guest_memfd
    // and read-only memslots exclusive (v6.8, before guest_memfd shipped);
    // since v6.11 KVM_MEM_READONLY itself also depends on
    // kvm_arch_has_readonly_mem(), which KVM_CAP_READONLY_MEM on the VM fd
    // reports. Only where READONLY alone is accepted does a rejection of
    // the combination isolate the guest_memfd rule, so that is the
    // capability this test needs.
    rules.push((
        "guest_memfd_with_readonly_rejected".into(),
        vec![Need::VmCap(vm_type, Cap::ReadonlyMem)],
        Box::new(move |kvm| flag_combo_rejected(kvm, vm_type, FlagCombo::Readonly)),
    ));
    rules.push((
        "v1_ioctl_rejects_guest_memfd_flag".into(),
        vec![],
        Box::new(move |kvm| v1_rejects_guest_memfd_flag(kvm, vm_type)),
    ));
    rules
}
