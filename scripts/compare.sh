#!/usr/bin/env bash
# Throughput of tun-balancer side by side with its peers, in one go (issue 19): for each mode a
# FRESH namespace topology (client -> balancer -> 3 backends, the one examples/tests/common builds),
# then TCP with 1 and 8 streams (iperf3 -t 5), 64-byte UDP packets per second delivered (lb-udpgen
# through the balancer to a sink on every backend) and per balancer CPU-second, new connections per
# second (wrk -c 32 -d 5, Connection: close, nginx on the backends) and balancer CPU-seconds per
# 10 000 connections. Prints one table (and writes it, with the raw figures, under $OUT).
#
# Modes: veth     no balancer: lb-udpgen (and iperf3, for comparison) straight over one veth pair
#                 into a sink: what the generator can offer at all
#        nft      kernel nftables full NAT (dnat to jhash ... map + snat), the kernel's own CPU
#        haproxy  HAProxy mode tcp, nbthread 1 (no UDP)
#        nat dnat tunnel   tun-balancer in that mode (tunnel: IPIP, lb-decap or the kernel's ipip
#                 on the backends; or GUE with TUNNEL=gue, lb-decap)
#        dr       tun-balancer in mode dr on a TAP port of the backends' bridge (destination MAC
#                 rewrite; the backends hold the VIP on lo and answer the client directly, so only
#                 the client's direction crosses the balancer). No peer here: this kernel has no
#                 IPVS. Not in the default set.
#
# Needs root (network namespaces). Every address is a documentation range inside namespaces this
# script creates (cmp-<pid>-*) and removes on exit; nothing is sent outside them. Not run in CI.
#
# Knobs (environment):
#   LB_BIN    tun-balancer binary (default: built in release from this repository)
#   QUEUES    balancer.queues of tun-balancer (default 1)
#   ROUNDS    rounds of every mode (default 1); the table shows min-max over rounds
#   MODES     subset, space-separated (default: "veth nft haproxy nat dnat tunnel")
#   OFFLOAD   on|off: sets balancer.offload = true|false, only if this tun-balancer accepts the
#             key (checked with --check); otherwise ignored with a note
#   SECONDS_RUN  seconds of each measurement (default 5)
#   UDP_SOCKETS  lb-udpgen sockets = flows (default 16); UDP_THREADS its sending threads (default 1);
#   UDP_BATCH  datagrams per sendmmsg call, all on one socket (= one flow) (default 64);
#   UDP_RATE  its cap in packets/s (default 0: none)
#   OUT       directory for the raw results (default: a temporary directory, kept)
#   PERF      set: a system-wide perf profile of every UDP run through a balancer, under $OUT
#   RPS       a CPU mask (hex) for lb0's receive packet steering: the kernel's forwarding of the
#             packets tun-balancer writes then runs in softirq on those CPUs instead of inside
#             its write() (default: unset, no steering)
#   IO_URING  set: balancer.io_uring = true (each batch's packets written with one io_uring
#             submission instead of a writev each)
#   IO        tun-rs: balancer.io = "tun-rs" (the device read and written through the tun-rs
#             crate: super-packets cut on the way in, coalesced on the way out; default: the
#             balancer's own device code)
#   TUNNEL    ipip|gue: the encapsulation of mode tunnel (default ipip; gue: lb-decap on the
#             backends always, --gue-port 6080)
#   DECAP_BIN lb-decap binary for the backends (default: built in release from this repository)
#   UDP_COALESCE  off: balancer.udp_coalesce = false (each datagram written on its own instead of
#             a batch's runs of one flow's datagrams as one UDP GSO super-packet; default: the
#             balancer's default, on)
#   FAST_PATH off: balancer.fast_path = 0 (every packet through the data path's lock; default:
#             the balancer's default, 1024 plans per queue thread)
#   GRO       set: GRO with UDP GRO forwarding on the balancer's ingress veth (c1), so the kernel
#             hands a TUN with USO one super-packet per flow and NAPI poll instead of each
#             datagram (default: unset, the veth's defaults)
#
# Also reported for tun-balancer: its data-path lock's use during the TCP 8-stream and UDP runs
# (held and waited seconds, from its stats) as a share of its CPU time: the serial part of the
# work, which bounds how far more queues can scale.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "compare: needs root (it creates network namespaces); run: sudo $0" >&2
  exit 1
fi
cd "$(dirname "$0")/.."
REPO=$PWD

