#!/usr/bin/env python3
"""Validates everything under deploy/, offline. Exit 1 on any failure.

    python3 deploy/validate.py

Needs `kubectl` (for `kubectl kustomize`), `promtool` (Debian's `prometheus`
package) and the Python packages in deploy/requirements-validate.txt
(`python3 -m pip install -r deploy/requirements-validate.txt`). A missing tool
is a failure, never a skip.

What it checks:
  * yamllint (deploy/.yamllint, strict) on every YAML file under deploy/;
  * `kubectl kustomize` builds the base and every overlay;
  * every built object of a built-in kind validates with kubernetes-validate
    against the pinned Kubernetes version (strict: unknown fields fail), and
    the prometheus-operator kinds against the JSON schemas in
    deploy/kubernetes/schemas/; any other kind fails;
  * the manifests' own rules: non-root, read-only root filesystem, no
    capabilities, resources, probes, no inlined Secret, images named
    through kustomize `images:`, the relay's grace period above its shutdown
    timeout, the relay's replicas match the agents' per-pod DNS names;
  * the PrometheusRule is the rules file (text for text, generated);
  * `promtool check config` on every Prometheus config (ConfigMap keys
    prometheus.yml), `promtool check rules` and `promtool test rules`;
  * walrelay.toml keys are documented settings; the collector's pipelines
    reference defined components;
  * the Grafana dashboard is well-formed; every alert's runbook_url points
    at a heading of docs/operations.md.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

DEPLOY = pathlib.Path(__file__).resolve().parent
REPO = DEPLOY.parent
K8S = DEPLOY / "kubernetes"
SCHEMAS = K8S / "schemas"
RULES = DEPLOY / "alerts" / "walrelay-rules.yml"
RULE_TESTS = DEPLOY / "alerts" / "tests"
DASHBOARD = DEPLOY / "grafana" / "walrelay.json"
OPERATIONS = REPO / "docs" / "operations.md"
CONFIGURATION = REPO / "docs" / "configuration.md"

# The Kubernetes version the built-in kinds are validated against: one whose
# schemas kubernetes-validate (pinned in requirements-validate.txt) ships, and
# the version of the kubectl on the CI image.
KUBERNETES_VERSION = "1.32.0"
OPERATOR_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_v1_prometheusrule.json",
}
POD_KINDS = {"StatefulSet", "Deployment", "DaemonSet", "Job"}

failures: list[str] = []
passed = 0


def ok(what: str) -> None:
    global passed
    passed += 1
    print(f"ok   {what}")


def fail(what: str, detail: str = "") -> None:
    failures.append(what)
    print(f"FAIL {what}")
    if detail:
        for line in detail.rstrip().splitlines():
            print(f"     {line}")


def check(cond: bool, what: str, detail: str = "") -> bool:
    if cond:
        ok(what)
    else:
        fail(what, detail)
    return cond


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def require_tools() -> None:
    missing = []
    for tool, hint in [
        ("kubectl", "kubectl (with kustomize; on the CI image)"),
        ("promtool", "apt-get install -y prometheus (deploy/local/install-deps.sh)"),
    ]:
        if shutil.which(tool) is None:
            missing.append(f"{tool}: install with {hint}")
    for module in ["yaml", "yamllint", "jsonschema", "kubernetes_validate"]:
        try:
            __import__(module)
        except ImportError:
            missing.append(
                f"python module {module}: python3 -m pip install -r deploy/requirements-validate.txt"
            )
    if tomllib is None:
        missing.append("Python 3.11 or newer (tomllib)")
    if missing:
        print("deploy/validate.py: missing tools (nothing was validated):", file=sys.stderr)
        for m in missing:
            print(f"  {m}", file=sys.stderr)
        sys.exit(1)


def yaml_files() -> list[pathlib.Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"} and p.is_file())


def check_yamllint() -> None:
    files = [str(p) for p in yaml_files()]
    r = run([sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint"), *files])
    check(r.returncode == 0, f"yamllint --strict on {len(files)} YAML files under deploy/", r.stdout + r.stderr)


def kustomizations() -> list[pathlib.Path]:
    dirs = [p.parent for p in K8S.rglob("kustomization.yaml")]
    return sorted(dirs)


def operator_validator(kind_key):
    import jsonschema

    schema = json.loads((SCHEMAS / OPERATOR_KINDS[kind_key]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def validate_objects(name: str, docs: list[dict]) -> None:
    import kubernetes_validate

    for doc in docs:
        api, kind = doc.get("apiVersion"), doc.get("kind")
        obj = f"{name}: {kind}/{doc.get('metadata', {}).get('name')}"
        if (api, kind) in OPERATOR_KINDS:
            errors = sorted(operator_validator((api, kind)).iter_errors(doc), key=lambda e: list(e.path))
            check(
                not errors,
                f"{obj} matches schemas/{OPERATOR_KINDS[(api, kind)]}",
                "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors),
            )
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            ok(f"{obj} is valid Kubernetes {KUBERNETES_VERSION} (strict)")
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{obj}: no schema for {api} {kind} (add one to {SCHEMAS.relative_to(REPO)})")
        except kubernetes_validate.ValidationError as e:
            fail(f"{obj} is not valid Kubernetes {KUBERNETES_VERSION}", f"{'/'.join(map(str, e.path))}: {e.message}")


def containers_of(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec.get("containers", []))


def check_pod_policies(name: str, doc: dict) -> None:
    obj = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
    spec = doc["spec"]["template"]["spec"]
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{obj} runs as non-root")
    check(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{obj} uses the RuntimeDefault seccomp profile",
    )
    for c in containers_of(spec):
        cobj = f"{obj} container {c['name']}"
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"{cobj} has a read-only root filesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cobj} cannot escalate privileges")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cobj} drops all capabilities")
        res = c.get("resources", {})
        check(
            all(k in res.get("requests", {}) for k in ("cpu", "memory"))
            and "memory" in res.get("limits", {}),
            f"{cobj} has cpu/memory requests and a memory limit",
        )
        image = c.get("image", "")
        check(
            "/" in image and ":" in image.rsplit("/", 1)[-1],
            f"{cobj} image {image!r} is set through kustomize images: (registry/name:tag)",
        )
        check(
            all(p in c for p in ("readinessProbe", "livenessProbe")),
            f"{cobj} has readiness and liveness probes",
        )
    for v in spec.get("volumes", []):
        if "secret" in v:
            check(
                bool(v["secret"].get("secretName")),
                f"{obj} volume {v['name']} references a Secret by name",
            )


def duration_seconds(s: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", s):
        total += float(num) * units[unit]
    return total


def documented_toml_keys() -> set[str]:
    text = CONFIGURATION.read_text() if CONFIGURATION.exists() else ""
    keys = set()
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            for cell in cells:
                for m in re.findall(r"`([a-z_]+)`", cell):
                    keys.add(m)
    return keys


def check_relay(name: str, docs: list[dict]) -> None:
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    sts = [d for d in by_kind.get("StatefulSet", []) if d["metadata"]["name"] == "walrelay"]
    if not check(len(sts) == 1, f"{name}: has the walrelay StatefulSet"):
        return
    sts = sts[0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    check(bool(spec.get("volumeClaimTemplates")), f"{name}: walrelay keeps its log on a volumeClaimTemplate")
    check(pod.get("securityContext", {}).get("fsGroup") is not None, f"{name}: walrelay sets fsGroup for the volume")
    check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/-/ready", f"{name}: readiness is /-/ready")
    check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/-/healthy", f"{name}: liveness is /-/healthy")
    sp = c.get("startupProbe", {})
    check(
        sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) >= 600,
        f"{name}: the startup probe tolerates at least 10 minutes of recovery",
    )
    check(
        any(d["spec"].get("clusterIP") == "None" and d["metadata"]["name"] == spec["serviceName"]
            for d in by_kind.get("Service", [])),
        f"{name}: the StatefulSet's serviceName is a headless Service",
    )
    check("Secret" not in by_kind, f"{name}: no Secret is inlined in the manifests")
    cms = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    cfg = [d for n, d in cms.items() if "walrelay.toml" in d.get("data", {})]
    if not check(len(cfg) == 1, f"{name}: one ConfigMap holds walrelay.toml"):
        return
    toml = tomllib.loads(cfg[0]["data"]["walrelay.toml"])
    documented = documented_toml_keys()
    unknown = sorted(k for k in toml if k not in documented)
    check(not unknown, f"{name}: walrelay.toml uses only documented keys", f"not in docs/configuration.md: {unknown}")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    stop = duration_seconds(toml.get("shutdown_timeout", "20s"))
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    check(
        grace >= stop + pre + 15,
        f"{name}: terminationGracePeriodSeconds ({grace}) > preStop ({pre}s) + shutdown_timeout ({stop:g}s) + 15s",
    )
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    for key in ("bearer_token_file",):
        if key in toml:
            check(
                any(toml[key].startswith(m.rstrip("/") + "/") for m in mounts),
                f"{name}: {key} {toml[key]} is on a mounted volume",
            )
    check(
        any(toml.get("data_dir", "./data") == m for m in mounts),
        f"{name}: data_dir is the mounted volume",
    )
    # The seed topology: one replica per agent pod, by its per-pod DNS name.
    agents = [d for d in by_kind.get("StatefulSet", []) if d["metadata"]["name"] == "prometheus-agent"]
    if agents:
        a = agents[0]
        svc = a["spec"]["serviceName"]
        want = {
            f"{a['metadata']['name']}-{i}": f"http://{a['metadata']['name']}-{i}.{svc}:9090/api/v1/write"
            for i in range(a["spec"]["replicas"])
        }
        have = {r["name"]: r["url"] for r in toml.get("replica", [])}
        check(have == want, f"{name}: walrelay's replicas are the agents' per-pod DNS names", f"have {have}\nwant {want}")
        args = a["spec"]["template"]["spec"]["containers"][0]["args"]
        for flag in ("--enable-feature=agent", "--web.enable-remote-write-receiver"):
            check(any(x.startswith(flag) for x in args), f"{name}: the agents run with {flag}")


def check_prometheus_configs(name: str, docs: list[dict]) -> None:
    import yaml

    for d in docs:
        if d["kind"] != "ConfigMap":
            continue
        for key, text in d.get("data", {}).items():
            if key == "prometheus.yml":
                with tempfile.TemporaryDirectory() as tmp:
                    path = pathlib.Path(tmp) / key
                    path.write_text(text)
                    r = run(["promtool", "check", "config", str(path)])
                    check(
                        r.returncode == 0,
                        f"{name}: promtool check config ConfigMap/{d['metadata']['name']}",
                        r.stdout + r.stderr,
                    )
                cfg = yaml.safe_load(text)
                labels = cfg.get("global", {}).get("external_labels", {})
                check(
                    "prometheus_replica" in labels,
                    f"{name}: ConfigMap/{d['metadata']['name']} sets the prometheus_replica external label",
                )
            if key == "collector.yaml" or re.fullmatch(r"collector-\d+\.yaml", key):
                cfg = yaml.safe_load(text)
                defined = {
                    section: set((cfg.get(section) or {}).keys())
                    for section in ("receivers", "processors", "exporters", "extensions")
                }
                svc = cfg.get("service", {})
                bad = [e for e in svc.get("extensions", []) if e not in defined["extensions"]]
                for pname, p in svc.get("pipelines", {}).items():
                    for section in ("receivers", "processors", "exporters"):
                        bad += [f"{pname}.{section}.{x}" for x in p.get(section, []) if x not in defined[section]]
                check(not bad, f"{name}: the collector's pipelines use only defined components", str(bad))
                exp = cfg.get("exporters", {}).get("prometheusremotewrite", {})
                check(
                    exp.get("remote_write_queue", {}).get("num_consumers") == 1,
                    f"{name}: the collector sends to walrelay with one consumer (in order)",
                )


def check_scale_out(name: str, docs: list[dict]) -> None:
    """With several relay pods, every sender is pinned to one pod: no Service
    spreads requests over the relays, and each collector sends to its own
    pod by its per-pod DNS name (docs/scaling.md)."""
    import yaml

    sts = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "walrelay"]
    if not sts or sts[0]["spec"].get("replicas", 1) <= 1:
        return
    sts = sts[0]
    selector = sts["spec"]["selector"]["matchLabels"]
    spreading = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "Service"
        and d["spec"].get("clusterIP") != "None"
        and d["spec"].get("selector")
        and all(selector.get(k) == v for k, v in d["spec"]["selector"].items())
    ]
    check(
        not spreading,
        f"{name}: no load-balancing Service in front of {sts['spec']['replicas']} relay pods",
        f"these would send a series to several relays: {spreading}",
    )
    svc = sts["spec"]["serviceName"]
    pods = {f"walrelay-{i}" for i in range(sts["spec"]["replicas"])}
    targets = []
    for d in docs:
        if d["kind"] != "ConfigMap":
            continue
        for key, text in d.get("data", {}).items():
            if key == "collector.yaml" or re.fullmatch(r"collector-\d+\.yaml", key):
                url = yaml.safe_load(text).get("exporters", {}).get("prometheusremotewrite", {}).get("endpoint", "")
                m = re.fullmatch(rf"https?://(walrelay-\d+)\.{re.escape(svc)}(\.[a-z0-9.-]+)?:\d+/api/v1/write", url)
                check(bool(m), f"{name}: {key} sends to one relay pod by its per-pod DNS name", url)
                if m:
                    targets.append(m.group(1))
    check(
        set(targets) == pods and len(targets) == len(pods),
        f"{name}: one collector per relay pod, each pinned to its own",
        f"collectors send to {sorted(targets)}, relay pods are {sorted(pods)}",
    )


def check_overlays() -> None:
    import yaml

    for kdir in kustomizations():
        name = str(kdir.relative_to(K8S))
        r = run(["kubectl", "kustomize", str(kdir)])
        if not check(r.returncode == 0, f"kubectl kustomize {name}", r.stderr):
            continue
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        validate_objects(name, docs)
        for d in docs:
            if d["kind"] in POD_KINDS:
                check_pod_policies(name, d)
        check_relay(name, docs)
        check_scale_out(name, docs)
        check_prometheus_configs(name, docs)
        rules = yaml.safe_load(RULES.read_text())
        prs = [d for d in docs if d["kind"] == "PrometheusRule"]
        check(
            len(prs) == 1 and prs[0]["spec"] == rules,
            f"{name}: the PrometheusRule's spec equals {RULES.relative_to(REPO)}",
        )


def check_rules() -> None:
    r = run([sys.executable, str(DEPLOY / "alerts" / "generate-prometheusrule.py"), "--check"])
    check(r.returncode == 0, "prometheusrule.yaml is generated from walrelay-rules.yml", r.stdout + r.stderr)
    r = run(["promtool", "check", "rules", str(RULES)])
    check(r.returncode == 0, "promtool check rules walrelay-rules.yml", r.stdout + r.stderr)
    tests = sorted(RULE_TESTS.glob("*.yml"))
    check(bool(tests), "alert unit tests exist")
    for t in tests:
        r = run(["promtool", "test", "rules", str(t)])
        check(r.returncode == 0, f"promtool test rules {t.name}", r.stdout + r.stderr)
    # Each alert has a unit test that makes it fire.
    import yaml

    alerts = [
        rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"] if "alert" in rule
    ]
    fired = set()
    for t in tests:
        for case in yaml.safe_load(t.read_text()).get("tests", []):
            for a in case.get("alert_rule_test", []):
                if a.get("exp_alerts"):
                    fired.add(a["alertname"])
    missing = [a for a in alerts if a not in fired]
    check(not missing, f"each of the {len(alerts)} alerts fires in a unit test", f"never fired: {missing}")


def github_anchor(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def check_runbook_links() -> None:
    import yaml

    if not check(OPERATIONS.exists(), "docs/operations.md exists"):
        return
    anchors = {
        github_anchor(m.group(2))
        for m in re.finditer(r"^(#+)\s+(.*)$", OPERATIONS.read_text(), flags=re.M)
    }
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in g["rules"]:
            if "alert" not in rule:
                continue
            url = rule.get("annotations", {}).get("runbook_url", "")
            m = re.match(r"^https://[^#]+/docs/operations\.md#(.+)$", url)
            check(
                bool(m) and m.group(1) in anchors and m.group(1) == rule["alert"].lower(),
                f"{rule['alert']}: runbook_url points at the heading #{rule['alert'].lower()} of docs/operations.md",
                url,
            )


def check_dashboard() -> None:
    try:
        d = json.loads(DASHBOARD.read_text())
    except (OSError, ValueError) as e:
        fail("deploy/grafana/walrelay.json is JSON", str(e))
        return
    ok("deploy/grafana/walrelay.json is JSON")
    panels = []

    def walk(ps):
        for p in ps:
            panels.append(p)
            walk(p.get("panels", []))

    walk(d.get("panels", []))
    ids = [p.get("id") for p in panels]
    check(len(ids) == len(set(ids)) and None not in ids, "dashboard panel ids are unique")
    variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
    check({"datasource", "namespace", "pod", "replica"} <= variables, "dashboard has datasource, namespace, pod and replica variables")
    targets = [t for p in panels for t in p.get("targets", [])]
    check(bool(targets) and all(t.get("expr") for t in targets), f"dashboard: {len(targets)} queries, each with an expr")
    unscoped = [
        t["expr"] for t in targets
        if "walrelay_" in t["expr"] and ('namespace=~"$namespace"' not in t["expr"] or 'pod=~"$pod"' not in t["expr"])
    ]
    check(not unscoped, "dashboard: every walrelay query is filtered by $namespace and $pod", "\n".join(unscoped))
    per_replica = [
        t["expr"] for t in targets
        if "walrelay_replica_" in t["expr"] and 'replica=~"$replica"' not in t["expr"]
    ]
    check(not per_replica, "dashboard: every per-replica query is filtered by $replica", "\n".join(per_replica))


def check_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    check(len(froms) >= 2, "Dockerfile is a multi-stage build")
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    check(bool(users) and not users[-1].startswith(("0", "root")), "Dockerfile's runtime stage runs as non-root")
    check(re.search(r'^VOLUME\s+\["/data"\]', text, flags=re.M) is not None, "Dockerfile declares the /data volume")
    ignore = (REPO / ".dockerignore").read_text().split()
    check("target" in ignore and ".git" in ignore, ".dockerignore leaves out target/ and .git")


def check_maintenance_pod() -> None:
    import yaml

    script = K8S / "maintenance" / "walrelay-cli.sh"
    r = run(["bash", "-n", str(script)])
    check(r.returncode == 0, "maintenance/walrelay-cli.sh parses", r.stderr)
    r = run(["bash", str(script), "--print", "--image", "registry.example.invalid/walrelay/walrelay:0.1.0",
             "--", "cursors", "set", "--replica", 'a "quoted" name', "--time", "2h"])
    if not check(r.returncode == 0, "maintenance/walrelay-cli.sh --print", r.stderr):
        return
    doc = yaml.safe_load(r.stdout)
    validate_objects("maintenance", [doc])
    args = doc["spec"]["containers"][0]["args"]
    check(
        args == ["cursors", "set", "--replica", 'a "quoted" name', "--time", "2h", "--data-dir", "/data"],
        "maintenance pod passes the CLI arguments through unchanged",
        str(args),
    )
    check(
        doc["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data-walrelay-0",
        "maintenance pod mounts the relay's claim data-walrelay-0",
    )


def main() -> int:
    require_tools()
    check_yamllint()
    check_overlays()
    check_maintenance_pod()
    check_rules()
    check_runbook_links()
    check_dashboard()
    check_dockerfile()
    print()
    print(f"deploy/validate.py: {passed} passed, {len(failures)} failed")
    for f in failures:
        print(f"  failed: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
