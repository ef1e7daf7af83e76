//! Shrinking a failing sequence with proptest's shrink loop, bounded.

use super::*;

/// proptest's shrink loop, bounded: simplify while the sequence still
/// fails, complicate back when a simplification made it pass.
pub(crate) fn shrink(
    vms: &Vms,
    profile: &Profile,
    tree: &mut <Sequences as Strategy>::Tree,
    steps: Vec<Step>,
    first: Mismatch,
) -> (Vec<Step>, Mismatch, u32) {
    let mut best = (steps, first);
    let start = Instant::now();
    let mut runs = 0;
    if !tree.simplify() {
        return (best.0, best.1, runs);
    }
    while runs < MAX_SHRINK_RUNS && start.elapsed() < SHRINK_BUDGET {
        runs += 1;
        let (_, steps, seen) = tree.current();
        match run_sequence(vms, profile, &steps, seen.as_deref()) {
            Err(mismatch) => {
                best = (steps, mismatch);
                if !tree.simplify() {
                    break;
                }
            }
            Ok(()) => {
                if !tree.complicate() {
                    break;
                }
            }
        }
    }
    (best.0, best.1, runs)
}
