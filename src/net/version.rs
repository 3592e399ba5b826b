//! The protocol version peers exchange when they connect (identify's `protocol_version`), and
//! the rule for which peers this node can talk to.
//!
//! The version is `codex-mesh/<major>.<minor>`. A change of the minor version only adds what
//! older nodes can ignore; a change of the major version means older nodes cannot read the new
//! messages. A node talks to peers of its own major version and refuses every other one, and
//! every version string that does not have this form (older builds advertised
//! `/codex-mesh/1`, which had no election protocol of its own).

use thiserror::Error;

/// Major protocol version: peers must have the same one.
pub const PROTOCOL_MAJOR: u32 = 1;
/// Minor protocol version: additions that peers of the same major version can ignore.
pub const PROTOCOL_MINOR: u32 = 0;
/// Prefix of the advertised version.
const PREFIX: &str = "codex-mesh/";
/// The fault (see [`crate::faults`]) that makes a node advertise another major version; for
/// tests of the refusal only.
pub const MAJOR_FAULT: &str = "protocol_major";

/// Why a peer's version is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VersionError {
    /// The version string is not `codex-mesh/<major>.<minor>`.
    #[error("unreadable protocol version {0:?}")]
    Unreadable(String),
    /// The peer speaks another major version.
    #[error("protocol major version {theirs} cannot be read by this node (major version {ours})")]
    Major {
        /// The peer's major version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
}

/// The version string for `major.minor`.
pub fn format(major: u32, minor: u32) -> String {
    format!("{PREFIX}{major}.{minor}")
}

/// Parse `codex-mesh/<major>.<minor>`.
pub fn parse(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.strip_prefix(PREFIX)?.split_once('.')?;
    let number = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse::<u32>().ok()
        }
    };
    Some((number(major)?, number(minor)?))
}

/// Whether a node of major version `ours` can talk to a peer that advertises `theirs`; on
/// success, the peer's `(major, minor)`.
pub fn check(ours: u32, theirs: &str) -> Result<(u32, u32), VersionError> {
    let (major, minor) = parse(theirs).ok_or_else(|| VersionError::Unreadable(theirs.into()))?;
    if major == ours {
        Ok((major, minor))
    } else {
        Err(VersionError::Major {
            theirs: major,
            ours,
        })
    }
}

/// The major version this node speaks: [`PROTOCOL_MAJOR`], unless the test-only fault
/// [`MAJOR_FAULT`] names another.
pub fn local_major() -> u32 {
    crate::faults::setting(MAJOR_FAULT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROTOCOL_MAJOR)
}

/// The version this node advertises.
pub fn local() -> String {
    format(local_major(), PROTOCOL_MINOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_version_reads_back() {
        assert_eq!(format(1, 0), "codex-mesh/1.0");
        assert_eq!(parse(&format(PROTOCOL_MAJOR, PROTOCOL_MINOR)), Some((1, 0)));
        assert_eq!(parse("codex-mesh/12.345"), Some((12, 345)));
    }

    #[test]
    fn malformed_versions_do_not_parse() {
        for text in [
            "",
            "codex-mesh/",
            "codex-mesh/1",
            "/codex-mesh/1",
            "codex-mesh/1.",
            "codex-mesh/.1",
            "codex-mesh/+1.0",
            "codex-mesh/1.0.0",
            "codex-mesh/ 1.0",
            "codex-mesh/99999999999.0",
            "other/1.0",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn the_same_major_version_is_compatible_whatever_the_minor() {
        assert_eq!(check(1, "codex-mesh/1.0"), Ok((1, 0)));
        assert_eq!(check(1, "codex-mesh/1.7"), Ok((1, 7)));
        assert_eq!(check(3, "codex-mesh/3.0"), Ok((3, 0)));
    }

    #[test]
    fn another_major_version_is_refused() {
        assert_eq!(
            check(1, "codex-mesh/2.0"),
            Err(VersionError::Major { theirs: 2, ours: 1 })
        );
        assert_eq!(
            check(2, "codex-mesh/1.9"),
            Err(VersionError::Major { theirs: 1, ours: 2 })
        );
    }

    #[test]
    fn an_unreadable_version_is_refused() {
        // What builds before the version exchange advertised.
        assert_eq!(
            check(1, "/codex-mesh/1"),
            Err(VersionError::Unreadable("/codex-mesh/1".into()))
        );
        assert!(check(1, "ipfs/0.1.0").is_err());
    }
}
