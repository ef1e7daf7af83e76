//! guest_memfd rules (`KVM_CREATE_GUEST_MEMFD` and the file it returns),
//! ported from upstream's `guest_memfd_test.c` (6.12 and the newest in
//! torvalds/linux) and checked against `virt/kvm/guest_memfd.c`.
//!
//! Every rule runs once per (VM type, guest_memfd flags) combination the
//! running kernel supports: VM types from `KVM_CAP_VM_TYPES`, flags among 0,
//! MMAP and MMAP|INIT_SHARED from `KVM_CAP_GUEST_MEMFD_FLAGS` on that VM's
//! fd (absent, as on 6.12, means only 0). Nothing is decided by version.

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use guest_payloads::{layout, GUEST_AGENT};
use kvm_harness::bindings::KVM_MEM_GUEST_MEMFD;
use kvm_harness::kernel_rules::{
    self, ForRunningKernel, Hex, Versioned, GMEM_FLAGS_WITHOUT_PRIVATE_MEM, GMEM_FLAGS_WITH_PRIVATE_MEM,
};
use kvm_harness::numa::{self, Policy};
use kvm_harness::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use kvm_harness::{
    ensure, errno_name, expect_eq, expect_errno, expect_ok, page_size, sweep, Access, Agent, Body, Cap, ChildFate,
    Errno, Error, Fill, GmemBinding, GuestMemfd, HostMemory, Kvm, Need, Region, Result, SignalStorm, Suite, Vm, VmType,
};
use nix::fcntl::FallocateFlags;
use nix::sys::mman::MapFlags;
use nix::sys::signal::Signal;

/// Pages in the guest_memfd most rules use (upstream: 4).
const PAGES: u64 = 4;

/// A (VM type, guest_memfd flags) combination: the subject of one test.
#[derive(Debug, Clone, Copy)]
struct Case {
    vm_type: VmType,
    flags: u64,
}

impl Case {
    fn flags_label(self) -> &'static str {
        match self.flags {
            0 => "noflags",
            GUEST_MEMFD_FLAG_MMAP => "mmap",
            f if f == GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED => "mmap_init_shared",
            _ => "other",
        }
    }

    /// The parameters, for failure messages.
    fn describe(self) -> String {
        format!("{}, guest_memfd flags {:#x}", self.vm_type, self.flags)
    }

    fn rule(self, rule: &str) -> String {
        format!("{rule} [{}]", self.describe())
    }

    fn vm(self, kvm: &Arc<Kvm>) -> Result<Vm> {
        Vm::bare(kvm, self.vm_type)
    }

    fn total() -> u64 {
        PAGES * page_size()
    }

    /// A VM of the type and a guest_memfd of `size` bytes with the flags.
    fn gmem(self, kvm: &Arc<Kvm>, size: u64) -> Result<(Vm, GuestMemfd)> {
        let vm = self.vm(kvm)?;
        let gmem = expect_ok(&self.rule(&format!("KVM_CREATE_GUEST_MEMFD(size {size:#x}) succeeds")), || {
            vm.create_guest_memfd(size, self.flags)
        })?;
        Ok((vm, gmem))
    }
}

/// __kvm_gmem_create() reserves the fd first: with no fd free the request
/// fails with EMFILE, while the identical request succeeds with one free.
fn create_without_free_fd(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let size = PAGES * page_size();
    expect_errno(
        &format!("{vm_type}: KVM_CREATE_GUEST_MEMFD(size {size:#x}) with no fd free fails with EMFILE"),
        Errno::EMFILE,
        || vm.create_guest_memfd_without_free_fds(size, 0),
    )?;
    expect_ok(&format!("{vm_type}: the same KVM_CREATE_GUEST_MEMFD succeeds with fds free"), || {
        vm.create_guest_memfd(size, 0)
    })
    .map(drop)
}

