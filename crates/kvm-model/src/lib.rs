//! A reference model of KVM's private-memory uAPI.
//!
//! It knows no KVM: it is plain data and the rules, each derived from the
//! kernel source and cited at the place it is applied, so a randomized test
//! can run the same operations on a real VM and on a [`Model`] and compare
//! the outcomes errno by errno, exit field by exit field, byte by byte.
//!
//! What it covers:
//!
//! * `KVM_CREATE_GUEST_MEMFD`: size and flags ([`Model::create_guest_memfd`]);
//! * `KVM_SET_USER_MEMORY_REGION2`: create, move, flags-only change, delete,
//!   with the guest_memfd binding rules in the kernel's check order
//!   ([`Model::set_memory_region`]);
//! * `KVM_SET_MEMORY_ATTRIBUTES` ([`Model::set_memory_attributes`]);
//! * `fallocate()` and `FALLOC_FL_PUNCH_HOLE` on a guest_memfd
//!   ([`Model::fallocate`]);
//! * a guest's 8-byte read or write at a GPA: the value, a
//!   `KVM_EXIT_MEMORY_FAULT`, or an MMIO exit ([`Model::guest_read`],
//!   [`Model::guest_write`]), and a guest instruction fetch
//!   ([`Model::guest_fetch`]);
//! * `KVM_PRE_FAULT_MEMORY` ([`Model::pre_fault_memory`]);
//! * a guest's `KVM_HC_MAP_GPA_RANGE` ([`Model::map_gpa_range`]) and
//!   `KVM_CAP_EXIT_HYPERCALL` ([`Model::enable_hypercall_exits`]);
//! * host reads and writes through the memory a slot's `userspace_addr`
//!   points at: anonymous memory or an `mmap()` of a guest_memfd
//!   ([`Model::host_read`], [`Model::host_write`]).
//!
//! Rules that changed between kernels are selected by a [`Profile`]: the
//! outcomes decided for the kernel from evidence that it carries each
//! change ([`decide`]) and what the VM reports, never hard-coded to one
//! kernel or keyed on a release number alone.

#![warn(missing_docs)]

mod attributes;
pub mod decide;
mod errno;
mod guest_access;
mod guest_memfd;
mod host_access;
mod hypercall;
mod memslots;
mod pre_fault;
mod profile;
pub mod versioned;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub use decide::Decided;
pub use errno::Errno;
pub use guest_access::{ret_stub, stub_result};
use guest_access::{MmioSpte, Route};
pub use profile::{Profile, Rules};
pub use versioned::KernelVersion;

/// The page size the rules are written for (x86: 4 KiB).
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

/// `KVM_MEM_LOG_DIRTY_PAGES` (include/uapi/linux/kvm.h).
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;
/// `KVM_MEM_READONLY` (include/uapi/linux/kvm.h).
pub const KVM_MEM_READONLY: u32 = 1 << 1;
/// `KVM_MEM_GUEST_MEMFD` (include/uapi/linux/kvm.h).
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// `KVM_MEMORY_ATTRIBUTE_PRIVATE` (include/uapi/linux/kvm.h).
pub const KVM_MEMORY_ATTRIBUTE_PRIVATE: u64 = 1 << 3;
/// `KVM_MEMORY_EXIT_FLAG_PRIVATE` (include/uapi/linux/kvm.h).
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;
/// `GUEST_MEMFD_FLAG_MMAP` (include/uapi/linux/kvm.h, 6.18+).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (include/uapi/linux/kvm.h, 6.18+).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;
/// `KVM_MEM_SLOTS_NUM` (include/linux/kvm_host.h): `SHRT_MAX`.
pub const KVM_MEM_SLOTS_NUM: u32 = 0x7fff;
/// `KVM_USER_MEM_SLOTS` on x86: `KVM_MEM_SLOTS_NUM - KVM_INTERNAL_MEM_SLOTS (3)`.
pub const KVM_USER_MEM_SLOTS: u32 = KVM_MEM_SLOTS_NUM - 3;
/// `KVM_MEM_MAX_NR_PAGES` (include/linux/kvm_host.h): `(1UL << 31) - 1`.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

/// Index of a guest_memfd the model created, in creation order of the
/// successful `KVM_CREATE_GUEST_MEMFD` calls.
pub type GmemId = usize;
/// Index of an anonymous host mapping registered with [`Model::add_anon`].
pub type AnonId = usize;

