//! The `/dev/kvm` system fd, capabilities and VM types.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use nix::errno::Errno;

use crate::error::{Error, Result, SysResult};
use crate::fault_injection::{Failing, Injected, NthFault};
use crate::uapi;

/// A KVM capability, including those kvm-ioctls' `Cap` enum lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cap {
    /// `KVM_CAP_NR_MEMSLOTS`
    NrMemslots,
    /// `KVM_CAP_READONLY_MEM`
    ReadonlyMem,
    /// `KVM_CAP_X86_SMM`
    X86Smm,
    /// `KVM_CAP_MULTI_ADDRESS_SPACE`
    MultiAddressSpace,
    /// `KVM_CAP_EXIT_HYPERCALL`
    ExitHypercall,
    /// `KVM_CAP_USER_MEMORY2`
    UserMemory2,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`
    MemoryAttributes,
    /// `KVM_CAP_GUEST_MEMFD`
    GuestMemfd,
    /// `KVM_CAP_VM_TYPES`
    VmTypes,
    /// `KVM_CAP_PRE_FAULT_MEMORY`
    PreFaultMemory,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS`
    GuestMemfdFlags,
    /// `KVM_CAP_DISABLE_QUIRKS2`: the quirks a VM may disable.
    DisableQuirks2,
    /// `KVM_CAP_SPLIT_IRQCHIP`: an in-kernel LAPIC, IOAPIC in userspace.
    SplitIrqchip,
    /// `KVM_CAP_SYNC_REGS`: the register sets `kvm_run` can carry.
    SyncRegs,
}

impl Cap {
    /// The capability number passed to `KVM_CHECK_EXTENSION`.
    pub fn raw(self) -> u32 {
        match self {
            Self::NrMemslots => kvm_bindings::KVM_CAP_NR_MEMSLOTS,
            Self::ReadonlyMem => kvm_bindings::KVM_CAP_READONLY_MEM,
            Self::X86Smm => kvm_bindings::KVM_CAP_X86_SMM,
            Self::MultiAddressSpace => kvm_bindings::KVM_CAP_MULTI_ADDRESS_SPACE,
            Self::ExitHypercall => kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
            Self::UserMemory2 => kvm_bindings::KVM_CAP_USER_MEMORY2,
            Self::MemoryAttributes => kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES,
            Self::GuestMemfd => kvm_bindings::KVM_CAP_GUEST_MEMFD,
            Self::VmTypes => kvm_bindings::KVM_CAP_VM_TYPES,
            Self::PreFaultMemory => kvm_bindings::KVM_CAP_PRE_FAULT_MEMORY,
            Self::GuestMemfdFlags => uapi::KVM_CAP_GUEST_MEMFD_FLAGS,
            Self::DisableQuirks2 => kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
            Self::SplitIrqchip => kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
            Self::SyncRegs => kvm_bindings::KVM_CAP_SYNC_REGS,
        }
    }

    /// The uAPI name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::NrMemslots => "KVM_CAP_NR_MEMSLOTS",
            Self::ReadonlyMem => "KVM_CAP_READONLY_MEM",
            Self::X86Smm => "KVM_CAP_X86_SMM",
            Self::MultiAddressSpace => "KVM_CAP_MULTI_ADDRESS_SPACE",
            Self::ExitHypercall => "KVM_CAP_EXIT_HYPERCALL",
            Self::UserMemory2 => "KVM_CAP_USER_MEMORY2",
            Self::MemoryAttributes => "KVM_CAP_MEMORY_ATTRIBUTES",
            Self::GuestMemfd => "KVM_CAP_GUEST_MEMFD",
            Self::VmTypes => "KVM_CAP_VM_TYPES",
            Self::PreFaultMemory => "KVM_CAP_PRE_FAULT_MEMORY",
            Self::GuestMemfdFlags => "KVM_CAP_GUEST_MEMFD_FLAGS",
            Self::DisableQuirks2 => "KVM_CAP_DISABLE_QUIRKS2",
            Self::SplitIrqchip => "KVM_CAP_SPLIT_IRQCHIP",
            Self::SyncRegs => "KVM_CAP_SYNC_REGS",
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An x86 VM type (`KVM_CREATE_VM` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmType {
    /// `KVM_X86_DEFAULT_VM`
    Default,
    /// `KVM_X86_SW_PROTECTED_VM`: private memory without hardware encryption.
    SwProtected,
}

impl VmType {
    /// Both types this suite knows how to run.
    pub const ALL: [VmType; 2] = [VmType::Default, VmType::SwProtected];

    /// The `KVM_CREATE_VM` argument.
    pub fn raw(self) -> u64 {
        match self {
            Self::Default => u64::from(kvm_bindings::KVM_X86_DEFAULT_VM),
            Self::SwProtected => u64::from(kvm_bindings::KVM_X86_SW_PROTECTED_VM),
        }
    }

    /// The uAPI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "KVM_X86_DEFAULT_VM",
            Self::SwProtected => "KVM_X86_SW_PROTECTED_VM",
        }
    }

    /// A short name for test names: `default`, `sw_protected`.
    pub fn short(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::SwProtected => "sw_protected",
        }
    }
}

impl fmt::Display for VmType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `/dev/kvm` system fd.
#[derive(Debug)]
pub struct Kvm {
    fd: kvm_ioctls::Kvm,
    supported_cpuid: OnceLock<CpuId>,
    vcpu_mmap_size: OnceLock<usize>,
}

