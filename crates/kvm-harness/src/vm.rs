//! VMs: creation by type, memslots (anonymous or guest_memfd-backed),
//! memory attributes, and vCPUs in long mode.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use guest_payloads::{layout, Payload, GUEST_RUNTIME};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_enable_cap, kvm_memory_attributes, kvm_regs, kvm_userspace_memory_region,
    kvm_userspace_memory_region2, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use nix::errno::Errno;

use crate::error::{Error, Result, SysResult};
use crate::fault_injection::{Failing, Injected, NthFault};
use crate::kvm::{Cap, Kvm, VmType};
use crate::liveness::dead;
use crate::memory::{GuestMemfd, HostMemory};
use crate::region::{GmemBinding, Region};
use crate::stats::Stats;
use crate::vcpu::Vcpu;
use crate::{uapi, watchdog, x86};

/// A VM: its fd, the memslots the harness installed, and the system memory
/// holding page tables, GDT, IDT, runtime and payload.
#[derive(Debug)]
pub struct Vm {
    kvm: Arc<Kvm>,
    fd: kvm_ioctls::VmFd,
    /// Shared with every vCPU: a vCPU fd keeps the kernel's VM (and its
    /// memslots) alive after this value is dropped, so the backing memory
    /// must live as long as the last vCPU.
    slots: Arc<Mutex<BTreeMap<u32, Region>>>,
    system: Option<Arc<HostMemory>>,
    payload: Option<&'static Payload>,
    timeout: Duration,
    /// The `KVM_CREATE_VM` type, for messages.
    vm_type: u64,
    /// Where the test that made this VM collects liveness failures: the VM
    /// fd is checked when the VM is dropped (see [`crate::liveness::Liveness`]).
    liveness: Option<Arc<crate::liveness::Liveness>>,
}

/// Slot id of the system memslot.
pub const SYSTEM_SLOT: u32 = 0;

