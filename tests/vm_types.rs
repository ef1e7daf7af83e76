//! Rule family 1: VM types (`KVM_CAP_VM_TYPES`) and what each type reports.
//!
//! Ported from the VM-type checks of upstream's private-memory selftests and
//! from `kvm_arch_init_vm()` / `kvm_vm_ioctl_check_extension_generic()`.

use std::process::ExitCode;
use std::sync::Arc;

use guest_payloads::{layout, SYNC_ROUNDTRIP};
use kvm_harness::bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE;
use kvm_harness::{
    ensure, expect_errno, expect_ok, page_size, Cap, Errno, Error, GmemBinding, Kvm, Need, Result, Suite, Vm, VmType,
};
use kvm_selftests::valid_region;

/// `KVM_CREATE_VM(n)` succeeds exactly when bit n of `KVM_CAP_VM_TYPES` is set,
/// and fails with EINVAL otherwise.
fn create_vm_matches_vm_types_bit(kvm: &Arc<Kvm>, n: u64) -> Result<()> {
    let advertised = kvm.vm_types() & (1 << n) != 0;
    let rule = format!("KVM_CREATE_VM({n}) succeeds iff bit {n} of KVM_CAP_VM_TYPES ({:#x}) is set", kvm.vm_types());
    match (advertised, Vm::with_raw_type(kvm, n)) {
        (true, Ok(_)) => Ok(()),
        (false, Err(e)) if e.errno() == Some(Errno::EINVAL) => Ok(()),
        (true, Err(e)) => Err(Error::rule(rule, format!("type is advertised but {e}"))),
        (false, Ok(_)) => Err(Error::rule(rule, "type is not advertised but the VM was created")),
        (false, Err(e)) => Err(Error::rule(rule, format!("expected EINVAL for an unadvertised type, got {e}"))),
    }
}

/// Builds a VM of `vm_type` and checks `SYNC` values come back intact.
fn payload_runs(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::with_payload(kvm, vm_type, &SYNC_ROUNDTRIP)?;
    let seed = 0x0123_4567_89ab_cdef_u64;
    let mut vcpu = vm.vcpu(0, [seed, 0, 0, 0])?;
    vcpu.expect_sync(seed)?;
    vcpu.expect_sync(!seed)?;
    vcpu.expect_sync(seed.rotate_left(17))?;
    vcpu.expect_done()
}

/// `KVM_CAP_GUEST_MEMFD` on a VM fd says whether guest_memfd memslots work on
/// that VM: 6.12 reports `kvm_arch_has_private_mem()`, newer kernels 1 for
/// every VM that accepts them. Checked both ways against a real binding.
fn guest_memfd_cap_matches_binding(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let advertised = vm.cap(Cap::GuestMemfd) != 0;
    let size = kvm_selftests::SLOT_SIZE;
    let bound = vm.create_guest_memfd(size, 0).and_then(|gmem| {
        let region = valid_region(1, layout::TEST_AREA_GPA)?.with_guest_memfd(GmemBinding::Memfd(Arc::new(gmem)), 0);
        vm.set_region(&region)
    });
    let rule = format!("{vm_type}: {} on the VM fd matches whether a guest_memfd memslot binds", Cap::GuestMemfd);
    match (advertised, bound) {
        (true, Ok(())) => Ok(()),
        (false, Err(e)) if e.errno() == Some(Errno::EINVAL) => Ok(()),
        (true, Err(e)) => Err(Error::rule(rule, format!("advertised as {} but {e}", vm.cap(Cap::GuestMemfd)))),
        (false, Ok(())) => Err(Error::rule(rule, "reported 0 but the guest_memfd memslot was accepted")),
        (false, Err(e)) => {
            Err(Error::rule(rule, format!("reported 0; expected the binding to fail with EINVAL, got {e}")))
        }
    }
}

fn vm_types_always_advertises_default_vm(kvm: &Arc<Kvm>) -> Result<()> {
    let types = kvm.vm_types();
    // Kernels before KVM_CAP_VM_TYPES report 0 and support only type 0.
    ensure!(types == 0 || types & 1 != 0, "KVM_CAP_VM_TYPES includes KVM_X86_DEFAULT_VM", "got {types:#x}");
    Ok(())
}

