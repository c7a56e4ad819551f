#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the pinned servers the integration tests
# run against (cached outside the clone, so only the first run builds them), then runs every
# test. Unit tests need no server; integration tests start their own on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(bash .ci/install-servers)"
export FICUS_SECANTUSD FICUS_TANSU

cargo fmt --all -- --check
cargo test --locked --all-targets
