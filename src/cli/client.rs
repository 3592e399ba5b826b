//! Client commands: find the node's API, call it, print tables or JSON.

use std::path::PathBuf;

use serde_json::Value;
use thiserror::Error;

use crate::secret::Secret;

use super::{default_data_dir, ClientArgs, NodeCommand};

/// Client command failures.
#[derive(Debug, Error)]
pub enum ClientError {
    /// No API URL given and no running node found.
    #[error("no running node found in {0} (no api-url file): start one with `codex-mesh up`, or pass --api URL --token T")]
    NoNode(PathBuf),
    /// No token given and none in the data dir.
    #[error("no API token: pass --token or set CODEX_MESH_TOKEN (it is in <data-dir>/api-token on the node)")]
    NoToken,
    /// The request could not be made.
    #[error("cannot reach the node API at {url}: {reason}")]
    Unreachable {
        /// URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The API answered with an error.
    #[error("the node refused: {0}")]
    Refused(String),
}

pub(super) struct Api {
    base: String,
    token: Secret<String>,
    http: reqwest::Client,
}

impl Api {
    pub(super) fn locate(args: &ClientArgs) -> Result<Api, ClientError> {
        let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
        let base = match &args.api {
            Some(url) => url.clone(),
            None => std::fs::read_to_string(dir.join("api-url"))
                .map(|s| s.trim().to_string())
                .map_err(|_| ClientError::NoNode(dir.clone()))?,
        };
        let token = match &args.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(dir.join("api-token"))
                .map(|s| Secret::new(s.trim().to_string()))
                .map_err(|_| ClientError::NoToken)?,
        };
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::new(),
        })
    }

    pub(super) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.expose());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            let message = value["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string();
            Err(ClientError::Refused(format!("{status}: {message}")))
        }
    }
}

impl Api {
    /// Open a streaming GET (server-sent events); the caller reads the body as it arrives.
    pub(super) async fn open_stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(self.token.expose())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let value: Value = response.json().await.unwrap_or(Value::Null);
        let message = value["error"].as_str().unwrap_or("no reason given");
        Err(ClientError::Refused(format!("{status}: {message}")))
    }

    /// GET a non-JSON body; returns the bytes and the `x-log-size` header.
    pub(super) async fn get_bytes(&self, path: &str) -> Result<(Vec<u8>, u64), ClientError> {
        let url = format!("{}{path}", self.base);
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let response = self
            .http
            .get(&url)
            .bearer_auth(self.token.expose())
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        let size = response
            .headers()
            .get("x-log-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            Ok((bytes.to_vec(), size))
        } else {
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let message = value["error"].as_str().unwrap_or("no reason given");
            Err(ClientError::Refused(format!("{status}: {message}")))
        }
    }
}

pub(super) fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub(super) fn short(id: &str) -> String {
    if id.len() > 12 {
        format!("…{}", &id[id.len() - 8..])
    } else {
        id.to_string()
    }
}

/// `codex-mesh status`
pub async fn status(args: ClientArgs) -> Result<(), ClientError> {
    let api = Api::locate(&args)?;
    let v = api
        .call(reqwest::Method::GET, "/api/v1/status", None)
        .await?;
    if args.json {
        print_json(&v);
        return Ok(());
    }
    let master = match v["master"].as_str() {
        Some(id) => format!(
            "{} ({}), epoch {}",
            v["master_name"].as_str().unwrap_or("?"),
            short(id),
            v["epoch"]
        ),
        None => format!(
            "none (epoch {}): election in progress or no quorum",
            v["epoch"]
        ),
    };
    println!(
        "node      {} ({})",
        v["name"].as_str().unwrap_or(""),
        v["node_id"].as_str().unwrap_or("")
    );
    println!("mesh      {}", v["mesh_id"].as_str().unwrap_or(""));
    println!("master    {master}");
    println!(
        "voters    {}",
        v["voters"].as_array().map_or(0, |a| a.len())
    );
    println!(
        "members   {} online / {} total",
        v["members"]["online"], v["members"]["total"]
    );
    println!("peers     {} connected", v["peers_connected"]);
    Ok(())
}

/// `codex-mesh nodes`
pub async fn nodes(args: ClientArgs) -> Result<(), ClientError> {
    let api = Api::locate(&args)?;
    let v = api
        .call(reqwest::Method::GET, "/api/v1/nodes", None)
        .await?;
    if args.json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{:<16} {:<10} {:<9} {:<6} {:>5} {:>5} {:>7}  TAGS",
        "NAME", "ID", "STATE", "ROLE", "SLOTS", "CPUS", "MEM GB"
    );
    for n in v.as_array().into_iter().flatten() {
        let role = if n["is_master"].as_bool() == Some(true) {
            "master"
        } else if n["is_voter"].as_bool() == Some(true) {
            "voter"
        } else {
            ""
        };
        let tags: Vec<&str> = n["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        println!(
            "{:<16} {:<10} {:<9} {:<6} {:>5} {:>5} {:>7.1}  {}",
            n["name"].as_str().unwrap_or(""),
            short(n["id"].as_str().unwrap_or("")),
            n["state"].as_str().unwrap_or(""),
            role,
            n["slots"].as_u64().unwrap_or(0),
            n["cpus"].as_u64().unwrap_or(0),
            n["memory_bytes"].as_f64().unwrap_or(0.0) / 1e9,
            tags.join(",")
        );
    }
    Ok(())
}

/// `codex-mesh ticket`
pub async fn ticket(args: ClientArgs) -> Result<(), ClientError> {
    let api = Api::locate(&args)?;
    let v = api
        .call(reqwest::Method::GET, "/api/v1/ticket", None)
        .await?;
    if args.json {
        print_json(&v);
    } else {
        println!("{}", v["ticket"].as_str().unwrap_or(""));
    }
    Ok(())
}

/// `codex-mesh node <action> <node>`
pub async fn node_command(command: NodeCommand) -> Result<(), ClientError> {
    use reqwest::Method;
    let (target, method, suffix, body) = match command {
        NodeCommand::Drain(t) => (t, Method::POST, "/drain", None),
        NodeCommand::Undrain(t) => (t, Method::POST, "/undrain", None),
        NodeCommand::Admit(t) => (t, Method::POST, "/admit", None),
        NodeCommand::Remove(t) => (t, Method::DELETE, "", None),
        NodeCommand::Edit {
            target,
            tags,
            slots,
        } => {
            let tags = tags.map(|t| t.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>());
            let body = serde_json::json!({ "tags": tags, "slots": slots });
            (target, Method::PATCH, "", Some(body))
        }
    };
    let api = Api::locate(&target.client)?;
    let path = format!("/api/v1/nodes/{}{suffix}", urlencode(&target.node));
    let v = api.call(method, &path, body).await?;
    if target.client.json {
        print_json(&v);
    } else {
        println!(
            "{} ({}): {}",
            v["name"].as_str().unwrap_or(""),
            v["id"].as_str().unwrap_or(""),
            v["state"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub(super) fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
