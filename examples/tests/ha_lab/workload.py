#!/usr/bin/env python3
"""The client workload of the high-availability lab (examples/tests/ha_lab/mod.rs).

    workload.py --vip 203.0.113.10 --out report.json --stop-file stop --mark-file marks [...]

Runs, through the VIP, until --duration-s passes or --stop-file exists:
  * --downloads slots, each fetching GET /blob/<n>?rate=<r> over and over (a new one 200 ms after
    the previous ended): every byte is compared with blob(n) (see server.py) as it arrives and
    the whole body's SHA-256 at the end; a download that stalls --stall-s is broken;
  * a new short connection (GET /) every --conn-interval-ms from its own source port (a range no
    other client uses, so that no flow is reused), each on its own thread, bounded by
    --conn-timeout-s; it records the backend that answered;
  * --udp-flows UDP flows from fixed source ports, one datagram per --udp-interval-ms each; the
    backends echo `NAME payload`, so each answer names its backend.
Then it writes one JSON summary to --out (atomically) and prints `done`.

--mark-file holds unix times in ms, one per line (e.g. each kill instant, appended by the test
as it goes). The summary splits failures into windows: `before` [start, mark0) and one window
[mark_i, mark_i+1) per mark, with times relative to the window's mark.

Every network call has a timeout; the process exits by itself at --duration-s + 15 s at worst.
"""
import argparse
import hashlib
import json
import os
import random
import select
import socket
import sys
import threading
import time

STEP = 65536
SLOW_MS = 900


def now_ms():
    return int(time.time() * 1000)


def blob(n):
    rng = random.Random(n)
    parts = []
    left = n
    while left > 0:
        k = min(STEP, left)
        parts.append(rng.randbytes(k))
        left -= k
    return b"".join(parts)


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.downloads = []  # finished download records
        self.in_flight = {}  # slot -> record of the current download
        self.conns = []  # (start_ms, end_ms, ok, backend, error)
        self.flows = []  # per UDP flow dicts
        self.stop = threading.Event()


def family(vip):
    return socket.AF_INET6 if ":" in vip else socket.AF_INET


def source_addr(vip, port):
    """The address the kernel would use towards the VIP."""
    s = socket.socket(family(vip), socket.SOCK_DGRAM)
    try:
        s.connect((vip, port))
        return s.getsockname()[0]
    finally:
        s.close()


