#!/usr/bin/env bash
# The seed's pipeline on one machine, with real programs from Debian:
#
#   node exporter :9100 <-scrape- Prometheus (sender) :9090
#       -remote-write-> walrelay :9201 -> Prometheus agent "a" :9091 -\
#                                     \-> Prometheus agent "b" :9092 --> VictoriaMetrics :8428
#
# The two agents add the external label prometheus_replica="a"/"b", so a
# query per replica in VictoriaMetrics shows each replica's completeness.
#
# Usage: deploy/local/run.sh [--demo-outage] [--state-dir DIR] [--run-for SECONDS]
#   --demo-outage   once data flows, stop replica b for a minute (WALRELAY_LOCAL_OUTAGE_SECONDS),
#                   then show whether its gap was filled: exits 1 if not
#   --state-dir     where logs and data live (default ./.walrelay-local, kept
#                   between runs so a restart resumes)
#   --run-for       stop everything after SECONDS (default: run until stopped)
# Runs in the foreground; Ctrl-C or SIGTERM stops everything it started.
# Environment: WALRELAY_BIN (a built relay: skips the cargo build),
# WALRELAY_LOCAL_{NODE,SENDER,RELAY,A,B,VM}_PORT (other ports than the defaults).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${WALRELAY_LOCAL_STATE:-$PWD/.walrelay-local}"
demo_outage=0
run_for="${WALRELAY_LOCAL_RUN_FOR:-}"   # seconds; unset = until Ctrl-C (tests set it)
while [ $# -gt 0 ]; do
  case "$1" in
    --demo-outage) demo_outage=1 ;;
    --state-dir) state="$2"; shift ;;
    --run-for) run_for="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Ports: the programs' defaults, overridable for tests that run beside others.
p_node="${WALRELAY_LOCAL_NODE_PORT:-9100}"
p_sender="${WALRELAY_LOCAL_SENDER_PORT:-9090}"
p_relay="${WALRELAY_LOCAL_RELAY_PORT:-9201}"
p_a="${WALRELAY_LOCAL_A_PORT:-9091}"
p_b="${WALRELAY_LOCAL_B_PORT:-9092}"
p_vm="${WALRELAY_LOCAL_VM_PORT:-8428}"

bash "$here/install-deps.sh"

relay_bin="${WALRELAY_BIN:-}"
if [ -z "$relay_bin" ]; then
  echo "building walrelay (release)..." >&2
  (cd "$repo" && cargo build --release --bin walrelay --quiet)
  relay_bin="${CARGO_TARGET_DIR:-$repo/target}/release/walrelay"
fi

busy=()
for p in "$p_node" "$p_sender" "$p_relay" "$p_a" "$p_b" "$p_vm"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then busy+=("$p"); fi
done
if [ "${#busy[@]}" -gt 0 ]; then
  echo "port(s) already in use: ${busy[*]}" >&2
  echo "(Debian may have started its own prometheus, node exporter or victoria-metrics service: stop them with 'systemctl stop prometheus prometheus-node-exporter victoria-metrics' or 'service ... stop')" >&2
  exit 1
fi

mkdir -p "$state"/{logs,walrelay,sender,agent-a,agent-b,vm,config}
pids=()
sleeper=""
cleanup() {
  trap - INT TERM EXIT
  echo >&2
  echo "stopping..." >&2
  if [ -n "$sleeper" ]; then kill "$sleeper" 2>/dev/null || true; fi
  # In reverse order of starting: the sender first, the long-term store last,
  # so what is in flight can still land.
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -CONT "${pids[$i]}" 2>/dev/null || true   # --demo-outage stops replica b
    kill -TERM "${pids[$i]}" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; state kept in $state" >&2
}
# Exit after cleaning up (a trap alone would return into the script).
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap cleanup EXIT

# Sleeps in the background so that a signal is handled at once (bash runs
# traps only between foreground commands).
pause() {
  sleep "$1" &
  sleeper=$!
  wait "$sleeper" || true
  sleeper=""
}

start() { # name, command...
  local name="$1"; shift
  "$@" >"$state/logs/$name.log" 2>&1 &
  pids+=("$!")
  eval "pid_${name//-/_}=$!"
}

wait_ready() { # name url
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$2" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "$1 did not become ready ($2); its log:" >&2
  tail -20 "$state/logs/$1.log" >&2
  exit 1
}

cat >"$state/config/sender.yml" <<EOF
global:
  scrape_interval: 5s
scrape_configs:
  - job_name: node
    static_configs: [{targets: ["127.0.0.1:$p_node"]}]
  - job_name: prometheus
    static_configs: [{targets: ["127.0.0.1:$p_sender"]}]
  - job_name: walrelay
    static_configs: [{targets: ["127.0.0.1:$p_relay"]}]
remote_write:
  - url: http://127.0.0.1:$p_relay/api/v1/write
EOF
for r in a b; do
  cat >"$state/config/agent-$r.yml" <<EOF
global:
  external_labels:
    prometheus_replica: "$r"
remote_write:
  - url: http://127.0.0.1:$p_vm/api/v1/write
EOF
done

# -search.latencyOffset=5s: queries see samples 5 s after they land (the
# default 30 s makes the demo look stale).
start vm victoria-metrics -httpListenAddr="127.0.0.1:$p_vm" -storageDataPath="$state/vm" -retentionPeriod=30d \
  -search.latencyOffset=5s
wait_ready vm "http://127.0.0.1:$p_vm/health"
start agent-a prometheus --enable-feature=agent --web.enable-remote-write-receiver \
  --config.file="$state/config/agent-a.yml" --storage.agent.path="$state/agent-a" \
  --web.listen-address="127.0.0.1:$p_a"
