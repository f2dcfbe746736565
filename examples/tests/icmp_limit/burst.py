"""Sends N oversized UDP datagrams with DF set (raw socket, IP_HDRINCL) from SRC to VIP:PORT as
fast as it can, and counts the ICMP "fragmentation needed" errors about them that come back.
Prints one JSON line: sent, send errors, errors received, seconds spent sending, and the window
from the first send to the last error received.

usage: burst.py VIP PORT N SIZE SRC
"""
import json
import socket
import struct
import sys
import time

vip, port, n, size, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
try:
    rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (root)
except OSError:
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
rx.setblocking(False)

payload = bytes(size - 28)
udp = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0) + payload
ip = struct.pack(
    "!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 17, 0,
    socket.inet_aton(src), socket.inet_aton(vip),
)
pkt = ip + udp
vip_b = socket.inet_aton(vip)

got = 0
last = None


def drain():
    global got, last
    while True:
        try:
            b = rx.recv(2048)
        except BlockingIOError:
            return
        ihl = (b[0] & 15) * 4
        if len(b) < ihl + 8 + 28:
            continue
        ty, code = b[ihl], b[ihl + 1]
        q = b[ihl + 8:]
        qihl = (q[0] & 15) * 4
        if ty == 3 and code == 4 and q[16:20] == vip_b and len(q) >= qihl + 4:
            if struct.unpack("!H", q[qihl + 2:qihl + 4])[0] == port:
                got += 1
                last = time.monotonic()


errors = 0
t0 = time.monotonic()
for i in range(n):
    try:
        tx.sendto(pkt, (vip, 0))
    except OSError:
        errors += 1
    if i % 32 == 0:
        drain()
t1 = time.monotonic()
end = time.monotonic() + 1.0
while time.monotonic() < end:
    drain()
    time.sleep(0.005)
print(json.dumps({
    "sent": n - errors,
    "send_errors": errors,
    "received": got,
    "send_s": t1 - t0,
    "window_s": (last - t0) if last is not None else 0.0,
}))
