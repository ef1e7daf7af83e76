//! Rule family 9: a software-protected VM has no protected guest state.
//!
//! KVM refuses the vCPU state ioctls, and reports no `KVM_CAP_SYNC_REGS`
//! fields, for VMs whose `kvm->arch.has_protected_state` is set (SEV-ES,
//! SEV-SNP, TDX). `KVM_X86_SW_PROTECTED_VM` protects memory only, so each
//! of these rules must hold for it exactly as for a default VM: the state
//! round-trips, and every ioctl keeps its own input checks
//! (`kvm_vcpu_ioctl_x86_set_xcrs()`, `kvm_arch_vcpu_ioctl_set_mpstate()`,
//! `KVM_CAP_SPLIT_IRQCHIP` in `kvm_vm_ioctl_enable_cap()`,
//! `kvm_vcpu_ioctl_get_cpuid2()`, `kvm_fast_pio_in()`).

use std::process::ExitCode;
use std::sync::Arc;

use guest_payloads::{GUEST_AGENT, SYNC_ROUNDTRIP};
use kvm_harness::bindings::{
    kvm_xcrs, KVM_MAX_XCRS, KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_harness::{
    ensure, expect_eq, expect_errno, expect_ok, Agent, Cap, Errno, Error, Exit, Kvm, Need, Op, Result, Suite, Vcpu, Vm,
    VmType,
};

/// XCR0 with x87 and SSE state: valid for any guest CPUID with XSAVE.
const XCR0_X87_SSE: u64 = 0x3;
/// `KVM_MAX_IRQ_ROUTES`, the most IOAPIC pins the split irqchip reserves.
const MAX_IRQ_ROUTES: u64 = 4096;
/// A port no payload uses for its host protocol.
const TEST_PORT: u16 = 0x2f8;

/// A vCPU with the supported CPUID set (so XCR0 may hold SSE state).
fn vcpu_with_cpuid(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<(Vm, Vcpu)> {
    let vm = Vm::with_payload(kvm, vm_type, &SYNC_ROUNDTRIP)?;
    let vcpu = vm.vcpu(0, [0; 4])?;
    Ok((vm, vcpu))
}

/// `KVM_SET_XCRS` input with `entries` XCR0 entries of `value`.
fn xcrs(entries: u32, value: u64, flags: u32) -> kvm_xcrs {
    let mut x = kvm_xcrs { nr_xcrs: entries, flags, ..Default::default() };
    for xcr in &mut x.xcrs {
        xcr.value = value;
    }
    x
}

fn xcr0(vcpu: &Vcpu) -> Result<u64> {
    let got = vcpu.xcrs()?;
    ensure!(got.nr_xcrs == 1 && got.xcrs[0].xcr == 0, "KVM_GET_XCRS reports XCR0 alone", "got {got:?}");
    Ok(got.xcrs[0].value)
}

/// The XCR0 bits KVM supports: `KVM_GET_SUPPORTED_CPUID` leaf 0xD index 0
/// (EDX:EAX), which KVM fills from its supported XCR0 only when the host has
/// XSAVE. (Leaf 1's XSAVE bit is no proxy: kvm_pvm clears it yet accepts
/// `KVM_SET_XCRS`.)
fn supported_xcr0(kvm: &Kvm) -> Result<u64> {
    let leaf = kvm.supported_cpuid()?.as_slice().iter().find(|e| e.function == 0xd && e.index == 0).copied();
    Ok(leaf.map_or(0, |e| u64::from(e.edx) << 32 | u64::from(e.eax)))
}

/// Whether KVM offers x87 and SSE state in XCR0, i.e. the host has XSAVE;
/// without it `KVM_SET_XCRS` fails with EINVAL whatever its input.
fn host_has_xsave(kvm: &Kvm) -> Result<bool> {
    Ok(supported_xcr0(kvm)? & XCR0_X87_SSE == XCR0_X87_SSE)
}

fn xcr0_round_trips_through_set_and_get_xcrs(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (_vm, vcpu) = vcpu_with_cpuid(kvm, vm_type)?;
    let rule = format!("{vm_type}: KVM_SET_XCRS(XCR0 = x87|SSE) takes effect (no protected state)");
    if !host_has_xsave(kvm)? {
        return expect_errno(&rule, Errno::EINVAL, || vcpu.set_xcrs(&xcrs(1, XCR0_X87_SSE, 0)));
    }
    expect_ok(&rule, || vcpu.set_xcrs(&xcrs(1, XCR0_X87_SSE, 0)))?;
    expect_eq(&rule, "XCR0 read back", xcr0(&vcpu)?, XCR0_X87_SSE)
}

/// One rejected `KVM_SET_XCRS` input: EINVAL, and XCR0 keeps its value.
fn set_xcrs_rejects(kvm: &Arc<Kvm>, vm_type: VmType, input: kvm_xcrs, rule: &str) -> Result<()> {
    let (_vm, vcpu) = vcpu_with_cpuid(kvm, vm_type)?;
    let before = xcr0(&vcpu)?;
    let rule = format!("{vm_type}: {rule}");
    expect_errno(&rule, Errno::EINVAL, || vcpu.set_xcrs(&input))?;
    expect_eq(&rule, "XCR0 after the rejected call", xcr0(&vcpu)?, before)
}

fn set_xcrs_accepts_max_xcrs_entries(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (_vm, vcpu) = vcpu_with_cpuid(kvm, vm_type)?;
    let rule = format!("{vm_type}: KVM_SET_XCRS accepts nr_xcrs = KVM_MAX_XCRS ({KVM_MAX_XCRS})");
    expect_ok(&rule, || vcpu.set_xcrs(&xcrs(KVM_MAX_XCRS, XCR0_X87_SSE, 0)))?;
    expect_eq(&rule, "XCR0 read back", xcr0(&vcpu)?, XCR0_X87_SSE)
}

fn mp_state_without_in_kernel_lapic_accepts_only_runnable(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (_vm, vcpu) = vcpu_with_cpuid(kvm, vm_type)?;
    for (state, name) in [(KVM_MP_STATE_UNINITIALIZED, "UNINITIALIZED"), (KVM_MP_STATE_HALTED, "HALTED")] {
        let rule = format!("{vm_type} without an in-kernel LAPIC: KVM_SET_MP_STATE({name}) fails with EINVAL");
        expect_errno(&rule, Errno::EINVAL, || vcpu.set_mp_state(state))?;
    }
    let rule = format!("{vm_type}: KVM_SET_MP_STATE(RUNNABLE) is accepted without an in-kernel LAPIC");
    expect_ok(&rule, || vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE))?;
    expect_eq(&rule, "KVM_GET_MP_STATE", vcpu.mp_state()?, KVM_MP_STATE_RUNNABLE)
}

fn mp_state_halts_with_split_irqchip(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let mut vm = Vm::bare(kvm, vm_type)?;
    vm.enable_cap(Cap::SplitIrqchip, [24, 0, 0, 0])?;
    vm.load_payload(&SYNC_ROUNDTRIP)?;
    let vcpu = vm.vcpu(0, [0; 4])?;
    let rule = format!("{vm_type} with the split irqchip: KVM_SET_MP_STATE(HALTED) reads back HALTED");
    expect_ok(&rule, || vcpu.set_mp_state(KVM_MP_STATE_HALTED))?;
    expect_eq(&rule, "KVM_GET_MP_STATE", vcpu.mp_state()?, KVM_MP_STATE_HALTED)?;
    for state in [KVM_MP_STATE_STOPPED, u32::MAX] {
        let rule = format!("{vm_type}: KVM_SET_MP_STATE({state:#x}) names no x86 state, fails with EINVAL");
        expect_errno(&rule, Errno::EINVAL, || vcpu.set_mp_state(state))?;
        expect_eq(&rule, "KVM_GET_MP_STATE after it", vcpu.mp_state()?, KVM_MP_STATE_HALTED)?;
    }
    Ok(())
}

fn split_irqchip_reserves_at_most_max_irq_routes_pins(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    for pins in [MAX_IRQ_ROUTES + 1, 1 << 32, u64::MAX] {
        let vm = Vm::bare(kvm, vm_type)?;
        let rule = format!("{vm_type}: KVM_CAP_SPLIT_IRQCHIP with {pins:#x} > {MAX_IRQ_ROUTES} pins fails with EINVAL");
        expect_errno(&rule, Errno::EINVAL, || vm.enable_cap(Cap::SplitIrqchip, [pins, 0, 0, 0]))?;
    }
    let vm = Vm::bare(kvm, vm_type)?;
    let rule = format!("{vm_type}: KVM_CAP_SPLIT_IRQCHIP with exactly {MAX_IRQ_ROUTES} pins is accepted");
    expect_ok(&rule, || vm.enable_cap(Cap::SplitIrqchip, [MAX_IRQ_ROUTES, 0, 0, 0]))
}

fn split_irqchip_enables_only_once(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    vm.enable_cap(Cap::SplitIrqchip, [24, 0, 0, 0])?;
    let rule = format!("{vm_type}: a second KVM_CAP_SPLIT_IRQCHIP fails with EEXIST");
    expect_errno(&rule, Errno::EEXIST, || vm.enable_cap(Cap::SplitIrqchip, [24, 0, 0, 0]))
}

fn split_irqchip_is_refused_once_a_vcpu_exists(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let _vcpu = vm.bare_vcpu(0)?;
    let rule = format!("{vm_type}: KVM_CAP_SPLIT_IRQCHIP after KVM_CREATE_VCPU fails with EEXIST");
    expect_errno(&rule, Errno::EEXIST, || vm.enable_cap(Cap::SplitIrqchip, [24, 0, 0, 0]))
}

fn cpuid_reads_back_as_set(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (_vm, vcpu) = vcpu_with_cpuid(kvm, vm_type)?;
    let set = kvm.supported_cpuid()?.as_slice().to_vec();
    let rule = format!("{vm_type}: KVM_GET_CPUID2 returns the {} entries KVM_SET_CPUID2 set", set.len());
    let got = expect_ok(&rule, || vcpu.cpuid(set.len()))?;
    let got = got.as_slice();
    let missing: Vec<String> = set
        .iter()
        .filter(|e| !got.iter().any(|g| g.function == e.function && g.index == e.index && g.flags == e.flags))
        .map(|e| format!("{:#x}/{}", e.function, e.index))
        .collect();
    ensure!(
        missing.is_empty(),
        &rule,
        "{} of {} leaves are missing (leaf/index): {}",
        missing.len(),
        set.len(),
        missing.join(", ")
    );
    expect_eq(&rule, "entry count", got.len(), set.len())?;
    // The vendor leaves carry no runtime-updated bits: they read back exactly.
    for leaf in [0, 0x8000_0000] {
        let pick = |v: &[kvm_harness::bindings::kvm_cpuid_entry2]| v.iter().find(|e| e.function == leaf).copied();
        let (want, back) = (pick(&set), pick(got));
        let regs = |e: Option<kvm_harness::bindings::kvm_cpuid_entry2>| e.map(|e| [e.eax, e.ebx, e.ecx, e.edx]);
        expect_eq(&rule, format_args!("leaf {leaf:#x} registers"), regs(back), regs(want))?;
    }
    Ok(())
}

fn cpuid_read_into_a_short_buffer_fails_with_e2big(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let (_vm, vcpu) = vcpu_with_cpuid(kvm, vm_type)?;
    let n = kvm.supported_cpuid()?.as_slice().len();
    for room in [n - 1, 1] {
        let rule = format!("{vm_type}: KVM_GET_CPUID2 with room for {room} of {n} entries fails with E2BIG");
        expect_errno(&rule, Errno::E2BIG, || vcpu.cpuid(room))?;
    }
    Ok(())
}

fn reports_every_sync_regs_field(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<()> {
    let vm = Vm::bare(kvm, vm_type)?;
    let all = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS) as i32;
    let rule = format!("{vm_type} has no protected state: KVM_CAP_SYNC_REGS on its fd offers every x86 field");
    expect_eq(&rule, "KVM_CAP_SYNC_REGS", vm.cap(Cap::SyncRegs), all)
}

/// The `rax` an `in` of `size` bytes leaves: the low `size` bytes from the
/// port; an 8/16-bit read keeps the rest of `rax`, a 32-bit one zero-extends.
fn rax_after_port_read(preset: u64, data: u32, size: u8) -> u64 {
    match size {
        1 => (preset & !0xff) | u64::from(data & 0xff),
        2 => (preset & !0xffff) | u64::from(data & 0xffff),
        _ => u64::from(data),
    }
}

fn port_read_returns_the_vmm_data(kvm: &Arc<Kvm>, vm_type: VmType, size: u8) -> Result<()> {
    let vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let (preset, data) = (0xfedc_ba98_7654_3210_u64, 0x8badf00d_u32);
    let rule = format!("{vm_type}: a {size}-byte `in` from port {TEST_PORT:#x} returns the VMM's bytes in rax");
    agent.submit(Op::PortIn { port: u64::from(TEST_PORT), size: u64::from(size), preset })?;
    match agent.vcpu().run()? {
        Exit::Io { port: TEST_PORT, out: false, size: s, count: 1, .. } if s == size => {}
        other => return Err(Error::rule(&rule, format!("expected KVM_EXIT_IO IN of {size} bytes, got {other:x?}"))),
    }
    agent.vcpu().complete_pio_in(&data.to_le_bytes()[..usize::from(size)])?;
    let rax = agent.wait_ready("the port read")?;
    expect_eq(
        &rule,
        format_args!("rax (preset {preset:#x}, port data {data:#x})"),
        rax,
        rax_after_port_read(preset, data, size),
    )
}

/// Without host XSAVE every KVM_SET_XCRS fails: no single rule is isolated.
fn needs_xsave() -> Need {
    Need::Check(Box::new(|kvm| match host_has_xsave(kvm) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "needs XSAVE: KVM_GET_SUPPORTED_CPUID leaf 0xD offers XCR0 {:#x}",
            supported_xcr0(kvm).unwrap_or(0)
        )),
        Err(e) => Err(format!("needs XSAVE: {e}")),
    }))
}

