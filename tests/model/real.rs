//! The real side: each step on a real VM, its outcome in the model's terms.

use super::*;

/// The real side of one sequence.
pub(crate) struct Real {
    /// `None` once a `CloseVm` step closed the VM fd.
    pub(crate) vm: Option<Vm>,
    /// Index = model anon id; 0 (the system memory) is not compared.
    pub(crate) anons: Vec<Option<Arc<HostMemory>>>,
    /// Index = model gmem id; `None` once the step closed it.
    pub(crate) gmems: Vec<Option<Arc<GuestMemfd>>>,
    /// The whole-file MAP_SHARED mapping of each mmap-able guest_memfd.
    pub(crate) gmem_maps: Vec<Option<Arc<HostMemory>>>,
    pub(crate) agent: Option<(Agent, kvm_regs)>,
    /// The VM's statistics, in the huge window's sequences: after each
    /// guest step, whether KVM holds a 2 MiB mapping (`pages_2m`).
    pub(crate) stats: Option<Stats>,
    /// Guest_memfd mappings on which a refused access has been seen to
    /// raise SIGBUS (in a child) this sequence.
    pub(crate) sigbus_seen: std::cell::RefCell<std::collections::BTreeSet<ModelMemory>>,
}

/// Where and how a sequence went wrong.
#[derive(Debug)]
pub(crate) struct Mismatch {
    pub(crate) step: usize,
    pub(crate) detail: String,
}

impl Real {
    pub(crate) fn new(kvm: &Arc<Kvm>, vm_type: VmType, windows: Windows) -> Result<Self> {
        let mut vm = Vm::with_payload(kvm, vm_type, &GUEST_AGENT)?;
        // Checked after every step instead (check_steps), where the failure
        // names the step; a shrinking search leaves dead VMs on purpose.
        vm.checked_by_caller();
        let mut anons = vec![None];
        for pages in ANON_PAGES {
            anons.push(Some(Arc::new(HostMemory::anonymous(pages * P)?)));
        }
        let stats = match windows {
            Windows::Small => None,
            Windows::Huge => {
                anons.push(Some(Arc::new(Backing::AnonymousThp.allocate(HUGE_PAGES * P)?)));
                Some(vm.stats()?)
            }
        };
        Ok(Self {
            vm: Some(vm),
            anons,
            gmems: Vec::new(),
            gmem_maps: Vec::new(),
            agent: None,
            stats,
            sigbus_seen: Default::default(),
        })
    }

    /// Whether KVM maps some of the VM with 2 MiB pages, where counted.
    pub(crate) fn huge_mapped(&self) -> Result<Option<bool>, String> {
        self.stats.as_ref().map(|s| s.get("pages_2m").map(|n| n > 0).map_err(|e| e.to_string())).transpose()
    }

    /// The VM fd, for the steps that need it (preconditions keep them out
    /// after a `CloseVm`).
    pub(crate) fn vm(&self) -> Result<&Vm, String> {
        self.vm.as_ref().ok_or_else(|| "the VM fd is closed".to_string())
    }

    pub(crate) fn region(&self, r: &MemoryRegion) -> Region {
        let (memory, memory_offset) = match r.user {
            UserMemory::Null => (None, 0),
            UserMemory::Anon { anon, page } => (self.anons[anon].clone(), page * P),
            // None after the close: only a deletion gets here then.
            UserMemory::GmemMap { gmem, page } => (self.gmem_maps[gmem].clone(), page * P),
        };
        let guest_memfd = r.guest_memfd.map(|(fd, offset)| {
            let binding = match fd {
                // By number: the memslot record must not keep the fd open,
                // since closing it while the slot binds it is a step.
                GmemFd::File(g) => GmemBinding::RawFd(self.gmems[g].as_ref().map_or(CLOSED_FD, |f| f.as_raw_fd())),
                GmemFd::Closed => GmemBinding::RawFd(CLOSED_FD),
                GmemFd::NotGuestMemfd => GmemBinding::RawFd(self.vm.as_ref().map_or(CLOSED_FD, Vm::raw_fd)),
            };
            (binding, offset)
        });
        Region { slot: r.slot, flags: r.flags, gpa: r.gpa, size: r.size, memory, memory_offset, guest_memfd }
    }

