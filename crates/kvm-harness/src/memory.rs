//! Host memory backing guest memory: anonymous mappings and guest_memfd.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, FileStat};

use crate::error::{Error, Result, SysResult};

/// Host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).expect("sysconf(_SC_PAGESIZE) is positive")
}

/// A host mapping (anonymous or of a file) that is unmapped on drop.
///
/// Guest memory is written concurrently by vCPUs, so all access goes through
/// raw-pointer copies, never through Rust references into the mapping.
#[derive(Debug)]
pub struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access is by raw
// copies that tolerate concurrent writers (the guest), so sharing it across
// threads adds nothing a vCPU does not already do.
unsafe impl Send for HostMemory {}
// SAFETY: as for Send: no method hands out references into the mapping.
unsafe impl Sync for HostMemory {}

impl HostMemory {
    /// A private anonymous read-write mapping of `len` bytes (zero-filled).
    pub fn anonymous(len: u64) -> Result<Self> {
        let size = std::num::NonZeroUsize::new(len as usize)
            .ok_or_else(|| Error::Misuse("a host mapping cannot be empty".into()))?;
        // SAFETY: a fresh anonymous mapping aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .sys(|| format!("mmap(anonymous, {len:#x} bytes)"))?;
        Ok(Self { ptr: ptr.cast(), len: len as usize })
    }

    /// [`Self::anonymous`] at an address that is a multiple of `align` (a
    /// power of two), e.g. so each 2 MiB of it can be one transparent huge
    /// page whatever the kernel's own placement of anonymous mappings.
    pub(crate) fn anonymous_aligned(len: u64, align: u64) -> Result<Self> {
        if !align.is_power_of_two() || len == 0 {
            return Err(Error::Misuse(format!("aligned anonymous mapping of {len:#x} bytes at alignment {align:#x}")));
        }
        // Map more than needed, then give back the unaligned head and the tail.
        let reserved = Self::anonymous(len + align)?;
        let start = (reserved.addr() + align - 1) & !(align - 1);
        let head = (start - reserved.addr()) as usize;
        let tail = (reserved.len() - head as u64 - len) as usize;
        let base = reserved.ptr;
        std::mem::forget(reserved);
        // SAFETY: base + head is inside the reservation, which we own.
        let aligned = unsafe { base.add(head) };
        if head > 0 {
            // SAFETY: the reservation's head is ours and nothing refers to it.
            unsafe { munmap(base.cast(), head) }.sys(|| "munmap(reservation head)".to_string())?;
        }
        if tail > 0 {
            // SAFETY: the tail after [aligned, aligned + len) is ours and unused.
            let tail_start = unsafe { aligned.add(len as usize) };
            // SAFETY: as above.
            unsafe { munmap(tail_start.cast(), tail) }.sys(|| "munmap(reservation tail)".to_string())?;
        }
        Ok(Self { ptr: aligned, len: len as usize })
    }

