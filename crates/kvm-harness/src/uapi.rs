//! KVM uAPI items that kvm-bindings 0.14 does not carry yet.
//!
//! Each mirrors a definition in the named kernel header; keep the values in
//! sync with `include/uapi/linux/kvm.h` and
//! `arch/x86/include/uapi/asm/kvm_para.h`, `include/uapi/linux/kvm_para.h`.

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (include/uapi/linux/kvm.h): the
/// `KVM_CREATE_GUEST_MEMFD` flags a VM accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// `GUEST_MEMFD_FLAG_MMAP` (include/uapi/linux/kvm.h): the guest_memfd can be mmap()ed.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED` (include/uapi/linux/kvm.h): memory starts shared.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// `KVM_HC_MAP_GPA_RANGE` (include/uapi/linux/kvm_para.h).
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_4K` (arch/x86/include/uapi/asm/kvm_para.h).
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_4K: u64 = 0;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_2M` (arch/x86/include/uapi/asm/kvm_para.h).
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_2M: u64 = 1;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED` (arch/x86/include/uapi/asm/kvm_para.h): convert to private.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// `KVM_MAP_GPA_RANGE_DECRYPTED` (arch/x86/include/uapi/asm/kvm_para.h): convert to shared.
pub const KVM_MAP_GPA_RANGE_DECRYPTED: u64 = 0;

/// `KVM_EXIT_HYPERCALL_LONG_MODE` (arch/x86/include/uapi/asm/kvm.h): `hypercall.flags`
/// bit set when the guest made the hypercall in 64-bit mode.
pub const KVM_EXIT_HYPERCALL_LONG_MODE: u64 = 1 << 0;
/// `KVM_EINVAL` (include/uapi/linux/kvm_para.h): a hypercall's "invalid
/// argument" status; the guest sees its negation in rax.
pub const KVM_EINVAL: u64 = 22;

/// Bits of the slot id that select the address space (`KVM_SET_USER_MEMORY_REGION`).
pub const ADDRESS_SPACE_SHIFT: u32 = 16;

const KVMIO: u64 = 0xAE;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
/// `KVM_CHECK_EXTENSION`: `_IO(KVMIO, 0x03)`.
pub const KVM_CHECK_EXTENSION: u64 = ioc(0, 0x03, 0);
/// `KVM_SET_NR_MMU_PAGES`: `_IO(KVMIO, 0x44)`.
pub const KVM_SET_NR_MMU_PAGES: u64 = ioc(0, 0x44, 0);
/// `KVM_CREATE_VM`: `_IO(KVMIO, 0x01)`.
pub const KVM_CREATE_VM: u64 = ioc(0, 0x01, 0);
/// `KVM_CREATE_VCPU`: `_IO(KVMIO, 0x41)`.
pub const KVM_CREATE_VCPU: u64 = ioc(0, 0x41, 0);
/// `KVM_CREATE_GUEST_MEMFD`: `_IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)`.
pub const KVM_CREATE_GUEST_MEMFD: u64 =
    ioc(IOC_READ | IOC_WRITE, 0xd4, size_of::<kvm_bindings::kvm_create_guest_memfd>());
/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
pub const KVM_GET_STATS_FD: u64 = ioc(0, 0xce, 0);
/// `KVM_PRE_FAULT_MEMORY`: `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)`.
pub const KVM_PRE_FAULT_MEMORY: u64 = ioc(IOC_READ | IOC_WRITE, 0xd5, size_of::<kvm_bindings::kvm_pre_fault_memory>());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xAE80);
        assert_eq!(KVM_CHECK_EXTENSION, 0xAE03);
        assert_eq!(KVM_SET_NR_MMU_PAGES, 0xAE44);
        assert_eq!(KVM_PRE_FAULT_MEMORY, 0xC040_AED5);
        assert_eq!(KVM_CREATE_VM, 0xAE01);
        assert_eq!(KVM_CREATE_VCPU, 0xAE41);
        assert_eq!(KVM_CREATE_GUEST_MEMFD, 0xC040_AED4);
        assert_eq!(KVM_GET_STATS_FD, 0xAECE);
    }
}
