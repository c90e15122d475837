#!/usr/bin/env python3
"""QEMU half of the live-migration benchmark: migrate ferry-testkernel between
two local QEMU microvm processes and measure it the same way as Ferry.

API (stdlib only, imported by the Ferry half of the benchmark):

    qemu_available() -> str | None
    run_qemu_migration(workload_cmdline, memory_mib, vcpus,
                       max_downtime_ms=50, timeout_s=120) -> dict

Figures come from two places: QEMU's own `query-migrate` (total time,
downtime, RAM bytes, dirty-sync passes), and the guest's serial lines, each
stamped with time.monotonic() as it arrives in this process. The serial gap
across the switch-over is what a guest (or its user) actually sees, and is
the figure comparable between VMMs whatever each VMM calls "downtime".

Run as a script, it prints the rows of docs/benchmarks.md's migration table.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QEMU = os.environ.get("FERRY_QEMU", "qemu-system-x86_64")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_KERNEL = Path(os.environ.get("FERRY_TESTKERNEL", REPO / "target" / "ferry-testkernel"))

# QEMU 7.x caps migration at 128 MiB/s by default (older ones at 32 MiB/s);
# `max-bandwidth` is in bytes per second. 100 GiB/s means "no cap" here.
UNLIMITED_BANDWIDTH = 100 << 30

WORKLOAD_LINE = re.compile(rb"testkernel: (?:tick (\d+)|dirty pass=(\d+) ok)")

# Workload lines seen on the source before migrating. idle ticks once a
# second, so 3 ticks (2 intervals) is enough and keeps the run short; dirty
# needs its first pass (page faults on first touch) behind it before the
# interval is representative.
STEADY_LINES = {"idle": 3, "dirty": 5}
# Workload lines wanted from the destination: the second one ends a pass that
# ran wholly on the destination and verified every page the migration moved.
DEST_LINES = 2


def _machine_args(kernel: Path, cmdline: str, memory_mib: int, vcpus: int,
                  tsc_hz: int) -> list[str]:
    # The recipe of docs/testkernel.md; the serial goes to stdout (a pipe), so
    # each line can be timestamped on arrival, and nothing else shares it.
    # invtsc gives the guest CPUID 0x40000010 (idle times its ticks by it),
    # but QEMU refuses to migrate an invtsc guest unless the TSC frequency is
    # pinned on the command line: pin it to the host's own.
    return [
        QEMU, "-M", "microvm,acpi=off", "-enable-kvm",
        "-cpu", f"qemu64,+invtsc,tsc-frequency={tsc_hz}",
        "-m", str(memory_mib), "-smp", str(vcpus),
        "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot", "-device", "i8042", "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(kernel), "-append", cmdline,
    ]


_tsc_hz: int | None = None


def _host_tsc_hz() -> int:
    """The TSC frequency KVM gives guests, as QEMU reads it (KVM_GET_TSC_KHZ):
    a paused throwaway QEMU is the simplest stdlib-only way to ask."""
    global _tsc_hz
    if _tsc_hz is not None:
        return _tsc_hz
    with tempfile.TemporaryDirectory(prefix="qemu-tsc-") as tmp:
        path = os.path.join(tmp, "qmp")
        p = subprocess.Popen(
            [QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "qemu64,+invtsc",
             "-m", "16", "-S", "-display", "none", "-monitor", "none", "-serial", "none",
             "-qmp", f"unix:{path},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = StderrTail(p.stderr)
        try:
            q = Qmp(path, p, time.monotonic() + 10)
            try:
                cpu = q.cmd("query-cpus-fast")[0]["qom-path"]
                hz = q.cmd("qom-get", path=cpu, property="tsc-frequency")
            finally:
                q.close()
        except QmpError as e:
            raise QmpError(f"{e} {err.text()}".strip()) from None
        finally:
            _kill(p)
            p.stderr.close()
    if not isinstance(hz, int) or hz <= 0:
        raise QmpError(f"QEMU reports no TSC frequency ({hz!r})")
    _tsc_hz = hz
    return hz


def qemu_available() -> str | None:
    """None when QEMU with KVM can run the benchmark, else why not."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as e:
        return f"/dev/kvm unusable: {e.strerror}"
    try:
        out = subprocess.run([QEMU, "-machine", "help"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{QEMU} -machine help failed: {e}"
    if not re.search(r"^microvm\b", out, re.M):
        return f"{QEMU} has no microvm machine"
    try:
        _host_tsc_hz()  # also proves QEMU can create a KVM microvm here
    except (QmpError, OSError) as e:
        return f"{QEMU} cannot start a KVM microvm: {e}"
    return None


class SerialLog:
    """Reads a QEMU's serial (its stdout pipe) in a thread and records each
    complete line with the monotonic time its newline arrived."""

    def __init__(self, stream):
        self.lines: list[tuple[float, bytes]] = []
        self.partial = b""  # bytes after the last newline (a line cut by the switch-over)
        self.eof = False
        self.cond = threading.Condition()
        self._fd = stream.fileno()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            now = time.monotonic()
            with self.cond:
                if not chunk:
                    self.eof = True
                    self.cond.notify_all()
                    return
                *done, self.partial = (self.partial + chunk).split(b"\n")
                self.lines.extend((now, line) for line in done)
                self.cond.notify_all()

    def wait_for(self, pred, deadline: float) -> bool:
        """Waits until pred(lines) holds, the stream ends, or the deadline."""
        with self.cond:
            while not pred(self.lines):
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return pred(self.lines)
                self.cond.wait(min(left, 0.5))
            return True

    def snapshot(self) -> tuple[list[tuple[float, bytes]], bytes]:
        with self.cond:
            return list(self.lines), self.partial

    def join(self, timeout: float):
        self._thread.join(timeout)


class StderrTail:
    """Drains stderr so QEMU never blocks on it; keeps the end for error messages."""

    def __init__(self, stream):
        self.data = b""
        self._stream = stream
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for chunk in iter(lambda: self._stream.read1(4096), b""):
                self.data = (self.data + chunk)[-4096:]
        except (OSError, ValueError):  # closed under us during clean-up
            pass

    def text(self) -> str:
        # The -cpu qemu64 "host doesn't support ... pni" warning is noise here.
        lines = [l for l in self.data.decode(errors="replace").splitlines()
                 if "doesn't support requested feature" not in l]
        return " | ".join(lines[-3:])


class QmpError(Exception):
    pass


class Qmp:
    """Minimal synchronous QMP client: one command in flight, events skipped."""

    def __init__(self, path: str, proc: subprocess.Popen, deadline: float):
        # QEMU creates the socket a little after exec; retry until it listens.
        while True:
            if proc.poll() is not None:
                raise QmpError(f"QEMU exited with status {proc.returncode} before QMP was up")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise QmpError("QMP socket did not come up")
                time.sleep(0.02)
        self.sock = s
        self.buf = b""
        self._read(deadline)  # greeting
        self.cmd("qmp_capabilities", deadline=deadline)

    def _read(self, deadline: float) -> dict:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError("QMP reply timed out")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise QmpError("QMP reply timed out") from None
            if not chunk:
                raise QmpError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _next(self, deadline: float) -> dict:
        """The next message; subclasses may keep the events they see."""
        return self._read(deadline)

    def cmd(self, name: str, deadline: float | None = None, **args):
        if deadline is None:
            deadline = time.monotonic() + 10
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._next(deadline)
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(proc: subprocess.Popen | None):
    """SIGTERM, then SIGKILL: a vCPU stuck in this host's emulator may ignore
    SIGTERM (see DESIGN.md)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # unkillable (D state): nothing more we can do
    except ProcessLookupError:
        pass


def _workload_numbers(lines) -> list[int]:
    out = []
    for _, line in lines:
        m = WORKLOAD_LINE.search(line)
        if m:
            out.append(int(m.group(1) or m.group(2)))
    return out


def _count_workload(lines) -> int:
    return sum(1 for _, l in lines if WORKLOAD_LINE.search(l))


def run_qemu_migration(workload_cmdline: str, memory_mib: int, vcpus: int,
                       max_downtime_ms: int = 50, timeout_s: float = 120,
                       kernel: str | os.PathLike | None = None) -> dict:
    """Boots the guest in a source QEMU, live-migrates it over local TCP to a
    destination QEMU, and returns the figures (see the module docstring).
    Never raises for run-time failures: they come back as ok=False, error=..."""
    result = {"ok": False, "error": None, "total_ms": None, "downtime_ms": None,
              "setup_ms": None, "bytes": None, "passes": None, "max_throttle_pct": 0,
              "gap_ms": None, "usual_interval_ms": None, "extra_gap_ms": None,
              "continued": False}
    deadline = time.monotonic() + timeout_s
    kernel = Path(kernel) if kernel is not None else DEFAULT_KERNEL
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, SerialLog] = {}
    errs: dict[str, StderrTail] = {}
    qmps: list[Qmp] = []
    tmp = tempfile.TemporaryDirectory(prefix="qemu-migrate-")

    def fail(msg: str) -> dict:
        details = "; ".join(f"{n} stderr: {e.text()}" for n, e in errs.items() if e.text())
        result["error"] = f"{msg} ({details})" if details else msg
        return result

    def start(name: str, extra: list[str]) -> Qmp:
        qmp_path = os.path.join(tmp.name, f"{name}.qmp")
        args = _machine_args(kernel, workload_cmdline, memory_mib, vcpus, tsc_hz) + [
            "-qmp", f"unix:{qmp_path},server=on,wait=off"] + extra
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=tmp.name)
        procs[name] = p
        logs[name] = SerialLog(p.stdout)
        errs[name] = StderrTail(p.stderr)
        q = Qmp(qmp_path, p, min(deadline, time.monotonic() + 15))
        qmps.append(q)
        return q

    try:
        if not kernel.is_file():
            return fail(f"test kernel {kernel} missing (cargo build --release)")
        workload = "dirty" if "testkernel.workload=dirty" in workload_cmdline else "idle"
        tsc_hz = _host_tsc_hz()

        # Destination first: `-incoming defer` + migrate-incoming lets a port
        # that got taken since we picked it be reported on QMP, and retried,
        # instead of killing the destination.
        dst = start("dst", ["-incoming", "defer"])
        for attempt in range(5):
            port = _free_port()
            try:
                dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
                break
            except QmpError as e:
                if attempt == 4:
                    return fail(f"destination could not listen: {e}")

        src = start("src", [])
        want = STEADY_LINES[workload]
        if not logs["src"].wait_for(lambda ls: _count_workload(ls) >= want, deadline):
            lines, _ = logs["src"].snapshot()
            last = lines[-1][1].decode(errors="replace") if lines else "nothing"
            return fail(f"source guest did not reach {want} {workload} lines "
                        f"(last serial line: {last!r})")

        # With QEMU's defaults (bandwidth cap, 300 ms downtime, no
        # auto-converge) an earlier measurement here never converged on a
        # 64 MiB hot set. Compare like with like: no
        # bandwidth cap, the caller's downtime budget, and auto-converge so a
        # guest dirtying faster than the link can still finish (it throttles
        # the vCPUs).
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "auto-converge", "state": True}])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": UNLIMITED_BANDWIDTH,
                                             "downtime-limit": max_downtime_ms})
        params = src.cmd("query-migrate-parameters")
        if params.get("max-bandwidth") != UNLIMITED_BANDWIDTH or \
                params.get("downtime-limit") != max_downtime_ms:
            return fail(f"migration parameters did not stick: {params}")

        # The usual interval comes from lines before the migration starts: the
        # ones during it are slowed by dirty logging and throttling.
        before, _ = logs["src"].snapshot()
        stamps = [t for t, l in before if WORKLOAD_LINE.search(l)]
        intervals = [b - a for a, b in zip(stamps, stamps[1:])][-10:]
        if not intervals:
            return fail("no workload interval measured on the source")
        usual_ms = statistics.median(intervals) * 1000

        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = src.cmd("query-migrate", deadline=deadline + 5)
            result["max_throttle_pct"] = max(result["max_throttle_pct"],
                                             info.get("cpu-throttle-percentage", 0))
            status = info.get("status")
            if status in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                try:
                    src.cmd("migrate_cancel")
                except QmpError:
                    pass
                ram = info.get("ram", {})
                return fail(f"migration not finished within the {timeout_s:g} s budget "
                            f"(status {status}, {ram.get('dirty-sync-count')} passes, "
                            f"{ram.get('remaining')} bytes remaining)")
            time.sleep(0.01)
        if status != "completed":
            return fail(f"migration {status}: {info.get('error-desc', 'no reason given')}")
        ram = info.get("ram", {})
        result.update(total_ms=info.get("total-time"), downtime_ms=info.get("downtime"),
                      setup_ms=info.get("setup-time"), bytes=ram.get("transferred"),
                      passes=ram.get("dirty-sync-count"))

        # The destination resumes by itself (it was not started with -S).
        # Give it room for a couple of its lines: a slow idle tick is ~1 s.
        dst_deadline = min(deadline, time.monotonic() + 10 + 4 * usual_ms / 1000)
        if not logs["dst"].wait_for(lambda ls: _count_workload(ls) >= DEST_LINES
                                    or any(b"FAIL" in l or b"booted" in l for _, l in ls),
                                    dst_deadline):
            st = dst.cmd("query-status").get("status")
            return fail(f"destination printed no {workload} lines after migration "
                        f"(destination status {st})")
        src_lines, src_partial = logs["src"].snapshot()
        dst_lines, _ = logs["dst"].snapshot()
        if not src_lines or not dst_lines:
            return fail("no serial lines to compare")

        # A line cut by the switch-over starts on the source and ends on the
        # destination: both gap ends are taken at newlines, like the interval.
        gap_ms = (dst_lines[0][0] - src_lines[-1][0]) * 1000
        result.update(gap_ms=gap_ms, usual_interval_ms=usual_ms, extra_gap_ms=gap_ms - usual_ms)

        # Continuity: the destination's numbers follow the source's with no
        # reboot, no corruption report and no skipped or repeated pass.
        joined = [(dst_lines[0][0], src_partial + dst_lines[0][1])] + dst_lines[1:]
        src_nums, dst_nums = _workload_numbers(src_lines), _workload_numbers(joined)
        bad = [l for _, l in src_lines if b"FAIL" in l] + \
              [l for _, l in joined if b"FAIL" in l or b"booted" in l]
        seq = src_nums[-1:] + dst_nums
        result["continued"] = (not bad and bool(src_nums) and len(dst_nums) >= 1 and
                               all(b == a + 1 for a, b in zip(seq, seq[1:])))
        if not result["continued"]:
            return fail(f"guest did not continue: source ended at {src_nums[-1:]}, "
                        f"destination printed {dst_nums[:5]}"
                        + (f", {bad[0].decode(errors='replace')!r}" if bad else ""))
        result["ok"] = True
        return result
    except (QmpError, OSError, ValueError) as e:
        return fail(str(e))
    finally:
        for q in qmps:
            q.close()
        for p in procs.values():
            _kill(p)
        for log in logs.values():
            log.join(2)
        for p in procs.values():
            for f in (p.stdout, p.stderr):
                f.close()
        tmp.cleanup()


def _fmt(v, unit="", digits=0):
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--memory", type=int, default=1024, help="guest MiB (default 1024)")
    ap.add_argument("--vcpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--downtime", type=int, default=50, help="downtime-limit ms (default 50)")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()

    why = qemu_available()
    if why:
        print(f"qemu_migrate: QEMU unusable: {why}", file=sys.stderr)
        return 1
    rows = [("idle", "testkernel.workload=idle"),
            ("dirty 64 MiB", "testkernel.workload=dirty testkernel.dirty_mib=64"),
            ("dirty 256 MiB", "testkernel.workload=dirty testkernel.dirty_mib=256")]
    failed = False
    for vcpus in a.vcpus:
        for name, cmdline in rows:
            r = run_qemu_migration(cmdline, a.memory, vcpus, a.downtime, a.timeout)
            head = f"qemu {a.memory} MiB {vcpus} vCPU {name:<13}"
            if not r["ok"]:
                failed = True
                print(f"{head} FAILED: {r['error']}", flush=True)
                continue
            print(f"{head} total {_fmt(r['total_ms'], ' ms')}  downtime {_fmt(r['downtime_ms'], ' ms')}"
                  f"  {r['bytes'] / 2**20:.1f} MiB  passes {r['passes']}"
                  f"  throttle {r['max_throttle_pct']}%  gap {_fmt(r['gap_ms'], ' ms', 1)}"
                  f"  usual {_fmt(r['usual_interval_ms'], ' ms', 1)}"
                  f"  extra {_fmt(r['extra_gap_ms'], ' ms', 1)}  continued {r['continued']}",
                  flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
