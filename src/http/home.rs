//! What a browser gets at a node's address outside `/api`: a small self-contained page named
//! Codex Mesh that says where the API is. Paths under `/api/` keep their JSON errors.

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The page, with no script and nothing loaded from elsewhere.
const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Codex Mesh</title>
<style>
  :root { color-scheme: light dark; font-family: system-ui, sans-serif; }
  body { max-width: 40rem; margin: 4rem auto; padding: 0 1rem; line-height: 1.5; }
  code { font-family: ui-monospace, monospace; }
</style>
</head>
<body>
<h1>Codex Mesh</h1>
<p>This node serves the API at <code>/api/v1</code>: check it with
<code>curl http://&lt;this address&gt;/api/v1/health</code>, and use it with the token in the
node's data directory (<code>codex-mesh status</code> on the node shows the mesh).</p>
<p>The web dashboard is not part of this build.</p>
</body>
</html>
"#;

/// Answer for any path no route matched.
pub async fn fallback(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let api = path == "/api" || path.starts_with("/api/") || path == "/metrics";
    if api || !(method == Method::GET || method == Method::HEAD) {
        return ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()).into_response();
    }
    let mut response = (StatusCode::OK, PAGE).into_response();
    let headers = response.headers_mut();
    let set = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
