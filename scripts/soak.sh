#!/usr/bin/env bash
# The lb soak test (issue 18): tun-balancer (full NAT over TUN) under mixed traffic for
# SOAK_MINUTES (default 30) while backends flap, the configuration is reloaded and SYN floods
# come and go; then a summary: client errors per kind, reloads done / rejected, the balancer's
# nonzero drop counters and its memory (VmRSS) sampled every minute. Not run in CI.
#
# Traffic, all through the VIP 203.0.113.10 (three services, mode "nat", maglev):
#   HTTP  :80    SOAK_HTTP_LOOPS curl loops (one new connection per request) against
#                python3 http.server backends; status 200 and the body ("backend-N") checked.
#   UDP   :7     a python3 request/response client (a new socket, hence a new flow, per
#                datagram, 1 s timeout) against python3 echo backends; every answer compared.
#   SIP   :5060  a sipp UAC (examples/tests/sip/uac.xml: INVITE ... ACK, 1 s, BYE) at
#                SOAK_SIP_RATE calls/s against sipp UAS backends, affinity = "sip-call-id".
# Events (the periods are env variables, so that a short run exercises every one):
#   SOAK_FLAP_PERIOD   (30 s)  a backend flaps: its health responder (HTTP :8080, UDP :7001,
#                              SIP OPTIONS :5061, all three services probe those ports) is
#                              stopped for SOAK_FLAP_DOWN (10 s) and restarted; backends 1, 2, 3
#                              in turn. The service servers keep running, so a flap should cost
#                              the clients nothing: no new flows go to the backend while it is
#                              down, existing ones continue.
#   SOAK_RELOAD_PERIOD (10 s)  the configuration is rewritten and the balancer gets SIGHUP:
#                              backend 1's weight toggles 1 <-> 2 and a spare backend (4) is
#                              added / removed every other reload (SOAK_SPARE=drain: always
#                              configured, its weight set to 0 instead of removing it); every
#                              SOAK_BAD_EVERY-th (20th) reload writes an invalid file, which
#                              must be rejected.
#   SOAK_FLOOD_PERIOD (300 s)  hping3 --flood --rand-source -S at VIP:80 for SOAK_FLOOD_SECONDS
#                              (20 s) from a namespace of its own, under nice 19 and held to
#                              SOAK_FLOOD_CPU (15) % of a core by a cgroup v1 cpu quota, as
#                              examples/tests/flood.rs does.
# Every minute: the balancer's VmRSS, its flow-table entries and the clients' errors so far.
# Exit status: 0, or 2 if the balancer died (1 for a setup failure). SOAK_KEEP=1 keeps the work
# directory (the balancer's log, the clients' failure logs, sipp's statistics and error files).
#
# Needs root (network namespaces, cgroups) and the Debian packages sipp (the `sip-tester`
# source), hping3, curl, socat, python3, iproute2; it installs nothing. Every address is a
# documentation range inside namespaces this script creates (prefix lbsoak<pid>): 192.0.2.0/24
# (client 192.0.2.2, flooder 192.0.2.130), 198.51.100.0/24 (backends), 203.0.113.0/24 (VIP,
# SNAT). The flood's SYN-ACKs to its random sources are routed into the flooder's namespace,
# which does not forward, and die there.
#
# Short run that exercises every event:
#   SOAK_MINUTES=2 SOAK_FLAP_PERIOD=15 SOAK_RELOAD_PERIOD=5 SOAK_FLOOD_PERIOD=45 \
#   SOAK_FLOOD_SECONDS=10 SOAK_BAD_EVERY=4 sudo -E scripts/soak.sh
set -euo pipefail

SOAK_MINUTES=${SOAK_MINUTES:-30}
SOAK_FLAP_PERIOD=${SOAK_FLAP_PERIOD:-30}
SOAK_FLAP_DOWN=${SOAK_FLAP_DOWN:-10}
SOAK_RELOAD_PERIOD=${SOAK_RELOAD_PERIOD:-10}
SOAK_BAD_EVERY=${SOAK_BAD_EVERY:-20}
SOAK_FLOOD_PERIOD=${SOAK_FLOOD_PERIOD:-300}
SOAK_FLOOD_SECONDS=${SOAK_FLOOD_SECONDS:-20}
SOAK_FLOOD_CPU=${SOAK_FLOOD_CPU:-15}
SOAK_HTTP_LOOPS=${SOAK_HTTP_LOOPS:-2}
SOAK_UDP_RATE=${SOAK_UDP_RATE:-20}
SOAK_SIP_RATE=${SOAK_SIP_RATE:-10}
SOAK_SPARE=${SOAK_SPARE:-remove}