QUEUES=${QUEUES:-1}
ROUNDS=${ROUNDS:-1}
MODES=${MODES:-veth nft haproxy nat dnat tunnel}
OFFLOAD=${OFFLOAD:-}
RPS=${RPS:-}
GRO=${GRO:-}
IO_URING=${IO_URING:-}
IO=${IO:-}
UDP_COALESCE=${UDP_COALESCE:-}
FAST_PATH=${FAST_PATH:-}
TUNNEL=${TUNNEL:-ipip}
case $TUNNEL in ipip | gue) ;; *) echo "compare: TUNNEL must be ipip or gue" >&2; exit 1 ;; esac
T=${SECONDS_RUN:-5}
UDP_SOCKETS=${UDP_SOCKETS:-16}
UDP_RATE=${UDP_RATE:-0}
UDP_THREADS=${UDP_THREADS:-1}
UDP_BATCH=${UDP_BATCH:-64}
OUT=${OUT:-$(mktemp -d /tmp/cmp-results.XXXXXX)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

need_tools() {
  local missing=()
  for t in "$@"; do command -v "$t" >/dev/null || missing+=("$t"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "compare: missing ${missing[*]} (apt-get install iperf3 wrk nginx-light haproxy nftables python3 iproute2)" >&2
    exit 1
  fi
}
need_tools ip iperf3 wrk python3 getconf
for m in $MODES; do
  case $m in
    veth | nat | dnat | tunnel) ;;
    dr) need_tools bridge ;;
    nft) need_tools nft ;;
    haproxy) need_tools haproxy ;;
    *) echo "compare: unknown mode '$m' (veth nft haproxy nat dnat tunnel dr)" >&2; exit 1 ;;
  esac
  case $m in nft | haproxy | nat | dnat | tunnel | dr) need_tools nginx ;; esac
done

TARGET=${CARGO_TARGET_DIR:-$REPO/target}
if [ -z "${LB_BIN:-}" ]; then
  echo "== building tun-balancer, lb-decap, lb-udpgen (release)"
  cargo build --release -q -p lb-examples --bin tun-balancer --bin lb-decap --bin lb-udpgen
  LB_BIN=$TARGET/release/tun-balancer
else
  echo "== building lb-decap, lb-udpgen (release); tun-balancer: $LB_BIN"
  cargo build --release -q -p lb-examples --bin lb-decap --bin lb-udpgen
fi
DECAP=${DECAP_BIN:-$TARGET/release/lb-decap}
UDPGEN=$TARGET/release/lb-udpgen
HZ=$(getconf CLK_TCK)

P="cmp-$$"
C="$P-cli" L="$P-lb"
B=("$P-b1" "$P-b2" "$P-b3")
WORK=$(mktemp -d /tmp/cmp-work.XXXXXX)
VIP=203.0.113.10 SNAT=203.0.113.100
# Mode dr: the balancer's TAP address, reached through a static neighbour the VIP route uses.
LB_MAC=02:00:5e:10:00:01
PIDS=()

ns_exists() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

teardown() { # kills what runs in our namespaces and removes them
  local p ns
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  PIDS=()
  sleep 0.3
  for ns in "$C" "$L" "${B[@]}"; do
    if ns_exists "$ns"; then
      ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
}
cleanup() {
  set +e
  teardown
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the balancer's config knobs -------------------------------------------------------------
OFFLOAD_LINE=""
if [ -n "$OFFLOAD" ]; then
  case $OFFLOAD in on) v=true ;; off) v=false ;; *) echo "compare: OFFLOAD must be on or off" >&2; exit 1 ;; esac
  printf '[balancer]\ndevice = "lb0"\nsnat_addrs = ["%s"]\nconntrack_capacity = 1000\noffload = %s\n[[service]]\nvip = "%s:80"\nproto = "tcp"\nmode = "nat"\n[[service.backend]]\naddr = "198.51.100.11:80"\n' \
    "$SNAT" "$v" "$VIP" > "$WORK/offload-check.toml"
  if "$LB_BIN" --config "$WORK/offload-check.toml" --check >/dev/null 2>&1; then
    OFFLOAD_LINE="offload = $v"
    echo "== OFFLOAD=$OFFLOAD: balancer.offload = $v"
  else
    echo "== OFFLOAD=$OFFLOAD ignored: this tun-balancer does not accept balancer.offload"
  fi
fi
case $UDP_COALESCE in
  "" | on) ;;
  off) OFFLOAD_LINE="$OFFLOAD_LINE
udp_coalesce = false" ;;
  *) echo "compare: UDP_COALESCE must be on or off" >&2; exit 1 ;;
esac
case $FAST_PATH in
  "" | on) ;;
  off) OFFLOAD_LINE="$OFFLOAD_LINE
fast_path = 0" ;;
  *) echo "compare: FAST_PATH must be on or off" >&2; exit 1 ;;
esac
if [ -n "$IO_URING" ]; then
  OFFLOAD_LINE="$OFFLOAD_LINE
io_uring = true"
fi
case $IO in
  "" | direct) ;;
  tun-rs) OFFLOAD_LINE="$OFFLOAD_LINE
io = \"tun-rs\"" ;;
  *) echo "compare: IO must be direct or tun-rs" >&2; exit 1 ;;
esac

