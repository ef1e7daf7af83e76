//! `xtask guest-probe`: run inside the guest before the tests to tell a
//! kernel that lacks the features under test (a bisection "skip") apart from
//! a test failure.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};

const KVMIO: libc::c_ulong = 0xAE;
const KVM_CREATE_VM: libc::c_ulong = KVMIO << 8 | 0x01;
const KVM_CHECK_EXTENSION: libc::c_ulong = KVMIO << 8 | 0x03;
const KVM_CAP_VM_TYPES: libc::c_ulong = 235;
const KVM_X86_SW_PROTECTED_VM: libc::c_ulong = 1;

/// Check that a software-protected VM can be created; returns a one-line
/// description of what was found.
pub fn probe() -> Result<String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| Error::Probe(format!("cannot open /dev/kvm: {e}")))?;
    // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and touches no
    // memory of ours; the fd is valid for the duration of the call.
    let types = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES) };
    if types < 0 || types & (1 << KVM_X86_SW_PROTECTED_VM) == 0 {
        return Err(Error::Probe(format!("KVM_CAP_VM_TYPES = {types:#x} does not include KVM_X86_SW_PROTECTED_VM")));
    }
    // SAFETY: KVM_CREATE_VM takes the VM type by value and returns a new fd.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, KVM_X86_SW_PROTECTED_VM) };
    if vm < 0 {
        let err = std::io::Error::last_os_error();
        return Err(Error::Probe(format!("KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM): {err}")));
    }
    // SAFETY: the ioctl just returned this fd and nothing else owns it.
    drop(unsafe { OwnedFd::from_raw_fd(vm) });
    Ok(format!("KVM_CAP_VM_TYPES={types:#x}, protected VM created"))
}
