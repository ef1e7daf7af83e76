//! `KVM_SET_MEMORY_ATTRIBUTES`: its own input rules, one at a time.
//!
//! kvm_vm_ioctl_set_mem_attributes() (virt/kvm/kvm_main.c, the same in
//! 6.12 and 7.3) rejects, in this order, with `EINVAL`: `flags != 0`;
//! attributes outside kvm_supported_mem_attributes() (`PRIVATE` where the
//! VM has private memory, nothing otherwise); `size == 0` or an
//! `address + size` that wraps; an address or size that is not page
//! aligned. Each test breaks exactly one rule, keeps every other field
//! valid (the attribute is one the VM supports), expects exactly `EINVAL`,
//! and then shows that nothing changed: the guest reads each page of the
//! range and still finds the shared bytes, or the exact private memory
//! fault, it found before the call. Without
//! `CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES` (`KVM_CAP_MEMORY_ATTRIBUTES` = 0
//! on `/dev/kvm`) the ioctl does not exist: `ENOTTY`.

use std::process::ExitCode;
use std::sync::Arc;

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::bindings::{
    kvm_memory_attributes, kvm_regs, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE,
};
use kvm_harness::{
    expect_errno, expect_ok, Agent, Cap, Errno, Error, Exit, GuestCall, HostMemory, Kvm, Need, Op, Result, Suite, Vm,
    VmType,
};
use kvm_selftests::huge_regions::{self, Conversion};

const PAGE: u64 = 4096;
const SLOT: u32 = 10;
/// The range every call names: four pages of one memslot.
const PAGES: u64 = 4;
const RANGE_GPA: u64 = TEST_AREA_GPA;
const RANGE_SIZE: u64 = PAGES * PAGE;
/// Shared bytes the host puts at the start of page `i`.
fn host_value(page: u64) -> u64 {
    0x5348_4152_4544_0000 | page
}

/// A VM of `vm_type` with the range backed by one anonymous memslot (no
/// guest_memfd, so a private page faults), page 1 private where the VM
/// supports it, and the guest agent.
struct Fixture {
    vm: Vm,
    _memory: Arc<HostMemory>,
    agent: Agent,
    entry: kvm_regs,
    private: [bool; PAGES as usize],
    supported: u64,
}

impl Fixture {
    fn new(kvm: &Arc<Kvm>, vm_type: VmType) -> Result<Self> {
        let vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
        let memory = vm.add_memory(SLOT, RANGE_GPA, RANGE_SIZE)?;
        for page in 0..PAGES {
            memory.write_u64(page * PAGE, host_value(page));
        }
        let supported = vm.cap(Cap::MemoryAttributes) as u32 as u64;
        let mut private = [false; PAGES as usize];
        if supported & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0 {
            expect_ok("KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) on one page of a VM that supports it", || {
                vm.make_private(RANGE_GPA + PAGE, PAGE)
            })?;
            private[1] = true;
        }
        let vcpu = vm.vcpu(0, [0; 4])?;
        let entry = vcpu.regs()?;
        let agent = Agent::start(vcpu)?;
        let mut fixture = Self { vm, _memory: memory, agent, entry, private, supported };
        fixture.expect_pages("before any rejected call")?;
        Ok(fixture)
    }

    /// A request that every rule accepts: the whole range, the attribute
    /// the VM supports (PRIVATE, or 0 where it supports nothing), flags 0.
    fn valid(&self) -> kvm_memory_attributes {
        kvm_memory_attributes {
            address: RANGE_GPA,
            size: RANGE_SIZE,
            attributes: self.supported & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
            flags: 0,
        }
    }

