//! Fault-injection points for crash tests.
//!
//! The environment variable `CODEX_MESH_FAULTS` names points (comma-separated) at which the
//! node kills itself with `SIGKILL`, exactly as `kill -9` would at that moment; tests use it
//! to check what a restarted node makes of a crash at an awkward point. The variable is read
//! once; after that a point costs one lookup in a short list, and with the variable unset
//! every point is inert.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_lists_points_by_name() {
        assert_eq!(parse(""), Vec::<String>::new());
        assert_eq!(parse(" a , b,,c "), vec!["a", "b", "c"]);
    }

    #[test]
    fn an_unnamed_point_does_nothing() {
        point("a point no test arms");
    }
}
