//! What selects the rules: the decisions of the versioned rules for the
//! kernel and what the VM reports.

use crate::decide::{Decided, KernelFacts};
use crate::versioned::{
    KernelVersion, GMEM_BINDING_OFFSETS_UNSIGNED, GMEM_BINDING_OVERLAP, PREFAULT_FREES_OBSOLETE_ROOTS,
    STALE_MMIO_PRIVATE_FAULTS,
};
use crate::Errno;

/// The outcomes of the versioned rules the model applies, decided for one
/// kernel from evidence (see [`crate::decide`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// [`GMEM_BINDING_OVERLAP`].
    pub gmem_binding_overlap: Decided<Errno>,
    /// [`PREFAULT_FREES_OBSOLETE_ROOTS`].
    pub prefault_frees_obsolete_roots: Decided<bool>,
    /// [`GMEM_BINDING_OFFSETS_UNSIGNED`].
    pub gmem_binding_offsets_unsigned: Decided<bool>,
    /// [`STALE_MMIO_PRIVATE_FAULTS`].
    pub stale_mmio_private_faults: Decided<bool>,
}

impl Rules {
    /// The decisions for the kernel `facts` describes; an invalid setting
    /// is an error naming it.
    pub fn decide(facts: &KernelFacts) -> Result<Self, String> {
        Ok(Rules {
            gmem_binding_overlap: Decided::of(&GMEM_BINDING_OVERLAP, facts)?,
            prefault_frees_obsolete_roots: Decided::of(&PREFAULT_FREES_OBSOLETE_ROOTS, facts)?,
            gmem_binding_offsets_unsigned: Decided::of(&GMEM_BINDING_OFFSETS_UNSIGNED, facts)?,
            stale_mmio_private_faults: Decided::of(&STALE_MMIO_PRIVATE_FAULTS, facts)?,
        })
    }

    /// The decisions by release alone, for kernels without backports
    /// (unit tests' 6.12 and 7.3 profiles).
    pub fn of_release(major: u32, minor: u32) -> Self {
        Self::decide(&KernelFacts::release(KernelVersion::new(major, minor))).expect("no settings to be invalid")
    }
}

/// The facts about one VM that select among the rules. A test fills it
/// from the running kernel's version and the capabilities the VM reports;
/// unit tests spell out 6.12 and 7.3 VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The versioned rules' outcomes on this kernel.
    pub rules: Rules,
    /// `KVM_CREATE_GUEST_MEMFD` exists (6.12 `CONFIG_KVM_PRIVATE_MEM`,
    /// 7.x `CONFIG_KVM_GUEST_MEMFD`).
    pub guest_memfd: bool,
    /// `KVM_MEM_GUEST_MEMFD` is a valid memslot flag
    /// (check_memory_region_flags(): 6.12 only where
    /// kvm_arch_has_private_mem(), 7.x wherever guest_memfd exists; both
    /// equal `KVM_CAP_GUEST_MEMFD` on the VM fd).
    pub guest_memfd_slots: bool,
    /// The `KVM_CREATE_GUEST_MEMFD` flags the VM accepts
    /// (`KVM_CAP_GUEST_MEMFD_FLAGS` on the VM fd; 0 on 6.12).
    pub guest_memfd_flags: u64,
    /// `KVM_SET_MEMORY_ATTRIBUTES` exists
    /// (`CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES`).
    pub memory_attributes_ioctl: bool,
    /// kvm_supported_mem_attributes() of the VM
    /// (`KVM_CAP_MEMORY_ATTRIBUTES` on the VM fd).
    pub supported_attributes: u64,
    /// kvm_arch_has_readonly_mem() (`KVM_CAP_READONLY_MEM` on the VM fd).
    pub readonly_mem: bool,
    /// kvm_arch_nr_memslot_as_ids() (`KVM_CAP_MULTI_ADDRESS_SPACE` on the
    /// VM fd, at least 1).
    pub address_spaces: u16,
    /// `KVM_PRE_FAULT_MEMORY` works on this VM's vCPUs
    /// (`KVM_CAP_PRE_FAULT_MEMORY`: x86 reports `tdp_enabled`; both VM types
    /// have `pre_fault_allowed`, kvm_arch_init_vm()).
    pub pre_fault_memory: bool,
    /// The hypercalls `KVM_CAP_EXIT_HYPERCALL` can send to userspace
    /// (the capability's value: `KVM_EXIT_HYPERCALL_VALID_MASK` on x86).
    pub hypercall_exit_mask: u64,
    /// Deleting or moving a memslot zaps every MMU root
    /// (kvm_arch_flush_shadow_memslot(): `KVM_X86_DEFAULT_VM` with
    /// `KVM_X86_QUIRK_SLOT_ZAP_ALL`, on by default).
    pub slot_zap_all: bool,
    /// KVM caches emulated MMIO in reserved-bit SPTEs (`kvm.mmio_caching`,
    /// /sys/module/kvm/parameters/mmio_caching).
    pub mmio_caching: bool,
}

impl Profile {
    /// A VM of 6.12 (x86, `CONFIG_KVM_SW_PROTECTED_VM=y`, SMM):
    /// `private` selects `KVM_X86_SW_PROTECTED_VM` over the default type.
    pub fn linux_6_12(private: bool) -> Self {
        Self {
            rules: Rules::of_release(6, 12),
            guest_memfd: true,
            guest_memfd_slots: private,
            guest_memfd_flags: 0,
            memory_attributes_ioctl: true,
            supported_attributes: if private { crate::KVM_MEMORY_ATTRIBUTE_PRIVATE } else { 0 },
            readonly_mem: true,
            address_spaces: if private { 1 } else { 2 },
            mmio_caching: true,
            pre_fault_memory: true,
            slot_zap_all: !private,
            hypercall_exit_mask: crate::KVM_EXIT_HYPERCALL_VALID_MASK,
        }
    }

    /// A VM of 7.3, like [`Self::linux_6_12`]: guest_memfd slots for every
    /// VM type, `MMAP` guest_memfds, `INIT_SHARED` ones without private memory.
    pub fn linux_7_3(private: bool) -> Self {
        Self {
            rules: Rules::of_release(7, 3),
            guest_memfd_slots: true,
            // kvm_gmem_get_supported_flags(): INIT_SHARED only where
            // kvm_arch_supports_gmem_init_shared(), i.e. without private memory.
            guest_memfd_flags: crate::GUEST_MEMFD_FLAG_MMAP
                | if private { 0 } else { crate::GUEST_MEMFD_FLAG_INIT_SHARED },
            ..Self::linux_6_12(private)
        }
    }
}
