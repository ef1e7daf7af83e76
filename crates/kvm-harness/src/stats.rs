//! KVM's binary statistics (`KVM_GET_STATS_FD`): what the kernel counts
//! about a VM, read by name. A test reads them to learn what the MMU did
//! where no exit or value shows it, e.g. whether a 2 MiB range is mapped
//! by one huge page (`pages_2m`).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use crate::error::{Error, Result, SysResult};

/// `struct kvm_stats_header` (include/uapi/linux/kvm.h): six u32s.
const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` without its name: flags u32, exponent s16,
/// size u16, offset u32, bucket_size u32.
const DESC_SIZE: usize = 16;

/// A VM's (or vCPU's) statistics fd and where each counter lives in it.
#[derive(Debug)]
pub struct Stats {
    fd: OwnedFd,
    /// Name to (byte offset in the file, number of u64s).
    offsets: BTreeMap<String, (u64, u16)>,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

impl Stats {
    /// Reads the header and descriptors of a stats fd.
    pub(crate) fn new(fd: OwnedFd) -> Result<Self> {
        let mut header = [0u8; HEADER_SIZE];
        read_exact_at(&fd, &mut header, 0)?;
        let (name_size, num_desc) = (u32_at(&header, 4) as usize, u32_at(&header, 8) as usize);
        let (desc_offset, data_offset) = (u64::from(u32_at(&header, 16)), u64::from(u32_at(&header, 20)));
        let stride = DESC_SIZE + name_size;
        let mut descs = vec![0u8; stride * num_desc];
        read_exact_at(&fd, &mut descs, desc_offset)?;
        let offsets = descs
            .chunks_exact(stride)
            .map(|d| {
                let size = u16::from_le_bytes([d[6], d[7]]);
                let offset = u64::from(u32_at(d, 8));
                let name = &d[DESC_SIZE..];
                let name = String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())]);
                (name.into_owned(), (data_offset + offset, size))
            })
            .collect();
        Ok(Self { fd, offsets })
    }

    /// The current value of the single-valued counter `name`.
    pub fn get(&self, name: &str) -> Result<u64> {
        match self.offsets.get(name) {
            Some(&(offset, 1)) => {
                let mut value = [0u8; 8];
                read_exact_at(&self.fd, &mut value, offset)?;
                Ok(u64::from_le_bytes(value))
            }
            Some(&(_, size)) => Err(Error::misuse(format!("KVM statistic {name} has {size} values, not one"))),
            None => Err(Error::misuse(format!(
                "no KVM statistic {name}; the kernel has {}",
                self.offsets.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

fn read_exact_at(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> Result<()> {
    let len = buf.len();
    let n = nix::sys::uio::pread(fd, buf, offset as libc::off_t)
        .sys(|| format!("pread(KVM stats fd, {len} bytes at {offset:#x})"))?;
    if n != len {
        return Err(Error::Sys {
            op: format!("pread(KVM stats fd, {len} bytes at {offset:#x}): {n} bytes"),
            errno: nix::errno::Errno::EIO,
        });
    }
    Ok(())
}