/// What a memslot's `userspace_addr` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserMemory {
    /// `userspace_addr = 0`.
    Null,
    /// Page `page` of anonymous mapping `anon`.
    Anon {
        /// Which mapping.
        anon: AnonId,
        /// First page of the slot inside it.
        page: u64,
    },
    /// Page `page` of a `MAP_SHARED` mapping of a whole guest_memfd
    /// (only guest_memfds with `GUEST_MEMFD_FLAG_MMAP` can be mapped).
    GmemMap {
        /// Which guest_memfd.
        gmem: GmemId,
        /// First page of the slot inside it.
        page: u64,
    },
}

/// What the `guest_memfd` field of a `KVM_SET_USER_MEMORY_REGION2` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GmemFd {
    /// A guest_memfd of this VM.
    File(GmemId),
    /// An fd number that is not open.
    Closed,
    /// An open fd that is not a guest_memfd (e.g. the VM fd).
    NotGuestMemfd,
}

/// A `KVM_SET_USER_MEMORY_REGION2` request, with addresses kept symbolic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// `slot`: address space in bits 16 and up, slot id below.
    pub slot: u32,
    /// `flags`.
    pub flags: u32,
    /// `guest_phys_addr`.
    pub gpa: u64,
    /// `memory_size`.
    pub size: u64,
    /// `userspace_addr`.
    pub user: UserMemory,
    /// `guest_memfd` and `guest_memfd_offset`; `None` sends fd 0 and offset
    /// 0. The kernel reads them only with `KVM_MEM_GUEST_MEMFD`.
    pub guest_memfd: Option<(GmemFd, u64)>,
}

impl MemoryRegion {
    /// Address space (`slot >> 16`).
    pub fn as_id(&self) -> u32 {
        self.slot >> 16
    }

    /// Slot id (`(u16)slot`).
    pub fn id(&self) -> u32 {
        self.slot & 0xffff
    }
}

/// What a successful `KVM_SET_USER_MEMORY_REGION2` did (`enum kvm_mr_change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `KVM_MR_CREATE`.
    Create,
    /// `KVM_MR_DELETE`.
    Delete,
    /// `KVM_MR_MOVE`.
    Move,
    /// `KVM_MR_FLAGS_ONLY`.
    FlagsOnly,
    /// Same slot, same everything: nothing to do, success.
    Unchanged,
}

/// An installed memslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Address space.
    pub as_id: u32,
    /// Slot id.
    pub id: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// First GFN.
    pub base_gfn: u64,
    /// Pages.
    pub npages: u64,
    /// Where `userspace_addr` points.
    pub user: UserMemory,
    /// The guest_memfd binding and its first page (`slot->gmem.pgoff`).
    pub gmem: Option<(GmemId, u64)>,
    /// `KVM_MEMSLOT_GMEM_ONLY` (7.x, `kvm_gmem_prepare_memory_region()`):
    /// bound to a guest_memfd that supports mmap, so every access of the
    /// guest goes to the guest_memfd, shared or private.
    pub gmem_only: bool,
}

impl Slot {
    fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn - self.base_gfn < self.npages
    }
}

/// One page of memory. Fresh pages share one zero page until written
/// (copy on write), so allocating a 2 MiB range costs no 2 MiB of zeroes.
pub type Page = Arc<[u8; PAGE_SIZE as usize]>;

/// Pages by index: absent pages read as zeroes.
type Pages = BTreeMap<u64, Page>;

fn zero_page() -> Page {
    static ZERO: OnceLock<Page> = OnceLock::new();
    ZERO.get_or_init(|| Arc::new([0; PAGE_SIZE as usize])).clone()
}

/// Page `index`, present from now on, for writing.
fn page_mut(pages: &mut Pages, index: u64) -> &mut [u8] {
    let page: &mut [u8; PAGE_SIZE as usize] = Arc::make_mut(pages.entry(index).or_insert_with(zero_page));
    page
}

fn read_pages(pages: &Pages, offset: u64, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let in_page = (at % PAGE_SIZE) as usize;
        let n = (PAGE_SIZE as usize - in_page).min(buf.len() - done);
        let dst = &mut buf[done..done + n];
        match pages.get(&(at / PAGE_SIZE)) {
            Some(page) => dst.copy_from_slice(&page[in_page..in_page + n]),
            None => dst.fill(0),
        }
        done += n;
    }
}

fn write_pages(pages: &mut Pages, offset: u64, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        let at = offset + done as u64;
        let in_page = (at % PAGE_SIZE) as usize;
        let n = (PAGE_SIZE as usize - in_page).min(data.len() - done);
        page_mut(pages, at / PAGE_SIZE)[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
        done += n;
    }
}

