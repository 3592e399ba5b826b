//! Job commands: submit, jobs, job, cancel, retry.

use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use super::client::{print_json, short, urlencode, Api, ClientError};
use super::sse::SseParser;
use super::{ClientArgs, SubmitArgs};
use crate::proto::jobs::JobStatus;

/// `codex-mesh submit`. Returns whether the job succeeded (always true without `--wait`).
pub async fn submit(args: SubmitArgs) -> Result<bool, ClientError> {
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| ClientError::Refused(format!("cannot read the prompt from stdin: {e}")))?;
        text
    } else {
        args.prompt.clone()
    };
    let body = json!({
        "prompt": prompt,
        "node": args.node,
        "tag": args.tag,
        "repos": args.repos,
        "agent": args.agent,
        "model": args.model,
        "sandbox": args.sandbox,
        "timeout_secs": args.timeout,
        "idle_timeout_secs": args.idle_timeout,
        "origin": "cli",
    });
    let api = Api::locate(&args.client)?;
    let job = api.call(Method::POST, "/api/v1/jobs", Some(body)).await?;
    if !args.wait {
        if args.client.json {
            print_json(&job);
        } else {
            println!("{}", job["id"].as_str().unwrap_or(""));
        }
        return Ok(true);
    }
    let id = job["id"].as_str().unwrap_or("").to_string();
    if !args.client.json {
        eprintln!("submitted {id}");
    }
    let limit = job["timeout_secs"].as_u64().unwrap_or(3600) + 120;
    let quiet = args.client.json;
    let followed = match follow_events(&api, &id, quiet).await {
        Ok(()) => true,
        Err(e) => {
            if !quiet {
                eprintln!("({e}; polling instead)");
            }
            false
        }
    };
    let done = wait_for(&api, &id, Duration::from_secs(limit), quiet || followed).await?;
    if args.client.json {
        print_json(&done);
    } else {
        print_job(&done);
    }
    Ok(done["status"] == "succeeded")
}

/// Follow the job's event stream until it ends, printing (unless `quiet`) status changes
/// and what the agent does to stderr: Codex's parsed events, or other agents' output.
async fn follow_events(api: &Api, id: &str, quiet: bool) -> Result<(), ClientError> {
    let path = format!("/api/v1/jobs/{}/events", urlencode(id));
    let mut response = api.open_stream(&path).await?;
    let mut parser = SseParser::default();
    let mut last_status = String::new();
    // Codex's raw log is JSON; its parsed `agent` events are shown instead.
    let mut raw_log = false;
    let broken = |e: reqwest::Error| ClientError::Unreachable {
        url: path.clone(),
        reason: e.to_string(),
    };
    while let Some(chunk) = response.chunk().await.map_err(broken)? {
        for event in parser.push(&chunk) {
            let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            match event.name.as_str() {
                "end" => return Ok(()),
                "job" if !quiet => {
                    raw_log = data["agent"] != "codex";
                    let status = data["status"].as_str().unwrap_or("").to_string();
                    if status != last_status {
                        match data["node_name"].as_str() {
                            Some(node) => eprintln!("{status} (node {node})"),
                            None => eprintln!("{status}"),
                        }
                        last_status = status;
                    }
                }
                "log" if !quiet && raw_log => {
                    for line in event.data.lines() {
                        eprintln!("  | {line}");
                    }
                }
                "agent" if !quiet => {
                    if let Some(line) = describe_agent_event(&data) {
                        eprintln!("  {line}");
                    }
                }
                _ => {}
            }
        }
    }
    Err(ClientError::Refused(
        "the event stream ended early".to_string(),
    ))
}