# --- topology ----------------------------------------------------------------------------------
topology() { # the standard topology of examples/tests/common (IPv4 only)
  local ns i
  for ns in "$C" "$L" "${B[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
  ip -n "$L" link add c1 type veth peer name c0 netns "$C"
  ip -n "$C" addr add 192.0.2.2/24 dev c0 && ip -n "$C" link set c0 up
  ip -n "$L" addr add 192.0.2.1/24 dev c1 && ip -n "$L" link set c1 up
  ip -n "$C" route add default via 192.0.2.1
  ip -n "$L" link add br0 type bridge && ip -n "$L" link set br0 up
  ip -n "$L" addr add 198.51.100.1/24 dev br0
  for i in 1 2 3; do
    ns=${B[$((i - 1))]}
    ip -n "$L" link add "b$i" type veth peer name e0 netns "$ns"
    ip -n "$L" link set "b$i" master br0 up
    ip -n "$ns" addr add "198.51.100.1$i/24" dev e0 && ip -n "$ns" link set e0 up
    ip -n "$ns" route add default via 198.51.100.1
  done
  if [ -n "$GRO" ]; then
    ip netns exec "$L" ethtool -K c1 gro on rx-udp-gro-forwarding on >/dev/null
  fi
  ip netns exec "$L" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
  # Every mode alike: a wide ephemeral port range and TIME_WAIT reuse for whoever opens the
  # connections (the client; HAProxy towards the backends).
  for ns in "$C" "$L"; do
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_local_port_range="1024 65535" net.ipv4.tcp_tw_reuse=1
  done
}

veth_topology() { # client -- one veth pair -- one sink namespace (b1)
  ip netns add "$C"; ip -n "$C" link set lo up
  ip netns add "${B[0]}"; ip -n "${B[0]}" link set lo up
  ip -n "$C" link add c0 type veth peer name e0 netns "${B[0]}"
  ip -n "$C" addr add 192.0.2.2/24 dev c0 && ip -n "$C" link set c0 up
  ip -n "${B[0]}" addr add 192.0.2.3/24 dev e0 && ip -n "${B[0]}" link set e0 up
}

spawn() { # ns logname argv...: starts a process in a namespace, records its pid in $BG_PID
  local ns=$1 log=$2
  shift 2
  ip netns exec "$ns" "$@" >"$WORK/$log.log" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
}

wait_listen() { # ns proto port
  local i
  for i in $(seq 100); do
    ip netns exec "$1" ss -Hln"${2:0:1}" "sport = :$3" | grep -q . && return 0
    sleep 0.1
  done
  echo "compare: nothing listens on $2/$3 in $1" >&2
  return 1
}

backends() { # iperf3 and nginx on every backend
  local i ns
  for i in 1 2 3; do
    ns=${B[$((i - 1))]}
    spawn "$ns" "iperf3-b$i" iperf3 -s -p 5201
    mkdir -p "$WORK/nginx-b$i"
    cat > "$WORK/nginx-b$i/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx-b$i/nginx.pid;
error_log $WORK/nginx-b$i/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx-b$i;
  proxy_temp_path $WORK/nginx-b$i;
  fastcgi_temp_path $WORK/nginx-b$i;
  uwsgi_temp_path $WORK/nginx-b$i;
  scgi_temp_path $WORK/nginx-b$i;
  server {
    listen 8081 backlog=4096 reuseport;
    location / { return 200 "b$i\n"; }
  }
}
NGINX
    spawn "$ns" "nginx-b$i" nginx -c "$WORK/nginx-b$i/nginx.conf" -e "$WORK/nginx-b$i/error.log"
  done
  for i in 1 2 3; do
    wait_listen "${B[$((i - 1))]}" tcp 5201
    wait_listen "${B[$((i - 1))]}" tcp 8081
  done
}

