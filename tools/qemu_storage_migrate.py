#!/usr/bin/env python3
"""QEMU half of the storage-migration benchmark (tools/bench-storage-migrate),
and the measuring helpers both halves share.

QEMU is driven the way libvirt's `virsh migrate --live --copy-storage-all`
drives it: the destination QEMU starts with `-incoming defer -S` and a
pre-created empty raw image of the same size, exports it writable over NBD
(`nbd-server-start` + `nbd-server-add`); the source adds an NBD client node
for that export and starts `blockdev-mirror` to it with `sync=full` and
`copy-mode=write-blocking`; on `BLOCK_JOB_READY` it migrates memory
(auto-converge on, downtime-limit 50 ms, no bandwidth cap); once the
migration has completed (the source is paused) it cancels the mirror job
(for a READY job that ends it in sync, without pivoting), the destination
stops its NBD server and is resumed with `cont`.

Both QEMUs run in the two network namespaces of tools/two-hosts (source in
host a, destination in host b), so that NBD and the migration stream cross
the same veth link as Ferry's share and migration channel.

API (stdlib only):

    TwoHosts(tag)                        context manager: tools/two-hosts up/down
    run_qemu_storage_migration(hosts, workdir, master_image, cmdline, ...) -> dict

Serial lines are stamped on arrival with time.monotonic() by
qemu_migrate.SerialLog; gaps and write rates come from those stamps, with the
same code for Ferry and QEMU.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ left in tools/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qemu_migrate as qm  # noqa: E402

REPO = qm.REPO
TWO_HOSTS = str(REPO / "tools" / "two-hosts")

# Workload lines: idle ticks, dirty passes, blkwrite rounds (with the writes
# so far).
WORKLOAD_LINE = re.compile(
    rb"testkernel: (?:tick (\d+)|dirty pass=(\d+) ok|blkwrite round=(\d+) writes=(\d+) ok)")
BLKWRITE_LINE = re.compile(rb"testkernel: blkwrite round=(\d+) writes=(\d+) ok")
# Seconds of steady blkwrite rounds (round 2 on: round 1 only writes) seen
# before migrating, to measure the unmirrored write rate.
BASELINE_S = 2.0
IDLE_STEADY_TICKS = 3
DEST_LINES = 2

NBD_PORT = 10809
MIGRATION_PORT = 4444
JOB = "migrate-d0"


# --- two hosts ---------------------------------------------------------------

class TwoHosts:
    """Two fresh network namespaces joined by a veth pair (tools/two-hosts),
    removed on exit, also on errors and signals that unwind."""

    _count = 0

    def __init__(self, tag: str = "bsm"):
        TwoHosts._count += 1
        n = TwoHosts._count
        pid = os.getpid()
        # veth names keep 12 characters of the name: keep it unique in those.
        self.name = f"{tag}{pid % 100000}x{n}"[:12]
        self.subnet = f"10.{150 + pid % 50}.{n % 250}"
        self.ip_a, self.ip_b = f"{self.subnet}.1", f"{self.subnet}.2"
        self.ns_a, self.ns_b = f"{self.name}-a", f"{self.name}-b"
        self.up = False

    def __enter__(self):
        subprocess.run([TWO_HOSTS, "down", self.name], capture_output=True, timeout=30)
        p = subprocess.run([TWO_HOSTS, "up", self.name, self.subnet], capture_output=True,
                           text=True, timeout=30)
        self.up = True
        if p.returncode != 0:
            self.__exit__(None, None, None)
            raise OSError(f"tools/two-hosts up {self.name} failed: {p.stderr.strip()}")
        return self

    def __exit__(self, *exc):
        if self.up:
            subprocess.run([TWO_HOSTS, "down", self.name], capture_output=True, timeout=30)
            self.up = False
        return False

    def cmd(self, host: str, args: list[str]) -> list[str]:
        """args run in host "a" or "b" (ip netns exec execs them: the child's
        pid is the program's)."""
        return ["ip", "netns", "exec", self.ns_a if host == "a" else self.ns_b] + list(args)


# --- measuring helpers (shared with the Ferry half) ----------------------------

def workload_numbers(lines) -> list[int]:
    out = []
    for _, line in lines:
        m = WORKLOAD_LINE.search(line)
        if m:
            out.append(int(m.group(1) or m.group(2) or m.group(3)))
    return out


def count_workload(lines) -> int:
    return sum(1 for _, l in lines if WORKLOAD_LINE.search(l))


def steady(case: str):
    """Predicate over serial lines: the guest is in its steady state and the
    baseline (usual interval, unmirrored write rate) can be measured."""
    if case == "idle":
        return lambda ls: count_workload(ls) >= IDLE_STEADY_TICKS

    def pred(ls):
        stamps = [t for t, l in ls if (m := BLKWRITE_LINE.search(l)) and int(m.group(1)) >= 2]
        return len(stamps) >= 3 and stamps[-1] - stamps[0] >= BASELINE_S
    return pred


def usual_interval_ms(lines) -> float | None:
    stamps = [t for t, l in lines if WORKLOAD_LINE.search(l)]
    intervals = [b - a for a, b in zip(stamps, stamps[1:])][-10:]
    return statistics.median(intervals) * 1000 if intervals else None


def write_rate(lines, t0: float, t1: float) -> tuple[float, bool] | None:
    """Guest writes per second while [t0, t1], from the blkwrite lines:
    (rate, True) measured from the first to the last line that arrived in
    the window when there are at least two; else (bound, False), an upper
    bound (one more round than were seen, over the whole window). None
    without blkwrite lines."""
    pts = [(t, int(m.group(1)), int(m.group(2))) for t, l in lines
           if (m := BLKWRITE_LINE.search(l))]
    if not pts or t1 <= t0:
        return None
    inside = [(t, w) for t, rnd, w in pts if t0 <= t <= t1 and rnd >= 2]
    if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), True
    per_round = pts[0][2] // pts[0][1]
    return (len(inside) + 1) * per_round / (t1 - t0), False