/// A scenario run once per VM type.
type Scenario = fn(&Arc<Kvm>, VmType) -> Result<()>;

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    let per_type: [(&str, Scenario); 10] = [
        ("xcr0_round_trips_through_set_and_get_xcrs", xcr0_round_trips_through_set_and_get_xcrs),
        ("set_xcrs_accepts_max_xcrs_entries", set_xcrs_accepts_max_xcrs_entries),
        (
            "mp_state_without_in_kernel_lapic_accepts_only_runnable",
            mp_state_without_in_kernel_lapic_accepts_only_runnable,
        ),
        ("mp_state_halts_with_split_irqchip", mp_state_halts_with_split_irqchip),
        ("split_irqchip_reserves_at_most_max_irq_routes_pins", split_irqchip_reserves_at_most_max_irq_routes_pins),
        ("split_irqchip_enables_only_once", split_irqchip_enables_only_once),
        ("split_irqchip_is_refused_once_a_vcpu_exists", split_irqchip_is_refused_once_a_vcpu_exists),
        ("cpuid_reads_back_as_set", cpuid_reads_back_as_set),
        ("cpuid_read_into_a_short_buffer_fails_with_e2big", cpuid_read_into_a_short_buffer_fails_with_e2big),
        ("reports_every_sync_regs_field", reports_every_sync_regs_field),
    ];
    for (name, scenario) in per_type {
        suite.per_vm_type(name, |_| vec![], scenario);
    }
    let rejected: [(&str, kvm_xcrs, &'static str); 6] = [
        ("more_than_max_xcrs_entries", xcrs(KVM_MAX_XCRS + 1, XCR0_X87_SSE, 0), "nr_xcrs above KVM_MAX_XCRS"),
        ("nonzero_flags", xcrs(1, XCR0_X87_SSE, 1), "flags bit 0"),
        ("flags_bit_31", xcrs(1, XCR0_X87_SSE, 1 << 31), "flags bit 31"),
        ("xcr0_without_x87", xcrs(1, 0x2, 0), "XCR0 without x87 state"),
        ("xcr0_avx_without_sse", xcrs(1, 0x5, 0), "XCR0 with AVX but not SSE state"),
        ("xcr0_bit_63", xcrs(1, XCR0_X87_SSE | 1 << 63, 0), "XCR0 bit 63 (no such state component)"),
    ];
    for (name, input, what) in rejected {
        let rule = format!("KVM_SET_XCRS with {what} fails with EINVAL");
        suite.per_vm_type(
            &format!("set_xcrs_rejects_{name}"),
            |_| vec![needs_xsave()],
            move |kvm, vm_type| set_xcrs_rejects(kvm, vm_type, input, &rule),
        );
    }
    for size in [1u8, 2, 4] {
        suite.per_vm_type(
            &format!("port_read_of_{size}_bytes_returns_the_vmm_data"),
            |_| vec![],
            move |kvm, vm_type| port_read_returns_the_vmm_data(kvm, vm_type, size),
        );
    }
    suite.run()
}
