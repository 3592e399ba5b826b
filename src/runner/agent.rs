//! Agents: how a job's agent process is started. `codex` is built in; operators define more
//! with `--agent NAME=COMMAND`, where COMMAND is split like a shell would (no shell runs) and
//! `{prompt}`, `{workdir}` and `{model}` are replaced in each word, in one pass: text put in
//! for a placeholder (a prompt that says `{workdir}`) is never expanded again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::proto::jobs::{JobSpec, Sandbox};

/// Environment variables an agent process may inherit; everything else is scrubbed.
pub const PASSED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "TERM",
    "TMPDIR",
    "CODEX_HOME",
    "OPENAI_API_KEY",
    "CODEX_API_KEY",
    "OPENAI_BASE_URL",
];

/// An operator-defined agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandAgent {
    /// Agent name jobs refer to.
    pub name: String,
    /// Command words with placeholders.
    pub words: Vec<String>,
}

/// Parse `NAME=COMMAND`.
pub fn parse_agent(text: &str) -> Result<CommandAgent, String> {
    let (name, command) = text
        .split_once('=')
        .ok_or_else(|| format!("invalid --agent {text:?}: use NAME=COMMAND"))?;
    let name = name.trim();
    let valid_name = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid_name {
        return Err(format!(
            "invalid agent name {name:?}: use letters, digits, '-', '_'"
        ));
    }
    let words = shell_words::split(command)
        .map_err(|e| format!("invalid command for agent {name}: {e}"))?;
    if words.is_empty() {
        return Err(format!("the command for agent {name} is empty"));
    }
    Ok(CommandAgent {
        name: name.to_string(),
        words,
    })
}

/// How to run the agent of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Whether stdout is Codex JSONL.
    pub codex_events: bool,
    /// File where Codex writes its last message (`-o`), if any.
    pub last_message_file: Option<PathBuf>,
}

/// The agents a node can run.
#[derive(Clone, Debug, Default)]
pub struct Agents {
    /// Path of the `codex` binary, when it was found.
    pub codex: Option<PathBuf>,
    /// Operator-defined agents by name.
    pub commands: BTreeMap<String, CommandAgent>,
}

impl Agents {
    /// Names of every agent this node can run (what it advertises).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.commands.keys().cloned().collect();
        if self.codex.is_some() && !self.commands.contains_key("codex") {
            names.push("codex".to_string());
        }
        names.sort();
        names
    }

    /// Whether this node can run agent `name`, or why not.
    pub fn check(&self, name: &str) -> Result<(), String> {
        if self.names().iter().any(|n| n == name) {
            Ok(())
        } else if name == "codex" {
            Err("the codex CLI is not installed on this node".into())
        } else {
            Err(format!("this node has no agent {name:?}"))
        }
    }

    /// The command line for `spec` in `workdir`, or why it cannot run here.
    pub fn invocation(&self, spec: &JobSpec, workdir: &Path) -> Result<Invocation, String> {
        if let Some(agent) = self.commands.get(&spec.agent) {
            let model = spec.model.clone().unwrap_or_default();
            let workdir_text = workdir.display().to_string();
            let values = [
                ("{prompt}", spec.prompt.as_str()),
                ("{workdir}", workdir_text.as_str()),
                ("{model}", model.as_str()),
            ];
            let argv = agent.words.iter().map(|w| substitute(w, &values)).collect();
            return Ok(Invocation {
                argv,
                cwd: workdir.to_path_buf(),
                codex_events: false,
                last_message_file: None,
            });
        }
        if spec.agent != "codex" {
            return Err(format!("this node has no agent {:?}", spec.agent));
        }
        let codex = self
            .codex
            .as_ref()
            .ok_or("the codex CLI is not installed on this node")?;
        let last = workdir.join(".codex-mesh-last-message");
        let sandbox = match spec.sandbox {
            Sandbox::ReadOnly => "read-only",
            Sandbox::WorkspaceWrite => "workspace-write",
            Sandbox::DangerFullAccess => "danger-full-access",
        };
        let mut argv = vec![
            codex.display().to_string(),
            "exec".into(),
            "--json".into(),
            "--skip-git-repo-check".into(),
            "-C".into(),
            workdir.display().to_string(),
            "-s".into(),
            sandbox.into(),
            "-o".into(),
            last.display().to_string(),
        ];
        if spec.sandbox == Sandbox::WorkspaceWrite {
            // Codex's workspace-write sandbox also lets commands write all of /tmp, where other
            // jobs' work directories live by default: keep each job to its own directory.
            for option in [
                "sandbox_workspace_write.exclude_slash_tmp=true",
                "sandbox_workspace_write.exclude_tmpdir_env_var=true",
            ] {
                argv.extend(["-c".to_string(), option.to_string()]);
            }
        }
        if let Some(model) = &spec.model {
            argv.extend(["-m".to_string(), model.clone()]);
        }
        // Everything after `--` is the prompt, even one that starts with `-`.
        argv.extend(["--".to_string(), spec.prompt.clone()]);
        Ok(Invocation {
            argv,
            cwd: workdir.to_path_buf(),
            codex_events: true,
            last_message_file: Some(last),
        })
    }
}