def continuity(src_lines, src_partial, dst_lines) -> str | None:
    """None if the guest went on on the destination where it stopped on the
    source (numbers follow on, no FAIL, no reboot), else what went wrong."""
    joined = [(dst_lines[0][0], src_partial + dst_lines[0][1])] + dst_lines[1:]
    src_nums, dst_nums = workload_numbers(src_lines), workload_numbers(joined)
    bad = [l for _, l in src_lines if b"FAIL" in l] + \
          [l for _, l in joined if b"FAIL" in l or b"booted" in l]
    seq = src_nums[-1:] + dst_nums
    if not bad and src_nums and dst_nums and all(b == a + 1 for a, b in zip(seq, seq[1:])):
        return None
    return (f"guest did not continue: source ended at {src_nums[-1:]}, destination printed "
            f"{dst_nums[:5]}" + (f", {bad[0].decode(errors='replace')!r}" if bad else ""))


def sha256(path, deadline: float | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"hashing {path} ran out of time")
    return h.hexdigest()


def data_bytes(path) -> int:
    """Bytes in the data extents of a (sparse) file."""
    total, pos = 0, 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fd = f.fileno()
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data after pos
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += min(end, size) - start
            pos = end
    return total


def sparse_copy(src, dst):
    """cp keeps holes (it asks for SEEK_DATA/SEEK_HOLE)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True, timeout=120)


# --- QMP with events ---------------------------------------------------------

class EvQmp(qm.Qmp):
    """qemu_migrate.Qmp that keeps the events it reads (stamped on arrival)
    instead of dropping them, and can wait for one."""

    def __init__(self, path, proc, deadline):
        self.events: list[dict] = []
        super().__init__(path, proc, deadline)

    def _next(self, deadline):
        msg = self._read(deadline)
        if "event" in msg:
            msg["_t"] = time.monotonic()
            self.events.append(msg)
        return msg

    def wait_event(self, pred, deadline: float) -> dict:
        while True:
            for i, ev in enumerate(self.events):
                if pred(ev):
                    return self.events.pop(i)
            self._next(deadline)


# --- one QEMU storage migration -----------------------------------------------

def run_qemu_storage_migration(hosts: TwoHosts, workdir: str, master_image, cmdline: str,
                               case: str, memory_mib: int = 512, vcpus: int = 1,
                               max_downtime_ms: int = 50, timeout_s: float = 180,
                               check_image: bool = False) -> dict:
    """Never raises for run-time failures: they come back as ok=False."""
    r = {"ok": False, "error": None, "mirror_ms": None, "mirror_len": None,
         "mem_ms": None, "downtime_ms": None, "total_ms": None, "switchover_ms": None,
         "gap_ms": None, "usual_interval_ms": None, "extra_gap_ms": None,
         "writes_before": None, "writes_mirror": None, "writes_serial": None,
         "write_ratio": None, "bytes": None, "passes": None,
         "max_throttle_pct": 0, "identical": None}
    deadline = time.monotonic() + timeout_s
    procs, logs, errs, qmps = {}, {}, {}, []

    def fail(msg):
        details = "; ".join(f"{n} stderr: {e.text()}" for n, e in errs.items() if e.text())
        r["error"] = f"{msg} ({details})" if details else msg
        return r

    def start(name, host, extra):
        qmp_path = os.path.join(workdir, f"{name}.qmp")
        args = qm._machine_args(qm.DEFAULT_KERNEL, cmdline, memory_mib, vcpus,
                                qm._host_tsc_hz()) + [
            "-qmp", f"unix:{qmp_path},server=on,wait=off"] + extra
        p = subprocess.Popen(hosts.cmd(host, args), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir)
        procs[name] = p
        logs[name] = qm.SerialLog(p.stdout)
        errs[name] = qm.StderrTail(p.stderr)
        q = EvQmp(qmp_path, p, min(deadline, time.monotonic() + 15))
        qmps.append(q)
        return q

    def drive(path):
        return ["-drive", f"id=d0,file={path},format=raw,if=none",
                "-device", "virtio-blk-device,drive=d0"]

    try:
        src_img = os.path.join(workdir, "qemu-src.img")
        dst_img = os.path.join(workdir, "qemu-dst.img")
        sparse_copy(master_image, src_img)
        with open(dst_img, "wb") as f:  # empty, same size, as libvirt pre-creates it
            f.truncate(os.path.getsize(master_image))
        os.sync()  # leave no writeback of the copies for the measured part

        # Destination: paused after the incoming migration (-S), its disk
        # exported over NBD for the mirror, as libvirt sets it up.
        dst = start("dst", "b", drive(dst_img) + ["-incoming", "defer", "-S"])
        dst.cmd("nbd-server-start", addr={"type": "inet", "data": {
            "host": hosts.ip_b, "port": str(NBD_PORT)}})
        dst.cmd("nbd-server-add", device="d0", writable=True)
        dst.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "events", "state": True}])
        dst.cmd("migrate-incoming", uri=f"tcp:{hosts.ip_b}:{MIGRATION_PORT}")

        src = start("src", "a", drive(src_img))
        if not logs["src"].wait_for(steady(case), deadline):
            lines, _ = logs["src"].snapshot()
            last = lines[-1][1].decode(errors="replace") if lines else "nothing"
            return fail(f"source guest did not reach its steady state (last line {last!r})")
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "auto-converge", "state": True},
            {"capability": "events", "state": True}])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": qm.UNLIMITED_BANDWIDTH,
                                             "downtime-limit": max_downtime_ms})
        params = src.cmd("query-migrate-parameters")
        if params.get("max-bandwidth") != qm.UNLIMITED_BANDWIDTH or \
                params.get("downtime-limit") != max_downtime_ms:
            return fail(f"migration parameters did not stick: {params}")

        before, _ = logs["src"].snapshot()
        r["usual_interval_ms"] = usual_interval_ms(before)
        if r["usual_interval_ms"] is None:
            return fail("no workload interval measured on the source")

        # The mirror: an NBD client node for the export, then blockdev-mirror.
        src.cmd("blockdev-add", **{"driver": "nbd", "node-name": "mirror-d0",
                                   "server": {"type": "inet", "host": hosts.ip_b,
                                              "port": str(NBD_PORT)},
                                   "export": "d0"})
        wr0 = _writes(src)
        t_start = time.monotonic()
        src.cmd("blockdev-mirror", **{"job-id": JOB, "device": "d0", "target": "mirror-d0",
                                      "sync": "full", "copy-mode": "write-blocking"})
        try:
            ev = src.wait_event(lambda e: e["event"] in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                                         "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
                                and e.get("data", {}).get("device") == JOB, deadline)
        except qm.QmpError as e:
            return fail(f"mirror not READY: {e}")
        if ev["event"] != "BLOCK_JOB_READY":
            return fail(f"mirror ended before READY: {ev}")
        t_ready = ev["_t"]
        wr1 = _writes(src)
        r["mirror_ms"] = (t_ready - t_start) * 1000
        r["mirror_len"] = ev["data"].get("len")

        # Memory, while the mirror keeps the copy in sync (write-blocking).
        src.cmd("migrate", uri=f"tcp:{hosts.ip_b}:{MIGRATION_PORT}")
        try:
            ev = src.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in
                                ("completed", "failed", "cancelled"), deadline)
        except qm.QmpError as e:
            try:
                src.cmd("migrate_cancel")
            except qm.QmpError:
                pass
            return fail(f"migration did not end: {e}")
        t_done = ev["_t"]
        if ev["data"]["status"] != "completed":
            info = src.cmd("query-migrate")
            return fail(f"migration {info.get('status')}: {info.get('error-desc', 'no reason')}")

        # libvirt's end: cancel the READY mirror on the (paused) source, which
        # leaves the copy complete and in sync; stop the destination's NBD
        # server; resume the destination.
        src.cmd("block-job-cancel", device=JOB)
        try:
            src.wait_event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                           and e.get("data", {}).get("device") == JOB, deadline)
        except qm.QmpError as e:
            return fail(f"mirror job did not end after block-job-cancel: {e}")
        dst.cmd("nbd-server-stop")
        dst.cmd("cont")
        t_cont = time.monotonic()
        r["switchover_ms"] = (t_cont - t_done) * 1000
        r["total_ms"] = (t_cont - t_start) * 1000

        # QEMU 7.2 sends the "completed" event before it computes total-time
        # and downtime (both read 0 until then): ask until they are in.
        stats_deadline = time.monotonic() + 2
        while True:
            info = src.cmd("query-migrate")
            if info.get("total-time") or time.monotonic() > stats_deadline:
                break
            time.sleep(0.005)
        ram = info.get("ram", {})
        r.update(mem_ms=info.get("total-time"), downtime_ms=info.get("downtime"),
                 bytes=ram.get("transferred"), passes=ram.get("dirty-sync-count"),
                 max_throttle_pct=info.get("cpu-throttle-percentage", 0))

        usual = r["usual_interval_ms"]
        dst_deadline = min(deadline, time.monotonic() + 10 + 4 * usual / 1000)
        if not logs["dst"].wait_for(lambda ls: count_workload(ls) >= DEST_LINES or
                                    any(b"FAIL" in l or b"booted" in l for _, l in ls),
                                    dst_deadline):
            st = dst.cmd("query-status").get("status")
            return fail(f"destination printed no workload lines after migration (status {st})")
        src_lines, src_partial = logs["src"].snapshot()
        dst_lines, _ = logs["dst"].snapshot()
        if not src_lines or not dst_lines:
            return fail("no serial lines to compare")
        r["gap_ms"] = (dst_lines[0][0] - src_lines[-1][0]) * 1000
        r["extra_gap_ms"] = r["gap_ms"] - usual
        if case == "blkwrite":
            # Before: the serial lines; while mirroring: QEMU's own count of
            # the guest's writes (the lines are too sparse there).
            r["writes_before"] = write_rate(src_lines, t_start - BASELINE_S - 0.5, t_start)
            r["writes_serial"] = write_rate(src_lines, t_start, t_ready)
            if wr0 is not None and wr1 is not None and t_ready > t_start:
                r["writes_mirror"] = ((wr1 - wr0) / (t_ready - t_start), True)
            if r["writes_before"] and r["writes_mirror"]:
                r["write_ratio"] = r["writes_mirror"][0] / r["writes_before"][0]
        why = continuity(src_lines, src_partial, dst_lines)
        if why:
            return fail(why)
        if check_image:
            # The guest on the destination has gone on writing (blkwrite): only
            # an idle guest's images can be compared afterwards.
            r["identical"] = sha256(src_img, deadline + 60) == sha256(dst_img, deadline + 60)
            if not r["identical"]:
                return fail("the destination image differs from the source image")
        r["ok"] = True
        return r
    except Exception as e:  # noqa: BLE001  (a run fails, the benchmark goes on)
        return fail(f"{type(e).__name__}: {e}")
    finally:
        for q in qmps:
            q.close()
        for p in procs.values():
            qm._kill(p)
        for log in logs.values():
            log.join(2)
        for p in procs.values():
            for f in (p.stdout, p.stderr):
                f.close()
        for name in ("qemu-src.img", "qemu-dst.img"):
            try:
                os.unlink(os.path.join(workdir, name))
            except OSError:
                pass


def _writes(q: EvQmp) -> int | None:
    """Write requests the guest's drive d0 has completed."""
    for dev in q.cmd("query-blockstats"):
        if dev.get("device") == "d0" or dev.get("qdev", "").endswith("d0"):
            return dev.get("stats", {}).get("wr_operations")
    return None


def qemu_available() -> str | None:
    why = qm.qemu_available()
    if why:
        return why
    if shutil.which("ip") is None:
        return "ip (iproute2) not found"
    return None
