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

/// Whether `text` has the shape of a ULID: 26 characters of Crockford's base32 (upper case,
/// as [`ulid`] writes them) whose first character leaves the value within 128 bits. Every
/// job id that arrives from outside is checked with this before it names a key or a file.
pub fn is_ulid(text: &str) -> bool {
    text.len() == 26 && text.as_bytes()[0] <= b'7' && text.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ulid_shaped_ids_pass() {
        assert!(is_ulid(&ulid(1_700_000_000_000, 42)));
        assert!(is_ulid(&ulid(u64::MAX, u128::MAX)));
        for bad in [
            "",
            "../../../../etc/passwd",
            "01J0000000000000000000000",
            "01J0000000000000000000000AA",
            "01j0000000000000000000000a",
            "81J0000000000000000000000A",
            "01J000000000000000000000/A",
            "01J0000000000000000000000I",
        ] {
            assert!(!is_ulid(bad), "{bad:?}");
        }
    }

    #[test]
    fn ulids_are_26_chars_and_sort_by_time() {
        let a = ulid(1_700_000_000_000, u128::MAX);
        let b = ulid(1_700_000_000_001, 0);
        assert_eq!(a.len(), 26);
        assert!(a < b);
        assert_eq!(ulid(0, 0), "00000000000000000000000000");
    }
}
