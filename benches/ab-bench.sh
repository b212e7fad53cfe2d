#!/bin/bash
# Before/after comparison of two ferry builds under one harness.
#
# usage: benches/ab-bench.sh ROUNDS DATASET BEFORE AFTER [ferry bench options...]
#   e.g. benches/ab-bench.sh 11 /dev/shm/x.ram /tmp/ferry-old target/release/ferry \
#            --channels 1,2 --tcp-congestion cubic
#
# Each round runs `AFTER bench --ferry-exe B --runs 1` once for each build B,
# the order of the two swapped every round (a fixed order biases the second
# build on this VM), and prints one line per case: build, channels, wall
# seconds, sender and receiver CPU seconds, then the system's steal time (ms)
# and compaction stalls during the run. Then the medians per build and
# channel count.
set -euo pipefail
rounds=$1 dataset=$2 before=$3 after=$4
shift 4
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq 0 $((rounds - 1))); do
  if (( i % 2 == 0 )); then order=("before:$before" "after:$after"); else order=("after:$after" "before:$before"); fi
  for entry in "${order[@]}"; do
    name=${entry%%:*} bin=${entry#*:}
    "$after" bench --ferry-exe "$bin" --dataset "$dataset" --runs 1 --json "$@" 2>/dev/null |
      python3 -c "
import json, sys
for c in json.load(sys.stdin)['cases']:
    s = c['samples'][0]
    y = s.get('system') or {}
    print('$name', c.get('channels', ''), round(s['wall_s'], 4), round(s.get('cpu_send_s', 0), 3), round(s.get('cpu_recv_s', 0), 3),
          y.get('steal_ms', 0), y.get('compact_stall', 0))" |
      tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import collections, statistics as st, sys
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    b, k, w, cs, cr = line.split()[:5]
    d[(k, b)].append((float(w), float(cs), float(cr)))
for (k, b), v in sorted(d.items()):
    w = [x[0] for x in v]
    print(f"{b:6} K={k} n={len(v)} wall median {st.median(w):.3f} s (min {min(w):.3f}, max {max(w):.3f}),"
          f" send CPU {st.median(x[1] for x in v):.3f} s, recv CPU {st.median(x[2] for x in v):.3f} s")
PY