    /// A mapping of `fd` at `offset` with the given flags (`MAP_SHARED`, `MAP_PRIVATE`).
    pub(crate) fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: u64, flags: MapFlags) -> Result<Self> {
        let size = std::num::NonZeroUsize::new(len as usize)
            .ok_or_else(|| Error::Misuse("a host mapping cannot be empty".into()))?;
        // SAFETY: a new mapping chosen by the kernel aliases no Rust object.
        let ptr =
            unsafe { mmap(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, flags, fd, offset as libc::off_t) }
                .sys(|| format!("mmap(fd {}, offset {offset:#x}, {len:#x} bytes, {flags:?})", fd.as_raw_fd()))?;
        Ok(Self { ptr: ptr.cast(), len: len as usize })
    }

    /// A read-write mapping of `fd` at `offset` (with `flags`, e.g.
    /// `MAP_SHARED`) whose address is a multiple of `align` (a power of two),
    /// e.g. so a 2 MiB range can be mapped by one huge page.
    pub fn map_fd_aligned(fd: BorrowedFd<'_>, offset: u64, len: u64, align: u64, flags: MapFlags) -> Result<Self> {
        if !align.is_power_of_two() || len == 0 {
            return Err(Error::Misuse(format!("aligned mapping of {len:#x} bytes at alignment {align:#x}")));
        }
        // Reserve room for any alignment, place the file mapping inside with
        // MAP_FIXED, then give back the unused head and tail.
        let reserved = Self::anonymous(len + align)?;
        let start = (reserved.addr() + align - 1) & !(align - 1);
        let head = (start - reserved.addr()) as usize;
        let tail = (reserved.len() - head as u64 - len) as usize;
        let at = std::num::NonZeroUsize::new(start as usize).expect("aligned address is non-zero");
        let size = std::num::NonZeroUsize::new(len as usize).expect("len checked non-zero");
        // SAFETY: [start, start + len) lies inside `reserved`, a mapping we
        // own and that no Rust object points into; MAP_FIXED replaces it.
        let ptr = unsafe {
            mmap(
                Some(at),
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags | MapFlags::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        }
        .sys(|| format!("mmap(fd {}, offset {offset:#x}, {len:#x} bytes at {start:#x}, {flags:?})", fd.as_raw_fd()))?;
        let base = reserved.ptr;
        std::mem::forget(reserved);
        if head > 0 {
            // SAFETY: the reservation's head is ours and nothing refers to it.
            unsafe { munmap(base.cast(), head) }.sys(|| "munmap(reservation head)".to_string())?;
        }
        if tail > 0 {
            // SAFETY: the reservation's tail, after the file mapping, is ours and unused.
            let tail_start = unsafe { base.add(head + len as usize) };
            // SAFETY: as above.
            unsafe { munmap(tail_start.cast(), tail) }.sys(|| "munmap(reservation tail)".to_string())?;
        }
        Ok(Self { ptr: ptr.cast(), len: len as usize })
    }

    /// `madvise(advice)` on the whole mapping, with a raw `MADV_*` value
    /// (nix lacks some, e.g. `MADV_COLLAPSE`).
    pub fn madvise(&self, advice: libc::c_int) -> Result<()> {
        // SAFETY: the range is exactly our mapping; advice only changes how
        // the kernel backs it (MADV_DONTNEED re-faults file pages later).
        let ret = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, advice) };
        if ret != 0 {
            return Err(Error::last_os(format!("madvise(advice {advice}, {:#x} bytes)", self.len)));
        }
        Ok(())
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host virtual address, for `userspace_addr`.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn check(&self, offset: u64, len: usize) -> *mut u8 {
        assert!(
            offset.checked_add(len as u64).is_some_and(|end| end <= self.len as u64),
            "access [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping",
            self.len
        );
        // SAFETY: offset + len is within the mapping, checked above.
        unsafe { self.ptr.as_ptr().add(offset as usize) }
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let dst = self.check(offset, data.len());
        // SAFETY: dst..dst+len is inside our live mapping; the source is a
        // distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// Copies bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let src = self.check(offset, buf.len());
        // SAFETY: src..src+len is inside our live mapping; buf is distinct.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
    }

    /// Whether the mapping holds `expected` at `offset`: one `memcmp`, no
    /// copy (a model test compares every host-visible byte after every
    /// step, which is most of its time under TCG when done byte by byte).
    pub fn matches(&self, offset: u64, expected: &[u8]) -> bool {
        let at = self.check(offset, expected.len());
        // SAFETY: at..at+len is inside our live mapping (checked above) and
        // expected is a distinct Rust slice; memcmp only reads both.
        unsafe { libc::memcmp(at.cast(), expected.as_ptr().cast(), expected.len()) == 0 }
    }

    /// Reads bytes at `offset` into `buf` the way a debugger would, with
    /// `process_vm_readv()` on this process: a page the kernel will not
    /// fault in (a guest_memfd page that is not shared) fails the call with
    /// EFAULT instead of raising SIGBUS, so nothing can kill the caller.
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.check(offset, buf.len()) as usize;
        let remote = [nix::sys::uio::RemoteIoVec { base: at, len: buf.len() }];
        let len = buf.len();
        let done =
            nix::sys::uio::process_vm_readv(nix::unistd::getpid(), &mut [std::io::IoSliceMut::new(buf)], &remote)
                .sys(|| format!("process_vm_readv(self, {len:#x} bytes at offset {offset:#x})"))?;
        if done != len {
            return Err(Error::Sys {
                op: format!("process_vm_readv(self, offset {offset:#x}): {done} of {len} bytes"),
                errno: nix::errno::Errno::EFAULT,
            });
        }
        Ok(())
    }

    /// Writes `data` at `offset` with `process_vm_writev()` on this
    /// process: like [`Self::try_read`], EFAULT rather than SIGBUS.
    pub fn try_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let at = self.check(offset, data.len()) as usize;
        let remote = [nix::sys::uio::RemoteIoVec { base: at, len: data.len() }];
        let done = nix::sys::uio::process_vm_writev(nix::unistd::getpid(), &[std::io::IoSlice::new(data)], &remote)
            .sys(|| format!("process_vm_writev(self, {:#x} bytes at offset {offset:#x})", data.len()))?;
        if done != data.len() {
            return Err(Error::Sys {
                op: format!("process_vm_writev(self, offset {offset:#x}): {done} of {} bytes", data.len()),
                errno: nix::errno::Errno::EFAULT,
            });
        }
        Ok(())
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, offset: u64) -> u64 {
        let mut buf = [0; 8];
        self.read(offset, &mut buf);
        u64::from_le_bytes(buf)
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, offset: u64, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Fills `len` bytes at `offset` with the repeated u64 `pattern`.
    pub fn fill_u64(&self, offset: u64, len: u64, pattern: u64) {
        // A page-sized pattern written repeatedly: no buffer as large as the
        // range, whose own page faults cost more than the fill under TCG.
        let chunk = Fill::U64(pattern).chunk();
        let len = len - len % 8;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64);
            self.write(offset + at, &chunk[..n as usize]);
            at += n;
        }
    }

    /// The first element of `[offset, offset + len)` that differs from
    /// `fill`, as `(offset, value)`.
    pub fn find_mismatch(&self, offset: u64, len: u64, fill: Fill) -> Option<(u64, u64)> {
        // Compared a page at a time against a page of the pattern (memcmp),
        // through one stack buffer instead of a copy of the whole range.
        let (expected, width) = (fill.chunk(), fill.width());
        let len = len - len % width as u64;
        let mut buf = [0u8; CHUNK];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            self.read(offset + at, &mut buf[..n]);
            if buf[..n] != expected[..n] {
                let (i, v) = buf[..n]
                    .chunks_exact(width)
                    .map(|c| c.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b)))
                    .enumerate()
                    .find(|&(_, v)| v != fill.value())
                    .expect("the chunks differ, so one element does");
                return Some((offset + at + (i * width) as u64, v));
            }
            at += n as u64;
        }
        None
    }

    /// Requires `[offset, offset + len)` to hold `fill` throughout. A
    /// mismatch violates `rule`, naming the first differing element by
    /// `place(offset)`: "{place} holds {value}, expected {fill}".
    pub fn expect_filled(
        &self,
        rule: &str,
        offset: u64,
        len: u64,
        fill: Fill,
        place: impl FnOnce(u64) -> String,
    ) -> Result<()> {
        match self.find_mismatch(offset, len, fill) {
            None => Ok(()),
            Some((at, value)) => {
                Err(Error::rule(rule, format!("{} holds {}, expected {fill}", place(at), fill.format(value))))
            }
        }
    }

    /// `madvise(MADV_HUGEPAGE)` on the whole mapping (THP for 2 MiB scenarios).
    pub fn advise_hugepages(&self) -> Result<()> {
        // SAFETY: the range is exactly our mapping; MADV_HUGEPAGE only changes
        // how the kernel backs it.
        let ret = unsafe { libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            return Err(Error::last_os("madvise(MADV_HUGEPAGE)"));
        }
        Ok(())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and nothing refers into it any more.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            eprintln!("munmap of {:#x} bytes failed: {e}", self.len);
        }
    }
}

