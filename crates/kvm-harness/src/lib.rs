//! Harness for KVM private-memory selftests.
//!
//! It owns every raw ioctl and every `unsafe` of the suite. Tests speak in
//! domain terms: a [`Kvm`] system fd, a [`Vm`] of a [`VmType`], memslots
//! ([`Region`]) backed by anonymous memory or a [`GuestMemfd`], vCPUs
//! ([`Vcpu`]) running a payload in long mode, guest calls ([`GuestCall`]),
//! the command-driven [`Agent`], and expected outcomes ([`expect_errno`]).

#![warn(missing_docs)]

pub mod agent;
pub mod backing;
pub mod child;
pub mod error;
mod exit_fields;
pub mod fault_injection;
pub mod kernel_rules;
pub mod kmsg;
pub mod known_failures;
pub mod kvm;
pub mod memory;
pub mod numa;
pub mod results;
pub mod runner;
pub mod settings;
pub mod signal_storm;
pub mod stats;
pub mod threads;
pub mod uapi;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod watchdog;
pub mod x86;

pub use agent::{Agent, Op, Probe, ProbeMismatch};
pub use child::{Access, ChildFate};
pub use error::{errno_name, expect_eq, expect_errno, expect_ok, sweep, Error, Result, SysResult};
pub use kvm::{Cap, Kvm, VmType};
/// The uAPI structs and constants, for tests that spell out raw requests.
pub use kvm_bindings as bindings;
pub use memory::{page_size, Fill, GuestMemfd, HostMemory};
pub use nix::errno::Errno;
pub use runner::{Need, Suite};
pub use signal_storm::SignalStorm;
pub use vcpu::{Exit, ExitReport, GuestCall, Vcpu};
pub use vm::{GmemBinding, Region, Vm};