    /// The guest reads every page of the range: a shared page gives the
    /// host's bytes, a private one the exact private memory fault.
    fn expect_pages(&mut self, when: &str) -> Result<()> {
        for page in 0..PAGES {
            let gpa = RANGE_GPA + page * PAGE;
            self.agent.submit(Op::Read { gpa })?;
            let exit = self.agent.vcpu().run()?;
            let rule = format!("a rejected KVM_SET_MEMORY_ATTRIBUTES changes nothing ({when})");
            if self.private[page as usize] {
                let want = Exit::MemoryFault {
                    flags: u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
                    gpa,
                    size: PAGE,
                    errno: Some(Errno::EFAULT),
                };
                if exit != want {
                    let report = self.agent.vcpu().report(exit);
                    return Err(Error::rule(rule, format!("page {page} is private: expected {want:x?}, got {report}")));
                }
                // The read cannot complete: restart the agent from its entry.
                self.agent.vcpu().set_regs(&self.entry)?;
                self.agent.wait_ready("restart after the private fault")?;
            } else {
                match self.agent.vcpu().call_from_exit(exit, "a shared read")? {
                    GuestCall::Ready(value) if value == host_value(page) => {}
                    other => {
                        return Err(Error::rule(
                            rule,
                            format!(
                                "page {page} is shared: expected the host's {:#x}, got {other:x?}",
                                host_value(page)
                            ),
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// `request` must fail with EINVAL under `rule` and change nothing.
    fn reject(&mut self, rule: &str, request: kvm_memory_attributes) -> Result<()> {
        expect_errno(rule, Errno::EINVAL, || self.vm.set_memory_attributes_raw(request))?;
        self.expect_pages(&format!("after {request:x?}"))
    }
}

fn needs(vm_type: VmType) -> Vec<Need> {
    vec![Need::VmType(vm_type), Need::Cap(Cap::MemoryAttributes)]
}

type Case = fn(&mut Fixture) -> Result<()>;

/// Each rule, broken alone.
const RULES: &[(&str, Case)] = &[
    ("rejects_every_nonzero_flags_bit", |f| {
        for bit in 0..64 {
            let request = kvm_memory_attributes { flags: 1 << bit, ..f.valid() };
            f.reject(&format!("flags must be 0 (bit {bit} set)"), request)?;
        }
        Ok(())
    }),
    ("rejects_every_unsupported_attribute_bit", |f| {
        let supported = f.supported;
        for bit in (0..64).filter(|bit| supported & (1 << bit) == 0) {
            let request = kvm_memory_attributes { attributes: 1 << bit, ..f.valid() };
            f.reject(&format!("attributes must be a subset of KVM_CAP_MEMORY_ATTRIBUTES (bit {bit})"), request)?;
        }
        Ok(())
    }),
    ("rejects_size_zero", |f| {
        let request = kvm_memory_attributes { size: 0, ..f.valid() };
        f.reject("size must not be 0", request)
    }),
    ("rejects_a_range_that_wraps", |f| {
        // Page aligned and non-zero: only the wrap is wrong.
        let address = u64::MAX - PAGE + 1;
        for size in [2 * PAGE, RANGE_SIZE, u64::MAX - PAGE + 1] {
            let request = kvm_memory_attributes { address, size, ..f.valid() };
            f.reject(&format!("address + size must not wrap (address {address:#x}, size {size:#x})"), request)?;
        }
        Ok(())
    }),
    ("rejects_an_unaligned_address", |f| {
        for offset in [1, 8, PAGE / 2, PAGE - 1] {
            let request = kvm_memory_attributes { address: RANGE_GPA + offset, ..f.valid() };
            f.reject(&format!("address must be page aligned (offset {offset:#x})"), request)?;
        }
        Ok(())
    }),
    ("rejects_an_unaligned_size", |f| {
        for size in [1, 8, PAGE - 1, PAGE + 1, RANGE_SIZE - 8] {
            let request = kvm_memory_attributes { size, ..f.valid() };
            f.reject(&format!("size must be page aligned (size {size:#x})"), request)?;
        }
        Ok(())
    }),
    ("accepts_the_valid_request_and_it_takes_effect", |f| {
        // The control: the very request the other rules break succeeds, and
        // the guest sees every page with the requested attribute.
        let request = f.valid();
        expect_ok("a valid KVM_SET_MEMORY_ATTRIBUTES succeeds", || f.vm.set_memory_attributes_raw(request))?;
        let private = request.attributes != 0;
        f.private = [private; PAGES as usize];
        f.expect_pages("after the valid request")?;
        // Repeating it is a no-op success; so is clearing, which every VM
        // supports.
        expect_ok("repeating a valid KVM_SET_MEMORY_ATTRIBUTES succeeds", || f.vm.set_memory_attributes_raw(request))?;
        let clear = kvm_memory_attributes { attributes: 0, ..request };
        expect_ok("KVM_SET_MEMORY_ATTRIBUTES(0) succeeds", || f.vm.set_memory_attributes_raw(clear))?;
        f.private = [false; PAGES as usize];
        f.expect_pages("after clearing the attributes")
    }),
];

/// Attributes live per GFN in the VM, not in a memslot: a page made
/// private before any memslot covers it is private once a guest_memfd
/// memslot is created over it (kvm_mmu_init_memslot_memory_attributes()
/// also marks its 2 MiB page mixed), while its neighbours stay shared.
fn attributes_set_before_memslot_creation_apply_to_it(kvm: &Arc<Kvm>) -> Result<()> {
    const SLOT_SIZE: u64 = 2 << 20;
    let private_gpa = RANGE_GPA + PAGE;
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    expect_ok("a page without a memslot can be made private", || vm.make_private(private_gpa, PAGE))?;
    let gmem = Arc::new(vm.create_guest_memfd(SLOT_SIZE, 0)?);
    let shared = vm.add_private_memory(SLOT, RANGE_GPA, SLOT_SIZE, &gmem, 0)?;
    for page in 0..PAGES {
        shared.write_u64(page * PAGE, host_value(page));
    }
    for page in [0, 2, 3] {
        let read = agent.read(RANGE_GPA + page * PAGE)?;
        let rule = "pages left shared around an earlier private one are served from the shared mapping";
        kvm_harness::ensure!(read == host_value(page), rule, "page {page}: the guest read {read:#x}");
    }
    let read = agent.read(private_gpa)?;
    let rule = "a page made private before its memslot existed is served from guest_memfd (fresh: 0)";
    kvm_harness::ensure!(read == 0, rule, "the guest read {read:#x}, the shared mapping holds {:#x}", host_value(1));
    agent.write(private_gpa, !host_value(1))?;
    let host = shared.read_u64(PAGE);
    let rule = "a private store never reaches the shared mapping";
    kvm_harness::ensure!(host == host_value(1), rule, "the shared mapping now holds {host:#x}");
    agent.done().map(drop)
}

/// Attributes stay exact per 4 KiB page inside a 1 GiB-aligned memslot,
/// where KVM also tracks which 2 MiB and 1 GiB ranges are mixed
/// (kvm_arch_post_set_memory_attributes(), hugepage_has_attrs() above 2 MiB):
/// single private pages at the head, middle and tail of the gigabyte, then
/// the whole gigabyte private (uniform), then shared again.
fn attributes_stay_per_page_in_a_1g_aligned_memslot(kvm: &Arc<Kvm>) -> Result<()> {
    const GIB: u64 = 1 << 30;
    const PRIVATE: [u64; 3] = [0, GIB / 2 + PAGE, GIB - PAGE];
    const SHARED: [u64; 4] = [PAGE, GIB / 2, GIB / 2 + 2 * PAGE, GIB - 2 * PAGE];
    const GUEST_VALUE: u64 = 0x4755_4553_5450_5256;
    let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
    let mut agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
    let gmem = Arc::new(vm.create_guest_memfd(GIB, 0)?);
    // TEST_AREA_GPA (4 GiB) is 1 GiB aligned; only the probed pages get backed.
    let shared = vm.add_private_memory(SLOT, RANGE_GPA, GIB, &gmem, 0)?;
    for offset in PRIVATE.into_iter().chain(SHARED) {
        shared.write_u64(offset, host_value(offset / PAGE));
    }
    let expect = |agent: &mut Agent, offset: u64, want: u64, when: &str| -> Result<()> {
        let read = agent.read(RANGE_GPA + offset)?;
        let rule =
            format!("in a 1 GiB-aligned memslot, {when}, the guest reads each page from the side its attribute names");
        kvm_harness::ensure!(read == want, rule, "page at offset {offset:#x}: read {read:#x}, expected {want:#x}");
        Ok(())
    };
    for offset in PRIVATE {
        vm.make_private(RANGE_GPA + offset, PAGE)?;
    }
    for offset in PRIVATE {
        expect(&mut agent, offset, 0, "with single pages private")?;
        agent.write(RANGE_GPA + offset, GUEST_VALUE)?;
    }
    for offset in SHARED {
        expect(&mut agent, offset, host_value(offset / PAGE), "with single pages private")?;
    }
    vm.make_private(RANGE_GPA, GIB)?;
    for offset in PRIVATE {
        expect(&mut agent, offset, GUEST_VALUE, "with the whole gigabyte private")?;
    }
    for offset in SHARED {
        expect(&mut agent, offset, 0, "with the whole gigabyte private")?;
    }
    vm.make_shared(RANGE_GPA, GIB)?;
    for offset in PRIVATE.into_iter().chain(SHARED) {
        expect(&mut agent, offset, host_value(offset / PAGE), "with the whole gigabyte shared again")?;
    }
    agent.done().map(drop)
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));
    for (name, case) in RULES {
        let case = *case;
        suite.per_vm_type(&format!("set_memory_attributes_{name}"), needs, move |kvm, vm_type| {
            let mut fixture = Fixture::new(kvm, vm_type)?;
            case(&mut fixture)?;
            fixture.agent.done().map(drop)
        });
    }
    kvm_harness::register!(suite, needs(VmType::SwProtected) =>
        attributes_set_before_memslot_creation_apply_to_it,
        attributes_stay_per_page_in_a_1g_aligned_memslot,
    );
    huge_regions::register(&mut suite, "attributes_set_inside_huge_regions", Conversion::HostIoctl);
    // Only a kernel without the ioctl has this rule; elsewhere it is not
    // registered (a skip would fail strict runs on complete kernels).
    if suite.kvm().is_some_and(|kvm| kvm.cap(Cap::MemoryAttributes) == 0) {
        suite.test("set_memory_attributes_is_enotty_without_kvm_cap_memory_attributes", vec![], |kvm| {
            let vm = Vm::bare(kvm, VmType::Default)?;
            // A request every rule would accept: only the ioctl's absence can fail it.
            let request = kvm_memory_attributes { address: RANGE_GPA, size: RANGE_SIZE, attributes: 0, flags: 0 };
            expect_errno(
                "without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES KVM_SET_MEMORY_ATTRIBUTES is unknown",
                Errno::ENOTTY,
                || vm.set_memory_attributes_raw(request),
            )
        });
    }
    suite.run()
}
