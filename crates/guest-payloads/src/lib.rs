//! Guest code for the KVM selftests, assembled at build time with iced-x86.
//!
//! Every payload runs in 64-bit long mode on identity-mapped memory set up by
//! the harness (see [`layout`]), and talks to the host with the port-I/O
//! protocol in [`protocol`].

#![warn(missing_docs)]

include!("abi.rs");

/// A piece of guest code assembled for a fixed guest physical address.
#[derive(Debug, Clone, Copy)]
pub struct Payload {
    /// Name, as used in diagnostics.
    pub name: &'static str,
    /// Guest physical address the code was assembled for.
    pub load_gpa: u64,
    /// Guest physical (== virtual) address of the first instruction.
    pub entry: u64,
    /// The machine code.
    pub code: &'static [u8],
    /// Exported labels and their guest addresses.
    pub labels: &'static [(&'static str, u64)],
}

impl Payload {
    /// Address of an exported label.
    ///
    /// # Panics
    /// If the payload has no such label: that is a bug in the test using it.
    pub fn label(&self, name: &str) -> u64 {
        self.labels
            .iter()
            .find(|(label, _)| *label == name)
            .map(|&(_, gpa)| gpa)
            .unwrap_or_else(|| panic!("payload {} has no label {name:?}", self.name))
    }

    /// Whether `gpa` falls inside this payload's code.
    pub fn contains(&self, gpa: u64) -> bool {
        (self.load_gpa..self.load_gpa + self.code.len() as u64).contains(&gpa)
    }
}

include!(concat!(env!("OUT_DIR"), "/payloads.rs"));