impl Vm {
    /// A VM of `vm_type` with no memslots.
    pub fn bare(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<Self> {
        Self::with_raw_type(kvm, vm_type.raw())
    }

    /// `KVM_CREATE_VM` with any type value, for the VM-type rules.
    pub fn with_raw_type(kvm: &Arc<Kvm>, vm_type: u64) -> Result<Self> {
        Self::from_fd(kvm, kvm.create_vm_fd(vm_type)?, vm_type)
    }

    /// [`Self::bare`] with `failing` allocations failing.
    pub fn bare_failing(
        kvm: &Arc<Kvm>,
        fault: &NthFault,
        failing: Failing,
        vm_type: VmType,
    ) -> Result<Injected<Result<Self>>> {
        let call = kvm.create_vm_fd_failing(fault, failing, vm_type.raw())?;
        let outcome = match call.outcome {
            Ok(fd) => Ok(Self::from_fd(kvm, fd, vm_type.raw())?),
            Err(e) => Err(e),
        };
        Ok(Injected { outcome, injected: call.injected })
    }

    fn from_fd(kvm: &Arc<Kvm>, fd: kvm_ioctls::VmFd, vm_type: u64) -> Result<Self> {
        Ok(Self {
            kvm: kvm.clone(),
            fd,
            slots: Arc::new(Mutex::new(BTreeMap::new())),
            system: None,
            payload: None,
            timeout: watchdog::configured_timeout()?,
            vm_type,
            liveness: crate::liveness::Liveness::current(),
        })
    }

    /// Leaves this VM, and the vCPUs made from it from now on, out of the
    /// check at the end of the test ([`crate::liveness::Liveness`]): for a
    /// caller that checks liveness itself where it can name the step (the
    /// model, after every step), and whose failing runs leave dead VMs on
    /// purpose while it narrows a failure down.
    pub fn checked_by_caller(&mut self) {
        self.liveness = None;
    }

    /// Requires the VM to answer an ioctl that must succeed
    /// (`KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)` on the VM fd, which takes
    /// no lock). A VM KVM killed (`kvm_vm_dead()`, which `KVM_BUG_ON()`
    /// calls) fails every VM ioctl with EIO: `kvm_vm_ioctl()` checks
    /// `kvm->vm_dead` first.
    pub fn check_alive(&self) -> Result<()> {
        // SAFETY: KVM_CHECK_EXTENSION takes the capability number by value
        // and touches no user memory.
        let ret = unsafe {
            libc::ioctl(
                self.raw_fd(),
                uapi::KVM_CHECK_EXTENSION as _,
                kvm_bindings::KVM_CAP_USER_MEMORY as libc::c_ulong,
            )
        };
        match ret {
            1.. => Ok(()),
            0 => Err(Error::rule(
                "a live VM answers its ioctls",
                format!("KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the VM fd (type {:#x}) reported 0", self.vm_type),
            )),
            _ => Err(dead(
                "VM",
                format!("KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the VM fd (type {:#x})", self.vm_type),
                Errno::last(),
            )),
        }
    }

    /// A VM of `vm_type` ready to run `payload`: system memslot 0 at GPA 0
    /// with long-mode tables, the guest runtime and the payload loaded.
    pub fn with_payload(kvm: &Arc<Kvm>, vm_type: VmType, payload: &'static Payload) -> Result<Self> {
        let mut vm = Self::bare(kvm, vm_type)?;
        vm.load_payload(payload)?;
        Ok(vm)
    }

    /// Installs the system memslot with `payload` in a bare VM (the second
    /// half of [`Self::with_payload`], separate so the benchmark can time it).
    pub fn load_payload(&mut self, payload: &'static Payload) -> Result<()> {
        if self.system.is_some() {
            return Err(Error::Misuse("this VM already has its system memslot".into()));
        }
        let kvm = &self.kvm;
        let system = Arc::new(HostMemory::anonymous(layout::SYSTEM_SLOT_SIZE)?);
        // The guest touches a few dozen pages of it; a transparent huge page
        // would be 2 MiB to zero per VM (and to free), which under TCG costs
        // milliseconds. Where THP is off or unknown this changes nothing.
        let _ = system.madvise(libc::MADV_NOHUGEPAGE);
        x86::write_page_tables(&system);
        x86::write_gdt(&system);
        x86::write_idt(&system, &GUEST_RUNTIME);
        system.write(GUEST_RUNTIME.load_gpa, GUEST_RUNTIME.code);
        system.write(payload.load_gpa, payload.code);
        if let Some(&(_, site)) = payload.labels.iter().find(|(name, _)| *name == "hypercall") {
            // The payload is assembled with AMD's vmmcall; Intel needs vmcall.
            let insn: [u8; 3] = if kvm.is_amd_like()? { [0x0f, 0x01, 0xd9] } else { [0x0f, 0x01, 0xc1] };
            system.write(site, &insn);
        }
        self.set_region(&Region::new(SYSTEM_SLOT, 0, system.clone()))?;
        self.system = Some(system);
        self.payload = Some(payload);
        Ok(())
    }

    /// The `/dev/kvm` this VM came from.
    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    /// The raw VM fd (to check that the kernel rejects it where a guest_memfd belongs).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd.
    pub fn cap(&self, cap: Cap) -> i32 {
        self.fd.check_extension_raw(cap.raw().into())
    }

    /// `KVM_ENABLE_CAP` on the VM fd.
    pub fn enable_cap(&self, cap: Cap, args: [u64; 4]) -> Result<()> {
        let request = kvm_enable_cap { cap: cap.raw(), args, ..Default::default() };
        self.fd.enable_cap(&request).sys(|| format!("KVM_ENABLE_CAP({cap}, {args:#x?})"))
    }

    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<GuestMemfd> {
        let request = kvm_create_guest_memfd { size, flags, ..Default::default() };
        let fd = self
            .fd
            .create_guest_memfd(request)
            .sys(|| format!("KVM_CREATE_GUEST_MEMFD(size {size:#x}, flags {flags:#x})"))?;
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(GuestMemfd::new(fd, size, flags))
    }

    /// `KVM_CREATE_GUEST_MEMFD` when no fd can be installed (`RLIMIT_NOFILE`
    /// 0, in a child process): the kernel must fail it, without a new fd.
    pub fn create_guest_memfd_without_free_fds(&self, size: u64, flags: u64) -> Result<()> {
        let request = kvm_create_guest_memfd { size, flags, ..Default::default() };
        let op = format!("KVM_CREATE_GUEST_MEMFD(size {size:#x}, flags {flags:#x})");
        // SAFETY: the request's argument is the address of `request`, alive
        // until the child has exited.
        unsafe {
            crate::child::ioctl_without_free_fds(
                &op,
                self.raw_fd(),
                uapi::KVM_CREATE_GUEST_MEMFD,
                std::ptr::from_ref(&request) as u64,
            )
        }
    }

    /// Stops keeping slot `slot`'s guest_memfd open: once the caller drops
    /// its own handles the fd is closed while the memslot still binds it,
    /// the lifecycle `kvm_gmem_release()` exists for. The kernel owns the
    /// guest_memfd's memory, so no host memory goes away under the guest.
    pub fn forget_guest_memfd(&self, slot: u32) -> Result<()> {
        let mut slots = self.slots();
        let region = slots.get_mut(&slot).ok_or_else(|| Error::Misuse(format!("no memslot {slot:#x} to forget")))?;
        match region.guest_memfd.take() {
            Some((binding, offset)) => {
                region.guest_memfd = Some((GmemBinding::RawFd(binding.raw_fd()), offset));
                Ok(())
            }
            None => Err(Error::Misuse(format!("memslot {slot:#x} binds no guest_memfd"))),
        }
    }

    fn slots(&self) -> MutexGuard<'_, BTreeMap<u32, Region>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, region: &Region) {
        let mut slots = self.slots();
        if region.size == 0 {
            slots.remove(&region.slot);
        } else {
            slots.insert(region.slot, region.clone());
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION2` with `region`.
    pub fn set_region(&self, region: &Region) -> Result<()> {
        self.install(region, true)
    }

    /// `KVM_SET_USER_MEMORY_REGION` (v1) with `region`; a guest_memfd binding
    /// is not expressible there and is ignored.
    pub fn set_region_v1(&self, region: &Region) -> Result<()> {
        self.install(region, false)
    }

    /// Passes `region` to the kernel with the v2 or the v1 ioctl and, once
    /// accepted, records it so its backing lives as long as the slot.
    fn install(&self, region: &Region, v2: bool) -> Result<()> {
        let raw = region.raw()?;
        let (name, result) = if v2 {
            // SAFETY: userspace_addr is 0 or inside `region.memory`, which the
            // slot table keeps alive until the kernel drops the slot, so the
            // guest can only ever touch memory we own.
            ("KVM_SET_USER_MEMORY_REGION2", unsafe { self.fd.set_user_memory_region2(raw) })
        } else {
            let kvm_userspace_memory_region2 { slot, flags, guest_phys_addr, memory_size, userspace_addr, .. } = raw;
            let v1 = kvm_userspace_memory_region { slot, flags, guest_phys_addr, memory_size, userspace_addr };
            // SAFETY: as for v2: the backing outlives the slot.
            ("KVM_SET_USER_MEMORY_REGION", unsafe { self.fd.set_user_memory_region(v1) })
        };
        result.sys(|| format!("{name}({})", region.describe()))?;
        self.record(region);
        Ok(())
    }

    /// [`Self::set_region`] with `failing` allocations failing.
    pub fn set_region_failing(
        &self,
        fault: &NthFault,
        failing: Failing,
        region: &Region,
    ) -> Result<Injected<Result<()>>> {
        let raw = region.raw()?;
        // SAFETY: as in `install`: the slot table keeps the backing alive
        // once the kernel accepts the slot (recorded below).
        let call = fault.around(failing, || unsafe { self.fd.set_user_memory_region2(raw) })?;
        let call = call.map(|r| r.sys(|| format!("KVM_SET_USER_MEMORY_REGION2({})", region.describe())));
        if call.outcome.is_ok() {
            self.record(region);
        }
        Ok(call)
    }

    /// [`Self::create_guest_memfd`] with `failing` allocations failing.
    pub fn create_guest_memfd_failing(
        &self,
        fault: &NthFault,
        failing: Failing,
        size: u64,
        flags: u64,
    ) -> Result<Injected<Result<GuestMemfd>>> {
        let request = kvm_create_guest_memfd { size, flags, ..Default::default() };
        let call = fault.around(failing, || self.fd.create_guest_memfd(request))?;
        Ok(call.map(|r| {
            r.sys(|| format!("KVM_CREATE_GUEST_MEMFD(size {size:#x}, flags {flags:#x})")).map(|fd| {
                // SAFETY: the kernel just returned this fd to us and nothing else owns it.
                GuestMemfd::new(unsafe { OwnedFd::from_raw_fd(fd) }, size, flags)
            })
        }))
    }

    /// [`Self::set_memory_attributes`] with `failing` allocations failing.
    pub fn set_memory_attributes_failing(
        &self,
        fault: &NthFault,
        failing: Failing,
        gpa: u64,
        size: u64,
        attributes: u64,
    ) -> Result<Injected<Result<()>>> {
        let request = kvm_memory_attributes { address: gpa, size, attributes, flags: 0 };
        let call = fault.around(failing, || self.fd.set_memory_attributes(request))?;
        Ok(call.map(|r| {
            r.sys(|| format!("KVM_SET_MEMORY_ATTRIBUTES(gpa {gpa:#x}, size {size:#x}, attributes {attributes:#x})"))
        }))
    }

    /// Adds a slot of fresh anonymous memory; returns the host view of it.
    pub fn add_memory(&self, slot: u32, gpa: u64, size: u64) -> Result<Arc<HostMemory>> {
        let memory = Arc::new(HostMemory::anonymous(size)?);
        self.set_region(&Region::new(slot, gpa, memory.clone()))?;
        Ok(memory)
    }

    /// Adds a slot whose private view is `gmem` at `offset` and whose shared
    /// view is fresh anonymous memory; returns the shared view.
    pub fn add_private_memory(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        gmem: &Arc<GuestMemfd>,
        offset: u64,
    ) -> Result<Arc<HostMemory>> {
        let memory = Arc::new(HostMemory::anonymous(size)?);
        let region = Region::new(slot, gpa, memory.clone()).with_guest_memfd(GmemBinding::Memfd(gmem.clone()), offset);
        self.set_region(&region)?;
        Ok(memory)
    }

    /// Deletes slot `slot` (id including address space bits).
    pub fn delete_slot(&self, slot: u32) -> Result<()> {
        let region = self
            .slots()
            .get(&slot)
            .cloned()
            .ok_or_else(|| Error::Misuse(format!("slot {slot:#x} is not installed by the harness")))?;
        self.set_region(&region.deletion())
    }

    /// The installed slot containing `gpa` in address space 0.
    pub fn slot_at(&self, gpa: u64) -> Option<Region> {
        self.slots()
            .values()
            .find(|r| r.slot >> uapi::ADDRESS_SPACE_SHIFT == 0 && (r.gpa..r.gpa + r.size).contains(&gpa))
            .cloned()
    }

    /// The host's shared view of `[gpa, gpa + len)`: the backing memory and offset.
    pub fn shared_view(&self, gpa: u64, len: u64) -> Result<(Arc<HostMemory>, u64)> {
        let region = self.slot_at(gpa).ok_or_else(|| Error::Misuse(format!("no memslot at GPA {gpa:#x}")))?;
        if gpa + len > region.gpa + region.size {
            return Err(Error::Misuse(format!("[{gpa:#x}, +{len:#x}) crosses the end of its memslot")));
        }
        let memory = region.memory.ok_or_else(|| Error::Misuse(format!("slot at {gpa:#x} has no host memory")))?;
        Ok((memory, region.memory_offset + gpa - region.gpa))
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES` with flags 0.
    pub fn set_memory_attributes(&self, gpa: u64, size: u64, attributes: u64) -> Result<()> {
        self.set_memory_attributes_raw(kvm_memory_attributes { address: gpa, size, attributes, flags: 0 })
    }

    /// `KVM_SET_MEMORY_ATTRIBUTES` exactly as given.
    pub fn set_memory_attributes_raw(&self, request: kvm_memory_attributes) -> Result<()> {
        self.fd.set_memory_attributes(request).sys(|| {
            format!(
                "KVM_SET_MEMORY_ATTRIBUTES(gpa {:#x}, size {:#x}, attributes {:#x}, flags {:#x})",
                request.address, request.size, request.attributes, request.flags
            )
        })
    }

    /// Marks `[gpa, gpa + size)` private.
    pub fn make_private(&self, gpa: u64, size: u64) -> Result<()> {
        self.set_memory_attributes(gpa, size, u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE))
    }

    /// Marks `[gpa, gpa + size)` shared.
    pub fn make_shared(&self, gpa: u64, size: u64) -> Result<()> {
        self.set_memory_attributes(gpa, size, 0)
    }

    /// A vCPU with no state set up (for VMs without system memory).
    pub fn bare_vcpu(&self, id: u64) -> Result<Vcpu> {
        let fd = self.fd.create_vcpu(id).sys(|| format!("KVM_CREATE_VCPU({id})"))?;
        self.vcpu_from_fd(fd, id)
    }

    /// [`Self::bare_vcpu`] with `failing` allocations failing (in
    /// `KVM_CREATE_VCPU` only, not in the `kvm_run` mapping after it).
    pub fn bare_vcpu_failing(&self, fault: &NthFault, failing: Failing, id: u64) -> Result<Injected<Result<Vcpu>>> {
        let op = || format!("KVM_CREATE_VCPU({id})");
        // SAFETY: KVM_CREATE_VCPU takes the vCPU id as an integer argument.
        let call = unsafe { fault.ioctl_returning_fd(failing, self.raw_fd(), uapi::KVM_CREATE_VCPU, id, op) }?;
        Ok(call.map(|fd| {
            // SAFETY: the kernel just returned this vCPU fd to us and nothing else owns it.
            let fd = fd.and_then(|fd| unsafe { self.fd.create_vcpu_from_rawfd(fd) }.sys(op))?;
            self.vcpu_from_fd(fd, id)
        }))
    }

    fn vcpu_from_fd(&self, fd: kvm_ioctls::VcpuFd, id: u64) -> Result<Vcpu> {
        Ok(Vcpu {
            fd,
            id,
            system: self.system.clone(),
            payload: self.payload,
            timeout: self.timeout,
            mmap_size: self.kvm.vcpu_mmap_size()?,
            agent_parked: false,
            liveness: self.liveness.clone(),
            _memslots: self.slots.clone(),
        })
    }

    /// A vCPU in long mode at the payload's entry, with `args` in rdi, rsi,
    /// rdx, rcx, `r15` pointing at its mailbox and its own stack.
    pub fn vcpu(&self, id: u64, args: [u64; 4]) -> Result<Vcpu> {
        let payload =
            self.payload.ok_or_else(|| Error::Misuse("this VM has no payload; use Vm::with_payload".into()))?;
        if id >= layout::MAX_VCPUS {
            return Err(Error::Misuse(format!("vCPU id {id} exceeds the layout's {} vCPUs", layout::MAX_VCPUS)));
        }
        let vcpu = self.bare_vcpu(id)?;
        // Under SVM, KVM refuses EFER.LME until the guest CPUID is set.
        vcpu.fd.set_cpuid2(self.kvm.supported_cpuid()?).sys(|| format!("KVM_SET_CPUID2(vCPU {id})"))?;
        let mut sregs = vcpu.fd.get_sregs().sys(|| format!("KVM_GET_SREGS(vCPU {id})"))?;
        x86::set_long_mode(&mut sregs);
        vcpu.fd.set_sregs(&sregs).sys(|| format!("KVM_SET_SREGS(vCPU {id}, long mode)"))?;
        let regs = kvm_regs {
            rip: payload.entry,
            rsp: layout::STACKS_TOP - id * layout::STACK_SIZE,
            rflags: 0x2,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            rcx: args[3],
            r15: layout::MAILBOX_GPA + id * layout::MAILBOX_STRIDE,
            ..Default::default()
        };
        vcpu.set_regs(&regs)?;
        Ok(vcpu)
    }

    /// `KVM_SET_NR_MMU_PAGES`: the shadow-MMU page budget of this VM.
    pub fn set_nr_mmu_pages(&self, pages: u64) -> Result<()> {
        // SAFETY: the ioctl takes its argument by value and touches no user memory.
        let ret = unsafe { libc::ioctl(self.raw_fd(), uapi::KVM_SET_NR_MMU_PAGES as _, pages as libc::c_ulong) };
        if ret < 0 {
            return Err(Error::last_os(format!("KVM_SET_NR_MMU_PAGES({pages})")));
        }
        Ok(())
    }

    /// `KVM_GET_STATS_FD`: the VM's statistics, e.g. `pages_2m`, the
    /// number of 2 MiB mappings its MMU holds. The fd holds a reference
    /// to the VM.
    pub fn stats(&self) -> Result<Stats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
        let fd = unsafe { libc::ioctl(self.raw_fd(), uapi::KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(Error::last_os("KVM_GET_STATS_FD(VM)"));
        }
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        Stats::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Enables `KVM_EXIT_HYPERCALL` for `KVM_HC_MAP_GPA_RANGE`.
    pub fn enable_map_gpa_range_exits(&self) -> Result<()> {
        self.enable_cap(Cap::ExitHypercall, [1 << uapi::KVM_HC_MAP_GPA_RANGE, 0, 0, 0])
    }
}

impl Drop for Vm {
    /// At the end of a test the VM must still answer (see
    /// [`crate::liveness::Liveness`]): a VM KVM killed silently fails the
    /// test that made it.
    fn drop(&mut self) {
        if let Some(liveness) = &self.liveness {
            if let Err(e) = self.check_alive() {
                liveness.report(format!("when the test dropped it: {e}"));
            }
        }
    }
}