/// A guest_memfd file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gmem {
    /// Size in bytes (immutable).
    pub size: u64,
    /// `GUEST_MEMFD_FLAG_*`.
    pub flags: u64,
    /// Allocated pages by index, with their contents. A page the guest or
    /// host touches is allocated on the way (`kvm_gmem_get_folio()`), and
    /// a fresh page reads as zeroes (`kvm_gmem_get_pfn()` clears a page that
    /// is not up to date).
    pub pages: BTreeMap<u64, Page>,
    /// The host closed its fd and unmapped its own mapping
    /// ([`Model::close_guest_memfd`]).
    pub closed: bool,
    /// The file was released: the last reference (fd or mapping) went
    /// away. kvm_gmem_release() (6.12 and 7.3) sets every binding's
    /// `slot->gmem.file` to NULL and zaps its SPTEs; the memory goes with
    /// the inode.
    pub released: bool,
}

impl Gmem {
    /// Whether the host may `mmap()` it (`kvm_gmem_supports_mmap()`).
    pub fn mmap(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_MMAP != 0
    }

    /// Whether its memory is shared with the host, i.e. the host's mapping
    /// can fault pages in (`kvm_gmem_fault_user_mapping()`: SIGBUS on
    /// private memory; 7.3 `kvm_gmem_is_shared_mem()` is
    /// `GUEST_MEMFD_FLAG_INIT_SHARED`).
    pub fn host_accessible(&self) -> bool {
        self.flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0
    }

    /// The bytes at `offset`, zeroes where no page is allocated.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        read_pages(&self.pages, offset, buf);
    }
}

/// An anonymous host mapping: zero-filled at first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anon {
    /// Size in pages.
    pub npages: u64,
    /// Written pages.
    pages: Pages,
}

impl Anon {
    /// The bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        read_pages(&self.pages, offset, buf);
    }
}

/// `fallocate()` modes on a guest_memfd, both with `FALLOC_FL_KEEP_SIZE`
/// (guest_memfd refuses any mode without it: its size is immutable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallocate {
    /// `FALLOC_FL_KEEP_SIZE`: allocate.
    Allocate,
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: free.
    PunchHole,
}

/// What the host sees when it touches memory through a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostMemory {
    /// An anonymous mapping.
    Anon(AnonId),
    /// The whole-file `MAP_SHARED` mapping of a guest_memfd.
    GmemMap(GmemId),
}

/// A host access that the kernel refuses with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFault {
    /// `SIGBUS` (`kvm_gmem_fault_user_mapping()`: private memory, or past
    /// the end of the file).
    Sigbus,
}

/// What one 8-byte guest access does, as `KVM_RUN` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAccess {
    /// The access completed; a read returns the value, a write returns 0.
    Done(u64),
    /// `KVM_EXIT_MMIO` for userspace to emulate.
    Mmio {
        /// `mmio.phys_addr`: the accessed GPA.
        gpa: u64,
        /// `mmio.len`.
        len: u32,
        /// `mmio.is_write`.
        is_write: bool,
        /// `mmio.data` of a write (little-endian value), 0 for a read.
        data: u64,
    },
    /// `KVM_RUN` fails with `errno` and `exit_reason = KVM_EXIT_MEMORY_FAULT`.
    MemoryFault {
        /// `memory_fault.flags`.
        flags: u64,
        /// `memory_fault.gpa`: the page base.
        gpa: u64,
        /// `memory_fault.size`: one page.
        size: u64,
        /// errno of `KVM_RUN`.
        errno: Errno,
    },
    /// The model does not say (e.g. a slot whose `userspace_addr` is 0 and
    /// whose shared view is therefore unbacked); a test must not generate it.
    Unmodeled(&'static str),
}

/// What `KVM_PRE_FAULT_MEMORY` returns and writes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreFault {
    /// Success, or the errno.
    pub result: Result<(), Errno>,
    /// `range.gpa` afterwards: the first page not mapped.
    pub gpa: u64,
    /// `range.size` afterwards: what was left.
    pub size: u64,
}

/// `KVM_HC_MAP_GPA_RANGE` (include/uapi/linux/kvm_para.h).
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_EXIT_HYPERCALL_VALID_MASK` (arch/x86/kvm/x86.c, 6.12 and 7.3): only
/// `KVM_HC_MAP_GPA_RANGE` can exit.
pub const KVM_EXIT_HYPERCALL_VALID_MASK: u64 = 1 << KVM_HC_MAP_GPA_RANGE;
/// `KVM_EXIT_HYPERCALL_LONG_MODE` (arch/x86/include/uapi/asm/kvm.h).
pub const KVM_EXIT_HYPERCALL_LONG_MODE: u64 = 1;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED` (arch/x86/include/uapi/asm/kvm_para.h).
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// `KVM_ENOSYS` (include/uapi/linux/kvm_para.h); the guest gets its negation.
pub const KVM_ENOSYS: u64 = 1000;
/// `KVM_EINVAL` (include/uapi/linux/kvm_para.h): `EINVAL`.
pub const KVM_EINVAL: u64 = 22;

