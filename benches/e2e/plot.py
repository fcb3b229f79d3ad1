#!/usr/bin/env python3
"""Draws the end-to-end benchmark's PNGs from results.json.

usage: plot.py RESULTS_JSON OUT_DIR
writes throughput.png, latency.png and resources.png (when the closed-loop
phase ran), far.png (when the far replica phase ran) and sweep.png (when
the concurrency sweep ran).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

COLORS = {
    "walrelay": "#1f77b4",
    "walrelay-baseline": "#9ecae1",
    "vmagent": "#ff7f0e",
    "prometheus-agent": "#2ca02c",
}


def main():
    results, out = sys.argv[1], sys.argv[2]
    with open(results) as f:
        r = json.load(f)
    if r.get("far"):
        far(r["far"], out)
    if r.get("sweep"):
        sweep(r["sweep"], out)
    runs = r["throughput"]
    if not runs:
        return
    names = [t["system"] for t in runs]
    colors = [COLORS.get(n, "gray") for n in names]
    load = f'{r["args"]["workers"]} workers x {r["args"]["series_per_worker"]} series, one request in flight each'

    # Throughput: the mean, and per second.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    ax1.bar(names, [t["samples_per_s"] / 1e3 for t in runs], color=colors)
    for i, t in enumerate(runs):
        ax1.text(i, t["samples_per_s"] / 1e3, f'{t["samples_per_s"]/1e3:.0f}k', ha="center", va="bottom")
    ax1.set_ylabel("acknowledged samples/s (thousands)")
    ax1.set_title("mean over the run")
    ax1.tick_params(axis="x", labelsize=8, labelrotation=15)
    for t, c in zip(runs, colors):
        ys = [v / 1e3 for v in t["timeline_samples_per_s"]]
        while len(ys) > 1 and ys[-1] < 0.5 * max(ys):
            ys.pop()  # the partial second after the load ended
        ax2.plot(range(1, len(ys) + 1), ys, label=t["system"], color=c)
    ax2.set_xlabel("second of the load")
    ax2.set_ylabel("acknowledged samples/s (thousands)")
    ax2.set_title("per second")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    fig.suptitle(f"Throughput ({load})")
    fig.tight_layout()
    fig.savefig(f"{out}/throughput.png", dpi=100)

    # Latency: at saturation and at a fixed rate, with the disk's fsync latency.
    fixed = r.get("fixed_rate", [])
    f = r["fsync"]
    panels = [(runs, f"closed loop ({load})")]
    if fixed:
        rate = f'every {r["args"]["fixed_interval_ms"]:.0f} ms'
        panels.append((fixed, f"fixed rate (same workers, a request {rate})"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6 * (len(panels) + 1), 4.5))
    width = 0.38
    for ax, (rs, title) in zip(axes, panels):
        xs = range(len(rs))
        cs = [COLORS.get(t["system"], "gray") for t in rs]
        ax.bar([x - width / 2 for x in xs], [t["p50_ms"] for t in rs], width, color=cs, alpha=0.55)
        ax.bar([x + width / 2 for x in xs], [t["p99_ms"] for t in rs], width, color=cs)
        for x, t in zip(xs, rs):
            ax.text(x - width / 2, t["p50_ms"], f'{t["p50_ms"]:.1f}', ha="center", va="bottom", fontsize=8)
            ax.text(x + width / 2, t["p99_ms"], f'{t["p99_ms"]:.1f}', ha="center", va="bottom", fontsize=8)
        ax.axhline(f["p99_us"] / 1e3, color="red", linestyle="--", label=f'disk fsync p99 {f["p99_us"]/1e3:.2f} ms')
        ax.set_xticks(list(xs))
        ax.set_xticklabels([t["system"] for t in rs], fontsize=8)
        ax.set_ylabel("ack latency (ms): p50 light, p99 dark")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for t in (fixed or runs):
        q = t["latency_quantiles_ms"]
        ax.plot(range(len(q)), q, label=t["system"], color=COLORS.get(t["system"], "gray"))
    ax.axhline(f["p99_us"] / 1e3, color="red", linestyle="--", label="disk fsync p99")
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("ack latency (ms, log)")
    ax.set_title("latency by percentile" + (" (fixed rate)" if fixed else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle("Acknowledgement latency")
    fig.tight_layout()
    fig.savefig(f"{out}/latency.png", dpi=100)

    # Resources: CPU per sample, peak RSS, disk per buffered sample.
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(names, [t["cpu_s_per_million"] for t in runs], color=colors)
    axes[0].set_title("CPU seconds per million samples")
    axes[1].bar(names, [t["peak_rss_bytes"] / 2**20 for t in runs], color=colors)
    axes[1].set_title("peak RSS (MiB)")
    ab = r.get("absent", [])
    axes[2].bar([a["system"] for a in ab], [a["bytes_per_sample"] for a in ab],
                color=[COLORS.get(a["system"], "gray") for a in ab])
    axes[2].set_title("disk bytes per buffered sample")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, labelrotation=15)
    fig.tight_layout()
    fig.savefig(f"{out}/resources.png", dpi=100)


def delivered_b(timeline):
    """Samples/s delivered to replica b, per second, and its shards."""
    reps = timeline["replicas"]
    sent = [x[1]["sent_samples"] for x in reps]
    rates = [b - a for a, b in zip([0.0] + sent, sent)]
    return rates, [x[1]["shards"] for x in reps]


def far(f, out):
    """The far replica phase (issue 18): live runs, the ladder, catch-ups."""
    delays = sorted({c["delay_ms"] for c in f["catchup"]})
    panels = 2 + len(delays)
    cols = 2
    rows = (panels + 1) // 2
    fig, axes = plt.subplots(rows, cols, figsize=(13, 4.2 * rows), squeeze=False)
    axes = [a for row in axes for a in row]
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0]
    sh = ax.twinx()
    for i, t in enumerate(r for r in f["live"] if r["timeline"]["replicas"]):
        c = palette[i % len(palette)]
        rates, shards = delivered_b(t["timeline"])
        xs = range(1, len(rates) + 1)
        ax.plot(xs, [v / 1e3 for v in rates], color=c, label=t["label"])
        sh.step(xs, shards, color=c, linestyle=":", where="post")
    ax.axhline(f["rate"] / 1e3, color="gray", linestyle="--", label="live rate")
    ax.axvline(f["duration_s"], color="gray", linestyle=":")
    ax.set_xlabel("second (load, then drain)")
    ax.set_ylabel("delivered to b (k samples/s), solid")
    sh.set_ylabel("shards of b, dotted")
    ax.set_title(f'{f["rate"]/1e3:.0f}k samples/s live, {f["delay_ms"]:.0f} ms per request', fontsize=9)
    ax.legend(fontsize=8)

    ax = axes[1]
    systems = []
    for l in f["ladder"]:
        if l["run"]["label"] not in systems:
            systems.append(l["run"]["label"])
    for i, name in enumerate(systems):
        steps = [l for l in f["ladder"] if l["run"]["label"] == name]
        xs = [l["run"]["offered_samples_per_s"] / 1e3 for l in steps]
        ys = [l["run"]["drain_s"] if l["run"]["drain_s"] is not None else 60 for l in steps]
        ax.plot(xs, ys, marker="o", color=COLORS.get(name, palette[i % len(palette)]), label=name)
        for x, y, l in zip(xs, ys, steps):
            if not l["keeps_up"]:
                ax.plot([x], [y], marker="x", markersize=12, color="red")
    ax.axhline(f["keep_up_drain_s"], color="red", linestyle="--", label="keeps up below")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("live rate (k samples/s)")
    ax.set_ylabel("drain after the load (s, log); x: does not keep up")
    ax.set_title("largest live rate kept up with", fontsize=9)
    ax.legend(fontsize=8)

    for ax, d in zip(axes[2:], delays):
        sh = ax.twinx()
        for i, c in enumerate(x for x in f["catchup"] if x["delay_ms"] == d):
            col = palette[i % len(palette)]
            rates, shards = delivered_b(c["timeline"])
            xs = range(1, len(rates) + 1)
            ax.plot(xs, [v / c["live_samples_per_s"] for v in rates], color=col, label=c["label"])
            sh.step(xs, shards, color=col, linestyle=":", where="post")
            if c["caught_up_s"] is not None:
                ax.axvline(c["return_at_s"] + c["caught_up_s"], color=col, linestyle="--", linewidth=0.8)
        first = next(x for x in f["catchup"] if x["delay_ms"] == d)
        ax.axvspan(first["outage_at_s"], first["return_at_s"], color="red", alpha=0.1, label="b unreachable")
        ax.set_xlabel("second of the load (dashed: caught up)")
        ax.set_ylabel("delivered to b / live rate, solid")
        sh.set_ylabel("shards of b, dotted")
        ax.set_title(f"catch-up, {d:.0f} ms per request", fontsize=9)
        ax.legend(fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle("Far replica (issue 18)")
    fig.tight_layout()
    fig.savefig(f"{out}/far.png", dpi=100)


def sweep(points, out):
    """Acknowledged samples/s and CPU per sample against senders."""
    systems = []
    for p in points:
        for t in p["results"]:
            if t["label"] not in systems:
                systems.append(t["label"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in systems:
        xs, ys, cs = [], [], []
        for p in points:
            for t in p["results"]:
                if t["label"] == name:
                    xs.append(p["workers"])
                    ys.append(t["samples_per_s"] / 1e6)
                    cs.append(t["cpu_s_per_million"])
        color = COLORS.get(name, "gray")
        ax1.plot(xs, ys, marker="o", label=name, color=color)
        ax2.plot(xs, cs, marker="o", label=name, color=color)
    labels = [f'{p["workers"]}\n×{p["series_per_worker"]}' for p in points]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([p["workers"] for p in points])
        ax.set_xticklabels(labels)
        ax.set_xlabel("senders × series per request (one request in flight each)")
        ax.set_ylim(bottom=0)
        ax.legend()
    ax1.set_ylabel("acknowledged samples/s (millions)")
    ax1.set_title("throughput")
    ax2.set_ylabel("relay CPU seconds per million samples")
    ax2.set_title("CPU per sample")
    fig.suptitle("Concurrency sweep (two null-sink replicas)")
    fig.tight_layout()
    fig.savefig(f"{out}/sweep.png", dpi=100)


if __name__ == "__main__":
    main()
