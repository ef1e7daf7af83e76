//! `KVM_SET_MEMORY_ATTRIBUTES`.

use super::*;

impl Model {
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
}
