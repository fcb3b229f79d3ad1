#!/usr/bin/env bash
# Runs the walrelay operator CLI on the volume of a stopped relay pod, in a
# one-off pod that mounts the pod's PersistentVolumeClaim (data-walrelay-N)
# with the relay's own image and security settings. For commands that change
# the data dir (wal repair, cursors set/reset), which refuse while a relay
# holds it.
#
#   deploy/kubernetes/maintenance/walrelay-cli.sh [-n NAMESPACE] [-o ORDINAL] -- wal repair --dry-run
#   deploy/kubernetes/maintenance/walrelay-cli.sh -n walrelay-seed -- cursors set --replica prometheus-agent-1 --time 2h
#   deploy/kubernetes/maintenance/walrelay-cli.sh --print -- wal inspect    # print the Pod, create nothing
#
# `--data-dir /data` is added to the command. Read-only commands (wal inspect,
# verify, dump, replay) also work on a running relay:
#   kubectl exec -n NAMESPACE walrelay-0 -- walrelay wal inspect --data-dir /data
# Stop the relay pod first with `kubectl scale statefulset walrelay --replicas=ORDINAL`
# (this stops pods ORDINAL and above), and scale back afterwards.
set -euo pipefail

namespace=""
ordinal=0
print=0
image="${WALRELAY_IMAGE:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) namespace="$2"; shift 2 ;;
    -o|--ordinal) ordinal="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --print) print=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "give the walrelay command after --, e.g. -- wal inspect" >&2; exit 2; }

ns_args=()
[ -n "$namespace" ] && ns_args=(-n "$namespace")
if [ -z "$image" ]; then
  if [ "$print" -eq 1 ]; then
    image="walrelay:print"
  else
    image="$(kubectl "${ns_args[@]}" get statefulset walrelay -o jsonpath='{.spec.template.spec.containers[0].image}')"
  fi
fi
name="walrelay-cli-$ordinal"
claim="data-walrelay-$ordinal"

json_str() { # a JSON string literal
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  printf '"%s"' "$s"
}
args_yaml=""
for a in "$@" --data-dir /data; do
  args_yaml+="        - $(json_str "$a")"$'\n'
done

manifest="apiVersion: v1
kind: Pod
metadata:
  name: $name
  labels:
    app.kubernetes.io/name: walrelay
    app.kubernetes.io/component: maintenance
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: walrelay
      image: $image
      args:
$args_yaml      resources:
        requests:
          cpu: 100m
          memory: 128Mi
        limits:
          memory: 1Gi
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop:
            - ALL
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: $claim
"
if [ "$print" -eq 1 ]; then
  printf '%s' "$manifest"
  exit 0
fi

if kubectl "${ns_args[@]}" get pod "walrelay-$ordinal" >/dev/null 2>&1; then
  echo "walrelay-$ordinal is running and holds $claim: stop it first with" >&2
  echo "  kubectl ${ns_args[*]} scale statefulset walrelay --replicas=$ordinal" >&2
  exit 1
fi
trap 'kubectl "${ns_args[@]}" delete pod "$name" --ignore-not-found --wait=false >/dev/null' EXIT
printf '%s' "$manifest" | kubectl "${ns_args[@]}" create -f - >/dev/null
until phase="$(kubectl "${ns_args[@]}" get pod "$name" -o jsonpath='{.status.phase}')" &&
  [ "$phase" = Succeeded ] || [ "$phase" = Failed ] || [ "$phase" = Running ]; do
  sleep 1
done
kubectl "${ns_args[@]}" logs -f "$name"
until phase="$(kubectl "${ns_args[@]}" get pod "$name" -o jsonpath='{.status.phase}')" &&
  { [ "$phase" = Succeeded ] || [ "$phase" = Failed ]; }; do
  sleep 1
done
code="$(kubectl "${ns_args[@]}" get pod "$name" -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')"
exit "${code:-1}"
