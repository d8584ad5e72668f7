"""Soak: a writer and 8 readers under the real units for minutes, with random faults.

In a systemd booted in private namespaces over a volatile overlay
(:mod:`testbed.nsystemd`: never on the host's root), with the units from this
checkout, ``shm-writer`` runs a ``python:`` source (:mod:`testbed.soak_source`:
steady records with checksummed payloads, bursts on request) and
``shm-reader@1..8`` a ``python:`` sink (:mod:`testbed.soak_sink`: every seq
written down, in order, per process).
Then, until the time is up, one fault at a time, each followed by a wait
for the bus to be whole again (every reader attached, per the writer's
journal):

* ``reader_kill``: ``systemctl kill -s KILL shm-reader@N`` (the unit restarts it);
* ``reader_stop``: SIGSTOP for 0.1 to 2.5 s, then SIGCONT (under ``block`` the
  writer evicts a reader stopped longer than ``block_timeout``, and the unit
  restarts it);
* ``writer_restart``: ``systemctl restart shm-writer`` (readers drain, wait,
  and resume from the fd store's segment);
* ``writer_kill``: ``systemctl kill -s KILL shm-writer`` (``Restart=on-failure``;
  the segment is adopted in place and readers resume);
* ``burst``: the source publishes 2 to 20 ring-fulls as fast as it can.

At the end the writer is stopped (readers drain and exit 0) and every
reader's record is checked against the journal: under ``block`` no record may
be missing or delivered twice, except across a reader process the soak
killed (or the writer evicted); under ``drop-oldest`` every record missing
inside a process must equal the ``lost`` count that process reported
(``stats``, ``drained``, ``exiting``) at that point.

With ``durable`` every reader is durable (``durable_grace``): a killed
reader's successor takes its entry back, so across a kill nothing may be
missing under ``block`` either (unless the writer evicted the dormant entry
after ``block_timeout``), and what the successor gets twice may be at most
the ``redelivered`` count the writer gave it (``reader_attached``).  Exit status 0 when
nothing unexpected was seen, 1 otherwise.

``python -m benchmarks.soak`` runs :func:`run_soak` for minutes;
tests/system/test_system_faults.py for 30 s.
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.nsystemd import DEV_TREE, NamespacedSystemd

REPO = Path(__file__).resolve().parents[1]

WRITER = "shm-writer.service"
SOAK_DIR = "/var/lib/shmd-soak"
DROP_IN = "zz-soak.conf"
FAULTS = ("reader_kill", "reader_stop", "writer_restart", "writer_kill", "burst")
WEIGHTS = (3, 3, 1, 1, 3)
CAPACITY = 256
BLOCK_TIMEOUT = 1.0
STEADY_TIMEOUT = 60.0  # a fault must heal within this on a loaded 2-core machine


def reader_unit(instance: str) -> str:
    return f"shm-reader@{instance}.service"


# -- setting the machine up -------------------------------------------------------------------


def prepare(ns: NamespacedSystemd, repo: Path = REPO) -> None:
    """Install the units from ``repo`` and what the soak modules need (once per boot).

    A drop-in for both units puts tests/helpers on PYTHONPATH (soak_source,
    soak_sink) and lets both write the soak directory, which the sandbox
    (ProtectSystem=strict) would refuse.
    """
    ns.install_dev_tree(repo, extra=["testbed"])
    conf = (
        f'[Service]\nEnvironment="PYTHONPATH={DEV_TREE}" SHMD_SOAK_DIR={SOAK_DIR}\n'
        f"ReadWritePaths={SOAK_DIR}\n"
    )
    for unit in (WRITER, "shm-reader@.service"):
        ns.write_file(f"/etc/systemd/system/{unit}.d/{DROP_IN}", conf)
    ns.run("install", "-d", "-o", "shmd", "-g", "shmd", "-m", "0755", SOAK_DIR)
    ns.systemctl("daemon-reload")


def bus_config(
    segment: str,
    policy: str,
    readers: Sequence[str],
    *,
    rate: int = 1000,
    capacity: int = CAPACITY,
    shutdown_grace: float = 10.0,
    reconnect_grace: float = 15.0,
    block_timeout: float = BLOCK_TIMEOUT,
    durable_grace: float = 0.0,
    **reader_overrides: dict[str, Any],
) -> str:
    """The configuration of one soak (or fault test): python source and per-reader sinks
    (``r<N>={...}`` adds settings for reader N)."""
    instances: dict[str, Any] = {
        r: {"sink": {"type": "python", "callable": f"testbed.soak_sink:r{r}"}} for r in readers
    }
    for name, extra in reader_overrides.items():
        instances[name.removeprefix("r")].update(extra)
    config = {
        "segment": {
            "name": segment,
            "capacity": capacity,
            "slot_size": 256,
            "max_readers": 16,
            "policy": policy,
            "block_timeout": block_timeout,
            "mutex_timeout": 0.5,
        },
        "writer": {
            "source": {"type": "python", "callable": f"testbed.soak_source:steady_{rate}"},
            "shutdown_grace": shutdown_grace,
            "status_interval": 1.0,
            "reconnect_grace": reconnect_grace,
        },
        "reader": {
            "defaults": {
                "start": "latest",
                "stats_interval": 1.0,
                "reconnect_timeout": 15.0,
                "durable_grace": durable_grace,
                "sink": {"type": "journal", "summary_rate": 0.0},
            },
            "instances": instances,
        },
        "logging": {"level": "info", "target": "auto"},
    }
    return yaml.safe_dump(config, sort_keys=False)


def reset(ns: NamespacedSystemd, readers: Iterable[str]) -> None:
    """Stop every unit, forget failures, empty the soak directory; the socket listens."""
    units = [reader_unit(r) for r in readers]
    ns.systemctl("stop", *units, WRITER, check=False)
    ns.systemctl("reset-failed", *units, WRITER, check=False)
    ns.run("find", SOAK_DIR, "-mindepth", "1", "-delete")
    ns.systemctl("start", "shm-writer.socket")


# -- the journal ---------------------------------------------------------------------------------


class JournalTail:
    """Every journal entry since a cursor, fetched incrementally."""

    def __init__(self, ns: NamespacedSystemd) -> None:
        self.ns = ns
        self.cursor = ns.cursor()
        self.entries: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """Fetch the entries logged since the last poll; returns them."""
        new = self.ns.journal(after_cursor=self.cursor)
        if new:
            self.cursor = new[-1]["__CURSOR"]
            self.entries.extend(new)
        return new

    def events(self, name: str, since: int = 0, **fields: str) -> list[dict[str, Any]]:
        """Entries of shmd event ``name`` (from index ``since``) with these SHMD_ fields."""
        return [
            e
            for e in self.entries[since:]
            if e.get("SHMD_EVENT") == name
            and all(e.get(f"SHMD_{k.upper()}") == v for k, v in fields.items())
        ]


class Attachments:
    """Which reader process the writer has attached, per instance, from its journal."""

    def __init__(self) -> None:
        self.pid: dict[str, str | None] = {}
        self.seen = 0

    def update(self, entries: list[dict[str, Any]]) -> None:
        for e in entries[self.seen :]:
            if e.get("_SYSTEMD_UNIT") != WRITER:
                continue
            event, reader = e.get("SHMD_EVENT"), e.get("SHMD_READER")
            if reader is None:
                continue
            if event == "reader_attached":
                self.pid[reader] = e.get("SHMD_PID")
            elif event in ("reader_detached", "reader_lost") and self.pid.get(reader) == e.get(
                "SHMD_PID"
            ):
                self.pid[reader] = None
        self.seen = len(entries)


def unit_states(ns: NamespacedSystemd, units: Sequence[str]) -> dict[str, dict[str, str]]:
    """ActiveState and MainPID of several units in one systemctl call."""
    out = ns.systemctl("show", "--property=Id,ActiveState,MainPID,NRestarts", *units).stdout
    states: dict[str, dict[str, str]] = {}
    for block in out.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        states[props["Id"]] = props
    return states


# -- process resources -----------------------------------------------------------------------------

_PROBE = r"""
for pid in "$@"; do
    hwm=$(awk '/^VmHWM:/ {print $2}' /proc/$pid/status 2>/dev/null)
    fds=$(ls /proc/$pid/fd 2>/dev/null | wc -l)
    maps=$(wc -l < /proc/$pid/maps 2>/dev/null)
    echo "$pid ${hwm:-0} $fds ${maps:-0}"
