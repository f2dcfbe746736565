#!/usr/bin/env python3
"""Print criterion medians (ns) as a Markdown table.

usage: scripts/bench-medians.py [TARGET_DIR] [GROUP_PREFIX]

Reads TARGET_DIR/criterion/**/new/estimates.json (written by `cargo bench -p lb-benches`), so the
numbers quoted in benches/README.md come straight from criterion's own estimates.
"""
import json
import os
import sys

target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CARGO_TARGET_DIR", "target")
prefix = sys.argv[2] if len(sys.argv) > 2 else ""
root = os.path.join(target, "criterion")
rows = []
for dirpath, _dirs, files in os.walk(root):
    if os.path.basename(dirpath) != "new" or "estimates.json" not in files:
        continue
    with open(os.path.join(dirpath, "benchmark.json")) as f:
        bench = json.load(f)
    name = bench.get("full_id") or bench.get("title")
    if not name.startswith(prefix):
        continue
    with open(os.path.join(dirpath, "estimates.json")) as f:
        est = json.load(f)
    med = est["median"]
    rows.append((name, med["point_estimate"], med["confidence_interval"]["lower_bound"],
                 med["confidence_interval"]["upper_bound"]))


def fmt(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.2f} ns"


print("| benchmark | median | 95% CI of median |")
print("| --- | ---: | --- |")
for name, m, lo, hi in sorted(rows):
    print(f"| `{name}` | {fmt(m)} | {fmt(lo)} – {fmt(hi)} |")
