#!/usr/bin/env bash
# A shaped link between two network namespaces, for running ferry by hand
# across something slower than loopback (the Rust twin, used by the tests,
# is ferry_bench::netns::NetLink).
#
#   benches/netns-link.sh up [RATE]   # default RATE 1gbit
#     ferry-src (10.77.0.1) <-- veth, tbf RATE both ways --> ferry-dst (10.77.0.2)
#   ip netns exec ferry-dst ferry recv --listen tcp:10.77.0.2:4444
#   ip netns exec ferry-src ferry send --ram R --to tcp:10.77.0.2:4444
#   benches/netns-link.sh down
#
# Needs root and iproute2 (ip, tc).
set -euo pipefail
cmd=${1:-}
rate=${2:-1gbit}
case "$cmd" in
up)
  ip netns add ferry-src
  ip netns add ferry-dst
  ip link add fvsrc netns ferry-src type veth peer name fvdst netns ferry-dst
  ip -n ferry-src addr add 10.77.0.1/24 dev fvsrc
  ip -n ferry-dst addr add 10.77.0.2/24 dev fvdst
  for ns in ferry-src ferry-dst; do
    dev=fv${ns#ferry-}
    ip -n "$ns" link set "$dev" up
    ip -n "$ns" link set lo up
    ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst 256kb latency 50ms
  done
  echo "netns-link: ferry-src 10.77.0.1 <-> ferry-dst 10.77.0.2 at $rate"
  ;;
down)
  ip netns del ferry-src 2>/dev/null || true
  ip netns del ferry-dst 2>/dev/null || true
  ;;
*)
  echo "usage: $0 up [RATE] | down" >&2
  exit 2
  ;;
esac
