"""Renders bench/run.sh's raw results (figure, target, run, value) as bench/RESULTS.md:
the median of the runs, and its ratio to the direct path and to HAProxy from the same run."""
import csv
import statistics
import sys
import time
from collections import defaultdict

raw, out, command, cores, *versions = sys.argv[1:]
values = defaultdict(lambda: defaultdict(list))
order = []
for figure, target, _run, value in csv.reader(open(raw), delimiter="\t"):
    if figure not in order:
        order.append(figure)
    try:
        values[figure][target].append(float(value))
    except ValueError:
        pass

targets = ["direct", "relayd", "haproxy", "haproxy-splice", "nginx", "socat"]
lower_is_better = ("p50", "p99", "failed", "memory", "descriptors")


def fmt(x):
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


lines = [
    "# relayd benchmark results",
    "",
    f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    f"- command: `{command}`",
    f"- cores: {cores} (client, relay and backend share them; every relay runs {cores} workers)",
    *[f"- {v}" for v in versions],
    "",
    "Each cell is the median of the runs; `× direct` and `× HAProxy` are ratios of medians from",
    "this same run (for latency, memory and descriptors, lower is better).",
    "",
]
for figure in order:
    lines += [f"## {figure}", "", "| target | median | × direct | × HAProxy |", "|---|---|---|---|"]
    medians = {t: statistics.median(v) for t, v in values[figure].items() if v}
    for t in targets:
        if t not in medians:
            continue
        m = medians[t]
        ratio = lambda base: fmt(m / medians[base]) + "×" if medians.get(base) else "–"
        lines.append(f"| {t} | {fmt(m)} | {ratio('direct')} | {ratio('haproxy')} |")
    lines.append("")
open(out, "w").write("\n".join(lines))