/// Flags `KVM_CAP_GUEST_MEMFD_FLAGS` advertises on a fresh VM of the type (0 when absent).
fn supported_flags(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<u64> {
    let vm = Vm::bare(kvm, vm_type)?;
    Ok(u64::from(vm.cap(Cap::GuestMemfdFlags) as u32))
}

/// The flag combinations to run for `vm_type`: 0 always, MMAP and
/// MMAP|INIT_SHARED where the VM advertises them.
fn flag_cases(kvm: Option<&Arc<Kvm>>, vm_type: VmType) -> Vec<u64> {
    let supported = kvm.filter(|k| k.supports(vm_type)).and_then(|k| supported_flags(k, vm_type).ok()).unwrap_or(0);
    [0, GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED]
        .into_iter()
        .filter(|f| f & !supported == 0)
        .collect()
}

// ---- creation ----

/// What `KVM_CAP_GUEST_MEMFD_FLAGS` must report on a fresh VM of the type:
/// the flags decide which of this binary's tests are registered, so a
/// kernel that drops one must fail here rather than lose those tests.
fn advertised_flags_match_kernel(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let rule = match vm_type {
        VmType::Default => &GMEM_FLAGS_WITHOUT_PRIVATE_MEM,
        VmType::SwProtected if kernel_rules::gmem_in_place_conversion() => {
            // A mode, not a version: with private state per guest_memfd, a
            // protected VM's guest_memfd may start shared.
            let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
            return ensure_flags(&vm_type.to_string(), supported_flags(kvm, vm_type)?, flags);
        }
        VmType::SwProtected => &GMEM_FLAGS_WITH_PRIVATE_MEM,
    };
    expect_advertised(&vm_type.to_string(), supported_flags(kvm, vm_type)?, rule)
}

/// The flags of a protected VM under `kvm.gmem_in_place_conversion=Y`.
fn ensure_flags(scope: &str, advertised: u64, expected: u64) -> Result<()> {
    ensure!(
        advertised == expected,
        format!("{scope}: {} reports the flags of this kernel", Cap::GuestMemfdFlags),
        "{} = {advertised:#x}; expected {expected:#x} because kvm.gmem_in_place_conversion = Y",
        Cap::GuestMemfdFlags
    );
    Ok(())
}

/// The same on `/dev/kvm`, which answers for a VM without private memory.
fn system_advertises_flags_of_kernel(kvm: &Arc<Kvm>) -> Result<()> {
    let advertised = u64::from(kvm.cap(Cap::GuestMemfdFlags) as u32);
    expect_advertised("/dev/kvm", advertised, &GMEM_FLAGS_WITHOUT_PRIVATE_MEM)
}

fn expect_advertised(scope: &str, advertised: u64, rule: &'static Versioned<Hex>) -> Result<()> {
    rule.expected()?.check(Hex(advertised)).map_err(|detail| {
        Error::rule(
            format!("{scope}: {} reports the flags of this kernel", Cap::GuestMemfdFlags),
            format!("{} = {advertised:#x}: {detail}", Cap::GuestMemfdFlags),
        )
    })
}

/// Bit `bit` alone in the flags: accepted exactly when the VM advertises it.
fn create_flag_bit(kvm: &Arc<Kvm>, vm_type: VmType, bit: u32) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let advertised = u64::from(vm.cap(Cap::GuestMemfdFlags) as u32);
    let flag = 1u64 << bit;
    let rule = format!(
        "{vm_type}: KVM_CREATE_GUEST_MEMFD(flags {flag:#x}) succeeds iff {} ({advertised:#x}) has the bit, else EINVAL",
        Cap::GuestMemfdFlags
    );
    match (advertised & flag != 0, vm.create_guest_memfd(page_size(), flag)) {
        (true, Ok(_)) => Ok(()),
        (false, Err(e)) if e.errno() == Some(Errno::EINVAL) => Ok(()),
        (true, Err(e)) => Err(Error::rule(rule, format!("advertised, but {e}"))),
        (false, Ok(_)) => Err(Error::rule(rule, "not advertised, but the guest_memfd was created")),
        (false, Err(e)) => Err(Error::rule(rule, format!("not advertised: expected EINVAL, got {e}"))),
    }
}

fn create_rejects_sizes(kvm: &Arc<Kvm>, case: Case, sizes: impl IntoIterator<Item = u64>, what: &str) -> Result<()> {
    let vm = case.vm(kvm)?;
    let rule = case.rule(&format!("KVM_CREATE_GUEST_MEMFD rejects {what} with EINVAL"));
    sweep(&rule, sizes, |size| {
        expect_errno(&rule, Errno::EINVAL, || vm.create_guest_memfd(size, case.flags).map(|g| g.size()))
    })?;
    // Control: the same flags with a valid size work, so only the size was at fault.
    expect_ok(&case.rule("KVM_CREATE_GUEST_MEMFD with one page succeeds"), || {
        vm.create_guest_memfd(page_size(), case.flags).map(drop)
    })
}

fn multiple_fds(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let page = page_size();
    let vm = case.vm(kvm)?;
    let rule = case.rule("each guest_memfd reports its own st_size and inode");
    let first = vm.create_guest_memfd(page, case.flags)?;
    let st1 = first.stat()?;
    expect_eq(&rule, "first fd st_size", st1.st_size as u64, page)?;
    let second = vm.create_guest_memfd(2 * page, case.flags)?;
    let st2 = second.stat()?;
    expect_eq(&rule, "second fd st_size", st2.st_size as u64, 2 * page)?;
    let st1 = first.stat()?;
    expect_eq(&rule, "first fd st_size after creating the second", st1.st_size as u64, page)?;
    ensure!(st1.st_ino != st2.st_ino, rule, "both fds report inode {}", st1.st_ino);
    Ok(())
}

fn file_size(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let (_vm, gmem) = case.gmem(kvm, Case::total())?;
    let st = gmem.stat()?;
    let rule = case.rule("fstat reports the requested size and the page size as st_blksize");
    expect_eq(&rule, "st_size", st.st_size as u64, Case::total())?;
    expect_eq(&rule, "st_blksize", st.st_blksize as u64, page_size())
}

// ---- file operations ----

