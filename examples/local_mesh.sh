#!/usr/bin/env bash
# Start a three-node mesh on this machine (loopback only), show it, and stop it again.
#
#   examples/local_mesh.sh            # start, show status and nodes, stop
#   KEEP=1 examples/local_mesh.sh     # leave the nodes running (stop them with Ctrl-C)
#
# Uses the release binary if it was built, else target/debug/codex-mesh, else builds it.
set -euo pipefail
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
bin=$target/release/codex-mesh
[ -x "$bin" ] || bin=$target/debug/codex-mesh
[ -x "$bin" ] || { cargo build --bin codex-mesh; bin=$target/debug/codex-mesh; }

root=$(mktemp -d)
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$root"
}
trap stop EXIT

# A node started by root refuses to run agents as root unless told it may (for this demo).
as_root=()
[ "$(id -u)" = 0 ] && as_root=(--allow-root-agents)

start() { # name, then `up` or `join <ticket>`
  local name=$1; shift
  "$bin" "$@" --data-dir "$root/$name" --name "$name" "${as_root[@]}" \
    --listen /ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0 >"$root/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$root/$name/api-url" ] && return; sleep 0.1; done
  echo "$name did not start; its log:" >&2; cat "$root/$name.log" >&2; exit 1
}

start n1 up
ticket=$("$bin" ticket --data-dir "$root/n1")
start n2 join "$ticket"
start n3 join "$ticket"

echo "waiting for three voters..."
for _ in $(seq 150); do
  voters=$("$bin" status --data-dir "$root/n2" --json | tr -d ' \n' \
    | grep -o '"voters":\[[^]]*\]' | grep -o '"12D3[^"]*"' | wc -l || true)
  [ "$voters" -ge 3 ] && break
  sleep 0.2
done
"$bin" status --data-dir "$root/n2"
echo
"$bin" nodes --data-dir "$root/n3"

if [ "${KEEP:-0}" = 1 ]; then
  echo
  echo "data and logs in $root; API of n1: $(cat "$root/n1/api-url"), token in $root/n1/api-token"
  echo "press Ctrl-C to stop"
  wait
fi
