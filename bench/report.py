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

# relayd-b is the other build of an A/B run (AB=... bench/run.sh); targets not run are left out.
seen = {t for figure in values.values() for t in figure}
targets = [t for t in ["direct", "relayd", "relayd-b", "haproxy", "haproxy-splice", "nginx", "socat"] if t in seen]


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
    "this same run (for latency, memory and descriptors, lower is better). The last column shows",
    "how far the runs spread: on a shared 2-core machine, one run of a figure swings by 10-15%.",
    "The raw figures of every run are in `bench/RESULTS.tsv`.",
    "",
]
CPU = " machine CPU (% of a core per Gbit/s)"


def medians_of(figure):
    return {t: statistics.median(v) for t, v in values[figure].items() if v}


for figure in order:
    if figure.endswith(CPU):
        continue  # rendered with its ceiling below
    lines += [
        f"## {figure}",
        "",
        "| target | median | × direct | × HAProxy | runs (lowest–highest) |",
        "|---|---|---|---|---|",
    ]
    medians = medians_of(figure)
    for t in targets:
        if t not in medians:
            continue
        m = medians[t]
        ratio = lambda base: fmt(m / medians[base]) + "×" if medians.get(base) else "–"
        runs = values[figure][t]
        spread = f"{fmt(min(runs))}–{fmt(max(runs))}" if len(runs) > 1 else "one run"
        lines.append(f"| {t} | {fmt(m)} | {ratio('direct')} | {ratio('haproxy')} | {spread} |")
    lines.append("")

# What each path could carry with every core busy: the cores divided by what the whole machine
# (client, relay, backend and kernel) spent per Gbit/s through it. A relay adds a second TCP
# connection's kernel work to every byte, so its ceiling sits below the direct path's
# throughput, however little the relay itself does.
for figure in order:
    if not figure.endswith(CPU):
        continue
    name = figure[: -len(CPU)]
    cpu, measured = medians_of(figure), medians_of(f"{name} (Gbit/s)")
    direct = measured.get("direct")
    lines += [
        f"## {name}: machine CPU and the ceiling it sets",
        "",
        f"Ceiling = {cores} cores × 100 / CPU per Gbit/s: the throughput with every core busy at",
        "the same cost per byte. `ceiling × direct` is that ceiling over the direct path's",
        "measured throughput: a path cannot pass its own ceiling without spending less per byte.",
        "",
        "| target | % of a core per Gbit/s | ceiling (Gbit/s) | ceiling × direct | measured × ceiling |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        if not cpu.get(t):
            continue
        ceiling = int(cores) * 100 / cpu[t]
        of_direct = fmt(ceiling / direct) + "×" if direct else "–"
        used = fmt(measured[t] / ceiling) + "×" if measured.get(t) else "–"
        lines.append(f"| {t} | {fmt(cpu[t])} | {fmt(ceiling)} | {of_direct} | {used} |")
    lines.append("")
open(out, "w").write("\n".join(lines))