/// What a range of memory should hold throughout: a repeated little-endian
/// u64 pattern, or one byte value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Every aligned u64 is this value.
    U64(u64),
    /// Every byte is this value.
    Byte(u8),
}

/// Bytes [`HostMemory::fill_u64`] and [`HostMemory::find_mismatch`] handle
/// at a time (a multiple of every fill width).
const CHUNK: usize = 4096;

impl Fill {
    /// [`CHUNK`] bytes of this fill.
    fn chunk(self) -> [u8; CHUNK] {
        let mut chunk = [0u8; CHUNK];
        let bytes = self.value().to_le_bytes();
        for element in chunk.chunks_exact_mut(self.width()) {
            element.copy_from_slice(&bytes[..self.width()]);
        }
        chunk
    }

    fn width(self) -> usize {
        match self {
            Self::U64(_) => 8,
            Self::Byte(_) => 1,
        }
    }

    fn value(self) -> u64 {
        match self {
            Self::U64(v) => v,
            Self::Byte(b) => u64::from(b),
        }
    }

    /// `value` in this fill's width.
    fn format(self, value: u64) -> String {
        match self {
            Self::U64(_) => format!("{value:#x}"),
            Self::Byte(_) => format!("{value:#04x}"),
        }
    }
}

impl std::fmt::Display for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.format(self.value()))
    }
}

