//! `KVM_PRE_FAULT_MEMORY`.

use super::*;

impl Model {
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
    pub(crate) fn pre_fault_page(&mut self, gpa: u64) -> Result<Result<(), Errno>, &'static str> {
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
    pub(crate) fn prefault_on_obsolete_root_unmodeled(&self) -> Option<&'static str> {
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
}
