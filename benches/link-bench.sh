#!/usr/bin/env bash
# Compression across a slow, real link: ferry with and without
# `--compress zstd[:LEVEL]`, alternating, across a veth pair between two
# network namespaces shaped to RATE (benches/netns-link.sh). Prints each run
# (sender's wall time, guest-RAM rate, wire bytes, payload ratio) and the
# median guest-RAM rates with their ratio.
#
#   benches/link-bench.sh DATASET [RUNS=3] [RATE=1gbit] [CHANNELS=2] [LEVEL=1]
#
# DATASET is a file holding the guest's RAM (`ferry gen ... -o FILE`), or
# `files:SIZE` to build one of real file contents at /dev/shm: the first SIZE
# MiB of the regular files under /usr/lib, /usr/bin and /usr/share in sorted
# walk order (code, libraries and text, as much of a guest's memory is).
# Needs root and iproute2 (ip, tc), python3, and a release build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ferry=$here/../target/release/ferry
dataset=${1:?usage: $0 DATASET [RUNS] [RATE] [CHANNELS] [LEVEL]}
runs=${2:-3}
rate=${3:-1gbit}
channels=${4:-2}
level=${5:-1}

if [[ $dataset == files:* ]]; then
  mib=${dataset#files:}
  dataset=/dev/shm/ferry-files-${mib}M.ram
  python3 - "$dataset" "$mib" <<'PY'
import os, sys
path, limit = sys.argv[1], int(sys.argv[2]) << 20
total = 0
with open(path, "wb") as out:
    for top in ["/usr/lib", "/usr/bin", "/usr/share"]:
        for d, dirs, files in os.walk(top):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                if total >= limit or os.path.islink(p) or not os.path.isfile(p):
                    continue
                try:
                    with open(p, "rb") as src:
                        b = src.read(limit - total)
                except OSError:
                    continue
                out.write(b)
                total += len(b)
    if total < limit:
        sys.exit(f"only {total} bytes of files found")
print(f"dataset: {path}, {total >> 20} MiB of file contents", file=sys.stderr)
PY
fi
[[ -x $ferry ]] || { echo "build first: cargo build --release -p ferry-tools" >&2; exit 2; }

"$here/netns-link.sh" up "$rate" >/dev/null
work=$(mktemp -d)
trap '"$here/netns-link.sh" down; rm -rf "$work"' EXIT
port=4500
for run in $(seq "$runs"); do
  for mode in plain zstd; do
    port=$((port + 1))
    extra=()
    [[ $mode == zstd ]] && extra=(--compress "zstd:$level")
    ip netns exec ferry-dst "$ferry" recv --listen "tcp:10.77.0.2:$port" --json --no-digest \
      >"$work/recv.json" 2>"$work/recv.err" &
    recv=$!
    for _ in $(seq 100); do grep -q "listening on" "$work/recv.err" && break; sleep 0.05; done
    ip netns exec ferry-src "$ferry" send --ram "$dataset" --to "tcp:10.77.0.2:$port" \
      --channels "$channels" --json "${extra[@]}" >"$work/send.json" 2>"$work/send.err"
    wait "$recv"
    python3 - "$work" "$mode" "$run" <<'PY' | tee -a "$work/runs.txt"
import json, sys
work, mode, run = sys.argv[1:]
last = lambda f: json.loads(open(f"{work}/{f}").read().strip().splitlines()[-1])
s, r = last("send.json"), last("recv.json")
if s["status"] != "completed" or r["status"] != "completed":
    sys.exit(f"run {run} {mode} failed: {s.get('error') or r.get('error')}")
print(f"{mode} run {run}: {s['seconds']:.3f} s, {s['gbps_ram']:.3f} GB/s RAM, "
      f"wire {s['wire_bytes'] / 2**20:.0f} MiB, payload ratio {s.get('compression_ratio') or 1:.2f}")
PY
  done
done
python3 - "$work/runs.txt" "$rate" <<'PY'
import re, statistics, sys
rates = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\w+) run \d+: .* ([\d.]+) GB/s RAM", line)
    rates.setdefault(m[1], []).append(float(m[2]))
p, z = statistics.median(rates["plain"]), statistics.median(rates["zstd"])
print(f"medians across {sys.argv[2]}: plain {p:.3f} GB/s, zstd {z:.3f} GB/s of guest RAM: {z / p:.2f}x")
PY