done
"""


def probe(ns: NamespacedSystemd, pids: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """(peak RSS kB, open fds, mappings) of each unit's main process."""
    live = {unit: pid for unit, pid in pids.items() if pid not in ("", "0")}
    out = ns.run("sh", "-c", _PROBE, "probe", *live.values(), check=False).stdout
    by_pid = {}
    for line in out.splitlines():
        pid, hwm, fds, maps = line.split()
        by_pid[pid] = (int(hwm), int(fds), int(maps))
    return {unit: by_pid[pid] for unit, pid in live.items() if pid in by_pid}


# -- the records each reader wrote down ---------------------------------------------------------


@dataclass
class Run:
    """Consecutive seqs a reader process delivered in one batch."""

    first: int
    last: int
    first_ts: int
    last_ts: int
    max_gap: int
    bad: int


@dataclass
class Process:
    """One reader process's records (soak_sink lines with its pid)."""

    pid: str
    runs: list[Run] = field(default_factory=list)
    clean_end: bool = False

    @property
    def delivered(self) -> int:
        return sum(r.last - r.first + 1 for r in self.runs)

    def delivered_below(self, seq: int) -> int:
        """How many of its records have a seq below ``seq`` (runs are in order)."""
        return sum(max(0, min(r.last + 1, seq) - r.first) for r in self.runs)