def read_headers(sock, deadline_s):
    """Reads until the blank line; returns (status, headers dict, leftover body bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("connection closed before the headers (%d bytes)" % len(data))
        data += chunk
        if len(data) > 65536 or time.monotonic() > deadline_s:
            raise OSError("bad or slow headers")
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def download_slot(st, a, slot, expected, expected_sha):
    while not st.stop.is_set():
        rec = {
            "slot": slot,
            "start_ms": now_ms(),
            "end_ms": 0,
            "last_byte_ms": 0,
            "bytes": 0,
            "expected": len(expected),
            "ok": False,
            "corrupted": False,
            "backend": "",
            "error": "",
        }
        with st.lock:
            st.in_flight[slot] = rec
        sock = None
        try:
            sock = socket.socket(family(a.vip), socket.SOCK_STREAM)
            sock.settimeout(a.conn_timeout_s)
            sock.connect((a.vip, a.port))
            sock.settimeout(a.stall_s)
            sock.sendall(
                ("GET /blob/%d?rate=%d HTTP/1.0\r\nHost: vip\r\n\r\n" % (len(expected), a.download_rate)).encode()
            )
            status, headers, body = read_headers(sock, time.monotonic() + a.stall_s)
            rec["backend"] = headers.get("x-backend", "")
            if status != 200:
                raise OSError("HTTP status %d" % status)
            h = hashlib.sha256()
            got = 0
            while True:
                if body:
                    if not rec["corrupted"] and expected[got : got + len(body)] != body:
                        rec["corrupted"] = True
                        rec["error"] = "content differs at or after byte %d" % got
                    h.update(body)
                    got += len(body)
                    rec["bytes"] = got
                    rec["last_byte_ms"] = now_ms()
                if st.stop.is_set():
                    break
                if got >= len(expected):
                    # The server closes after the body; anything more is corruption.
                    extra = sock.recv(4096)
                    if extra:
                        rec["corrupted"] = True
                        rec["error"] = "bytes after the body"
                    break
                body = sock.recv(65536)
                if not body:
                    raise OSError("closed after %d of %d bytes" % (got, len(expected)))
            if st.stop.is_set() and got < len(expected):
                # Cut short by the end of the run: neither broken nor complete.
                with st.lock:
                    st.in_flight[slot] = rec
                return
            if h.hexdigest() != expected_sha and not rec["corrupted"]:
                rec["corrupted"] = True
                rec["error"] = "SHA-256 differs"
            rec["ok"] = not rec["corrupted"]
        except (OSError, ValueError) as e:
            if not rec["error"]:
                rec["error"] = "%s: %s" % (type(e).__name__, e)
        finally:
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        rec["end_ms"] = now_ms()
        with st.lock:
            st.downloads.append(rec)
            st.in_flight.pop(slot, None)
        st.stop.wait(0.2)


def one_conn(st, a, src, sport):
    start = now_ms()
    t0 = time.monotonic()
    ok = False
    backend = ""
    err = ""
    sock = None
    try:
        sock = socket.socket(family(a.vip), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, sport))
        sock.settimeout(a.conn_timeout_s)
        sock.connect((a.vip, a.port))
        left = a.conn_timeout_s - (time.monotonic() - t0)
        if left <= 0:
            raise OSError("timed out")
        sock.settimeout(left)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
        status, headers, body = read_headers(sock, t0 + a.conn_timeout_s)
        while time.monotonic() < t0 + a.conn_timeout_s:
            more = sock.recv(4096)
            if not more:
                break
            body += more
        if status != 200:
            raise OSError("HTTP status %d" % status)
        backend = body.decode("latin-1").strip() or headers.get("x-backend", "")
        ok = bool(backend)
        if not ok:
            err = "empty answer"
    except (OSError, ValueError) as e:
        err = "%s: %s" % (type(e).__name__, e)
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    with st.lock:
        st.conns.append((start, now_ms(), ok, backend, err))


def conn_ticker(st, a, src):
    ports = list(range(a.conn_port_lo, a.conn_port_hi + 1))
    i = 0
    nxt = time.monotonic()
    threads = []
    while not st.stop.is_set():
        threads = [t for t in threads if t.is_alive()]
        if len(threads) >= 400:
            with st.lock:
                st.conns.append((now_ms(), now_ms(), False, "", "skipped: 400 connections in flight"))
        else:
            t = threading.Thread(target=one_conn, args=(st, a, src, ports[i % len(ports)]), daemon=True)
            t.start()
            threads.append(t)
            i += 1
        nxt += a.conn_interval_ms / 1000.0
        delay = nxt - time.monotonic()
        if delay > 0:
            st.stop.wait(delay)
        else:
            nxt = time.monotonic()
    for t in threads:
        t.join(timeout=a.conn_timeout_s + 1)


def udp_flows(st, a):
    socks = []
    for i in range(a.udp_flows):
        s = socket.socket(family(a.vip), socket.SOCK_DGRAM)
        s.bind(("", a.udp_base_port + i))
        s.connect((a.vip, a.udp_port))
        s.setblocking(False)
        socks.append(s)
        st.flows.append({"sport": a.udp_base_port + i, "sent": {}, "replies": []})
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    seq = 0
    nxt = time.monotonic()
    try:
        while not st.stop.is_set():
            t = now_ms()
            for i, s in enumerate(socks):
                try:
                    s.send(("f%d %d %d" % (i, seq, t)).encode())
                except OSError:
                    pass  # e.g. ECONNREFUSED from an earlier ICMP error: the datagram counts as lost
                st.flows[i]["sent"][seq] = t
            seq += 1
            nxt += a.udp_interval_ms / 1000.0
            while True:
                delay = nxt - time.monotonic()
                if delay <= 0 or st.stop.is_set():
                    break
                r, _, _ = select.select(socks, [], [], delay)
                for s in r:
                    i = by_fd[s.fileno()]
                    while True:
                        try:
                            data = s.recv(2048)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            break
                        parts = data.decode("latin-1").split()
                        if len(parts) >= 3 and parts[2].isdigit():
                            st.flows[i]["replies"].append((now_ms(), int(parts[2]), parts[0]))
            if nxt < time.monotonic() - 1.0:
                nxt = time.monotonic()
    finally:
        for s in socks:
            s.close()


def windows_of(marks, start, end):
    """[(name, mark, lo, hi)]: `before` then one window per mark."""
    out = [("before", start, start, marks[0] if marks else end)]
    for i, m in enumerate(marks):
        hi = marks[i + 1] if i + 1 < len(marks) else end
        out.append(("mark%d" % i, m, m, hi))
    return out


def summarize(st, a, started, ended, marks):
    w = windows_of(marks, started, ended)
    downloads = list(st.downloads)
    in_flight = list(st.in_flight.values())
    conns = sorted(st.conns)
    # Per UDP flow: answers in order of arrival, backend changes, silences, losses.
    flows = []
    grace = 1000  # a datagram sent in the last second may still be answered
    for f in st.flows:
        replies = sorted(f["replies"])
        answered = {q for _, q, _ in replies}
        lost = sorted(t for q, t in f["sent"].items() if q not in answered and t < ended - grace)
        changes = []
        prev = None
        tally = {}
        for t, _, b in replies:
            tally[b] = tally.get(b, 0) + 1
            if prev is not None and b != prev:
                changes.append({"t_ms": t, "from": prev, "to": b})
            prev = b
        gaps = []  # (from, to) between answers, including the start and the end
        times = [started] + [t for t, _, _ in replies] + [ended]
        for x, y in zip(times, times[1:]):
            gaps.append((x, y))
        longest = max(gaps, key=lambda g: g[1] - g[0]) if gaps else (started, started)
        flows.append(
            {
                "sport": f["sport"],
                "sent": len(f["sent"]),
                "received": len(replies),
                "lost": len(lost),
                "lost_ms": lost[:200],
                "all_lost": lost,
                "backends": tally,
                "changes": changes,
                "longest_silence_ms": longest[1] - longest[0],
                "longest_silence_from_ms": longest[0],
                "gaps": gaps,
                "first_reply_ms": replies[0][0] if replies else 0,
            }
        )
    out_windows = []
    for name, mark, lo, hi in w:
        cw = [c for c in conns if lo <= c[0] < hi]
        fails = [c for c in cw if not c[2]]
        slow = [c for c in cw if c[2] and c[1] - c[0] >= SLOW_MS]
        dw = [d for d in downloads if lo <= d["end_ms"] < hi]
        moved = 0
        lost = 0
        silence = 0
        for f in flows:
            if any(lo <= c["t_ms"] < hi for c in f["changes"]):
                moved += 1
            lost += sum(1 for t in f["all_lost"] if lo <= t < hi)
            for x, y in f["gaps"]:
                if y > lo and x < hi:
                    silence = max(silence, y - max(x, lo) if name != "before" else y - x)
        out_windows.append(
            {
                "name": name,
                "mark_unix_ms": mark,
                "from_unix_ms": lo,
                "to_unix_ms": hi,
                "conn_attempts": len(cw),
                "conn_failed": len(fails),
                "conn_first_fail_ms": (fails[0][0] - mark) if fails else None,
                "conn_last_fail_ms": (fails[-1][0] - mark) if fails else None,
                "conn_slow": len(slow),
                "conn_errors": sorted({c[4] for c in fails})[:10],
                "downloads_ended": len(dw),
                "downloads_broken": sum(1 for d in dw if not d["ok"]),
                "downloads_corrupted": sum(1 for d in dw if d["corrupted"]),
                "udp_flows_moved": moved,
                "udp_lost": lost,
                "udp_longest_silence_ms": silence,
            }
        )
    backends = {}
    for c in conns:
        if c[2]:
            backends[c[3]] = backends.get(c[3], 0) + 1
    for f in flows:
        del f["gaps"]
        del f["all_lost"]
    return {
        "started_unix_ms": started,
        "ended_unix_ms": ended,
        "marks": marks,
        "downloads": {
            "started": len(downloads) + len(in_flight),
            "ok": sum(1 for d in downloads if d["ok"]),
            "broken": sum(1 for d in downloads if not d["ok"]),
            "corrupted": sum(1 for d in downloads if d["corrupted"]),
            "in_flight": len(in_flight),
            "bytes": sum(d["bytes"] for d in downloads) + sum(d["bytes"] for d in in_flight),
            "records": downloads + [dict(d, end_ms=0) for d in in_flight],
        },
        "conns": {
            "attempts": len(conns),
            "ok": sum(1 for c in conns if c[2]),
            "failed": sum(1 for c in conns if not c[2]),
            "slow": sum(1 for c in conns if c[2] and c[1] - c[0] >= SLOW_MS),
            "backends": backends,
            "failures": [{"start_ms": c[0], "end_ms": c[1], "error": c[4]} for c in conns if not c[2]][:500],
        },
        "udp": {"flows": flows},
        "windows": out_windows,
    }


def read_marks(path):
    if not path:
        return []
    try:
        with open(path) as f:
            return sorted(int(x) for x in f.read().split() if x.strip().isdigit())
    except OSError:
        return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--udp-port", type=int, default=7000)
    ap.add_argument("--downloads", type=int, default=20)
    ap.add_argument("--download-bytes", type=int, default=1 << 20)
    ap.add_argument("--download-rate", type=int, default=32768)
    ap.add_argument("--stall-s", type=float, default=5.0)
    ap.add_argument("--conn-interval-ms", type=float, default=50.0)
    ap.add_argument("--conn-timeout-s", type=float, default=3.0)
    ap.add_argument("--conn-port-lo", type=int, default=20000)
    ap.add_argument("--conn-port-hi", type=int, default=31999)
    ap.add_argument("--udp-flows", type=int, default=10)
    ap.add_argument("--udp-base-port", type=int, default=10000)
    ap.add_argument("--udp-interval-ms", type=float, default=50.0)
    ap.add_argument("--duration-s", type=float, default=120.0)
    ap.add_argument("--stop-file", default="")
    ap.add_argument("--mark-file", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    expected = blob(a.download_bytes)
    expected_sha = hashlib.sha256(expected).hexdigest()
    src = source_addr(a.vip, a.port)
    st = State()
    started = now_ms()
    threads = [threading.Thread(target=udp_flows, args=(st, a), daemon=True)]
    threads.append(threading.Thread(target=conn_ticker, args=(st, a, src), daemon=True))
    for slot in range(a.downloads):
        threads.append(threading.Thread(target=download_slot, args=(st, a, slot, expected, expected_sha), daemon=True))
    for t in threads:
        t.start()
    print("running: vip %s source %s" % (a.vip, src), flush=True)
    deadline = time.monotonic() + a.duration_s
    while time.monotonic() < deadline:
        if a.stop_file and os.path.exists(a.stop_file):
            break
        time.sleep(0.05)
    ended = now_ms()
    st.stop.set()
    end_join = time.monotonic() + a.conn_timeout_s + 2
    for t in threads:
        t.join(timeout=max(0.0, end_join - time.monotonic()))
    with st.lock:
        try:
            report = summarize(st, a, started, ended, read_marks(a.mark_file))
        except Exception as e:  # a bug here must still produce a report
            report = {"error": "summary failed: %s: %s" % (type(e).__name__, e)}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, a.out)
    print("done", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(1)
    # Daemon threads may still block in a system call: leave at once.
    os._exit(0)
