//! Requests the memslot scenarios need beyond the VM builder: completing an
//! emulated MMIO read, and `KVM_SET_NR_MMU_PAGES`.

use crate::error::{Error, Result};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// `KVM_SET_NR_MMU_PAGES`: `_IO(KVMIO, 0x44)` (include/uapi/linux/kvm.h).
pub const KVM_SET_NR_MMU_PAGES: u64 = 0xAE44;

impl Vcpu {
    /// Supplies the value a guest MMIO read returns: copies `data` into
    /// `kvm_run.mmio.data` before the next `KVM_RUN`.
    pub fn complete_mmio_read(&mut self, data: &[u8]) -> Result<()> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != kvm_bindings::KVM_EXIT_MMIO {
            return Err(Error::Misuse(format!("vCPU {} is not in an MMIO exit", self.id)));
        }
        // SAFETY: the exit reason (checked above) says the mmio member of the
        // union is the live one; it is plain old data.
        let mut mmio = unsafe { run.__bindgen_anon_1.mmio };
        let n = data.len().min(mmio.data.len()).min(mmio.len as usize);
        mmio.data[..n].copy_from_slice(&data[..n]);
        run.__bindgen_anon_1.mmio = mmio;
        Ok(())
    }
}

impl Vm {
    /// `KVM_SET_NR_MMU_PAGES`: the shadow-MMU page budget of this VM.
    pub fn set_nr_mmu_pages(&self, pages: u64) -> Result<()> {
        // SAFETY: the ioctl takes its argument by value and touches no user memory.
        let ret = unsafe { libc::ioctl(self.raw_fd(), KVM_SET_NR_MMU_PAGES as _, pages as libc::c_ulong) };
        if ret < 0 {
            return Err(Error::last_os(format!("KVM_SET_NR_MMU_PAGES({pages})")));
        }
        Ok(())
    }
}
