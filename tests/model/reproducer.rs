//! Printing a failing sequence as a ready-to-paste test body in harness
//! terms.

use super::*;

pub(crate) fn show(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Call(Ok(())) => "success".into(),
        Outcome::Call(Err(e)) => e.name().into(),
        Outcome::Guest(GuestAccess::Done(v)) => format!("completion with {v:#x}"),
        Outcome::Guest(GuestAccess::Mmio { gpa, len, is_write, data }) => {
            format!("KVM_EXIT_MMIO {{ gpa {gpa:#x}, len {len}, is_write {is_write}, data {data:#x} }}")
        }
        Outcome::Guest(GuestAccess::MemoryFault { flags, gpa, size, errno }) => {
            format!("{errno} with KVM_EXIT_MEMORY_FAULT {{ flags {flags:#x}, gpa {gpa:#x}, size {size:#x} }}")
        }
        Outcome::Guest(GuestAccess::Unmodeled(why)) => format!("(unmodeled: {why})"),
        Outcome::HostWrite => "a host write".into(),
        Outcome::HostRead(v) => format!("a host read of {v:#x}"),
        Outcome::HostSigbus => "SIGBUS".into(),
        Outcome::MapGpa { exit, ret } => format!("exit {exit:x?}, guest rax {ret:#x}"),
        Outcome::PreFault(PreFault { result, gpa, size }) => format!(
            "{} with the range left at gpa {gpa:#x}, size {size:#x}",
            result.map_or_else(|e| e.name().to_string(), |()| "success".to_string())
        ),
    }
}

/// Names of the host-side objects in a reproducer.
pub(crate) fn anon_name(a: usize) -> String {
    format!("anon{a}")
}

pub(crate) fn region_expr(r: &MemoryRegion, model: &Model) -> String {
    let (memory, offset) = match r.user {
        UserMemory::Null => ("None".to_string(), 0),
        UserMemory::Anon { anon, page } => (format!("Some({}.clone())", anon_name(anon)), page * P),
        UserMemory::GmemMap { gmem, page } if model.gmems()[gmem].closed => ("None".to_string(), page * P),
        UserMemory::GmemMap { gmem, page } => (format!("Some(gmem{gmem}_map.clone())"), page * P),
    };
    let gmem = match r.guest_memfd {
        None => "None".to_string(),
        Some((fd, off)) => {
            let binding = match fd {
                GmemFd::File(g) => format!("GmemBinding::RawFd(gmem{g}.as_raw_fd())"),
                GmemFd::Closed => format!("GmemBinding::RawFd({CLOSED_FD:#x})"),
                GmemFd::NotGuestMemfd => "GmemBinding::RawFd(vm.raw_fd())".to_string(),
            };
            format!("Some(({binding}, {off:#x}))")
        }
    };
    format!(
        "Region {{ slot: {:#x}, flags: {:#x}, gpa: {:#x}, size: {:#x}, memory: {memory}, memory_offset: {offset:#x}, \
         guest_memfd: {gmem} }}",
        r.slot, r.flags, r.gpa, r.size
    )
}

pub(crate) fn call_line(out: &mut String, what: &str, expected: &Result<(), Errno>, call: &str) {
    match expected {
        Ok(()) => writeln!(out, "    {call}?;"),
        Err(errno) => writeln!(out, "    expect_errno(\"{what}\", Errno::{}, || {call})?;", errno.name()),
    }
    .expect("writing to a String");
}

/// The shrunk sequence as a test body in harness terms, each step
/// asserting what the model expects.
pub(crate) fn reproducer(vm_type: VmType, profile: &Profile, windows: Windows, steps: &[Step], seed: u64) -> String {
    let mut out = String::new();
    let mut model = initial_model(profile, windows);
    reproducer_prelude(&mut out, vm_type, profile, windows, seed);
    let mut agent_started = false;
    let mut ngmem = 0;
    for step in steps {
        let expected = apply_model(&mut model, step);
        let _ = writeln!(out, "    // {step:x?}");
        if step.needs_vcpu() && !agent_started {
            agent_started = true;
            let _ = writeln!(
                out,
                "    let vcpu = vm.vcpu(0, [0; 4])?;\n    let entry = vcpu.regs()?;\n    let mut agent = Agent::start(vcpu)?;"
            );
        }
        step_lines(&mut out, step, &expected, &mut ngmem, &model);
    }
    host_view_lines(&mut out, &mut model);
    let _ = writeln!(out, "    Ok(())\n}});");
    out
}

