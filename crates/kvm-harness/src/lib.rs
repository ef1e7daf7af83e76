//! Harness for KVM private-memory selftests.
//!
//! It owns every raw ioctl and every `unsafe` of the suite. Tests speak in
//! domain terms: a [`Kvm`] system fd, a [`Vm`] of a [`VmType`], memslots
//! ([`Region`]) backed by anonymous memory or a [`GuestMemfd`], vCPUs
//! ([`Vcpu`]) running a payload in long mode, guest calls ([`GuestCall`]),
//! the command-driven [`Agent`], and expected outcomes ([`expect_errno`]).

#![warn(missing_docs)]

// Modules whose types the root re-exports are private, so that each type
// has one path; the rest are public and reached through their module.
mod agent;
pub mod backing;
mod child;
mod error;
mod exit;
mod exit_fields;
pub mod fault_injection;
pub mod kernel_rules;
pub mod kmsg;
mod known_failures;
mod kvm;
mod liveness;
mod memory;
#[cfg(test)]
mod module_graph;
pub mod numa;
mod region;
pub mod results;
mod runner;
pub mod settings;
mod signal_storm;
pub mod stats;
pub mod tap;
pub mod task_state;
pub mod threads;
pub mod uapi;
mod vcpu;
mod vcpu_state;
mod vm;
pub mod watchdog;
mod x86;

pub use agent::{Agent, Op, Probe, ProbeMismatch};
pub use child::{Access, ChildFate};
pub use error::{errno_name, expect_eq, expect_errno, expect_ok, sweep, Error, Result, SysResult};
pub use exit::{Exit, ExitReport, GuestCall};
pub use kvm::{Cap, Kvm, VmType};
/// The uAPI structs and constants, for tests that spell out raw requests.
pub use kvm_bindings as bindings;
pub use memory::{page_size, Fill, GuestMemfd, HostMemory};
pub use nix::errno::Errno;
pub use region::{GmemBinding, Region};
pub use runner::{Body, Need, Suite};
pub use signal_storm::SignalStorm;
pub use vcpu::Vcpu;
pub use vm::{Vm, SYSTEM_SLOT};
