#!/usr/bin/env bash
# relayd's benchmark: relayd side by side with HAProxy (with and without splice), nginx stream
# and socat, and with no relay at all, in one run on loopback. Same backends, same load tools,
# the same worker count for every relay (the core count). Every process is started and stopped
# here, by PID; every load loop is bounded in time. Writes bench/RESULTS.md, and the raw
# figures of every run to bench/RESULTS.tsv. Beside each rate it reports what the relay process
# itself spent per unit of work (CPU, system calls, context switches per new connection, per
# round trip, per GB), counted over the load run from /proc and by perf attached to the relay.
#
#   bench/run.sh                 # RUNS=3 SECS=5 IDLE=9000 by default
#   RUNS=5 SECS=10 bench/run.sh
#   AB=/path/to/other/relayd bench/run.sh   # A/B: that build runs beside this one as "relayd-b"
#   ONLY="direct relayd relayd-b haproxy nginx" bench/run.sh   # a subset of the targets
#   ONLY="relayd relayd-1w haproxy" bench/run.sh   # relayd-1w: the same relayd with workers: 1
#   PERF=0 bench/run.sh          # no perf: CPU and context switches from /proc, syscalls n/a
#   SYSCALL_SECS=5 bench/run.sh  # the length of each load in the system-call pass (2 s)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
SECS=${SECS:-5}
# Idle connections held through each relay. A relay holds two descriptors per connection, and
# the hard RLIMIT_NOFILE here is 20000: 9000 stays under it.
IDLE=${IDLE:-9000}
CORES=$(nproc)

# --- what it needs ------------------------------------------------------------------------
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v socat >/dev/null || need+=(socat)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v python3 >/dev/null || need+=(python3)
command -v ss >/dev/null || need+=(iproute2)
command -v pgrep >/dev/null || need+=(procps)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q --bin relayd --example loadgen
RELAYD=${CARGO_TARGET_DIR:-$ROOT/target}/release/relayd
LOADGEN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/loadgen