def parse_log(text: str) -> list[Process]:
    """The processes of one reader instance, in the order they started."""
    procs: dict[str, Process] = {}
    for line in text.splitlines():
        kind, pid, *rest = line.split()
        proc = procs.setdefault(pid, Process(pid))
        if kind == "R":
            first, last, first_ts, last_ts, gap, bad = map(int, rest)
            proc.runs.append(Run(first, last, first_ts, last_ts, gap, bad))
        elif kind == "E":
            proc.clean_end = True
    return list(procs.values())


@dataclass
class Verdict:
    """What one reader instance got, and whether every record is accounted for."""

    instance: str
    processes: int = 0
    delivered: int = 0
    duplicates: int = 0
    torn: int = 0
    #: missing inside a process and equal to what the reader reported lost (drop-oldest)
    counted_lost: int = 0
    #: missing between a process the soak killed (or the writer evicted) and the next
    down_lost: int = 0
    #: missing with no explanation; accounting reports that disagree with the records
    unexpected_lost: int = 0
    #: durable: records a successor got again, within what the writer counted redelivered
    redelivered: int = 0
    accounting_errors: list[str] = field(default_factory=list)
    max_gap_ns: int = 0
    first: int | None = None
    last: int | None = None

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.torn or self.unexpected_lost or self.accounting_errors)


def verify(
    instance: str,
    procs: list[Process],
    *,
    policy: str,
    published: int,
    reports: dict[str, list[tuple[int, int]]],
    starts: dict[str, int],
    ended_by_fault: set[str],
    redelivered: dict[str, int] | None = None,
) -> Verdict:
    """Account for every seq of one reader instance.

    ``reports``: per pid, the (seq, lost) pairs of its stats/drained/exiting
    events; ``starts``: per pid, the cursor it attached at; ``ended_by_fault``:
    pids the soak killed or the writer evicted; ``redelivered``: per pid of a
    durable reader's successor, what the writer counted it would get again.
    """
    v = Verdict(instance, processes=len(procs))
    prev: Process | None = None
    for proc in procs:
        v.delivered += proc.delivered
        v.torn += sum(r.bad for r in proc.runs)
        v.max_gap_ns = max([v.max_gap_ns, *(r.max_gap for r in proc.runs)])
        if not proc.runs:
            continue
        if v.first is None:
            v.first = proc.runs[0].first
        if prev is not None and redelivered is not None and proc.pid in redelivered:
            _taken_back(v, prev, proc, starts.get(proc.pid, proc.runs[0].first), redelivered)
        elif prev is not None:
            _between(v, prev, proc, ended_by_fault)
        _inside(
            v,
            proc,
            policy,
            reports.get(proc.pid, []),
            start=starts.get(proc.pid, proc.runs[0].first),
            killed=proc.pid in ended_by_fault,
        )
        prev = proc
    if prev is not None:
        v.last = prev.runs[-1].last
        if v.last < published - 1:
            v.unexpected_lost += published - 1 - v.last  # the end was not drained
    return v


