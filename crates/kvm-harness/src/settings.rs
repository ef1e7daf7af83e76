//! Scenario settings from the environment (vCPU counts, sizes): one parser,
//! so every malformed value is refused with the same message naming it.

use crate::error::{Error, Result};

/// The positive integer in environment variable `name`, at most `max`;
/// `default` when it is unset. Anything else is an [`Error::Config`].
pub fn count(name: &str, default: u64, max: u64) -> Result<u64> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(Error::Config(format!("{name}={v:?}: expected an integer in 1..={max}"))),
        },
        Err(e) => Err(Error::Config(format!("{name}: {e}"))),
    }
}
