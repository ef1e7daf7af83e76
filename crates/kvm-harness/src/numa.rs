//! NUMA memory policy on host mappings (`mbind`, `get_mempolicy`,
//! `move_pages`), for guest_memfd's `set_policy`/`get_policy` vm_ops.

use std::fs;

use crate::error::{Error, Result};
use crate::memory::{page_size, HostMemory};
use crate::runner::Need;

/// `MPOL_*` modes (include/uapi/linux/mempolicy.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Policy {
    /// `MPOL_DEFAULT`
    Default = 0,
    /// `MPOL_PREFERRED`
    Preferred = 1,
    /// `MPOL_BIND`
    Bind = 2,
    /// `MPOL_INTERLEAVE`
    Interleave = 3,
}

/// Bits in the node masks passed to the kernel: one `unsigned long`.
const MAX_NODE: u64 = 64;

/// The online nodes, from `/sys/devices/system/node/online` ("0-1,3").
pub(crate) fn online_nodes() -> Result<Vec<u32>> {
    const PATH: &str = "/sys/devices/system/node/online";
    let text = fs::read_to_string(PATH).map_err(|e| Error::Config(format!("reading {PATH}: {e}")))?;
    parse_node_list(text.trim()).ok_or_else(|| Error::Config(format!("{PATH} = `{}` is no node list", text.trim())))
}

fn parse_node_list(list: &str) -> Option<Vec<u32>> {
    let mut nodes = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => nodes.extend(a.parse::<u32>().ok()?..=b.parse::<u32>().ok()?),
            None => nodes.push(part.parse().ok()?),
        }
    }
    Some(nodes)
}

/// A requirement of at least two online NUMA nodes (the VM runner boots its
/// guest with two).
pub fn need_two_nodes() -> Need {
    Need::Check(Box::new(|_| match online_nodes() {
        Ok(nodes) if nodes.len() >= 2 => Ok(()),
        Ok(nodes) => Err(format!("needs 2 NUMA nodes: /sys/devices/system/node/online lists {nodes:?}")),
        Err(e) => Err(format!("needs 2 NUMA nodes: {e}")),
    }))
}

/// `mbind()` over `[offset, offset + len)` of `mem` with `nodemask`.
pub fn mbind(mem: &HostMemory, offset: u64, len: u64, mode: i32, nodemask: u64) -> Result<()> {
    check_range(mem, offset, len)?;
    // SAFETY: the range lies inside a mapping `mem` owns; mbind reads one
    // unsigned long of node mask and changes only the range's policy.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            mem.addr() + offset,
            len,
            mode,
            std::ptr::from_ref(&nodemask),
            MAX_NODE + 1,
            0u32,
        )
    };
    if r != 0 {
        return Err(Error::last_os(format!("mbind(+{offset:#x}, {len:#x} bytes, mode {mode}, nodes {nodemask:#x})")));
    }
    Ok(())
}

/// The policy and node mask in force at `mem + offset` (`MPOL_F_ADDR`).
pub fn policy_at(mem: &HostMemory, offset: u64) -> Result<(i32, u64)> {
    check_range(mem, offset, 1)?;
    let mut mode: libc::c_int = -1;
    let mut nodemask: u64 = 0;
    const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
    // SAFETY: mode and nodemask are live locals of the sizes passed (one
    // unsigned long of mask); the address lies in a mapping `mem` owns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            std::ptr::from_mut(&mut mode),
            std::ptr::from_mut(&mut nodemask),
            MAX_NODE + 1,
            mem.addr() + offset,
            MPOL_F_ADDR,
        )
    };
    if r != 0 {
        return Err(Error::last_os(format!("get_mempolicy(MPOL_F_ADDR, +{offset:#x})")));
    }
    Ok((mode, nodemask))
}

/// The node each page at `offsets` of `mem` resides on (`move_pages` with no
/// target nodes); a negative entry is `-errno` for that page.
pub fn page_nodes(mem: &HostMemory, offsets: &[u64]) -> Result<Vec<i32>> {
    for &o in offsets {
        check_range(mem, o, page_size())?;
    }
    let pages: Vec<u64> = offsets.iter().map(|o| mem.addr() + o).collect();
    let mut status = vec![i32::MIN; pages.len()];
    // SAFETY: `pages` and `status` hold `pages.len()` entries each; with a
    // null node array move_pages only reports where the pages are.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if r != 0 {
        return Err(Error::last_os(format!("move_pages(query {} pages)", pages.len())));
    }
    Ok(status)
}

fn check_range(mem: &HostMemory, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= mem.len() => Ok(()),
        _ => {
            Err(Error::Config(format!("NUMA call on [{offset:#x}, +{len:#x}) outside a {:#x}-byte mapping", mem.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_parse() {
        assert_eq!(parse_node_list("0"), Some(vec![0]));
        assert_eq!(parse_node_list("0-1,3"), Some(vec![0, 1, 3]));
        assert_eq!(parse_node_list("x"), None);
    }
}
