#!/usr/bin/env python3
# benches/kvm-switchover-trace.py N: 2N traced 2 GiB KVM migrations (FERRY_SWITCHOVER_TRACE),
# alternating recv without and with --prebuild-kvm; prints each step's median (min-max) in ms.
# FERRY=path/to/ferry (default target/release/ferry). Needs /dev/kvm. (docs/MEASUREMENTS.md)
import subprocess, sys, json, re, statistics, tempfile, os, random, time
F = os.environ.get('FERRY', 'target/release/ferry')
N = int(sys.argv[1])  # runs per variant; alternates without and with --prebuild-kvm
env = dict(os.environ, FERRY_SWITCHOVER_TRACE='1')
rows = {(): [], ('--prebuild-kvm',): []}
for n in range(2 * N):
    extra = list(list(rows)[n % 2])
    port = random.randint(20000, 40000)
    r = subprocess.Popen([F, 'recv', '--listen', f'tcp:127.0.0.1:{port}', '--run-after', '2s', '--json', '--tcp-congestion', 'cubic'] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    time.sleep(0.5)
    s = subprocess.run([F, 'send', '--to', f'tcp:127.0.0.1:{port}', '--guest', 'kvm', '--size', '2G', '--vcpus', '2',
                        '--dirty-rate', '256M', '--dirty-pattern', 'random', '--dirty-tracker', 'kvm-log', '--downtime-limit', '30ms',
                        '--channels', '2', '--tcp-congestion', 'cubic', '--json'], capture_output=True, env=env, text=True)
    ro, re_ = r.communicate()
    marks = {}
    for line in (s.stderr + re_).splitlines():
        if line.startswith('ferry-switchover '):
            parts = line.split(' ')
            label = ' '.join(parts[1:-1]); t = int(parts[-1]) / 1e6
            if label.startswith('vmm: vCPU') and 'enters' in label:
                marks.setdefault('vcpu enters', []).append(t)
            elif label not in marks:
                marks[label] = t
            elif label.startswith('vmm: create') or label.startswith('vmm: restore'):
                marks[label] = t  # the destination's (later) one
    sv = json.loads(s.stdout.strip().splitlines()[-1]); rv = json.loads(ro.strip().splitlines()[-1])
    m = lambda k: marks.get(k)
    def d(a, b):
        a, b = m(a), m(b)
        return None if a is None or b is None else b - a
    ent = [t for t in marks.get('vcpu enters', []) if m('destination: guest built') and t > m('destination: guest built') - 1]
    row = {
        'pause (kick until every vCPU parked)': d('source: pausing', 'source: paused'),
        'final dirty-log sync + clear': d('source: paused', 'source: final dirty sync done'),
        'final pass sent': d('source: final dirty sync done', 'source: final pass sent'),
        'vCPU state saved': d('source: final pass sent', 'source: device state saved'),
        'DEVICE_STATE + COMPLETE sent': d('source: device state saved', 'source: COMPLETE sent'),
        'until the last page landed on the destination': d('source: COMPLETE sent', 'destination: every page landed'),
        'destination VM: KVM_CREATE_VM + irqchip': d('destination: every page landed', 'vmm: create: VM and irqchip made') if '--prebuild-kvm' not in extra else 0.0,
        'destination VM: memory registered': d('vmm: create: VM and irqchip made', 'vmm: create: memory registered') if '--prebuild-kvm' not in extra else 0.0,
        'destination: vCPUs + threads + state loaded (VM built)': d('vmm: create: memory registered' if '--prebuild-kvm' not in extra else 'destination: every page landed', 'destination: guest built'),
        'TSCs set, resumed': d('destination: guest built', 'destination: guest resumed'),
        'last vCPU in KVM_RUN (after resume began)': (max(ent) - m('destination: guest built')) if ent else None,
        'RESUMED back at the source': d('destination: guest resumed', 'source: RESUMED received'),
        'downtime (send)': sv.get('downtime_ms'),
        'guest first-line gap': (rv.get('workload') or {}).get('guest_switchover_gap_us', 0) / 1e3,
        'guest blackout (all lines 2 s)': (rv.get('workload') or {}).get('guest_blackout_us', 0) / 1e3,
    }
    rows[tuple(extra)].append(row)
    print(n, {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, file=sys.stderr)
R0, R1 = rows[()], rows[('--prebuild-kvm',)]
def sp(rs, k):
    vals = [r[k] for r in rs if r[k] is not None]
    return f"{statistics.median(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})" if vals else "-"
for k in R0[0]:
    print(f"| {k} | {sp(R0, k)} | {sp(R1, k)} |")