# --- CPU accounting ----------------------------------------------------------------------------
proc_cpu() { # pid: utime+stime+cutime+cstime in ticks (0 when gone)
  local f
  f=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  f=${f##*) }
  # after "comm) ": state is field 1, utime 12, stime 13, cutime 14, cstime 15
  awk '{print $12 + $13 + $14 + $15}' <<<"$f"
}
ns_cpu() { # ns...: CPU ticks of every process now in these namespaces
  local ns p sum=0
  for ns in "$@"; do
    ns_exists "$ns" || continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do sum=$((sum + $(proc_cpu "$p"))); done
  done
  echo "$sum"
}
machine_cpu() { # non-idle ticks of the whole machine (/proc/stat: all but idle and iowait)
  awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}
ticks_to_s() { python3 -c "print($1 / $HZ)"; }

# --- measurements ------------------------------------------------------------------------------
iperf() { # target args...: Gbit/s received
  local target=$1
  shift
  ip netns exec "$C" timeout $((T + 30)) iperf3 -J -c "$target" -p 5201 -t "$T" "$@" > "$WORK/iperf.json" 2>&1 || true
  python3 - "$WORK/iperf.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
    print(round(j["end"]["sum_received"]["bits_per_second"] / 1e9, 2))
except Exception:
    print("null")
PY
}

# UDP: sinks on the backends (or the veth peer), the generator in the client namespace.
# Sets UDP_JSON: {"sent_pps", "delivered_pps", "gen_cpu_s", "sink_cpu_s", "machine_cpu_s", "tools_cpu_s"}
udp_run() { # target sink_namespaces...
  local target=$1 ns sinks=() i=0 m0 m1 t0 t1
  shift
  for ns in "$@"; do
    i=$((i + 1))
    spawn "$ns" "sink$i" "$UDPGEN" sink --listen 0.0.0.0:5300
    sinks+=("$BG_PID")
  done
  for ns in "$@"; do wait_listen "$ns" udp 5300; done
  local perf_pid=""
  if [ -n "${PERF:-}" ] && [ "$MODE" != veth ]; then
    # System-wide profile of the UDP run (the machine's other load included: sort by comm).
    perf record -q -a -g -F 499 -o "$OUT/perf-$MODE-$ROUND.data" -- sleep "$T" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  t0=$(ns_cpu "$@")
  m0=$(machine_cpu)
  ip netns exec "$C" "$UDPGEN" send --dst "$target:5300" --size 64 --sockets "$UDP_SOCKETS" \
    --threads "$UDP_THREADS" --batch "$UDP_BATCH" --seconds "$T" --rate "$UDP_RATE" > "$WORK/gen.json"
  sleep 0.5
  m1=$(machine_cpu)
  t1=$(ns_cpu "$@")
  if [ -n "$perf_pid" ]; then
    wait "$perf_pid" || true
    perf report -i "$OUT/perf-$MODE-$ROUND.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep '%' | head -25 > "$OUT/perf-$MODE-$ROUND.comm-dso.txt" || true
    perf report -i "$OUT/perf-$MODE-$ROUND.data" --no-children --sort sym --stdio -g none 2>/dev/null \
      | grep -v '^#' | grep '%' | head -40 > "$OUT/perf-$MODE-$ROUND.sym.txt" || true
  fi
  for p in "${sinks[@]}"; do kill -TERM "$p"; done
  for p in "${sinks[@]}"; do wait "$p" 2>/dev/null || true; done
  UDP_JSON=$(python3 - "$WORK/gen.json" "$((m1 - m0))" "$((t1 - t0))" "$HZ" "$WORK"/sink*.log <<'PY'
import json, sys
gen = json.load(open(sys.argv[1]))
machine, tools, hz = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sinks = [json.loads(open(f).read().strip().splitlines()[-1]) for f in sys.argv[5:]]
got = sum(s["packets"] for s in sinks)
print(json.dumps({
    "sent_pps": gen["pps"], "delivered_pps": got / gen["seconds"], "delivered": got,
    "gen_cpu_s": gen["cpu_s"], "sink_cpu_s": sum(s["cpu_s"] for s in sinks),
    "machine_cpu_s": machine / hz, "tools_cpu_s": tools / hz + gen["cpu_s"],
}))
PY
)
  rm -f "$WORK"/sink*.log
}

# Connections: wrk in the client namespace, run under a shell whose children's CPU we read.
# Sets HTTP_JSON: {"conn_per_s", "requests", "errors", "machine_cpu_s", "tools_cpu_s"}
http_run() { # target
  local m0 m1 t0 t1
  t0=$(ns_cpu "${B[@]}")
  m0=$(machine_cpu)
  ip netns exec "$C" bash -c "timeout $((T + 30)) wrk -t1 -c32 -d${T}s -H 'Connection: close' http://$1:8081/ > $WORK/wrk.txt 2>&1; \
    s=\$(cat /proc/\$\$/stat); s=\${s##*) }; set -- \$s; echo \$((\${14} + \${15})) > $WORK/wrk.cpu" || true
  m1=$(machine_cpu)
  t1=$(ns_cpu "${B[@]}")
  HTTP_JSON=$(python3 - "$WORK/wrk.txt" "$WORK/wrk.cpu" "$((m1 - m0))" "$((t1 - t0))" "$HZ" <<'PY'
import json, re, sys
txt = open(sys.argv[1]).read()
machine, backends, hz = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    wrk = int(open(sys.argv[2]).read().split()[0])
except Exception:
    wrk = 0
m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", txt)
reqs, secs = (int(m.group(1)), float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)) if m else (0, 1.0)
errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", txt))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", txt)
print(json.dumps({
    "conn_per_s": reqs / secs, "requests": reqs, "errors": errs + (int(non2xx.group(1)) if non2xx else 0),
    "machine_cpu_s": machine / hz, "tools_cpu_s": (backends + wrk) / hz,
}))
PY
)
}

record() { # mode round json-fields...
  python3 - "$@" >> "$RESULTS" <<'PY'
import json, sys
mode, rnd = sys.argv[1], int(sys.argv[2])
r = {"mode": mode, "round": rnd, "load1": float(open("/proc/loadavg").read().split()[0])}
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    r[k] = json.loads(v)
print(json.dumps(r))
PY
}