if [ "$(id -u)" != 0 ]; then
  echo "soak: needs root (network namespaces, cgroups); run: sudo $0" >&2
  exit 1
fi
for tool in ip curl python3 sipp hping3 socat; do
  command -v "$tool" >/dev/null || {
    echo "soak: '$tool' is missing (apt-get install iproute2 curl python3 sipp hping3 socat)" >&2
    exit 1
  }
done
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

cd "$(dirname "$0")/.."
ROOT=$PWD
echo "== building tun-balancer (release)"
cargo build --release -q -p lb-examples --bin tun-balancer
BIN=$(realpath "${CARGO_TARGET_DIR:-target}/release/tun-balancer")

P="lbsoak$$"
C="$P-c" L="$P-lb" F="$P-f"
B=("$P-b1" "$P-b2" "$P-b3" "$P-b4") # b4: the spare, in the configuration every other reload
WORK=$(mktemp -d /tmp/lbsoak.XXXXXX)
CG=/sys/fs/cgroup/cpu/$P
VIP=203.0.113.10 SNAT=203.0.113.250
T0=$(date +%s)
LBPID=""

log() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" $(($(date +%s) - T0)) "$*"; }

cleanup() {
  set +e
  for pidf in "$WORK"/*.pid; do [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null; done
  sleep 0.3
  for ns in "$C" "$F" "$L" "${B[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  if [ -d "$CG" ]; then sleep 0.2; rmdir "$CG" 2>/dev/null; fi
  if [ -n "${SOAK_KEEP:-}" ]; then echo "== kept $WORK"; else rm -rf "$WORK"; fi
  echo "== cleaned up (namespaces $P-* removed)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helper programs
cat > "$WORK/echo.py" <<'PYEOF'
# UDP echo server: answers every datagram with itself.
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
PYEOF

cat > "$WORK/www.py" <<'PYEOF'
# A backend's HTTP server: python3's http.server serving a directory, without its reverse DNS
# lookup at start (http.server's getfqdn: a query to the host's resolver, which times out in
# these namespaces after 10 s) and without a log line per request.
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass
Server((sys.argv[1], int(sys.argv[2])), functools.partial(H, directory=sys.argv[3])).serve_forever()
PYEOF

cat > "$WORK/health.py" <<'PYEOF'
# A backend's health responder: HTTP on :8080 (200 to anything), UDP echo on :7001, SIP
# OPTIONS on :5061 (200 OK with the request's Via / From / To / Call-ID / CSeq).
import http.server, select, socket, socketserver, sys, threading
addr = sys.argv[1]
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):  # without http.server's getfqdn (a DNS query nobody answers here)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
srv = Server((addr, 8080), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, 7001))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, 5061))
while True:
    for sock in select.select([u, s], [], [])[0]:
        d, a = sock.recvfrom(65535)
        if sock is u:
            u.sendto(d, a)
            continue
        lines = d.decode("latin-1").split("\r\n")
        keep = [l for l in lines[1:] if l.split(":", 1)[0].strip().lower()
                in ("via", "v", "from", "f", "to", "t", "call-id", "i", "cseq")]
        s.sendto(("SIP/2.0 200 OK\r\n" + "\r\n".join(keep) +
                  "\r\nContent-Length: 0\r\n\r\n").encode("latin-1"), a)
PYEOF

cat > "$WORK/udp_client.py" <<'PYEOF'
# UDP request/response client: a new socket (new flow) per datagram at `rate`/s, 1 s timeout;
# counts answered / lost / wrong answers in `out` (JSON, rewritten every 2 s and at SIGTERM);
# every failure is a line in `faillog` with its time.
import json, os, signal, socket, sys, time
vip, port, rate, out, faillog = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
n = {"total": 0, "ok": 0, "lost": 0, "bad": 0}
fl = open(faillog, "a", buffering=1)
def dump():
    with open(out + ".tmp", "w") as f:
        json.dump(n, f)
    os.replace(out + ".tmp", out)
nxt, last = time.monotonic(), 0.0
while not stop:
    msg = ("soak %d %d" % (os.getpid(), n["total"])).encode()
    n["total"] += 1
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        s.sendto(msg, (vip, port))
        d, a = s.recvfrom(2048)
        if d == msg and a == (vip, port):
            n["ok"] += 1
        else:
            n["bad"] += 1
            fl.write("%.3f bad %r from %r for %r\n" % (time.time(), d[:60], a, msg))
    except socket.timeout:
        n["lost"] += 1
        fl.write("%.3f lost %s\n" % (time.time(), msg.decode()))
    except OSError as e:
        n["lost"] += 1
        fl.write("%.3f error %s %s\n" % (time.time(), msg.decode(), e))
    s.close()
    if time.monotonic() - last > 2:
        dump()
        last = time.monotonic()
    nxt = max(nxt + 1.0 / rate, time.monotonic())
    time.sleep(max(0.0, nxt - time.monotonic()))
dump()
PYEOF

cat > "$WORK/http_loop.sh" <<'SHEOF'
# One HTTP client loop: a new connection per request; counts in $2 ("total failures"), every
# failure a line in $3 with its time.
url=$1 counts=$2 faillog=$3
total=0 fail=0
trap 'printf "%d %d\n" $total $fail > "$counts"; exit 0' TERM INT
while :; do
  out=$(curl -sS --max-time 5 -H 'Connection: close' -w ' %{http_code}' "$url" 2>&1)
  total=$((total + 1))
  if [[ "$out" != backend-[1-4]$'\n 200' ]]; then
    fail=$((fail + 1))
    printf '%s %s\n' "$(date +%s.%N | cut -c1-14)" "$(echo "$out" | tr '\n' ' ')" >> "$faillog"
  fi
  printf "%d %d\n" $total $fail > "$counts.tmp" && mv "$counts.tmp" "$counts"
  sleep 0.05
done
SHEOF

cat > "$WORK/sip_analysis.py" <<'PYEOF'
# Call integrity seen from the UAS side, and the times of the UAC's failures. sipp's UAS answers
# a BYE it does not expect with 200 OK (its default behaviour), so the UAC counts a call whose
# BYE went to another backend as successful. The UASes' error logs show such a split call: the
# Call-ID appears in the logs of two UASes (the one that got the INVITE times out waiting for the
# ACK or BYE; the other reports an unexpected BYE, or an ACK / BYE while it expects a new call's
# first message). A call that lost a message under load (an ACK lost, an INVITE retransmitted)
# shows in one UAS's log only and is not counted. Each split call is put down to the balancer's
# event just before it (3 s): its backend's SIP check failing ("backend down ...:5061") or its
# backend removed by a reload ("backend removed ...:5060").
import datetime, glob, re, sys
work = sys.argv[1]
def epoch(iso):
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
events = []
for line in open(work + "/lb.log", errors="replace"):
    m = re.match(r"(\S+Z)\s.*backend (down|removed).*backend=(\S+):(506[01])\b", line)
    if m:
        events.append((epoch(m.group(1)), m.group(2), m.group(3)))
    elif "configuration reloaded" in line:
        events.append((epoch(line.split()[0]), "reload", ""))
def entries(path):
    text = open(path, errors="replace").read().replace("\n", " ")
    parts = re.split(r"(\d{10}\.\d+): ", text)
    return [(float(parts[i]), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
seen = {}   # Call-ID -> the UASes whose logs name it
first = {}  # Call-ID -> when a UAS first got a message of it that it did not expect
for path in sorted(glob.glob(work + "/uas*.errors")):
    for t, msg in entries(path):
        m = re.search(r"(?:Call-Id: |call: |Call-Id '|Dead call )(\d+-\d+)@", msg)
        if not m:
            continue
        cid = m.group(1)
        seen.setdefault(cid, set()).add(path)
        if "unexpected" in msg:
            first[cid] = min(t, first.get(cid, t))
            if "while expecting 'OPTIONS' (index 0)" in msg:
                seen[cid].add("a UAS without the call")
split = {cid: first[cid] for cid, where in seen.items() if len(where) >= 2 and cid in first}
cause = {"down": 0, "removed": 0, "reload": 0, "other": 0}
for cid, t in split.items():
    before = [e for e in events if t - 3 <= e[0] <= t + 0.05]
    named = [e for e in before if e[1] != "reload"]
    cause[max(named)[1] if named else "reload" if before else "other"] += 1
floods = [tuple(map(float, l.split()[:2])) for l in open(work + "/floods") if len(l.split()) >= 2]
uac = [t for t, msg in entries(work + "/uac.errors")] if glob.glob(work + "/uac.errors") else []
near = sum(1 for t in uac if any(a <= t <= b + 10 for a, b in floods))
print(len(split), cause["down"], cause["removed"], cause["reload"], cause["other"], len(uac), near, len(uac) - near)
PYEOF

# ---------------------------------------------------------------- topology
log "topology: client $C, flooder $F -- balancer $L -- backends ${B[*]}"
for ns in "$C" "$F" "$L" "${B[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add c0 netns "$C" type veth peer name lbc netns "$L"
ip -n "$C" addr add 192.0.2.2/25 dev c0 && ip -n "$C" link set c0 up
ip -n "$C" route add default via 192.0.2.1
ip -n "$L" addr add 192.0.2.1/25 dev lbc && ip -n "$L" link set lbc up
ip link add f0 netns "$F" type veth peer name lbf netns "$L"
ip -n "$F" addr add 192.0.2.130/25 dev f0 && ip -n "$F" link set f0 up
ip -n "$F" route add default via 192.0.2.129
ip -n "$L" addr add 192.0.2.129/25 dev lbf && ip -n "$L" link set lbf up
# Whatever the balancer namespace does not know (the SYN-ACKs to the flood's random sources)
# goes to the flooder, which does not forward: it dies there.
ip -n "$L" route add default via 192.0.2.130
ip -n "$L" link add br0 type bridge && ip -n "$L" addr add 198.51.100.1/24 dev br0 && ip -n "$L" link set br0 up
for i in 0 1 2 3; do
  ns=${B[$i]} n=$((i + 1))
  ip link add eth0 netns "$ns" type veth peer name "lbb$n" netns "$L"
  ip -n "$L" link set "lbb$n" master br0 up
  ip -n "$ns" addr add "198.51.100.1$n/24" dev eth0 && ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 198.51.100.1
  mkdir -p "$WORK/www$n" && echo "backend-$n" > "$WORK/www$n/id"
done
ip netns exec "$F" sysctl -qw net.ipv4.ip_forward=0
ip netns exec "$L" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
ip -n "$L" tuntap add dev lb0 mode tun
ip netns exec "$L" sysctl -qw net.ipv4.conf.lb0.rp_filter=0
ip -n "$L" link set lb0 up
ip -n "$L" route add "$VIP/32" dev lb0
ip -n "$L" route add "$SNAT/32" dev lb0

bg() { # name ns command...: starts command in ns, pid in $WORK/name.pid, output in $WORK/name.log
  local name=$1 ns=$2
  shift 2
  ip netns exec "$ns" "$@" >"$WORK/$name.log" 2>&1 &
  echo $! > "$WORK/$name.pid"
}
stop() { # name
  if [ -f "$WORK/$1.pid" ]; then kill "$(cat "$WORK/$1.pid")" 2>/dev/null || true; fi
  rm -f "$WORK/$1.pid"
}
start_health() { # n
  bg "health$1" "${B[$(($1 - 1))]}" "$PY" "$WORK/health.py" "198.51.100.1$1"
}
for n in 1 2 3 4; do
  ns=${B[$((n - 1))]} a="198.51.100.1$n"
  bg "http$n" "$ns" "$PY" "$WORK/www.py" "$a" 80 "$WORK/www$n"
  bg "echo$n" "$ns" "$PY" "$WORK/echo.py" "$a" 7000
  bg "uas$n" "$ns" sipp -sf "$ROOT/examples/tests/sip/uas.xml" -i "$a" -p 5060 -nostdin \
    -trace_err -error_file "$WORK/uas$n.errors"
  start_health "$n"
done
# Every server listens before the balancer starts (it takes a backend as up until its check
# says otherwise).
listening() { # ns
  local have
  have=$(ip netns exec "$1" ss -Hlntu 2>/dev/null | awk '{print $5}' | sed 's/.*://' | sort -u | tr '\n' ' ')
  for port in 80 8080 7000 7001 5060 5061; do [[ " $have" == *" $port "* ]] || return 1; done
}
for n in 1 2 3 4; do
  for _ in $(seq 100); do listening "${B[$((n - 1))]}" && break; sleep 0.2; done
  listening "${B[$((n - 1))]}" || { echo "soak: backend $n's servers are not listening" >&2; exit 1; }
done

# ---------------------------------------------------------------- configuration
RELOADS=0 BAD_WRITTEN=0
write_config() { # k: the k-th configuration (0: the initial one)
  local k=$1 w=$((1 + $1 % 2)) spare=$(((${1} / 2) % 2)) bad=0 out="$WORK/lb.toml.new"
  if [ "$k" -gt 0 ] && [ "$((k % SOAK_BAD_EVERY))" = 0 ]; then bad=1; fi
  {
    cat <<CFG
# soak configuration $k (backend 1 weight $w, spare backend $([ $spare = 1 ] && echo in || echo "out ($SOAK_SPARE)")$([ $bad = 1 ] && echo ", INVALID on purpose"))
[balancer]
device = "lb0"
snat_addrs = ["$SNAT"]
conntrack_capacity = 262144
stats = "127.0.0.1:9100"
hash_key = "lb soak test key, not a secret"
CFG
    local svc
    for svc in "80 tcp http 8080 80" "7 udp udp 7001 7000" "5060 udp sip-options 5061 5060"; do
      set -- $svc
      echo
      echo "[[service]]"
      echo "vip = \"$VIP:$1\""
      echo "proto = \"$2\""
      echo "mode = \"nat\""
      echo "scheduler = \"maglev\""
      if [ "$1" = 5060 ]; then echo 'affinity = "sip-call-id"'; else echo 'affinity = "none"'; fi
      echo "[service.health]"
      echo "kind = \"$3\""
      echo "port = $4"
      echo "interval_ms = 500"
      echo "rise = 2"
      echo "fall = 2"
      case $3 in
        http) echo 'path = "/healthz"' ;;
        udp) printf 'send = "ping"\nexpect = "ping"\n' ;;
      esac
      local n
      for n in 1 2 3 4; do
        [ "$n" = 4 ] && [ "$spare" = 0 ] && [ "$SOAK_SPARE" != drain ] && continue
        echo "[[service.backend]]"
        echo "addr = \"198.51.100.1$n:$5\""
        if [ "$n" = 1 ]; then
          if [ "$bad" = 1 ]; then echo "weight = -1"; else echo "weight = $w"; fi
        elif [ "$n" = 4 ]; then
          echo "weight = $spare"
        else
          echo "weight = 1"
        fi
      done
    done
  } > "$out"
  mv "$out" "$WORK/lb.toml"
  return $bad
}
write_config 0 || true
"$BIN" --check --config "$WORK/lb.toml" >/dev/null || { echo "soak: the configuration does not pass --check" >&2; exit 1; }

log "starting tun-balancer (config $WORK/lb.toml, log $WORK/lb.log)"
ip netns exec "$L" env RUST_LOG=info "$BIN" --config "$WORK/lb.toml" >"$WORK/lb.log" 2>&1 &
LBPID=$!
echo $LBPID > "$WORK/lb.pid"

stats() { ip netns exec "$L" curl -s --max-time 3 http://127.0.0.1:9100/ 2>/dev/null; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$LBPID/status" 2>/dev/null || echo "?"; }
healthy_count() {
  stats | "$PY" -c 'import json,sys; print(sum(1 for b in json.load(sys.stdin)["backends"] if b["live"] and b["healthy"]))' 2>/dev/null || echo 0
}
WANT=9 # 3 services x 3 backends (the spare is out of the first configuration)
[ "$SOAK_SPARE" = drain ] && WANT=12
for _ in $(seq 60); do
  [ "$(healthy_count)" = $WANT ] && break
  kill -0 "$LBPID" 2>/dev/null || { echo "soak: tun-balancer exited:"; cat "$WORK/lb.log"; exit 2; }
  sleep 0.5
done
[ "$(healthy_count)" = $WANT ] || { echo "soak: backends not all healthy after 30 s"; stats; exit 1; }
for n in 1 2 3; do
  ip netns exec "$C" curl -sS --max-time 3 "http://$VIP/id" >/dev/null || { echo "soak: no HTTP through the VIP"; exit 1; }
done

# ---------------------------------------------------------------- clients
DUR=$((SOAK_MINUTES * 60))
: > "$WORK/http.fail" && : > "$WORK/udp.fail"
for h in $(seq "$SOAK_HTTP_LOOPS"); do
  bg "httpc$h" "$C" bash "$WORK/http_loop.sh" "http://$VIP/id" "$WORK/httpc$h.counts" "$WORK/http.fail"
done
bg udpc "$C" "$PY" "$WORK/udp_client.py" "$VIP" 7 "$SOAK_UDP_RATE" "$WORK/udp.json" "$WORK/udp.fail"
bg uac "$C" sipp -sf "$ROOT/examples/tests/sip/uac.xml" -i 192.0.2.2 -p 5060 \
  -m $((SOAK_SIP_RATE * (DUR + 60))) -r "$SOAK_SIP_RATE" -rp 1000 -nostdin \
  -trace_stat -stf "$WORK/uac.csv" -fd 5 -trace_err -error_file "$WORK/uac.errors" \
  -timeout $((DUR + 120))s "$VIP:5060"

http_counts() { # total failures over every loop
  cat "$WORK"/httpc*.counts 2>/dev/null | awk '{t += $1; f += $2} END {printf "%d %d\n", t, f}'
}
udp_counts() { # total lost bad
  "$PY" -c 'import json,sys; n=json.load(open(sys.argv[1])); print(n["total"], n["lost"], n["bad"])' "$WORK/udp.json" 2>/dev/null || echo "0 0 0"
}
sip_counts() { # created successful failed retransmissions (cumulative, sipp's last stats row)
  "$PY" - "$WORK/uac.csv" <<'PYEOF' 2>/dev/null || echo "0 0 0 0"
import sys
rows = [l for l in open(sys.argv[1]).read().splitlines() if l.strip()]
h, last = rows[0].split(";"), rows[-1].split(";")
r = dict(zip(h, last))
print(r["TotalCallCreated"], r["SuccessfulCall(C)"], r["FailedCall(C)"], r["Retransmissions(C)"])
PYEOF
}
reload_counts() { # done rejected
  printf '%d %d\n' "$(grep -c 'configuration reloaded' "$WORK/lb.log" || true)" "$(grep -c 'reload rejected' "$WORK/lb.log" || true)"
}
entries() {
  stats | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["conntrack"]["entries"])' 2>/dev/null || echo "?"
}

RSS0=$(rss)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
log "soak for $SOAK_MINUTES min: flap every ${SOAK_FLAP_PERIOD}s (${SOAK_FLAP_DOWN}s down), reload every ${SOAK_RELOAD_PERIOD}s (every ${SOAK_BAD_EVERY}th invalid), flood every ${SOAK_FLOOD_PERIOD}s for ${SOAK_FLOOD_SECONDS}s"
log "start: balancer pid $LBPID VmRSS $RSS0 kB, load average $LOAD0"
echo "rss_minute 0 $RSS0" > "$WORK/rss"

# ---------------------------------------------------------------- the run
S0=$(date +%s)
next_flap=$SOAK_FLAP_PERIOD next_reload=$SOAK_RELOAD_PERIOD next_flood=$SOAK_FLOOD_PERIOD
next_minute=60 flap_n=0 flap_up_at=-1 flood_end=-1 flaps=0 floods=0
died=0
: > "$WORK/floods"
while :; do
  now=$(($(date +%s) - S0))
  [ "$now" -ge "$DUR" ] && break
  if ! kill -0 "$LBPID" 2>/dev/null; then
    died=1
    log "tun-balancer DIED"
    break
  fi
  if [ "$flap_up_at" -ge 0 ] && [ "$now" -ge "$flap_up_at" ]; then
    start_health "$flap_n"
    log "flap: backend $flap_n health restored"
    flap_up_at=-1
  fi
  if [ "$now" -ge "$next_flap" ] && [ "$flap_up_at" -lt 0 ]; then
    flap_n=$((flap_n % 3 + 1))
    stop "health$flap_n"
    flaps=$((flaps + 1))
    log "flap: backend $flap_n health responder stopped for ${SOAK_FLAP_DOWN}s"
    flap_up_at=$((now + SOAK_FLAP_DOWN))
    next_flap=$((next_flap + SOAK_FLAP_PERIOD))
  fi
  if [ "$now" -ge "$next_reload" ]; then
    RELOADS=$((RELOADS + 1))
    if ! write_config "$RELOADS"; then
      BAD_WRITTEN=$((BAD_WRITTEN + 1))
      log "reload $RELOADS: invalid configuration (must be rejected)"
    fi
    kill -HUP "$LBPID" 2>/dev/null || true
    next_reload=$((next_reload + SOAK_RELOAD_PERIOD))
  fi
  if [ "$flood_end" -ge 0 ] && [ "$now" -ge "$flood_end" ]; then
    kill -INT "$(cat "$WORK/hping3.pid")" 2>/dev/null || true
    sleep 0.5
    stop hping3
    date +%s >> "$WORK/floods"
    log "flood: stopped ($(grep -h 'packets transmitted' "$WORK/hping3.log" | tail -1 || true))"
    flood_end=-1
  fi
  if [ "$now" -ge "$next_flood" ] && [ "$flood_end" -lt 0 ]; then
    floods=$((floods + 1))
    bg hping3 "$F" nice -n 19 hping3 -n --flood --rand-source -S -p 80 "$VIP"
    capped=no
    if mkdir -p "$CG" 2>/dev/null && echo 10000 > "$CG/cpu.cfs_period_us" \
      && echo $((100 * SOAK_FLOOD_CPU)) > "$CG/cpu.cfs_quota_us" \
      && echo "$(cat "$WORK/hping3.pid")" > "$CG/cgroup.procs"; then
      capped="${SOAK_FLOOD_CPU}% of a core"
    fi
    printf '%s ' "$(date +%s)" >> "$WORK/floods"
    log "flood $floods: hping3 --flood --rand-source -S $VIP:80 for ${SOAK_FLOOD_SECONDS}s (CPU cap: $capped)"
    flood_end=$((now + SOAK_FLOOD_SECONDS))
    next_flood=$((next_flood + SOAK_FLOOD_PERIOD))
  fi
  if [ "$now" -ge "$next_minute" ]; then
    m=$((next_minute / 60)) r=$(rss)
    echo "rss_minute $m $r" >> "$WORK/rss"
    read -r ht hf < <(http_counts)
    read -r ut ul ub < <(udp_counts)
    read -r sc ss sf sr < <(sip_counts)
    read -r rd rr < <(reload_counts)
    log "minute $m: VmRSS $r kB, flows $(entries), HTTP fail $hf/$ht, UDP lost $((ul + ub))/$ut, SIP failed $sf/$sc, reloads $rd ok $rr rejected, load $(cut -d' ' -f1 /proc/loadavg)"
    next_minute=$((next_minute + 60))
  fi
  sleep 1
done

# ---------------------------------------------------------------- the end
if [ "$flood_end" -ge 0 ]; then
  kill -INT "$(cat "$WORK/hping3.pid")" 2>/dev/null || true
  sleep 0.5
  stop hping3
  echo "$(date +%s)" >> "$WORK/floods"
fi
if [ "$flap_up_at" -ge 0 ]; then start_health "$flap_n"; fi
RSS1=$(rss)
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
echo "rss_end $((($(date +%s) - S0) / 60)) $RSS1" >> "$WORK/rss"
# Stop the clients: the curl loops and the UDP client write their final counts; the UAC stops
# placing calls (SIGUSR1) and finishes the ones in progress (at most ~11 s each).
for h in $(seq "$SOAK_HTTP_LOOPS"); do stop "httpc$h"; done
stop udpc
kill -USR1 "$(cat "$WORK/uac.pid")" 2>/dev/null || true
for _ in $(seq 30); do kill -0 "$(cat "$WORK/uac.pid")" 2>/dev/null || break; sleep 0.5; done
stop uac
sleep 1.5
STATS=$(stats)
kill -0 "$LBPID" 2>/dev/null || died=1

read -r ht hf < <(http_counts)
read -r ut ul ub < <(udp_counts)
read -r sc ss sf sr < <(sip_counts)
read -r rd rr < <(reload_counts)
tundrop=$(ip netns exec "$L" cat /sys/class/net/lb0/statistics/tx_dropped 2>/dev/null || echo "?")

# The failures' times against the flood windows (start end, epoch seconds; +10 s after each).
in_flood() { # failure log -> "in_flood outside"
  "$PY" - "$WORK/floods" "$1" <<'PYEOF'
import sys
w = [tuple(map(float, l.split()[:2])) for l in open(sys.argv[1]) if len(l.split()) >= 2]
inside = outside = 0
for l in open(sys.argv[2]):
    try:
        t = float(l.split()[0])
    except (ValueError, IndexError):
        continue
    if any(a <= t <= b + 10 for a, b in w):
        inside += 1
    else:
        outside += 1
print(inside, outside)
PYEOF
}
read -r smoved shealth sremoved sreload sother serr sin sout < <("$PY" "$WORK/sip_analysis.py" "$WORK" || echo "? ? ? ? ? ? ? ?")
read -r hin hout < <(in_flood "$WORK/http.fail")
read -r uin uout < <(in_flood "$WORK/udp.fail")

echo
echo "================ soak summary ================"
echo "duration:        $SOAK_MINUTES min ($(($(date +%s) - S0)) s), flaps $flaps, reloads sent $RELOADS ($BAD_WRITTEN invalid on purpose), floods $floods"
echo "load average:    start $LOAD0, end $LOAD1"
echo "balancer:        $([ $died = 1 ] && echo DIED || echo alive), VmRSS start $RSS0 kB, end $RSS1 kB"
echo "HTTP:            $hf failed of $ht requests ($hin during a flood or within 10 s after, $hout outside)"
echo "UDP echo:        $((ul + ub)) lost or wrong of $ut datagrams ($ul lost, $ub wrong; $uin during a flood or within 10 s after, $uout outside)"
echo "SIP:             $sf failed of $sc calls ($ss successful, $sr retransmissions; sipp error events: $sin during a flood or within 10 s after, $sout outside)"
echo "SIP integrity:   $smoved calls split between two backends (a later message of the call went to another UAS than its INVITE): $shealth right after their backend's SIP check failed, $sremoved right after their backend was removed by a reload, $sreload right after another reload (SOAK_SPARE=drain: weight 0), $sother otherwise"
echo "reloads:         $rd done, $rr rejected (expected $((RELOADS - BAD_WRITTEN)) and $BAD_WRITTEN)"
echo "TUN queue drops: $tundrop (lb0 tx_dropped: the kernel's queue to the balancer was full)"
echo "balancer counters (nonzero):"
echo "$STATS" | "$PY" -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    print("  (stats not available)"); sys.exit()
for k, v in s["drops"].items():
    if v:
        print("  drops.%-24s %d" % (k, v))
for k in ("rx_packets", "forwarded", "dropped", "icmp_generated", "sip_not_sip"):
    print("  %-30s %d" % (k, s.get(k, 0)))
for k, v in s["conntrack"].items():
    if isinstance(v, int) and v and k not in ("capacity",):
        print("  conntrack.%-20s %d" % (k, v))
for b in s["backends"]:
    if b.get("sip_call_id_misses"):
        print("  backend %s sip_call_id_misses %d" % (b["addr"], b["sip_call_id_misses"]))
'
echo "VmRSS per minute (kB):"
awk '{printf "  %s %3d  %s\n", ($1 == "rss_end" ? "end   " : "minute"), $2, $3}' "$WORK/rss"
if [ -s "$WORK/http.fail" ]; then echo "HTTP failures (first 10):"; head -10 "$WORK/http.fail" | sed 's/^/  /'; fi
if [ -s "$WORK/udp.fail" ]; then echo "UDP failures (first 10):"; head -10 "$WORK/udp.fail" | sed 's/^/  /'; fi
if [ -s "$WORK/uac.errors" ]; then
  echo "sipp UAC error events (first 10):"
  tr '\n' ' ' < "$WORK/uac.errors" | sed 's/\([0-9]\{4\}-[0-9][0-9]-[0-9][0-9]\t[0-9:.]*\t\)/\n\1/g' \
    | grep -v '^The following' | grep . | head -10 | cut -c1-160 | sed 's/^/  /' || true
fi
echo "balancer log: $(grep -c . "$WORK/lb.log") lines, $(grep -c ' WARN ' "$WORK/lb.log" || true) WARN, $(grep -c ' ERROR ' "$WORK/lb.log" || true) ERROR"
grep ' ERROR ' "$WORK/lb.log" | grep -v 'reload rejected' | head -5 | sed 's/^/  /' || true
if [ $died = 1 ]; then
  echo "tun-balancer died; the end of its log:"
  tail -20 "$WORK/lb.log" | sed 's/^/  /'
  exit 2
fi
exit 0
