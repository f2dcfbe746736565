"""Stops ONE thread of a running process for a while, leaving its other threads running: what a
data-path thread stuck in a driver or a lock looks like to the rest of the process.

usage: stall_thread.py PID THREAD_NAME SECONDS

The cgroup v1 freezer, when mounted, freezes a single task (a thread id written to `tasks`);
otherwise (or with STALL_METHOD=ptrace) ptrace: PTRACE_SEIZE + PTRACE_INTERRUPT put only that thread in a ptrace-stop, and
PTRACE_DETACH lets it go. Prints the method and the thread id; exits non-zero on failure.
"""
import ctypes
import os
import sys
import time

pid, name, secs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
tid = None
for t in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
    with open(f"/proc/{pid}/task/{t}/comm") as f:
        if f.read().strip() == name:
            tid = int(t)
            break
if tid is None:
    sys.exit(f"no thread named {name} in {pid}")

freezer = "/sys/fs/cgroup/freezer"
use_freezer = os.environ.get("STALL_METHOD", "freezer") == "freezer"
if use_freezer and os.path.exists(f"{freezer}/tasks"):
    cg = f"{freezer}/lbtest-stall-{os.getpid()}"
    os.mkdir(cg)
    try:
        with open(f"{cg}/tasks", "w") as f:
            f.write(str(tid))
        with open(f"{cg}/freezer.state", "w") as f:
            f.write("FROZEN")
        print(f"freezer: thread {tid} frozen", flush=True)
        time.sleep(secs)
        with open(f"{cg}/freezer.state", "w") as f:
            f.write("THAWED")
        # Back to the root cgroup, then the group can go.
        with open(f"{freezer}/tasks", "w") as f:
            f.write(str(tid))
    finally:
        for _ in range(50):
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.02)
    print(f"freezer: thread {tid} thawed", flush=True)
else:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4206, 0x4207, 17
    if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
        sys.exit(f"PTRACE_SEIZE: {os.strerror(ctypes.get_errno())}")
    if libc.ptrace(PTRACE_INTERRUPT, tid, None, None) != 0:
        sys.exit(f"PTRACE_INTERRUPT: {os.strerror(ctypes.get_errno())}")
    os.waitpid(tid, 0x40000000)  # __WALL: the thread is in its ptrace-stop
    print(f"ptrace: thread {tid} stopped", flush=True)
    time.sleep(secs)
    libc.ptrace(PTRACE_DETACH, tid, None, None)
    print(f"ptrace: thread {tid} released", flush=True)
