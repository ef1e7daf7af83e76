//! The guest agent: a vCPU running `guest_payloads::GUEST_AGENT`, driven by
//! host commands, so a scenario reads as "guest, do X" next to the checks.

use guest_payloads::layout::{PROBE_TABLE_GPA, PROBE_TABLE_STRIDE};
pub use guest_payloads::protocol::Op;
use guest_payloads::protocol::{ASSERT_PATTERN_MISMATCH, PROBE_CHECK, PROBE_ENTRY_SIZE, PROBE_STORE};

use crate::error::{Error, Result};
use crate::exit::{Exit, GuestCall};
use crate::vcpu::Vcpu;

/// One guest access of an [`Agent::probe`] batch: at `gpa` (8-byte
/// aligned), read and compare with `expect`, then store `store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The guest physical address.
    pub gpa: u64,
    /// The value the guest must read there, if it reads.
    pub expect: Option<u64>,
    /// The value the guest stores there afterwards, if it stores.
    pub store: Option<u64>,
}

/// The first probe of a batch that read something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeMismatch {
    /// Its index in the batch.
    pub index: usize,
    /// The value the guest read.
    pub actual: u64,
}

/// A vCPU running the guest agent, parked at `READY`.
///
/// The vCPU remembers whether the agent is parked at `READY` (it is after
/// every call that ends with the agent's `READY`, and not after
/// [`Self::submit`] or [`Self::vcpu`], through which a scenario may run or
/// reshape it): a parked agent makes one more round trip when the test
/// drops it, to show that KVM left the vCPU working (see
/// [`crate::liveness::Liveness`]).
#[derive(Debug)]
pub struct Agent {
    vcpu: Vcpu,
}

impl Agent {
    /// Runs `vcpu` (created on a VM with the `GUEST_AGENT` payload) to its first `READY`.
    pub fn start(mut vcpu: Vcpu) -> Result<Self> {
        match vcpu.next_ok_call()? {
            GuestCall::Ready(_) => {
                vcpu.agent_parked = true;
                Ok(Self { vcpu })
            }
            other => Err(Error::Guest(format!("vCPU {}: agent did not start: {other:x?}", vcpu.id()))),
        }
    }

    /// The underlying vCPU, e.g. to run it by hand after [`Self::submit`].
    pub fn vcpu(&mut self) -> &mut Vcpu {
        self.vcpu.agent_parked = false;
        &mut self.vcpu
    }

    /// The underlying vCPU, for calls that neither run nor change it (the
    /// agent stays parked).
    pub fn vcpu_ref(&self) -> &Vcpu {
        &self.vcpu
    }

    /// Writes `op` into the mailbox without running the vCPU.
    pub fn submit(&mut self, op: Op) -> Result<()> {
        self.vcpu.agent_parked = false;
        self.vcpu.write_agent_op(op)
    }

    /// Runs until the agent reports `READY(result)` after `what`.
    pub fn wait_ready(&mut self, what: &str) -> Result<u64> {
        let exit = self.vcpu.run()?;
        self.ready_from_exit(exit, what)
    }

    /// Interprets an exit that should be the agent's `READY` after `what`.
    pub fn ready_from_exit(&mut self, exit: Exit, what: &str) -> Result<u64> {
        self.vcpu.agent_parked = false;
        let call = self.vcpu.call_from_exit(exit, &format!("guest agent doing {what}"))?;
        match call {
            GuestCall::Ready(result) => {
                self.vcpu.agent_parked = true;
                Ok(result)
            }
            GuestCall::AssertFail { .. } => {
                // The agent abandons the command after reporting; park it at
                // READY again so the scenario can go on using it.
                let failure = other_failure(&call);
                match self.vcpu.next_call()? {
                    GuestCall::Ready(_) => {
                        self.vcpu.agent_parked = true;
                        Err(Error::Guest(format!("vCPU {} doing {what}: {failure}", self.vcpu.id())))
                    }
                    next => Err(Error::Guest(format!(
                        "vCPU {} doing {what}: {failure}; then, instead of READY: {next:x?}",
                        self.vcpu.id()
                    ))),
                }
            }
            other => Err(Error::Guest(match other.failure() {
                Some(failure) => format!("vCPU {} doing {what}: {failure}", self.vcpu.id()),
                None => format!("vCPU {} doing {what}: expected READY, got {other:x?}", self.vcpu.id()),
            })),
        }
    }

    /// Submits `op` and waits for its result.
    pub fn perform(&mut self, op: Op) -> Result<u64> {
        self.submit(op)?;
        self.wait_ready(&format!("{op:x?}"))
    }

    /// The guest reads the u64 at `gpa`.
    pub fn read(&mut self, gpa: u64) -> Result<u64> {
        self.perform(Op::Read { gpa })
    }

