//! The harness against real KVM: guest calls, exceptions, and the watchdog
//! turning a guest stuck in a loop into a prompt failure.

use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use guest_payloads::layout::TEST_AREA_GPA;
use guest_payloads::{ASSERT_FAIL, GUEST_AGENT, RAISE_UD, SPIN_FOREVER, SYNC_ROUNDTRIP};
use kvm_harness::{
    ensure, threads, Agent, Error, Fill, GuestCall, HostMemory, Kvm, Probe, ProbeMismatch, Result, Suite, Vm, VmType,
};

/// A default VM running the guest agent, with a 2 MiB anonymous memslot at
/// `TEST_AREA_GPA` whose host view is returned.
fn agent_with_test_memory(kvm: &Arc<Kvm>) -> Result<(Vm, Arc<HostMemory>, Agent)> {
    let vm = Vm::with_payload(kvm, VmType::Default, &GUEST_AGENT)?;
    let host = vm.add_memory(1, TEST_AREA_GPA, 2 << 20)?;
    let guest = Agent::start(vm.vcpu(0, [0; 4])?)?;
    Ok((vm, host, guest))
}

fn watchdog_turns_infinite_loop_into_timeout_failure(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::Default, &SPIN_FOREVER)?;
    let mut vcpu = vm.vcpu(0, [0; 4])?;
    let deadline = Duration::from_millis(200);
    vcpu.set_timeout(deadline);
    let start = Instant::now();
    let outcome = vcpu.run();
    let elapsed = start.elapsed();
    let spin = SPIN_FOREVER.label("spin");
    match outcome {
        Err(Error::Timeout { rip, ref symbol, ref kernel_state, .. }) if rip == spin => {
            ensure!(
                symbol.as_deref() == Some("spin_forever:spin+0x0"),
                "the timeout names the payload label",
                "{symbol:?}"
            );
            // A vCPU running its guest is a running thread, not a sleeping one.
            ensure!(
                kernel_state.starts_with("state R"),
                "the timeout says the vCPU thread was running in the kernel when kicked",
                "{kernel_state}"
            );
            // Not a speed target: proves the kick fired at the deadline
            // rather than some other exit ending the run.
            ensure!(elapsed >= deadline, "the watchdog waits for its deadline", "kicked after {elapsed:?}");
            println!("watchdog: deadline {deadline:?}, vCPU kicked out after {elapsed:?}; its thread: {kernel_state}");
            Ok(())
        }
        other => Err(Error::rule(
            "a guest looping forever ends in a watchdog timeout at the looping RIP",
            format!("expected Timeout at {spin:#x}, got {other:?}"),
        )),
    }
}

fn vcpu_runs_again_after_a_watchdog_timeout(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::Default, &SPIN_FOREVER)?;
    let mut vcpu = vm.vcpu(0, [0; 4])?;
    vcpu.set_timeout(Duration::from_millis(100));
    for round in 0..3 {
        match vcpu.run() {
            Err(Error::Timeout { .. }) => {}
            other => {
                return Err(Error::rule("each run of a spinning guest times out", format!("round {round}: {other:?}")))
            }
        }
    }
    Ok(())
}

fn guest_assert_fail_reaches_host_with_values(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::Default, &ASSERT_FAIL)?;
    let mut vcpu = vm.vcpu(0, [42, 0x1000, 0, 0])?;
    let call = vcpu.next_call()?;
    let expected = GuestCall::AssertFail { id: 42, values: [0x1000, 0x1001, 0x1002, 0x1003] };
    ensure!(call == expected, "ASSERT_FAIL carries id and four values", "got {call:x?}");
    Ok(())
}

fn guest_exception_is_reported_with_vector_and_rip(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::Default, &RAISE_UD)?;
    let mut vcpu = vm.vcpu(0, [0; 4])?;
    let call = vcpu.next_call()?;
    let fault = RAISE_UD.label("fault");
    match call {
        GuestCall::Exception { vector: 6, error_code: 0, rip, .. } if rip == fault => Ok(()),
        other => Err(Error::rule(
            "ud2 raises #UD reported by the runtime stub",
            format!("expected #UD at {fault:#x}, got {other:x?}"),
        )),
    }
}

