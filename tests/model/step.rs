//! The steps of a sequence, what each one needs and touches (decided by
//! exhaustive `match`es, so a new step kind cannot be left out), and what
//! the model says each one does.

use super::*;

/// One operation of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// `KVM_CREATE_GUEST_MEMFD(size, flags)`.
    CreateGmem { size: u64, flags: u64 },
    /// `KVM_SET_USER_MEMORY_REGION2`.
    SetRegion(MemoryRegion),
    /// `KVM_SET_MEMORY_ATTRIBUTES`.
    SetAttributes { address: u64, size: u64, attributes: u64, flags: u64 },
    /// The host closes guest_memfd `gmem`'s fd and unmaps its mapping.
    CloseGmem { gmem: usize },
    /// `fallocate()` on guest_memfd `gmem`.
    Fallocate { gmem: usize, mode: Fallocate, offset: u64, len: u64 },
    /// The guest reads the u64 at `gpa`.
    GuestRead { gpa: u64 },
    /// The guest writes `value` at `gpa`.
    GuestWrite { gpa: u64, value: u64 },
    /// The guest calls the code at `gpa` (an instruction fetch).
    GuestExec { gpa: u64 },
    /// The host reads the u64 at `offset` of guest_memfd `gmem`'s mapping.
    HostRead { gmem: usize, offset: u64 },
    /// `KVM_PRE_FAULT_MEMORY` on the agent's vCPU.
    PreFault { gpa: u64, size: u64, flags: u64 },
    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, [mask])`.
    HypercallExits { mask: u64 },
    /// The guest's `KVM_HC_MAP_GPA_RANGE`; the VMM answers an exit by
    /// applying the attributes ([`vmm_attributes`]).
    MapGpaRange { gpa: u64, npages: u64, attrs: u64 },
    /// The host writes `value` at `offset` of a mapping.
    HostWrite { mem: ModelMemory, offset: u64, value: u64 },
    /// The host closes the VM fd; the agent's vCPU and the guest_memfds
    /// still hold the VM (kvm_vm_release() only drops a reference), so
    /// nothing the guest or a guest_memfd sees may change.
    CloseVm,
}

impl Step {
    /// The variant's name, for the tally.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Step::CreateGmem { .. } => "CreateGmem",
            Step::SetRegion(_) => "SetRegion",
            Step::SetAttributes { .. } => "SetAttributes",
            Step::Fallocate { .. } => "Fallocate",
            Step::CloseGmem { .. } => "CloseGmem",
            Step::GuestRead { .. } => "GuestRead",
            Step::GuestWrite { .. } => "GuestWrite",
            Step::GuestExec { .. } => "GuestExec",
            Step::PreFault { .. } => "PreFault",
            Step::HypercallExits { .. } => "HypercallExits",
            Step::MapGpaRange { .. } => "MapGpaRange",
            Step::HostWrite { .. } => "HostWrite",
            Step::HostRead { .. } => "HostRead",
            Step::CloseVm => "CloseVm",
        }
    }

    /// Whether the step is a call on the VM fd, which a `CloseVm` step
    /// before it closed: the generator never places it after one.
    pub(crate) fn needs_vm_fd(&self) -> bool {
        match self {
            Step::CreateGmem { .. }
            | Step::SetRegion(_)
            | Step::SetAttributes { .. }
            | Step::HypercallExits { .. }
            | Step::MapGpaRange { .. }
            | Step::CloseVm => true,
            Step::CloseGmem { .. }
            | Step::Fallocate { .. }
            | Step::GuestRead { .. }
            | Step::GuestWrite { .. }
            | Step::GuestExec { .. }
            | Step::HostRead { .. }
            | Step::PreFault { .. }
            | Step::HostWrite { .. } => false,
        }
    }

    /// Whether the step runs the guest (`KVM_RUN` through the agent): its
    /// time is the guest's, and KVM's huge mappings are counted after it.
    pub(crate) fn runs_guest(&self) -> bool {
        match self {
            Step::GuestRead { .. } | Step::GuestWrite { .. } | Step::GuestExec { .. } | Step::MapGpaRange { .. } => {
                true
            }
            Step::CreateGmem { .. }
            | Step::SetRegion(_)
            | Step::SetAttributes { .. }
            | Step::CloseGmem { .. }
            | Step::Fallocate { .. }
            | Step::HostRead { .. }
            | Step::PreFault { .. }
            | Step::HypercallExits { .. }
            | Step::HostWrite { .. }
            | Step::CloseVm => false,
        }
    }

    /// Whether the step needs the agent's vCPU: the guest steps and
    /// `KVM_PRE_FAULT_MEMORY`, a vCPU ioctl.
    pub(crate) fn needs_vcpu(&self) -> bool {
        match self {
            Step::PreFault { .. } => true,
            other => other.runs_guest(),
        }
    }
}

/// What the model says a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// An ioctl or syscall: success or the errno.
    Call(Result<(), Errno>),
    /// A guest access.
    Guest(GuestAccess),
    /// A host write that completed.
    HostWrite,
    /// A host read that completed, with the value.
    HostRead(u64),
    /// A host access killed by SIGBUS (in a child process).
    HostSigbus,
    /// `KVM_PRE_FAULT_MEMORY`: the result and the range written back.
    PreFault(PreFault),
    /// A `KVM_HC_MAP_GPA_RANGE`: the exit's nr, args[0..3] and flags if it
    /// exited, and the guest's rax.
    MapGpa { exit: Option<(u64, [u64; 3], u64)>, ret: u64 },
}

pub(crate) fn apply_model(model: &mut Model, step: &Step) -> Outcome {
    match step {
        Step::CreateGmem { size, flags } => Outcome::Call(model.create_guest_memfd(*size, *flags).map(drop)),
        Step::SetRegion(r) => Outcome::Call(model.set_memory_region(r).map(|_: Change| ())),
        Step::SetAttributes { address, size, attributes, flags } => {
            Outcome::Call(model.set_memory_attributes(*address, *size, *attributes, *flags))
        }
        Step::Fallocate { gmem, mode, offset, len } => Outcome::Call(model.fallocate(*gmem, *mode, *offset, *len)),
        Step::CloseGmem { gmem } => {
            model.close_guest_memfd(*gmem);
            Outcome::Call(Ok(()))
        }
        Step::CloseVm => Outcome::Call(Ok(())),
        Step::GuestRead { gpa } => Outcome::Guest(model.guest_read(*gpa)),
        Step::GuestWrite { gpa, value } => Outcome::Guest(model.guest_write(*gpa, *value)),
        Step::GuestExec { gpa } => Outcome::Guest(model.guest_fetch(*gpa)),
        Step::HypercallExits { mask } => Outcome::Call(model.enable_hypercall_exits(*mask)),
        Step::MapGpaRange { gpa, npages, attrs } => match model.map_gpa_range(*gpa, *npages, *attrs) {
            MapGpaRange::Returned(ret) => Outcome::MapGpa { exit: None, ret },
            MapGpaRange::Exit { args, flags } => {
                let result = match vmm_attributes(args[0], args[1], args[2]) {
                    None => Err(Errno::EINVAL),
                    Some((address, size, attributes)) => model.set_memory_attributes(address, size, attributes, 0),
                };
                Outcome::MapGpa {
                    exit: Some((kvm_model::KVM_HC_MAP_GPA_RANGE, args, flags)),
                    ret: hypercall_ret(result),
                }
            }
        },
        Step::PreFault { gpa, size, flags } => Outcome::PreFault(
            model.pre_fault_memory(*gpa, *size, *flags).expect("preconditions exclude unmodeled pre-faults"),
        ),
        Step::HostWrite { mem, offset, value } => match model.host_write(*mem, *offset, &value.to_le_bytes()) {
            Ok(()) => Outcome::HostWrite,
            Err(HostFault::Sigbus) => Outcome::HostSigbus,
        },
        Step::HostRead { gmem, offset } => {
            let mut buf = [0u8; 8];
            match model.host_read(ModelMemory::GmemMap(*gmem), *offset, &mut buf) {
                Ok(()) => Outcome::HostRead(u64::from_le_bytes(buf)),
                Err(HostFault::Sigbus) => Outcome::HostSigbus,
            }
        }
    }
}

/// A fresh model of a VM made by `Vm::with_payload`: the system memslot
/// and the anonymous mappings the sequences use.
pub(crate) fn initial_model(profile: &Profile, windows: Windows) -> Model {
    let mut model = Model::new(profile.clone());
    let system = model.add_anon(SYSTEM_SLOT_SIZE / P);
    let slot0 = MemoryRegion {
        slot: 0,
        flags: 0,
        gpa: 0,
        size: SYSTEM_SLOT_SIZE,
        user: UserMemory::Anon { anon: system, page: 0 },
        guest_memfd: None,
    };
    model.set_memory_region(&slot0).expect("the model accepts the harness's system memslot");
    for pages in ANON_PAGES {
        model.add_anon(pages);
    }
    if windows == Windows::Huge {
        model.add_anon(HUGE_PAGES);
    }
    model
}