def _between(v: Verdict, prev: Process, proc: Process, ended_by_fault: set[str]) -> None:
    """What the previous process of the instance did not get to."""
    gap = proc.runs[0].first - prev.runs[-1].last - 1
    if gap < 0:
        v.duplicates += -gap
    elif prev.pid in ended_by_fault:
        v.down_lost += gap
    else:
        v.unexpected_lost += gap


def _taken_back(
    v: Verdict, prev: Process, proc: Process, start: int, redelivered: dict[str, int]
) -> None:
    """A durable reader's successor that took the entry back at ``start``."""
    gap = start - prev.runs[-1].last - 1
    if gap > 0:  # the predecessor's cursor is past its last record: impossible
        v.unexpected_lost += gap
        return
    again = proc.delivered_below(prev.runs[-1].last + 1)
    counted = redelivered[proc.pid]
    v.redelivered += min(again, counted)
    if again > counted:
        v.duplicates += again - counted  # repeated, but not counted: silently


def _inside(
    v: Verdict,
    proc: Process,
    policy: str,
    reports: list[tuple[int, int]],
    *,
    start: int,
    killed: bool,
) -> None:
    """Records missing inside one process, checked against what it reported lost."""
    missing = proc.runs[0].first - start  # lost before its first record
    for a, b in itertools.pairwise(proc.runs):
        gap = b.first - a.last - 1
        if gap < 0:
            v.duplicates += -gap
        else:
            missing += gap
    counted = 0
    for seq, lost in reports:
        seen = (seq - start) - proc.delivered_below(seq)
        if seen != lost:
            v.accounting_errors.append(
                f"pid {proc.pid} reported lost={lost} at seq {seq}, but {seen} records below "
                "it are missing from its sink"
            )
        counted = max(counted, lost)
    if policy == "block":
        v.unexpected_lost += missing  # nothing may be lost inside a process
        return
    counted = min(missing, counted)
    v.counted_lost += counted
    if killed:
        v.down_lost += missing - counted  # after its last report, before we killed it
    else:
        v.unexpected_lost += missing - counted


# -- the soak ------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """Everything the table shows."""

    policy: str
    seconds: float
    seed: int
    published: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    evictions: int = 0
    verdicts: list[Verdict] = field(default_factory=list)
    max_call_ms: float = 0.0
    recovery_s: dict[str, float] = field(default_factory=dict)
    peak_rss_kb: dict[str, int] = field(default_factory=dict)
    resources_start: dict[str, tuple[int, int]] = field(default_factory=dict)
    resources_end: dict[str, tuple[int, int]] = field(default_factory=dict)
    generations: int = 0
    problems: list[str] = field(default_factory=list)
    durable: bool = False
    block_timeout: float = BLOCK_TIMEOUT

    @property
    def ok(self) -> bool:
        return not self.problems and all(v.ok for v in self.verdicts)


