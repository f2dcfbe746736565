#!/bin/sh
# Captures the kernel-made fixtures `kernel-*.bin` (see README.md): real packets before and after
# the Linux kernel's own full NAT (nftables dnat + snat) in a router namespace.
#
#   client ns fxc            router ns fxr (nftables NAT)            backend ns fxb
#   c0 192.0.2.2      <-> r0 192.0.2.1       r1 198.51.100.1  <-> b0 198.51.100.11
#      2001:db8:c::2         2001:db8:c::1      2001:db8:b::1        2001:db8:b::11
#
# VIPs 203.0.113.10 and 2001:db8:f::10 (routed to the router by the client's default route).
# tshark captures on r0 (before NAT) and r1 (after NAT) inside fxr. Run as root; needs iproute2,
# nftables, ethtool, socat, curl, tshark, python3. Writes pcaps to $OUT (default: a temp dir) and
# then runs extract.py on them. All namespaces are deleted at the end.
set -eu
OUT=${OUT:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
cleanup() {
    for p in $(cat "$OUT"/*.pid 2>/dev/null); do kill "$p" 2>/dev/null || true; done
    for ns in fxc fxr fxb; do ip netns del $ns 2>/dev/null || true; done
}
trap cleanup EXIT

for ns in fxc fxr fxb; do ip netns add $ns; ip -n $ns link set lo up; done
ip link add c0 netns fxc type veth peer name r0 netns fxr
ip link add b0 netns fxb type veth peer name r1 netns fxr

# Checksum offload off everywhere: otherwise the sender leaves TCP/UDP checksums partial
# (CHECKSUM_PARTIAL: only the pseudo-header sum) and the captures show unfinished checksums.
for pair in fxc:c0 fxr:r0 fxr:r1 fxb:b0; do
    ns=${pair%%:*}; dev=${pair#*:}
    ip netns exec $ns ethtool -K $dev tx off rx off tso off gso off gro off >/dev/null 2>&1 || true
    ip -n $ns link set $dev up
done
ip -n fxc addr add 192.0.2.2/24 dev c0
ip -n fxc addr add 2001:db8:c::2/64 dev c0 nodad
ip -n fxc route add default via 192.0.2.1
ip -n fxc -6 route add default via 2001:db8:c::1
ip -n fxr addr add 192.0.2.1/24 dev r0
ip -n fxr addr add 2001:db8:c::1/64 dev r0 nodad
ip -n fxr addr add 198.51.100.1/24 dev r1
ip -n fxr addr add 2001:db8:b::1/64 dev r1 nodad
ip -n fxb addr add 198.51.100.11/24 dev b0
ip -n fxb addr add 2001:db8:b::11/64 dev b0 nodad
ip -n fxb route add default via 198.51.100.1
ip -n fxb -6 route add default via 2001:db8:b::1
ip netns exec fxr sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

# Full NAT. IPv4: the source port is forced to 50000 (the kernel rewrites it); IPv6: the kernel
# keeps the client's source port.
ip netns exec fxr nft -f - <<'EOF'
table ip fx {
    chain pre {
        type nat hook prerouting priority dstnat;
        ip daddr 203.0.113.10 tcp dport 80 dnat to 198.51.100.11:8080
        ip daddr 203.0.113.10 udp dport 53 dnat to 198.51.100.11:5353
    }
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "r1" meta l4proto { tcp, udp } snat to 198.51.100.1:50000
    }
}
table ip6 fx6 {
    chain pre {
        type nat hook prerouting priority dstnat;
        ip6 daddr 2001:db8:f::10 tcp dport 80 dnat to [2001:db8:b::11]:8080
        ip6 daddr 2001:db8:f::10 udp dport 53 dnat to [2001:db8:b::11]:5353
    }
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "r1" snat to 2001:db8:b::1
    }
}
EOF

# Backend servers: a one-line HTTP answer on 8080, a UDP echo on 5353 (both families).
ip netns exec fxb socat TCP6-LISTEN:8080,ipv6only=0,reuseaddr,fork SYSTEM:'echo HTTP/1.0 200 OK; echo' &
echo $! >"$OUT/srv-tcp.pid"
ip netns exec fxb socat UDP6-RECVFROM:5353,ipv6only=0,fork PIPE &
echo $! >"$OUT/srv-udp.pid"

for dev in r0 r1; do
    ip netns exec fxr tshark -q -i $dev -F pcap -w "$OUT/$dev.pcap" -a duration:20 \
        -f 'tcp or udp' >/dev/null 2>&1 &
    echo $! >"$OUT/tshark-$dev.pid"
done
sleep 6

ip netns exec fxc curl -s -m 3 http://203.0.113.10/ || true
ip netns exec fxc sh -c 'echo hello-v4 | socat -t1 - UDP4:203.0.113.10:53' || true
ip netns exec fxc curl -s -m 3 'http://[2001:db8:f::10]/' || true
ip netns exec fxc sh -c 'echo hello-v6 | socat -t1 - UDP6:[2001:db8:f::10]:53' || true

for dev in r0 r1; do wait "$(cat "$OUT/tshark-$dev.pid")" || true; done
ls -l "$OUT"
python3 "$HERE/extract.py" "$OUT/r0.pcap" "$OUT/r1.pcap" "$HERE"