# --- modes -------------------------------------------------------------------------------------
lb_config() { # mode: tun-balancer's configuration (iperf3 by source, UDP and HTTP per flow)
  local mode=$1 port
  printf '[balancer]\ndevice = "lb0"\nsnat_addrs = ["%s"]\nconntrack_capacity = 1000000\nstats = "127.0.0.1:9100"\nqueues = %s\nmtu = 1500\n%s\n' \
    "$SNAT" "$QUEUES" "$OFFLOAD_LINE"
  if [ "$mode" = dr ]; then printf 'mac = "%s"\n' "$LB_MAC"; fi
  for svc in "tcp 5201 source" "udp 5300 none" "tcp 8081 none"; do
    set -- $svc
    printf '\n[[service]]\nvip = "%s:%s"\nproto = "%s"\nmode = "%s"\naffinity = "%s"\n' "$VIP" "$2" "$1" "$mode" "$3"
    [ "$mode" = tunnel ] && printf 'tunnel = "%s"\n' "$TUNNEL"
    printf '[service.health]\nkind = "none"\n'
    for i in 1 2 3; do
      port=$2
      [ "$mode" = tunnel ] || [ "$mode" = dr ] && port=0
      printf '[[service.backend]]\naddr = "198.51.100.1%s:%s"\n' "$i" "$port"
      if [ "$mode" = dr ]; then printf 'mac = "02:00:00:00:00:1%s"\n' "$i"; fi
    done
  done
}

start_lb() { # mode: starts tun-balancer, sets BAL_PID
  local mode=$1 i ns
  if [ "$mode" = tunnel ]; then
    for i in 1 2 3; do
      ns=${B[$((i - 1))]}
      ip -n "$ns" addr add "$VIP/32" dev lo
      ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.lo.rp_filter=0
      if [ "$TUNNEL" = gue ]; then
        spawn "$ns" "decap-b$i" "$DECAP" --device dc0 --gue-port 6080 --allow 203.0.113.0/24
        for _ in $(seq 100); do ip -n "$ns" link show dc0 2>/dev/null | grep -q UP && break; sleep 0.1; done
        ip netns exec "$ns" sysctl -qw net.ipv4.conf.dc0.rp_filter=0
        [ "$i" = 1 ] && echo "   gue: lb-decap decapsulates on the backends (its CPU is the backends')"
      elif ip -n "$ns" link add cmpprobe0 type ipip 2>/dev/null; then
        ip -n "$ns" link del cmpprobe0
        ip -n "$ns" link set tunl0 up
        ip netns exec "$ns" sysctl -qw net.ipv4.conf.tunl0.rp_filter=0
        echo "   b$i: the kernel's ipip decapsulates"
      else
        spawn "$ns" "decap-b$i" "$DECAP" --device dc0 --allow 203.0.113.0/24
        for _ in $(seq 100); do ip -n "$ns" link show dc0 2>/dev/null | grep -q UP && break; sleep 0.1; done
        ip netns exec "$ns" sysctl -qw net.ipv4.conf.dc0.rp_filter=0
        [ "$i" = 1 ] && echo "   no ipip in this kernel: lb-decap decapsulates on the backends (its CPU is the backends')"
      fi
    done
  fi
  if [ "$mode" = dr ]; then
    for i in 1 2 3; do
      ns=${B[$((i - 1))]}
      ip -n "$ns" link set e0 address "02:00:00:00:00:1$i"
      ip -n "$ns" addr add "$VIP/32" dev lo
      ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.conf.lo.rp_filter=0 \
        net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2
    done
  fi
  lb_config "$mode" > "$WORK/lb.toml"
  spawn "$L" balancer "$LB_BIN" --config "$WORK/lb.toml"
  BAL_PID=$BG_PID
  for _ in $(seq 100); do ip -n "$L" link show lb0 2>/dev/null | grep -q UP && break; sleep 0.1; done
  ip -n "$L" link show lb0 | grep -q UP || { cat "$WORK/balancer.log" >&2; return 1; }
  ip netns exec "$L" sysctl -qw net.ipv4.conf.lb0.rp_filter=0
  ip -n "$L" link set lb0 txqueuelen 10000
  if [ -n "$RPS" ]; then
    local q
    for q in $(ip netns exec "$L" sh -c 'ls -d /sys/class/net/lb0/queues/rx-*'); do
      ip netns exec "$L" sh -c "echo $RPS > $q/rps_cpus"
    done
  fi
  if [ "$mode" = dr ]; then
    # A TAP port of the backends' bridge: the VIP is routed to its MAC; the backends answer
    # the client directly, through br0.
    ip -n "$L" link set lb0 master br0
    ip netns exec "$L" bridge fdb add "$LB_MAC" dev lb0 master static
    ip -n "$L" neigh add 198.51.100.254 lladdr "$LB_MAC" dev br0 nud permanent
    ip -n "$L" route add "$VIP/32" via 198.51.100.254 dev br0
    return 0
  fi
  ip -n "$L" route add "$VIP/32" dev lb0
  ip -n "$L" route add "$SNAT/32" dev lb0
  if [ "$mode" = dnat ]; then
    # Single rewrite: replies from the backends go back through the balancer.
    ip -n "$L" rule add iif br0 lookup 100
    ip -n "$L" route add default dev lb0 table 100
  fi
}

