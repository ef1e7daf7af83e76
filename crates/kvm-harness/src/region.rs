//! Memslot requests: a [`Region`] (what `KVM_SET_USER_MEMORY_REGION(2)`
//! is asked) and its guest_memfd binding, kept apart from the VM so that a
//! vCPU can hold its VM's memslots alive without depending on the VM.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region2;

use crate::error::{Error, Result};
use crate::memory::{GuestMemfd, HostMemory};
use crate::uapi;

/// What a memslot's guest_memfd binding points at.
#[derive(Debug, Clone)]
pub enum GmemBinding {
    /// A guest_memfd (kept alive by the slot).
    Memfd(Arc<GuestMemfd>),
    /// Any fd, for tests that check what the kernel rejects.
    RawFd(RawFd),
}

impl GmemBinding {
    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Self::Memfd(gmem) => gmem.as_raw_fd(),
            Self::RawFd(fd) => *fd,
        }
    }
}

/// A `KVM_SET_USER_MEMORY_REGION(2)` request.
///
/// The harness keeps `memory` (and a guest_memfd binding) alive for as long
/// as the kernel holds the slot, so a guest never writes into freed memory.
#[derive(Debug, Clone)]
pub struct Region {
    /// Slot id including the address space in bits 16 and up.
    pub slot: u32,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// First guest physical address.
    pub gpa: u64,
    /// Size in bytes (0 deletes the slot).
    pub size: u64,
    /// Host memory backing the shared view (None: userspace_addr 0).
    pub memory: Option<Arc<HostMemory>>,
    /// Offset of the slot's first byte in `memory`.
    pub memory_offset: u64,
    /// guest_memfd and offset, passed as given; the `KVM_MEM_GUEST_MEMFD` flag
    /// is separate ([`Region::with_guest_memfd`] sets both), so tests can send
    /// one without the other.
    pub guest_memfd: Option<(GmemBinding, u64)>,
}

impl Region {
    /// A slot backed by `memory` from its start.
    pub fn new(slot: u32, gpa: u64, memory: Arc<HostMemory>) -> Self {
        let size = memory.len();
        Self { slot, flags: 0, gpa, size, memory: Some(memory), memory_offset: 0, guest_memfd: None }
    }

    /// Binds a guest_memfd at `offset` and sets `KVM_MEM_GUEST_MEMFD`.
    pub fn with_guest_memfd(mut self, gmem: GmemBinding, offset: u64) -> Self {
        self.flags |= kvm_bindings::KVM_MEM_GUEST_MEMFD;
        self.guest_memfd = Some((gmem, offset));
        self
    }

    /// Places the slot in address space `as_id`.
    pub fn in_address_space(mut self, as_id: u16) -> Self {
        self.slot = (self.slot & 0xffff) | u32::from(as_id) << uapi::ADDRESS_SPACE_SHIFT;
        self
    }

    /// The same slot with size 0: the delete request.
    pub fn deletion(&self) -> Self {
        Self { size: 0, ..self.clone() }
    }

    /// The `KVM_SET_USER_MEMORY_REGION2` request for this region.
    pub(crate) fn raw(&self) -> Result<kvm_userspace_memory_region2> {
        let (guest_memfd, guest_memfd_offset) = match &self.guest_memfd {
            Some((binding, offset)) => (binding.raw_fd() as u32, *offset),
            None => (0, 0),
        };
        Ok(kvm_userspace_memory_region2 {
            slot: self.slot,
            flags: self.flags,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.userspace_addr()?,
            guest_memfd_offset,
            guest_memfd,
            ..Default::default()
        })
    }

    fn userspace_addr(&self) -> Result<u64> {
        match &self.memory {
            None => Ok(0),
            Some(memory) => {
                if self.memory_offset.checked_add(self.size).is_none_or(|end| end > memory.len()) {
                    return Err(Error::Misuse(format!(
                        "slot {:#x}: [{:#x}, +{:#x}) exceeds its {:#x}-byte backing",
                        self.slot,
                        self.memory_offset,
                        self.size,
                        memory.len()
                    )));
                }
                Ok(memory.addr() + self.memory_offset)
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        let gmem = match &self.guest_memfd {
            Some((b, off)) => format!(", guest_memfd fd {} offset {off:#x}", b.raw_fd()),
            None => String::new(),
        };
        format!(
            "slot {} as_id {}, flags {:#x}, gpa {:#x}, size {:#x}{gmem}",
            self.slot & 0xffff,
            self.slot >> uapi::ADDRESS_SPACE_SHIFT,
            self.flags,
            self.gpa,
            self.size
        )
    }
}
