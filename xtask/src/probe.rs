//! `xtask guest-probe`: run inside the guest before the tests to tell a
//! kernel that lacks the features under test (a bisection "skip") apart from
//! a test failure.

use std::sync::Arc;

use kvm_harness::{Cap, Kvm, Vm, VmType};

use crate::error::{Error, Result};

/// Check that a software-protected VM can be created; returns a one-line
/// description of what was found.
pub fn probe() -> Result<String> {
    let kvm = Arc::new(Kvm::open().map_err(|e| Error::Probe(e.to_string()))?);
    let types = kvm.vm_types();
    if !kvm.supports(VmType::SwProtected) {
        return Err(Error::Probe(format!("{} = {types:#x} does not include {}", Cap::VmTypes, VmType::SwProtected)));
    }
    Vm::bare(&kvm, VmType::SwProtected).map_err(|e| Error::Probe(e.to_string()))?;
    Ok(format!("{} = {types:#x}, protected VM created", Cap::VmTypes))
}
