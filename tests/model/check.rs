//! Running a sequence on both sides and comparing them after each step,
//! with the time each side took.

use super::*;

/// Where a test thread's time went, for the summary line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Times {
    pub(crate) generate: Duration,
    pub(crate) setup: Duration,
    pub(crate) guest: Duration,
    pub(crate) calls: Duration,
    pub(crate) model: Duration,
    pub(crate) compare: Duration,
    pub(crate) liveness: Duration,
    pub(crate) teardown: Duration,
    pub(crate) guest_steps: usize,
    pub(crate) other_steps: usize,
    /// Guest steps after which `pages_2m` was read, and those after which
    /// KVM held a 2 MiB mapping ([`Windows::Huge`]).
    pub(crate) huge_counted_steps: usize,
    pub(crate) huge_mapped_steps: usize,
}

thread_local! {
    pub(crate) static TIMES: std::cell::Cell<Times> = std::cell::Cell::new(Times::default());
}

/// Adds the time since `start` to one of the thread's `Times` fields.
pub(crate) fn charge(start: Instant, field: fn(&mut Times) -> &mut Duration) {
    let elapsed = start.elapsed();
    TIMES.with(|t| {
        let mut times = t.get();
        *field(&mut times) += elapsed;
        t.set(times);
    });
}

impl Times {
    pub(crate) fn take() -> Self {
        TIMES.with(|t| t.replace(Times::default()))
    }

    pub(crate) fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per = |d: Duration, n: usize| if n == 0 { 0.0 } else { ms(d) / n as f64 };
        format!(
            "generation {:.0} ms, VM setup {:.0} ms, guest steps {:.0} ms ({} steps, {:.2} ms each), other calls {:.0} ms ({} steps, {:.2} ms each), model {:.0} ms, host byte checks {:.0} ms, liveness checks {:.0} ms, teardown {:.0} ms",
            ms(self.generate),
            ms(self.setup),
            ms(self.guest),
            self.guest_steps,
            per(self.guest, self.guest_steps),
            ms(self.calls),
            self.other_steps,
            per(self.calls, self.other_steps),
            ms(self.model),
            ms(self.compare),
            ms(self.liveness),
            ms(self.teardown)
        )
    }
}

/// Runs `steps` on a fresh VM and the model, comparing after each step.
pub(crate) fn run_sequence(
    vms: &Vms,
    profile: &Profile,
    steps: &[Step],
    seen: Option<&AtomicUsize>,
) -> Result<(), Mismatch> {
    let t = Instant::now();
    let mut real = vms.next().map_err(|e| Mismatch { step: 0, detail: format!("setup: {e}") })?;
    let mut model = initial_model(profile, vms.windows());
    charge(t, |t| &mut t.setup);
    let full = matches!(vms, Vms::InLine { .. });
    let result = check_steps(&mut real, &mut model, steps, seen, full);
    let t = Instant::now();
    vms.release(real);
    charge(t, |t| &mut t.teardown);
    result
}

