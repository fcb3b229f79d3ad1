#!/usr/bin/env python3
"""Turns the JSON lines a chaos run appends to $CHAOS_REPORT into the
markdown table of chaos-tests/README.md.

    CHAOS_REPORT=/tmp/chaos.jsonl cargo test -p chaos-tests
    python3 chaos-tests/report-table.py /tmp/chaos.jsonl
"""
import json
import sys


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def main(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    print("| scenario | injected | acknowledged | delivered per replica | lost | duplicates (extra) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        reps = r.get("replicas", [])
        delivered = ", ".join(
            f"{x['name']}: {x['delivered']}/{x.get('required', r.get('acknowledged'))}" for x in reps
        )
        lost = sum(x.get("lost", 0) for x in reps)
        extra = ", ".join(f"{x['name']}: {x.get('extra', 0)}" for x in reps)
        print(
            f"| {cell(r['scenario'])} | {cell(r.get('injected', ''))} | {r.get('acknowledged', '')} "
            f"| {cell(delivered)} | {lost} | {cell(extra)} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
