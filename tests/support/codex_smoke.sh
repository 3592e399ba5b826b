#!/usr/bin/env bash
# Smoke test of the real Codex CLI against the scripted fake model (tests/support/fake_model.py).
#
#   tests/support/codex_smoke.sh                  # installs codex if needed, runs both modes
#   CODEX_BIN=/path/to/codex tests/support/codex_smoke.sh
#
# For each mode the fake model answers the first request with a shell-tool call that creates
# hello.txt and the second with a final message; the script checks that the file exists, that
# the -o last-message file holds the final text, that codex's JSONL stdout has a successful
# command_execution and a turn.completed with usage, and that codex sent the tool output back.
#
# Modes (SMOKE_MODES, default "function code"):
#   function  -m mock-model: an unknown model name, for which codex offers plain function tools
#             (exec_command); this is the mode to script tests against
#   code      codex's default model (its name is sent to the fake model as is), for which codex
#             offers only the code-mode `exec` JavaScript tool that calls tools.exec_command
#
# Other settings: SMOKE_SANDBOX (default workspace-write), SMOKE_TIMEOUT (seconds per codex
# run, default 60), KEEP=1 keeps the temporary directory. Every step is time-bounded.
# Exit status 0 when every mode passed; the last line is "codex smoke: N passed, N failed".
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
modes=${SMOKE_MODES:-function code}
sandbox=${SMOKE_SANDBOX:-workspace-write}
run_timeout=${SMOKE_TIMEOUT:-60}
final_text="SMOKE-FINAL: hello.txt is written"

die() {
  echo "codex smoke: FAIL: $*" >&2
  exit 1
}

for tool in python3 timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# 1. The codex binary.
if [ -z "${CODEX_BIN:-}" ] || ! timeout 30 "$CODEX_BIN" --version >/dev/null 2>&1; then
  CODEX_BIN=$(timeout 1200 "$root/scripts/install-codex.sh") || die "could not install codex (scripts/install-codex.sh)"
