#!/usr/bin/env bash
# What the `metrics` feature costs an in-memory hit: builds the
# `metrics_overhead` benchmark without and with the feature, runs the two
# builds in alternation (ROUNDS times, 3 by default) and prints the median
# of each line and its ratio to the build without the feature.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-3}"
build() {
    cargo bench --locked --bench metrics_overhead --no-run "$@" --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "metrics_overhead" and m.get("executable"):
        print(m["executable"])'
}
off="$(build)"
cp "$off" target/metrics_overhead_off
on="$(build --features metrics)"
cp "$on" target/metrics_overhead_on
out="$(mktemp)"
for _ in $(seq "$rounds"); do
    target/metrics_overhead_off >>"$out"
    target/metrics_overhead_on >>"$out"
done
python3 - "$out" <<'PY'
import re, statistics, sys
lines = {}
for line in open(sys.argv[1]):
    m = re.match(r"(.+): ([0-9.]+) ns", line.strip())
    if m:
        lines.setdefault(m.group(1), []).append(float(m.group(2)))
base = statistics.median(lines["off"])
print(f"off: {base:.1f} ns per in-memory hit (median of {len(lines['off'])} runs)")
for name in ("on, no recorder", "on, prometheus"):
    value = statistics.median(lines[name])
    target = 1.01 if name == "on, no recorder" else 1.05
    verdict = "met" if value / base <= target else "NOT MET"
    print(f"{name}: {value:.1f} ns, {value / base:.3f}x (target <= {target}x: {verdict})")
PY
rm -f "$out"
