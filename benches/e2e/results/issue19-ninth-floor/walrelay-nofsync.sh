#!/bin/bash
# walrelay with its data directory moved to tmpfs, where fdatasync costs nothing:
# the relay's CPU per request without the disk's share (a floor, not a configuration).
# Run as: walrelay-bench ... --baseline-bin walrelay-nofsync.sh (WALRELAY_REAL: the relay binary).
args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--data-dir" ]; then
    d=/dev/shm/wr/$(echo "$2" | md5sum | cut -c1-12); mkdir -p "$d"
    args+=("$1" "$d"); shift 2
  else args+=("$1"); shift; fi
done
exec "${WALRELAY_REAL:-target/release/walrelay}" "${args[@]}"
