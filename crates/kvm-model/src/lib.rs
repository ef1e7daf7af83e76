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

pub mod decide;
mod errno;
mod profile;
pub mod versioned;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

pub use decide::Decided;
pub use errno::Errno;
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

/// An MMIO SPTE's state relative to the memslot generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MmioSpte {
    /// Of the current generation: a reserved-bit fault is emulated MMIO.
    Current,
    /// Of an older generation: handle_mmio_page_fault() sends the access
    /// down the full fault path.
    Stale,
}

/// The exit flags of a private access whose GFN has a stale MMIO SPTE on a
/// kernel without the fix ([`versioned::STALE_MMIO_PRIVATE_FAULTS`]): 0.
///
/// A kernel bug (6.12 and 7.3): kvm_mmu_page_fault() marks a fault private
/// only without PFERR_RSVD ("emulated MMIO is shared-only"), so when the stale
/// MMIO SPTE sends the reserved-bit fault down the full path, it is a shared
/// fault; kvm_mmu_faultin_pfn() then finds the GFN private and exits with
/// flags 0 instead of mapping guest_memfd or exiting with flags PRIVATE. The
/// model follows such a kernel so the random test keeps exploring; the rule
/// itself is asserted, and listed as a known failure, by
/// `private_mem_exits::private_read_of_slotless_gpa_exits_private_after_earlier_mmio`
/// and `private_read_served_from_guest_memfd_after_earlier_mmio_at_that_gpa`.
/// With the fix, a stale MMIO SPTE changes nothing for a private access.
const STALE_MMIO_SPTE_FAULT_FLAGS: u64 = 0;

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

    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create_guest_memfd(&mut self, size: u64, flags: u64) -> Result<GmemId, Errno> {
        if !self.profile.guest_memfd {
            // kvm_vm_ioctl(): without CONFIG_KVM_PRIVATE_MEM (6.12) /
            // CONFIG_KVM_GUEST_MEMFD (7.x) the ioctl falls to
            // kvm_arch_vm_ioctl(), which knows no such request.
            return Err(Errno::ENOTTY);
        }
        // kvm_gmem_create(): unknown flags first (6.12: no flag is valid;
        // 7.x: kvm_gmem_get_supported_flags()), then the size.
        if flags & !self.profile.guest_memfd_flags != 0 {
            return Err(Errno::EINVAL);
        }
        // kvm_gmem_create(): `size <= 0 || !PAGE_ALIGNED(size)` (loff_t, signed).
        if (size as i64) <= 0 || !page_aligned(size) {
            return Err(Errno::EINVAL);
        }
        self.gmems.push(Gmem { size, flags, pages: BTreeMap::new(), closed: false, released: false });
        Ok(self.gmems.len() - 1)
    }

    /// The host closes guest_memfd `gmem`'s fd and unmaps its own mapping
    /// of it. The file lives on while a memslot's userspace_addr maps it
    /// (a mapping holds a file reference); bindings hold none.
    pub fn close_guest_memfd(&mut self, gmem: GmemId) {
        self.gmems[gmem].closed = true;
        self.release_if_unreferenced(gmem);
    }

    fn release_if_unreferenced(&mut self, gmem: GmemId) {
        let mapped = self.slots.values().any(|s| matches!(s.user, UserMemory::GmemMap { gmem: g, .. } if g == gmem));
        let file = &mut self.gmems[gmem];
        if file.closed && !mapped && !file.released {
            file.released = true;
            file.pages.clear();
        }
    }

    fn slot_bound_pages(&self, gmem: GmemId) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots.values().filter_map(move |s| match s.gmem {
            Some((g, pgoff)) if g == gmem => Some((pgoff, pgoff + s.npages)),
            _ => None,
        })
    }

    /// `KVM_SET_USER_MEMORY_REGION2`, in the order of the kernel's checks.
    pub fn set_memory_region(&mut self, mem: &MemoryRegion) -> Result<Change, Errno> {
        let (as_id, id) = (mem.as_id(), mem.id());
        // kvm_vm_ioctl_set_memory_region(): userspace may not name the
        // internal slots.
        if id >= KVM_USER_MEM_SLOTS {
            return Err(Errno::EINVAL);
        }
        self.check_region_flags(mem.flags)?;
        let npages = self.check_region_geometry(mem)?;
        let old = self.slots.get(&(as_id, id)).cloned();
        if mem.size == 0 {
            // Deleting a slot that does not exist.
            return match old {
                None => Err(Errno::EINVAL),
                Some(old) => {
                    self.slots.remove(&(as_id, id));
                    self.memslot_generation_moved();
                    self.obsolete_roots |= self.profile.slot_zap_all;
                    // The slot's userspace mapping of a closed guest_memfd
                    // may have been the file's last reference.
                    if let UserMemory::GmemMap { gmem, .. } = old.user {
                        self.release_if_unreferenced(gmem);
                    }
                    Ok(Change::Delete)
                }
            };
        }
        let base_gfn = mem.gpa >> PAGE_SHIFT;
        let change = match &old {
            None => Change::Create,
            Some(old) => Self::classify_change(mem, old, base_gfn, npages)?,
        };
        if change == Change::Unchanged {
            return Ok(change);
        }
        // kvm_check_memslot_overlap(): another slot of the same address
        // space over any of the GFNs.
        if matches!(change, Change::Create | Change::Move)
            && self.slots.values().any(|s| {
                s.as_id == as_id && s.id != id && s.base_gfn < base_gfn + npages && base_gfn < s.base_gfn + s.npages
            })
        {
            return Err(Errno::EEXIST);
        }
        let (gmem, gmem_only) = if change == Change::Create && mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            self.bind_guest_memfd(mem, npages)?
        } else {
            (None, false)
        };
        match change {
            Change::Create => {
                let slot = Slot { as_id, id, flags: mem.flags, base_gfn, npages, user: mem.user, gmem, gmem_only };
                self.slots.insert((as_id, id), slot);
            }
            Change::Move | Change::FlagsOnly => {
                let slot = self.slots.get_mut(&(as_id, id)).expect("modified slot exists");
                slot.base_gfn = base_gfn;
                slot.flags = mem.flags;
                self.obsolete_roots |= change == Change::Move && self.profile.slot_zap_all;
            }
            Change::Delete | Change::Unchanged => unreachable!("handled above"),
        }
        self.memslot_generation_moved();
        Ok(change)
    }

    /// check_memory_region_flags().
    fn check_region_flags(&self, flags: u32) -> Result<(), Errno> {
        let mut valid = KVM_MEM_LOG_DIRTY_PAGES;
        if self.profile.guest_memfd_slots {
            // 6.12: kvm_arch_has_private_mem(); 7.x: CONFIG_KVM_GUEST_MEMFD.
            valid |= KVM_MEM_GUEST_MEMFD;
        }
        if flags & KVM_MEM_GUEST_MEMFD != 0 {
            // "Dirty logging private memory is not currently supported."
            valid &= !KVM_MEM_LOG_DIRTY_PAGES;
        }
        if self.profile.readonly_mem && flags & KVM_MEM_GUEST_MEMFD == 0 {
            // kvm_arch_has_readonly_mem(); never with GUEST_MEMFD.
            valid |= KVM_MEM_READONLY;
        }
        if flags & !valid != 0 {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// kvm_set_memory_region()'s "General sanity checks", in order; the
    /// slot's page count. userspace_addr is always page aligned and
    /// access_ok() here: it is symbolic.
    fn check_region_geometry(&self, mem: &MemoryRegion) -> Result<u64, Errno> {
        if !page_aligned(mem.size) || !page_aligned(mem.gpa) {
            return Err(Errno::EINVAL);
        }
        let offset = mem.guest_memfd.map_or(0, |(_, offset)| offset);
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 && (!page_aligned(offset) || offset.checked_add(mem.size).is_none()) {
            return Err(Errno::EINVAL);
        }
        if mem.as_id() >= u32::from(self.profile.address_spaces) || mem.id() >= KVM_MEM_SLOTS_NUM {
            return Err(Errno::EINVAL);
        }
        if mem.gpa.checked_add(mem.size).is_none() {
            return Err(Errno::EINVAL);
        }
        let npages = mem.size >> PAGE_SHIFT;
        if npages > KVM_MEM_MAX_NR_PAGES {
            return Err(Errno::EINVAL);
        }
        Ok(npages)
    }

    /// What a request for an existing slot changes (kvm_set_memory_region()).
    fn classify_change(mem: &MemoryRegion, old: &Slot, base_gfn: u64, npages: u64) -> Result<Change, Errno> {
        // "Private memslots are immutable, they can only be deleted."
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            return Err(Errno::EINVAL);
        }
        if mem.user != old.user
            || npages != old.npages
            || (mem.flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD) != 0
        {
            return Err(Errno::EINVAL);
        }
        Ok(if base_gfn != old.base_gfn {
            Change::Move
        } else if mem.flags != old.flags {
            Change::FlagsOnly
        } else {
            Change::Unchanged
        })
    }

    /// The guest_memfd binding of a new slot: 6.12 kvm_gmem_bind(); 7.x
    /// kvm_gmem_prepare_memory_region() then kvm_gmem_commit_memory_region().
    /// Returns the file and first page, and whether the slot is
    /// guest_memfd-only.
    fn bind_guest_memfd(&mut self, mem: &MemoryRegion, npages: u64) -> Result<(Option<(GmemId, u64)>, bool), Errno> {
        let (fd, offset) = mem.guest_memfd.unwrap_or((GmemFd::NotGuestMemfd, 0));
        let g = match fd {
            // fget() fails.
            GmemFd::Closed => return Err(Errno::EBADF),
            // `file->f_op != &kvm_gmem_fops`.
            GmemFd::NotGuestMemfd => return Err(Errno::EINVAL),
            GmemFd::File(g) => g,
        };
        let file = &self.gmems[g];
        // `!PAGE_ALIGNED(offset) || offset + size > i_size_read(inode)`.
        if !page_aligned(offset) || offset + mem.size > file.size {
            return Err(Errno::EINVAL);
        }
        let start = offset >> PAGE_SHIFT;
        let end = start + npages;
        // The xarray of bindings already holds a slot in [start, end):
        // 6.12 kvm_gmem_bind() fails with its initial -EINVAL; after the
        // binding rework (7.2, 6.12.118) kvm_gmem_commit_memory_region()
        // returns -EEXIST.
        if self.slot_bound_pages(g).any(|(s, e)| s < end && start < e) {
            return Err(self.apply_rule(versioned::GMEM_BINDING_OVERLAP.id, self.profile.rules.gmem_binding_overlap));
        }
        // 7.x: `if (kvm_gmem_supports_mmap(inode)) slot->flags |=
        // KVM_MEMSLOT_GMEM_ONLY`.
        Ok((Some((g, start)), file.mmap()))
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES`.
    pub fn set_memory_attributes(&mut self, address: u64, size: u64, attributes: u64, flags: u64) -> Result<(), Errno> {
        if !self.profile.memory_attributes_ioctl {
            // Without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES the request falls
            // to kvm_arch_vm_ioctl(), which does not know it.
            return Err(Errno::ENOTTY);
        }
        // kvm_vm_ioctl_set_mem_attributes(): "flags is currently not used."
        if flags != 0 {
            return Err(Errno::EINVAL);
        }
        // Attributes outside kvm_supported_mem_attributes(): PRIVATE only
        // where kvm_arch_has_private_mem(), nothing otherwise.
        if attributes & !self.profile.supported_attributes != 0 {
            return Err(Errno::EINVAL);
        }
        if size == 0 || address.checked_add(size).is_none() {
            return Err(Errno::EINVAL);
        }
        if !page_aligned(address) || !page_aligned(size) {
            return Err(Errno::EINVAL);
        }
        // kvm_vm_set_mem_attributes(): every GFN of [start, end) gets the
        // value (0 erases the entry).
        for gfn in address >> PAGE_SHIFT..(address + size) >> PAGE_SHIFT {
            if attributes == 0 {
                self.attributes.remove(&gfn);
            } else {
                self.attributes.insert(gfn, attributes);
            }
        }
        Ok(())
    }

    /// `fallocate()` on guest_memfd `gmem`.
    pub fn fallocate(&mut self, gmem: GmemId, mode: Fallocate, offset: u64, len: u64) -> Result<(), Errno> {
        // vfs_fallocate(): `offset < 0 || len <= 0` (loff_t, signed).
        if (offset as i64) < 0 || (len as i64) <= 0 {
            return Err(Errno::EINVAL);
        }
        // vfs_fallocate(): past s_maxbytes or wrapping.
        if (offset as i64).checked_add(len as i64).is_none() {
            return Err(Errno::EFBIG);
        }
        // kvm_gmem_fallocate(): both offset and length page aligned.
        if !page_aligned(offset) || !page_aligned(len) {
            return Err(Errno::EINVAL);
        }
        let file = &mut self.gmems[gmem];
        let (start, end) = (offset >> PAGE_SHIFT, (offset + len) >> PAGE_SHIFT);
        match mode {
            Fallocate::Allocate => {
                // kvm_gmem_allocate(): "Dedicated guest is immutable by default."
                if offset + len > file.size {
                    return Err(Errno::EINVAL);
                }
                // New pages are zero when first used (kvm_gmem_get_pfn(),
                // kvm_gmem_fault_user_mapping() clear them).
                for index in start..end {
                    file.pages.entry(index).or_insert_with(zero_page);
                }
            }
            Fallocate::PunchHole => {
                // kvm_gmem_punch_hole(): truncate_inode_pages_range() frees
                // whatever lies in the range, past the end included
                // (nothing there); mappings are invalidated, so the next
                // access sees a fresh zero page.
                let doomed: Vec<u64> = file.pages.range(start..end).map(|(i, _)| *i).collect();
                for index in doomed {
                    file.pages.remove(&index);
                }
            }
        }
        Ok(())
    }

    fn gmem_page_mut(&mut self, gmem: GmemId, index: u64) -> &mut [u8] {
        page_mut(&mut self.gmems[gmem].pages, index)
    }

    /// Page `index` of guest_memfd `gmem`, allocated from now on.
    fn gmem_page(&mut self, gmem: GmemId, index: u64) -> &[u8] {
        &self.gmems[gmem].pages.entry(index).or_insert_with(zero_page)[..]
    }

    /// Where the host's view of `user` + `page` lives.
    fn user_target(user: UserMemory, page: u64) -> Option<(HostMemory, u64)> {
        match user {
            UserMemory::Null => None,
            UserMemory::Anon { anon, page: first } => Some((HostMemory::Anon(anon), first + page)),
            UserMemory::GmemMap { gmem, page: first } => Some((HostMemory::GmemMap(gmem), first + page)),
        }
    }

    /// Which slot of address space 0 holds `gfn`: the only one the guest's
    /// non-SMM accesses see (kvm_vcpu_gfn_to_memslot()).
    fn slot_for(&self, gfn: u64) -> Option<&Slot> {
        self.slots.values().find(|s| s.as_id == 0 && s.contains(gfn))
    }

    /// Whether this kernel takes a private fault over a stale MMIO SPTE as a
    /// shared one (the bug [`versioned::STALE_MMIO_PRIVATE_FAULTS`] fixes).
    fn stale_mmio_private_fault_is_shared(&self) -> bool {
        // Never undecided: no release has the fix, so it is decided by
        // whether the kernel's history names it.
        !self.profile.rules.stale_mmio_private_faults.is(true)
    }

    /// Where a guest access to `gfn` ends up, without side effects.
    fn route(&self, gpa: u64, is_write: bool, data: u64) -> Result<Route, GuestAccess> {
        self.route_with(gpa, is_write, data, self.mmio_sptes.get(&(gpa >> PAGE_SHIFT)).copied())
    }

    /// [`Self::route`] as if the GFN's SPTE were `spte` (`None`: no MMIO
    /// SPTE, as for a fault without the reserved bit).
    fn route_with(&self, gpa: u64, is_write: bool, data: u64, spte: Option<MmioSpte>) -> Result<Route, GuestAccess> {
        let gfn = gpa >> PAGE_SHIFT;
        let page_gpa = gpa & !(PAGE_SIZE - 1);
        // x86 kvm_mmu_page_fault(): a VM with private memory marks the fault
        // private when the GFN's attributes say so (PFERR_PRIVATE_ACCESS),
        // so kvm_mmu_faultin_pfn()'s is_private mismatch check never fires
        // for these accesses.
        let private = self.attributes(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE != 0;
        let fault = |flags| GuestAccess::MemoryFault { flags, gpa: page_gpa, size: PAGE_SIZE, errno: Errno::EFAULT };
        let private_flag = if private { KVM_MEMORY_EXIT_FLAG_PRIVATE } else { 0 };
        let Some(slot) = self.slot_for(gfn) else {
            // kvm_handle_noslot_fault(): a private access exits with a
            // memory fault; a shared one is emulated MMIO. But a GFN whose
            // SPTE is already an MMIO SPTE faults with a reserved bit, which
            // kvm_mmu_page_fault() treats as shared-only ("emulated MMIO is
            // shared-only"), and KVM_SET_MEMORY_ATTRIBUTES zaps only
            // memslot-backed ranges: that GFN stays MMIO though now private.
            if private && spte == Some(MmioSpte::Stale) && self.stale_mmio_private_fault_is_shared() {
                return Err(fault(STALE_MMIO_SPTE_FAULT_FLAGS));
            }
            if private && spte != Some(MmioSpte::Current) {
                return Err(fault(KVM_MEMORY_EXIT_FLAG_PRIVATE));
            }
            return Err(GuestAccess::Mmio { gpa, len: 8, is_write, data: if is_write { data } else { 0 } });
        };
        let index = gfn - slot.base_gfn;
        if private && spte == Some(MmioSpte::Stale) && self.stale_mmio_private_fault_is_shared() {
            return Err(fault(STALE_MMIO_SPTE_FAULT_FLAGS));
        }
        if private || slot.gmem_only {
            // 6.12 kvm_faultin_pfn_private(), 7.x kvm_mmu_faultin_pfn_gmem():
            // a slot without guest_memfd cannot provide the page.
            // kvm_gmem_get_pfn(): a binding whose file was released has
            // no file (kvm_gmem_get_file() is NULL): -EFAULT, a memory
            // fault exit.
            return match slot.gmem {
                Some((g, pgoff)) if !self.gmems[g].released => Ok(Route::Gmem(g, pgoff + index)),
                _ => Err(fault(private_flag)),
            };
        }
        // Shared access through userspace_addr (__kvm_faultin_pfn()).
        if is_write && slot.flags & KVM_MEM_READONLY != 0 {
            // A write to a read-only slot has emulated-MMIO semantics
            // (check_memory_region_flags() comment; kvm_handle_error_pfn()
            // returns RET_PF_EMULATE for KVM_PFN_ERR_RO_FAULT).
            return Err(GuestAccess::Mmio { gpa, len: 8, is_write: true, data });
        }
        match Self::user_target(slot.user, index) {
            None => Err(GuestAccess::Unmodeled("shared access to a slot whose userspace_addr is 0")),
            Some((HostMemory::GmemMap(g), _)) if !self.gmems[g].host_accessible() => {
                Err(GuestAccess::Unmodeled("shared access through a host mapping of private guest_memfd memory"))
            }
            Some((HostMemory::GmemMap(g), page)) if page * PAGE_SIZE >= self.gmems[g].size => {
                Err(GuestAccess::Unmodeled("shared access through a host mapping past the guest_memfd's end"))
            }
            Some((HostMemory::GmemMap(g), page)) => Ok(Route::Gmem(g, page)),
            Some((HostMemory::Anon(a), page)) => Ok(Route::Anon(a, page)),
        }
    }

    /// The memslot of address space 0 that holds `gpa`, if any.
    pub fn slot_at(&self, gpa: u64) -> Option<&Slot> {
        self.slot_for(gpa >> PAGE_SHIFT)
    }

    /// Why the model cannot say what an access at `gpa` does, if it cannot
    /// (see [`GuestAccess::Unmodeled`]); changes nothing.
    pub fn unmodeled_guest_access(&self, gpa: u64, is_write: bool) -> Option<&'static str> {
        match self.route(gpa, is_write, 0) {
            Err(GuestAccess::Unmodeled(why)) => Some(why),
            _ => None,
        }
    }

    /// The guest reads the u64 at `gpa` (8-byte aligned).
    pub fn guest_read(&mut self, gpa: u64) -> GuestAccess {
        self.obsolete_roots = false;
        assert_eq!(gpa % 8, 0, "the model knows aligned 8-byte accesses only");
        let offset = (gpa % PAGE_SIZE) as usize;
        let route = self.route(gpa, false, 0);
        if route.is_ok() {
            self.mmio_sptes.remove(&(gpa >> PAGE_SHIFT));
        }
        match route {
            Err(outcome) => self.note_mmio(gpa, outcome),
            Ok(Route::Gmem(g, index)) => {
                let page = self.gmem_page(g, index);
                GuestAccess::Done(u64::from_le_bytes(page[offset..offset + 8].try_into().expect("8 bytes")))
            }
            Ok(Route::Anon(a, index)) => {
                let mut buf = [0; 8];
                self.anons[a].read(index * PAGE_SIZE + offset as u64, &mut buf);
                GuestAccess::Done(u64::from_le_bytes(buf))
            }
        }
    }

    /// The guest writes `value` at `gpa` (8-byte aligned).
    pub fn guest_write(&mut self, gpa: u64, value: u64) -> GuestAccess {
        self.obsolete_roots = false;
        assert_eq!(gpa % 8, 0, "the model knows aligned 8-byte accesses only");
        let offset = (gpa % PAGE_SIZE) as usize;
        let route = self.route(gpa, true, value);
        if route.is_ok() {
            self.mmio_sptes.remove(&(gpa >> PAGE_SHIFT));
        }
        match route {
            Err(outcome) => self.note_mmio(gpa, outcome),
            Ok(Route::Gmem(g, index)) => {
                self.gmem_page_mut(g, index)[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
                GuestAccess::Done(0)
            }
            Ok(Route::Anon(a, index)) => {
                write_pages(&mut self.anons[a].pages, index * PAGE_SIZE + offset as u64, &value.to_le_bytes());
                GuestAccess::Done(0)
            }
        }
    }

    /// The guest calls the code at `gpa` (8-byte aligned): an instruction
    /// fetch. Only code the model knows is run: [`ret_stub`] bytes, whose
    /// result is the stub's sign-extended immediate; a fetch of other bytes,
    /// or from emulated MMIO (the emulator cannot fetch from it), is
    /// [`GuestAccess::Unmodeled`].
    ///
    /// A fetch faults like a read: kvm_prepare_memory_fault_exit() reports
    /// no RWX flags ("not (yet) defined or communicated to userspace"), so
    /// a private fetch without guest_memfd backing exits with flags exactly
    /// PRIVATE (6.12 and 7.3 alike).
    pub fn guest_fetch(&mut self, gpa: u64) -> GuestAccess {
        if let Some(why) = self.unmodeled_guest_fetch(gpa) {
            return GuestAccess::Unmodeled(why);
        }
        match self.guest_read(gpa) {
            GuestAccess::Done(bytes) => {
                GuestAccess::Done(stub_result(bytes).expect("unmodeled_guest_fetch checked the stub"))
            }
            outcome => outcome,
        }
    }

    /// Why the model cannot say what a fetch at `gpa` does, if it cannot;
    /// changes nothing.
    pub fn unmodeled_guest_fetch(&self, gpa: u64) -> Option<&'static str> {
        let offset = gpa % PAGE_SIZE;
        let mut bytes = [0u8; 8];
        match self.route(gpa, false, 0) {
            Err(GuestAccess::Unmodeled(why)) => return Some(why),
            Err(GuestAccess::Mmio { .. }) => return Some("an instruction fetch from emulated MMIO"),
            Err(_) => return None,
            Ok(Route::Gmem(g, index)) => {
                if let Some(page) = self.gmems[g].pages.get(&index) {
                    bytes.copy_from_slice(&page[offset as usize..offset as usize + 8]);
                }
            }
            Ok(Route::Anon(a, index)) => self.anons[a].read(index * PAGE_SIZE + offset, &mut bytes),
        }
        match stub_result(u64::from_le_bytes(bytes)) {
            Some(_) => None,
            None => Some("a fetch of bytes that are not a return stub"),
        }
    }

    /// `KVM_PRE_FAULT_MEMORY` of `[gpa, gpa + size)` with `flags`: the
    /// result and the range the kernel writes back, or why the model cannot
    /// say (a page whose shared view is unmodeled comes before the end).
    ///
    /// kvm_vcpu_pre_fault_memory() (6.12 and 7.3 alike): nonzero flags,
    /// unaligned gpa or size, or `gpa + size <= gpa` (size 0, wrap) are
    /// EINVAL; then page by page kvm_arch_vcpu_pre_fault_memory() maps
    /// `range->gpa`, private where the attributes say so, and the range
    /// advances by the mapping's size, to the end of a huge page where KVM
    /// maps one: a page-by-page walk ends at the same place, since every
    /// page a huge mapping covers is mapped (one memslot, the same
    /// attributes, all shared). The first failure stops it: the
    /// call fails with it if no page was mapped, else succeeds with the
    /// rest left in the range. kvm_tdp_map_page() / kvm_tdp_page_prefault()
    /// turn RET_PF_EMULATE (no memslot, shared) into ENOENT; a fault exit
    /// (private without guest_memfd backing) is EFAULT.
    pub fn pre_fault_memory(&mut self, gpa: u64, size: u64, flags: u64) -> Result<PreFault, &'static str> {
        let unchanged = |errno| PreFault { result: Err(errno), gpa, size };
        if flags != 0 || !page_aligned(gpa) || !page_aligned(size) || gpa.wrapping_add(size) <= gpa {
            return Ok(unchanged(Errno::EINVAL));
        }
        if self.obsolete_roots {
            if let Some(why) = self.prefault_on_obsolete_root_unmodeled() {
                return Err(why);
            }
            *self.rule_hits.entry(versioned::PREFAULT_FREES_OBSOLETE_ROOTS.id).or_insert(0) += 1;
            // kvm_mmu_reload() frees the obsolete roots and loads a new one.
            self.obsolete_roots = false;
        }
        let (mut at, mut left) = (gpa, size);
        while left > 0 {
            match self.pre_fault_page(at)? {
                Ok(()) => (at, left) = (at + PAGE_SIZE, left - PAGE_SIZE),
                Err(errno) if left == size => return Ok(unchanged(errno)),
                Err(_) => break,
            }
        }
        Ok(PreFault { result: Ok(()), gpa: at, size: left })
    }

    /// One page of [`Self::pre_fault_memory`]. Unlike a guest access, the
    /// fault carries no reserved bit, so an MMIO SPTE does not divert it:
    /// the attributes alone decide private or shared.
    fn pre_fault_page(&mut self, gpa: u64) -> Result<Result<(), Errno>, &'static str> {
        let gfn = gpa >> PAGE_SHIFT;
        match self.route_with(gpa, false, 0, None) {
            Ok(route) => {
                // A present SPTE replaces any MMIO SPTE; kvm_gmem_get_pfn()
                // allocates a guest_memfd page.
                self.mmio_sptes.remove(&gfn);
                if let Route::Gmem(g, index) = route {
                    self.gmem_page(g, index);
                }
                Ok(Ok(()))
            }
            Err(GuestAccess::MemoryFault { .. }) => Ok(Err(Errno::EFAULT)),
            Err(GuestAccess::Mmio { .. }) => {
                // kvm_handle_noslot_fault() installs an MMIO SPTE of the
                // current generation where MMIO caching is on.
                if self.profile.mmio_caching {
                    self.mmio_sptes.insert(gfn, MmioSpte::Current);
                }
                Ok(Err(Errno::ENOENT))
            }
            Err(GuestAccess::Unmodeled(why)) => Err(why),
            Err(GuestAccess::Done(_)) => unreachable!("route() never fails with a completion"),
        }
    }

    /// Why a pre-fault on an obsolete root cannot be modeled, if it cannot:
    /// without the change it retries until a signal, and where nothing
    /// decides whether the kernel has it, the outcome is unknown.
    fn prefault_on_obsolete_root_unmodeled(&self) -> Option<&'static str> {
        match self.profile.rules.prefault_frees_obsolete_roots {
            Decided::Is(true) => None,
            Decided::Is(false) => {
                Some("KVM_PRE_FAULT_MEMORY on an obsolete root: it retries until a signal on this kernel")
            }
            Decided::Either(..) => {
                Some("KVM_PRE_FAULT_MEMORY on an obsolete root: undecided whether this kernel frees obsolete roots")
            }
        }
    }

    /// Why the model cannot say what [`Self::pre_fault_memory`] does, if it
    /// cannot; changes nothing.
    pub fn unmodeled_pre_fault(&self, gpa: u64, size: u64, flags: u64) -> Option<&'static str> {
        if flags != 0 || !page_aligned(gpa) || !page_aligned(size) || gpa.wrapping_add(size) <= gpa {
            return None;
        }
        if self.obsolete_roots {
            if let Some(why) = self.prefault_on_obsolete_root_unmodeled() {
                return Some(why);
            }
        }
        for page in (gpa..gpa + size).step_by(PAGE_SIZE as usize) {
            match self.route_with(page, false, 0, None) {
                Ok(_) => continue,
                Err(GuestAccess::Unmodeled(why)) => return Some(why),
                Err(_) => return None,
            }
        }
        None
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, args[0] = mask)`: the
    /// hypercalls that exit to userspace (kvm_vm_ioctl_enable_cap():
    /// unknown bits EINVAL; the mask replaces the old one).
    pub fn enable_hypercall_exits(&mut self, mask: u64) -> Result<(), Errno> {
        if mask & !self.profile.hypercall_exit_mask != 0 {
            return Err(Errno::EINVAL);
        }
        self.map_gpa_range_exits = mask & (1 << KVM_HC_MAP_GPA_RANGE) != 0;
        Ok(())
    }

    /// The guest's `KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs)` in 64-bit mode,
    /// up to the exit (6.12 __kvm_emulate_hypercall(), 7.3
    /// ____kvm_emulate_hypercall(), alike): without the exit enabled the
    /// guest gets -KVM_ENOSYS; an unaligned gpa, npages 0 or a GFN range
    /// that wraps get -KVM_EINVAL; otherwise `KVM_EXIT_HYPERCALL` with nr,
    /// args[0..3] = gpa, npages, attrs and flags `KVM_EXIT_HYPERCALL_LONG_MODE`,
    /// and the guest gets what userspace puts in `hypercall.ret`.
    pub fn map_gpa_range(&mut self, gpa: u64, npages: u64, attrs: u64) -> MapGpaRange {
        self.obsolete_roots = false;
        if !self.map_gpa_range_exits {
            return MapGpaRange::Returned(KVM_ENOSYS.wrapping_neg());
        }
        let gfn = gpa >> PAGE_SHIFT;
        if !page_aligned(gpa) || npages == 0 || gfn.wrapping_add(npages) <= gfn {
            return MapGpaRange::Returned(KVM_EINVAL.wrapping_neg());
        }
        MapGpaRange::Exit { args: [gpa, npages, attrs], flags: KVM_EXIT_HYPERCALL_LONG_MODE }
    }

    /// kvm_swap_active_memslots() moves the memslot generation on: MMIO
    /// SPTEs stay but go stale (check_mmio_spte()). Deleting or moving a
    /// memslot zaps every root only for default VMs
    /// (kvm_arch_flush_shadow_memslot(), KVM_X86_QUIRK_SLOT_ZAP_ALL), whose
    /// memory is never private, so the stale state only matters where it is
    /// kept; other VMs zap just the memslot's present leaves, and MMIO SPTEs
    /// are not present ones.
    fn memslot_generation_moved(&mut self) {
        self.mmio_sptes.values_mut().for_each(|s| *s = MmioSpte::Stale);
    }

    /// kvm_handle_noslot_fault() installs an MMIO SPTE for a GFN without a
    /// memslot (a read-only slot's write takes another path and installs
    /// none), where MMIO caching is on.
    fn note_mmio(&mut self, gpa: u64, outcome: GuestAccess) -> GuestAccess {
        let gfn = gpa >> PAGE_SHIFT;
        if matches!(outcome, GuestAccess::Mmio { .. }) && self.profile.mmio_caching && self.slot_for(gfn).is_none() {
            self.mmio_sptes.insert(gfn, MmioSpte::Current);
        }
        outcome
    }

    fn host_check(&self, mem: HostMemory, offset: u64, len: u64) -> Result<(), HostFault> {
        match mem {
            HostMemory::Anon(a) => {
                assert!(offset + len <= self.anons[a].npages * PAGE_SIZE, "host access outside anon {a}");
                Ok(())
            }
            HostMemory::GmemMap(g) => {
                let file = &self.gmems[g];
                assert!(file.mmap(), "guest_memfd {g} cannot be mapped (no GUEST_MEMFD_FLAG_MMAP)");
                // kvm_gmem_fault_user_mapping(): SIGBUS past i_size or on
                // memory that is not shared.
                if offset + len > file.size || !file.host_accessible() {
                    return Err(HostFault::Sigbus);
                }
                Ok(())
            }
        }
    }

    /// The host reads `buf.len()` bytes at `offset` of `mem`.
    pub fn host_read(&mut self, mem: HostMemory, offset: u64, buf: &mut [u8]) -> Result<(), HostFault> {
        self.host_check(mem, offset, buf.len() as u64)?;
        match mem {
            HostMemory::Anon(a) => self.anons[a].read(offset, buf),
            HostMemory::GmemMap(g) => {
                // A read fault allocates the page (kvm_gmem_get_folio()).
                let end = offset + buf.len() as u64;
                for index in offset / PAGE_SIZE..end.div_ceil(PAGE_SIZE) {
                    self.gmem_page(g, index);
                }
                self.gmems[g].read(offset, buf);
            }
        }
        Ok(())
    }

    /// Page `index` of `mem` as the host sees it, `None` where it reads as
    /// zeroes; a fault on a guest_memfd mapping allocates the page as
    /// [`Self::host_read`] does. Lets a test compare page by page without
    /// copying.
    pub fn host_page(&mut self, mem: HostMemory, index: u64) -> Result<Option<&[u8]>, HostFault> {
        self.host_check(mem, index * PAGE_SIZE, PAGE_SIZE)?;
        Ok(match mem {
            HostMemory::Anon(a) => self.anons[a].pages.get(&index).map(|p| &p[..]),
            HostMemory::GmemMap(g) => Some(self.gmem_page(g, index)),
        })
    }

    /// The host writes `data` at `offset` of `mem`.
    pub fn host_write(&mut self, mem: HostMemory, offset: u64, data: &[u8]) -> Result<(), HostFault> {
        self.host_check(mem, offset, data.len() as u64)?;
        match mem {
            HostMemory::Anon(a) => write_pages(&mut self.anons[a].pages, offset, data),
            HostMemory::GmemMap(g) => write_pages(&mut self.gmems[g].pages, offset, data),
        }
        Ok(())
    }
}

/// Eight bytes of code a guest may call: `mov rax, imm32` (sign-extended)
/// then `ret`, as the u64 a guest or host write stores.
pub fn ret_stub(imm: u32) -> u64 {
    u64::from_le_bytes([0x48, 0xc7, 0xc0, imm as u8, (imm >> 8) as u8, (imm >> 16) as u8, (imm >> 24) as u8, 0xc3])
}

/// What calling the u64 `bytes` returns, if they are a [`ret_stub`].
pub fn stub_result(bytes: u64) -> Option<u64> {
    let b = bytes.to_le_bytes();
    (b[..3] == [0x48, 0xc7, 0xc0] && b[7] == 0xc3).then(|| i64::from((bytes >> 24) as u32 as i32) as u64)
}

/// Where an access lands: guest_memfd page, or anonymous page.
enum Route {
    Gmem(GmemId, u64),
    Anon(AnonId, u64),
}

#[cfg(test)]
mod tests;
