#!/usr/bin/env python3
"""Scripted stand-in for the OpenAI Responses API, for driving the real Codex CLI in tests.

Standard library only (Python 3.11+). tests/support/README.md has the verified facts about what
Codex sends and what it needs back.

Usage:
    fake_model.py --port 0 --script turns.json --log requests.jsonl [--per-thread]

The first line on stdout is `PORT <n>` (flushed), so a test can start this with `--port 0` and
read the port it got. Point Codex at it with a custom provider whose base_url is
`http://127.0.0.1:<n>/v1` and whose wire_api is "responses".

The script is a JSON list of turns, or {"turns": [...], "by_prompt": [{"match": "text",
"turns": [...]}, ...]}. Each POST /v1/responses consumes the next turn:

    {"exec": "echo hi > hello.txt"}     run a shell command through whichever tool Codex offered:
                                        exec_command (unknown model names), the code-mode `exec`
                                        JavaScript tool (Codex's default model), shell_command,
                                        shell or local_shell; optional "workdir", "timeout_ms"
                                        (exec_command's yield_time_ms), "login" (false: no login
                                        shell, so no profile noise in the output), "call_id"
    {"patch": "*** Begin Patch\n..."}   apply a patch in Codex's apply_patch format (Codex
                                        reports it as a file_change item)
    {"wait": 30000}                     poll a command that is still running (exec_command yields
                                        after its yield time, 10 s unless "timeout_ms" says
                                        otherwise, at most 30 s): write_stdin with no input for the
                                        session id in the newest tool output ("session_id" to
                                        give one), waiting up to this many milliseconds
    {"message": "final text"}           an assistant message; ends the Codex turn
    {"stall": 30}                       response.created, then nothing for 30 s, then the
                                        connection is closed (idle-watchdog tests)
    {"hang": 30}                        no answer at all, not even headers, for 30 s; then the
                                        connection is closed
    {"fail": 500}                       an HTTP error with a JSON error body; optional "body"
                                        (object or string) and "retry_after" (seconds)
    {"disconnect": true}                response.created, then the connection is closed without
                                        response.completed
    {"function_call": {"name": "...", "arguments": {...} or "..."}}
                                        any other function-tool call, verbatim
    {"items": [<output item>, ...]}     raw output items, each sent as response.output_item.done
    {"events": [{"type": ...}, ...]}    raw SSE events, verbatim (the `event:` line is "type")

A turn may also carry "delay" (seconds to wait before answering), "usage" (replaces the usage
object of response.completed), "reasoning" (a reasoning summary sent first) and "text" (an
assistant message sent before an "exec"/"patch"/"function_call").

Which turn a request gets: by default one cursor for everything, in arrival order. With
--per-thread every Codex thread (one `codex exec` run, keyed by the request's
`prompt_cache_key`) walks its own copy of the turns. A thread whose first user prompt contains a
`by_prompt` entry's "match" text walks that entry's turns instead. Once a thread's (or the
shared) turns are used up, every further request gets the --default-message ("done").

Every request is appended to --log (truncated at start) as one JSON object per line:
    {"seq": 1, "time": 1700000000.123, "method": "POST", "path": "/v1/responses",
     "headers": {...}, "turn": 0, "action": "exec", "body": <parsed JSON, or the raw text>}
"turn" is the script index consumed (null when the default message was sent, or for other
routes); credential headers are logged as "<scheme> <redacted>".

GET .../models answers with a one-model list; any other route gets a JSON 404 (also logged).
Nothing a client sends stops the server; SIGTERM or SIGINT does.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shlex
import signal
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_USAGE = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 10,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 110,
}


class Script:
    """The scripted turns, shared by all handler threads.

    By default there is one cursor: each POST /v1/responses takes the next turn, whichever Codex
    process sent it. With per_thread=True every Codex thread (one `codex exec` run; identified by
    the request's `prompt_cache_key`, else its thread-id/session-id header) walks its own copy of
    the turns, so concurrent runs each get the whole script. A `by_prompt` entry whose "match"
    text occurs in a thread's first user prompt gives that thread those turns instead (always
    with its own cursor).
    """

    def __init__(
        self,
        turns: list[Any],
        default_message: str,
        per_thread: bool = False,
        by_prompt: list[dict[str, Any]] | None = None,
    ) -> None:
        self._turns = turns
        self._by_prompt = by_prompt or []
        self._per_thread = per_thread
        self._shared_next = 0
        self._threads: dict[str, list[Any]] = {}  # thread key -> [turns, next index]
        self._lock = threading.Lock()
        self.default_message = default_message

    def take(self, thread_key: str | None, prompt: str | None) -> tuple[int | None, Any]:
        with self._lock:
            state = self._threads.get(thread_key) if thread_key else None
            if state is None and thread_key:
                for entry in self._by_prompt:
                    match = entry.get("match")
                    if isinstance(match, str) and prompt is not None and match in prompt:
                        state = [entry.get("turns") or [], 0]
                        break
                if state is None and self._per_thread:
                    state = [self._turns, 0]
                if state is not None:
                    self._threads[thread_key] = state
            if state is not None:
                turns, index = state
                if index < len(turns):
                    state[1] += 1
                    return index, turns[index]
            elif self._shared_next < len(self._turns):
                index = self._shared_next
                self._shared_next += 1
                return index, self._turns[index]
        return None, {"message": self.default_message}


def thread_key_of(body: Any, headers: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("prompt_cache_key"), str):
        return body["prompt_cache_key"]
    for h in ("thread-id", "session-id", "session_id", "x-client-request-id"):
        v = headers.get(h)
        if v:
            return str(v)
    return None


# User-role texts that Codex adds itself, around the real prompt.
_INJECTED_PREFIXES = ("<environment_context", "<user_instructions", "# AGENTS.md instructions", "<turn_aborted")


def user_prompt_of(body: Any) -> str | None:
    """The text of the last user message that is not Codex's own <environment_context> etc."""
    if not isinstance(body, dict):
        return None
    items = body.get("input")
    if isinstance(items, str):
        return items
    if not isinstance(items, list):
        return None
    prompt = None
    for item in items:
        if not isinstance(item, dict) or item.get("role") != "user":
            continue
        content = item.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        text = "\n".join(t for t in texts if not t.lstrip().startswith(_INJECTED_PREFIXES))
        if text:
            prompt = text
    return prompt


