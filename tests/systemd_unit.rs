//! The example systemd unit sets only variables the node reads, names the subcommand that
//! resumes a node, and is a unit systemd accepts (checked with `systemd-analyze verify` where
//! it is installed).

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_codex-mesh");
const UNIT: &str = include_str!("../examples/systemd/codex-mesh.service");

/// `KEY=VALUE` of every `Environment=` line.
fn environment(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_unit_sets_only_variables_the_node_reads() {
    let help = Command::new(BIN)
        .args(["up", "--help"])
        .output()
        .expect("run codex-mesh up --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let vars: Vec<(String, String)> = environment(UNIT)
        .into_iter()
        .filter(|(k, _)| k.starts_with("CODEX_MESH_"))
        .collect();
    assert!(
        vars.iter().any(|(k, _)| k == "CODEX_MESH_DATA_DIR"),
        "the unit must place the data dir: {vars:?}"
    );
    for (key, _) in &vars {
        assert!(
            help.contains(&format!("env: {key}=")),
            "`up` does not read {key}"
        );
    }
    // Every directory the node writes lies under the one writable path.
    let writable = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ReadWritePaths="))
        .expect("ReadWritePaths");
    for (key, value) in environment(UNIT) {
        if key == "HOME" || key.ends_with("_DIR") || key.ends_with("_ROOT") {
            assert!(
                value.starts_with(writable),
                "{key}={value} is outside {writable}"
            );
        }
    }
    assert!(UNIT.contains("ExecStart=/usr/local/bin/codex-mesh up\n"));
    assert!(UNIT.contains("ProtectSystem=strict"));
}

#[test]
fn systemd_accepts_the_unit() {
    let present = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        eprintln!("systemd-analyze is not installed: only the static checks ran");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = UNIT.replace("/usr/local/bin/codex-mesh", BIN);
    let path = dir.path().join("codex-mesh.service");
    std::fs::write(&path, unit).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("codex-mesh.service"))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
