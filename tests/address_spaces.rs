//! Rule family 2: memslot address spaces. Protected VMs have exactly one
//! (no SMM, see `kvm_arch_nr_memslot_as_ids()`); a default VM on a kernel
//! with SMM has two. The slot id carries the address space in bits 16..32.

use std::process::ExitCode;
use std::sync::Arc;

use kvm_harness::{ensure, expect_errno, expect_ok, Cap, Errno, Kvm, Need, Result, Suite, Vm, VmType};
use kvm_selftests::valid_region;

/// Address spaces a VM fd reports (0 means the capability is absent: one).
fn nr_address_spaces(vm: &Vm) -> u16 {
    vm.cap(Cap::MultiAddressSpace).max(1) as u16
}

/// A slot in `as_id` is refused with EINVAL, while the identical slot in
/// address space 0 is accepted: only the address space can be at fault.
fn rejects_address_space(kvm: &Arc<Kvm>, vm_type: VmType, as_id: AsId) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let nr = nr_address_spaces(&vm);
    let as_id = as_id.resolve(nr);
    let region = valid_region(0, 0)?;
    expect_errno(
        &format!("{vm_type} with {} = {nr} rejects a memslot in address space {as_id}", Cap::MultiAddressSpace),
        Errno::EINVAL,
        || vm.set_region(&region.clone().in_address_space(as_id)),
    )?;
    expect_ok(&format!("{vm_type} accepts the same memslot in address space 0"), || vm.set_region(&region))
}

/// Which address space id a rejection test uses.
#[derive(Debug, Clone, Copy)]
enum AsId {
    /// The first id past the advertised count.
    FirstPastCount,
    /// A fixed id.
    Fixed(u16),
}

impl AsId {
    fn resolve(self, nr: u16) -> u16 {
        match self {
            Self::FirstPastCount => nr,
            Self::Fixed(id) => id,
        }
    }
}

fn sw_protected_vm_reports_single_address_space(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let nr = vm.cap(Cap::MultiAddressSpace);
    ensure!(nr == 1, "a KVM_X86_SW_PROTECTED_VM has one memslot address space", "{} = {nr}", Cap::MultiAddressSpace);
    Ok(())
}

fn sw_protected_vm_rejects_second_address_space(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    let region = valid_region(0, 0)?;
    expect_errno("a KVM_X86_SW_PROTECTED_VM rejects a memslot in address space 1 (SMM)", Errno::EINVAL, || {
        vm.set_region(&region.clone().in_address_space(1))
    })
}

fn sw_protected_vm_accepts_address_space_zero(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::SwProtected)?;
    expect_ok("a KVM_X86_SW_PROTECTED_VM accepts a memslot in address space 0", || vm.set_region(&valid_region(0, 0)?))
}

fn default_vm_with_smm_reports_two_address_spaces(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    let nr = vm.cap(Cap::MultiAddressSpace);
    ensure!(
        nr == 2,
        "with KVM_CAP_X86_SMM, a KVM_X86_DEFAULT_VM has two memslot address spaces (normal + SMM)",
        "{} = {nr} (KVM_CAP_X86_SMM = {})",
        Cap::MultiAddressSpace,
        kvm.cap(Cap::X86Smm)
    );
    Ok(())
}

fn default_vm_with_smm_accepts_second_address_space(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    expect_ok("with KVM_CAP_X86_SMM, a KVM_X86_DEFAULT_VM accepts a memslot in address space 1", || {
        vm.set_region(&valid_region(0, 0)?.in_address_space(1))
    })
}

fn address_space_count_matches_smm_support(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::bare(kvm, VmType::Default)?;
    let (smm, nr) = (kvm.cap(Cap::X86Smm), vm.cap(Cap::MultiAddressSpace));
    // x86 has a second address space only for SMM (KVM_MAX_NR_ADDRESS_SPACES).
    ensure!(
        (smm != 0) == (nr == 2),
        "a default VM has two address spaces exactly when KVM_CAP_X86_SMM is set",
        "KVM_CAP_X86_SMM = {smm}, {} on the VM fd = {nr}",
        Cap::MultiAddressSpace
    );
    Ok(())
}

/// kvm_vm_ioctl_check_extension_generic(): `/dev/kvm` reports the most
/// address spaces any VM may have (KVM_MAX_NR_ADDRESS_SPACES), each VM fd
/// its own; no VM type may have more than the system reports.
fn system_address_space_count_bounds_every_vm_type(kvm: &Arc<Kvm>) -> Result<()> {
    let system = kvm.cap(Cap::MultiAddressSpace).max(1);
    let smm = kvm.cap(Cap::X86Smm) != 0;
    ensure!(
        system == if smm { 2 } else { 1 },
        "/dev/kvm reports two address spaces exactly when KVM_CAP_X86_SMM is set",
        "KVM_CAP_X86_SMM = {}, {} on /dev/kvm = {system}",
        u8::from(smm),
        Cap::MultiAddressSpace
    );
    for vm_type in VmType::ALL.into_iter().filter(|t| kvm.supports(*t)) {
        let nr = i32::from(nr_address_spaces(&Vm::bare(kvm, vm_type)?));
        ensure!(
            nr <= system,
            format!("a {vm_type} has no more address spaces than /dev/kvm reports"),
            "{} = {nr} on the VM fd, {system} on /dev/kvm",
            Cap::MultiAddressSpace
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    let protected = || vec![Need::VmType(VmType::SwProtected)];

    kvm_harness::register!(suite, protected() =>
        sw_protected_vm_reports_single_address_space,
        sw_protected_vm_rejects_second_address_space,
        sw_protected_vm_accepts_address_space_zero,
    );
    kvm_harness::register!(suite, vec![Need::Cap(Cap::X86Smm)] =>
        default_vm_with_smm_reports_two_address_spaces,
        default_vm_with_smm_accepts_second_address_space,
    );
    kvm_harness::register!(suite, vec![] =>
        address_space_count_matches_smm_support,
        system_address_space_count_bounds_every_vm_type,
    );
    for (label, as_id) in
        [("first_past_count", AsId::FirstPastCount), ("0x8000", AsId::Fixed(0x8000)), ("0xffff", AsId::Fixed(0xffff))]
    {
        suite.per_vm_type(
            &format!("rejects_address_space_{label}"),
            |_| vec![],
            move |kvm, vm_type| rejects_address_space(kvm, vm_type, as_id),
        );
    }
    suite.run()
}