start_nft() {
  cat > "$WORK/cmp.nft" <<NFT
table ip cmpnat {
  chain pre {
    type nat hook prerouting priority dstnat;
    ip daddr $VIP tcp dport 5201 dnat to jhash ip saddr mod 3 map { 0 : 198.51.100.11, 1 : 198.51.100.12, 2 : 198.51.100.13 }
    ip daddr $VIP meta l4proto { tcp, udp } th dport { 5300, 8081 } dnat to jhash ip saddr . th sport mod 3 map { 0 : 198.51.100.11, 1 : 198.51.100.12, 2 : 198.51.100.13 }
  }
  chain post {
    type nat hook postrouting priority srcnat;
    ip saddr 192.0.2.0/24 ip daddr 198.51.100.0/24 snat to $SNAT
  }
}
NFT
  ip netns exec "$L" nft -f "$WORK/cmp.nft"
  # The SNAT address is not local: replies to it come back on br0 and conntrack undoes both NATs.
}

start_haproxy() { # sets BAL_PID
  ip -n "$L" addr add "$VIP/32" dev lo
  cat > "$WORK/haproxy.cfg" <<HAP
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend iperf
  bind $VIP:5201
  default_backend iperf
backend iperf
  balance source
  server b1 198.51.100.11:5201
  server b2 198.51.100.12:5201
  server b3 198.51.100.13:5201
frontend http
  bind $VIP:8081
  default_backend http
backend http
  balance roundrobin
  server b1 198.51.100.11:8081
  server b2 198.51.100.12:8081
  server b3 198.51.100.13:8081
HAP
  spawn "$L" haproxy haproxy -db -f "$WORK/haproxy.cfg"
  BAL_PID=$BG_PID
  wait_listen "$L" tcp 8081
}

run_mode() { # mode round
  local mode=$1 rnd=$2 c0 c1 tcp1 tcp8
  MODE=$mode ROUND=$rnd
  echo "== round $rnd, mode $mode: fresh namespaces $P-*"
  teardown
  if [ "$mode" = veth ]; then
    veth_topology
    udp_run 192.0.2.3 "${B[0]}"
    local gen=$UDP_JSON
    # iperf3's own 64-byte UDP rate on the same pair, for comparison.
    spawn "${B[0]}" iperf3-b1 iperf3 -s -p 5201
    wait_listen "${B[0]}" tcp 5201
    ip netns exec "$C" timeout $((T + 30)) iperf3 -J -c 192.0.2.3 -p 5201 -u -l 64 -b 0 -t "$T" > "$WORK/iperf-udp.json" 2>&1 || true
    local ipu
    ipu=$(python3 - "$WORK/iperf-udp.json" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[1]))["end"]["sum"]
    print(json.dumps({"sent_pps": s["packets"] / s["seconds"], "delivered_pps": s["packets"] * (1 - s["lost_percent"] / 100) / s["seconds"]}))
except Exception:
    print("null")
