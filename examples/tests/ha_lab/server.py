#!/usr/bin/env python3
"""A backend of the high-availability lab (examples/tests/ha_lab/mod.rs).

    server.py NAME [--http-port 8080 ...] [--udp-port 7000 ...]

HTTP (threaded, HTTP/1.0, one request per connection, the server closes first), on [::]:PORT
(dual stack) for every --http-port:
  GET /id                        -> NAME
  GET /                          -> NAME (the new-connection probes of workload.py)
  GET /blob/<n>?rate=<bytes/s>   -> n bytes of blob(n), sent in 1 KiB chunks paced at the
                                    given rate (0 or absent: as fast as possible), so that a
                                    download lasts as long as the test wants
UDP echo on 0.0.0.0:PORT and [::]:PORT for every --udp-port: answers each datagram with
`NAME <payload>`, from the address it was sent to.

blob(n) is the output of random.Random(n).randbytes in 64 KiB steps: workload.py computes the
same bytes to check a download's SHA-256.

Each connection that ends in an error (reset, broken pipe, timeout) prints one line
`<unix ms> <peer> <path> <bytes sent>/<n> <error>` on stdout, which the lab keeps as the log.
"""
import argparse
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse

CHUNK = 1024
STEP = 65536
IO_TIMEOUT = 30.0


def blob_chunks(n):
    """The bytes of blob(n), in STEP-sized pieces (the last one shorter)."""
    rng = random.Random(n)
    left = n
    while left > 0:
        k = min(STEP, left)
        yield rng.randbytes(k)
        left -= k


def log(msg):
    print("%d %s" % (int(time.time() * 1000), msg), flush=True)


def read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
        if len(data) > 65536:
            return None
    line = data.split(b"\n", 1)[0].strip()
    parts = line.split()
    if len(parts) < 2:
        return None
    return parts[1].decode("latin-1")


def head(length, name):
    return (
        "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
        "X-Backend: %s\r\nConnection: close\r\n\r\n" % (length, name)
    ).encode()


def send_blob(conn, n, rate, name, progress):
    """Sends blob(n) paced at `rate` bytes/s, counting the bytes sent in `progress[0]`."""
    conn.sendall(head(n, name))
    sent = 0
    start = time.monotonic()
    for piece in blob_chunks(n):
        for i in range(0, len(piece), CHUNK):
            part = piece[i : i + CHUNK]
            if rate > 0:
                due = start + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            conn.sendall(part)
            sent += len(part)
            progress[0] = sent


def serve_http(conn, peer, name):
    path = "?"
    progress = [0]
    n = 0
    try:
        conn.settimeout(IO_TIMEOUT)
        path = read_request(conn)
        if path is None:
            return
        url = urllib.parse.urlsplit(path)
        if url.path.startswith("/blob/"):
            n = int(url.path[len("/blob/") :])
            q = urllib.parse.parse_qs(url.query)
            rate = float(q.get("rate", ["0"])[0])
            send_blob(conn, n, rate, name, progress)
        else:
            body = (name + "\n").encode()
            conn.sendall(head(len(body), name) + body)
        conn.shutdown(socket.SHUT_WR)
    except (OSError, ValueError) as e:
        log("%s %s %d/%d %s" % (peer, path, progress[0], n, e))
    finally:
        try:
            conn.close()
        except OSError:
            pass


def http_loop(port, name):
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", port))
    ls.listen(4096)
    while True:
        conn, addr = ls.accept()
        peer = "[%s]:%d" % (addr[0], addr[1])
        threading.Thread(target=serve_http, args=(conn, peer, name), daemon=True).start()


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def udp_loop(family, port, name):
    """Echoes `NAME payload` from the address each datagram was sent to (a VIP on `lo` in modes
    tunnel and dr), which a wildcard socket would not do by itself."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        s.bind(("::", port))
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("0.0.0.0", port))
    prefix = (name + " ").encode()
    while True:
        try:
            data, anc, _, addr = s.recvmsg(65535, 256)
            cmsg = []
            for level, kind, body in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(body) >= 12:
                    # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }:
                    # send from the datagram's destination address.
                    cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i4s4s", 0, body[8:12], b"\0" * 4))]
                elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(body) >= 20:
                    # struct in6_pktinfo { in6_addr addr; int ifindex; }
                    cmsg = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, body[:16] + struct.pack("i", 0))]
            s.sendmsg([prefix + data], cmsg, 0, addr)
        except OSError as e:
            log("udp %d %s" % (port, e))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--http-port", type=int, action="append", default=[])
    ap.add_argument("--udp-port", type=int, action="append", default=[])
    a = ap.parse_args()
    threads = []
    for p in a.http_port or [8080]:
        threads.append(threading.Thread(target=http_loop, args=(p, a.name), daemon=True))
    for p in a.udp_port or [7000]:
        for fam in (socket.AF_INET, socket.AF_INET6):
            threads.append(threading.Thread(target=udp_loop, args=(fam, p, a.name), daemon=True))
    for t in threads:
        t.start()
    log("%s listening http %s udp %s" % (a.name, a.http_port or [8080], a.udp_port or [7000]))
    while all(t.is_alive() for t in threads):
        time.sleep(0.5)
    log("a listener died")
    sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
