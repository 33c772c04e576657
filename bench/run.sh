#!/usr/bin/env bash
# relayd's benchmark: relayd side by side with HAProxy (with and without splice), nginx stream
# and socat, and with no relay at all, in one run on loopback. Same backends, same load tools,
# the same worker count for every relay (the core count). Every process is started and stopped
# here, by PID; every load loop is bounded in time. Writes bench/RESULTS.md, and the raw
# figures of every run to bench/RESULTS.tsv.
#
#   bench/run.sh                 # RUNS=3 SECS=5 IDLE=9000 by default
#   RUNS=5 SECS=10 bench/run.sh
#   AB=/path/to/other/relayd bench/run.sh   # A/B: that build runs beside this one as "relayd-b"
#   ONLY="direct relayd relayd-b haproxy nginx" bench/run.sh   # a subset of the targets
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
RELAYD=$ROOT/target/release/relayd
LOADGEN=$ROOT/target/release/examples/loadgen

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
declare -A BASE=([direct]=9300 [relayd]=9310 [haproxy]=9320 [haproxy-splice]=9330 [nginx]=9340 [socat]=9350 [relayd-b]=9360)
TARGETS=(direct relayd haproxy haproxy-splice nginx socat)
[ -n "${AB:-}" ] && TARGETS=(direct relayd relayd-b haproxy haproxy-splice nginx socat)
[ -n "${ONLY:-}" ] && read -r -a TARGETS <<<"$ONLY"

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

relayd_cfg() { # base
    cat <<EOF
(log_level: "warn", workers: $CORES, routes: [
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

RESULTS=$WORK/results.tsv
jiffies() { awk '/^cpu / {print $2+$3+$4+$7+$8 ", " $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; } # busy, all (stolen time counts in all, not as busy)
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; }
field() { sed -E "s/.*$1=([^ ]+).*/\\1/"; }

# --- (a) bulk throughput, (b) ping-pong, (c) new connections, (e) UDP -----------------------
for run in $(seq 1 "$RUNS"); do
    for target in "${TARGETS[@]}"; do
        base=${BASE[$target]}
        iperf=$((base + 1))
        [ "$target" = direct ] && iperf=9302
        for mode in "1 stream:" "8 streams:-P 8" "reverse:-R"; do
            name=${mode%%:*}
            before=$(jiffies)
            bps=$(iperf3 -c 127.0.0.1 -p "$iperf" -t "$SECS" ${mode#*:} -J 2>/dev/null |
                python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)' || echo 0)
            after=$(jiffies)
            record "tcp $name (Gbit/s)" "$target" "$run" "$bps"
            # What the whole machine (client, relay, backend, kernel) spent per Gbit/s; a run
            # that moved nothing has no such figure.
            record "tcp $name machine CPU (% of a core per Gbit/s)" "$target" "$run" \
                "$(python3 -c "b0, t0 = $before; b1, t1 = $after; print(100 * $CORES * (b1 - b0) / (t1 - t0) / $bps if $bps > 0 else '')")"
        done
        out=$("$LOADGEN" tcp-pingpong 127.0.0.1:$base 32 "$SECS" 64)
        record "ping-pong round trips/s" "$target" "$run" "$(field round_trips_per_s <<<"$out")"
        record "ping-pong p50 (µs)" "$target" "$run" "$(field p50_us <<<"$out")"
        record "ping-pong p99 (µs)" "$target" "$run" "$(field p99_us <<<"$out")"
        out=$("$LOADGEN" tcp-conns 127.0.0.1:$base 64 "$SECS")
        record "new connections/s" "$target" "$run" "$(field connections_per_s <<<"$out")"
        record "new connections failed" "$target" "$run" "$(field failed <<<"$out")"
        case $target in
        direct) udp=9301 ;; relayd) udp=9312 ;; relayd-b) udp=9362 ;; nginx) udp=9342 ;; *) udp= ;;
        esac
        if [ -n "$udp" ]; then
            # Two client shapes: 16 blocking threads with a socket each, and one event-loop
            # thread driving 16 sockets.
            out=$("$LOADGEN" udp-pingpong 127.0.0.1:$udp 16 "$SECS" 64)
            record "UDP round trips/s" "$target" "$run" "$(field round_trips_per_s <<<"$out")"
            out=$("$LOADGEN" udp-pingpong-loop 127.0.0.1:$udp 16 "$SECS" 64)
            record "UDP round trips/s, one event loop" "$target" "$run" "$(field round_trips_per_s <<<"$out")"
        fi
    done
done

# --- (d) memory and descriptors per idle connection ------------------------------------------
pids_of() { # the relay's processes: nginx is a master and its workers
    local pid
    pid=$(cat "$WORK/$1.pid")
    echo "$pid" $(pgrep -P "$pid" || true)
}
rss_kb() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' /proc/$p/status))); done; echo $t; }
fds() { local t=0; for p in "$@"; do t=$((t + $(ls /proc/$p/fd | wc -l))); done; echo $t; }
IDLE_TARGETS=(relayd haproxy nginx)
[ -n "${AB:-}" ] && IDLE_TARGETS=(relayd relayd-b haproxy nginx)
for target in "${IDLE_TARGETS[@]}"; do
    [[ " ${TARGETS[*]} " == *" $target "* ]] || continue
    # A fresh holder each time: it keeps every connection it ever took, and two targets'
    # worth would reach its descriptor limit.
    kill "$(cat "$WORK/backend-hold.pid")" 2>/dev/null || true
    wait "$(cat "$WORK/backend-hold.pid")" 2>/dev/null || true
    start backend-hold "$LOADGEN" tcp-hold 127.0.0.1:9303
    wait_port tcp 9303
    port=$((${BASE[$target]} + 3))
    pids=$(pids_of "$target")
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
    "${AB:+AB=$AB }${ONLY:+ONLY=\"$ONLY\" }bench/run.sh (RUNS=$RUNS SECS=$SECS IDLE=$IDLE)" "$CORES" \
    "$("$RELAYD" --version 2>/dev/null || echo relayd) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' with changes')" \
    ${AB:+"relayd-b: $("$AB" --version 2>/dev/null || echo relayd), $AB"} \
    "$(haproxy -v | head -1)" "$(nginx -v 2>&1)" "$(socat -V | sed -n 2p)" "$(iperf3 --version | head -1)"
echo "wrote bench/RESULTS.md"
