#!/usr/bin/env bash
# Run every check and test: formatting, lints, unit and property tests, the deterministic
# simulation, the multi-process tests that start real nodes on loopback, and a short run of
# the benchmark (to prove it works; its figures are not meaningful in a debug build).
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "==> Codex CLI (pinned, for the end-to-end tests)"
if [ -z "${CODEX_BIN:-}" ]; then
  CODEX_BIN=$(scripts/install-codex.sh)
fi
export CODEX_BIN
echo "codex: $CODEX_BIN"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
# Multi-process tests start several nodes each; two at a time keeps a 2-core machine responsive.
set +e
cargo test --locked --all-targets -- --test-threads "${TEST_THREADS:-2}" 2>&1 | tee "$log"
tests_status=${PIPESTATUS[0]}
set -e
totals=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed; [0-9]* failed' "$log" \
  | awk '{p += $4; f += $6} END {printf "%d passed, %d failed", p, f}')
if [ "$tests_status" -ne 0 ]; then
  echo "tests: $totals"
  exit "$tests_status"
fi
echo "==> benchmark smoke run (debug build, 3 nodes, few samples)"
cargo build --locked --bin codex-mesh --example mesh_bench
"${CARGO_TARGET_DIR:-target}/debug/examples/mesh_bench" --nodes 3 --samples 5
echo "==> chaos smoke run (debug build, 3 nodes, 20 jobs, 3 faults)"
cargo build --locked --bin codex-mesh --example chaos
"${CARGO_TARGET_DIR:-target}/debug/examples/chaos" --nodes 3 --jobs 20 --faults 3 --seed 1 --duration 20
echo "==> examples/local_mesh.sh"
examples/local_mesh.sh
echo "tests: $totals"