/// The reproducer's first lines: how to rerun the case, the imports, the VM
/// and the anonymous memories.
pub(crate) fn reproducer_prelude(w: &mut String, vm_type: VmType, profile: &Profile, windows: Windows, seed: u64) {
    let vm_type_expr = match vm_type {
        VmType::Default => "VmType::Default",
        VmType::SwProtected => "VmType::SwProtected",
    };
    let _ = writeln!(w, "// {SEED_ENV}={seed:#x} {CASES_ENV}=1 reruns this case; kernel rules {:?}.", profile.rules);
    let _ = writeln!(
        w,
        "// use guest_payloads::GUEST_AGENT; use kvm_harness::bindings::{{kvm_memory_attributes, kvm_pre_fault_memory}};\n\
         // use kvm_harness::{{expect_errno, Access, Agent, Cap, ChildFate, Errno, Exit, GmemBinding, HostMemory, Op, Region, Vm, VmType}};\n\
         // use nix::sys::mman::MapFlags; use nix::sys::signal::Signal; use std::os::fd::AsRawFd; use std::sync::Arc;"
    );
    let _ = writeln!(w, "suite.test(\"model_reproducer\", vec![], |kvm| {{");
    let _ = writeln!(w, "    let vm = Vm::with_payload(kvm, {vm_type_expr}, &GUEST_AGENT)?;");
    for (i, pages) in ANON_PAGES.iter().enumerate() {
        let _ = writeln!(w, "    let {} = Arc::new(HostMemory::anonymous({:#x})?);", anon_name(i + 1), pages * P);
    }
    if windows == Windows::Huge {
        let _ = writeln!(
            w,
            "    let {} = Arc::new(kvm_harness::backing::Backing::AnonymousThp.allocate({:#x})?);",
            anon_name(HUGE_ANON),
            HUGE_PAGES * P
        );
    }
}

/// One step and the outcome the model expects of it, as harness calls.
pub(crate) fn step_lines(w: &mut String, step: &Step, expected: &Outcome, ngmem: &mut usize, model: &Model) {
    match (step, expected) {
        (Step::CreateGmem { size, flags }, Outcome::Call(Ok(()))) => {
            let g = *ngmem;
            *ngmem += 1;
            let _ = writeln!(w, "    let gmem{g} = Arc::new(vm.create_guest_memfd({size:#x}, {flags:#x})?);");
            if flags & kvm_model::GUEST_MEMFD_FLAG_MMAP != 0 {
                let _ =
                    writeln!(w, "    let gmem{g}_map = Arc::new(gmem{g}.map(0, {size:#x}, MapFlags::MAP_SHARED)?);");
            }
        }
        (Step::CreateGmem { size, flags }, Outcome::Call(result)) => {
            call_line(w, "KVM_CREATE_GUEST_MEMFD", result, &format!("vm.create_guest_memfd({size:#x}, {flags:#x})"))
        }
        (Step::SetRegion(r), Outcome::Call(result)) => {
            call_line(w, "KVM_SET_USER_MEMORY_REGION2", result, &format!("vm.set_region(&{})", region_expr(r, model)))
        }
        (Step::SetAttributes { address, size, attributes, flags }, Outcome::Call(result)) => call_line(
            w,
            "KVM_SET_MEMORY_ATTRIBUTES",
            result,
            &format!(
                "vm.set_memory_attributes_raw(kvm_memory_attributes {{ address: {address:#x}, size: {size:#x}, \
                 attributes: {attributes:#x}, flags: {flags:#x} }})"
            ),
        ),
        (Step::Fallocate { gmem, mode, offset, len }, Outcome::Call(result)) => {
            let call = match mode {
                Fallocate::Allocate => "allocate",
                Fallocate::PunchHole => "punch_hole",
            };
            call_line(w, "fallocate", result, &format!("gmem{gmem}.{call}({offset:#x}, {len:#x})"));
        }
        (Step::GuestRead { gpa }, Outcome::Guest(access)) => {
            guest_lines(w, &format!("Op::Read {{ gpa: {gpa:#x} }}"), access)
        }
        (Step::GuestWrite { gpa, value }, Outcome::Guest(access)) => {
            guest_lines(w, &format!("Op::Write {{ gpa: {gpa:#x}, value: {value:#x} }}"), access)
        }
        (Step::GuestExec { gpa }, Outcome::Guest(access)) => {
            guest_lines(w, &format!("Op::Exec {{ gpa: {gpa:#x} }}"), access)
        }
        (Step::HypercallExits { mask }, Outcome::Call(result)) => call_line(
            w,
            "KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)",
            result,
            &format!("vm.enable_cap(Cap::ExitHypercall, [{mask:#x}, 0, 0, 0])"),
        ),
        _ => later_step_lines(w, step, expected, model),
    }
}