fn agent_reads_writes_and_checks_guest_memory(kvm: &Arc<Kvm>) -> Result<()> {
    let (_vm, host, mut guest) = agent_with_test_memory(kvm)?;
    let gpa = TEST_AREA_GPA;
    host.write_u64(0x100, 0xfeed_f00d);
    let seen = guest.read(gpa + 0x100)?;
    ensure!(seen == 0xfeed_f00d, "the guest reads what the host wrote", "read {seen:#x}");
    guest.fill(gpa, 0x1000, 0x5a5a_5a5a_5a5a_5a5a)?;
    host.expect_filled("the host sees what the guest filled", 0, 0x1000, Fill::U64(0x5a5a_5a5a_5a5a_5a5a), |off| {
        format!("offset {off:#x}")
    })?;
    guest.check(gpa, 0x1000, 0x5a5a_5a5a_5a5a_5a5a)?;
    host.write_u64(0x808, 1);
    match guest.check(gpa, 0x1000, 0x5a5a_5a5a_5a5a_5a5a) {
        Err(Error::Guest(msg)) if msg.contains(&format!("at GPA {:#x}", gpa + 0x808)) => {}
        other => return Err(Error::rule("a pattern mismatch names the GPA", format!("{other:?}"))),
    }
    let touched = guest.touch(gpa, 2 << 20, 4096, true)?;
    ensure!(touched == 512, "touch visits every page", "touched {touched}");
    guest.done().map(drop)
}

/// One `Probe` batch reads, compares and stores in order, and stops at the
/// first value it did not expect, naming its index and what it read.
fn agent_probe_batches_check_and_store_in_order(kvm: &Arc<Kvm>) -> Result<()> {
    let (_vm, host, mut guest) = agent_with_test_memory(kvm)?;
    let gpa = TEST_AREA_GPA;
    host.write_u64(0, 7);
    host.write_u64(0x1000, 8);
    let batch = [
        Probe { gpa, expect: Some(7), store: Some(70) },
        Probe { gpa: gpa + 0x1000, expect: Some(8), store: None },
        Probe { gpa: gpa + 0x2000, expect: None, store: Some(90) },
        Probe { gpa, expect: Some(70), store: None },
    ];
    let miss = guest.probe(&batch)?;
    ensure!(miss.is_none(), "a batch whose every value is as expected completes", "{miss:?}");
    let stored = (host.read_u64(0), host.read_u64(0x1000), host.read_u64(0x2000));
    ensure!(stored == (70, 8, 90), "a batch stores where it says and nowhere else", "host sees {stored:x?}");
    let batch = [
        Probe { gpa, expect: Some(70), store: Some(71) },
        Probe { gpa: gpa + 0x1000, expect: Some(9), store: Some(99) },
        Probe { gpa: gpa + 0x2000, expect: None, store: Some(91) },
    ];
    let miss = guest.probe(&batch)?;
    ensure!(
        miss == Some(ProbeMismatch { index: 1, actual: 8 }),
        "a batch stops at its first unexpected value and names its index and the value read",
        "{miss:?}"
    );
    let stored = (host.read_u64(0), host.read_u64(0x1000), host.read_u64(0x2000));
    ensure!(stored == (71, 8, 90), "probes from the mismatch on do not run", "host sees {stored:x?}");
    // The agent is back at READY.
    let read = guest.read(gpa)?;
    ensure!(read == 71, "the agent takes commands after a mismatch", "it read {read:#x}");
    guest.done().map(drop)
}

