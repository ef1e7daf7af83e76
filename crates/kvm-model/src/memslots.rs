//! `KVM_SET_USER_MEMORY_REGION2`: create, move, flags-only change and
//! delete, with the guest_memfd binding rules in the kernel's check order.

use super::*;

impl Model {
    /// `KVM_SET_USER_MEMORY_REGION2`, in the order of the kernel's checks.
    pub fn set_memory_region(&mut self, mem: &MemoryRegion) -> Result<Change, Errno> {
        let (as_id, id) = (mem.as_id(), mem.id());
        // kvm_vm_ioctl_set_memory_region(): userspace may not name the
        // internal slots.
        if id >= KVM_USER_MEM_SLOTS {
            return Err(Errno::EINVAL);
        }
        self.check_region_flags(mem.flags)?;
        let npages = self.check_region_geometry(mem)?;
        let old = self.slots.get(&(as_id, id)).cloned();
        if mem.size == 0 {
            // Deleting a slot that does not exist.
            return match old {
                None => Err(Errno::EINVAL),
                Some(old) => {
                    self.slots.remove(&(as_id, id));
                    self.memslot_generation_moved();
                    self.obsolete_roots |= self.profile.slot_zap_all;
                    // The slot's userspace mapping of a closed guest_memfd
                    // may have been the file's last reference.
                    if let UserMemory::GmemMap { gmem, .. } = old.user {
                        self.release_if_unreferenced(gmem);
                    }
                    Ok(Change::Delete)
                }
            };
        }
        let base_gfn = mem.gpa >> PAGE_SHIFT;
        let change = match &old {
            None => Change::Create,
            Some(old) => Self::classify_change(mem, old, base_gfn, npages)?,
        };
        if change == Change::Unchanged {
            return Ok(change);
        }
        // kvm_check_memslot_overlap(): another slot of the same address
        // space over any of the GFNs.
        if matches!(change, Change::Create | Change::Move)
            && self.slots.values().any(|s| {
                s.as_id == as_id && s.id != id && s.base_gfn < base_gfn + npages && base_gfn < s.base_gfn + s.npages
            })
        {
            return Err(Errno::EEXIST);
        }
        let (gmem, gmem_only) = if change == Change::Create && mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            self.bind_guest_memfd(mem, npages)?
        } else {
            (None, false)
        };
        match change {
            Change::Create => {
                let slot = Slot { as_id, id, flags: mem.flags, base_gfn, npages, user: mem.user, gmem, gmem_only };
                self.slots.insert((as_id, id), slot);
            }
            Change::Move | Change::FlagsOnly => {
                let slot = self.slots.get_mut(&(as_id, id)).expect("modified slot exists");
                slot.base_gfn = base_gfn;
                slot.flags = mem.flags;
                self.obsolete_roots |= change == Change::Move && self.profile.slot_zap_all;
            }
            Change::Delete | Change::Unchanged => unreachable!("handled above"),
        }
        self.memslot_generation_moved();
        Ok(change)
    }

    /// check_memory_region_flags().
    pub(crate) fn check_region_flags(&self, flags: u32) -> Result<(), Errno> {
        let mut valid = KVM_MEM_LOG_DIRTY_PAGES;
        if self.profile.guest_memfd_slots {
            // 6.12: kvm_arch_has_private_mem(); 7.x: CONFIG_KVM_GUEST_MEMFD.
            valid |= KVM_MEM_GUEST_MEMFD;
        }
        if flags & KVM_MEM_GUEST_MEMFD != 0 {
            // "Dirty logging private memory is not currently supported."
            valid &= !KVM_MEM_LOG_DIRTY_PAGES;
        }
        if self.profile.readonly_mem && flags & KVM_MEM_GUEST_MEMFD == 0 {
            // kvm_arch_has_readonly_mem(); never with GUEST_MEMFD.
            valid |= KVM_MEM_READONLY;
        }
        if flags & !valid != 0 {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// kvm_set_memory_region()'s "General sanity checks", in order; the
    /// slot's page count. userspace_addr is always page aligned and
    /// access_ok() here: it is symbolic.
    pub(crate) fn check_region_geometry(&self, mem: &MemoryRegion) -> Result<u64, Errno> {
        if !page_aligned(mem.size) || !page_aligned(mem.gpa) {
            return Err(Errno::EINVAL);
        }
        let offset = mem.guest_memfd.map_or(0, |(_, offset)| offset);
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 && (!page_aligned(offset) || offset.checked_add(mem.size).is_none()) {
            return Err(Errno::EINVAL);
        }
        if mem.as_id() >= u32::from(self.profile.address_spaces) || mem.id() >= KVM_MEM_SLOTS_NUM {
            return Err(Errno::EINVAL);
        }
        if mem.gpa.checked_add(mem.size).is_none() {
            return Err(Errno::EINVAL);
        }
        let npages = mem.size >> PAGE_SHIFT;
        if npages > KVM_MEM_MAX_NR_PAGES {
            return Err(Errno::EINVAL);
        }
        Ok(npages)
    }

    /// What a request for an existing slot changes (kvm_set_memory_region()).
    pub(crate) fn classify_change(mem: &MemoryRegion, old: &Slot, base_gfn: u64, npages: u64) -> Result<Change, Errno> {
        // "Private memslots are immutable, they can only be deleted."
        if mem.flags & KVM_MEM_GUEST_MEMFD != 0 {
            return Err(Errno::EINVAL);
        }
        if mem.user != old.user
            || npages != old.npages
            || (mem.flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD) != 0
        {
            return Err(Errno::EINVAL);
        }
        Ok(if base_gfn != old.base_gfn {
            Change::Move
        } else if mem.flags != old.flags {
            Change::FlagsOnly
        } else {
            Change::Unchanged
        })
    }

    /// The guest_memfd binding of a new slot: 6.12 kvm_gmem_bind(); 7.x
    /// kvm_gmem_prepare_memory_region() then kvm_gmem_commit_memory_region().
    /// Returns the file and first page, and whether the slot is
    /// guest_memfd-only.
    pub(crate) fn bind_guest_memfd(
        &mut self,
        mem: &MemoryRegion,
        npages: u64,
    ) -> Result<(Option<(GmemId, u64)>, bool), Errno> {
        let (fd, offset) = mem.guest_memfd.unwrap_or((GmemFd::NotGuestMemfd, 0));
        let g = match fd {
            // fget() fails.
            GmemFd::Closed => return Err(Errno::EBADF),
            // `file->f_op != &kvm_gmem_fops`.
            GmemFd::NotGuestMemfd => return Err(Errno::EINVAL),
            GmemFd::File(g) => g,
        };
        let file = &self.gmems[g];
        // `!PAGE_ALIGNED(offset) || offset + size > i_size_read(inode)`.
        if !page_aligned(offset) || offset + mem.size > file.size {
            return Err(Errno::EINVAL);
        }
        let start = offset >> PAGE_SHIFT;
        let end = start + npages;
        // The xarray of bindings already holds a slot in [start, end):
        // 6.12 kvm_gmem_bind() fails with its initial -EINVAL; after the
        // binding rework (7.2, 6.12.118) kvm_gmem_commit_memory_region()
        // returns -EEXIST.
        if self.slot_bound_pages(g).any(|(s, e)| s < end && start < e) {
            return Err(self.apply_rule(versioned::GMEM_BINDING_OVERLAP.id, self.profile.rules.gmem_binding_overlap));
        }
        // 7.x: `if (kvm_gmem_supports_mmap(inode)) slot->flags |=
        // KVM_MEMSLOT_GMEM_ONLY`.
        Ok((Some((g, start)), file.mmap()))
    }

    /// kvm_swap_active_memslots() moves the memslot generation on: MMIO
    /// SPTEs stay but go stale (check_mmio_spte()). Deleting or moving a
    /// memslot zaps every root only for default VMs
    /// (kvm_arch_flush_shadow_memslot(), KVM_X86_QUIRK_SLOT_ZAP_ALL), whose
    /// memory is never private, so the stale state only matters where it is
    /// kept; other VMs zap just the memslot's present leaves, and MMIO SPTEs
    /// are not present ones.
    pub(crate) fn memslot_generation_moved(&mut self) {
        self.mmio_sptes.values_mut().for_each(|s| *s = MmioSpte::Stale);
    }
}