fi
echo "codex smoke: using $CODEX_BIN ($(timeout 30 "$CODEX_BIN" --version 2>/dev/null))"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/codex-smoke.XXXXXX")
fake_pid=
cleanup() {
  local status=$?
  if [ -n "$fake_pid" ]; then
    kill "$fake_pid" 2>/dev/null || true
    wait "$fake_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] || [ "${KEEP:-0}" = 1 ]; then
    echo "codex smoke: files kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT

# Requests to the fake model must not go through a proxy from the environment, and nothing of
# the real OpenAI configuration may leak in.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy OPENAI_BASE_URL
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# Start the fake model; sets $port and $fake_pid.
start_fake_model() {
  local dir=$1
  python3 "$here/fake_model.py" --port 0 --script "$dir/script.json" --log "$dir/requests.jsonl" \
    >"$dir/fake_model.out" 2>"$dir/fake_model.err" &
  fake_pid=$!
  port=
  local deadline=$((SECONDS + 10))
  while [ $SECONDS -lt $deadline ]; do
    port=$(awk '/^PORT /{print $2; exit}' "$dir/fake_model.out" 2>/dev/null || true)
    [ -n "$port" ] && return 0
    kill -0 "$fake_pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$dir/fake_model.err" >&2 || true
  die "fake model did not start"
}

stop_fake_model() {
  if [ -n "$fake_pid" ]; then
    kill "$fake_pid" 2>/dev/null || true
    wait "$fake_pid" 2>/dev/null || true
    fake_pid=
  fi
}

passed=0
failed=0

run_mode() {
  local mode=$1 dir="$tmp/$1"
  mkdir -p "$dir/work" "$dir/codex-home"
  cat >"$dir/script.json" <<EOF
[
  {"exec": "printf 'hello from codex\\\\n' > hello.txt"},
  {"message": "$final_text"}
]
EOF
  start_fake_model "$dir"

  local model_args=()
  if [ "$mode" = function ]; then
    model_args=(-m mock-model)
  fi

  local start end status=0
  start=$(date +%s%N)
  # stdin must be closed (</dev/null): codex exec reads stdin to EOF even when a prompt is given.
  CODEX_HOME="$dir/codex-home" timeout -k 5 "$run_timeout" "$CODEX_BIN" exec \
    --json --skip-git-repo-check -C "$dir/work" -s "$sandbox" -o "$dir/last-message.txt" \
    "${model_args[@]}" \
    -c model_provider=mock \
    -c "model_providers.mock={name=\"mock\",base_url=\"http://127.0.0.1:$port/v1\",wire_api=\"responses\",request_max_retries=0,stream_max_retries=0,stream_idle_timeout_ms=20000}" \
    -c features.plugins=false -c analytics.enabled=false \
    "Create hello.txt containing a greeting." \
    </dev/null >"$dir/stdout.jsonl" 2>"$dir/stderr.txt" || status=$?
  end=$(date +%s%N)
  stop_fake_model
  local ms=$(((end - start) / 1000000))

  local problems=()
  # (Command substitutions below end in `|| true`: a failing one would trip `set -e`.)
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    problems+=("codex did not finish within ${run_timeout}s (status $status)")
  elif [ "$status" -ne 0 ]; then
    problems+=("codex exited with status $status")
  fi
  if [ ! -f "$dir/work/hello.txt" ]; then
    problems+=("work/hello.txt was not created")
  elif [ "$(cat "$dir/work/hello.txt")" != "hello from codex" ]; then
    problems+=("work/hello.txt holds '$(head -c 200 "$dir/work/hello.txt" || true)'")
  fi
  if ! grep -qF "$final_text" "$dir/last-message.txt" 2>/dev/null; then
    problems+=("the last-message file does not hold the final text (it holds: '$(head -c 200 "$dir/last-message.txt" 2>/dev/null || true)')")
  fi
  local check
  if ! check=$(timeout 30 python3 - "$dir/stdout.jsonl" "$dir/requests.jsonl" <<'PY'
import json, sys

problems = []
events = []
for n, line in enumerate(open(sys.argv[1], encoding="utf-8"), 1):
    line = line.strip()
    if not line:
        continue
    try:
        events.append(json.loads(line))
    except ValueError:
        problems.append(f"stdout line {n} is not JSON: {line[:200]}")
types = [e.get("type") for e in events]
if not any(e.get("type") == "thread.started" and e.get("thread_id") for e in events):
    problems.append("no thread.started with a thread_id")
cmds = [
    e["item"] for e in events
    if e.get("type") == "item.completed" and isinstance(e.get("item"), dict)
    and e["item"].get("type") == "command_execution"
]
if not any(c.get("exit_code") == 0 and c.get("status") == "completed" and "hello.txt" in str(c.get("command")) for c in cmds):
    problems.append(f"no completed command_execution with exit_code 0 (saw {cmds})")
done = [e for e in events if e.get("type") == "turn.completed"]
usage = done[-1].get("usage") if done else None
if not done:
    problems.append("no turn.completed")
elif not (isinstance(usage, dict) and isinstance(usage.get("input_tokens"), int) and isinstance(usage.get("output_tokens"), int)):
    problems.append(f"turn.completed has no usage with input_tokens/output_tokens: {done[-1]}")
for e in events:
    if e.get("type") == "turn.failed":
        problems.append(f"turn.failed: {e.get('error')}")
if not any(e.get("type") == "item.completed" and (e.get("item") or {}).get("type") == "agent_message" for e in events):
    problems.append("no agent_message item")

# What codex sent: the second request must carry the output of the first request's tool call.
requests = [json.loads(l) for l in open(sys.argv[2], encoding="utf-8") if l.strip()]
posts = [r for r in requests if r.get("method") == "POST" and r.get("path", "").rstrip("/").endswith("/responses")]
if len(posts) != 2:
    problems.append(f"expected 2 POST /v1/responses, saw {len(posts)}")
else:
    first, second = posts[0]["body"], posts[1]["body"]
    if not (isinstance(first, dict) and first.get("stream") is True):
        problems.append("the first request is not a streaming Responses request")
    items = second.get("input") if isinstance(second, dict) else None
    items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
    outputs = [i for i in items if i.get("type") in ("function_call_output", "custom_tool_call_output")]
    calls = [i for i in items if i.get("type") in ("function_call", "custom_tool_call")]
    if not outputs:
        problems.append("the second request carries no function_call_output / custom_tool_call_output")
    elif not calls or outputs[-1].get("call_id") != calls[-1].get("call_id"):
        problems.append("the tool output's call_id does not match the tool call's")

summary = f"{len(events)} events ({', '.join(sorted(set(map(str, types))))}); usage {usage}"
print("\n".join(problems) if problems else summary)
sys.exit(1 if problems else 0)
PY
  ); then
    while IFS= read -r line; do problems+=("$line"); done <<<"$check"
  fi

  if [ ${#problems[@]} -eq 0 ]; then
    echo "codex smoke: PASS $mode (${ms} ms): $check"
    passed=$((passed + 1))
  else
    echo "codex smoke: FAIL $mode (${ms} ms):" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    echo "  --- codex stdout (JSONL):" >&2
    head -c 4000 "$dir/stdout.jsonl" >&2 || true
    echo "  --- codex stderr:" >&2
    head -c 4000 "$dir/stderr.txt" >&2 || true
    echo "  --- fake model stderr:" >&2
    head -c 2000 "$dir/fake_model.err" >&2 || true
    failed=$((failed + 1))
  fi
}

for mode in $modes; do
  case "$mode" in
    function | code) run_mode "$mode" ;;
    *) die "unknown mode '$mode' (use: function code)" ;;
  esac
done

echo "codex smoke: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
