#!/usr/bin/env bash
# The commit's fdatasync under a fixed load, for two or more relay builds
# side by side: each build gets a fresh data directory under ROOT (the
# volume under test), 4 senders of 500 series for 10 s from walrelay-load,
# and then the mean of walrelay_wal_fsync_duration_seconds is printed.
#
#   benches/e2e/fsync-ab.sh ROOT LOAD_BIN RELAY_BIN...
#
# e.g. ROOT=/mnt/j, an ext4 with a journal on a loop device
# (`losetup --direct-io=on`), LOAD_BIN=target/release/walrelay-load.
set -euo pipefail
root=$1 load=$2
shift 2
for bin in "$@"; do
  d=$(mktemp -d -p "$root")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$bin" serve --data-dir "$d/data" --listen "127.0.0.1:$port" >"$d/log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/-/ready" >/dev/null && break; sleep 0.1; done
  "$load" --url "http://127.0.0.1:$port/api/v1/write" --workers 4 --series-per-worker 500 \
    --duration 10s >"$d/load" 2>&1
  m=$(curl -s "http://127.0.0.1:$port/metrics")
  sum=$(awk '/^walrelay_wal_fsync_duration_seconds_sum/ {print $2}' <<<"$m")
  count=$(awk '/^walrelay_wal_fsync_duration_seconds_count/ {print $2}' <<<"$m")
  echo "$bin: $count fsyncs, mean $(python3 -c "print(round($sum / max($count, 1) * 1000, 3))") ms"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -rf "$d"
done
