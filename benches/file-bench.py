#!/usr/bin/env python3
"""File mode benchmark: ferry save/restore against QEMU's mapped-ram save and dd.

Each run measures, in this order (the order rotates from run to run so drift
on a shared machine hits every tool alike):

  dd      dd if=DATASET of=DIR/dd.out bs=4M oflag=direct, then
          dd if=DIR/dd.out of=/dev/null bs=4M iflag=direct
  ferry   ferry save --io IO --hole-min H (each mode in --modes: dense 1M,
          the default; mid 64K; sparse 4K, every zero page a hole; each IO
          in --io: auto, the default, is O_DIRECT here), then
          ferry restore --io IO, then ferry restore --lazy --io IO;
          the restored digests must equal the saved one
  qemu    ../shared/peer/qemu_peer.py file --ram-file DATASET (QEMU 10
          mapped-ram save of the same bytes; its wall_s)

All targets are files in DIR (on a real disk, not tmpfs), removed before each
write so no tool pays for freeing another's file. Before every restore or
QEMU run, memory is touched and freed (as `ferry bench` does) because this VM's
host backs fresh memory lazily; with --drop-caches (root) the page cache is
dropped before every read (dd's, and each restore), so no read is served from
the cache whatever the I/O mode. Prints one line per measurement and a table
of medians, min-max and ratios; --json writes them as JSON too.

usage: file-bench.py --dataset /dev/shm/x.ram --dir /work/fftmp [--runs 3]
                     [--channels 2] [--modes dense,sparse] [--io auto,buffered]
                     [--drop-caches] [--no-lazy] [--json out.json] [--ferry PATH]
"""

import argparse, json, mmap, os, re, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
FERRY = os.path.join(HERE, "..", "target", "release", "ferry")
PEER = os.path.join(HERE, "..", "..", "shared", "peer", "qemu_peer.py")
MODES = {"dense": ["--hole-min", "1M"], "mid": ["--hole-min", "64K"], "sparse": ["--hole-min", "4K"]}


