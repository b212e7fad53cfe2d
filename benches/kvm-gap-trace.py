#!/usr/bin/env python3
# benches/kvm-gap-trace.py N [recv-extra...]: N traced 2 GiB KVM migrations (FERRY_SWITCHOVER_TRACE);
# places every guest TSC gap above 5 ms on the trace's timeline and says which phase it fell in.
# The guest's TSC is the host's under kvm_pvm (docs/MEASUREMENTS.md), so its progress lines'
# gap_end_tsc maps to UNIX time through the trace's `ferry-clock TSC UNIX_NS` pairs.
# FERRY=path/to/ferry (default target/release/ferry); SEND_EXTRA="..." adds send flags; RUN_AFTER=6s
# lets the destination's guest run longer (default 2s). The send starts once recv listens, as in
# `ferry bench`. WARM_GIB=5 warms and releases that much memory before each run, as
# `ferry bench` does, with free page reporting paused (KEEP_REPORTING=1 leaves it on). Needs /dev/kvm.
import subprocess, sys, json, os, random, time, statistics
F = os.environ.get('FERRY', 'target/release/ferry')
N = int(sys.argv[1])
recv_extra = sys.argv[2:]
send_extra = os.environ.get('SEND_EXTRA', '').split()
env = dict(os.environ, FERRY_SWITCHOVER_TRACE='1')
MIN_MS = 5.0
summary = []
def warm(nbytes):
    # What `ferry bench` does before each run: touch NBYTES of fresh memory (huge pages
    # advised) and release it, so the runs start with the host's memory backed alike.
    import mmap
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    for off in range(0, nbytes, 4096):
        m[off] = 1
    m.close()

WARM = int(os.environ.get('WARM_GIB', '0')) << 30
# Like `ferry bench`, pause free page reporting while warming (KEEP_REPORTING=1 leaves it on).
REPORTING = '/sys/module/page_reporting/parameters/page_reporting_order'
reporting_was = None
if WARM and not os.environ.get('KEEP_REPORTING') and os.path.exists(REPORTING):
    reporting_was = open(REPORTING).read().strip()
    open(REPORTING, 'w').write('11')
for n in range(N):
    if WARM:
        warm(WARM)
    port = random.randint(20000, 40000)
    r = subprocess.Popen([F, 'recv', '--listen', f'tcp:127.0.0.1:{port}', '--run-after', os.environ.get('RUN_AFTER', '2s'), '--json',
                          '--tcp-congestion', 'cubic', '--prebuild-kvm'] + recv_extra,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    # Start the send the moment recv listens, as `ferry bench` does.
    early = []
    for line in r.stderr:
        early.append(line)
        if line.startswith('ferry: listening on'):
            break
    s = subprocess.run([F, 'send', '--to', f'tcp:127.0.0.1:{port}', '--guest', 'kvm', '--size', '2G', '--vcpus', '2',
                        '--dirty-rate', '256M', '--dirty-pattern', 'random', '--dirty-tracker', 'kvm-log',
                        '--downtime-limit', '30ms', '--channels', '2', '--tcp-congestion', 'cubic', '--json'] + send_extra,
                       capture_output=True, env=env, text=True)
    ro, rerr = r.communicate()
    rerr = ''.join(early) + rerr
    clock, marks, gaps, syncs = [], {}, [], []
    for side, text in (('src', s.stderr), ('dst', rerr)):
        sync_begin = None
        for line in text.splitlines():
            p = line.split(' ')
            if p[0] == 'ferry-clock' and len(p) == 3:
                clock.append((int(p[1]), int(p[2])))
            elif p[0] == 'ferry-switchover':
                label, t = ' '.join(p[1:-1]), int(p[-1])
                if label.startswith('guest: ferry progress'):
                    f = dict(w.split('=', 1) for w in p[4:-1] if '=' in w)
                    if 'gap_end_tsc' in f:
                        gaps.append((side, int(f['vcpu']), int(f['gap_ticks']), int(f['gap_end_tsc']), t))
                elif label == 'vmm: dirty-log sync begins':
                    sync_begin = t
                elif label == 'vmm: dirty-log sync done' and sync_begin:
                    syncs.append((side, sync_begin, t))
                else:
                    marks.setdefault((side, label), t)
    clock.sort()
    if len(clock) < 2:
        print('no clock pairs: is this build tracing ferry-clock?', file=sys.stderr)
        sys.exit(1)
    hz = (clock[-1][0] - clock[0][0]) / ((clock[-1][1] - clock[0][1]) / 1e9)
    def ns_of(tsc):
        ref = min(clock, key=lambda c: abs(c[0] - tsc))
        return ref[1] + (tsc - ref[0]) / hz * 1e9
    t0 = marks.get(('src', 'source: pausing'))
    resumed = marks.get(('dst', 'destination: guest resumed'))
    if t0 is None or resumed is None:
        print('run', n, 'has no switchover marks', file=sys.stderr)
        continue
    ms = lambda t: (t - t0) / 1e6
    sv = json.loads(s.stdout.strip().splitlines()[-1]); rv = json.loads(ro.strip().splitlines()[-1])
    print(f'run {n}: downtime {sv.get("downtime_ms")} ms, guest blackout '
          f'{(rv.get("workload") or {}).get("guest_blackout_us", 0) / 1e3} ms, TSC {hz / 1e9:.4f} GHz; '
          f'destination resumed at +{ms(resumed):.1f} ms; time 0 is UNIX {t0 / 1e9:.6f} s')
    for (side, label), t in sorted(marks.items(), key=lambda kv: kv[1]):
        if -3000 < ms(t) < 2500 and 'guest:' not in label:
            print(f'    {ms(t):9.2f} {side} {label}')
    for side, b, e in syncs:
        if -2500 < ms(b) < 100:
            print(f'    {ms(b):9.2f} {side} dirty-log sync, {(e - b) / 1e6:.2f} ms')
    worst = {}
    for side, vcpu, ticks, end_tsc, line_t in gaps:
        g = ticks / hz * 1e3
        if g < MIN_MS:
            continue
        end = ms(ns_of(end_tsc)); start = end - g
        if end <= 0:
            phase = 'source, before the pause (precopy)'
        elif start >= ms(resumed):
            phase = 'destination, after resume'
        else:
            phase = 'switchover (pause..resume)'
        print(f'    gap {g:7.2f} ms vcpu {vcpu} [{start:9.2f}, {end:9.2f}] reported by {side}: {phase}')
        worst[phase] = max(worst.get(phase, 0), g)
    summary.append(worst)
    print('  largest per phase:', {k: round(v, 1) for k, v in worst.items()})
if reporting_was is not None:
    open(REPORTING, 'w').write(reporting_was)
phases = sorted({k for w in summary for k in w})
for ph in phases:
    v = [w.get(ph, 0.0) for w in summary]
    print(f'| {ph} | {statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f}) |')