/// [`step_lines`] of the hypercall, pre-fault, close and host-access steps.
pub(crate) fn later_step_lines(w: &mut String, step: &Step, expected: &Outcome, model: &Model) {
    match (step, expected) {
        (Step::MapGpaRange { gpa, npages, attrs }, Outcome::MapGpa { exit, ret }) => {
            let answer = match (exit, vmm_attributes(*gpa, *npages, *attrs)) {
                (None, _) => "unreachable!(\"no exit expected\")".to_string(),
                (Some(_), None) => format!("Ok({ret:#x})"),
                (Some(_), Some((a, s, at))) => {
                    format!("{{ let _ = vm.set_memory_attributes({a:#x}, {s:#x}, {at:#x}); Ok({ret:#x}) }}")
                }
            };
            let _ = writeln!(
                w,
                "    assert_eq!(agent.hypercall(0xc, [{gpa:#x}, {npages:#x}, {attrs:#x}, 0], |_, nr, args| {{\n        \
                 assert_eq!(Some((nr, [args[0], args[1], args[2]])), {});\n        {answer}\n    }})?, {ret:#x});",
                exit.map_or("None".to_string(), |(nr, [a, n, at], _)| format!("Some(({nr:#x}, [{a:#x}, {n:#x}, {at:#x}]))"))
            );
        }
        (Step::PreFault { gpa, size, flags }, Outcome::PreFault(after)) => {
            let _ = writeln!(
                w,
                "    let mut range = kvm_pre_fault_memory {{ gpa: {gpa:#x}, size: {size:#x}, flags: {flags:#x}, ..Default::default() }};"
            );
            call_line(w, "KVM_PRE_FAULT_MEMORY", &after.result, "agent.vcpu().pre_fault_memory(&mut range)");
            let _ = writeln!(w, "    assert_eq!((range.gpa, range.size), ({:#x}, {:#x}));", after.gpa, after.size);
        }
        (Step::CloseVm, _) => {
            let _ = writeln!(w, "    drop(vm); // the agent's vCPU and the guest_memfds keep the VM alive");
        }
        (Step::CloseGmem { gmem }, _) => {
            let map = if model.gmems()[*gmem].mmap() { format!(" drop(gmem{gmem}_map);") } else { String::new() };
            let _ = writeln!(w, "    drop(gmem{gmem});{map}");
        }
        (Step::HostWrite { mem: ModelMemory::GmemMap(g), offset, value }, Outcome::HostSigbus) => {
            let _ = writeln!(
                w,
                "    assert_eq!(gmem{g}_map.access_in_child({offset:#x}, 8, Access::Write({:#x}))?, ChildFate::Signaled(Signal::SIGBUS));",
                *value as u8
            );
        }
        (Step::HostRead { gmem, offset }, Outcome::HostSigbus) => {
            let _ = writeln!(
                w,
                "    assert_eq!(gmem{gmem}_map.access_in_child({offset:#x}, 8, Access::Read)?, ChildFate::Signaled(Signal::SIGBUS));"
            );
        }
        (Step::HostRead { gmem, offset }, Outcome::HostRead(v)) => {
            let _ = writeln!(w, "    assert_eq!(gmem{gmem}_map.read_u64({offset:#x}), {v:#x});");
        }
        (Step::HostWrite { mem, offset, value }, _) => {
            let name = match mem {
                ModelMemory::Anon(a) => anon_name(*a),
                ModelMemory::GmemMap(g) => format!("gmem{g}_map"),
            };
            let _ = writeln!(w, "    {name}.write_u64({offset:#x}, {value:#x});");
        }
        (step, outcome) => unreachable!("{step:?} cannot have the outcome {outcome:?}"),
    }
}