/// Applies `steps` to both sides, comparing after each: the outcome, and
/// the host-visible bytes. With `full`, every host-visible byte after every
/// step; otherwise the pages a step may write, before and after it, and
/// every byte after the last step. That misses nothing: a byte on which the
/// kernel and the model part stays parted until a step writes its page,
/// and that step checks the page first; the last check sees the rest. A
/// mismatch is then replayed with `full` while it shrinks, so the reported
/// step is the one that made the difference.
pub(crate) fn check_steps(
    real: &mut Real,
    model: &mut Model,
    steps: &[Step],
    seen: Option<&AtomicUsize>,
    full: bool,
) -> Result<(), Mismatch> {
    for (i, step) in steps.iter().enumerate() {
        if let Some(seen) = seen {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        let fail = |detail: String| Mismatch { step: i, detail };
        let mut pages = if full { Vec::new() } else { touched_pages(model, step) };
        let t = Instant::now();
        let checked = pages.iter().try_for_each(|&(mem, index)| real.compare_page(model, mem, index));
        charge(t, |t| &mut t.compare);
        checked.map_err(|e| fail(format!("before {step:x?}: {e}")))?;
        let gmems_before = model.gmems().len();
        let t = Instant::now();
        let expected = apply_model(model, step);
        let undecided = model.take_undecided();
        charge(t, |t| &mut t.model);
        let t = Instant::now();
        let actual = real.apply(step, &expected);
        let guest = step.runs_guest();
        charge(t, if guest { |t: &mut Times| &mut t.guest } else { |t: &mut Times| &mut t.calls });
        let huge = if guest { real.huge_mapped().map_err(|e| fail(format!("after {step:x?}: {e}")))? } else { None };
        TIMES.with(|t| {
            let mut times = t.get();
            *(if guest { &mut times.guest_steps } else { &mut times.other_steps }) += 1;
            if let Some(mapped) = huge {
                times.huge_counted_steps += 1;
                times.huge_mapped_steps += usize::from(mapped);
            }
            t.set(times);
        });
        let actual = actual.map_err(|e| fail(format!("{step:x?}: expected {expected:x?}, got {e}")))?;
        if undecided.is_some() {
            // The model assumed the undecided rule's `before`; the kernel
            // may give either, the same in every check of the run.
            accept_undecided(undecided, &actual).map_err(|e| fail(format!("{step:x?}: {e}")))?;
        } else if actual != expected {
            return Err(fail(format!("{step:x?}: expected {}, got {}", show(&expected), show(&actual))));
        }
        // A new host-mappable guest_memfd is checked whole.
        pages.extend(
            Real::host_views(model)
                .into_iter()
                .filter(|(mem, _)| matches!(mem, ModelMemory::GmemMap(g) if *g >= gmems_before))
                .flat_map(|(mem, n)| (0..n).map(move |i| (mem, i))),
        );
        let t = Instant::now();
        let compared = if full || i + 1 == steps.len() {
            real.compare_memory(model)
        } else {
            pages.iter().try_for_each(|&(mem, index)| real.compare_page(model, mem, index))
        };
        charge(t, |t| &mut t.compare);
        compared.map_err(|e| fail(format!("after {step:x?}: {e}")))?;
        let t = Instant::now();
        let alive = real.check_alive();
        charge(t, |t| &mut t.liveness);
        alive.map_err(|e| fail(format!("after {step:x?}, which succeeded as the model says: {e}")))?;
    }
    // Leave the agent cleanly: DONE, which is also the sequence's last
    // guest round trip.
    if let Some((agent, _)) = real.agent.take() {
        agent.done().map_err(|e| Mismatch { step: steps.len(), detail: format!("agent DONE: {e}") })?;
    }
    Ok(())
}

/// Holds the errno of a step whose rule is undecided on this kernel to the
/// rule's outcomes, and to the one every other check of the run saw.
pub(crate) fn accept_undecided(rule: Option<&'static str>, actual: &Outcome) -> std::result::Result<(), String> {
    use kvm_harness::kernel_rules::{ForRunningKernel, GMEM_BINDING_OVERLAP};
    match (rule, actual) {
        (Some(id), Outcome::Call(Err(got))) if id == GMEM_BINDING_OVERLAP.id => {
            GMEM_BINDING_OVERLAP.expected().map_err(|e| e.to_string())?.check(*got)
        }
        (rule, actual) => {
            Err(format!("undecided rule {rule:?} gave an outcome the model cannot judge: {}", show(actual)))
        }
    }
}

/// Where sequences get their VMs and leave them. Exploring prepares each
/// VM (with its agent started) on a helper thread while the previous
/// sequence runs, and destroys finished ones on another, so the kernel's
/// VM creation and teardown (SRCU grace periods included) overlap the
/// sequences; shrinking and reproducing make them in line.
pub(crate) enum Vms {
    InLine { kvm: Arc<Kvm>, vm_type: VmType, windows: Windows },
    Pipelined { ready: std::sync::mpsc::Receiver<Result<Real>>, done: std::sync::mpsc::Sender<Real>, windows: Windows },
}

impl Vms {
    /// The pipelined source and its two helper threads; dropping the
    /// source ends them, joining them waits until every VM is gone.
    pub(crate) fn pipelined(
        kvm: &Arc<Kvm>,
        vm_type: VmType,
        windows: Windows,
    ) -> (Self, [std::thread::JoinHandle<()>; 2]) {
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let (done, done_rx) = std::sync::mpsc::channel::<Real>();
        let kvm = kvm.clone();
        let maker = std::thread::spawn(move || while ready_tx.send(Real::started(&kvm, vm_type, windows)).is_ok() {});
        let reaper = std::thread::spawn(move || done_rx.into_iter().for_each(drop));
        (Self::Pipelined { ready, done, windows }, [maker, reaper])
    }

    pub(crate) fn windows(&self) -> Windows {
        match self {
            Self::InLine { windows, .. } | Self::Pipelined { windows, .. } => *windows,
        }
    }

    pub(crate) fn next(&self) -> Result<Real> {
        match self {
            Self::InLine { kvm, vm_type, windows } => Real::started(kvm, *vm_type, *windows),
            Self::Pipelined { ready, .. } => {
                // The maker thread sends until this receiver is gone: it ended
                // early only by panicking, which joining it reports in full.
                ready.recv().map_err(|_| Error::Panic {
                    thread: "the VM-making thread".into(),
                    message: "it ended without handing over a VM".into(),
                })?
            }
        }
    }

    pub(crate) fn release(&self, real: Real) {
        match self {
            Self::InLine { .. } => drop(real),
            Self::Pipelined { done, .. } => {
                if let Err(back) = done.send(real) {
                    drop(back.0);
                }
            }
        }
    }
}
