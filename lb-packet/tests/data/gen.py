#!/usr/bin/env python3
"""Generates the lb-packet fixtures: input packets and the expected bytes after each rewrite.

An implementation independent of lb-packet: header layouts from RFC 791 (IPv4), RFC 8200 (IPv6),
RFC 793 (TCP), RFC 768 (UDP), RFC 792 / RFC 4443 (ICMP), RFC 2003 (IPIP), GUE variant 0, and
every checksum computed in full (RFC 1071), never incrementally. Run: python3 gen.py
"""
import struct

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF

def ip4(a): return bytes(int(x) for x in a.split("."))
def ip6(a):
    import ipaddress
    return ipaddress.IPv6Address(a).packed

def l4(proto, src, dst, sp, dp, payload, v6, seq=1000, ack=2000, opts=b""):
    if proto == 6:
        h = bytearray(struct.pack("!HHIIBBHHH", sp, dp, seq, ack, (5 + len(opts) // 4) << 4, 0x18, 65535, 0, 0)) + opts
        off = 16
    else:
        h = bytearray(struct.pack("!HHHH", sp, dp, 8 + len(payload), 0))
        off = 6
    seg = h + payload
    if v6:
        ps = src + dst + struct.pack("!I3xB", len(seg), proto)
    else:
        ps = src + dst + struct.pack("!xBH", proto, len(seg))
    c = csum(bytes(ps + seg))
    if proto == 17 and c == 0:
        c = 0xFFFF
    seg[off:off + 2] = struct.pack("!H", c)
    return bytes(seg)

def ipv4(proto, src, dst, payload, ttl=64, ident=0x1c46, df=True):
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000 if df else 0, ttl, proto, 0, src, dst))
    h[10:12] = struct.pack("!H", csum(bytes(h)))
    return bytes(h) + payload

def ipv6(proto, src, dst, payload, hlim=64, label=0):
    return struct.pack("!IHBB", (6 << 28) | label, len(payload), proto, hlim) + src + dst + payload

def pkt4(proto, s, sp, d, dp, payload, **kw):
    return ipv4(proto, ip4(s), ip4(d), l4(proto, ip4(s), ip4(d), sp, dp, payload, False, **{k: v for k, v in kw.items() if k in ("seq", "ack", "opts")}), **{k: v for k, v in kw.items() if k in ("ttl",)})

def pkt6(proto, s, sp, d, dp, payload):
    return ipv6(proto, ip6(s), ip6(d), l4(proto, ip6(s), ip6(d), sp, dp, payload, True))

def icmp4(ty, code, rest, body):
    m = bytearray(struct.pack("!BBHI", ty, code, 0, rest)) + body
    m[2:4] = struct.pack("!H", csum(bytes(m)))
    return bytes(m)

def icmp6(src, dst, ty, code, rest, body):
    m = bytearray(struct.pack("!BBHI", ty, code, 0, rest)) + body
    ps = src + dst + struct.pack("!I3xB", len(m), 58)
    m[2:4] = struct.pack("!H", csum(bytes(ps + m)))
    return bytes(m)

def w(name, b):
    open(name, "wb").write(b)

HTTP = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n"
# 1. Full NAT, IPv4/TCP: client 192.0.2.1:40000 -> VIP 203.0.113.10:80 becomes
#    balancer 10.0.0.1:50000 -> backend 10.0.0.7:8080.
w("fullnat_v4_tcp.in.bin", pkt4(6, "192.0.2.1", 40000, "203.0.113.10", 80, HTTP))
w("fullnat_v4_tcp.out.bin", pkt4(6, "10.0.0.1", 50000, "10.0.0.7", 8080, HTTP))
# 2. DNAT, IPv6/UDP: [2001:db8::1]:5000 -> [2001:db8::100]:53 becomes -> [2001:db8:1::7]:5353;
#    the reply's source goes back to the VIP.
Q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
w("dnat_v6_udp.in.bin", pkt6(17, "2001:db8::1", 5000, "2001:db8::100", 53, Q))
w("dnat_v6_udp.out.bin", pkt6(17, "2001:db8::1", 5000, "2001:db8:1::7", 5353, Q))
w("dnat_v6_udp.reply.bin", pkt6(17, "2001:db8:1::7", 5353, "2001:db8::1", 5000, Q))
w("dnat_v6_udp.reply_out.bin", pkt6(17, "2001:db8::100", 53, "2001:db8::1", 5000, Q))
# 3. ICMP port unreachable from the backend about the balancer's forwarded UDP packet, and the
#    same error after reverse full NAT (as the client must see it: from the VIP, quoting its own
#    packet). Quote: IP header + 8 bytes.
fwd = pkt4(17, "10.0.0.1", 50000, "10.0.0.7", 5353, Q)
orig = pkt4(17, "192.0.2.1", 40000, "203.0.113.10", 53, Q)
w("icmp_unreach_v4.in.bin", ipv4(1, ip4("10.0.0.7"), ip4("10.0.0.1"), icmp4(3, 3, 0, fwd[:28])))
w("icmp_unreach_v4.out.bin", ipv4(1, ip4("203.0.113.10"), ip4("192.0.2.1"), icmp4(3, 3, 0, orig[:28])))
# 4. IPIP: outer 10.0.0.1 -> 10.0.0.7, TTL 64, DF copied, ID 0 (DF set); inner TTL 64 -> 63.
inner = pkt4(6, "192.0.2.1", 40000, "203.0.113.10", 80, HTTP)
inner63 = pkt4(6, "192.0.2.1", 40000, "203.0.113.10", 80, HTTP, ttl=63)
w("ipip.in.bin", inner)
w("ipip.out.bin", ipv4(4, ip4("10.0.0.1"), ip4("10.0.0.7"), inner63, ident=0))
# 5. GUE over IPv6 to port 6080 from entropy port 50000 (flow label = source port), inner IPv6
#    hop limit 64 -> 63, UDP checksum computed.
in6 = pkt6(6, "2001:db8::1", 40000, "2001:db8::100", 80, HTTP)
in6_63 = bytearray(in6); in6_63[7] = 63; in6_63 = bytes(in6_63)
s6, d6 = ip6("2001:db8:ff::1"), ip6("2001:db8:ff::7")
udp = bytearray(struct.pack("!HHHH", 50000, 6080, 8 + 4 + len(in6_63), 0)) + bytes([0, 41, 0, 0]) + in6_63
c = csum(bytes(s6 + d6 + struct.pack("!I3xB", len(udp), 17) + udp)) or 0xFFFF
udp[6:8] = struct.pack("!H", c)
w("gue_v6.in.bin", in6)
w("gue_v6.out.bin", ipv6(17, s6, d6, bytes(udp), label=50000))
# 6. Direct routing: Ethernet frame to the balancer's MAC becomes a frame to the backend's MAC.
eth_in = bytes.fromhex("020000000001" "0200000000aa" "0800") + inner
eth_out = bytes.fromhex("020000000007" "020000000001" "0800") + inner
w("dr.in.bin", eth_in)
w("dr.out.bin", eth_out)
# 7. TCP splice: seq + 0x10000000, ack + 0x20000000, SACK block shifted by the ack offset.
sack = bytes([1, 1, 5, 10]) + struct.pack("!II", 2100, 2200)
w("splice_v4.in.bin", pkt4(6, "192.0.2.1", 40000, "203.0.113.10", 80, HTTP, seq=1000, ack=2000, opts=sack))
sack2 = bytes([1, 1, 5, 10]) + struct.pack("!II", 2100 + 0x20000000, 2200 + 0x20000000)
w("splice_v4.out.bin", pkt4(6, "192.0.2.1", 40000, "203.0.113.10", 80, HTTP, seq=1000 + 0x10000000, ack=2000 + 0x20000000, opts=sack2))
# 8. Fragmentation needed (type 3 code 4, next-hop MTU 1480) from 10.0.0.254 about a 1500-byte
#    DF packet: quote limited to 576 - 28 bytes (RFC 1812).
big = pkt4(6, "192.0.2.1", 40000, "203.0.113.10", 80, b"x" * (1500 - 40))
w("frag_needed.in.bin", big)
w("frag_needed.out.bin", ipv4(1, ip4("10.0.0.254"), ip4("192.0.2.1"), icmp4(3, 4, 1480, big[:576 - 28]), ident=0, df=False))