WORK=$(mktemp -d /tmp/relayd-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

# --- ports --------------------------------------------------------------------------------
# Backends: 9300 TCP echo, 9301 UDP echo, 9302 iperf3, 9303 connection holder.
# Each relay listens on base+0 (echo), +1 (iperf3), +2 (UDP echo), +3 (holder).
# relayd-1w (relayd with one worker) runs only when ONLY names it.
declare -A BASE=([direct]=9300 [relayd]=9310 [haproxy]=9320 [haproxy-splice]=9330 [nginx]=9340 [socat]=9350 [relayd-b]=9360 [relayd-1w]=9370)
TARGETS=(direct relayd haproxy haproxy-splice nginx socat)
[ -n "${AB:-}" ] && TARGETS=(direct relayd relayd-b haproxy haproxy-splice nginx socat)
[ -n "${ONLY:-}" ] && read -r -a TARGETS <<<"$ONLY"
for target in "${TARGETS[@]}"; do
    [ -n "${BASE[$target]:-}" ] || { echo "unknown target $target (known: ${!BASE[*]})" >&2; exit 1; }
done
[[ " ${TARGETS[*]} " == *" relayd-b "* && -z "${AB:-}" ]] && { echo "relayd-b needs AB=/path/to/other/relayd" >&2; exit 1; }
selected() { [[ " ${TARGETS[*]} " == *" $1 "* ]]; }

start() { # name, command...: runs it in the background, remembers its PID
    local name=$1
    shift
    "$@" >"$WORK/$name.out" 2>&1 &
    PIDS+=($!)
    echo $! >"$WORK/$name.pid"
}

wait_port() { # proto port: bounded wait until something listens there
    for _ in $(seq 1 100); do
        if ss -Hln"${1:0:1}" "sport = :$2" | grep -q .; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on $1 port $2" >&2
    return 1
}

start backend-tcp "$LOADGEN" tcp-echo 127.0.0.1:9300
start backend-udp "$LOADGEN" udp-echo 127.0.0.1:9301
start backend-iperf iperf3 -s -p 9302
start backend-hold "$LOADGEN" tcp-hold 127.0.0.1:9303

relayd_cfg() { # base [workers]
    cat <<EOF
(log_level: "warn", workers: ${2:-$CORES}, routes: [
    (name: "echo", listen: "127.0.0.1:$(($1 + 0))", backends: [(addr: "127.0.0.1:9300")]),
    (name: "iperf", listen: "127.0.0.1:$(($1 + 1))", backends: [(addr: "127.0.0.1:9302")]),
    (name: "udp", listen: "127.0.0.1:$(($1 + 2))", protocol: Udp, backends: [(addr: "127.0.0.1:9301")]),
    (name: "hold", listen: "127.0.0.1:$(($1 + 3))", backends: [(addr: "127.0.0.1:9303")]),
])
EOF
}
relayd_cfg 9310 >"$WORK/relayd.ron"
start relayd "$RELAYD" --config "$WORK/relayd.ron" --log-format json
if [ -n "${AB:-}" ]; then
    relayd_cfg 9360 >"$WORK/relayd-b.ron"
    start relayd-b "$AB" --config "$WORK/relayd-b.ron" --log-format json
fi
if selected relayd-1w; then
    relayd_cfg 9370 1 >"$WORK/relayd-1w.ron"
    start relayd-1w "$RELAYD" --config "$WORK/relayd-1w.ron" --log-format json
fi

haproxy_cfg() { # base, extra defaults
    cat <<EOF
global
    nbthread $CORES
    maxconn 9500
    maxpipes 256
defaults
    mode tcp
    timeout connect 3s
    timeout client 10m
    timeout server 10m
    $2
listen echo
    bind 127.0.0.1:$(($1 + 0))
    server s 127.0.0.1:9300
listen iperf
    bind 127.0.0.1:$(($1 + 1))
    server s 127.0.0.1:9302
listen hold
    bind 127.0.0.1:$(($1 + 3))
    server s 127.0.0.1:9303
EOF
}
haproxy_cfg 9320 "" >"$WORK/haproxy.cfg"
haproxy_cfg 9330 "option splice-auto" >"$WORK/haproxy-splice.cfg"
start haproxy haproxy -db -f "$WORK/haproxy.cfg"
start haproxy-splice haproxy -db -f "$WORK/haproxy-splice.cfg"

cat >"$WORK/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $CORES;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx.pid.file;
error_log $WORK/nginx.error.log warn;
events { worker_connections 19500; }
stream {
    proxy_timeout 10m;
    server { listen 127.0.0.1:9340 reuseport; proxy_pass 127.0.0.1:9300; }
    server { listen 127.0.0.1:9341 reuseport; proxy_pass 127.0.0.1:9302; }
    server { listen 127.0.0.1:9342 udp reuseport; proxy_pass 127.0.0.1:9301; proxy_responses 1; proxy_timeout 10s; }
    server { listen 127.0.0.1:9343 reuseport; proxy_pass 127.0.0.1:9303; }
}
EOF
start nginx nginx -c "$WORK/nginx.conf" -p "$WORK"

start socat-echo socat TCP-LISTEN:9350,fork,reuseaddr,backlog=1024 TCP:127.0.0.1:9300
start socat-iperf socat TCP-LISTEN:9351,fork,reuseaddr TCP:127.0.0.1:9302

for port in 9300 9302 9303 9310 9311 9313 9320 9321 9330 9331 9340 9341 9343 9350 9351; do wait_port tcp $port; done
for port in 9301 9312 9342; do wait_port udp $port; done
if [ -n "${AB:-}" ]; then
    for port in 9360 9361 9363; do wait_port tcp $port; done
    wait_port udp 9362
fi
if selected relayd-1w; then
    for port in 9370 9371 9373; do wait_port tcp $port; done
    wait_port udp 9372
fi

RESULTS=$WORK/results.tsv
jiffies() { awk '/^cpu / {print $2+$3+$4+$7+$8 ", " $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; } # busy, all (stolen time counts in all, not as busy)
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
field() { sed -E "s/.*$1=([^ ]+).*/\\1/"; }

# --- the relay's own cost over a load run -----------------------------------------------------
# CPU: utime+stime of every thread of the relay's processes, and cutime+cstime of the children
# they reaped (socat forks one per connection), from /proc/PID/stat before and after the load.
# Context switches: perf stat -e context-switches attached to those processes (their threads and
# whatever they fork) for exactly the load's lifetime, the load being perf's workload; without
# perf, summed over /proc/PID/task/*/status. System calls: perf's raw_syscalls:sys_enter, in a
# pass of their own after the runs: while a syscall tracepoint is on, every system call on the
# machine takes the slow path (a ping-pong through relayd lost 7-30% here), so the runs whose
# rates and CPU are reported do not carry it. PERF=0: no perf at all; SYSCALL_SECS: that pass's
# length per load (2 s).
SYSCALL_SECS=${SYSCALL_SECS:-2}
CLK_TCK=$(getconf CLK_TCK)
PERF_CS= PERF_SYS=
perf_works() { # events: perf can count them on a process here
    perf stat -e "$1" -p $$ -x, -o "$WORK/perf.probe" -- true 2>/dev/null && ! grep -q 'not supported' "$WORK/perf.probe"
}
COST_NOTE="CPU from /proc/PID/stat (utime+stime, CLK_TCK=$CLK_TCK), over the runs"
if [ "${PERF:-1}" = 0 ]; then
    COST_NOTE+="; PERF=0: context switches from /proc/PID/task/*/status, system calls n/a"
elif ! command -v perf >/dev/null || ! perf_works context-switches; then
    echo "perf stat does not work here; system calls per unit are n/a" >&2
    COST_NOTE+="; perf stat did not work: context switches from /proc/PID/task/*/status, system calls n/a"
else
    PERF_CS=context-switches
    COST_NOTE+="; context switches from \`perf stat -e context-switches\` over the same runs ($(perf --version))"
    if perf_works raw_syscalls:sys_enter; then
        PERF_SYS=raw_syscalls:sys_enter
        COST_NOTE+="; system calls from \`perf stat -e raw_syscalls:sys_enter\` in a pass of their own, one run of ${SYSCALL_SECS} s per load (the tracepoint slows every system call on the machine)"
    else
        echo "perf: the raw_syscalls:sys_enter tracepoint is unavailable; system calls per unit are n/a" >&2
        COST_NOTE+="; the raw_syscalls:sys_enter tracepoint was unavailable: system calls n/a"
    fi
fi
started_pids() { # what this script started for a target
    local name
    case $1 in socat) set -- socat-echo socat-iperf ;; esac
    for name in "$@"; do cat "$WORK/$name.pid"; done
}
relay_pids() { # the relay's processes: what was started, and its children (nginx's workers)
    local pid
    for pid in $(started_pids "$1"); do echo "$pid" $(pgrep -P "$pid" || true); done
}
cpu_ticks() { # pids: their CPU time so far, in clock ticks
    local t=0 p s f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue # a socat child may be gone
        read -r -a f <<<"${s##*) }"                       # the fields after "pid (comm)"
        t=$((t + f[11] + f[12] + f[13] + f[14]))          # utime stime cutime cstime
    done
    echo $t
}
ctxt_switches() { # pids: voluntary and involuntary context switches of all their threads
    local p
    for p in "$@"; do cat /proc/"$p"/task/*/status 2>/dev/null || true; done |
        awk '/^(non)?voluntary_ctxt_switches:/ {t += $2} END {print t + 0}'
}
counted() { # perf's figure for an event in $WORK/perf.out: a count, 0 if the task never ran, or n/a
    awk -F, -v e="$1" '$3 == e {print ($1 ~ /^[0-9]+$/ ? $1 : ($1 == "<not counted>" ? 0 : "n/a")); found = 1}
        END {if (!found) print "n/a"}' "$WORK/perf.out" 2>/dev/null || echo n/a
}
measured() { # target, perf event ("" for none), load command...: runs the load once, its output
    # on stdout; the relay's cost over it goes to $WORK/cost as "CPU-µs syscalls context-switches"
    # (n/a: not counted)
    local target=$1 event=$2 pids ticks0 cs0 cpu sys=n/a cs rc=0
    shift 2
    if [ "$target" = direct ]; then # no relay
        echo "n/a n/a n/a" >"$WORK/cost"
        "$@"
        return
    fi
    pids=$(relay_pids "$target")
    ticks0=$(cpu_ticks $pids)
    cs0=$(ctxt_switches $pids)
    rm -f "$WORK/perf.out"
    if [ -n "$event" ]; then
        # socat's per-connection children come and go: perf follows them from socat itself.
        local attach=$pids
        [ "$target" = socat ] && attach=$(started_pids socat)
        perf stat -e "$event" -p "$(echo $attach | tr ' ' ,)" -x, -o "$WORK/perf.out" -- "$@" || rc=$?
        if ! grep -q ",$event," "$WORK/perf.out" 2>/dev/null; then
            # perf could not attach, and so never started the load: run it without perf.
            echo "perf stat failed for $target; this load's $event are n/a" >&2
            rm -f "$WORK/perf.out"
            rc=0
            "$@" || rc=$?
        fi
    else
        "$@" || rc=$?
    fi
    [ "$target" = socat ] && sleep 0.1 # its last children exit and are reaped
    cpu=$((($(cpu_ticks $(relay_pids "$target")) - ticks0) * 1000000 / CLK_TCK))
    if [ "$event" = context-switches ] && [ -e "$WORK/perf.out" ]; then
        cs=$(counted context-switches)
    else
        cs=$(($(ctxt_switches $(relay_pids "$target")) - cs0))
    fi
    [ -n "$event" ] && [ "$event" != context-switches ] && [ -e "$WORK/perf.out" ] && sys=$(counted "$event")
    echo "$cpu $sys $cs" >"$WORK/cost"
    return $rc
}
ratio() { # value count scale: value × scale / count, or n/a
    awk -v v="$1" -v n="$2" -v s="$3" 'BEGIN { if (v == "n/a" || n !~ /^[0-9.e+]+$/ || n + 0 <= 0) print "n/a"; else printf "%.6g\n", v * s / n }'
}
record_cost() { # pass, target, run, unit, how many units the load tool counted, [GB: the count is bytes]
    local cpu sys cs per=1 cpu_per=1 cpu_unit=µs
    read -r cpu sys cs <"$WORK/cost"
    [ "$2" = direct ] && return 0
    [ "${6:-}" = GB ] && per=1e9 cpu_per=1e6 cpu_unit=ms
    if [ "$1" = syscalls ]; then
        record "relay syscalls per $4" "$2" "$3" "$(ratio "$sys" "$5" $per)"
    else
        record "relay CPU ($cpu_unit) per $4" "$2" "$3" "$(ratio "$cpu" "$5" $cpu_per)"
        record "relay context switches per $4" "$2" "$3" "$(ratio "$cs" "$5" $per)"
        # Where no pass counts them (no perf, or no tracepoint), the table says so.
        [ -z "$PERF_SYS" ] && record "relay syscalls per $4" "$2" "$3" n/a
    fi
    return 0
}

# --- (a) bulk throughput, (b) ping-pong, (c) new connections, (e) UDP -----------------------
loads() { # target, run, pass ("rates": rates, CPU and context switches; "syscalls": only
    # the relay's system calls per unit), seconds per load
    local target=$1 run=$2 pass=$3 secs=$4 event=$PERF_CS base iperf mode name before after bps bytes out udp
    [ "$pass" = syscalls ] && event=$PERF_SYS
    base=${BASE[$target]}
    iperf=$((base + 1))
    [ "$target" = direct ] && iperf=9302
    for mode in "1 stream:" "8 streams:-P 8" "reverse:-R"; do
        name=${mode%%:*}
        before=$(jiffies)
        read -r bps bytes < <(measured "$target" "$event" iperf3 -c 127.0.0.1 -p "$iperf" -t "$secs" ${mode#*:} -J |
            python3 -c 'import json,sys; r = json.load(sys.stdin)["end"]["sum_received"]; print(r["bits_per_second"]/1e9, r["bytes"])' 2>/dev/null || echo 0 0)
        after=$(jiffies)
        record_cost "$pass" "$target" "$run" "GB, tcp $name" "$bytes" GB
        [ "$pass" = rates ] || continue
        record "tcp $name (Gbit/s)" "$target" "$run" "$bps"
        # What the whole machine (client, relay, backend, kernel) spent per Gbit/s; a run
        # that moved nothing has no such figure.
        record "tcp $name machine CPU (% of a core per Gbit/s)" "$target" "$run" \
            "$(python3 -c "b0, t0 = $before; b1, t1 = $after; print(100 * $CORES * (b1 - b0) / (t1 - t0) / $bps if $bps > 0 else '')")"
    done
    out=$(measured "$target" "$event" "$LOADGEN" tcp-pingpong 127.0.0.1:$base 32 "$secs" 64)
    record_cost "$pass" "$target" "$run" "ping-pong round trip" "$(field round_trips <<<"$out")"
    if [ "$pass" = rates ]; then
        record "ping-pong round trips/s" "$target" "$run" "$(field round_trips_per_s <<<"$out")"
        record "ping-pong p50 (µs)" "$target" "$run" "$(field p50_us <<<"$out")"
        record "ping-pong p99 (µs)" "$target" "$run" "$(field p99_us <<<"$out")"
    fi
    out=$(measured "$target" "$event" "$LOADGEN" tcp-conns 127.0.0.1:$base 64 "$secs")
    record_cost "$pass" "$target" "$run" "new connection" "$(field ok <<<"$out")"
    if [ "$pass" = rates ]; then
        record "new connections/s" "$target" "$run" "$(field connections_per_s <<<"$out")"
        record "new connections failed" "$target" "$run" "$(field failed <<<"$out")"
    fi
    case $target in
    direct) udp=9301 ;; relayd) udp=9312 ;; relayd-b) udp=9362 ;; relayd-1w) udp=9372 ;; nginx) udp=9342 ;; *) udp= ;;
    esac
    if [ -n "$udp" ]; then
        # Two client shapes: 16 blocking threads with a socket each, and one event-loop
        # thread driving 16 sockets.
        out=$(measured "$target" "$event" "$LOADGEN" udp-pingpong 127.0.0.1:$udp 16 "$secs" 64)
        record_cost "$pass" "$target" "$run" "UDP round trip" "$(field round_trips <<<"$out")"
        [ "$pass" = rates ] && record "UDP round trips/s" "$target" "$run" "$(field round_trips_per_s <<<"$out")"
        out=$(measured "$target" "$event" "$LOADGEN" udp-pingpong-loop 127.0.0.1:$udp 16 "$secs" 64)
        record_cost "$pass" "$target" "$run" "UDP round trip, one event loop" "$(field round_trips <<<"$out")"
        [ "$pass" = rates ] && record "UDP round trips/s, one event loop" "$target" "$run" "$(field round_trips_per_s <<<"$out")"
    fi
    return 0
}
for run in $(seq 1 "$RUNS"); do
    for target in "${TARGETS[@]}"; do loads "$target" "$run" rates "$SECS"; done
done
if [ -n "$PERF_SYS" ]; then
    for target in "${TARGETS[@]}"; do
        [ "$target" = direct ] || loads "$target" 1 syscalls "$SYSCALL_SECS"
    done
fi

# --- (d) memory and descriptors per idle connection ------------------------------------------
rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$p/status))); done; echo $t; }
fds() { local t=0; for p in "$@"; do t=$((t + $(ls /proc/$p/fd | wc -l))); done; echo $t; }
IDLE_TARGETS=(relayd relayd-b relayd-1w haproxy nginx)
for target in "${IDLE_TARGETS[@]}"; do
    selected "$target" || continue
    # A fresh holder each time: it keeps every connection it ever took, and two targets'
    # worth would reach its descriptor limit.
    kill "$(cat "$WORK/backend-hold.pid")" 2>/dev/null || true
    wait "$(cat "$WORK/backend-hold.pid")" 2>/dev/null || true
    start backend-hold "$LOADGEN" tcp-hold 127.0.0.1:9303
    wait_port tcp 9303
    port=$((${BASE[$target]} + 3))
    pids=$(relay_pids "$target")
    rss0=$(rss_kb $pids)
    fd0=$(fds $pids)
    "$LOADGEN" tcp-idle 127.0.0.1:$port "$IDLE" 30 >"$WORK/idle.out" &
    idle=$!
    PIDS+=($idle)
    for _ in $(seq 1 600); do # bounded: until the relay holds both ends of every connection
        [ "$(fds $pids)" -ge $((fd0 + 2 * IDLE)) ] && break
        sleep 0.05
    done
    sleep 1.5 # the last connects complete; their transient state is gone
    rss1=$(rss_kb $pids)
    fd1=$(fds $pids)
    kill $idle 2>/dev/null || true
    wait $idle 2>/dev/null || true
    record "idle memory per connection (KiB)" "$target" 1 "$(python3 -c "print(($rss1 - $rss0) / $IDLE)")"
    record "descriptors per idle connection" "$target" 1 "$(python3 -c "print(($fd1 - $fd0) / $IDLE)")"
done

cp "$RESULTS" "$ROOT/bench/RESULTS.tsv"
python3 "$ROOT/bench/report.py" "$RESULTS" "$ROOT/bench/RESULTS.md" \
    "${AB:+AB=$AB }${ONLY:+ONLY=\"$ONLY\" }${PERF:+PERF=$PERF }bench/run.sh (RUNS=$RUNS SECS=$SECS IDLE=$IDLE SYSCALL_SECS=$SYSCALL_SECS)" "$CORES" "$COST_NOTE" \
    "$("$RELAYD" --version 2>/dev/null || echo relayd) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' with changes')" \
    ${AB:+"relayd-b: $("$AB" --version 2>/dev/null || echo relayd), $AB"} \
    "$(haproxy -v | head -1)" "$(nginx -v 2>&1)" "$(socat -V | sed -n 2p)" "$(iperf3 --version | head -1)"
echo "wrote bench/RESULTS.md"