class Soak:
    """One soak run on a prepared, booted systemd."""

    def __init__(
        self,
        ns: NamespacedSystemd,
        *,
        policy: str,
        seconds: float,
        seed: int,
        readers: int = 8,
        rate: int = 1000,
        durable: bool = False,
        block_timeout: float = BLOCK_TIMEOUT,
        log: Any = None,
    ) -> None:
        self.ns = ns
        self.durable = durable
        self.block_timeout = block_timeout
        self.policy = policy
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.readers = [str(i) for i in range(1, readers + 1)]
        self.units = [WRITER, *(reader_unit(r) for r in self.readers)]
        self.rate = rate
        self.segment = f"/shmd-test-soak-{uuid.uuid4().hex}"
        self.result = SoakResult(
            policy, seconds, seed, durable=durable, block_timeout=block_timeout
        )
        self.tail: JournalTail | None = None
        self.attachments = Attachments()
        self.killed: set[str] = set()
        self.bursts = 0
        self.log = log or (lambda msg: None)

    # -- steady state ------------------------------------------------------------------------

    def _steady(self, gone: set[str]) -> dict[str, dict[str, str]] | None:
        assert self.tail is not None
        self.tail.poll()
        self.attachments.update(self.tail.entries)
        states = unit_states(self.ns, self.units)
        for s in states.values():
            if s["ActiveState"] != "active" or s["MainPID"] in gone:
                return None
        for r in self.readers:
            if self.attachments.pid.get(r) != states[reader_unit(r)]["MainPID"]:
                return None
        return states

    def wait_steady(self, what: str, gone: Iterable[str] = ()) -> dict[str, dict[str, str]]:
        """Wait until every unit runs (none of them as one of the ``gone`` pids) and the
        writer has every reader process attached."""
        exclude = set(gone)
        try:
            return self.ns.wait_for(
                lambda: self._steady(exclude),
                STEADY_TIMEOUT,
                f"the bus whole again after {what}",
                interval=0.2,
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.diagnosis()}") from None

    def diagnosis(self) -> str:
        """Unit states, attachments and the last shmd events (for a failure message)."""
        assert self.tail is not None
        states = unit_states(self.ns, self.units)
        lines = [
            f"units: { ({u: (s['ActiveState'], s['MainPID']) for u, s in states.items()}) }",
            f"writer has attached: {self.attachments.pid}",
        ]
        routine = ("stats", "soak_source", "records", None)
        interesting = [
            e
            for e in self.tail.entries
            if e.get("SHMD_EVENT") not in routine or e.get("_PID") == "1"
        ]
        for e in interesting[-50:]:
            fields = {
                k[5:].lower(): v
                for k, v in e.items()
                if k.startswith("SHMD_") and k not in ("SHMD_EVENT", "SHMD_ROLE")
            }
            lines.append(
                f"  {e.get('_SYSTEMD_UNIT') or e.get('UNIT')} {e.get('_PID')} "
                f"{e.get('SHMD_EVENT') or e.get('MESSAGE')} {fields}"
            )
        return "\n".join(lines)

    def _size(self, path: str) -> int:
        done = self.ns.run("stat", "-c", "%s", path, check=False)
        return int(done.stdout) if done.returncode == 0 else 0

    def _after_stop(self, r: str, pid: str, size: int) -> str | None:
        """'evicted' once the writer evicted ``pid``, 'read' once it wrote records again."""
        assert self.tail is not None
        self.tail.poll()
        if any(e.get("SHMD_PID") == pid for e in self.tail.events("reader_evicted")):
            return "evicted"
        return "read" if self._size(f"{SOAK_DIR}/{r}.log") > size else None

    def sample(self, states: dict[str, dict[str, str]]) -> dict[str, tuple[int, int, int]]:
        got = probe(self.ns, {u: s["MainPID"] for u, s in states.items()})
        for unit, (hwm, _fds, _maps) in got.items():
            self.result.peak_rss_kb[unit] = max(self.result.peak_rss_kb.get(unit, 0), hwm)
        return got

    # -- faults ----------------------------------------------------------------------------------

    def inject(self, kind: str, states: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        """Inject one fault and wait for the bus to heal; returns the unit states after."""
        t0 = time.monotonic()
        gone: set[str] = set()
        if kind in ("reader_kill", "reader_stop"):
            r = self.rng.choice(self.readers)
            unit = reader_unit(r)
            pid = states[unit]["MainPID"]
            if kind == "reader_kill":
                self.killed.add(pid)
                gone.add(pid)
                self.ns.systemctl("kill", "--signal=KILL", unit)
                self.log(f"reader_kill {r} (pid {pid})")
            else:
                held = self.rng.uniform(0.1, 2.5)
                self.ns.systemctl("kill", "--signal=STOP", unit)
                # How long the fault lasts, not a synchronisation.
                time.sleep(held)
                size = self._size(f"{SOAK_DIR}/{r}.log")
                self.ns.systemctl("kill", "--signal=CONT", unit)
                outcome = self.ns.wait_for(
                    lambda: self._after_stop(r, pid, size),
                    STEADY_TIMEOUT,
                    f"reader {r} reading after SIGCONT",
                    interval=0.2,
                )
                if outcome == "evicted":
                    gone.add(pid)
                self.log(f"reader_stop {r} (pid {pid}) for {held:.1f} s: {outcome}")
        elif kind == "writer_restart":
            gone.add(states[WRITER]["MainPID"])
            self.ns.systemctl("restart", WRITER)
            self.log(f"writer_restart (pid {states[WRITER]['MainPID']})")
        elif kind == "writer_kill":
            gone.add(states[WRITER]["MainPID"])
            self.ns.systemctl("kill", "--signal=KILL", WRITER)
            self.log(f"writer_kill (pid {states[WRITER]['MainPID']})")
        else:
            self.bursts += 1
            count = CAPACITY * self.rng.randrange(2, 21)
            # Written aside and renamed: the source must never read half a number.
            self.ns.run(
                "sh",
                "-c",
                'echo "$1" > "$2.new" && mv "$2.new" "$2"',
                "burst",
                str(count),
                f"{SOAK_DIR}/burst-{self.bursts}",
            )
            self.ns.wait_for(
                lambda: (
                    self.ns.run(
                        "test", "-e", f"{SOAK_DIR}/burst-{self.bursts}.done", check=False
                    ).returncode
                    == 0
                ),
                STEADY_TIMEOUT,
                f"burst {self.bursts} of {count} records",
                interval=0.2,
            )
            self.log(f"burst of {count} records")
        states = self.wait_steady(kind, gone)
        self.result.faults[kind] += 1
        took = time.monotonic() - t0
        self.result.recovery_s[kind] = max(self.result.recovery_s.get(kind, 0.0), took)
        return states

    # -- the whole run -----------------------------------------------------------------------

    def run(self) -> SoakResult:
        ns = self.ns
        reset(ns, self.readers)
        ns.write_file(
            "/etc/shmd/shmd.yaml",
            bus_config(
                self.segment,
                self.policy,
                self.readers,
                rate=self.rate,
                block_timeout=self.block_timeout,
                durable_grace=60.0 if self.durable else 0.0,
            ),
        )
        self.tail = JournalTail(ns)
        try:
            ns.systemctl("start", *(reader_unit(r) for r in self.readers))
            states = self.wait_steady("the start")
            start = self.sample(states)
            self.result.resources_start = {u: (f, m) for u, (_h, f, m) in start.items()}
            deadline = time.monotonic() + self.seconds
            schedule: list[str] = []
            while time.monotonic() < deadline:
                # The pace of the soak: some time between faults.
                time.sleep(self.rng.uniform(0.5, 2.0))
                if not schedule:
                    # Every kind once per round, in random order, so that even
                    # a short soak sees each; then the weighted extra ones.
                    schedule = list(FAULTS) + self.rng.choices(FAULTS, WEIGHTS, k=len(FAULTS))
                    self.rng.shuffle(schedule)
                states = self.inject(schedule.pop(), states)
                self.sample(states)
            end = self.sample(states)
            self.result.resources_end = {u: (f, m) for u, (_h, f, m) in end.items()}
            ns.systemctl("stop", WRITER)
            for r in self.readers:
                ns.wait_unit(reader_unit(r), STEADY_TIMEOUT, ActiveState="inactive")
            self.tail.poll()
            self.analyse()
        finally:
            reset(ns, self.readers)
        return self.result

    def analyse(self) -> None:
        assert self.tail is not None
        res, tail = self.result, self.tail
        cleared = tail.events("active_cleared")
        res.published = int(cleared[-1]["SHMD_SEQ"]) if cleared else 0
        created = tail.events("segment_created")
        res.generations = len(
            {e["SHMD_GENERATION"] for e in created}
            | {e["SHMD_GENERATION"] for e in tail.events("segment_adopted")}
        )
        if res.generations != 1:
            res.problems.append(f"{res.generations} generations (a stored segment was not adopted)")
        evicted = {e["SHMD_PID"] for e in tail.events("reader_evicted")}
        res.evictions = len(evicted)
        for e in tail.events("soak_source"):
            res.max_call_ms = max(res.max_call_ms, float(e["SHMD_MAX_CALL_MS"]))
        reports: dict[str, list[tuple[int, int]]] = defaultdict(list)
        starts: dict[str, int] = {}
        for e in tail.entries:
            event, pid = e.get("SHMD_EVENT"), e.get("_PID")
            if e.get("SYSLOG_IDENTIFIER") != "shm-reader" or pid is None:
                continue
            if event in ("stats", "drained", "exiting") and "SHMD_LOST" in e and "SHMD_SEQ" in e:
                reports[pid].append((int(e["SHMD_SEQ"]), int(e["SHMD_LOST"])))
            elif event == "attached" and pid not in starts:
                starts[pid] = int(e["SHMD_SEQ"])
        for e in tail.events("exiting"):
            status = e.get("SHMD_STATUS")
            if status not in (None, "0") and e.get("_PID") not in evicted:
                res.problems.append(
                    f"reader {e.get('SHMD_INSTANCE')} pid {e.get('_PID')} "
                    f"exited {status}: {e.get('SHMD_REASON')} "
                    f"{e.get('SHMD_ERROR', '')}"
                )
        taken_back = {
            e["SHMD_PID"]: int(e["SHMD_REDELIVERED"])
            for e in tail.events("reader_attached")
            if "SHMD_REDELIVERED" in e
        }
        for r in self.readers:
            text = self.ns.run("cat", f"{SOAK_DIR}/{r}.log", check=False).stdout
            res.verdicts.append(
                verify(
                    r,
                    parse_log(text),
                    policy=self.policy,
                    published=res.published,
                    reports=reports,
                    starts=starts,
                    ended_by_fault=self.killed | evicted,
                    redelivered=taken_back if self.durable else None,
                )
            )


def run_soak(
    ns: NamespacedSystemd,
    *,
    policy: str,
    seconds: float,
    seed: int = 1,
    readers: int = 8,
    rate: int = 1000,
    durable: bool = False,
    block_timeout: float = BLOCK_TIMEOUT,
    log: Any = None,
) -> SoakResult:
    """Run one soak on a booted systemd on which :func:`prepare` ran."""
    return Soak(
        ns,
        policy=policy,
        seconds=seconds,
        seed=seed,
        readers=readers,
        rate=rate,
        durable=durable,
        block_timeout=block_timeout,
        log=log,
    ).run()


# -- the table ---------------------------------------------------------------------------------


def render(res: SoakResult) -> str:
    """The soak's figures as Markdown."""
    faults = ", ".join(f"{k} {res.faults[k]}" for k in FAULTS) or "none"
    unexpected = sum(v.unexpected_lost for v in res.verdicts)
    expected = sum(v.counted_lost + v.down_lost for v in res.verdicts)
    lines = [
        f"### policy `{res.policy}`{', durable readers' if res.durable else ''}: "
        f"{res.seconds:g} s, seed {res.seed}, block_timeout {res.block_timeout:g} s",
        "",
        f"* records published: {res.published}",
        f"* faults injected: {faults} (readers evicted by the writer: {res.evictions})",
        f"* records lost: {expected} expected (counted by readers or while a reader was "
        f"down), {unexpected} unexpected; duplicates: "
        f"{sum(v.duplicates for v in res.verdicts)}; torn: {sum(v.torn for v in res.verdicts)}; "
        f"redelivered (counted): {sum(v.redelivered for v in res.verdicts)}",
        f"* maximum writer stall (longest source publish call): {res.max_call_ms:.1f} ms; "
        "longest recovery per fault: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(res.recovery_s.items())),
        "",
        "| process | delivered | processes | lost counted | lost while down | unexpected "
        "lost | duplicates | redelivered | torn | max commit gap | peak RSS | fds start/end | "
        "maps start/end |",
        "| --- " + "| ---: " * 12 + "|",
    ]

    def res_cols(unit: str) -> str:
        rss = res.peak_rss_kb.get(unit, 0) / 1024
        s, e = res.resources_start.get(unit, (0, 0)), res.resources_end.get(unit, (0, 0))
        return f"{rss:.1f} MiB | {s[0]}/{e[0]} | {s[1]}/{e[1]}"

    lines.append(f"| shm-writer | {res.published} published | | | | | | | | | {res_cols(WRITER)} |")
    for v in res.verdicts:
        lines.append(
            f"| shm-reader@{v.instance} | {v.delivered} | {v.processes} | {v.counted_lost} | "
            f"{v.down_lost} | {v.unexpected_lost} | {v.duplicates} | {v.redelivered} | {v.torn} | "
            f"{v.max_gap_ns / 1e6:.0f} ms | {res_cols(reader_unit(v.instance))} |"
        )
    for v in res.verdicts:
        lines += [f"* reader {v.instance}: {err}" for err in v.accounting_errors]
    lines += [f"* problem: {p}" for p in res.problems]
    lines.append("")
    lines.append(f"Result: {'OK' if res.ok else 'FAILED'}")
    return "\n".join(lines)