fn vcpus_on_their_own_threads_run_concurrently(kvm: &Arc<Kvm>) -> Result<()> {
    let vm = Vm::with_payload(kvm, VmType::Default, &SYNC_ROUNDTRIP)?;
    let vcpus = (0..4u64).map(|id| vm.vcpu(id, [id << 32 | 0xabc, 0, 0, 0])).collect::<Result<Vec<_>>>()?;
    let start = Barrier::new(vcpus.len());
    std::thread::scope(|s| {
        let runs: Vec<_> = vcpus
            .into_iter()
            .map(|mut vcpu| {
                let start = &start;
                s.spawn(move || -> Result<()> {
                    start.wait();
                    let seed = vcpu.id() << 32 | 0xabc;
                    vcpu.expect_sync(seed)?;
                    vcpu.expect_sync(!seed)?;
                    vcpu.expect_sync(seed.rotate_left(17))?;
                    vcpu.expect_done()
                })
            })
            .collect();
        runs.into_iter().try_for_each(|run| threads::join_result(run, "vCPU thread"))
    })
}

fn watchdog_kicks_only_the_stuck_vcpu(kvm: &Arc<Kvm>) -> Result<()> {
    let spinning = Vm::with_payload(kvm, VmType::Default, &SPIN_FOREVER)?;
    let syncing = Vm::with_payload(kvm, VmType::Default, &SYNC_ROUNDTRIP)?;
    let mut stuck = spinning.vcpu(0, [0; 4])?;
    stuck.set_timeout(Duration::from_millis(300));
    let mut healthy = syncing.vcpu(0, [7, 0, 0, 0])?;
    std::thread::scope(|s| {
        let stuck = s.spawn(move || stuck.run());
        healthy.expect_sync(7)?;
        healthy.expect_sync(!7)?;
        healthy.expect_sync(7u64.rotate_left(17))?;
        healthy.expect_done()?;
        match threads::join(stuck, "vCPU thread")? {
            Err(Error::Timeout { .. }) => Ok(()),
            other => Err(Error::rule("the spinning vCPU times out", format!("{other:?}"))),
        }
    })
}

fn vcpu_outliving_its_vm_keeps_guest_memory_mapped(kvm: &Arc<Kvm>) -> Result<()> {
    let (vm, host, mut guest) = agent_with_test_memory(kvm)?;
    let gpa = TEST_AREA_GPA;
    host.write_u64(0, 0xfeed);
    // The vCPU fd keeps the kernel's VM and its memslots alive, so the
    // harness must keep the backing mapped: with it unmapped the guest's
    // accesses would fail with EFAULT (or hit whatever reuses the range).
    drop(host);
    drop(vm);
    let seen = guest.read(gpa)?;
    ensure!(seen == 0xfeed, "a memslot's backing outlives the Vm value while a vCPU lives", "read {seen:#x}");
    guest.fill(gpa, 0x1000, 0x1234_5678_9abc_def0)?;
    guest.check(gpa, 0x1000, 0x1234_5678_9abc_def0)?;
    guest.done().map(drop)
}

fn payload_labels_are_inside_their_code() -> Result<()> {
    for payload in guest_payloads::ALL.iter().chain([&&guest_payloads::GUEST_RUNTIME]) {
        for (name, gpa) in payload.labels {
            ensure!(payload.contains(*gpa), "labels point into the payload", "{}:{name} = {gpa:#x}", payload.name);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut suite = Suite::new(env!("CARGO_CRATE_NAME"));

    kvm_harness::register!(suite, vec![] =>
        watchdog_turns_infinite_loop_into_timeout_failure,
        vcpu_runs_again_after_a_watchdog_timeout,
        guest_assert_fail_reaches_host_with_values,
        guest_exception_is_reported_with_vector_and_rip,
        agent_reads_writes_and_checks_guest_memory,
        agent_probe_batches_check_and_store_in_order,
        vcpus_on_their_own_threads_run_concurrently,
        watchdog_kicks_only_the_stuck_vcpu,
        vcpu_outliving_its_vm_keeps_guest_memory_mapped,
    );
    suite.host_test("payload_labels_are_inside_their_code", payload_labels_are_inside_their_code);
    suite.run()
}
