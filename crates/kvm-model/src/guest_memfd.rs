//! `KVM_CREATE_GUEST_MEMFD`, closing a guest_memfd, and `fallocate()` /
//! `FALLOC_FL_PUNCH_HOLE` on one.

use super::*;

impl Model {
    /// `KVM_CREATE_GUEST_MEMFD`.
    pub fn create_guest_memfd(&mut self, size: u64, flags: u64) -> Result<GmemId, Errno> {
        if !self.profile.guest_memfd {
            // kvm_vm_ioctl(): without CONFIG_KVM_PRIVATE_MEM (6.12) /
            // CONFIG_KVM_GUEST_MEMFD (7.x) the ioctl falls to
            // kvm_arch_vm_ioctl(), which knows no such request.
            return Err(Errno::ENOTTY);
        }
        // kvm_gmem_create(): unknown flags first (6.12: no flag is valid;
        // 7.x: kvm_gmem_get_supported_flags()), then the size.
        if flags & !self.profile.guest_memfd_flags != 0 {
            return Err(Errno::EINVAL);
        }
        // kvm_gmem_create(): `size <= 0 || !PAGE_ALIGNED(size)` (loff_t, signed).
        if (size as i64) <= 0 || !page_aligned(size) {
            return Err(Errno::EINVAL);
        }
        self.gmems.push(Gmem { size, flags, pages: BTreeMap::new(), closed: false, released: false });
        Ok(self.gmems.len() - 1)
    }

    /// The host closes guest_memfd `gmem`'s fd and unmaps its own mapping
    /// of it. The file lives on while a memslot's userspace_addr maps it
    /// (a mapping holds a file reference); bindings hold none.
    pub fn close_guest_memfd(&mut self, gmem: GmemId) {
        self.gmems[gmem].closed = true;
        self.release_if_unreferenced(gmem);
    }

    pub(crate) fn release_if_unreferenced(&mut self, gmem: GmemId) {
        let mapped = self.slots.values().any(|s| matches!(s.user, UserMemory::GmemMap { gmem: g, .. } if g == gmem));
        let file = &mut self.gmems[gmem];
        if file.closed && !mapped && !file.released {
            file.released = true;
            file.pages.clear();
        }
    }

    pub(crate) fn slot_bound_pages(&self, gmem: GmemId) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots.values().filter_map(move |s| match s.gmem {
            Some((g, pgoff)) if g == gmem => Some((pgoff, pgoff + s.npages)),
            _ => None,
        })
    }

    /// `fallocate()` on guest_memfd `gmem`.
    pub fn fallocate(&mut self, gmem: GmemId, mode: Fallocate, offset: u64, len: u64) -> Result<(), Errno> {
        // vfs_fallocate(): `offset < 0 || len <= 0` (loff_t, signed).
        if (offset as i64) < 0 || (len as i64) <= 0 {
            return Err(Errno::EINVAL);
        }
        // vfs_fallocate(): past s_maxbytes or wrapping.
        if (offset as i64).checked_add(len as i64).is_none() {
            return Err(Errno::EFBIG);
        }
        // kvm_gmem_fallocate(): both offset and length page aligned.
        if !page_aligned(offset) || !page_aligned(len) {
            return Err(Errno::EINVAL);
        }
        let file = &mut self.gmems[gmem];
        let (start, end) = (offset >> PAGE_SHIFT, (offset + len) >> PAGE_SHIFT);
        match mode {
            Fallocate::Allocate => {
                // kvm_gmem_allocate(): "Dedicated guest is immutable by default."
                if offset + len > file.size {
                    return Err(Errno::EINVAL);
                }
                // New pages are zero when first used (kvm_gmem_get_pfn(),
                // kvm_gmem_fault_user_mapping() clear them).
                for index in start..end {
                    file.pages.entry(index).or_insert_with(zero_page);
                }
            }
            Fallocate::PunchHole => {
                // kvm_gmem_punch_hole(): truncate_inode_pages_range() frees
                // whatever lies in the range, past the end included
                // (nothing there); mappings are invalidated, so the next
                // access sees a fresh zero page.
                let doomed: Vec<u64> = file.pages.range(start..end).map(|(i, _)| *i).collect();
                for index in doomed {
                    file.pages.remove(&index);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn gmem_page_mut(&mut self, gmem: GmemId, index: u64) -> &mut [u8] {
        page_mut(&mut self.gmems[gmem].pages, index)
    }

    /// Page `index` of guest_memfd `gmem`, allocated from now on.
    pub(crate) fn gmem_page(&mut self, gmem: GmemId, index: u64) -> &[u8] {
        &self.gmems[gmem].pages.entry(index).or_insert_with(zero_page)[..]
    }
}