/// `word` with each placeholder of `values` replaced by its value, in a single pass from left
/// to right: the values themselves are never searched for placeholders.
fn substitute(word: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        match values.iter().find(|(name, _)| tail.starts_with(name)) {
            Some((name, value)) => {
                out.push_str(value);
                rest = &tail[name.len()..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Find `program` on `PATH` (or take it as a path).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let candidate = Path::new(program);
    if candidate.components().count() > 1 {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(agent: &str, prompt: &str) -> JobSpec {
        JobSpec {
            agent: agent.into(),
            model: Some("m1".into()),
            ..JobSpec::for_tests(prompt)
        }
    }

    #[test]
    fn command_agents_fill_placeholders_without_a_shell() {
        let agent = parse_agent("echo=sh -c 'echo \"$0\" > out' '{prompt} in {workdir}'").unwrap();
        let agents = Agents {
            codex: None,
            commands: [(agent.name.clone(), agent)].into_iter().collect(),
        };
        let run = agents
            .invocation(&spec("echo", "hi; rm -rf /"), Path::new("/w"))
            .unwrap();
        assert_eq!(
            run.argv,
            vec!["sh", "-c", "echo \"$0\" > out", "hi; rm -rf / in /w"]
        );
        assert_eq!(agents.names(), vec!["echo"]);
    }

    #[test]
    fn placeholders_in_the_prompt_stay_literal() {
        let agent = parse_agent("lit=run {prompt} {model}@{workdir} {{prompt}} {other}").unwrap();
        let agents = Agents {
            codex: None,
            commands: [(agent.name.clone(), agent)].into_iter().collect(),
        };
        let run = agents
            .invocation(&spec("lit", "{workdir} {model} {prompt}"), Path::new("/w"))
            .unwrap();
        assert_eq!(
            run.argv,
            vec![
                "run",
                "{workdir} {model} {prompt}",
                "m1@/w",
                "{{workdir} {model} {prompt}}",
                "{other}"
            ]
        );
    }

    #[test]
    fn codex_runs_exec_with_json_sandbox_and_last_message_file() {
        let agents = Agents {
            codex: Some("/usr/bin/codex".into()),
            commands: BTreeMap::new(),
        };
        let run = agents
            .invocation(&spec("codex", "fix it"), Path::new("/w"))
            .unwrap();
        assert_eq!(
            &run.argv[..4],
            ["/usr/bin/codex", "exec", "--json", "--skip-git-repo-check"]
        );
        assert!(run.argv.windows(2).any(|w| w == ["-s", "workspace-write"]));
        assert!(run.argv.windows(2).any(|w| w == ["-m", "m1"]));
        assert!(run
            .argv
            .windows(2)
            .any(|w| w == ["-c", "sandbox_workspace_write.exclude_slash_tmp=true"]));
        assert_eq!(&run.argv[run.argv.len() - 2..], ["--", "fix it"]);
        let dash = agents
            .invocation(&spec("codex", "-m evil"), Path::new("/w"))
            .unwrap();
        assert_eq!(&dash.argv[dash.argv.len() - 2..], ["--", "-m evil"]);
        assert_eq!(dash.argv.iter().filter(|a| *a == "-m").count(), 1);
        assert!(run.codex_events);
        let none = Agents::default();
        assert!(none
            .invocation(&spec("codex", "x"), Path::new("/w"))
            .unwrap_err()
            .contains("not installed"));
    }

    #[test]
    fn bad_agent_definitions_are_refused() {
        for text in ["noequals", "=cmd", "bad name=cmd", "x=", "x='unclosed"] {
            assert!(parse_agent(text).is_err(), "{text}");
        }
    }
}
