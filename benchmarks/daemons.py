"""The daemons end to end: idle CPU, and memory against records published.

``python -m benchmarks.daemons [--idle SECONDS] [--records N] [--readers 1,64]``

Runs the real ``shm-writer`` and ``shm-reader`` processes (from this
checkout) against a throw-away segment and socket, and reports:

* **idle**: CPU time (utime + stime from /proc/<pid>/stat, clock ticks) that
  a writer with its ticker off and an attached reader use over an idle
  window.  A reader with nothing to read sleeps in epoll on its eventfd; a
  writer with nothing to publish wakes only for its status tick.
* **memory**: each daemon's peak RSS (VmHWM) with 1 and with 64 readers,
  and the writer's RSS after publishing N and then 5 N more records, which
  must not grow with records published.

Waiting is on the daemons' JSON log events (``--log-target json``), never on
sleeps; the idle window itself is the measurement, not synchronisation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
SOURCE_MODULE = '''
import os, time

def produce(ctx):
    """Publish batches on request: each line in the control FIFO is a record count."""
    path = os.environ["SHMD_BENCH_CONTROL"]
    payload = b"x" * 64
    with open(path, "rb", buffering=0) as control:
        for line in control:
            n = int(line)
            for start in range(0, n, 256):
                ctx.publish_batch([payload] * min(256, n - start))
            with open(os.environ["SHMD_BENCH_DONE"], "a") as done:
                done.write(f"{n}\\n")
            if ctx.stopping.is_set():
                return
'''


class Daemon:
    """A daemon subprocess whose JSON log lines are collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def wait_for(
        self,
        name: str,
        timeout: float = 60.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") == name and (where is None or where(e)):
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    why = "exited" if self.proc.poll() is not None else "was silent"
                    raise RuntimeError(f"Failed to see {name} since the daemon {why}")
                self._cond.wait(left)

    def cpu_ticks(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _config(tmp: Path, segment: str, readers: int) -> Path:
    cfg = tmp / "shmd.yaml"
    cfg.write_text(
        f"segment: {{name: {segment}, capacity: 4096, slot_size: 128, "
        f"max_readers: {max(readers, 1)}, policy: block, block_timeout: 30}}\n"
        f"control: {{socket: {tmp / 'ctl.sock'}, handshake_timeout: 30}}\n"
        f"writer: {{source: {{type: python, callable: 'shmd_bench_source:produce'}}, "
        f"status_interval: 1.0, shutdown_grace: 30}}\n"
        f"reader: {{defaults: {{stats_interval: 3600, reconnect_timeout: 1, "
        f"sink: {{type: journal, summary_rate: 0.001}}}}}}\n"
        "logging: {target: json, level: info}\n"
    )
    return cfg


def run(idle: float, records: int, reader_counts: list[int]) -> list[dict[str, Any]]:
    """Measure each reader count; returns one row per count."""
    rows = []
    for readers in reader_counts:
        with tempfile.TemporaryDirectory(prefix="shmd-bench-") as d:
            tmp = Path(d)
            segment = f"/shmd-bench-{uuid.uuid4().hex}"
            (tmp / "shmd_bench_source.py").write_text(SOURCE_MODULE)
            control, done = tmp / "control.fifo", tmp / "done"
            os.mkfifo(control)
            done.touch()
            env = {
                **os.environ,
                "SHMD_CONFIG": str(_config(tmp, segment, readers)),
                "PYTHONPATH": os.pathsep.join([str(tmp), *sys.path]),
                "SHMD_BENCH_CONTROL": str(control),
                "SHMD_BENCH_DONE": str(done),
            }
            py = sys.executable
            writer = Daemon([py, "-m", "shmd.daemons.writer"], env)
            procs = [writer]
            try:
                writer.wait_for("listener_ready")
                for i in range(readers):
                    argv = [py, "-m", "shmd.daemons.reader", "--instance", f"b{i}"]
                    procs.append(Daemon(argv, env))
                for reader in procs[1:]:
                    # A reader logs its first stats in its first loop turn, just
                    # before it goes to sleep: start-up is over.
                    reader.wait_for("stats")
                with open(control, "wb", buffering=0) as ctl:
                    # Idle: nothing published, every reader asleep in epoll.
                    before = [p.cpu_ticks() for p in procs]
                    t0 = time.monotonic()
                    # The measurement window itself (not synchronisation).
                    time.sleep(idle)
                    elapsed = time.monotonic() - t0
                    after = [p.cpu_ticks() for p in procs]
                    rss = []
                    for n in (records, 5 * records):
                        ctl.write(f"{n}\n".encode())
                        deadline = time.monotonic() + 600
                        while str(n) not in done.read_text().split():
                            if time.monotonic() > deadline or writer.proc.poll() is not None:
                                raise RuntimeError("Failed to publish since the writer stopped")
                            # Polling a file the source writes, with a deadline.
                            time.sleep(0.05)
                        rss.append(writer.status("VmRSS"))
                    ctl.write(b"0\n")
                readers_idle = [a - b for a, b in zip(after[1:], before[1:], strict=True)]
                rows.append(
                    {
                        "readers": readers,
                        "idle_seconds": round(elapsed, 2),
                        "writer_idle_cpu_ms": (after[0] - before[0]) * 1000 / TICKS,
                        "reader_idle_cpu_ms_max": max(readers_idle, default=0) * 1000 / TICKS,
                        "reader_idle_cpu_ms_total": sum(readers_idle) * 1000 / TICKS,
                        "writer_rss_kib_after_n": rss[0],
                        "writer_rss_kib_after_6n": rss[1],
                        "records_n": records,
                        "writer_peak_rss_kib": writer.status("VmHWM"),
                        "reader_peak_rss_kib_max": max(
                            (p.status("VmHWM") for p in procs[1:]), default=0
                        ),
                    }
                )
            finally:
                for p in reversed(procs):
                    p.stop()
                try:
                    os.unlink(f"/dev/shm{segment}")
                except FileNotFoundError:
                    pass
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    head = (
        "| readers | idle window | writer CPU while idle | reader CPU while idle (max / all) "
        "| writer RSS after N / 6N records | writer peak RSS | reader peak RSS |\n"
        "|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['readers']} | {r['idle_seconds']} s | {r['writer_idle_cpu_ms']:.0f} ms "
        f"| {r['reader_idle_cpu_ms_max']:.0f} / {r['reader_idle_cpu_ms_total']:.0f} ms "
        f"| {r['writer_rss_kib_after_n'] / 1024:.1f} / {r['writer_rss_kib_after_6n'] / 1024:.1f}"
        f" MiB (N = {r['records_n']}) | {r['writer_peak_rss_kib'] / 1024:.1f} MiB "
        f"| {r['reader_peak_rss_kib_max'] / 1024:.1f} MiB |\n"
        for r in rows
    )
    return head + body + f"\nCPU time resolution: 1 clock tick = {1000 / TICKS:.0f} ms.\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.daemons",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--idle", type=float, default=10.0, help="idle window in seconds (10)")
    p.add_argument("--records", type=int, default=200_000, help="N (200000)")
    p.add_argument("--readers", default="1,64", help="reader counts (1,64)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = p.parse_args(argv)
    rows = run(args.idle, args.records, [int(x) for x in args.readers.split(",")])
    print(table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