fn sw_protected_vm_reports_private_memory_attribute(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let attrs = vm.cap(Cap::MemoryAttributes) as u64;
    ensure!(
        attrs & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0,
        "a KVM_X86_SW_PROTECTED_VM supports KVM_MEMORY_ATTRIBUTE_PRIVATE",
        "KVM_CAP_MEMORY_ATTRIBUTES on the VM fd = {attrs:#x}"
    );
    Ok(())
}

fn default_vm_reports_no_private_memory_attribute(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    let attrs = vm.cap(Cap::MemoryAttributes) as u64;
    ensure!(
        attrs & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) == 0,
        "a KVM_X86_DEFAULT_VM has no private memory",
        "KVM_CAP_MEMORY_ATTRIBUTES on the VM fd = {attrs:#x}"
    );
    Ok(())
}

fn default_vm_rejects_private_memory_attribute(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    // The ioctl exists when /dev/kvm reports any attribute; without it the
    // VM ioctl falls through to ENOTTY.
    let (expected, rule) = match kvm.cap(Cap::MemoryAttributes) {
        0 => (Errno::ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES is absent when /dev/kvm reports no attributes"),
        _ => (Errno::EINVAL, "KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) is refused on a VM without private memory"),
    };
    expect_errno(rule, expected, || vm.make_private(0, page_size()))
}

fn sw_protected_vm_reports_guest_memfd(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let cap = vm.cap(Cap::GuestMemfd);
    ensure!(cap == 1, "a KVM_X86_SW_PROTECTED_VM reports KVM_CAP_GUEST_MEMFD = 1", "VM fd reports {cap}");
    Ok(())
}

/// kvm_dev_ioctl_create_vm() reserves the VM's fd first: with no fd free
/// the request fails with EMFILE, while the identical request succeeds with
/// one free.
fn create_vm_without_free_fd_fails_with_emfile(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    expect_errno(&format!("KVM_CREATE_VM({vm_type}) with no fd free fails with EMFILE"), Errno::EMFILE, || {
        kvm.create_vm_without_free_fds(vm_type.raw())
    })?;
    expect_ok(&format!("the same KVM_CREATE_VM({vm_type}) succeeds with fds free"), || Vm::bare(kvm, vm_type)).map(drop)
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));

    for n in 0..64u64 {
        suite.test(format!("create_vm_type_{n:02}_succeeds_iff_advertised"), vec![], move |kvm| {
            create_vm_matches_vm_types_bit(kvm, n)
        });
    }
    for (label, ty) in [("64", 64u64), ("1_shl_32", 1 << 32), ("u64_max", u64::MAX)] {
        suite.test(format!("create_vm_rejects_type_{label}"), vec![], move |kvm| {
            expect_errno(&format!("KVM_CREATE_VM({ty:#x}) names no VM type"), Errno::EINVAL, || {
                Vm::with_raw_type(kvm, ty).map(|_| ())
            })
        });
    }
    kvm_harness::register!(suite, vec![] => vm_types_always_advertises_default_vm);
    kvm_harness::register!(suite, vec![Need::VmType(VmType::SwProtected)] =>
        sw_protected_vm_reports_private_memory_attribute,
    );
    kvm_harness::register!(suite, vec![] =>
        default_vm_reports_no_private_memory_attribute,
        default_vm_rejects_private_memory_attribute,
    );
    kvm_harness::register!(suite, vec![Need::VmType(VmType::SwProtected)] => sw_protected_vm_reports_guest_memfd);
    suite.per_vm_type(
        "create_without_free_fd_fails_with_emfile",
        |_| vec![],
        create_vm_without_free_fd_fails_with_emfile,
    );
    suite.per_vm_type(
        "guest_memfd_cap_matches_slot_binding",
        |_| vec![Need::Cap(Cap::GuestMemfd)],
        guest_memfd_cap_matches_binding,
    );
    suite.per_vm_type("payload_syncs_round_trip", |_| vec![], payload_runs);
    suite.run()
}
