//! Decodes every payload back with iced-x86 and checks the instruction
//! stream: the build script must have produced what the harness relies on.

use guest_payloads::{
    protocol, Payload, ALL, ASSERT_FAIL, GUEST_AGENT, GUEST_RUNTIME, RAISE_UD, SPIN_FOREVER, SYNC_ROUNDTRIP,
    WATCH_MEMSLOT,
};
use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};
use rstest::rstest;

fn decode(payload: &Payload) -> Vec<Instruction> {
    let mut decoder = Decoder::with_ip(64, payload.code, payload.load_gpa, DecoderOptions::NONE);
    let instructions: Vec<Instruction> = decoder.iter().collect();
    for insn in &instructions {
        assert!(!insn.is_invalid(), "{}: invalid instruction at {:#x}", payload.name, insn.ip());
    }
    instructions
}

fn at(payload: &Payload, label: &str) -> Instruction {
    let ip = payload.label(label);
    decode(payload).into_iter().find(|i| i.ip() == ip).unwrap_or_else(|| panic!("no instruction starts at {label}"))
}

/// `out dx, eax` instructions, each preceded (within the last two) by `mov eax, code`.
fn call_codes(payload: &Payload) -> Vec<u32> {
    let insns = decode(payload);
    insns
        .iter()
        .enumerate()
        .filter(|(_, i)| i.code() == Code::Out_DX_EAX)
        .map(|(n, _)| {
            let mov = &insns[n - 1];
            assert_eq!(mov.code(), Code::Mov_r32_imm32, "{}: out not preceded by mov eax, imm", payload.name);
            assert_eq!(mov.op0_register(), Register::EAX);
            let port = &insns[n - 2];
            assert_eq!((port.op0_register(), port.immediate32()), (Register::EDX, u32::from(protocol::PORT)));
            mov.immediate32()
        })
        .collect()
}

#[rstest]
#[case::runtime(&GUEST_RUNTIME)]
#[case::sync_roundtrip(&SYNC_ROUNDTRIP)]
#[case::spin_forever(&SPIN_FOREVER)]
#[case::assert_fail(&ASSERT_FAIL)]
#[case::raise_ud(&RAISE_UD)]
#[case::guest_agent(&GUEST_AGENT)]
#[case::watch_memslot(&WATCH_MEMSLOT)]
fn decodes_completely_with_branches_inside(#[case] payload: &Payload) {
    let insns = decode(payload);
    let decoded_len: usize = insns.iter().map(Instruction::len).sum();
    assert_eq!(decoded_len, payload.code.len(), "{}: trailing bytes", payload.name);
    for insn in &insns {
        if matches!(insn.flow_control(), FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch)
            && insn.op0_kind() == OpKind::NearBranch64
        {
            assert!(
                payload.contains(insn.near_branch_target()),
                "{}: branch at {:#x} leaves the payload",
                payload.name,
                insn.ip()
            );
        }
    }
}

#[rstest]
#[case::sync_roundtrip(&SYNC_ROUNDTRIP, vec![protocol::CALL_SYNC, protocol::CALL_SYNC, protocol::CALL_SYNC, protocol::CALL_DONE])]
#[case::assert_fail(&ASSERT_FAIL, vec![protocol::CALL_ASSERT_FAIL, protocol::CALL_DONE])]
#[case::spin_forever(&SPIN_FOREVER, vec![])]
#[case::watch_memslot(&WATCH_MEMSLOT, vec![protocol::CALL_SYNC, protocol::CALL_SYNC, protocol::CALL_DONE])]
#[case::runtime(&GUEST_RUNTIME, vec![protocol::CALL_EXCEPTION])]
fn guest_calls_use_the_protocol_port_and_codes(#[case] payload: &Payload, #[case] expected: Vec<u32>) {
    assert_eq!(call_codes(payload), expected);
}

#[test]
fn agent_reports_ready_assert_and_done() {
    let mut codes = call_codes(&GUEST_AGENT);
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes, vec![protocol::CALL_DONE, protocol::CALL_ASSERT_FAIL, protocol::CALL_READY]);
}

#[test]
fn spin_forever_jumps_to_itself() {
    let spin = at(&SPIN_FOREVER, "spin");
    assert_eq!(spin.mnemonic(), Mnemonic::Jmp);
    assert_eq!(spin.near_branch_target(), spin.ip());
}

#[test]
fn raise_ud_faults_at_its_label() {
    assert_eq!(at(&RAISE_UD, "fault").mnemonic(), Mnemonic::Ud2);
}

#[test]
fn agent_hypercall_site_is_a_three_byte_vmmcall() {
    let insn = at(&GUEST_AGENT, "hypercall");
    assert_eq!(insn.mnemonic(), Mnemonic::Vmmcall);
    // The harness overwrites it with vmcall (also 3 bytes) on Intel.
    assert_eq!(insn.len(), 3);
}

#[test]
fn agent_fill_uses_rep_stosq() {
    assert!(decode(&GUEST_AGENT).iter().any(|i| i.code() == Code::Stosq_m64_RAX && i.has_rep_prefix()));
}

#[rstest]
fn exception_stub_pushes_error_code_slot_then_vector(#[values(0, 6, 8, 13, 14, 17, 31)] vector: u64) {
    let insns = decode(&GUEST_RUNTIME);
    let start = GUEST_RUNTIME.label(&format!("vector_{vector}"));
    let n = insns.iter().position(|i| i.ip() == start).expect("stub start");
    let cpu_pushes_error_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let mut stub = insns[n..].iter();
    if !cpu_pushes_error_code {
        let zero = stub.next().unwrap();
        assert_eq!((zero.mnemonic(), zero.immediate8to64()), (Mnemonic::Push, 0), "vector {vector}");
    }
    let push = stub.next().unwrap();
    assert_eq!((push.mnemonic(), push.immediate8to64() as u64), (Mnemonic::Push, vector));
    assert_eq!(stub.next().unwrap().mnemonic(), Mnemonic::Jmp);
}

#[test]
fn all_lists_every_test_payload_once() {
    let mut names: Vec<&str> = ALL.iter().map(|p| p.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), ALL.len());
    assert!(ALL.iter().all(|p| p.load_gpa == guest_payloads::layout::PAYLOAD_GPA));
}

#[test]
fn watch_memslot_spin_loop_reloads_the_watched_value() {
    let insns = decode(&WATCH_MEMSLOT);
    let (start, end) = (WATCH_MEMSLOT.label("spin"), WATCH_MEMSLOT.label("spin_end"));
    let body: Vec<&Instruction> = insns.iter().filter(|i| (start..end).contains(&i.ip())).collect();
    let mnemonics: Vec<Mnemonic> = body.iter().map(|i| i.mnemonic()).collect();
    // Progress stores for the host, then the re-read and the loop branch.
    assert_eq!(mnemonics, vec![Mnemonic::Mov, Mnemonic::Inc, Mnemonic::Mov, Mnemonic::Cmp, Mnemonic::Je]);
    assert_eq!(body[0].op0_kind(), OpKind::Memory, "the phase is stored in the mailbox");
    assert_eq!(body[2].op1_kind(), OpKind::Memory, "the loop must re-read guest memory each time");
    assert_eq!(body[4].near_branch_target(), start);
}