/// A file operation guest_memfd refuses: its name, the errno, the call.
///
/// guest_memfd has no read/write file operations: `vfs_read`/`vfs_write`
/// return EINVAL (no FMODE_CAN_READ/WRITE); the file is not opened with
/// FMODE_PREAD/PWRITE, so `pread`/`pwrite` stop earlier with ESPIPE.
#[derive(Debug, Clone, Copy)]
struct Io {
    name: &'static str,
    expected: Errno,
    run: fn(&GuestMemfd, &mut [u8]) -> Result<usize>,
}

const IO: [Io; 4] = [
    Io { name: "read", expected: Errno::EINVAL, run: |gmem, buf| gmem.read(buf) },
    Io { name: "write", expected: Errno::EINVAL, run: |gmem, buf| gmem.write(buf) },
    Io { name: "pread", expected: Errno::ESPIPE, run: |gmem, buf| gmem.pread(buf, 0) },
    Io { name: "pwrite", expected: Errno::ESPIPE, run: |gmem, buf| gmem.pwrite(buf, 0) },
];

fn io_fails(kvm: &Arc<Kvm>, case: Case, io: Io) -> Result<()> {
    let (_vm, gmem) = case.gmem(kvm, Case::total())?;
    let rule = case.rule(&format!("{}(2) on a guest_memfd fails with {}", io.name, errno_name(io.expected)));
    expect_errno(&rule, io.expected, || (io.run)(&gmem, &mut [0u8; 64]))
}

// ---- fallocate ----

const KEEP_SIZE: FallocateFlags = FallocateFlags::FALLOC_FL_KEEP_SIZE;
const PUNCH: FallocateFlags = KEEP_SIZE.union(FallocateFlags::FALLOC_FL_PUNCH_HOLE);

/// One fallocate call of a rule: what it checks, the mode, `(offset, len)`
/// from `(page, file size)`, and the errno it must fail with (None: success).
#[derive(Debug)]
struct Step {
    rule: &'static str,
    mode: FallocateFlags,
    at: fn(u64, u64) -> (u64, u64),
    fails: Option<Errno>,
}

const fn ok(rule: &'static str, mode: FallocateFlags, at: fn(u64, u64) -> (u64, u64)) -> Step {
    Step { rule, mode, at, fails: None }
}

const fn fails(rule: &'static str, errno: Errno, mode: FallocateFlags, at: fn(u64, u64) -> (u64, u64)) -> Step {
    Step { rule, mode, at, fails: Some(errno) }
}

const EINVAL: Errno = Errno::EINVAL;

/// The fallocate rules, each a test (on a guest_memfd of `Case::total()`).
const FALLOCATE: [(&str, &[Step]); 13] = [
    ("fallocate_whole_file_succeeds", &[ok("fallocate of the whole file succeeds", KEEP_SIZE, |_, t| (0, t))]),
    // In bounds and page-sized: only the offset's alignment is wrong.
    (
        "fallocate_rejects_unaligned_offset",
        &[fails("fallocate at offset page-1 fails with EINVAL", EINVAL, KEEP_SIZE, |p, _| (p - 1, p))],
    ),
    (
        "punch_hole_rejects_unaligned_offset",
        &[fails("fallocate at offset page-1 fails with EINVAL", EINVAL, PUNCH, |p, _| (p - 1, p))],
    ),
    (
        "fallocate_rejects_unaligned_length",
        &[fails("fallocate with length page-1 fails with EINVAL", EINVAL, KEEP_SIZE, |p, _| (p, p - 1))],
    ),
    (
        "punch_hole_rejects_unaligned_length",
        &[fails("fallocate with length page-1 fails with EINVAL", EINVAL, PUNCH, |p, _| (p, p - 1))],
    ),
    (
        "fallocate_at_end_fails",
        &[fails("fallocate starting at the size fails with EINVAL", EINVAL, KEEP_SIZE, |p, t| (t, p))],
    ),
    (
        "fallocate_past_end_fails",
        &[fails("fallocate starting past the size fails with EINVAL", EINVAL, KEEP_SIZE, |p, t| (t + p, p))],
    ),
    (
        "fallocate_across_end_fails",
        &[fails("fallocate of the last page plus one beyond the size fails with EINVAL", EINVAL, KEEP_SIZE, |p, t| {
            (t - p, 2 * p)
        })],
    ),
    ("punch_hole_at_end_succeeds", &[ok("PUNCH_HOLE starting at the size succeeds", PUNCH, |p, t| (t, p))]),
    ("punch_hole_past_end_succeeds", &[ok("PUNCH_HOLE starting past the size succeeds", PUNCH, |p, t| (t + p, p))]),
    (
        "punch_hole_then_refill_succeeds",
        &[
            ok("fallocate of the whole file succeeds", KEEP_SIZE, |_, t| (0, t)),
            ok("PUNCH_HOLE of the second page succeeds", PUNCH, |p, _| (p, p)),
            ok("fallocate refills the punched page", KEEP_SIZE, |p, _| (p, p)),
            ok("PUNCH_HOLE of the last page succeeds", PUNCH, |p, t| (t - p, p)),
            ok("fallocate refills the last page", KEEP_SIZE, |p, t| (t - p, p)),
        ],
    ),
    // kvm_gmem_fallocate: the size is immutable, so mode 0 is EOPNOTSUPP.
    (
        "fallocate_without_keep_size_is_unsupported",
        &[fails(
            "fallocate without KEEP_SIZE fails with EOPNOTSUPP",
            Errno::EOPNOTSUPP,
            FallocateFlags::empty(),
            |p, _| (0, p),
        )],
    ),
    // kvm_gmem_fallocate: KEEP_SIZE plus any mode but PUNCH_HOLE.
    (
        "fallocate_zero_range_is_unsupported",
        &[fails(
            "fallocate(KEEP_SIZE | ZERO_RANGE) fails with EOPNOTSUPP",
            Errno::EOPNOTSUPP,
            KEEP_SIZE.union(FallocateFlags::FALLOC_FL_ZERO_RANGE),
            |p, _| (0, p),
        )],
    ),
];

