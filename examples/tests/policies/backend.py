#!/usr/bin/env python3
"""A tiny threaded TCP/HTTP backend for the policy end-to-end tests (examples/tests/policies.rs).

    backend.py PORT NAME [--delay-ms N] [--mode http|reset]

mode http (default): one thread per connection reads one request (up to the blank line) and
  - for `GET /hold`: answers at once with headers and the body `NAME\n`, then keeps the connection
    open, idle, until the client closes it (a long-lived connection that names its backend);
  - for any other request (`GET /id`, the health checks): sleeps --delay-ms, answers `NAME\n`
    with HTTP/1.0 and closes (the server closes first, so the client keeps no TIME_WAIT).
mode reset: accepts every connection and closes it at once with SO_LINGER 0 (a RST after the
  handshake, before any data).
Listens on [::]:PORT (dual stack). Prints nothing per request (the tests count from the bodies).
"""
import argparse
import socket
import struct
import sys
import threading
import time


def serve_http(conn, name, delay):
    try:
        conn.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
            if len(data) > 65536:
                return
        line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
        parts = line.split()
        path = parts[1] if len(parts) > 1 else b"/"
        body = (name + "\n").encode()
        head = (
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % len(body)
        ).encode()
        if path == b"/hold":
            conn.settimeout(None)
            conn.sendall(head + body)
            # Idle until the client closes (or resets) the connection.
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
        if delay > 0:
            time.sleep(delay)
        conn.sendall(head + body)
    except OSError:
        pass
    finally:
        try:
            conn.close()
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("name")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--mode", choices=["http", "reset"], default="http")
    a = ap.parse_args()
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    ls.bind(("::", a.port))
    ls.listen(4096)
    print("listening on %d as %s mode %s delay %.1f ms" % (a.port, a.name, a.mode, a.delay_ms), flush=True)
    delay = a.delay_ms / 1000.0
    linger = struct.pack("ii", 1, 0)
    while True:
        conn, _ = ls.accept()
        if a.mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            conn.close()
            continue
        t = threading.Thread(target=serve_http, args=(conn, a.name, delay), daemon=True)
        t.start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