start agent-b prometheus --enable-feature=agent --web.enable-remote-write-receiver \
  --config.file="$state/config/agent-b.yml" --storage.agent.path="$state/agent-b" \
  --web.listen-address="127.0.0.1:$p_b"
wait_ready agent-a "http://127.0.0.1:$p_a/-/ready"
wait_ready agent-b "http://127.0.0.1:$p_b/-/ready"
# Two malloc arenas, as the image runs it (docs/operations.md, Sizing memory).
start walrelay env MALLOC_ARENA_MAX=2 "$relay_bin" serve --listen "127.0.0.1:$p_relay" --data-dir "$state/walrelay" \
  --replica "a=http://127.0.0.1:$p_a/api/v1/write" --replica "b=http://127.0.0.1:$p_b/api/v1/write" \
  --new-replica-start oldest
wait_ready walrelay "http://127.0.0.1:$p_relay/-/ready"
start node prometheus-node-exporter --web.listen-address="127.0.0.1:$p_node"
start sender prometheus --config.file="$state/config/sender.yml" --storage.tsdb.path="$state/sender" \
  --web.listen-address="127.0.0.1:$p_sender"
wait_ready node "http://127.0.0.1:$p_node/metrics"
wait_ready sender "http://127.0.0.1:$p_sender/-/ready"

vmq() { # promql [unix time] -> the single value of an instant query, or nothing
  local args=(--data-urlencode "query=$1")
  if [ -n "${2:-}" ]; then args+=(--data-urlencode "time=$2"); fi
  curl -fsS "http://127.0.0.1:$p_vm/api/v1/query" "${args[@]}" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if len(r)==1 else "")' 2>/dev/null ||
    true
}

# Samples of the node exporter's node_time_seconds that reached
# VictoriaMetrics through replica $1 in the 10 minutes before time $2.
samples_via() { # replica unix-time
  vmq "sum(count_over_time(node_time_seconds{prometheus_replica=\"$1\"}[10m]))" "$2"
}

cat <<EOF

walrelay local pipeline is running (state: $state, logs: $state/logs/)
  node exporter        http://127.0.0.1:$p_node/metrics
  sender Prometheus    http://127.0.0.1:$p_sender   (scrapes node exporter, itself, walrelay; remote-writes to walrelay)
  walrelay             http://127.0.0.1:$p_relay    (data: $state/walrelay)
  replica a (agent)    http://127.0.0.1:$p_a
  replica b (agent)    http://127.0.0.1:$p_b
  VictoriaMetrics      http://127.0.0.1:$p_vm       (long-term store for both replicas)

Things to try:
  curl -s http://127.0.0.1:$p_relay/api/v1/status | python3 -m json.tool
  $relay_bin wal inspect --data-dir $state/walrelay
  curl -s http://127.0.0.1:$p_vm/api/v1/query --data-urlencode 'query=count by (prometheus_replica) (up)'

Ctrl-C stops everything.
EOF

if [ "$demo_outage" -eq 1 ]; then
  outage="${WALRELAY_LOCAL_OUTAGE_SECONDS:-60}"
  # Waits (at most 120 s) until replicas a and b count the same, non-zero
  # number of samples at time $1; leaves the counts in $count_a and $count_b
  # (empty when VictoriaMetrics returned none).
  equal_counts() { # unix-time
    count_a=""; count_b=""
    for _ in $(seq 1 120); do
      count_a="$(samples_via a "$1")"; count_b="$(samples_via b "$1")"
      if [ -n "$count_a" ] && [ "$count_a" != 0 ] && [ "$count_a" = "$count_b" ]; then return 0; fi
      pause 1
    done
    if [ -z "$count_a" ] || [ -z "$count_b" ]; then
      echo "demo: FAILED: VictoriaMetrics returned no count of node_time_seconds (a='$count_a' b='$count_b'); see $state/logs/" >&2
      exit 1
    fi
  }
  echo "demo: waiting for node_time_seconds to reach VictoriaMetrics through both replicas..."
  for _ in $(seq 1 120); do
    if [ -n "$(samples_via a "")" ] && [ -n "$(samples_via b "")" ]; then break; fi
    pause 1
  done
  t0="$(date +%s)"
  equal_counts "$t0"
  echo "demo: before the outage: a=$count_a b=$count_b samples of node_time_seconds in the 10 minutes before $(date -d "@$t0" +%T)"
  echo "demo: stopping replica b for $outage s"
  kill -STOP "$pid_agent_b"
  pause "$outage"
  echo "demo: during the outage: relay status:"
  curl -fsS "http://127.0.0.1:$p_relay/api/v1/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); [print("  ", r["name"], "lag_records=%s lag_seconds=%s state=%s" % (r["lag_records"], r["lag_seconds"], r["state"])) for r in s["replicas"]]'
  echo "demo: resuming replica b"
  kill -CONT "$pid_agent_b"
  # Counted up to the moment b came back: its whole gap is in the window.
  t1="$(date +%s)"
  equal_counts "$t1"
  if [ "$count_a" = "$count_b" ]; then
    echo "demo: after the outage: a=$count_a b=$count_b samples in the 10 minutes before $(date -d "@$t1" +%T): equal, b's gap was filled"
  else
    echo "demo: after the outage: a=$count_a b=$count_b samples in the 10 minutes before $(date -d "@$t1" +%T): NOT equal, b's gap was not filled within 120 s" >&2
    exit 1
  fi
fi

if [ -n "$run_for" ]; then
  pause "$run_for"
  exit 0
fi
while true; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "a process exited (pid $pid); see $state/logs/" >&2
      exit 1
    fi
  done
  pause 2
done