fn fallocate_rule(kvm: &Arc<Kvm>, case: Case, steps: &[Step]) -> Result<()> {
    let (page, total) = (page_size(), Case::total());
    let (_vm, gmem) = case.gmem(kvm, total)?;
    for step in steps {
        let (offset, len) = (step.at)(page, total);
        let rule = case.rule(step.rule);
        match step.fails {
            None => expect_ok(&rule, || gmem.fallocate(step.mode, offset, len))?,
            Some(errno) => expect_errno(&rule, errno, || gmem.fallocate(step.mode, offset, len))?,
        }
    }
    Ok(())
}

/// The ten invalid PUNCH_HOLE (offset, len) pairs of upstream, in page units
/// plus a byte delta: `(offset_pages, offset_delta, len_pages, len_delta)`.
const BAD_PUNCHES: [(&str, u64, i64, u64, i64); 10] = [
    ("off_0_len_1", 0, 0, 0, 1),
    ("off_0_len_page_minus_1", 0, 0, 1, -1),
    ("off_0_len_page_plus_1", 0, 0, 1, 1),
    ("off_1_len_1", 0, 1, 0, 1),
    ("off_1_len_page_minus_1", 0, 1, 1, -1),
    ("off_1_len_page", 0, 1, 1, 0),
    ("off_1_len_page_plus_1", 0, 1, 1, 1),
    ("off_page_len_1", 1, 0, 0, 1),
    ("off_page_len_page_minus_1", 1, 0, 1, -1),
    ("off_page_len_page_plus_1", 1, 0, 1, 1),
];

fn bad_punch(kvm: &Arc<Kvm>, case: Case, (_, op, od, lp, ld): (&str, u64, i64, u64, i64)) -> Result<()> {
    let page = page_size();
    let offset = (op * page).wrapping_add_signed(od);
    let len = (lp * page).wrapping_add_signed(ld);
    let (_vm, gmem) = case.gmem(kvm, Case::total())?;
    let rule = case.rule(&format!("PUNCH_HOLE(offset {offset:#x}, len {len:#x}) is not page-aligned: EINVAL"));
    expect_errno(&rule, Errno::EINVAL, || gmem.fallocate(PUNCH, offset, len))
}

// ---- mmap ----

fn mmap_not_supported(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let (_vm, gmem) = case.gmem(kvm, Case::total())?;
    // 6.12 has no mmap file operation; newer kernels refuse without the
    // MMAP flag. Both end in ENODEV.
    for len in [page_size(), Case::total()] {
        let rule =
            case.rule(&format!("mmap(MAP_SHARED, {len:#x} bytes) without GUEST_MEMFD_FLAG_MMAP fails with ENODEV"));
        expect_errno(&rule, Errno::ENODEV, || gmem.map(0, len, MapFlags::MAP_SHARED))?;
    }
    Ok(())
}

fn mmap_private_fails(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let (_vm, gmem) = case.gmem(kvm, Case::total())?;
    let rule = case.rule("mmap(MAP_PRIVATE) of a guest_memfd (copy-on-write) fails with EINVAL");
    expect_errno(&rule, Errno::EINVAL, || gmem.map(0, Case::total(), MapFlags::MAP_PRIVATE))
}

/// Requires every byte of `[offset, offset + len)` of `mem` to be `value`.
fn expect_bytes(rule: &str, mem: &HostMemory, offset: u64, len: u64, value: u8) -> Result<()> {
    mem.expect_filled(rule, offset, len, Fill::Byte(value), |at| {
        format!("byte at offset {at:#x} of [{offset:#x}, +{len:#x})")
    })
}

