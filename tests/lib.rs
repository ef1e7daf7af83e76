//! Shared pieces of the KVM scenario binaries.

#![warn(missing_docs)]

use std::sync::Arc;

pub mod huge_regions;

use kvm_harness::{HostMemory, Region, Result};

/// Size of the memslots the negative memslot tests use: one 2 MiB page.
pub const SLOT_SIZE: u64 = 2 << 20;

/// A guest physical address no x86 KVM maps: 2^52, past the architectural
/// MAXPHYADDR, so past `kvm_mmu_max_gfn()` whatever the host.
pub const BEYOND_MAX_GPA: u64 = 1 << 52;

/// A valid anonymous-memory region for slot `slot` at `gpa`: every field
/// acceptable, so that a test changing one field isolates one rule.
pub fn valid_region(slot: u32, gpa: u64) -> Result<Region> {
    Ok(Region::new(slot, gpa, Arc::new(HostMemory::anonymous(SLOT_SIZE)?)))
}
