#!/usr/bin/env python3
"""Extracts the kernel-made fixtures from the two captures of kernel-capture.sh.

usage: extract.py r0.pcap r1.pcap OUTDIR

r0.pcap is the router's client-side interface (packets before DNAT+SNAT, replies after the
reverse NAT), r1.pcap its backend-side interface. Each packet is written as raw IP bytes (the
14-byte Ethernet header stripped, any link padding cut at the IP length) to
OUTDIR/kernel-<family>-<what>.<side>.bin, where <side> is `before` (as it reached the kernel's
NAT) or `after` (as the kernel sent it on).
"""
import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    assert magic == 0xA1B2C3D4, "little-endian microsecond pcap expected"
    linktype = struct.unpack("<I", data[20:24])[0]
    assert linktype == 1, "Ethernet captures expected"
    off = 24
    while off < len(data):
        _, _, incl, _ = struct.unpack("<IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        ip = frame[14:]
        if ip[0] >> 4 == 4:
            ip = ip[:struct.unpack("!H", ip[2:4])[0]]
        else:
            ip = ip[:40 + struct.unpack("!H", ip[4:6])[0]]
        yield ip


def flow(ip):
    """(family, proto, src, sport, dst, dport, tcp flags, payload length) of a packet."""
    if ip[0] >> 4 == 4:
        hl = (ip[0] & 15) * 4
        proto, src, dst, fam = ip[9], ip[12:16], ip[16:20], "v4"
    else:
        hl = 40
        proto, src, dst, fam = ip[6], ip[8:24], ip[24:40], "v6"
    l4 = ip[hl:]
    sport, dport = struct.unpack("!HH", l4[:4])
    if proto == 6:
        flags = l4[13]
        plen = len(l4) - (l4[12] >> 4) * 4
    else:
        flags, plen = 0, len(l4) - 8
    return fam, proto, src, sport, dst, dport, flags, plen


def pick(pkts, fam, proto, sport=None, dport=None, flags=None, data=False):
    for ip in pkts:
        f = flow(ip)
        if f[0] != fam or f[1] != proto:
            continue
        if sport is not None and f[3] != sport:
            continue
        if dport is not None and f[5] != dport:
            continue
        if flags is not None and f[6] & 0x3F != flags:
            continue
        if data and f[7] == 0:
            continue
        return ip
    raise SystemExit(f"not found: {fam} {proto} {sport} {dport} {flags} {data}")


def main():
    r0, r1, out = list(packets(sys.argv[1])), list(packets(sys.argv[2])), sys.argv[3]
    SYN, SYNACK = 0x02, 0x12
    # (name, side the packet enters the NAT on, selector before, selector after)
    specs = []
    for fam in ("v4", "v6"):
        specs += [
            (f"{fam}-tcp-syn", r0, r1, dict(proto=6, dport=80, flags=SYN), dict(proto=6, dport=8080, flags=SYN)),
            (f"{fam}-tcp-synack", r1, r0, dict(proto=6, sport=8080, flags=SYNACK), dict(proto=6, sport=80, flags=SYNACK)),
            (f"{fam}-tcp-data", r0, r1, dict(proto=6, dport=80, data=True), dict(proto=6, dport=8080, data=True)),
            (f"{fam}-udp", r0, r1, dict(proto=17, dport=53), dict(proto=17, dport=5353)),
            (f"{fam}-udp-reply", r1, r0, dict(proto=17, sport=5353), dict(proto=17, sport=53)),
        ]
    for name, src, dst, before, after in specs:
        fam = name[:2]
        for side, pkts, sel in (("before", src, before), ("after", dst, after)):
            ip = pick(pkts, fam, **sel)
            with open(f"{out}/kernel-{name}.{side}.bin", "wb") as f:
                f.write(ip)
            print(f"kernel-{name}.{side}.bin", len(ip), "bytes", flow(ip)[3:6])


if __name__ == "__main__":
    main()