fn mmap_supported(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let (page, total) = (page_size(), Case::total());
    let (_vm, gmem) = case.gmem(kvm, total)?;
    let mem = expect_ok(&case.rule("mmap(MAP_SHARED) of an INIT_SHARED guest_memfd succeeds"), || {
        gmem.map(0, total, MapFlags::MAP_SHARED)
    })?;
    mem.write(0, &vec![0xaa; total as usize]);
    expect_bytes(&case.rule("bytes written through the mapping read back"), &mem, 0, total, 0xaa)?;

    // Punch the first page, then the last: each reads back as zeros, the rest keeps its data.
    for (label, hole) in [("first", 0), ("last", total - page)] {
        expect_ok(&case.rule(&format!("PUNCH_HOLE of the {label} page succeeds")), || gmem.punch_hole(hole, page))?;
        let rule = case.rule(&format!("after PUNCH_HOLE of the {label} page, it reads zero and the rest is intact"));
        expect_bytes(&rule, &mem, hole, page, 0)?;
        let (before, after) = (hole, total - hole - page);
        expect_bytes(&rule, &mem, 0, before, 0xaa)?;
        expect_bytes(&rule, &mem, hole + page, after, 0xaa)?;
        mem.write(hole, &vec![0xaa; page as usize]);
        expect_bytes(&case.rule("the punched page is writable again"), &mem, 0, total, 0xaa)?;
    }
    Ok(())
}

/// guest_memfd's `set_policy`/`get_policy`: an `mbind()` policy on a range
/// of the mapping is what `get_mempolicy(MPOL_F_ADDR)` reports there, and
/// an unknown mode fails with EINVAL (upstream `test_mbind`).
fn mbind_policy_round_trips(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let page = page_size();
    let (_vm, gmem) = case.gmem(kvm, 4 * page)?;
    let mem = gmem.map(0, 4 * page, MapFlags::MAP_SHARED)?;
    let node0 = 1;
    for (first, mode, mask, name) in
        [(0, Policy::Interleave, node0, "MPOL_INTERLEAVE"), (2, Policy::Bind, node0, "MPOL_BIND")]
    {
        numa::mbind(&mem, first * page, 2 * page, mode as i32, mask)?;
        let seen = numa::policy_at(&mem, first * page)?;
        ensure!(
            seen == (mode as i32, mask),
            case.rule(&format!("{name} set by mbind() on pages {first}-{} is what get_mempolicy() reports", first + 1)),
            "get_mempolicy(MPOL_F_ADDR) = mode {}, nodes {:#x}",
            seen.0,
            seen.1
        );
    }
    numa::mbind(&mem, 0, 4 * page, Policy::Default as i32, 0)?;
    let seen = numa::policy_at(&mem, 0)?;
    ensure!(
        seen == (Policy::Default as i32, 0),
        case.rule("MPOL_DEFAULT over the whole mapping replaces the earlier policies"),
        "get_mempolicy(MPOL_F_ADDR) = mode {}, nodes {:#x}",
        seen.0,
        seen.1
    );
    expect_errno(&case.rule("mbind() with the unknown mode 999 fails with EINVAL"), Errno::EINVAL, || {
        numa::mbind(&mem, 0, 4 * page, 999, node0)
    })
}

/// Pages are allocated on the node their range's policy binds them to, and
/// after PUNCH_HOLE a swapped policy places the new pages on the other node
/// (upstream `test_numa_allocation`).
fn numa_allocation_follows_policy(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let page = page_size();
    let (_vm, gmem) = case.gmem(kvm, 4 * page)?;
    let mem = gmem.map(0, 4 * page, MapFlags::MAP_SHARED)?;
    let offsets: Vec<u64> = (0..4).map(|p| p * page).collect();
    for (round, (low, high)) in [(1u32, 0u32), (0, 1)].into_iter().enumerate() {
        numa::mbind(&mem, 0, 2 * page, Policy::Bind as i32, 1 << low)?;
        numa::mbind(&mem, 2 * page, 2 * page, Policy::Bind as i32, 1 << high)?;
        mem.write(0, &vec![0x5a; 4 * page as usize]);
        let nodes = numa::page_nodes(&mem, &offsets)?;
        let want = [low as i32, low as i32, high as i32, high as i32];
        ensure!(
            nodes == want,
            case.rule(&format!(
                "round {round}: pages 0-1 bound to node {low} and pages 2-3 to node {high} are allocated there"
            )),
            "move_pages() reports nodes {nodes:?}, expected {want:?}"
        );
        gmem.punch_hole(0, 4 * page)?;
    }
    Ok(())
}

fn expect_fate(rule: &str, what: &str, actual: ChildFate, expected: ChildFate) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::rule(rule, format!("{what}: expected the child to end as \"{expected}\", but it {actual}")))
    }
}

