//! Assembles the guest payloads with iced-x86 and writes `payloads.rs` into
//! `OUT_DIR`: one `Payload` per program with its bytes, load GPA, entry point
//! and label addresses.

use std::{env, fmt::Write as _, fs, path::PathBuf};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

#[allow(dead_code)]
mod abi {
    include!("src/abi.rs");
}

use abi::layout::*;
use abi::protocol::*;

type Result<T> = std::result::Result<T, IcedError>;

/// A payload under construction: the assembler plus named labels.
struct Program {
    name: &'static str,
    doc: &'static str,
    load_gpa: u64,
    asm: CodeAssembler,
    labels: Vec<(&'static str, CodeLabel)>,
}

impl Program {
    fn new(name: &'static str, doc: &'static str, load_gpa: u64) -> Result<Self> {
        Ok(Self { name, doc, load_gpa, asm: CodeAssembler::new(64)?, labels: Vec::new() })
    }

    /// Defines an exported label at the current position.
    fn export(&mut self, name: &'static str) -> Result<CodeLabel> {
        let mut label = self.asm.create_label();
        self.asm.set_label(&mut label)?;
        self.labels.push((name, label));
        Ok(label)
    }

    /// `out PORT, eax = code`: a guest call; arguments must already be in place.
    fn call_host(&mut self, code: u32) -> Result<()> {
        let a = &mut self.asm;
        a.mov(edx, PORT as u32)?;
        a.mov(eax, code)?;
        a.out(dx, eax)
    }

    /// Reports DONE forever: the host must not resume a finished payload, and
    /// if it does it sees DONE again instead of running off the end.
    fn done(&mut self) -> Result<()> {
        let mut again = self.asm.create_label();
        self.done_at(&mut again)
    }

    /// [`Self::done`] starting at `label`, which must not be set yet.
    fn done_at(&mut self, label: &mut CodeLabel) -> Result<()> {
        self.asm.set_label(label)?;
        self.call_host(CALL_DONE)?;
        self.asm.jmp(*label)
    }