/// A guest_memfd: guest-private memory that the host cannot map unless the
/// `MMAP` flag allows it.
#[derive(Debug)]
pub struct GuestMemfd {
    fd: OwnedFd,
    size: u64,
    flags: u64,
}

impl GuestMemfd {
    pub(crate) fn new(fd: OwnedFd, size: u64, flags: u64) -> Self {
        Self { fd, size, flags }
    }

    /// Size requested at creation.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Flags requested at creation.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// `ftruncate(2)` to `len`.
    pub fn truncate(&self, len: u64) -> Result<()> {
        nix::unistd::ftruncate(&self.fd, len as i64).sys(|| format!("ftruncate(guest_memfd, {len:#x})"))
    }

    /// `fchmod(2)` to `mode`.
    pub fn chmod(&self, mode: u32) -> Result<()> {
        nix::sys::stat::fchmod(&self.fd, nix::sys::stat::Mode::from_bits_truncate(mode))
            .sys(|| format!("fchmod(guest_memfd, {mode:#o})"))
    }

    /// `fallocate(KEEP_SIZE)`: allocate `[offset, offset + len)` (guest_memfd
    /// refuses any mode without `KEEP_SIZE`: its size is immutable).
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate(FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// [`Self::allocate`] with `failing` allocations failing.
    pub fn allocate_failing(
        &self,
        fault: &crate::fault_injection::NthFault,
        failing: crate::fault_injection::Failing,
        offset: u64,
        len: u64,
    ) -> Result<crate::fault_injection::Injected<Result<()>>> {
        let flags = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let call = fault.around(failing, || fallocate(&self.fd, flags, offset as libc::off_t, len as libc::off_t))?;
        Ok(call.map(|r| r.sys(|| format!("fallocate(guest_memfd, KEEP_SIZE, offset {offset:#x}, len {len:#x})"))))
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: free `[offset, offset + len)`.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate(FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    /// `fallocate` with explicit flags.
    pub fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> Result<()> {
        fallocate(&self.fd, flags, offset as libc::off_t, len as libc::off_t)
            .sys(|| format!("fallocate(guest_memfd, {flags:?}, offset {offset:#x}, len {len:#x})"))
    }

    /// `fstat` of the fd.
    pub fn stat(&self) -> Result<FileStat> {
        fstat(&self.fd).sys(|| "fstat(guest_memfd)".to_string())
    }

    /// mmap()s `[offset, offset + len)` with `flags`.
    pub fn map(&self, offset: u64, len: u64, flags: MapFlags) -> Result<HostMemory> {
        HostMemory::map_fd(self.fd.as_fd(), offset, len, flags)
    }

    /// `read(2)` into `buf`.
    pub fn read(&self, buf: &mut [u8]) -> Result<usize> {
        nix::unistd::read(&self.fd, buf).sys(|| "read(guest_memfd)".to_string())
    }

    /// `write(2)` from `buf`.
    pub fn write(&self, buf: &[u8]) -> Result<usize> {
        nix::unistd::write(&self.fd, buf).sys(|| "write(guest_memfd)".to_string())
    }

    /// `pread(2)` at `offset`.
    pub fn pread(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        nix::sys::uio::pread(&self.fd, buf, offset as libc::off_t).sys(|| format!("pread(guest_memfd, {offset:#x})"))
    }

    /// `pwrite(2)` at `offset`.
    pub fn pwrite(&self, buf: &[u8], offset: u64) -> Result<usize> {
        nix::sys::uio::pwrite(&self.fd, buf, offset as libc::off_t).sys(|| format!("pwrite(guest_memfd, {offset:#x})"))
    }
}

impl AsFd for GuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for GuestMemfd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::memfd::{memfd_create, MFdFlags};

    use super::*;

    #[test]
    fn aligned_file_mappings_start_on_the_alignment_and_share_data() {
        let fd = memfd_create(c"aligned", MFdFlags::empty()).unwrap();
        nix::unistd::ftruncate(&fd, 2 * page_size() as i64).unwrap();
        let align = 2 << 20;
        let first = HostMemory::map_fd_aligned(fd.as_fd(), 0, 2 * page_size(), align, MapFlags::MAP_SHARED).unwrap();
        let second = HostMemory::map_fd_aligned(fd.as_fd(), 0, 2 * page_size(), align, MapFlags::MAP_SHARED).unwrap();
        assert_eq!(first.addr() % align, 0);
        assert_eq!(second.addr() % align, 0);
        first.write_u64(page_size(), 0x1234);
        assert_eq!(second.read_u64(page_size()), 0x1234);
        assert!(HostMemory::map_fd_aligned(fd.as_fd(), 0, page_size(), 3, MapFlags::MAP_SHARED).is_err());
    }

    #[test]
    fn fills_and_mismatches_across_chunks() {
        let memory = HostMemory::anonymous(4 * CHUNK as u64).unwrap();
        // Unaligned start and a length that is not a multiple of the chunk.
        let (offset, len) = (8, 3 * CHUNK as u64 + 24);
        memory.fill_u64(offset, len, 0x1122_3344_5566_7788);
        assert_eq!(memory.find_mismatch(offset, len, Fill::U64(0x1122_3344_5566_7788)), None);
        assert_eq!(memory.read_u64(offset + len), 0, "the fill stops at its end");
        // One differing element in a later chunk is found, with its offset.
        let at = offset + 2 * CHUNK as u64 + 40;
        memory.write_u64(at, 7);
        assert_eq!(memory.find_mismatch(offset, len, Fill::U64(0x1122_3344_5566_7788)), Some((at, 7)));
        assert_eq!(memory.find_mismatch(offset, at - offset, Fill::U64(0x1122_3344_5566_7788)), None);
        // Byte fills compare every byte.
        memory.write(CHUNK as u64 + 3, &[9]);
        assert_eq!(memory.find_mismatch(CHUNK as u64 + 3, 10, Fill::Byte(0x88)), Some((CHUNK as u64 + 3, 9)));
        assert_eq!(memory.find_mismatch(3 * CHUNK as u64 + 40, 100, Fill::Byte(0)), None);
    }
}
