//! vCPU state ioctls (`KVM_{GET,SET}_{SREGS,XCRS,MP_STATE}`, `KVM_GET_CPUID2`)
//! and completing a guest's port read.

use kvm_bindings::{kvm_mp_state, kvm_sregs, kvm_xcrs, CpuId};

use crate::error::{Error, Result, SysResult};
use crate::vcpu::Vcpu;

impl Vcpu {
    /// `KVM_GET_SREGS`.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().sys(|| format!("KVM_GET_SREGS(vCPU {})", self.id))
    }

    /// `KVM_SET_SREGS`.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).sys(|| format!("KVM_SET_SREGS(vCPU {})", self.id))
    }

    /// `KVM_GET_XCRS`.
    pub fn xcrs(&self) -> Result<kvm_xcrs> {
        self.fd.get_xcrs().sys(|| format!("KVM_GET_XCRS(vCPU {})", self.id))
    }

    /// `KVM_SET_XCRS` with `xcrs` exactly as given (any `nr_xcrs` and flags).
    pub fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<()> {
        self.fd
            .set_xcrs(xcrs)
            .sys(|| format!("KVM_SET_XCRS(vCPU {}, nr_xcrs {}, flags {:#x})", self.id, xcrs.nr_xcrs, xcrs.flags))
    }

    /// `KVM_GET_MP_STATE`.
    pub fn mp_state(&self) -> Result<u32> {
        self.fd.get_mp_state().map(|s| s.mp_state).sys(|| format!("KVM_GET_MP_STATE(vCPU {})", self.id))
    }

    /// `KVM_SET_MP_STATE`.
    pub fn set_mp_state(&self, mp_state: u32) -> Result<()> {
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .sys(|| format!("KVM_SET_MP_STATE(vCPU {}, {mp_state})", self.id))
    }

    /// `KVM_GET_CPUID2` into a buffer of `capacity` entries.
    pub fn cpuid(&self, capacity: usize) -> Result<CpuId> {
        self.fd.get_cpuid2(capacity).sys(|| format!("KVM_GET_CPUID2(vCPU {}, room for {capacity} entries)", self.id))
    }

    /// Supplies the bytes a guest port read (`KVM_EXIT_IO`, direction IN)
    /// returns: copies `data` (exactly `size * count` bytes) into the
    /// `kvm_run` data area before the next `KVM_RUN`.
    pub fn complete_pio_in(&mut self, data: &[u8]) -> Result<()> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_IO {
            return Err(Error::Misuse(format!("vCPU {} is not in a port-I/O exit", self.id)));
        }
        // SAFETY: the exit reason (checked above) says the io member is live.
        let io = unsafe { run.__bindgen_anon_1.io };
        let wanted = usize::from(io.size) * io.count as usize;
        if u32::from(io.direction) != kvm_bindings::KVM_EXIT_IO_IN || data.len() != wanted {
            return Err(Error::Misuse(format!(
                "vCPU {}: {} bytes for a port exit of direction {} wanting {wanted}",
                self.id,
                data.len(),
                io.direction
            )));
        }
        let base: *mut u8 = std::ptr::from_mut(run).cast();
        // SAFETY: data_offset points inside the kvm_run mapping, which has
        // room for size * count bytes there (the KVM_EXIT_IO contract).
        let dst = unsafe { base.add(io.data_offset as usize) };
        // SAFETY: dst has `wanted` writable bytes (above); `data` is exactly
        // that long and does not overlap the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, wanted) };
        Ok(())
    }
}
