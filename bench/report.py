"""Renders bench/run.sh's raw results (figure, target, run, value) as bench/RESULTS.md:
the median of the runs, and its ratio to the direct path and to HAProxy from the same run;
and what the relay process itself spent per unit of work (the "relay ..." figures).

    report.py RESULTS.tsv RESULTS.md COMMAND CORES COST_NOTE VERSION...
"""
import csv
import statistics
import sys
import time
from collections import defaultdict

raw, out, command, cores, cost_note, *versions = sys.argv[1:]
values = defaultdict(lambda: defaultdict(list))
order = []
for figure, target, _run, value in csv.reader(open(raw), delimiter="\t"):
    if figure not in order:
        order.append(figure)
    try:
        values[figure][target].append(float(value))
    except ValueError:
        pass

# relayd-b is the other build of an A/B run (AB=... bench/run.sh), relayd-1w relayd with one
# worker (ONLY="... relayd-1w ..."); targets not run are left out.
seen = {t for figure in values.values() for t in figure}
ALL = ["direct", "relayd", "relayd-1w", "relayd-b", "haproxy", "haproxy-splice", "nginx", "socat"]
targets = [t for t in ALL if t in seen]
COST = "relay "  # the relay process's own cost per unit: rendered in its own tables at the end


def fmt(x):
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


lines = [
    "# relayd benchmark results",
    "",
    f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    f"- command: `{command}`",
    f"- cores: {cores} (client, relay and backend share them; every relay runs {cores} workers"
    + (", but relayd-1w runs 1)" if "relayd-1w" in targets else ")"),
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
    if figure.endswith(CPU) or figure.startswith(COST):
        continue  # rendered with its ceiling, or in the cost tables, below
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

# What the relay process itself (all its threads; nginx's master and workers; socat and the
# children it forks) spent over each load run, divided by the units the load tool counted.
relays = [t for t in targets if t != "direct" and any(t in values[f] for f in order if f.startswith(COST))]
if relays:
    SUMMARY = [
        ("CPU µs per new connection", "relay CPU (µs) per new connection"),
        ("CPU µs per 64 B round trip", "relay CPU (µs) per ping-pong round trip"),
        ("syscalls per round trip", "relay syscalls per ping-pong round trip"),
        ("context switches per new connection", "relay context switches per new connection"),
        ("CPU ms per GB (1 stream)", "relay CPU (ms) per GB, tcp 1 stream"),
        ("CPU µs per UDP round trip", "relay CPU (µs) per UDP round trip"),
        ("CPU µs per UDP round trip, one event loop", "relay CPU (µs) per UDP round trip, one event loop"),
    ]

    def cell(figure, t):
        runs = values[figure].get(t)
        return fmt(statistics.median(runs)) if runs else "n/a"

    builds = [v for v in versions if v.startswith("relayd")]
    lines += [
        "## Cost per unit (relay process only)",
        "",
        f"- command: `{command}`",
        *[f"- {b}" for b in builds],
        f"- {cost_note}",
        "",
        "What the relay process alone spent over each load run (user+system CPU of all its threads,",
        "nginx's master and workers, socat and the children it forks; the system calls and context",
        "switches of those same threads), divided by what the load tool counted: connections made",
        "(64 B echo, then close; 64 concurrent clients), round trips done (64 B ping-pong, 32 TCP",
        "connections; UDP, 16 sockets), bytes iperf3 moved. The client and the backends are not in",
        "it. Medians of the runs; n/a: not counted (no perf, or the target has no such route). CPU",
        "and context switches come from the runs above (perf's context-switch counter is a software",
        "one, with no cost seen here); system calls from a pass of their own, since the syscall",
        "tracepoint slows every system call on the machine while it is on.",
        "",
        "| target | " + " | ".join(name for name, _ in SUMMARY) + " |",
        "|---|" + "---|" * len(SUMMARY),
    ]
    for t in relays:
        lines.append(f"| {t} | " + " | ".join(cell(figure, t) for _, figure in SUMMARY) + " |")
    lines += [
        "",
        "### Every cost figure",
        "",
        "| per unit | " + " | ".join(relays) + " |",
        "|---|" + "---|" * len(relays),
    ]
    # One unit's figures together: CPU, system calls, context switches.
    costs = [f for f in order if f.startswith(COST)]
    units = list(dict.fromkeys(f.split(" per ", 1)[1] for f in costs))
    kinds = ["CPU", "syscalls", "context switches"]
    costs.sort(key=lambda f: (units.index(f.split(" per ", 1)[1]),
                              next(i for i, k in enumerate(kinds) if f[len(COST):].startswith(k))))
    for figure in costs:
        lines.append(f"| {figure[len(COST):]} | " + " | ".join(cell(figure, t) for t in relays) + " |")
    lines.append("")
open(out, "w").write("\n".join(lines))
