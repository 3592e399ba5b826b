#!/usr/bin/env bash
# Run every check and test: formatting, lints, unit and property tests, the deterministic
# simulation, and the multi-process tests that start real nodes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
# Multi-process tests start several nodes each; two at a time keeps a 2-core machine responsive.
cargo test --locked --all-targets -- --test-threads "${TEST_THREADS:-2}"
echo "==> benchmark smoke run (debug build, 3 nodes, few samples; figures not meaningful)"
"${CARGO_TARGET_DIR:-target}/debug/examples/mesh_bench" --nodes 3 --samples 5
