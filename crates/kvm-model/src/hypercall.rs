//! `KVM_CAP_EXIT_HYPERCALL` and the guest's `KVM_HC_MAP_GPA_RANGE`.

use super::*;

impl Model {
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
}