/// The host's view after the last step, as the model has it: every
/// host-visible u64, checked.
pub(crate) fn host_view_lines(w: &mut String, model: &mut Model) {
    let _ = writeln!(w, "    // Every host-visible u64 after the last step (unlisted ones are 0):");
    let mut views: Vec<(String, ModelMemory, u64)> =
        (1..model.anons().len()).map(|a| (anon_name(a), ModelMemory::Anon(a), model.anons()[a].npages * P)).collect();
    for (g, gmem) in model.gmems().iter().enumerate() {
        if gmem.mmap() && gmem.host_accessible() && !gmem.closed {
            views.push((format!("gmem{g}_map"), ModelMemory::GmemMap(g), gmem.size));
        }
    }
    for (name, mem, len) in views {
        let mut bytes = vec![0u8; len as usize];
        model.host_read(mem, 0, &mut bytes).expect("host-visible memory reads");
        let words: Vec<String> = bytes
            .chunks_exact(8)
            .enumerate()
            .filter_map(|(i, c)| {
                let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                (v != 0).then(|| format!("({:#x}, {v:#x})", i * 8))
            })
            .collect();
        let _ = writeln!(
            w,
            "    for off in (0..{len:#x}).step_by(8) {{\n        let want = [{}].iter().find(|w: &&(u64, u64)| w.0 == off).map_or(0, |w| w.1);\n        \
             assert_eq!({name}.read_u64(off), want, \"{name} at {{off:#x}}\");\n    }}",
            words.join(", ")
        );
    }
}

pub(crate) fn guest_lines(w: &mut String, op: &str, access: &GuestAccess) {
    let _ = match access {
        GuestAccess::Done(v) => writeln!(w, "    assert_eq!(agent.perform({op})?, {v:#x});"),
        GuestAccess::Mmio { gpa, len, is_write: false, .. } => writeln!(
            w,
            "    agent.submit({op})?;\n    let exit = agent.vcpu().run()?;\n    \
             assert!(matches!(exit, Exit::Mmio {{ gpa: {gpa:#x}, len: {len}, is_write: false, .. }}), \"{{exit:x?}}\");\n    \
             agent.vcpu().complete_mmio_read(&{MMIO_READ_VALUE:#x}u64.to_le_bytes())?;\n    \
             assert_eq!(agent.wait_ready(\"MMIO read\")?, {MMIO_READ_VALUE:#x});"
        ),
        GuestAccess::Mmio { gpa, len, is_write: true, data } => writeln!(
            w,
            "    agent.submit({op})?;\n    \
             assert_eq!(agent.vcpu().run()?, Exit::Mmio {{ gpa: {gpa:#x}, len: {len}, is_write: true, data: {data:#x}u64.to_le_bytes() }});\n    \
             agent.wait_ready(\"MMIO write\")?;"
        ),
        GuestAccess::MemoryFault { flags, gpa, size, errno } => writeln!(
            w,
            "    agent.submit({op})?;\n    \
             assert_eq!(agent.vcpu().run()?, Exit::MemoryFault {{ flags: {flags:#x}, gpa: {gpa:#x}, size: {size:#x}, errno: Some(Errno::{}) }});\n    \
             agent.vcpu().set_regs(&entry)?;\n    agent.wait_ready(\"restart\")?;",
            errno.name()
        ),
        GuestAccess::Unmodeled(why) => writeln!(w, "    // not generated: {why}"),
    };
}
