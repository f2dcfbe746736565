#!/usr/bin/env bash
# The lb demo: a client, a balancer (tun-balancer, full NAT over TUN) and three HTTP backends, each in
# its own network namespace. Sends real HTTP traffic through the VIP, shows how the flows spread, kills
# a backend and shows health-check failover (no new flows to it, a long download on another backend
# untouched), brings it back, and removes everything it created, even when interrupted.
#
# Needs root (network namespaces). Every address is a documentation range inside namespaces this
# script creates: 192.0.2.0/24 (client side), 198.51.100.0/24 (backends), 203.0.113.0/24 (VIP, SNAT).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "demo: needs root (it creates network namespaces); run: sudo $0" >&2
  exit 1
fi
for tool in ip curl python3 ss; do
  command -v "$tool" >/dev/null || { echo "demo: '$tool' is missing (apt-get install iproute2 curl python3)" >&2; exit 1; }
done

cd "$(dirname "$0")/.."
echo "== building tun-balancer (release)"
cargo build --release -q -p lb-examples --bin tun-balancer
BIN=${CARGO_TARGET_DIR:-target}/release/tun-balancer

P="lbdemo$$"
C="$P-client" L="$P-lb"
B=("$P-b1" "$P-b2" "$P-b3")
WORK=$(mktemp -d)
VIP=203.0.113.10 SNAT=203.0.113.250
INTERVAL_MS=300 RISE=2 FALL=2

cleanup() {
  set +e
  for pidf in "$WORK"/*.pid; do [ -f "$pidf" ] && kill "$(cat "$pidf")" 2>/dev/null; done
  sleep 0.2
  for ns in "$C" "$L" "${B[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  rm -rf "$WORK"
  echo "== cleaned up (namespaces $P-* removed)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== topology: client $C -- balancer $L -- backends ${B[*]}"
for ns in "$C" "$L" "${B[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add c0 netns "$C" type veth peer name lbc netns "$L"
ip -n "$C" addr add 192.0.2.2/24 dev c0 && ip -n "$C" link set c0 up
ip -n "$C" route add default via 192.0.2.1
ip -n "$L" addr add 192.0.2.1/24 dev lbc && ip -n "$L" link set lbc up
ip -n "$L" link add br0 type bridge && ip -n "$L" addr add 198.51.100.1/24 dev br0 && ip -n "$L" link set br0 up
for i in 0 1 2; do
  ns=${B[$i]} n=$((i + 1))
  ip link add eth0 netns "$ns" type veth peer name "lbb$n" netns "$L"
  ip -n "$L" link set "lbb$n" master br0 up
  ip -n "$ns" addr add "198.51.100.1$n/24" dev eth0 && ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 198.51.100.1
  mkdir -p "$WORK/www$n" && echo "backend-$n" > "$WORK/www$n/index.html"
  head -c 3000000 /dev/zero > "$WORK/www$n/big"
done
ip netns exec "$L" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
ip -n "$L" tuntap add dev lb0 mode tun
ip netns exec "$L" sysctl -qw net.ipv4.conf.lb0.rp_filter=0
ip -n "$L" link set lb0 up
ip -n "$L" route add "$VIP/32" dev lb0
ip -n "$L" route add "$SNAT/32" dev lb0

start_backend() { # n
  local n=$1
  ip netns exec "${B[$((n - 1))]}" python3 -m http.server 80 --directory "$WORK/www$n" \
    >"$WORK/b$n.log" 2>&1 &
  echo $! > "$WORK/b$n.pid"
}
for n in 1 2 3; do start_backend $n; done

cat > "$WORK/lb.toml" <<CFG
[balancer]
device = "lb0"
snat_addrs = ["$SNAT"]
conntrack_capacity = 100000
stats = "127.0.0.1:9100"
hash_key = "demo cluster secret: use your own"

[[service]]
vip = "$VIP:80"
proto = "tcp"
mode = "nat"
scheduler = "maglev"
affinity = "none"
persistence_timeout_s = 0
[service.health]
kind = "tcp"
interval_ms = $INTERVAL_MS
rise = $RISE
fall = $FALL
[[service.backend]]
addr = "198.51.100.11:80"
weight = 1
[[service.backend]]
addr = "198.51.100.12:80"
weight = 1
[[service.backend]]
addr = "198.51.100.13:80"
weight = 1
CFG
echo "== starting tun-balancer (config $WORK/lb.toml)"
ip netns exec "$L" env RUST_LOG=info "$BIN" --config "$WORK/lb.toml" >"$WORK/lb.log" 2>&1 &
echo $! > "$WORK/lb.pid"
sleep 1.5

spread() { # label count
  echo "== $1: $2 new HTTP connections from the client to http://$VIP/"
  for _ in $(seq "$2"); do
    ip netns exec "$C" curl -s --max-time 2 "http://$VIP/" || echo "(failed)"
  done | sort | uniq -c | awk '{printf "   %-10s %4d flows\n", $2, $1}'
}

spread "all three backends up" 300

echo "== a long download (3 MB at 300 kB/s) through the VIP while a backend dies"
ip netns exec "$C" curl -s --max-time 30 --limit-rate 300k -o "$WORK/big.out" -w '%{http_code} %{size_download}\n' \
  "http://$VIP/big" > "$WORK/download.result" 2>&1 &
DL=$!
sleep 1
victim=""
for n in 1 2 3; do
  if ! ip netns exec "${B[$((n - 1))]}" ss -Htn state established '( sport = :80 )' | grep -q .; then victim=$n; fi
done
: "${victim:=3}"
echo "   the download is served by another backend; killing backend-$victim"
kill "$(cat "$WORK/b$victim.pid")"; rm -f "$WORK/b$victim.pid"
sleep "$(python3 -c "print(($FALL * $INTERVAL_MS) / 1000 + 1)")"
spread "backend-$victim down (after fall x interval + 1 s)" 150

wait $DL || true
read -r code size < "$WORK/download.result" || true
if [ "${code:-}" = 200 ] && [ "${size:-0}" = 3000000 ]; then
  echo "== the long download finished intact: HTTP $code, $size bytes (its flow kept its backend)"
else
  echo "== the long download did NOT finish intact: ${code:-?} ${size:-?}"
fi

echo "== restarting backend-$victim"
start_backend "$victim"
sleep "$(python3 -c "print(($RISE * $INTERVAL_MS) / 1000 + 1.5)")"
spread "backend-$victim back" 300

echo "== balancer statistics"
ip netns exec "$L" curl -s --max-time 2 http://127.0.0.1:9100/ || echo "(stats endpoint not reachable)"
echo