    /// Whether KVM left the VM working: the VM fd answers an ioctl that
    /// must succeed, or, once a step closed it, the agent's vCPU does. A VM
    /// KVM killed (`kvm_vm_dead()`, e.g. after a `KVM_BUG_ON()`) fails
    /// both with EIO, so the step that killed it is the one named, not a
    /// later step that happens to use the VM. While the VM fd is open the
    /// vCPU is not asked as well: `kvm_vcpu_ioctl()` tests the same
    /// `kvm->vm_dead` as `kvm_vm_ioctl()`, at several times the cost
    /// (`KVM_GET_REGS` loads the vCPU), and every guest step and the
    /// sequence's closing `DONE` run it through `KVM_RUN`.
    pub(crate) fn check_alive(&self) -> Result<()> {
        match (&self.vm, &self.agent) {
            (Some(vm), _) => vm.check_alive(),
            (None, Some((agent, _))) => agent.vcpu_ref().check_alive(),
            (None, None) => Ok(()),
        }
    }

    /// A fresh VM whose agent is already running, parked at READY.
    pub(crate) fn started(kvm: &Arc<Kvm>, vm_type: VmType, windows: Windows) -> Result<Self> {
        let mut real = Self::new(kvm, vm_type, windows)?;
        real.agent()?;
        Ok(real)
    }

    pub(crate) fn agent(&mut self) -> Result<&mut (Agent, kvm_regs)> {
        if self.agent.is_none() {
            let vm = self.vm.as_ref().ok_or_else(|| Error::Misuse("the VM fd is closed".into()))?;
            let vcpu = vm.vcpu(0, [0; 4])?;
            let entry = vcpu.regs()?;
            self.agent = Some((Agent::start(vcpu)?, entry));
        }
        Ok(self.agent.as_mut().expect("just started"))
    }

