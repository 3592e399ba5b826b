#!/usr/bin/env bash
# Install the pinned OpenAI Codex CLI (npm package @openai/codex) for the tests, idempotently.
#
#   scripts/install-codex.sh            # installs if needed; prints the codex binary path
#   CODEX_BIN=$(scripts/install-codex.sh)
#
# stdout: exactly one line, the absolute path of the native codex binary (run it directly: see
# below). Everything else goes to stderr, including the bin directory to add to PATH.
#
# Environment:
#   CODEX_VERSION      version to pin (default 0.169.0)
#   CODEX_BIN          if it already runs the pinned version, nothing is installed and it is printed
#   CODEX_NPM_PREFIX   where to install (default $HOME/.cache/codex-mesh/npm)
#
# Why a private prefix rather than `npm install -g` into /usr: it needs no write access to the
# system prefix, never replaces a codex the user installed, survives between CI runs on the same
# machine (a cache hit costs one `--version` call), and two versions can sit side by side.
#
# Why print the native binary rather than the npm `bin/codex` shim: the shim is a Node script
# that, on Node < 22.15 (this machine has Node 20), starts the native binary as a *child* process.
# Killing the shim (e.g. a job timeout sending SIGKILL) then leaves the real codex running. The
# native binary is self-contained (static musl) and finds its bundled bwrap and rg next to itself.
set -euo pipefail

CODEX_VERSION="${CODEX_VERSION:-0.169.0}"
PREFIX="${CODEX_NPM_PREFIX:-${HOME:-/root}/.cache/codex-mesh/npm}"

log() { printf 'install-codex: %s\n' "$*" >&2; }

# `codex --version` prints "codex-cli 0.169.0".
version_of() {
  local out
  out=$(timeout 30 "$1" --version </dev/null 2>/dev/null) || return 1
  printf '%s\n' "$out" | awk 'NR==1 {print $NF}'
}

is_pinned() { [ -n "${1:-}" ] && [ -x "$1" ] && [ "$(version_of "$1" || true)" = "$CODEX_VERSION" ]; }

# The native binary that an npm-installed `codex` shim (bin/codex -> .../bin/codex.js) runs.
native_from_shim() {
  local shim=$1 real pkg candidate
  real=$(readlink -f "$shim" 2>/dev/null) || return 1
  case "$real" in
    */@openai/codex/bin/codex.js) ;;
    *) return 1 ;;
  esac
  pkg=${real%/bin/codex.js}
  for candidate in "$pkg"/node_modules/@openai/codex-*/vendor/*/bin/codex "$pkg"/vendor/*/bin/codex; do
    if is_pinned "$candidate"; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

# Prefer the native binary behind a shim; fall back to what we were given.
resolve() {
  native_from_shim "$1" || readlink -f "$1"
}

done_with() {
  local bin
  bin=$(resolve "$1")
  log "codex $CODEX_VERSION: $bin"
  if [ -d "$PREFIX/bin" ]; then
    log "npm bin dir (for PATH): $PREFIX/bin"
  fi
  printf '%s\n' "$bin"
  exit 0
}

# 1. Already there?
if [ -n "${CODEX_BIN:-}" ] && [[ $CODEX_BIN != */* ]]; then
  CODEX_BIN=$(command -v "$CODEX_BIN" 2>/dev/null || printf '%s' "$CODEX_BIN") # a bare command name
fi
if [ -n "${CODEX_BIN:-}" ]; then
  if is_pinned "$CODEX_BIN"; then
    done_with "$CODEX_BIN"
  fi
  log "CODEX_BIN=$CODEX_BIN is not codex $CODEX_VERSION ($(version_of "$CODEX_BIN" || echo 'does not run')); ignoring it"
fi
if is_pinned "$PREFIX/bin/codex"; then
  done_with "$PREFIX/bin/codex"
fi
if command -v codex >/dev/null 2>&1 && is_pinned "$(command -v codex)"; then
  done_with "$(command -v codex)"
fi

# 2. Install.
if ! command -v npm >/dev/null 2>&1; then
  log "npm is required (Node.js 18 or newer with npm)"
  exit 1
fi
mkdir -p "$PREFIX"

install() {
  # --include=optional: the native binary comes in as an optional dependency (an npm alias of
  # @openai/codex@<version>-linux-x64 etc.), which an `omit=optional` npm config would drop.
  # --ignore-scripts: the packages have no install scripts; make sure none ever run.
  timeout 900 npm install --global --prefix "$PREFIX" \
    --include=optional --ignore-scripts --no-audit --no-fund --no-update-notifier \
    --loglevel=error "@openai/codex@$CODEX_VERSION" >&2
}

(
  # Serialise concurrent installers on the same prefix.
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$PREFIX/.install.lock"
    flock -w 900 9 || { log "timed out waiting for another install"; exit 1; }
  fi
  if is_pinned "$PREFIX/bin/codex"; then
    exit 0 # another installer finished while we waited
  fi
  log "installing @openai/codex@$CODEX_VERSION into $PREFIX (about 400 MB unpacked)"
  for attempt in 1 2 3; do
    if install; then
      exit 0
    fi
    log "npm install failed (attempt $attempt of 3)"
    sleep $((attempt * 5))
  done
  exit 1
) || {
  log "could not install @openai/codex@$CODEX_VERSION; see 'npm view @openai/codex versions'"
  exit 1
}

if ! is_pinned "$PREFIX/bin/codex"; then
  log "installed, but $PREFIX/bin/codex does not report $CODEX_VERSION: $(version_of "$PREFIX/bin/codex" || echo 'it does not run')"
  exit 1
fi
done_with "$PREFIX/bin/codex"
