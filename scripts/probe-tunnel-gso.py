#!/usr/bin/env python3
"""Can a TUN or TAP device take a GUE (UDP-tunnelled) TCP super-packet in one write?

Issue 19 asked whether tunnel mode could hand the kernel one encapsulated GSO super-packet
instead of cutting it into segments in user space. Linux 6.17 added UDP-tunnel GSO to TUN/TAP
(`TUN_F_UDP_TUNNEL_GSO`, a 24-byte virtio-net header with the outer transport and inner network
offsets). This probe, as root, opens a device with that offload in a namespace of its own,
writes one outer IPv4/UDP datagram (port 6080) holding an inner IPv4/TCP packet of 3 072
payload bytes with `gso_size` 1 000 (`VIRTIO_NET_HDR_GSO_TCPV4 | ..._UDP_TUNNEL_IPV4`), routes
it over a veth pair into a second namespace and counts what a plain UDP socket there receives.

    sudo scripts/probe-tunnel-gso.py        # prints one line per device kind

Everything stays inside the two namespaces it creates (and deletes). Results and what they mean:
benches/results/throughput.md, "UDP-tunnel GSO".
"""
import os
import socket
import struct
import subprocess
import sys
import time
import fcntl

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UDP_TUNNEL_GSO = 0x01, 0x02, 0x04, 0x80
GSO_TCPV4, GSO_UDP_TUNNEL_IPV4, F_NEEDS_CSUM = 0x01, 0x20, 0x01
NS_A, NS_B = "lbgso-a", "lbgso-b"
PAYLOAD = bytes(range(256)) * 12  # 3 072 bytes
MSS = 1000


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True)


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src, dst, proto, payload_len):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 1, 0, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", checksum(h)) + h[12:]


def packet():
    """Outer IPv4 + UDP (checksum 0) + inner IPv4 + TCP whose checksum field holds the
    pseudo-header sum, the whole TCP length included (a GSO packet's partial checksum)."""
    isrc, idst = "192.0.2.1", "198.51.100.1"
    tcp_len = 20 + len(PAYLOAD)
    ph = socket.inet_aton(isrc) + socket.inet_aton(idst) + struct.pack("!BBH", 0, 6, tcp_len)
    s = sum(struct.unpack("!6H", ph))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1000, 0, 0x50, 0x18, 65535, s, 0) + PAYLOAD
    inner = ipv4(isrc, idst, 6, len(tcp)) + tcp
    udp = struct.pack("!HHHH", 40000, 6080, 8 + len(inner), 0) + inner
    return ipv4("10.9.0.5", "10.8.0.2", 17, len(udp)) + udp


def probe(kind):
    """Runs in namespace A: the device, one write, and the count from namespace B."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    flags = (IFF_TAP if kind == "tap" else IFF_TUN) | IFF_NO_PI | IFF_VNET_HDR
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"gso0", flags))
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UDP_TUNNEL_GSO)
    except OSError as e:
        return f"{kind}: TUNSETOFFLOAD with TUN_F_UDP_TUNNEL_GSO refused: {e}"
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", 24))
    if kind == "tap":
        sh("ip link set gso0 address 02:00:00:00:00:01")
    sh("ip link set gso0 up && ip addr add 10.9.0.1/24 dev gso0 && sysctl -qw net.ipv4.ip_forward=1")
    if os.environ.get("SEGMENT_AT_VETH"):
        # The veth without UDP-tunnel segmentation: the kernel must cut the super-packet
        # in software on its way out, as for a NIC without tunnel TSO.
        sh("ethtool -K v0 tx-udp_tnl-segmentation off tx-udp_tnl-csum-segmentation off tx off >/dev/null")
    sink = subprocess.Popen(
        ["ip", "netns", "exec", NS_B, "python3", "-c",
         "import socket, struct\n"
         "def ok(d):\n"
         "    # The inner TCP checksum over its pseudo-header: the one's-complement sum is 0xffff.\n"
         "    tcp = d[20:]; b = d[12:20] + struct.pack('!HH', 6, len(tcp)) + tcp + b'\\0' * (len(tcp) % 2)\n"
         "    t = sum(struct.unpack(f'!{len(b) // 2}H', b))\n"
         "    while t >> 16: t = (t & 0xffff) + (t >> 16)\n"
         "    return t == 0xffff\n"
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.8.0.2', 6080))\n"
         "s.settimeout(1.5); got = []\n"
         "try:\n"
         "    while True:\n"
         "        d = s.recv(65535)\n"
         "        got.append(f'{len(d)} B seq {struct.unpack(\"!I\", d[24:28])[0]} tcp csum {\"ok\" if ok(d) else \"BAD\"}')\n"
         "except OSError: pass\n"
         "print(got)\n"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.4)
    pkt = packet()
    eth = b""
    # Offsets count from the start of what follows the header: after a TAP frame's
    # Ethernet header, at the IP header on TUN.
    base = 0
    if kind == "tap":
        eth = bytes.fromhex("020000000001" "020000000002" "0800")
        base = 14
    outer_th, inner_nh, inner_th = base + 20, base + 28, base + 48
    hdr = struct.pack("<BBHHHHHIHHHH", F_NEEDS_CSUM, GSO_TCPV4 | GSO_UDP_TUNNEL_IPV4,
                      inner_th + 20, MSS, inner_th, 16, 0, 0, 0, 0, outer_th, inner_nh)
    try:
        wrote = f"write took {os.write(fd, hdr + eth + pkt)} bytes"
    except OSError as e:
        wrote = f"write refused: {e}"
    got = sink.communicate()[0].strip()
    return f"{kind}: {wrote}; the UDP socket behind the veth received {got}"


def main():
    if os.geteuid() != 0:
        print("skipped: needs root")
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        print(probe(sys.argv[2]))
        return
    for kind in ("tun", "tap"):
        subprocess.run(f"ip netns del {NS_A} 2>/dev/null; ip netns del {NS_B} 2>/dev/null", shell=True)
        try:
            sh(f"ip netns add {NS_A}; ip netns add {NS_B}")
            sh(f"ip -n {NS_A} link add v0 type veth peer name v1 netns {NS_B}")
            sh(f"ip -n {NS_A} addr add 10.8.0.1/24 dev v0; ip -n {NS_A} link set v0 up")
            sh(f"ip -n {NS_B} addr add 10.8.0.2/24 dev v1; ip -n {NS_B} link set v1 up")
            subprocess.run(["ip", "netns", "exec", NS_A, sys.executable, __file__, "--inside", kind],
                           check=True)
        finally:
            subprocess.run(f"ip netns del {NS_A}; ip netns del {NS_B}", shell=True)


if __name__ == "__main__":
    main()