/// One line for an `agent` event, or nothing for those not worth a line.
fn describe_agent_event(event: &Value) -> Option<String> {
    let text = |k: &str| event[k].as_str().unwrap_or("").to_string();
    let line = match event["kind"].as_str()? {
        "command" => match event["exit_code"].as_i64() {
            Some(code) => format!("$ {} (exit {code})", text("command")),
            None => format!("$ {}", text("command")),
        },
        "file_change" => {
            let paths: Vec<&str> = event["paths"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            format!("changed {}", paths.join(", "))
        }
        "message" => format!("agent: {}", text("text")),
        "error" => format!("error: {}", text("message")),
        "usage" => format!(
            "tokens: {} in, {} out",
            event["input_tokens"], event["output_tokens"]
        ),
        _ => return None,
    };
    Some(line)
}

/// Whether the job object from the API is in a final status.
fn has_finished(job: &Value) -> bool {
    serde_json::from_value::<JobStatus>(job["status"].clone()).is_ok_and(|s| s.is_terminal())
}

async fn wait_for(api: &Api, id: &str, limit: Duration, quiet: bool) -> Result<Value, ClientError> {
    let deadline = Instant::now() + limit;
    let path = format!("/api/v1/jobs/{}", urlencode(id));
    let mut last = String::new();
    loop {
        let job = api.call(Method::GET, &path, None).await?;
        let status = job["status"].as_str().unwrap_or("").to_string();
        if status != last && !quiet {
            eprintln!("{status}");
        }
        if has_finished(&job) {
            return Ok(job);
        }
        last = status;
        if Instant::now() > deadline {
            return Err(ClientError::Refused(format!(
                "job {id} is still {last} after {}s; stopped waiting",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Earlier attempts, one line each (only when there were several).
fn print_attempts(job: &Value) {
    let attempts = job["attempts"].as_array().map_or(&[][..], Vec::as_slice);
    if attempts.len() < 2 {
        return;
    }
    println!("attempts");
    for a in attempts {
        let node = a["node_name"]
            .as_str()
            .map(str::to_string)
            .or_else(|| a["node"].as_str().map(short))
            .unwrap_or_else(|| "-".into());
        let took = match (a["started_at"].as_u64(), a["ended_at"].as_u64()) {
            (Some(start), Some(end)) => {
                format!(", {:.1} s", end.saturating_sub(start) as f64 / 1000.0)
            }
            _ => String::new(),
        };
        let reason = a["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        println!(
            "  {:<3} {} on {node}{took}{reason}",
            a["attempt"],
            a["status"].as_str().unwrap_or("?")
        );
    }
}

fn print_job(job: &Value) {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    println!("job       {}", text(&job["id"]));
    println!(
        "status    {} (attempt {})",
        text(&job["status"]),
        job["attempt"]
    );
    if let Some(node) = job["node"].as_str() {
        println!(
            "node      {} ({})",
            job["node_name"].as_str().unwrap_or("?"),
            short(node)
        );
    }
    if let Some(reason) = job["reason"].as_str() {
        println!("reason    {reason}");
    }
    print_attempts(job);
    let repos: Vec<String> = job["repos"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| text(&r["source"]))
        .collect();
    if !repos.is_empty() {
        println!("repos     {}", repos.join(", "));
    }
    println!(
        "prompt    {}",
        text(&job["prompt"]).lines().next().unwrap_or("")
    );
    let result = &job["result"];
    if let Some(ms) = result["duration_ms"].as_u64() {
        let prepare = result["prepare_ms"].as_u64().unwrap_or(0);
        println!(
            "took      {:.1} s (repositories {:.1} s)",
            ms as f64 / 1000.0,
            prepare as f64 / 1000.0
        );
    }
    if let Some(code) = result["exit_code"].as_i64() {
        println!("exit code {code}");
    }
    if let Some(usage) = result["usage"].as_object() {
        let tokens = |k: &str| usage.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        println!(
            "tokens    {} in ({} cached), {} out",
            tokens("input_tokens"),
            tokens("cached_input_tokens"),
            tokens("output_tokens")
        );
    }
    for diff in result["diffs"].as_array().into_iter().flatten() {
        let files = diff["files"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        println!(
            "changes   {}: {} file(s)",
            text(&diff["source"]),
            files.len()
        );
        for file in files {
            println!(
                "          +{:<5} -{:<5} {}",
                file["added"],
                file["removed"],
                text(&file["path"])
            );
        }
    }
    if let Some(message) = result["final_message"].as_str() {
        println!("\n{message}");
    }
}

/// `codex-mesh jobs`
pub async fn list(
    status: Option<String>,
    node: Option<String>,
    limit: usize,
    client: ClientArgs,
) -> Result<(), ClientError> {
    let api = Api::locate(&client)?;
    let mut path = format!("/api/v1/jobs?limit={limit}");
    if let Some(status) = status {
        path.push_str(&format!("&status={}", urlencode(&status)));
    }
    if let Some(node) = node {
        path.push_str(&format!("&node={}", urlencode(&node)));
    }
    let list = api.call(Method::GET, &path, None).await?;
    if client.json {
        print_json(&list["jobs"]);
        return Ok(());
    }
    println!("{:<26} {:<10} {:<12} PROMPT", "ID", "STATUS", "NODE");
    for job in list["jobs"].as_array().into_iter().flatten() {
        let prompt: String = job["prompt"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        println!(
            "{:<26} {:<10} {:<12} {}",
            job["id"].as_str().unwrap_or(""),
            job["status"].as_str().unwrap_or(""),
            job["node_name"].as_str().unwrap_or("-"),
            prompt.replace('\n', " ")
        );
    }
    Ok(())
}

/// `codex-mesh job ID`
pub async fn show(id: String, client: ClientArgs) -> Result<(), ClientError> {
    let api = Api::locate(&client)?;
    let job = api
        .call(
            Method::GET,
            &format!("/api/v1/jobs/{}", urlencode(&id)),
            None,
        )
        .await?;
    if client.json {
        print_json(&job);
    } else {
        print_job(&job);
    }
    Ok(())
}

/// `codex-mesh cancel ID` and `codex-mesh retry ID`
pub async fn act(id: String, action: &str, client: ClientArgs) -> Result<(), ClientError> {
    let api = Api::locate(&client)?;
    let path = format!("/api/v1/jobs/{}/{action}", urlencode(&id));
    let job = api.call(Method::POST, &path, None).await?;
    if client.json {
        print_json(&job);
    } else {
        println!(
            "{}: {} (attempt {})",
            job["id"].as_str().unwrap_or(""),
            job["status"].as_str().unwrap_or(""),
            job["attempt"]
        );
    }
    Ok(())
}

/// `codex-mesh logs ID [-f]`: print the job's log; with `follow`, keep printing until the job
/// has finished and its log is complete.
pub async fn logs(id: String, follow: bool, client: ClientArgs) -> Result<(), ClientError> {
    use std::io::Write;
    let api = Api::locate(&client)?;
    let id_path = urlencode(&id);
    let mut offset = 0u64;
    loop {
        let (data, size) = api
            .get_bytes(&format!("/api/v1/jobs/{id_path}/log?offset={offset}"))
            .await?;
        offset += data.len() as u64;
        let mut out = std::io::stdout();
        let _ = out.write_all(&data);
        let _ = out.flush();
        if !data.is_empty() && offset < size {
            continue; // more is already there
        }
        if !follow {
            return Ok(());
        }
        let job = api
            .call(Method::GET, &format!("/api/v1/jobs/{id_path}"), None)
            .await?;
        if has_finished(&job) && data.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
