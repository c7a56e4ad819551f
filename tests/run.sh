#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the pinned servers the integration tests
# run against (cached outside the clone, so only the first run builds them), then checks
# formatting and lints and runs every test. Unit tests need no server; integration tests start
# their own on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash .ci/install-servers)"
export FICUS_SECANTUSD FICUS_TANSU FICUS_NODE FICUS_REDIS_SERVER

# CI clones afresh each run; keep its build cache beside the server cache.
if [ "${CI:-}" = true ] && [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${FICUS_SERVERS_DIR:-$HOME/.cache/ficus/servers}/../target"
fi

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The JavaScript router's own tests first (seconds), then every Rust test of the workspace
# (ficus and the Rust router).
"$FICUS_NODE" --test clients/router-js/test/*.test.mjs
cargo test --locked --workspace --all-targets --no-fail-fast
