#!/usr/bin/env bash
# The end-to-end benchmark of issue #6 in one command (see benches/README.md):
# installs what is missing (Debian: victoria-metrics for vmagent, prometheus,
# nginx-light; matplotlib for the plots), builds walrelay and the benchmark
# in release mode, runs walrelay, vmagent and Prometheus agent one after the
# other on the same load, and draws the PNGs.
#
#   benches/e2e/run.sh                      # the documented run (~6 minutes)
#   benches/e2e/run.sh --duration 10s ...   # any walrelay-bench flag
#
# Results: $OUT (default benches/e2e/results): results.json, results.md,
# throughput.png, latency.png, resources.png (and far.png with --far-delay:
# the far replica phase of issue 18). Run it as root (nginx and the
# packages); the data directories go under --data-root (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benches/e2e/results}
TARGET=${CARGO_TARGET_DIR:-target}

SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
missing=()
have vmagent || missing+=(victoria-metrics)
have prometheus || missing+=(prometheus)
have nginx || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
if ! python3 -c 'import matplotlib' 2>/dev/null; then
  echo "== installing matplotlib"
  python3 -m pip install -q matplotlib 2>/dev/null \
    || python3 -m pip install -q --break-system-packages matplotlib 2>/dev/null \
    || { $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3-matplotlib; }
fi

echo "== building (release)"
cargo build --release --bin walrelay --bin walrelay-bench -p walrelay -p walrelay-bench

mkdir -p "$OUT"
"$TARGET/release/walrelay-bench" --walrelay-bin "$TARGET/release/walrelay" --out "$OUT" "$@"
python3 benches/e2e/plot.py "$OUT/results.json" "$OUT"
echo "== results in $OUT: results.md, results.json, throughput.png, latency.png, resources.png (far.png with --far-delay)"
