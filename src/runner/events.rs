//! Codex `exec --json` output: one JSON event per line. Parsed leniently: unknown event or item
//! types, missing fields and garbage lines are skipped, never an error.

use serde::Serialize;
use serde_json::Value;

use crate::proto::jobs::Usage;

/// What we take from one Codex event. Serialised (for the live event stream) as an object
/// whose `kind` names the variant in snake case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentEvent {
    /// A command the agent started.
    CommandStarted {
        /// The command line.
        command: String,
    },
    /// A command the agent ran, once finished.
    Command {
        /// The command line.
        command: String,
        /// Its exit code, if reported.
        exit_code: Option<i64>,
    },
    /// Files the agent changed.
    FileChange {
        /// Paths changed.
        paths: Vec<String>,
    },
    /// A message from the agent.
    Message {
        /// Its text.
        text: String,
    },
    /// Token usage of a finished turn.
    Usage(Usage),
    /// Something went wrong (a failed turn, or a non-fatal error Codex reported).
    Error {
        /// What Codex said.
        message: String,
    },
}

/// Parse one line of Codex JSONL.
pub fn parse_line(line: &str) -> Option<AgentEvent> {
    let event: Value = serde_json::from_str(line.trim()).ok()?;
    let text = |v: &Value| v.as_str().map(str::to_string);
    let failure = |message: Option<String>| message.map(|message| AgentEvent::Error { message });
    match event.get("type")?.as_str()? {
        "item.started" => {
            let item = event.get("item")?;
            match item.get("type")?.as_str()? {
                "command_execution" => Some(AgentEvent::CommandStarted {
                    command: text(item.get("command")?)?,
                }),
                _ => None,
            }
        }
        "item.completed" => {
            let item = event.get("item")?;
            match item.get("type")?.as_str()? {
                "agent_message" => text(item.get("text")?).map(|text| AgentEvent::Message { text }),
                "command_execution" => Some(AgentEvent::Command {
                    command: text(item.get("command")?)?,
                    exit_code: item.get("exit_code").and_then(Value::as_i64),
                }),
                "file_change" => Some(AgentEvent::FileChange {
                    paths: item
                        .get("changes")?
                        .as_array()?
                        .iter()
                        .filter_map(|c| c.get("path").and_then(text))
                        .collect(),
                }),
                "error" => failure(text(item.get("message")?)),
                _ => None,
            }
        }
        "turn.completed" => {
            let usage = event.get("usage")?;
            let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
            Some(AgentEvent::Usage(Usage {
                input_tokens: n("input_tokens"),
                cached_input_tokens: n("cached_input_tokens"),
                output_tokens: n("output_tokens"),
            }))
        }
        "turn.failed" => {
            let error = event.get("error");
            let message = error
                .and_then(|e| e.get("message"))
                .and_then(text)
                .unwrap_or_else(|| "the turn failed".into());
            failure(Some(message))
        }
        "error" => failure(text(event.get("message")?)),
        _ => None,
    }
}

/// What a run's events add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The last agent message.
    pub last_message: Option<String>,
    /// Total usage over turns.
    pub usage: Option<Usage>,
    /// Commands run, with exit codes.
    pub commands: Vec<(String, Option<i64>)>,
    /// The last error reported.
    pub error: Option<String>,
}

impl Summary {
    /// Fold one event in.
    pub fn add(&mut self, event: AgentEvent) {
        match event {
            AgentEvent::Message { text } => self.last_message = Some(text),
            AgentEvent::Command { command, exit_code } => {
                if self.commands.len() < 1000 {
                    self.commands.push((command, exit_code));
                }
            }
            AgentEvent::Usage(u) => {
                let total = self.usage.get_or_insert_with(Usage::default);
                total.input_tokens += u.input_tokens;
                total.cached_input_tokens += u.cached_input_tokens;
                total.output_tokens += u.output_tokens;
            }
            AgentEvent::Error { message } => self.error = Some(message),
            AgentEvent::CommandStarted { .. } | AgentEvent::FileChange { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_a_typical_run() {
        let lines = [
            r#"{"type":"thread.started","thread_id":"t1"}"#,
            r#"{"type":"turn.started"}"#,
            r#"{"type":"item.completed","item":{"id":"i0","type":"reasoning","text":"thinking"}}"#,
            r#"{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"bash -lc ls","aggregated_output":"a\n","exit_code":0,"status":"completed"}}"#,
            r#"{"type":"item.completed","item":{"id":"i2","type":"file_change","changes":[{"path":"a.txt","kind":"add"}],"status":"completed"}}"#,
            r#"{"type":"item.completed","item":{"id":"i3","type":"agent_message","text":"Done."}}"#,
            r#"{"type":"turn.completed","usage":{"input_tokens":10,"cached_input_tokens":2,"output_tokens":5}}"#,
            r#"{"type":"brand.new.event","x":1}"#,
            "not json at all",
            "",
        ];
        let mut summary = Summary::default();
        for line in lines {
            if let Some(event) = parse_line(line) {
                summary.add(event);
            }
        }
        assert_eq!(summary.last_message.as_deref(), Some("Done."));
        assert_eq!(summary.commands, vec![("bash -lc ls".to_string(), Some(0))]);
        assert_eq!(
            summary.usage,
            Some(Usage {
                input_tokens: 10,
                cached_input_tokens: 2,
                output_tokens: 5
            })
        );
        assert_eq!(summary.error, None);
    }

    #[test]
    fn failures_are_reported() {
        let event = parse_line(r#"{"type":"turn.failed","error":{"message":"model overloaded"}}"#);
        assert_eq!(
            event,
            Some(AgentEvent::Error {
                message: "model overloaded".into()
            })
        );
        assert_eq!(
            parse_line(r#"{"type":"error","message":"boom"}"#),
            Some(AgentEvent::Error {
                message: "boom".into()
            })
        );
    }

    #[test]
    fn events_serialise_with_their_kind() {
        let started = parse_line(
            r#"{"type":"item.started","item":{"id":"i1","type":"command_execution","command":"ls","exit_code":null,"status":"in_progress"}}"#,
        );
        let json = |e: Option<AgentEvent>| serde_json::to_value(e.expect("parsed")).unwrap();
        assert_eq!(
            json(started),
            serde_json::json!({"kind": "command_started", "command": "ls"})
        );
        let done = parse_line(
            r#"{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"ls","exit_code":2,"status":"failed"}}"#,
        );
        assert_eq!(
            json(done),
            serde_json::json!({"kind": "command", "command": "ls", "exit_code": 2})
        );
        let usage = parse_line(
            r#"{"type":"turn.completed","usage":{"input_tokens":3,"cached_input_tokens":1,"output_tokens":2}}"#,
        );
        assert_eq!(
            json(usage),
            serde_json::json!({"kind": "usage", "input_tokens": 3, "cached_input_tokens": 1, "output_tokens": 2})
        );
        assert_eq!(
            json(parse_line(
                r#"{"type":"item.completed","item":{"type":"agent_message","text":"hi"}}"#
            )),
            serde_json::json!({"kind": "message", "text": "hi"})
        );
    }
}