fn fault_overflow(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let total = Case::total();
    let (_vm, gmem) = case.gmem(kvm, total)?;
    // A mapping four times the file: pages past the size have no backing.
    let mem = gmem.map(0, 4 * total, MapFlags::MAP_SHARED)?;
    let rule = case.rule("access to a guest_memfd mapping past the file size raises SIGBUS");
    let sigbus = ChildFate::Signaled(Signal::SIGBUS);
    let fate = mem.access_in_child(0, 4 * total, Access::Write(0xaa))?;
    expect_fate(&rule, &format!("writing all {:#x} mapped bytes", 4 * total), fate, sigbus)?;
    let fate = mem.access_in_child(total, 1, Access::Read)?;
    expect_fate(&rule, &format!("reading the byte at the size ({total:#x})"), fate, sigbus)?;
    let fate = mem.access_in_child(total - 1, 1, Access::Read)?;
    expect_fate(&rule, "reading the last byte inside the file", fate, ChildFate::Exited(0))?;
    // The child's stores before the fault went to the shared file.
    expect_bytes(&case.rule("stores before the SIGBUS landed in the file"), &mem, 0, total, 0xaa)
}

fn fault_private(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let total = Case::total();
    let (_vm, gmem) = case.gmem(kvm, total)?;
    let mem = expect_ok(&case.rule("mmap(MAP_SHARED) with GUEST_MEMFD_FLAG_MMAP succeeds"), || {
        gmem.map(0, total, MapFlags::MAP_SHARED)
    })?;
    let rule = case.rule("without INIT_SHARED every page is private: any host access raises SIGBUS");
    let sigbus = ChildFate::Signaled(Signal::SIGBUS);
    for (what, offset, access) in [
        ("reading the first byte", 0, Access::Read),
        ("writing the first byte", 0, Access::Write(0xaa)),
        ("reading the last byte", total - 1, Access::Read),
        ("writing the last byte", total - 1, Access::Write(0xaa)),
    ] {
        let fate = mem.access_in_child(offset, 1, access)?;
        expect_fate(&rule, what, fate, sigbus)?;
    }
    Ok(())
}

/// Huge-page collapse must not reach guest_memfd: its folios are order-0
/// and a collapsed folio could map private memory into the host. A
/// PMD-aligned, PMD-sized mapping of a PMD-sized INIT_SHARED guest_memfd
/// may be advised MADV_HUGEPAGE, but MADV_COLLAPSE fails with EINVAL, and
/// the range still faults back in after MADV_DONTNEED.
fn collapse_refused(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    const PMD: u64 = 2 << 20;
    let (_vm, gmem) = case.gmem(kvm, PMD)?;
    let mem = HostMemory::map_fd_aligned(gmem.as_fd(), 0, PMD, PMD, MapFlags::MAP_SHARED)?;
    // Populate with reads, so no page is dirtied.
    let mut byte = [0u8; 1];
    for offset in (0..PMD).step_by(page_size() as usize) {
        mem.read(offset, &mut byte);
    }
    expect_ok(&case.rule("madvise(MADV_HUGEPAGE) on a guest_memfd mapping succeeds"), || {
        mem.madvise(libc::MADV_HUGEPAGE)
    })?;
    expect_errno(
        &case.rule("madvise(MADV_COLLAPSE) on a PMD-aligned guest_memfd mapping fails with EINVAL"),
        Errno::EINVAL,
        || mem.madvise(libc::MADV_COLLAPSE),
    )?;
    expect_ok(&case.rule("madvise(MADV_DONTNEED) on a guest_memfd mapping succeeds"), || {
        mem.madvise(libc::MADV_DONTNEED)
    })?;
    let fate = mem.access_in_child(0, 1, Access::Read)?;
    expect_fate(
        &case.rule("the first page faults back in after MADV_DONTNEED"),
        "reading byte 0",
        fate,
        ChildFate::Exited(0),
    )
}

// ---- lifetime and guest access ----

/// kvm_gmem_setattr(): the inode's attributes are immutable, so every
/// setattr fails with EINVAL, even a truncate to the size it already has.
fn setattr_is_rejected(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let total = Case::total();
    let (_vm, gmem) = case.gmem(kvm, total)?;
    expect_errno(&case.rule("ftruncate to its own size fails with EINVAL"), Errno::EINVAL, || gmem.truncate(total))?;
    expect_errno(&case.rule("ftruncate to twice its size fails with EINVAL"), Errno::EINVAL, || {
        gmem.truncate(2 * total)
    })?;
    expect_errno(&case.rule("fchmod(0600) fails with EINVAL"), Errno::EINVAL, || gmem.chmod(0o600))?;
    expect_eq(&case.rule("the size survives the rejected truncates"), "st_size", gmem.stat()?.st_size as u64, total)
}

/// kvm_gmem_allocate() checks for a pending signal before each folio: under
/// a signal storm a large fallocate fails with EINTR, and once the storm is
/// over the same call allocates the whole range.
fn fallocate_interrupted_by_signals(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    // 16384 pages: far longer to allocate than the storm's 200 µs period.
    const SIZE: u64 = 64 << 20;
    let (_vm, gmem) = case.gmem(kvm, SIZE)?;
    let storm = SignalStorm::start(Duration::from_micros(200))?;
    let interrupted = gmem.allocate(0, SIZE);
    let received = storm.received();
    drop(storm);
    expect_errno(
        &case.rule(&format!("fallocate of {SIZE:#x} bytes while {received} signals arrive fails with EINTR")),
        Errno::EINTR,
        || interrupted,
    )?;
    expect_ok(&case.rule("the same fallocate succeeds once no signal is pending"), || gmem.allocate(0, SIZE))
}