    fn finish(mut self, out: &mut String) -> Result<()> {
        assert!(self.load_gpa == RUNTIME_GPA || self.load_gpa == PAYLOAD_GPA);
        let result = self.asm.assemble_options(self.load_gpa, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
        let bytes = result.inner.code_buffer.clone();
        assert!((bytes.len() as u64) <= PAYLOAD_MAX, "{} is too big", self.name);
        let mut labels = String::new();
        for (name, label) in &self.labels {
            write!(labels, "(\"{name}\", {:#x}), ", result.label_ip(label)?).unwrap();
        }
        let ident = self.name.to_uppercase();
        writeln!(
            out,
            "#[doc = {doc:?}]\npub static {ident}: Payload = Payload {{ name: {name:?}, load_gpa: {gpa:#x}, \
             entry: {gpa:#x}, code: &{bytes:?}, labels: &[{labels}] }};",
            doc = self.doc,
            name = self.name,
            gpa = self.load_gpa,
        )
        .unwrap();
        Ok(())
    }
}

/// Exception stubs: vector n pushes a zero error code where the CPU does not,
/// then the vector, and reports `EXCEPTION(vector, error, rip, cr2)`.
fn guest_runtime() -> Result<Program> {
    let mut p = Program::new(
        "guest_runtime",
        "Exception stubs for vectors 0..32 (labels `vector_N`), each reporting EXCEPTION to the host.",
        RUNTIME_GPA,
    )?;
    let mut common = p.asm.create_label();
    const NAMES: [&str; 32] = [
        "vector_0",
        "vector_1",
        "vector_2",
        "vector_3",
        "vector_4",
        "vector_5",
        "vector_6",
        "vector_7",
        "vector_8",
        "vector_9",
        "vector_10",
        "vector_11",
        "vector_12",
        "vector_13",
        "vector_14",
        "vector_15",
        "vector_16",
        "vector_17",
        "vector_18",
        "vector_19",
        "vector_20",
        "vector_21",
        "vector_22",
        "vector_23",
        "vector_24",
        "vector_25",
        "vector_26",
        "vector_27",
        "vector_28",
        "vector_29",
        "vector_30",
        "vector_31",
    ];
    for (vector, name) in NAMES.iter().enumerate() {
        p.export(name)?;
        let has_error_code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
        if !has_error_code {
            p.asm.push(0)?;
        }
        p.asm.push(vector as i32)?;
        p.asm.jmp(common)?;
    }
    p.asm.set_label(&mut common)?;
    p.asm.pop(rdi)?;
    p.asm.pop(rsi)?;
    p.asm.mov(r8, qword_ptr(rsp))?;
    p.asm.mov(r9, cr2)?;
    let mut again = p.asm.create_label();
    p.asm.set_label(&mut again)?;
    p.call_host(CALL_EXCEPTION)?;
    p.asm.jmp(again)?;
    Ok(p)
}

/// Reports SYNC(seed), SYNC(!seed), SYNC(seed rotated left by 17), then DONE.
fn sync_roundtrip() -> Result<Program> {
    let mut p = Program::new(
        "sync_roundtrip",
        "SYNC(rdi), SYNC(!rdi), SYNC(rdi rotated left by 17), DONE; the seed is kept in rbx across the exits.",
        PAYLOAD_GPA,
    )?;
    let a = &mut p.asm;
    a.mov(rbx, rdi)?; // callee-saved across our own calls; the seed
    p.call_host(CALL_SYNC)?;
    let a = &mut p.asm;
    a.mov(rdi, rbx)?;
    a.not(rdi)?;
    p.call_host(CALL_SYNC)?;
    let a = &mut p.asm;
    a.mov(rdi, rbx)?;
    a.rol(rdi, 17)?;
    p.call_host(CALL_SYNC)?;
    p.done()?;
    Ok(p)
}

/// An endless loop for the watchdog; `spin` is the looping instruction.
fn spin_forever() -> Result<Program> {
    let mut p = Program::new("spin_forever", "Jumps to itself forever (label `spin`).", PAYLOAD_GPA)?;
    let spin = p.export("spin")?;
    p.asm.jmp(spin)?;
    Ok(p)
}

/// Fails an assertion with fixed values, for the protocol decoder.
fn assert_fail() -> Result<Program> {
    let mut p = Program::new("assert_fail", "ASSERT_FAIL(id = rdi, values = rsi, rsi+1, rsi+2, rsi+3).", PAYLOAD_GPA)?;
    let a = &mut p.asm;
    a.lea(r8, qword_ptr(rsi + 1))?;
    a.lea(r9, qword_ptr(rsi + 2))?;
    a.lea(r10, qword_ptr(rsi + 3))?;
    p.call_host(CALL_ASSERT_FAIL)?;
    p.done()?;
    Ok(p)
}

/// Raises #UD, so the runtime's stub must report vector 6.
fn raise_ud() -> Result<Program> {
    let mut p = Program::new("raise_ud", "Executes ud2 (label `fault`).", PAYLOAD_GPA)?;
    p.export("fault")?;
    p.asm.ud2()?;
    p.done()?;
    Ok(p)
}

/// A command interpreter: reports READY(result), reads a command from its
/// mailbox (r15), executes it, repeats. Lets a scenario's host code say
/// "guest, read this GPA" right where it checks the outcome.
fn guest_agent() -> Result<Program> {
    let mut p = Program::new(
        "guest_agent",
        "Runs host commands from the vCPU mailbox (protocol::Op); label `hypercall` is the \
         vendor-specific hypercall instruction the host patches.",
        PAYLOAD_GPA,
    )?;
    let mut ready = p.asm.create_label();
    let mut dispatch_done = p.asm.create_label();
    let mut handlers: Vec<(OpCode, CodeLabel)> = OpCode::ALL.iter().map(|&op| (op, p.asm.create_label())).collect();

    p.asm.xor(edi, edi)?;
    p.asm.set_label(&mut ready)?;
    p.call_host(CALL_READY)?;
    // Arguments a0..a3 in r8..r11; a4 is loaded by the one op that needs it.
    let a = &mut p.asm;
    a.mov(rax, qword_ptr(r15 + MAILBOX_OP))?;
    a.mov(r8, qword_ptr(r15 + MAILBOX_ARG0))?;
    a.mov(r9, qword_ptr(r15 + (MAILBOX_ARG0 + 8)))?;
    a.mov(r10, qword_ptr(r15 + (MAILBOX_ARG0 + 16)))?;
    a.mov(r11, qword_ptr(r15 + (MAILBOX_ARG0 + 24)))?;
    for &(op, label) in &handlers {
        a.cmp(rax, op as i32)?;
        a.je(label)?;
    }
    // Unknown op: report it, then wait for the next command.
    a.mov(rdi, ASSERT_UNKNOWN_OP)?;
    a.mov(rsi, rax)?;
    p.call_host(CALL_ASSERT_FAIL)?;
    p.asm.xor(edi, edi)?;
    p.asm.jmp(ready)?;

    for (op, label) in &mut handlers {
        agent_op(&mut p, *op, label, ready, dispatch_done)?;
    }
    p.asm.set_label(&mut dispatch_done)?;
    p.asm.xor(edi, edi)?;
    p.asm.jmp(ready)?;
    Ok(p)
}

/// The handler of one agent command, starting at `label`: it ends by
/// jumping to `ready` with its result in rdi, or to `dispatch_done` (result 0).
fn agent_op(
    p: &mut Program,
    op: OpCode,
    label: &mut CodeLabel,
    ready: CodeLabel,
    dispatch_done: CodeLabel,
) -> Result<()> {
    p.asm.set_label(label)?;
    let a = &mut p.asm;
    match op {
        OpCode::Read => {
            a.mov(rdi, qword_ptr(r8))?;
            a.jmp(ready)
        }
        OpCode::Write => {
            a.mov(qword_ptr(r8), r9)?;
            a.jmp(dispatch_done)
        }
        OpCode::Fill => {
            a.mov(rdi, r8)?;
            a.mov(rcx, r9)?;
            a.shr(rcx, 3)?;
            a.mov(rax, r10)?;
            a.cld()?;
            a.rep().stosq()?;
            a.jmp(dispatch_done)
        }
        OpCode::Check => {
            // r8 = cursor, r9 = end, r10 = expected.
            let mut check_loop = a.create_label();
            let mut check_next = a.create_label();
            a.add(r9, r8)?;
            a.set_label(&mut check_loop)?;
            a.cmp(r8, r9)?;
            a.jae(dispatch_done)?;
            a.mov(rax, qword_ptr(r8))?;
            a.cmp(rax, r10)?;
            a.je(check_next)?;
            a.mov(rdi, ASSERT_PATTERN_MISMATCH)?;
            a.mov(rsi, r8)?;
            a.mov(r8, r10)?;
            a.mov(r9, rax)?;
            p.call_host(CALL_ASSERT_FAIL)?;
            // Report only the first mismatch, then finish the command.
            let a = &mut p.asm;
            a.jmp(dispatch_done)?;
            a.set_label(&mut check_next)?;
            a.add(r8, 8)?;
            a.jmp(check_loop)
        }
        OpCode::Exec => {
            a.call(r8)?;
            a.mov(rdi, rax)?;
            a.jmp(ready)
        }
        OpCode::Hypercall => {
            a.mov(rax, r8)?;
            a.mov(rbx, r9)?;
            a.mov(rcx, r10)?;
            a.mov(rdx, r11)?;
            a.mov(rsi, qword_ptr(r15 + (MAILBOX_ARG0 + 32)))?;
            p.export("hypercall")?;
            p.asm.vmmcall()?;
            let a = &mut p.asm;
            a.mov(rdi, rax)?;
            a.jmp(ready)
        }
        OpCode::Touch => {
            // r8 = cursor, r9 = end, r10 = stride, r11 = write?, rdi = count.
            let mut touch_loop = a.create_label();
            let mut touch_read = a.create_label();
            let mut touch_next = a.create_label();
            a.add(r9, r8)?;
            a.xor(edi, edi)?;
            a.set_label(&mut touch_loop)?;
            a.cmp(r8, r9)?;
            a.jae(ready)?;
            a.test(r11, r11)?;
            a.jz(touch_read)?;
            a.mov(qword_ptr(r8), r8)?;
            a.jmp(touch_next)?;
            a.set_label(&mut touch_read)?;
            a.mov(rax, qword_ptr(r8))?;
            a.set_label(&mut touch_next)?;
            a.inc(rdi)?;
            a.add(r8, r10)?;
            a.jmp(touch_loop)
        }
        OpCode::Probe => {
            // r8 = entry cursor, r9 = entries left, rdi = probes done,
            // r10 = address with flags, r11 = address.
            let mut probe_loop = a.create_label();
            let mut probe_store = a.create_label();
            let mut probe_next = a.create_label();
            a.xor(edi, edi)?;
            a.set_label(&mut probe_loop)?;
            a.cmp(rdi, r9)?;
            a.jae(ready)?;
            a.mov(r10, qword_ptr(r8))?;
            a.mov(r11, r10)?;
            a.and(r11, -8)?;
            a.test(r10, PROBE_CHECK as i32)?;
            a.jz(probe_store)?;
            a.mov(rax, qword_ptr(r11))?;
            a.cmp(rax, qword_ptr(r8 + 8))?;
            a.je(probe_store)?;
            // The index goes in r10, the expected value in r8 last: r8 is
            // the cursor it is read through.
            a.mov(r10, rdi)?;
            a.mov(rdi, ASSERT_PATTERN_MISMATCH)?;
            a.mov(rsi, r11)?;
            a.mov(r9, rax)?;
            a.mov(r8, qword_ptr(r8 + 8))?;
            p.call_host(CALL_ASSERT_FAIL)?;
            // Report only the first mismatch, then finish the command.
            let a = &mut p.asm;
            a.jmp(dispatch_done)?;
            a.set_label(&mut probe_store)?;
            a.test(r10, PROBE_STORE as i32)?;
            a.jz(probe_next)?;
            a.mov(rax, qword_ptr(r8 + 16))?;
            a.mov(qword_ptr(r11), rax)?;
            a.set_label(&mut probe_next)?;
            a.inc(rdi)?;
            a.add(r8, PROBE_ENTRY_SIZE as i32)?;
            a.jmp(probe_loop)
        }
        OpCode::PortIn => {
            let mut word = a.create_label();
            let mut dword = a.create_label();
            let mut finish = a.create_label();
            a.mov(rdx, r8)?;
            a.mov(rax, r10)?;
            a.cmp(r9, 1)?;
            a.jne(word)?;
            a.in_(al, dx)?;
            a.jmp(finish)?;
            a.set_label(&mut word)?;
            a.cmp(r9, 2)?;
            a.jne(dword)?;
            a.in_(ax, dx)?;
            a.jmp(finish)?;
            a.set_label(&mut dword)?;
            a.in_(eax, dx)?;
            a.set_label(&mut finish)?;
            a.mov(rdi, rax)?;
            a.jmp(ready)
        }
        OpCode::Done => {
            // DONE forever, as every payload ends (see `Program::done`).
            p.call_host(CALL_DONE)?;
            p.asm.jmp(*label)
        }
    }
}

/// Watches a u64 at a GPA while the host moves or deletes the memslot under
/// it: for each phase, spins while the value equals that phase's spin value,
/// then reports the value it saw. Used by the memslot move/delete scenarios.
fn watch_memslot() -> Result<Program> {
    let mut p = Program::new(
        "watch_memslot",
        "rdi = watched GPA, rsi = phase count, rdx != 0 clobbers the IDT (limit 0) first. SYNC(0), then for \
         each phase i: spin (labels `spin`..`spin_end`) while [rdi] == mailbox arg i, SYNC(value seen); DONE. \
         Each spin iteration stores i + 1 at MAILBOX_WATCH_PHASE and counts at MAILBOX_WATCH_SPINS.",
        PAYLOAD_GPA,
    )?;
    let mut phase = p.asm.create_label();
    let mut finished = p.asm.create_label();
    let mut keep_idt = p.asm.create_label();
    let a = &mut p.asm;
    a.mov(rbx, rdi)?;
    a.mov(r12, rsi)?;
    a.xor(r13d, r13d)?;
    a.test(rdx, rdx)?;
    a.jz(keep_idt)?;
    // A zero-limit IDT: any exception escalates to a triple fault (shutdown).
    a.push(0)?;
    a.push(0)?;
    a.lidt(ptr(rsp))?;
    a.add(rsp, 16)?;
    a.set_label(&mut keep_idt)?;
    a.xor(edi, edi)?;
    p.call_host(CALL_SYNC)?;
    p.asm.set_label(&mut phase)?;
    let a = &mut p.asm;
    a.cmp(r13, r12)?;
    a.jae(finished)?;
    a.mov(r14, qword_ptr(r15 + r13 * 8 + MAILBOX_ARG0))?;
    a.lea(rcx, qword_ptr(r13 + 1))?;
    let spin = p.export("spin")?;
    // Progress for the host, which waits on it instead of sleeping.
    let a = &mut p.asm;
    a.mov(qword_ptr(r15 + MAILBOX_WATCH_PHASE), rcx)?;
    a.inc(qword_ptr(r15 + MAILBOX_WATCH_SPINS))?;
    a.mov(rax, qword_ptr(rbx))?;
    a.cmp(rax, r14)?;
    a.je(spin)?;
    p.export("spin_end")?;
    p.asm.mov(rdi, rax)?;
    p.call_host(CALL_SYNC)?;
    p.asm.inc(r13)?;
    p.asm.jmp(phase)?;
    p.done_at(&mut finished)?;
    Ok(p)
}

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/abi.rs");
    let mut out = String::from("// Generated by crates/guest-payloads/build.rs.\n\n");
    guest_runtime()?.finish(&mut out)?;
    // The test payloads; `ALL` is generated from this list, so a payload
    // added here is listed (and checked by harness_guest) without a second
    // list to keep.
    let mut all = Vec::new();
    for program in [sync_roundtrip()?, spin_forever()?, assert_fail()?, raise_ud()?, guest_agent()?, watch_memslot()?] {
        all.push(format!("&{}", program.name.to_uppercase()));
        program.finish(&mut out)?;
    }
    writeln!(
        out,
        "/// Every test payload (not the runtime), for tools that list or check them.\n\
         pub static ALL: &[&Payload] = &[{}];",
        all.join(", ")
    )
    .unwrap();
    let path = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("payloads.rs");
    fs::write(path, out).expect("write payloads.rs");
    Ok(())
}
