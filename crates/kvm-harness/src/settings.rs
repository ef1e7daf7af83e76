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

/// The u64 in environment variable `name` (decimal or `0x` hex), `None`
/// when it is unset or empty: seeds, case counts, budgets.
pub fn u64_opt(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => parse_u64(name, &v).map(Some),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(Error::Config(format!("{name}: {e}"))),
    }
}

fn parse_u64(name: &str, value: &str) -> Result<u64> {
    let value = value.trim();
    let parsed = match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|e| Error::Config(format!("{name}={value:?}: {e} (expected a u64, decimal or 0x-hex)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_values_are_decimal_or_hex_and_bad_ones_are_named() {
        assert_eq!(parse_u64("V", " 42 ").unwrap(), 42);
        assert_eq!(parse_u64("V", "0xff").unwrap(), 255);
        let e = parse_u64("KVM_SELFTESTS_SEED", "0xzz").unwrap_err().to_string();
        assert!(e.contains("KVM_SELFTESTS_SEED=\"0xzz\""), "{e}");
    }
}
