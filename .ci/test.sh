#!/usr/bin/env bash
# The whole test suite (README's test command): installs the real programs the
# tests need, builds the binaries the process-level tests start, and runs every
# test of the workspace. Nothing is skipped: a missing program is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local/install-deps.sh
# The chaos suite and the CLI tests start the real binary.
cargo build --locked --bins
cargo test --locked --workspace --all-targets -- --test-threads="${WALRELAY_TEST_THREADS:-4}"