    /// Runs a guest access and describes what `KVM_RUN` did in the model's
    /// terms; the agent is parked at READY again afterwards.
    pub(crate) fn guest_access(&mut self, op: Op, expected: &GuestAccess) -> Result<GuestAccess, String> {
        let (agent, entry) = self.agent().map_err(|e| format!("cannot start the agent: {e}"))?;
        agent.submit(op).map_err(|e| e.to_string())?;
        let exit = agent.vcpu().run().map_err(|e| format!("KVM_RUN: {e}"))?;
        match exit {
            Exit::Mmio { gpa, len, is_write, data } => {
                let observed =
                    GuestAccess::Mmio { gpa, len, is_write, data: if is_write { u64::from_le_bytes(data) } else { 0 } };
                if &observed == expected {
                    // Complete the emulation: a read gets MMIO_READ_VALUE.
                    if !is_write {
                        agent.vcpu().complete_mmio_read(&MMIO_READ_VALUE.to_le_bytes()).map_err(|e| e.to_string())?;
                    }
                    let result = agent.wait_ready("completing the MMIO exit").map_err(|e| e.to_string())?;
                    let want = if is_write { 0 } else { MMIO_READ_VALUE };
                    if result != want {
                        return Err(format!("after completing the MMIO exit the guest got {result:#x}, not {want:#x}"));
                    }
                }
                Ok(observed)
            }
            Exit::MemoryFault { flags, gpa, size, errno } => {
                let errno = match errno {
                    Some(nix::errno::Errno::EFAULT) => Errno::EFAULT,
                    other => return Err(format!("KVM_EXIT_MEMORY_FAULT with KVM_RUN errno {other:?}")),
                };
                // The access cannot complete: restart the agent from its entry.
                agent.vcpu().set_regs(entry).map_err(|e| e.to_string())?;
                agent.wait_ready("restarting after a memory fault").map_err(|e| e.to_string())?;
                Ok(GuestAccess::MemoryFault { flags, gpa, size, errno })
            }
            other => match agent.vcpu().call_from_exit(other.clone(), "guest access") {
                Ok(GuestCall::Ready(value)) => Ok(GuestAccess::Done(value)),
                Ok(call) => Err(format!("guest call {call:x?}")),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Performs `step`, returning the outcome in the model's terms.
    pub(crate) fn apply(&mut self, step: &Step, expected: &Outcome) -> Result<Outcome, String> {
        Ok(match step {
            Step::CreateGmem { size, flags } => match self.vm()?.create_guest_memfd(*size, *flags) {
                Ok(gmem) => {
                    let gmem = Arc::new(gmem);
                    let map = if flags & kvm_model::GUEST_MEMFD_FLAG_MMAP != 0 {
                        Some(Arc::new(gmem.map(0, *size, MapFlags::MAP_SHARED).map_err(|e| e.to_string())?))
                    } else {
                        None
                    };
                    self.gmems.push(Some(gmem));
                    self.gmem_maps.push(map);
                    Outcome::Call(Ok(()))
                }
                Err(e) => Outcome::Call(Err(model_errno(&e)?)),
            },
            Step::SetRegion(r) => {
                let region = self.region(r);
                Outcome::Call(match self.vm()?.set_region(&region) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::SetAttributes { address, size, attributes, flags } => {
                let request =
                    kvm_memory_attributes { address: *address, size: *size, attributes: *attributes, flags: *flags };
                Outcome::Call(match self.vm()?.set_memory_attributes_raw(request) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::Fallocate { gmem, mode, offset, len } => {
                let file = self.gmems[*gmem].as_ref().expect("preconditions exclude closed guest_memfds");
                let result = match mode {
                    Fallocate::Allocate => file.allocate(*offset, *len),
                    Fallocate::PunchHole => file.punch_hole(*offset, *len),
                };
                Outcome::Call(match result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::GuestRead { gpa } => {
                let Outcome::Guest(expected) = expected else { unreachable!("a read's outcome is a guest access") };
                Outcome::Guest(self.guest_access(Op::Read { gpa: *gpa }, expected)?)
            }
            Step::GuestWrite { gpa, value } => {
                let Outcome::Guest(expected) = expected else { unreachable!("a write's outcome is a guest access") };
                Outcome::Guest(self.guest_access(Op::Write { gpa: *gpa, value: *value }, expected)?)
            }
            Step::GuestExec { gpa } => {
                let Outcome::Guest(expected) = expected else { unreachable!("a fetch's outcome is a guest access") };
                Outcome::Guest(self.guest_access(Op::Exec { gpa: *gpa }, expected)?)
            }
            Step::HostWrite { .. } | Step::HostRead { .. } => self.host_access(step)?,
            Step::CloseVm => {
                // The agent's vCPU must exist to hold the VM once its fd is gone.
                self.agent().map_err(|e| e.to_string())?;
                self.vm = None;
                Outcome::Call(Ok(()))
            }
            Step::CloseGmem { gmem } => {
                // The file is released here unless a memslot's memory maps
                // it (then when that slot is deleted), as the model says:
                // no other thread's child holds a copy of the fd or a
                // mapping (kvm_harness::child).
                self.gmems[*gmem] = None;
                self.gmem_maps[*gmem] = None;
                Outcome::Call(Ok(()))
            }
            Step::HypercallExits { mask } => {
                Outcome::Call(match self.vm()?.enable_cap(Cap::ExitHypercall, [*mask, 0, 0, 0]) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                })
            }
            Step::MapGpaRange { gpa, npages, attrs } => self.map_gpa_range(*gpa, *npages, *attrs)?,
            Step::PreFault { gpa, size, flags } => self.pre_fault(*gpa, *size, *flags)?,
        })
    }

    /// A host write or read through a mapping.
    pub(crate) fn host_access(&mut self, step: &Step) -> Result<Outcome, String> {
        Ok(match *step {
            Step::HostWrite { mem: mem @ ModelMemory::GmemMap(_), offset, value } => {
                match self.probe(mem, offset, Access::Write(value as u8), value)? {
                    false => Outcome::HostSigbus,
                    true => {
                        self.memory(mem).write_u64(offset, value);
                        Outcome::HostWrite
                    }
                }
            }
            Step::HostWrite { mem, offset, value } => {
                self.memory(mem).write_u64(offset, value);
                Outcome::HostWrite
            }
            Step::HostRead { gmem, offset } => {
                let mem = ModelMemory::GmemMap(gmem);
                match self.probe(mem, offset, Access::Read, 0)? {
                    false => Outcome::HostSigbus,
                    true => Outcome::HostRead(self.memory(mem).read_u64(offset)),
                }
            }
            _ => unreachable!("{step:?} is no host access"),
        })
    }

    /// `KVM_PRE_FAULT_MEMORY` on the agent's vCPU, under the watchdog's
    /// deadline: a kernel that retries forever is a mismatch, not a hang.
    pub(crate) fn pre_fault(&mut self, gpa: u64, size: u64, flags: u64) -> Result<Outcome, String> {
        let (agent, _) = self.agent().map_err(|e| format!("cannot start the agent: {e}"))?;
        let mut range = kvm_pre_fault_memory { gpa, size, flags, ..Default::default() };
        let deadline = watchdog::configured_timeout().map_err(|e| e.to_string())?;
        let result = match agent.vcpu().pre_fault_memory_with_deadline(&mut range, deadline) {
            (_, Some(at_kick)) => {
                return Err(format!("KVM_PRE_FAULT_MEMORY still running after {deadline:?} (at the kick: {at_kick})"))
            }
            (Ok(()), None) => Ok(()),
            (Err(e), None) => Err(model_errno(&e)?),
        };
        Ok(Outcome::PreFault(PreFault { result, gpa: range.gpa, size: range.size }))
    }

    /// The guest's `KVM_HC_MAP_GPA_RANGE`, answered as [`vmm_attributes`] says.
    pub(crate) fn map_gpa_range(&mut self, gpa: u64, npages: u64, attrs: u64) -> Result<Outcome, String> {
        let op = Op::Hypercall { nr: kvm_model::KVM_HC_MAP_GPA_RANGE, args: [gpa, npages, attrs, 0] };
        let Some(vm) = self.vm.as_ref() else { return Err("the VM fd is closed".into()) };
        let Some((agent, _)) = self.agent.as_mut() else { return Err("the agent is not running".into()) };
        agent.submit(op).map_err(|e| e.to_string())?;
        let mut exit = None;
        let mut result = agent.vcpu().run().map_err(|e| format!("KVM_RUN: {e}"))?;
        if let Exit::Hypercall { nr, args, flags } = result {
            exit = Some((nr, [args[0], args[1], args[2]], flags));
            let answer = match vmm_attributes(args[0], args[1], args[2]) {
                None => Err(Errno::EINVAL),
                Some((address, size, attributes)) => match vm.set_memory_attributes(address, size, attributes) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(model_errno(&e)?),
                },
            };
            agent.vcpu().set_hypercall_ret(hypercall_ret(answer)).map_err(|e| e.to_string())?;
            result = agent.vcpu().run().map_err(|e| format!("KVM_RUN: {e}"))?;
        }
        let ret = agent.ready_from_exit(result, "KVM_HC_MAP_GPA_RANGE").map_err(|e| e.to_string())?;
        Ok(Outcome::MapGpa { exit, ret })
    }

    /// Whether the 8 bytes at `offset` of `mem` can be accessed. First
    /// through `process_vm_readv`/`writev` on this process (a page the
    /// kernel refuses fails with EFAULT there, not SIGBUS); the first
    /// refused one of each mapping per sequence must then kill a child
    /// process doing `access` with SIGBUS, so the signal itself is checked
    /// and never reaches the test (a child per refusal costs far more than
    /// the syscall under TCG). A write's probe stores the value; the real
    /// write then stores it again.
    pub(crate) fn probe(&self, mem: ModelMemory, offset: u64, access: Access, value: u64) -> Result<bool, String> {
        let memory = self.memory(mem);
        let probed = match access {
            Access::Read => memory.try_read(offset, &mut [0u8; 8]),
            Access::Write(_) => memory.try_write(offset, &value.to_le_bytes()),
        };
        match probed {
            Ok(()) => return Ok(true),
            Err(e) if e.errno() == Some(nix::errno::Errno::EFAULT) => {}
            Err(e) => return Err(e.to_string()),
        }
        if self.sigbus_seen.borrow().contains(&mem) {
            return Ok(false);
        }
        self.sigbus_seen.borrow_mut().insert(mem);
        match memory.access_in_child(offset, 8, access).map_err(|e| e.to_string())? {
            ChildFate::Signaled(nix::sys::signal::Signal::SIGBUS) => Ok(false),
            fate => Err(format!(
                "process_vm_readv/writev found {} at {offset:#x} unmapped (EFAULT), but a host {access} there {fate}",
                describe_memory(mem)
            )),
        }
    }

    pub(crate) fn memory(&self, mem: ModelMemory) -> &HostMemory {
        match mem {
            ModelMemory::Anon(a) => self.anons[a].as_deref().expect("test anons exist"),
            ModelMemory::GmemMap(g) => self.gmem_maps[g].as_deref().expect("mmap-able guest_memfds are mapped"),
        }
    }

    /// The host-visible memories and their sizes in pages.
    pub(crate) fn host_views(model: &Model) -> Vec<(ModelMemory, u64)> {
        let mut views: Vec<(ModelMemory, u64)> =
            (1..model.anons().len()).map(|a| (ModelMemory::Anon(a), model.anons()[a].npages)).collect();
        for (g, gmem) in model.gmems().iter().enumerate() {
            if gmem.mmap() && gmem.host_accessible() && !gmem.closed {
                views.push((ModelMemory::GmemMap(g), gmem.size / P));
            }
        }
        views
    }

    /// Compares every byte the host can see with the model's.
    pub(crate) fn compare_memory(&self, model: &mut Model) -> Result<(), String> {
        for (mem, pages) in Self::host_views(model) {
            for index in 0..pages {
                self.compare_page(model, mem, index)?;
            }
        }
        Ok(())
    }

    /// Compares one host-visible page with the model's, with `memcmp`; only
    /// a differing page is read out to name the first differing byte.
    pub(crate) fn compare_page(&self, model: &mut Model, mem: ModelMemory, index: u64) -> Result<(), String> {
        static ZERO: [u8; P as usize] = [0; P as usize];
        let real = self.memory(mem);
        let want = model.host_page(mem, index).map_err(|f| format!("model: host read of {mem:?} faults: {f:?}"))?;
        let want = want.unwrap_or(&ZERO);
        if real.matches(index * P, want) {
            return Ok(());
        }
        let mut got = vec![0u8; P as usize];
        real.read(index * P, &mut got);
        let i = (0..want.len()).find(|&i| want[i] != got[i]).unwrap_or(0);
        let word = i & !7;
        let w = |b: &[u8]| u64::from_le_bytes(b[word..word + 8].try_into().expect("8 bytes"));
        Err(format!(
            "host view of {} at offset {:#x}: model byte {:#04x}, kernel byte {:#04x} (u64 at {:#x}: \
             model {:#x}, kernel {:#x})",
            describe_memory(mem),
            index * P + i as u64,
            want[i],
            got[i],
            index * P + word as u64,
            w(want),
            w(&got)
        ))
    }
}

/// The host-visible pages `step` may write (before it runs on `model`): the
/// page of a host write, the host pages behind a guest write's GPA, a
/// fallocate's range of a host-mappable guest_memfd.
pub(crate) fn touched_pages(model: &Model, step: &Step) -> Vec<(ModelMemory, u64)> {
    let visible = |g: usize| model.gmems().get(g).is_some_and(|m| m.mmap() && m.host_accessible() && !m.closed);
    match *step {
        Step::HostWrite { mem: ModelMemory::GmemMap(g), .. } if !visible(g) => Vec::new(),
        Step::HostWrite { mem, offset, .. } => vec![(mem, offset / P)],
        Step::GuestWrite { gpa, .. } => {
            let Some(slot) = model.slot_at(gpa) else { return Vec::new() };
            let index = gpa / P - slot.base_gfn;
            let mut pages = Vec::new();
            match slot.user {
                UserMemory::Anon { anon, page } => pages.push((ModelMemory::Anon(anon), page + index)),
                UserMemory::GmemMap { gmem, page } if visible(gmem) => {
                    pages.push((ModelMemory::GmemMap(gmem), page + index))
                }
                _ => {}
            }
            if let Some((g, pgoff)) = slot.gmem.filter(|&(g, _)| visible(g)) {
                pages.push((ModelMemory::GmemMap(g), pgoff + index));
            }
            pages
        }
        Step::Fallocate { gmem, offset, len, .. } if visible(gmem) => {
            let pages = model.gmems()[gmem].size / P;
            let end = offset.saturating_add(len).div_ceil(P).min(pages);
            (offset / P..end).map(|i| (ModelMemory::GmemMap(gmem), i)).collect()
        }
        // A fallocate on a guest_memfd the host cannot see, and the steps
        // that write no host-visible memory themselves.
        Step::Fallocate { .. }
        | Step::CreateGmem { .. }
        | Step::SetRegion(_)
        | Step::SetAttributes { .. }
        | Step::CloseGmem { .. }
        | Step::GuestRead { .. }
        | Step::GuestExec { .. }
        | Step::HostRead { .. }
        | Step::PreFault { .. }
        | Step::HypercallExits { .. }
        | Step::MapGpaRange { .. }
        | Step::CloseVm => Vec::new(),
    }
}

pub(crate) fn describe_memory(mem: ModelMemory) -> String {
    match mem {
        ModelMemory::Anon(a) => format!("anon{a}"),
        ModelMemory::GmemMap(g) => format!("the mapping of gmem{g}"),
    }
}

/// The errno of a failed harness call, in the model's terms.
pub(crate) fn model_errno(e: &Error) -> Result<Errno, String> {
    let errno = e.errno().ok_or_else(|| format!("not an errno: {e}"))?;
    Errno::ALL
        .into_iter()
        .find(|m| m.raw() == errno as i32)
        .ok_or_else(|| format!("{errno:?} (unknown to the model): {e}"))
}
