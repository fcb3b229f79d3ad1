#!/usr/bin/env bash
# The whole test suite (README's test command): installs the real programs the
# tests need, builds the binaries the process-level tests start, and runs every
# test of the workspace. Nothing is skipped: a missing program is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/local/install-deps.sh
# deploy/validate.py (run by tests/deploy.rs): yamllint and kubernetes-validate
# (which brings jsonschema); kubectl is on the image, promtool comes with the
# Debian prometheus package installed above.
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r deploy/requirements-validate.txt
command -v kubectl >/dev/null || { echo "kubectl is missing (needed for kubectl kustomize)" >&2; exit 1; }
# The chaos suite and the CLI tests start the real binary.
cargo build --locked --bins
# Tests start real processes; a few at a time is what 2 cores sustain.
# (An env var, not --test-threads: criterion's bench harness rejects it.)
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"
cargo test --locked --workspace --all-targets --no-fail-fast
