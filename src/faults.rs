//! Fault-injection points for crash tests.
//!
//! The environment variable `CODEX_MESH_FAULTS` names points (comma-separated) at which the
//! node kills itself with `SIGKILL`, exactly as `kill -9` would at that moment; tests use it
//! to check what a restarted node makes of a crash at an awkward point. The variable is read
//! once; after that a point costs one lookup in a short list, and with the variable unset
//! every point is inert.
//!
//! An entry of the form `name=value` is a setting rather than a point: it changes what the
//! node does without crashing it (for example `protocol_major=<n>` makes the node advertise
//! another protocol major version, to test that its peers refuse it). Like the points,
//! settings exist for tests only.

use std::sync::OnceLock;

/// The environment variable that names the points to crash at.
pub const FAULTS_ENV: &str = "CODEX_MESH_FAULTS";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| parse(&std::env::var(FAULTS_ENV).unwrap_or_default()))
}

/// The point names in a value of [`FAULTS_ENV`].
fn parse(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(String::from)
        .collect()
}

/// Crash here (`SIGKILL` to this process) when [`FAULTS_ENV`] names `name`; otherwise nothing.
pub fn point(name: &str) {
    if armed().iter().any(|armed| armed == name) {
        eprintln!("fault injection: crashing at {name}");
        // SAFETY: raise only sends a signal to this process.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// The value of the setting `name=value` in [`FAULTS_ENV`], if it has one.
pub fn setting(name: &str) -> Option<&'static str> {
    lookup(armed(), name)
}

fn lookup<'a>(entries: &'a [String], name: &str) -> Option<&'a str> {
    entries.iter().find_map(|entry| {
        let (key, value) = entry.split_once('=')?;
        (key.trim() == name).then(|| value.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_lists_points_by_name() {
        assert_eq!(parse(""), Vec::<String>::new());
        assert_eq!(parse(" a , b,,c "), vec!["a", "b", "c"]);
    }

    #[test]
    fn settings_have_a_value() {
        let entries = parse("crash_here, protocol_major=7");
        assert_eq!(lookup(&entries, "protocol_major"), Some("7"));
        assert_eq!(lookup(&entries, "crash_here"), None);
        assert_eq!(lookup(&entries, "other"), None);
    }

    #[test]
    fn an_unnamed_point_does_nothing() {
        point("a point no test arms");
    }
}
