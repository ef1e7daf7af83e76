//! Kinds of host memory behind a memslot's shared (`userspace_addr`) side,
//! as upstream's `-s` backing option chooses them: the private side is always
//! guest_memfd, but KVM's shared faults and invalidations take different
//! paths for THP, hugetlb and shmem pages.

use std::fmt;
use std::os::fd::AsFd;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::MapFlags;

use crate::error::{Error, Result, SysResult};
use crate::memory::HostMemory;
use crate::runner::Need;

const SZ_2M: u64 = 2 << 20;

/// A host memory backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory in 4 KiB pages.
    Anonymous,
    /// Private anonymous memory with `MADV_HUGEPAGE` (upstream
    /// `anonymous_thp`).
    AnonymousThp,
    /// A memfd (shmem) mapped shared (upstream `shmem`).
    Shmem,
    /// A 2 MiB hugetlbfs memfd mapped shared (upstream `shared_hugetlb`).
    SharedHugetlb2M,
}

impl Backing {
    /// Every backing, for tables of tests.
    pub const ALL: [Backing; 4] = [Backing::Anonymous, Backing::AnonymousThp, Backing::Shmem, Backing::SharedHugetlb2M];

    /// Short name for test names.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::AnonymousThp => "anonymous_thp",
            Backing::Shmem => "shmem",
            Backing::SharedHugetlb2M => "shared_hugetlb_2m",
        }
    }

    /// Allocate `len` bytes (a multiple of 2 MiB for the huge backings),
    /// aligned to 2 MiB where huge pages can back it.
    pub fn allocate(self, len: u64) -> Result<HostMemory> {
        if self != Backing::Anonymous && len % SZ_2M != 0 {
            return Err(Error::misuse(format!("{self} backing of {len:#x} bytes: not a multiple of 2 MiB")));
        }
        match self {
            Backing::Anonymous => HostMemory::anonymous(len),
            Backing::AnonymousThp => {
                // 2 MiB aligned, so each 2 MiB can be one huge page (the
                // kernel's own THP alignment of anonymous mappings, 6.7 on,
                // depends on the version and the size); the advice makes
                // the faults use huge pages.
                let mem = HostMemory::anonymous_aligned(len, SZ_2M)?;
                mem.advise_hugepages()?;
                Ok(mem)
            }
            Backing::Shmem => Self::memfd(c"kvm-selftests-shmem", MFdFlags::empty(), len),
            Backing::SharedHugetlb2M => {
                Self::memfd(c"kvm-selftests-hugetlb", MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB, len)
            }
        }
    }

    fn memfd(name: &std::ffi::CStr, flags: MFdFlags, len: u64) -> Result<HostMemory> {
        let fd =
            memfd_create(name, flags | MFdFlags::MFD_CLOEXEC).sys(|| format!("memfd_create({name:?}, {flags:?})"))?;
        nix::unistd::ftruncate(&fd, len as i64).sys(|| format!("ftruncate(memfd, {len:#x})"))?;
        // The mapping keeps the file alive once the fd is closed.
        HostMemory::map_fd_aligned(fd.as_fd(), 0, len, SZ_2M, MapFlags::MAP_SHARED)
    }

    /// What the running system must provide for `len` bytes of this backing:
    /// free 2 MiB huge pages for hugetlb (the VM runner reserves some).
    pub fn need(self, len: u64) -> Option<Need> {
        (self == Backing::SharedHugetlb2M).then(|| {
            let pages = len.div_ceil(SZ_2M);
            Need::Check(Box::new(move |_| match free_huge_pages_2m() {
                Some(free) if free >= pages => Ok(()),
                Some(free) => Err(format!(
                    "needs {pages} free 2 MiB huge pages: /proc/meminfo HugePages_Free = {free} (set \
                     /proc/sys/vm/nr_hugepages)"
                )),
                None => Err("needs 2 MiB huge pages: /proc/meminfo has no HugePages_Free (no hugetlbfs)".into()),
            }))
        })
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `HugePages_Free` when the default huge page size is 2 MiB.
fn free_huge_pages_2m() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    (field("Hugepagesize:")? == 2048).then_some(())?;
    field("HugePages_Free:")
}