/// What a guest's `KVM_HC_MAP_GPA_RANGE` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapGpaRange {
    /// KVM answers the guest itself: its rax.
    Returned(u64),
    /// `KVM_EXIT_HYPERCALL` for userspace to answer.
    Exit {
        /// `hypercall.args[0..3]`: gpa, npages, attrs.
        args: [u64; 3],
        /// `hypercall.flags`.
        flags: u64,
    },
}

/// The state of one VM and the host memory around it, and the rules.
#[derive(Debug, Clone)]
pub struct Model {
    profile: Profile,
    gmems: Vec<Gmem>,
    anons: Vec<Anon>,
    slots: BTreeMap<(u32, u32), Slot>,
    /// Memory attributes by GFN; absent means 0 (`kvm->mem_attr_array`).
    attributes: BTreeMap<u64, u64>,
    /// GFNs whose SPTE is an MMIO SPTE (with MMIO caching): installed by a
    /// guest access to a GFN without a memslot, made stale (but left in
    /// place) by any memslot change, replaced by the next access that maps
    /// the GFN.
    mmio_sptes: BTreeMap<u64, MmioSpte>,
    /// The vCPU's MMU root is obsolete: a memslot delete or move zapped
    /// every root (kvm_arch_flush_shadow_memslot(), default VMs) and the
    /// vCPU has not entered the guest since (vcpu_enter_guest() frees
    /// obsolete roots).
    obsolete_roots: bool,
    /// `KVM_CAP_EXIT_HYPERCALL` has bit `KVM_HC_MAP_GPA_RANGE` set.
    map_gpa_range_exits: bool,
    /// How often each versioned rule decided an outcome, by rule id: a run
    /// shows which rules its sequences reached.
    rule_hits: BTreeMap<&'static str, u64>,
    /// The undecided rule whose `before` outcome the last call assumed
    /// (the caller accepts either, the same in every check).
    undecided: Option<&'static str>,
}

fn page_aligned(value: u64) -> bool {
    value & (PAGE_SIZE - 1) == 0
}

impl Model {
    /// A VM with no memslots, no guest_memfd and all memory shared.
    pub fn new(profile: Profile) -> Self {
        Self {
            profile,
            gmems: Vec::new(),
            anons: Vec::new(),
            slots: BTreeMap::new(),
            attributes: BTreeMap::new(),
            mmio_sptes: BTreeMap::new(),
            obsolete_roots: false,
            map_gpa_range_exits: false,
            rule_hits: BTreeMap::new(),
            undecided: None,
        }
    }

    /// How often each versioned rule decided an outcome so far, by id.
    pub fn rule_hits(&self) -> &BTreeMap<&'static str, u64> {
        &self.rule_hits
    }

    /// The id of the undecided rule the last call applied, if any, and
    /// forgets it: its outcome was the rule's `before`, and the kernel may
    /// as well give `after` (the caller holds every check of the run to
    /// one of them).
    pub fn take_undecided(&mut self) -> Option<&'static str> {
        self.undecided.take()
    }

    /// Applies a versioned rule's decision, counting it.
    fn apply_rule<T: Copy>(&mut self, id: &'static str, decided: Decided<T>) -> T {
        *self.rule_hits.entry(id).or_insert(0) += 1;
        match decided {
            Decided::Is(t) => t,
            Decided::Either(before, _) => {
                self.undecided = Some(id);
                before
            }
        }
    }

    /// The profile the rules are selected by.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Registers a zero-filled anonymous host mapping of `npages` pages.
    pub fn add_anon(&mut self, npages: u64) -> AnonId {
        self.anons.push(Anon { npages, pages: Pages::new() });
        self.anons.len() - 1
    }

    /// The anonymous mappings.
    pub fn anons(&self) -> &[Anon] {
        &self.anons
    }

    /// The guest_memfds created so far.
    pub fn gmems(&self) -> &[Gmem] {
        &self.gmems
    }

    /// The installed memslots, by (address space, id).
    pub fn slots(&self) -> &BTreeMap<(u32, u32), Slot> {
        &self.slots
    }

    /// The memory attributes of `gfn`.
    pub fn attributes(&self, gfn: u64) -> u64 {
        self.attributes.get(&gfn).copied().unwrap_or(0)
    }

    /// The GFNs in `gfns` whose attributes are not 0, with them, in order
    /// (one walk instead of a lookup per GFN).
    pub fn attributes_in(&self, gfns: std::ops::Range<u64>) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.attributes.range(gfns).map(|(&gfn, &attributes)| (gfn, attributes))
    }
}

#[cfg(test)]
mod tests;
