//! Job ids: ULIDs (48-bit millisecond time + 80 random bits, Crockford base32), so ids sort by
//! submission time.

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A ULID for time `unix_ms` and 80 bits of `random`.
pub fn ulid(unix_ms: u64, random: u128) -> String {
    let value: u128 = ((unix_ms as u128 & 0xFFFF_FFFF_FFFF) << 80) | (random & ((1u128 << 80) - 1));
    (0..26)
        .rev()
        .map(|i| ALPHABET[((value >> (i * 5)) & 31) as usize] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulids_are_26_chars_and_sort_by_time() {
        let a = ulid(1_700_000_000_000, u128::MAX);
        let b = ulid(1_700_000_000_001, 0);
        assert_eq!(a.len(), 26);
        assert!(a < b);
        assert_eq!(ulid(0, 0), "00000000000000000000000000");
    }
}