PY
)
    record veth "$rnd" "udp=$gen" "iperf_udp=$ipu"
    return
  fi
  topology
  backends
  BAL_PID=""
  case $mode in
    nft) start_nft ;;
    haproxy) start_haproxy ;;
    nat | dnat | tunnel | dr) start_lb "$mode" ;;
  esac
  sleep 0.5
  bal_cpu() { if [ -n "$BAL_PID" ]; then proc_cpu "$BAL_PID"; else echo 0; fi; }
  lb_rx() { # tun-balancer's rx_packets counter (0 for the peers)
    ip netns exec "$L" curl -s --max-time 3 http://127.0.0.1:9100/ 2>/dev/null \
      | python3 -c 'import json,sys; print(json.load(sys.stdin).get("rx_packets", 0))' 2>/dev/null || echo 0
  }
  tun_drops() { ip netns exec "$L" cat /sys/class/net/lb0/statistics/tx_dropped 2>/dev/null || echo 0; }
  lb_lock() { # tun-balancer's data-path lock counters: "taken held_ns wait_ns" (zeros for the peers
    # and for a tun-balancer without them)
    ip netns exec "$L" curl -s --max-time 3 http://127.0.0.1:9100/ 2>/dev/null \
      | python3 -c 'import json,sys; d=json.load(sys.stdin).get("datapath", {}); print(d.get("lock_taken", 0), d.get("lock_held_ns", 0), d.get("lock_wait_ns", 0))' 2>/dev/null || echo 0 0 0
  }
  lock_delta() { # "before" "after" -> JSON with the lock's use in between
    python3 -c 'import sys; a=[int(x) for x in sys.argv[1].split()]; b=[int(x) for x in sys.argv[2].split()]; print("{\"taken\": %d, \"held_s\": %.4f, \"wait_s\": %.4f}" % (b[0]-a[0], (b[1]-a[1])/1e9, (b[2]-a[2])/1e9))' "$1" "$2"
  }
  # The balancer's CPU during each TCP run too (raw results only: Gbit/s per CPU-second).
  local t0 t1 tcp1_bal tcp8_bal
  t0=$(bal_cpu)
  tcp1=$(iperf "$VIP")
  t1=$(bal_cpu)
  tcp1_bal=$(ticks_to_s $((t1 - t0)))
  local k0 k1 tcp8_lock=null udp_lock=null
  k0=$(lb_lock)
  tcp8=$(iperf "$VIP" -P 8)
  t0=$(bal_cpu)
  tcp8_bal=$(ticks_to_s $((t0 - t1)))
  sleep 0.2 # the data-path threads flush their lock times every 10 ms of traffic, or when idle
  k1=$(lb_lock)
  [ -n "$BAL_PID" ] && tcp8_lock=$(lock_delta "$k0" "$k1")
  local udp=null udp_bal=null
  local udp_lb=null r0 r1 d0 d1
  if [ "$mode" != haproxy ]; then
    r0=$(lb_rx) d0=$(tun_drops) k0=$(lb_lock)
    c0=$(bal_cpu)
    udp_run "$VIP" "${B[@]}"
    c1=$(bal_cpu)
    r1=$(lb_rx) d1=$(tun_drops) k1=$(lb_lock)
    [ -n "$BAL_PID" ] && udp_lock=$(lock_delta "$k0" "$k1")
    [ -n "$BAL_PID" ] && ip netns exec "$L" curl -s --max-time 3 http://127.0.0.1:9100/ > "$OUT/stats-udp-$mode-$rnd.json" 2>/dev/null || true
    udp=$UDP_JSON
    udp_bal=$(ticks_to_s $((c1 - c0)))
    # tun-balancer: packets it read and packets the kernel dropped because its TUN queue was full.
    [ -n "$BAL_PID" ] && udp_lb="{\"rx_packets\": $((r1 - r0)), \"tun_queue_drops\": $((d1 - d0))}"
  fi
  c0=$(bal_cpu)
  http_run "$VIP"
  c1=$(bal_cpu)
  local http=$HTTP_JSON http_bal
  http_bal=$(ticks_to_s $((c1 - c0)))
  [ -n "$BAL_PID" ] || { http_bal=null; udp_bal=null; tcp1_bal=null; tcp8_bal=null; }
  local stats=null
  if [ "$mode" = nat ] || [ "$mode" = dnat ] || [ "$mode" = tunnel ] || [ "$mode" = dr ]; then
    stats=$(ip netns exec "$L" curl -s --max-time 3 http://127.0.0.1:9100/ 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("rx_packets","tx_packets","drops") if k in s}))' 2>/dev/null || echo null)
  fi
  local tun_drops
  tun_drops=$(ip netns exec "$L" cat /sys/class/net/lb0/statistics/tx_dropped 2>/dev/null || echo null)
  record "$mode" "$rnd" "tcp1=$tcp1" "tcp8=$tcp8" "tcp1_bal_cpu_s=$tcp1_bal" "tcp8_bal_cpu_s=$tcp8_bal" "tcp8_lock=$tcp8_lock" "udp=$udp" "udp_bal_cpu_s=$udp_bal" "udp_lb=$udp_lb" "udp_lock=$udp_lock" \
    "http=$http" "http_bal_cpu_s=$http_bal" "lb_stats=$stats" "lb0_tx_dropped=$tun_drops"
}