    /// The guest reads the u64 at `gpa`: `Some(value)` when the read
    /// completes, `None` when it exits as the 8-byte MMIO read of `gpa` (no
    /// memslot there), which the host completes with zeroes. Any other exit
    /// is an error.
    pub fn read_or_mmio(&mut self, gpa: u64) -> Result<Option<u64>> {
        let op = Op::Read { gpa };
        self.submit(op)?;
        match self.vcpu.run()? {
            Exit::Mmio { gpa: at, len: 8, is_write: false, .. } if at == gpa => {
                self.vcpu.complete_mmio_read(&[0; 8])?;
                self.wait_ready(&format!("{op:x?}, completed as MMIO")).map(|_| None)
            }
            exit => self.ready_from_exit(exit, &format!("{op:x?}")).map(Some),
        }
    }

    /// The guest writes `value` at `gpa`.
    pub fn write(&mut self, gpa: u64, value: u64) -> Result<()> {
        self.perform(Op::Write { gpa, value }).map(drop)
    }

    /// The guest fills `[gpa, gpa + len)` with `pattern`.
    pub fn fill(&mut self, gpa: u64, len: u64, pattern: u64) -> Result<()> {
        self.perform(Op::Fill { gpa, len, pattern }).map(drop)
    }

    /// The guest checks `[gpa, gpa + len)` holds `pattern`; a mismatch is an
    /// error naming the first differing GPA and both values.
    pub fn check(&mut self, gpa: u64, len: u64, pattern: u64) -> Result<()> {
        self.perform(Op::Check { gpa, len, pattern }).map(drop)
    }

    /// The guest touches `[gpa, gpa + len)` every `stride` bytes.
    pub fn touch(&mut self, gpa: u64, len: u64, stride: u64, write: bool) -> Result<u64> {
        self.perform(Op::Touch { gpa, len, stride, write })
    }

    /// Probes each page-word of `probes` in order in one guest command:
    /// the guest reads and compares, stores, and stops at the first value
    /// it did not expect, which is returned; probes after it did not run.
    /// Many accesses cost one exit instead of one each.
    pub fn probe(&mut self, probes: &[Probe]) -> Result<Option<ProbeMismatch>> {
        let capacity = (PROBE_TABLE_STRIDE / PROBE_ENTRY_SIZE) as usize;
        if probes.len() > capacity {
            return Err(Error::misuse(format!("{} probes in one batch; the table holds {capacity}", probes.len())));
        }
        if let Some(p) = probes.iter().find(|p| p.gpa % 8 != 0) {
            return Err(Error::misuse(format!("probe of unaligned GPA {:#x}", p.gpa)));
        }
        let table = PROBE_TABLE_GPA + self.vcpu.id() * PROBE_TABLE_STRIDE;
        {
            let (memory, _) = self.vcpu.mailbox()?;
            for (i, p) in probes.iter().enumerate() {
                let flags =
                    if p.expect.is_some() { PROBE_CHECK } else { 0 } | if p.store.is_some() { PROBE_STORE } else { 0 };
                let entry = table + i as u64 * PROBE_ENTRY_SIZE;
                memory.write_u64(entry, p.gpa | flags);
                memory.write_u64(entry + 8, p.expect.unwrap_or(0));
                memory.write_u64(entry + 16, p.store.unwrap_or(0));
            }
        }
        let op = Op::Probe { table, count: probes.len() as u64 };
        self.submit(op)?;
        let exit = self.vcpu.run()?;
        let what = format!("{op:x?}");
        match self.vcpu.call_from_exit(exit, &format!("guest agent doing {what}"))? {
            GuestCall::Ready(done) if done == probes.len() as u64 => Ok(None),
            GuestCall::AssertFail { id: ASSERT_PATTERN_MISMATCH, values: [gpa, _, actual, index] }
                if probes.get(index as usize).is_some_and(|p| p.gpa == gpa) =>
            {
                // The agent finishes the command after its report.
                self.wait_ready(&what)?;
                Ok(Some(ProbeMismatch { index: index as usize, actual }))
            }
            other => Err(Error::Guest(format!(
                "vCPU {} doing {what} ({} probes): expected READY({}), got {other:x?}",
                self.vcpu.id(),
                probes.len(),
                probes.len()
            ))),
        }
    }

    /// The guest makes hypercall `nr`; each `KVM_EXIT_HYPERCALL` on the way
    /// goes to `on_exit(vcpu, nr, args)`, whose value becomes the guest's rax.
    pub fn hypercall(
        &mut self,
        nr: u64,
        args: [u64; 4],
        mut on_exit: impl FnMut(&mut Vcpu, u64, [u64; 6]) -> Result<u64>,
    ) -> Result<u64> {
        let op = Op::Hypercall { nr, args };
        self.submit(op)?;
        loop {
            match self.vcpu.run()? {
                Exit::Hypercall { nr, args, .. } => {
                    let ret = on_exit(&mut self.vcpu, nr, args)?;
                    self.vcpu.set_hypercall_ret(ret)?;
                }
                exit => return self.ready_from_exit(exit, &format!("{op:x?}")),
            }
        }
    }

    /// The guest reports `DONE`; the agent is finished.
    pub fn done(mut self) -> Result<Vcpu> {
        self.submit(Op::Done {})?;
        self.vcpu.expect_done()?;
        Ok(self.vcpu)
    }
}

fn other_failure(call: &GuestCall) -> String {
    call.failure().unwrap_or_else(|| format!("{call:x?}"))
}