def warm_memory(nbytes):
    """Touches and frees nbytes of anonymous memory in huge pages, as
    `ferry bench` does (benches/src/sys.rs warm_free_memory): this VM's host
    backs fresh memory lazily (~1.5 s/GiB), memory freed a moment ago is cheap."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    for i in range(0, nbytes, 4096):
        m[i] = 1
    m.close()


def rm(path):
    if os.path.exists(path):
        os.unlink(path)


DROP_CACHES = False


def drop_caches():
    """Writes back dirty pages and drops the page cache (needs root), so the
    read that follows comes from the disk."""
    if DROP_CACHES:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def dd(args):
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    m = re.search(r"copied, ([0-9.]+) s", out)
    return float(m.group(1))


def ferry_json(args):
    p = subprocess.run([FERRY, *args, "--json"], capture_output=True, text=True)
    v = json.loads(p.stdout.strip().splitlines()[-1])
    if p.returncode != 0 or v.get("status") != "completed":
        raise SystemExit(f"ferry {' '.join(args)} failed: {v.get('error')}\n{p.stderr}")
    return v


def run_dd(a, size, res):
    out = os.path.join(a.dir, "dd.out")
    rm(out)
    res.setdefault("dd_write_s", []).append(dd([f"if={a.dataset}", f"of={out}", "bs=4M", "oflag=direct"]))
    warm_memory(size)
    drop_caches()
    res.setdefault("dd_read_s", []).append(dd([f"if={out}", "of=/dev/null", "bs=4M", "iflag=direct"]))
    rm(out)


def io_args(io):
    # Builds before `--io` took `--direct-io` (auto) or nothing (buffered).
    return [] if io == "default" else ["--io", io]


def run_ferry(a, size, res, mode, io):
    sav = os.path.join(a.dir, "ferry.sav")
    rm(sav)
    ch = ["--channels", str(a.channels), *io_args(io)]
    key = f"ferry_{mode}" if io == "auto" else f"ferry_{mode}_{io}"
    s = ferry_json(["save", "--ram", a.dataset, "--to", f"file:{sav}", *ch, *MODES[mode]])
    warm_memory(size)
    drop_caches()
    r = ferry_json(["restore", "--from", f"file:{sav}", *ch])
    done = [("restore", r)]
    if not a.no_lazy:
        warm_memory(size)
        drop_caches()
        lz = ferry_json(["restore", "--from", f"file:{sav}", "--lazy", *ch])
        done.append(("lazy restore", lz))
        res.setdefault(f"{key}_lazy_first_write_ms", []).append(lz["lazy"]["first_write_ms"])
        res.setdefault(f"{key}_lazy_total_s", []).append(lz["seconds"])
    for what, v in done:
        if v["digest"] != s["digest"]:
            raise SystemExit(f"{what} digest {v['digest']} != saved {s['digest']}")
    for what, v in [("save", s)] + done:
        if io in ("auto", "direct") and not v.get("direct_io"):
            print(f"note: ferry {what} (--io {io}) used buffered I/O: {v.get('direct_io_fallback')}",
                  file=sys.stderr)
    res.setdefault(f"{key}_save_s", []).append(s["seconds"])
    res.setdefault(f"{key}_disk_bytes", []).append(s["file_disk_bytes"])
    res.setdefault(f"{key}_restore_s", []).append(r["seconds"])
    res.setdefault("digest", []).append(s["digest"])
    rm(sav)


def run_qemu(a, size, res):
    path = os.path.join(a.dir, "qemu.mram")
    rm(path)
    warm_memory(size)
    env = dict(os.environ)
    if os.path.isdir("/tmp/qwrap"):
        env["PATH"] = "/tmp/qwrap:" + env["PATH"]
    p = subprocess.run([sys.executable, PEER, "file", "--ram-file", a.dataset, "--channels", str(a.channels),
                        "--path", path], capture_output=True, text=True, env=env)
    v = json.loads(p.stdout.strip().splitlines()[-1])
    if v.get("status") != "completed":
        raise SystemExit(f"qemu failed: {p.stdout}\n{p.stderr}")
    res.setdefault("qemu_save_s", []).append(v["wall_s"])
    rm(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--modes", default="dense,sparse")
    ap.add_argument("--io", default="auto",
                    help="ferry's --io values to measure, comma separated (auto, direct, buffered; "
                         "'default' passes no --io, for older builds)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every read (needs root)")
    ap.add_argument("--no-lazy", action="store_true", help="skip the lazy restores")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ferry", default=None,
                    help="the ferry binary to measure (default: target/release/ferry), "
                         "e.g. an older build for a before/after comparison")
    a = ap.parse_args()
    if a.ferry:
        global FERRY
        FERRY = os.path.abspath(a.ferry)
    global DROP_CACHES
    DROP_CACHES = a.drop_caches
    size = os.path.getsize(a.dataset)
    tools = [("dd", lambda r: run_dd(a, size, r))]
    ios = a.io.split(",")
    for m in a.modes.split(","):
        for io in ios:
            tools.append((f"ferry {m} --io {io}", lambda r, m=m, io=io: run_ferry(a, size, r, m, io)))
    if not a.no_qemu:
        tools.append(("qemu", lambda r: run_qemu(a, size, r)))
    res = {}
    for run in range(a.runs):
        order = tools[run % len(tools):] + tools[:run % len(tools)]
        for name, f in order:
            t = time.time()
            f(res)
            print(f"run {run + 1}: {name} done in {time.time() - t:.1f} s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in res.items() if k != "digest"}
    rng = {k: (min(v), max(v)) for k, v in res.items() if k != "digest"}
    gb = size / 1e9

    def fmt(k, unit="s"):
        lo, hi = rng[k]
        return f"{med[k]:.3f} {unit} (min-max {lo:.3f}-{hi:.3f})"

    print(f"\n{size >> 20} MiB dataset {a.dataset}, target dir {a.dir}, {a.channels} channel(s), "
          f"{a.runs} run(s), page cache {'dropped before every read' if a.drop_caches else 'not dropped'}, "
          f"medians (all runs: {json.dumps({k: v for k, v in res.items() if k != 'digest'})})")
    print(f"dd oflag=direct write: {fmt('dd_write_s')} ({gb / med['dd_write_s']:.2f} GB/s); "
          f"dd iflag=direct read: {fmt('dd_read_s')} ({gb / med['dd_read_s']:.2f} GB/s)")
    if "qemu_save_s" in med:
        print(f"QEMU mapped-ram save: {fmt('qemu_save_s')}")
    for m in a.modes.split(","):
        for io in ios:
            key = f"ferry_{m}" if io == "auto" else f"ferry_{m}_{io}"
            sv, rs = med[f"{key}_save_s"], med[f"{key}_restore_s"]
            line = (f"ferry {m} ({' '.join(MODES[m])}) --io {io}: save {fmt(key + '_save_s')}, "
                    f"{gb / sv:.2f} GB/s of RAM, {100 * med['dd_write_s'] / sv:.0f}% of dd write speed")
            if "qemu_save_s" in med:
                line += f", {sv / med['qemu_save_s']:.2f}x QEMU's wall time"
            line += (f"; file on disk {med[key + '_disk_bytes'] / 2**30:.2f} GiB; restore "
                     f"{fmt(key + '_restore_s')}, {100 * med['dd_read_s'] / rs:.0f}% of dd read speed")
            if not a.no_lazy:
                line += (f"; lazy restore: first write after {med[key + '_lazy_first_write_ms']:.1f} ms, "
                         f"all pages in {fmt(key + '_lazy_total_s')}")
            print(line)
    print(f"digests: every restore equal to its save ({sorted(set(res['digest']))})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": res, "medians": med, "size": size}, f, indent=1)


if __name__ == "__main__":
    main()