echo "== machine: $(nproc) cores, Linux $(uname -r); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== QUEUES=$QUEUES ROUNDS=$ROUNDS MODES='$MODES' T=${T}s UDP_SOCKETS=$UDP_SOCKETS UDP_BATCH=$UDP_BATCH RPS=${RPS:-none} GRO=${GRO:-off} IO_URING=${IO_URING:-off} IO=${IO:-direct} UDP_COALESCE=${UDP_COALESCE:-on} FAST_PATH=${FAST_PATH:-on} TUNNEL=$TUNNEL; raw results: $RESULTS"
for rnd in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    # A subshell per mode: a failed step ends that mode only (its logs are kept under $OUT).
    if ! (run_mode "$mode" "$rnd"); then
      echo "== round $rnd, mode $mode FAILED; logs in $OUT/failed-$mode-$rnd"
      mkdir -p "$OUT/failed-$mode-$rnd" && cp "$WORK"/*.log "$OUT/failed-$mode-$rnd/" 2>/dev/null || true
    fi
  done
done
teardown

python3 - "$RESULTS" "$TUNNEL" <<'PY' | tee "$OUT/table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
names = {
    "veth": "no balancer: one veth pair (generator ceiling)",
    "nft": "kernel nftables full NAT",
    "haproxy": "HAProxy mode tcp, nbthread 1",
    "nat": "tun-balancer nat", "dnat": "tun-balancer dnat", "tunnel": f"tun-balancer tunnel ({sys.argv[2].upper()})",
    "dr": "tun-balancer dr (TAP)",
}
def rng(vals, fmt):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}–{fmt(hi)}"
g = lambda v: f"{v:.2f}"
k = lambda v: f"{v / 1e3:,.0f}".replace(",", " ")
i = lambda v: f"{v:,.0f}".replace(",", " ")
f2 = lambda v: f"{v:.2f}"
order = []
for r in rows:
    if r["mode"] not in order:
        order.append(r["mode"])
print("| mode | TCP 1 stream Gbit/s | TCP 8 streams Gbit/s | UDP 64 B offered kpps | UDP delivered kpps | delivered k per balancer CPU-s | delivered k per machine CPU-s | k read by tun-balancer per its CPU-s (TUN queue drops k) | new conn/s | balancer CPU-s per 10k conn | machine CPU-s per 10k conn |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for m in order:
    rs = [r for r in rows if r["mode"] == m]
    def udp(key):
        return [r["udp"][key] if r.get("udp") else None for r in rs]
    def per_cpu(r):
        u = r.get("udp")
        if not u:
            return None
        cpu = r.get("udp_bal_cpu_s")
        if m == "nft":  # the kernel's: not separable, the whole machine's non-idle time
            cpu = u["machine_cpu_s"]
        if m == "veth" or cpu is None or cpu <= 0:
            return None
        return u["delivered"] / cpu
    def per_machine(r):
        u = r.get("udp")
        return u["delivered"] / u["machine_cpu_s"] if u and u["machine_cpu_s"] > 0 else None
    def conn_cpu(r, machine):
        h = r.get("http")
        if not h or h["requests"] == 0:
            return None
        cpu = h["machine_cpu_s"] if machine else r.get("http_bal_cpu_s")
        if m == "nft" and not machine:
            cpu = h["machine_cpu_s"]
        return None if cpu is None else cpu / h["requests"] * 1e4
    def lb_read(rs):
        got = [(r["udp_lb"], r.get("udp_bal_cpu_s")) for r in rs if r.get("udp_lb")]
        if not got:
            return "–"
        per = rng([u["rx_packets"] / c for u, c in got if c], k)
        return f"{per} ({rng([u['tun_queue_drops'] for u, _ in got], k)})"
    tcp1 = [r.get("tcp1") for r in rs]
    tcp8 = [r.get("tcp8") for r in rs]
    name = names.get(m, m)
    if m == "nft":
        name += " (*)"
    cells = [
        name, rng(tcp1, g), rng(tcp8, g), rng(udp("sent_pps"), k), rng(udp("delivered_pps"), k),
        rng([per_cpu(r) for r in rs], k), rng([per_machine(r) for r in rs], k), lb_read(rs),
        rng([r["http"]["conn_per_s"] if r.get("http") else None for r in rs], i),
        rng([conn_cpu(r, False) for r in rs], f2), rng([conn_cpu(r, True) for r in rs], f2),
    ]
    print("| " + " | ".join(cells) + " |")
    if m == "veth":
        ipu = [r.get("iperf_udp") for r in rs if r.get("iperf_udp")]
        if ipu:
            print(f"| iperf3 -u -l 64 -b 0 on the same veth pair | – | – | {rng([x['sent_pps'] for x in ipu], k)} | {rng([x['delivered_pps'] for x in ipu], k)} | – | – | – | – | – | – |")
print()
print("(*) nftables: the kernel's NAT has no process and its softirq time is not separable from the client's and")
print("backends' network stacks (over veth the receive path runs in the sender's context): its 'balancer CPU' is the")
print("whole machine's non-idle time from /proc/stat during the run, i.e. the same as the machine column.")
# tun-balancer's data-path threads share one flow table behind a lock taken once per batch: the
# time they held it, against the CPU time the balancer used, is the serial share of the work,
# which bounds what more queues (threads) can add: at most 1 / share times one thread's rate.
shares = []
for r in rows:
    for run, cpu in (("tcp8", "tcp8_bal_cpu_s"), ("udp", "udp_bal_cpu_s")):
        lk, c = r.get(f"{run}_lock"), r.get(cpu)
        if lk and c and lk.get("taken"):
            shares.append(f"{r['mode']} round {r['round']} {run}: lock held {lk['held_s']:.3f} s, waited "
                          f"{lk['wait_s']:.3f} s, {lk['taken']} times, in {c:.2f} balancer CPU-s: serial "
                          f"share {lk['held_s'] / c:.2f} (bound {c / lk['held_s'] if lk['held_s'] else float('inf'):.1f}x one thread)")
if shares:
    print()
    print("Data-path lock (held / balancer CPU-s = the serial share; queues scale at most 1 / share):")
    for x in shares:
        print("- " + x)
errs = [(r["mode"], r["round"], r["http"]["errors"]) for r in rows if r.get("http") and r["http"]["errors"]]
for m, rnd, e in errs:
    print(f"note: {m} round {rnd}: wrk reported {e} socket errors / non-2xx responses")
PY
echo "== raw results: $RESULTS"
