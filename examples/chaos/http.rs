//! A small blocking HTTP/1.1 client for the chaos run: short timeouts (a node that was just
//! killed must not hold the run up) and extra request headers (`Idempotency-Key`).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

use crate::common::ApiEndpoint;

/// Time allowed to connect to a node's API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest response body read (a page of 500 jobs is well below this).
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// Status code and body of a response.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The body, decoded as UTF-8 (lossy).
    pub body: String,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.body).map_err(|e| {
            format!(
                "HTTP {}: body is not JSON ({e}): {}",
                self.status,
                crate::common::truncate(&self.body, 200)
            )
        })
    }
}

/// One authenticated request with `Connection: close`; `timeout` bounds every read and write.
pub fn request(
    endpoint: &ApiEndpoint,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<Reply> {
    let host = endpoint
        .url
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
        .ok_or_else(|| invalid(format!("not an http:// URL: {}", endpoint.url)))?;
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| invalid(format!("{host} resolves to no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT.min(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: */*\r\n\
         Authorization: Bearer {}\r\n",
        endpoint.token
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        head.push_str("Content-Type: application/json\r\n");
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut raw)?;
    parse(&raw)
}

/// `GET path` that must answer 200 with JSON.
pub fn get_json(endpoint: &ApiEndpoint, path: &str, timeout: Duration) -> Result<Value, String> {
    let reply = request(endpoint, "GET", path, None, &[], timeout)
        .map_err(|e| format!("GET {path}: {e}"))?;
    if reply.status != 200 {
        return Err(format!(
            "GET {path}: HTTP {}: {}",
            reply.status,
            crate::common::truncate(&reply.body, 200)
        ));
    }
    reply.json()
}

/// Parses a complete response (the peer closed the connection after it).
fn parse(raw: &[u8]) -> io::Result<Reply> {
    let head_end = find(raw, b"\r\n\r\n")
        .ok_or_else(|| invalid("connection closed before the response head".to_owned()))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value.parse::<usize>().ok();
        } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(length) = length {
        rest.get(..length)
            .ok_or_else(|| invalid(format!("body shorter than Content-Length {length}")))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Decodes a complete chunked body.
fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end =
            find(data, b"\r\n").ok_or_else(|| invalid("truncated chunked body".to_owned()))?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_hex = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_hex:?}")))?;
        if size == 0 {
            return Ok(out);
        }
        let start = line_end + 2;
        let chunk = data
            .get(start..start + size)
            .ok_or_else(|| invalid("truncated chunk".to_owned()))?;
        out.extend_from_slice(chunk);
        data = data.get(start + size + 2..).unwrap_or_default();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