class RequestLog:
    def __init__(self, path: str | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._seq = 0
        if path:
            # Truncate so a reused path only holds this run's requests.
            open(path, "w", encoding="utf-8").close()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            record = {"seq": self._seq, "time": round(time.time(), 3), **record}
            if not self._path:
                return
            try:
                with open(self._path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            except OSError as e:  # never let logging kill a request
                print(f"fake_model: cannot write log: {e}", file=sys.stderr, flush=True)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _tool_entries(body: Any) -> list[dict[str, Any]]:
    """Every tool definition offered: the top-level `tools` array plus the tools of any
    `additional_tools` input item (how Codex offers its code-mode tools), namespaces flattened."""
    found: list[dict[str, Any]] = []

    def walk(tools: Any) -> None:
        if not isinstance(tools, list):
            return
        for tool in tools:
            if not isinstance(tool, dict):
                continue
            found.append(tool)
            if tool.get("type") == "namespace":
                walk(tool.get("tools"))

    if isinstance(body, dict):
        walk(body.get("tools"))
        for item in body.get("input") or []:
            if isinstance(item, dict) and item.get("type") == "additional_tools":
                walk(item.get("tools"))
    return found


def offered_tools(body: Any) -> dict[str, dict[str, Any]]:
    """name -> tool definition, for everything the request offered."""
    tools: dict[str, dict[str, Any]] = {}
    for tool in _tool_entries(body):
        if tool.get("type") == "namespace":
            continue
        name = tool.get("name")
        if not isinstance(name, str) and isinstance(tool.get("function"), dict):
            name = tool["function"].get("name")
        if isinstance(name, str):
            tools.setdefault(name, tool)
        elif isinstance(tool.get("type"), str):
            tools.setdefault(tool["type"], tool)  # e.g. {"type": "local_shell"}
    return tools


def _code_mode(tools: dict[str, dict[str, Any]]) -> bool:
    """Codex's code mode: one freeform `exec` tool that runs JavaScript calling `tools.*`."""
    t = tools.get("exec")
    return isinstance(t, dict) and t.get("type") == "custom"


def _js_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid JavaScript string literal


def _code_mode_call(js: str, call_id: str) -> dict[str, Any]:
    return {
        "type": "custom_tool_call",
        "id": _new_id("ctc"),
        "call_id": call_id,
        "name": "exec",
        "input": js,
        "status": "completed",
    }


def shell_call_item(turn: dict[str, Any], body: Any) -> dict[str, Any]:
    """A call of whichever shell tool the request offered, with that tool's argument shape."""
    cmd = turn.get("exec")
    if isinstance(cmd, list):
        argv = [str(a) for a in cmd]
        cmd_str = shlex.join(argv)
    else:
        cmd_str = str(cmd)
        argv = ["bash", "-lc", cmd_str]
    call_id = str(turn.get("call_id") or _new_id("call"))
    workdir = turn.get("workdir")
    timeout_ms = turn.get("timeout_ms")
    tools = offered_tools(body)

    if "exec_command" in tools and tools["exec_command"].get("type") == "function" and not _code_mode(tools):
        args: dict[str, Any] = {"cmd": cmd_str}
        if workdir:
            args["workdir"] = workdir
        if timeout_ms:
            args["yield_time_ms"] = timeout_ms
        if isinstance(turn.get("login"), bool):
            args["login"] = turn["login"]
        return _function_call("exec_command", args, call_id)
    if _code_mode(tools):
        js_args: dict[str, Any] = {"cmd": cmd_str}
        if workdir:
            js_args["workdir"] = workdir
        if timeout_ms:
            js_args["yield_time_ms"] = timeout_ms
        if isinstance(turn.get("login"), bool):
            js_args["login"] = turn["login"]
        js = f"const r = await tools.exec_command({json.dumps(js_args)});\ntext(r);"
        return _code_mode_call(js, call_id)
    if "shell_command" in tools:
        args = {"command": cmd_str}
        if workdir:
            args["workdir"] = workdir
        if timeout_ms:
            args["timeout_ms"] = timeout_ms
        return _function_call("shell_command", args, call_id)
    if "shell" in tools:
        args = {"command": argv}
        if workdir:
            args["workdir"] = workdir
        if timeout_ms:
            args["timeout_ms"] = timeout_ms
        return _function_call("shell", args, call_id)
    if "local_shell" in tools:
        action: dict[str, Any] = {"type": "exec", "command": argv}
        if workdir:
            action["working_directory"] = workdir
        if timeout_ms:
            action["timeout_ms"] = timeout_ms
        return {
            "type": "local_shell_call",
            "id": _new_id("lsh"),
            "call_id": call_id,
            "status": "completed",
            "action": action,
        }
    # Nothing recognisable was offered: fall back to the most common current tool.
    return _function_call("exec_command", {"cmd": cmd_str}, call_id)


def patch_call_item(turn: dict[str, Any], body: Any) -> dict[str, Any]:
    """Apply a patch in Codex's apply_patch format (*** Begin Patch ... *** End Patch)."""
    patch = str(turn.get("patch"))
    if not patch.endswith("\n"):
        patch += "\n"
    call_id = str(turn.get("call_id") or _new_id("call"))
    tools = offered_tools(body)
    if _code_mode(tools):
        return _code_mode_call(f"const r = await tools.apply_patch({_js_string(patch)});\ntext(r);", call_id)
    t = tools.get("apply_patch")
    if isinstance(t, dict) and t.get("type") == "custom":
        return {
            "type": "custom_tool_call",
            "id": _new_id("ctc"),
            "call_id": call_id,
            "name": "apply_patch",
            "input": patch,
            "status": "completed",
        }
    if isinstance(t, dict) and t.get("type") == "function":
        return _function_call("apply_patch", {"input": patch}, call_id)
    # No apply_patch tool (the case for unknown model names): Codex intercepts an
    # `apply_patch` heredoc run through its shell tool and reports it as a file_change.
    marker = "PATCH_EOF"
    return shell_call_item({"exec": f"apply_patch <<'{marker}'\n{patch}{marker}", "call_id": call_id}, body)


_SESSION_ID_PATTERNS = (
    re.compile(r"session ID (\d+)"),  # exec_command's text output
    re.compile(r'"session_id"\s*:\s*(\d+)'),  # code mode's JSON result
)


def _last_session_id(body: Any) -> int | None:
    """The session id of a still-running command, from the newest tool output in the request."""
    if not isinstance(body, dict) or not isinstance(body.get("input"), list):
        return None
    for item in reversed(body["input"]):
        if not isinstance(item, dict) or item.get("type") not in ("function_call_output", "custom_tool_call_output"):
            continue
        text = json.dumps(item.get("output"))
        text = text.replace('\\"', '"')
        for pattern in _SESSION_ID_PATTERNS:
            m = pattern.search(text)
            if m:
                return int(m.group(1))
    return None


def wait_call_item(turn: dict[str, Any], body: Any) -> dict[str, Any]:
    """Poll a command that outlived its yield time (exec_command answered "Process running with
    session ID N"): write_stdin with no input, waiting up to "wait" milliseconds."""
    call_id = str(turn.get("call_id") or _new_id("call"))
    session_id = turn.get("session_id")
    if not isinstance(session_id, int):
        session_id = _last_session_id(body)
    args: dict[str, Any] = {"session_id": session_id if session_id is not None else 0, "chars": ""}
    wait = turn.get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 0:
        args["yield_time_ms"] = int(wait)
    tools = offered_tools(body)
    if _code_mode(tools):
        return _code_mode_call(f"const r = await tools.write_stdin({json.dumps(args)});\ntext(r);", call_id)
    return _function_call("write_stdin", args, call_id)


def _function_call(name: str, args: Any, call_id: str) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args)
    return {
        "type": "function_call",
        "id": _new_id("fc"),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": _new_id("msg"),
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def reasoning_item(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": _new_id("rs"),
        "summary": [{"type": "summary_text", "text": text}],
    }


def turn_output_items(turn: dict[str, Any], body: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if turn.get("reasoning"):
        items.append(reasoning_item(str(turn["reasoning"])))
    if turn.get("text") and "message" not in turn:
        items.append(message_item(str(turn["text"])))
    if "exec" in turn:
        items.append(shell_call_item(turn, body))
    if "patch" in turn:
        items.append(patch_call_item(turn, body))
    if "wait" in turn:
        items.append(wait_call_item(turn, body))
    if isinstance(turn.get("function_call"), dict):
        fc = turn["function_call"]
        items.append(
            _function_call(
                str(fc.get("name", "unknown")),
                fc.get("arguments", {}),
                str(fc.get("call_id") or _new_id("call")),
            )
        )
    if isinstance(turn.get("items"), list):
        items.extend(i for i in turn["items"] if isinstance(i, dict))
    if "message" in turn:
        items.append(message_item(str(turn["message"])))
    return items


def action_name(turn: Any) -> str:
    if not isinstance(turn, dict):
        return "invalid"
    for key in ("hang", "fail", "stall", "disconnect", "events", "exec", "patch", "wait", "function_call", "items", "message"):
        if key in turn:
            return key
    return "message"


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-model/1"
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds of socket inactivity before a connection is dropped

    # Set on the class by main().
    script: Script
    log: RequestLog
    quiet: bool

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if not self.quiet:
            sys.stderr.write("fake_model: %s - %s\n" % (self.address_string(), format % args))

    # ---- plumbing -------------------------------------------------------------------------

    def _read_body(self) -> tuple[bytes, Any]:
        raw = b""
        length = self.headers.get("Content-Length")
        if length is not None:
            try:
                n = max(0, int(length))
            except ValueError:
                n = 0
            raw = self.rfile.read(n) if n else b""
        elif "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = self._read_chunked()
        encoding = (self.headers.get("Content-Encoding") or "").lower().strip()
        data = raw
        try:
            if encoding == "gzip":
                data = gzip.decompress(raw)
            elif encoding == "deflate":
                data = zlib.decompress(raw)
        except Exception:
            data = raw
        text = data.decode("utf-8", errors="replace")
        try:
            parsed: Any = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = text
        return data, parsed

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.rfile.readline(65537)
            if not line:
                break
            try:
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            except ValueError:
                break
            if size == 0:
                # trailers until an empty line
                while True:
                    t = self.rfile.readline(65537)
                    if not t or t in (b"\r\n", b"\n"):
                        break
                break
            out += self.rfile.read(size)
            self.rfile.readline(65537)
        return bytes(out)

    def _headers_dict(self) -> dict[str, str]:
        hidden = {"authorization", "cookie", "chatgpt-account-id", "openai-api-key"}
        out = {}
        for k, v in self.headers.items():
            key = k.lower()
            if key in hidden:
                # Keep the scheme so tests can see that a credential was sent, never its value.
                v = (v.split(" ", 1)[0] + " <redacted>") if " " in v else "<redacted>"
            out[key] = v
        return out

    def _send_json(self, status: int, obj: Any, extra_headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # No Content-Length and no chunking: the stream ends when we close the connection.
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, event: dict[str, Any]) -> None:
        etype = str(event.get("type", "message"))
        chunk = f"event: {etype}\ndata: {json.dumps(event)}\n\n".encode()
        self.wfile.write(chunk)
        self.wfile.flush()

    # ---- routes ---------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def do_PUT(self) -> None:  # noqa: N802
        self._guard(self._other)

    def do_DELETE(self) -> None:  # noqa: N802
        self._guard(self._other)

    def do_HEAD(self) -> None:  # noqa: N802
        self._guard(self._other)

    def _guard(self, fn: Any) -> None:
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # never crash the server on odd input
            self.close_connection = True
            print(f"fake_model: error handling {self.command} {self.path}: {e!r}", file=sys.stderr, flush=True)
            try:
                self._send_json(500, {"error": {"message": f"fake_model internal error: {e}"}})
            except Exception:
                pass

    def _path_only(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _get(self) -> None:
        path = self._path_only()
        self.log.write({"method": "GET", "path": self.path, "headers": self._headers_dict(), "turn": None, "body": None})
        if path.endswith("/models"):
            models = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in ("mock-model",)]
            self._send_json(200, {"object": "list", "data": models, "models": []})
        else:
            self._send_json(404, {"error": {"message": f"no route for GET {self.path}"}})

    def _other(self) -> None:
        _, body = self._read_body() if self.command != "HEAD" else (b"", None)
        self.log.write({"method": self.command, "path": self.path, "headers": self._headers_dict(), "turn": None, "body": body})
        if self.command == "HEAD":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send_json(404, {"error": {"message": f"no route for {self.command} {self.path}"}})

    def _post(self) -> None:
        path = self._path_only()
        _, body = self._read_body()
        if not path.endswith("/responses"):
            self.log.write({"method": "POST", "path": self.path, "headers": self._headers_dict(), "turn": None, "body": body})
            self._send_json(404, {"error": {"message": f"no route for POST {self.path}"}})
            return
        index, turn = self.script.take(thread_key_of(body, self.headers), user_prompt_of(body))
        action = action_name(turn)
        self.log.write(
            {"method": "POST", "path": self.path, "headers": self._headers_dict(), "turn": index, "action": action, "body": body}
        )
        if not isinstance(turn, dict):
            turn = {"message": str(turn)}
        delay = turn.get("delay")
        if isinstance(delay, (int, float)) and delay > 0:
            time.sleep(delay)
        self._respond(turn, body)

    def _respond(self, turn: dict[str, Any], body: Any) -> None:
        if "hang" in turn:
            # Not even response headers: the request is read, then nothing for N seconds.
            try:
                seconds = float(turn.get("hang") or 0)
            except (TypeError, ValueError):
                seconds = 30.0
            time.sleep(max(0.0, seconds))
            self.close_connection = True
            return
        if "fail" in turn:
            status = turn.get("fail")
            status = status if isinstance(status, int) and 400 <= status <= 599 else 500
            err = turn.get("body", {"error": {"message": f"scripted failure {status}", "type": "server_error"}})
            extra = {}
            if turn.get("retry_after") is not None:
                extra["Retry-After"] = str(turn["retry_after"])
            if isinstance(err, str):
                payload = err.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
            else:
                self._send_json(status, err, extra)
            return

        response_id = _new_id("resp")
        model = body.get("model") if isinstance(body, dict) else None
        self._start_sse()

        if isinstance(turn.get("events"), list):
            for ev in turn["events"]:
                if isinstance(ev, dict):
                    self._event(ev)
            return

        self._event(
            {
                "type": "response.created",
                "response": {"id": response_id, "object": "response", "status": "in_progress", "model": model},
            }
        )
        if "stall" in turn:
            try:
                seconds = float(turn.get("stall") or 0)
            except (TypeError, ValueError):
                seconds = 30.0
            time.sleep(max(0.0, seconds))
            return
        if turn.get("disconnect"):
            return

        for item in turn_output_items(turn, body):
            self._event({"type": "response.output_item.done", "item": item})
        usage = turn.get("usage") if isinstance(turn.get("usage"), dict) else DEFAULT_USAGE
        self._event(
            {
                "type": "response.completed",
                "response": {"id": response_id, "object": "response", "status": "completed", "model": model, "usage": usage},
            }
        )


def load_script(path: str | None) -> tuple[list[Any], list[dict[str, Any]]]:
    """(turns, by_prompt) from a JSON list of turns or {"turns": [...], "by_prompt": [...]}."""
    if not path:
        return [], []
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    by_prompt: list[dict[str, Any]] = []
    if isinstance(data, dict):
        raw = data.get("by_prompt") or []
        by_prompt = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
        data = data.get("turns", [])
    if not isinstance(data, list):
        raise SystemExit(f"fake_model: script {path} must be a JSON list of turns or {{\"turns\": [...]}}")
    return data, by_prompt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port (printed as 'PORT n')")
    ap.add_argument("--script", help="JSON file with the turns")
    ap.add_argument("--log", help="append every request here, one JSON object per line")
    ap.add_argument("--default-message", default="done", help="reply once the script is exhausted")
    ap.add_argument(
        "--per-thread",
        action="store_true",
        help="every Codex thread (one codex exec run) gets its own copy of the script",
    )
    ap.add_argument("--verbose", action="store_true", help="log each HTTP request line on stderr")
    args = ap.parse_args(argv)

    turns, by_prompt = load_script(args.script)
    Handler.script = Script(turns, args.default_message, per_thread=args.per_thread, by_prompt=by_prompt)
    Handler.log = RequestLog(args.log)
    Handler.quiet = not args.verbose

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)

    def stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