/// Path of the KVM device.
pub const KVM_PATH: &str = "/dev/kvm";

impl Kvm {
    /// Opens `/dev/kvm`.
    pub fn open() -> Result<Self> {
        let fd = kvm_ioctls::Kvm::new()
            .map_err(|e| Error::Sys { op: format!("open({KVM_PATH})"), errno: Errno::from_raw(e.errno()) })?;
        Ok(Self { fd, supported_cpuid: OnceLock::new(), vcpu_mmap_size: OnceLock::new() })
    }

    /// `KVM_CHECK_EXTENSION` on the system fd.
    pub fn cap(&self, cap: Cap) -> i32 {
        self.fd.check_extension_raw(cap.raw().into())
    }

    /// The `KVM_CAP_VM_TYPES` bitmap.
    pub fn vm_types(&self) -> u64 {
        self.cap(Cap::VmTypes) as u32 as u64
    }

    /// Whether `KVM_CAP_VM_TYPES` advertises `vm_type`.
    pub fn supports(&self, vm_type: VmType) -> bool {
        // Kernels before KVM_CAP_VM_TYPES report 0 and know only the default type.
        (vm_type == VmType::Default && self.vm_types() == 0) || self.vm_types() & (1 << vm_type.raw()) != 0
    }

    /// `KVM_CREATE_VM` with a raw type, returning the kernel's verdict.
    pub(crate) fn create_vm_fd(&self, vm_type: u64) -> Result<kvm_ioctls::VmFd> {
        self.fd.create_vm_with_type(vm_type).sys(|| format!("KVM_CREATE_VM(type {vm_type:#x})"))
    }

    /// [`Self::create_vm_fd`] with `failing` allocations failing.
    pub(crate) fn create_vm_fd_failing(
        &self,
        fault: &NthFault,
        failing: Failing,
        vm_type: u64,
    ) -> Result<Injected<Result<kvm_ioctls::VmFd>>> {
        let op = || format!("KVM_CREATE_VM(type {vm_type:#x})");
        // SAFETY: KVM_CREATE_VM takes the type as an integer argument.
        let call = unsafe { fault.ioctl_returning_fd(failing, self.fd.as_raw_fd(), uapi::KVM_CREATE_VM, vm_type, op) }?;
        Ok(call.map(|fd| {
            // SAFETY: the kernel just returned this VM fd to us and nothing else owns it.
            fd.and_then(|fd| unsafe { self.fd.create_vmfd_from_rawfd(fd) }.sys(op))
        }))
    }

    /// `KVM_CREATE_VM(vm_type)` when no fd can be installed (`RLIMIT_NOFILE`
    /// 0, in a child process): the kernel must fail it, without a new fd.
    pub fn create_vm_without_free_fds(&self, vm_type: u64) -> Result<()> {
        // SAFETY: KVM_CREATE_VM takes the type as an integer argument.
        unsafe {
            crate::child::ioctl_without_free_fds(
                &format!("KVM_CREATE_VM(type {vm_type:#x})"),
                self.fd.as_raw_fd(),
                uapi::KVM_CREATE_VM,
                vm_type,
            )
        }
    }

    /// `KVM_GET_VCPU_MMAP_SIZE`, cached: the size of each vCPU's `kvm_run`
    /// mapping, which bounds where an exit's data may lie.
    pub(crate) fn vcpu_mmap_size(&self) -> Result<usize> {
        if let Some(size) = self.vcpu_mmap_size.get() {
            return Ok(*size);
        }
        let size = self.fd.get_vcpu_mmap_size().sys(|| "KVM_GET_VCPU_MMAP_SIZE".to_string())?;
        Ok(*self.vcpu_mmap_size.get_or_init(|| size))
    }

    /// The CPUID KVM supports, cached.
    pub fn supported_cpuid(&self) -> Result<&CpuId> {
        if let Some(cpuid) = self.supported_cpuid.get() {
            return Ok(cpuid);
        }
        let cpuid = self.fd.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).sys(|| "KVM_GET_SUPPORTED_CPUID".to_string())?;
        Ok(self.supported_cpuid.get_or_init(|| cpuid))
    }

    /// The guest physical address width KVM supports (CPUID
    /// 0x80000008 EAX[7:0], what upstream's selftests take as `pa_bits`).
    pub fn guest_phys_bits(&self) -> Result<u32> {
        let cpuid = self.supported_cpuid()?;
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map(|e| e.eax & 0xff)
            .filter(|bits| (32..=52).contains(bits))
            .ok_or_else(|| Error::misuse("KVM_GET_SUPPORTED_CPUID has no usable leaf 0x80000008 (MAXPHYADDR)"))
    }

    /// Whether the CPU vendor is AMD or Hygon (SVM: `vmmcall`, not `vmcall`).
    pub(crate) fn is_amd_like(&self) -> Result<bool> {
        let cpuid = self.supported_cpuid()?;
        let leaf0 = cpuid.as_slice().iter().find(|e| e.function == 0);
        Ok(leaf0.is_some_and(|e| {
            let vendor: Vec<u8> = [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
            vendor == b"AuthenticAMD" || vendor == b"HygonGenuine"
        }))
    }
}
