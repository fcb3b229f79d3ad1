#!/usr/bin/env python3
"""Writes deploy/kubernetes/base/prometheusrule.yaml from walrelay-rules.yml.

The plain rules file is the one source of the alert rules; the
prometheus-operator PrometheusRule wraps the same groups, text for text.

    deploy/alerts/generate-prometheusrule.py          # regenerate
    deploy/alerts/generate-prometheusrule.py --check  # exit 1 if out of date
"""
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "walrelay-rules.yml"
TARGET = HERE.parent / "kubernetes" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/alerts/walrelay-rules.yml by
# deploy/alerts/generate-prometheusrule.py: edit the rules file, then run the
# script. A test fails when this file and the rules file differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: walrelay
  labels:
    app.kubernetes.io/name: walrelay
    app.kubernetes.io/component: relay
spec:
"""


def render() -> str:
    lines = SOURCE.read_text().splitlines()
    # Drop the leading comment block; keep everything from `groups:` on.
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main() -> int:
    want = render()
    if "--check" in sys.argv[1:]:
        have = TARGET.read_text() if TARGET.exists() else ""
        if have != want:
            print(
                f"{TARGET} is out of date with {SOURCE}: "
                "run deploy/alerts/generate-prometheusrule.py",
                file=sys.stderr,
            )
            return 1
        print(f"{TARGET.name} matches {SOURCE.name}")
        return 0
    TARGET.write_text(want)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