fn outlives_vm(kvm: &Arc<Kvm>, case: Case) -> Result<()> {
    let total = Case::total();
    let (vm, gmem) = case.gmem(kvm, total)?;
    drop(vm);
    expect_ok(&case.rule("fallocate on a guest_memfd succeeds after its VM fd is closed"), || gmem.allocate(0, total))?;
    expect_ok(&case.rule("PUNCH_HOLE on a guest_memfd succeeds after its VM fd is closed"), || {
        gmem.punch_hole(0, total)
    })
}

/// How the guest_memfd slot of the guest-access scenario is given to KVM.
#[derive(Debug, Clone, Copy)]
enum GmemSlot {
    /// `userspace_addr` 0, as upstream: the guest can only reach the memory
    /// through the guest_memfd.
    WithoutUserspaceAddr,
    /// `userspace_addr` pointing at the guest_memfd's own host mapping.
    UserspaceAddrIsGmemMapping,
}

fn guest_access(kvm: &Arc<Kvm>, case: Case, how: GmemSlot) -> Result<()> {
    let size = page_size();
    let gpa = layout::TEST_AREA_GPA;
    let vm = Vm::with_payload(kvm, case.vm_type, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    // Control: anonymous memory at the same GPA is reachable, so a failure
    // below is the guest_memfd path's, not the GPA's or the page tables'.
    let anon = vm.add_memory(1, gpa, size)?;
    anon.fill_u64(0, size, 0x5555_5555_5555_5555);
    agent.check(gpa, size, 0x5555_5555_5555_5555)?;
    vm.delete_slot(1)?;

    let gmem = Arc::new(vm.create_guest_memfd(size, case.flags)?);
    let host = Arc::new(gmem.map(0, size, MapFlags::MAP_SHARED)?);
    let (memory, what) = match how {
        GmemSlot::WithoutUserspaceAddr => (None, "a guest_memfd memslot with userspace_addr 0"),
        GmemSlot::UserspaceAddrIsGmemMapping => {
            (Some(host.clone()), "a guest_memfd memslot whose userspace_addr is the guest_memfd's mapping")
        }
    };
    let region = Region {
        slot: 1,
        flags: KVM_MEM_GUEST_MEMFD,
        gpa,
        size,
        memory,
        memory_offset: 0,
        guest_memfd: Some((GmemBinding::Memfd(gmem.clone()), 0)),
    };
    expect_ok(&case.rule(&format!("{what} binds")), || vm.set_region(&region))?;
    let (host_pattern, guest_pattern) = (0xaaaa_aaaa_aaaa_aaaa_u64, 0xffff_ffff_ffff_ffff_u64);
    host.fill_u64(0, size, host_pattern);
    agent.check(gpa, size, host_pattern).map_err(|e| {
        Error::rule(
            case.rule(&format!("through {what}, the guest reads what the host wrote into the guest_memfd")),
            format!("{e} (anonymous memory at the same GPA was read correctly)"),
        )
    })?;
    agent.fill(gpa, size, guest_pattern)?;
    agent.done()?;
    let rule = case.rule(&format!("through {what}, the host reads what the guest wrote"));
    host.expect_filled(&rule, 0, size, Fill::U64(guest_pattern), |offset| format!("guest_memfd offset {offset:#x}"))
}

/// Whether VMs of every type offer GUEST_MEMFD_FLAG_INIT_SHARED only with
/// GUEST_MEMFD_FLAG_MMAP.
fn init_shared_flag_implies_mmap_flag(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let flags = supported_flags(kvm, vm_type)?;
    ensure!(
        flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 || flags & GUEST_MEMFD_FLAG_MMAP != 0,
        format!("{vm_type}: GUEST_MEMFD_FLAG_INIT_SHARED is only offered with GUEST_MEMFD_FLAG_MMAP"),
        "{} = {flags:#x}",
        Cap::GuestMemfdFlags
    );
    Ok(())
}

/// The file rules of one (VM type, flags) case, each a rule and its body.
fn file_rules(case: Case) -> Vec<(String, Body)> {
    let mut rules: Vec<(String, Body)> = vec![
        ("create_rejects_size_0".into(), Box::new(move |kvm| create_rejects_sizes(kvm, case, [0], "size 0"))),
        (
            "create_rejects_sizes_1_to_page_minus_1".into(),
            Box::new(move |kvm| create_rejects_sizes(kvm, case, 1..page_size(), "every size below a page")),
        ),
        (
            "create_rejects_size_with_bit_63".into(),
            Box::new(move |kvm| {
                create_rejects_sizes(kvm, case, [1 << 63, !(page_size() - 1)], "a size negative as loff_t")
            }),
        ),
        ("multiple_fds_have_own_size_and_inode".into(), Box::new(move |kvm| multiple_fds(kvm, case))),
        ("fstat_reports_size_and_page_blksize".into(), Box::new(move |kvm| file_size(kvm, case))),
    ];
    for io in IO {
        let rule = format!("{}_fails_with_{}", io.name, errno_name(io.expected).to_lowercase());
        rules.push((rule, Box::new(move |kvm| io_fails(kvm, case, io))));
    }
    for (name, steps) in FALLOCATE {
        rules.push((name.to_string(), Box::new(move |kvm| fallocate_rule(kvm, case, steps))));
    }
    for pair in BAD_PUNCHES {
        rules.push((format!("punch_hole_rejects_{}", pair.0), Box::new(move |kvm| bad_punch(kvm, case, pair))));
    }
    rules
        .push(("fallocate_and_punch_hole_work_after_vm_is_closed".into(), Box::new(move |kvm| outlives_vm(kvm, case))));
    rules.push(("setattr_fails_with_einval".into(), Box::new(move |kvm| setattr_is_rejected(kvm, case))));
    if case.flags == 0 {
        rules.push((
            "fallocate_interrupted_by_signals_fails_with_eintr".into(),
            Box::new(move |kvm| fallocate_interrupted_by_signals(kvm, case)),
        ));
    }
    rules
}

/// The mapping rules of one case, which depend on MMAP and INIT_SHARED:
/// each a rule, what it needs beyond guest_memfd, and its body.
fn mapping_rules(case: Case) -> Vec<(&'static str, Vec<Need>, Body)> {
    let flags = case.flags;
    if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        return vec![("mmap_shared_fails_with_enodev", vec![], Box::new(move |kvm| mmap_not_supported(kvm, case)))];
    }
    let mut rules: Vec<(&'static str, Vec<Need>, Body)> = vec![
        ("mmap_private_fails_with_einval", vec![], Box::new(move |kvm| mmap_private_fails(kvm, case))),
        ("mbind_policy_round_trips", vec![], Box::new(move |kvm| mbind_policy_round_trips(kvm, case))),
    ];
    if flags & GUEST_MEMFD_FLAG_INIT_SHARED == 0 {
        rules.push(("any_host_access_raises_sigbus", vec![], Box::new(move |kvm| fault_private(kvm, case))));
        return rules;
    }
    rules.extend::<[(&'static str, Vec<Need>, Body); 6]>([
        ("mmap_round_trips_data_and_punch_hole_zeroes", vec![], Box::new(move |kvm| mmap_supported(kvm, case))),
        ("access_past_end_raises_sigbus", vec![], Box::new(move |kvm| fault_overflow(kvm, case))),
        ("madvise_collapse_fails_with_einval", vec![], Box::new(move |kvm| collapse_refused(kvm, case))),
        (
            "guest_and_host_share_data_through_gmem_only_slot",
            vec![],
            Box::new(move |kvm| guest_access(kvm, case, GmemSlot::WithoutUserspaceAddr)),
        ),
        (
            "guest_and_host_share_data_through_slot_mapping_the_guest_memfd",
            vec![],
            Box::new(move |kvm| guest_access(kvm, case, GmemSlot::UserspaceAddrIsGmemMapping)),
        ),
        (
            "numa_allocation_follows_policy",
            vec![numa::need_two_nodes()],
            Box::new(move |kvm| numa_allocation_follows_policy(kvm, case)),
        ),
    ]);
    rules
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    suite.test("system_advertises_guest_memfd_flags_of_its_kernel", vec![Need::Cap(Cap::GuestMemfd)], |kvm| {
        system_advertises_flags_of_kernel(kvm)
    });
    // What a VM type advertises and accepts at creation, whatever the flags.
    let gmem = |_| vec![Need::Cap(Cap::GuestMemfd)];
    suite.per_vm_type("advertises_guest_memfd_flags_of_its_kernel", gmem, advertised_flags_match_kernel);
    for bit in 0..64 {
        suite.per_vm_type(&format!("create_flag_bit_{bit:02}_accepted_iff_advertised"), gmem, move |kvm, vm_type| {
            create_flag_bit(kvm, vm_type, bit)
        });
    }
    suite.per_vm_type("create_without_free_fd_fails_with_emfile", gmem, create_without_free_fd);
    suite.per_vm_type("init_shared_flag_implies_mmap_flag", gmem, init_shared_flag_implies_mmap_flag);
    // The flag cases a VM type advertises: `{type}_vm_{flags}_{rule}`.
    for vm_type in VmType::ALL {
        for flags in flag_cases(suite.kvm(), vm_type) {
            let case = Case { vm_type, flags };
            let with_needs = file_rules(case).into_iter().map(|(rule, body)| (rule, vec![], body));
            let mapping = mapping_rules(case).into_iter().map(|(rule, needs, body)| (rule.to_string(), needs, body));
            for (rule, needs, body) in with_needs.chain(mapping) {
                let mut all = gmem(vm_type);
                all.extend(needs);
                suite.for_vm_type(vm_type, &format!("{}_{rule}", case.flags_label()), all, move |kvm, _| body(kvm));
            }
        }
    }
    suite.run()
}
