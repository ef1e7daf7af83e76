//! Host reads and writes through the memory a slot's `userspace_addr`
//! points at: anonymous memory or an `mmap()` of a guest_memfd.

use super::*;

impl Model {
    pub(crate) fn host_check(&self, mem: HostMemory, offset: u64, len: u64) -> Result<(), HostFault> {
        match mem {
            HostMemory::Anon(a) => {
                assert!(offset + len <= self.anons[a].npages * PAGE_SIZE, "host access outside anon {a}");
                Ok(())
            }
            HostMemory::GmemMap(g) => {
                let file = &self.gmems[g];
                assert!(file.mmap(), "guest_memfd {g} cannot be mapped (no GUEST_MEMFD_FLAG_MMAP)");
                // kvm_gmem_fault_user_mapping(): SIGBUS past i_size or on
                // memory that is not shared.
                if offset + len > file.size || !file.host_accessible() {
                    return Err(HostFault::Sigbus);
                }
                Ok(())
            }
        }
    }

    /// The host reads `buf.len()` bytes at `offset` of `mem`.
    pub fn host_read(&mut self, mem: HostMemory, offset: u64, buf: &mut [u8]) -> Result<(), HostFault> {
        self.host_check(mem, offset, buf.len() as u64)?;
        match mem {
            HostMemory::Anon(a) => self.anons[a].read(offset, buf),
            HostMemory::GmemMap(g) => {
                // A read fault allocates the page (kvm_gmem_get_folio()).
                let end = offset + buf.len() as u64;
                for index in offset / PAGE_SIZE..end.div_ceil(PAGE_SIZE) {
                    self.gmem_page(g, index);
                }
                self.gmems[g].read(offset, buf);
            }
        }
        Ok(())
    }

    /// Page `index` of `mem` as the host sees it, `None` where it reads as
    /// zeroes; a fault on a guest_memfd mapping allocates the page as
    /// [`Self::host_read`] does. Lets a test compare page by page without
    /// copying.
    pub fn host_page(&mut self, mem: HostMemory, index: u64) -> Result<Option<&[u8]>, HostFault> {
        self.host_check(mem, index * PAGE_SIZE, PAGE_SIZE)?;
        Ok(match mem {
            HostMemory::Anon(a) => self.anons[a].pages.get(&index).map(|p| &p[..]),
            HostMemory::GmemMap(g) => Some(self.gmem_page(g, index)),
        })
    }

    /// The host writes `data` at `offset` of `mem`.
    pub fn host_write(&mut self, mem: HostMemory, offset: u64, data: &[u8]) -> Result<(), HostFault> {
        self.host_check(mem, offset, data.len() as u64)?;
        match mem {
            HostMemory::Anon(a) => write_pages(&mut self.anons[a].pages, offset, data),
            HostMemory::GmemMap(g) => write_pages(&mut self.gmems[g].pages, offset, data),
        }
        Ok(())
    }
}
