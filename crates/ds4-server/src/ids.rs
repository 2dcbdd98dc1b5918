//! Random ids for responses and tool calls.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// 32 random lowercase hex digits. std's `RandomState` is seeded from the OS per instance,
/// which is random enough for ids (they only need to be unique, not secret).
pub fn random_hex32() -> String {
    let a = RandomState::new().build_hasher().finish();
    let b = RandomState::new().build_hasher().finish();
    format!("{a:016x}{b:016x}")
}

/// A tool-call id in the given style (`call_…` or `toolu_…`).
pub fn tool_call_id(style: crate::job::ToolIdStyle) -> String {
    format!("{}{}", style.prefix(), random_hex32())
}

/// Seconds since the Unix epoch (the `created` field).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_32_hex_and_distinct() {
        let a = super::random_hex32();
        let b = super::random_hex32();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
