#!/usr/bin/env bash
# Installs the real programs walrelay's tests and local pipeline run against,
# from Debian's packages: Prometheus 2.42 (server, agent, promtool), the node
# exporter, VictoriaMetrics and vmagent, nginx (a null sink for benchmarks),
# and fuse3 (fusermount3, for the power-loss filesystem of the chaos suite).
# Idempotent: installs only what is missing. As non-root it prints the command.
set -euo pipefail

packages=(prometheus prometheus-node-exporter victoria-metrics nginx-light fuse3 time)
commands=(prometheus prometheus-node-exporter victoria-metrics nginx fusermount3 /usr/bin/time)

missing=()
for i in "${!packages[@]}"; do
  if ! command -v "${commands[$i]}" >/dev/null 2>&1; then
    missing+=("${packages[$i]}")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "walrelay needs these Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the packaged services; the tests start their own instances
# on free ports, so stop the system ones to keep ports and CPU free.
for svc in prometheus prometheus-node-exporter victoria-metrics nginx; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
