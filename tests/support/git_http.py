#!/usr/bin/env python3
"""Git's smart HTTP protocol behind HTTP Basic authentication, like a private GitHub repository.

Standard library only (Python 3.11+). Runs the real `git http-backend` as a CGI program for
every request that carries the right credentials; anything else gets 401 with a
`WWW-Authenticate` challenge, as GitHub answers a clone of a private repository.

Usage:
    git_http.py --root DIR --token TOKEN [--port 0] [--log FILE]

Repositories are served from DIR: `http://127.0.0.1:<port>/<owner>/<name>.git` is
`DIR/<owner>/<name>.git` (a bare repository, or a work tree whose `.git` is used). The accepted
credentials are any user name with TOKEN as the password (GitHub accepts `x-access-token`).

The first stdout line is `PORT <n>` (flushed). With --log, one JSON line per request:
`method`, `path`, `user` (the Basic user name, or null) and `status`; never the password.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG_LOCK = threading.Lock()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log")
    return parser.parse_args()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "git-http-test"

    def log_message(self, *_):
        pass

    def credentials(self):
        """(user, password) from a Basic Authorization header, or (None, None)."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return None, None
        try:
            decoded = base64.b64decode(header[6:], validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None, None
        user, _, password = decoded.partition(":")
        return user, password

    def record(self, user, status, password=None):
        if not self.server.log_path:
            return
        line = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "user": user,
                "password": password,
                "status": status,
            }
        )
        with LOG_LOCK, open(self.server.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailer section, up to the empty line.
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, status, headers, payload):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def handle_git(self):
        body = self.body()
        user, password = self.credentials()
        if password != self.server.token:
            self.record(user, 401, password)
            self.answer(
                401,
                [("WWW-Authenticate", 'Basic realm="git"'), ("Content-Type", "text/plain")],
                b"authentication required\n",
            )
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.server.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": user or "",
            "REMOTE_ADDR": "127.0.0.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        result = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.record(user, status)
        self.answer(status, headers, payload)

    do_GET = handle_git
    do_POST = handle_git


def main():
    args = parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.root = os.path.abspath(args.root)
    server.token = args.token
    server.log_path = args.log
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
