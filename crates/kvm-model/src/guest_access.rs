//! A guest's 8-byte read or write and its instruction fetch: where the
//! access lands (guest_memfd, anonymous memory, a memory fault or MMIO),
//! with the MMIO SPTEs KVM caches.

use super::*;

/// An MMIO SPTE's state relative to the memslot generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MmioSpte {
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
pub(crate) const STALE_MMIO_SPTE_FAULT_FLAGS: u64 = 0;

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
pub(crate) enum Route {
    Gmem(GmemId, u64),
    Anon(AnonId, u64),
}

impl Model {
    /// Where the host's view of `user` + `page` lives.
    pub(crate) fn user_target(user: UserMemory, page: u64) -> Option<(HostMemory, u64)> {
        match user {
            UserMemory::Null => None,
            UserMemory::Anon { anon, page: first } => Some((HostMemory::Anon(anon), first + page)),
            UserMemory::GmemMap { gmem, page: first } => Some((HostMemory::GmemMap(gmem), first + page)),
        }
    }

    /// Which slot of address space 0 holds `gfn`: the only one the guest's
    /// non-SMM accesses see (kvm_vcpu_gfn_to_memslot()).
    pub(crate) fn slot_for(&self, gfn: u64) -> Option<&Slot> {
        self.slots.values().find(|s| s.as_id == 0 && s.contains(gfn))
    }

    /// Whether this kernel takes a private fault over a stale MMIO SPTE as a
    /// shared one (the bug [`versioned::STALE_MMIO_PRIVATE_FAULTS`] fixes).
    pub(crate) fn stale_mmio_private_fault_is_shared(&self) -> bool {
        // Never undecided: no release has the fix, so it is decided by
        // whether the kernel's history names it.
        !self.profile.rules.stale_mmio_private_faults.is(true)
    }

    /// Where a guest access to `gfn` ends up, without side effects.
    pub(crate) fn route(&self, gpa: u64, is_write: bool, data: u64) -> Result<Route, GuestAccess> {
        self.route_with(gpa, is_write, data, self.mmio_sptes.get(&(gpa >> PAGE_SHIFT)).copied())
    }

    /// [`Self::route`] as if the GFN's SPTE were `spte` (`None`: no MMIO
    /// SPTE, as for a fault without the reserved bit).
    pub(crate) fn route_with(
        &self,
        gpa: u64,
        is_write: bool,
        data: u64,
        spte: Option<MmioSpte>,
    ) -> Result<Route, GuestAccess> {
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

    /// kvm_handle_noslot_fault() installs an MMIO SPTE for a GFN without a
    /// memslot (a read-only slot's write takes another path and installs
    /// none), where MMIO caching is on.
    pub(crate) fn note_mmio(&mut self, gpa: u64, outcome: GuestAccess) -> GuestAccess {
        let gfn = gpa >> PAGE_SHIFT;
        if matches!(outcome, GuestAccess::Mmio { .. }) && self.profile.mmio_caching && self.slot_for(gfn).is_none() {
            self.mmio_sptes.insert(gfn, MmioSpte::Current);
        }
        outcome
    }
}
