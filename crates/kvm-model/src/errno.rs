//! The errnos the rules produce.

use std::fmt;

/// An errno a rule returns (x86-64 Linux numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// No such file or directory.
    ENOENT,
    /// Bad file descriptor.
    EBADF,
    /// Bad address.
    EFAULT,
    /// File exists.
    EEXIST,
    /// Invalid argument.
    EINVAL,
    /// Inappropriate ioctl for device.
    ENOTTY,
    /// File too large.
    EFBIG,
    /// Operation not supported.
    EOPNOTSUPP,
}

impl Errno {
    /// Every errno the rules produce.
    pub const ALL: [Errno; 8] = [
        Self::ENOENT,
        Self::EBADF,
        Self::EFAULT,
        Self::EEXIST,
        Self::EINVAL,
        Self::ENOTTY,
        Self::EFBIG,
        Self::EOPNOTSUPP,
    ];

    /// The raw errno value.
    pub fn raw(self) -> i32 {
        match self {
            Self::ENOENT => 2,
            Self::EBADF => 9,
            Self::EFAULT => 14,
            Self::EEXIST => 17,
            Self::EINVAL => 22,
            Self::ENOTTY => 25,
            Self::EFBIG => 27,
            Self::EOPNOTSUPP => 95,
        }
    }

    /// The symbolic name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ENOENT => "ENOENT",
            Self::EBADF => "EBADF",
            Self::EFAULT => "EFAULT",
            Self::EEXIST => "EEXIST",
            Self::EINVAL => "EINVAL",
            Self::ENOTTY => "ENOTTY",
            Self::EFBIG => "EFBIG",
            Self::EOPNOTSUPP => "EOPNOTSUPP",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
