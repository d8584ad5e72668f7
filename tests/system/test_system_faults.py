"""Writer restarts through systemd's fd store, and a soak, under a real systemd.

Three readers (``shm-reader@1..3``) with a ``python:`` sink that writes down
every seq it delivers (testbed/soak_sink.py) and a ``python:`` source
with checksummed payloads (testbed/soak_source.py), installed from the
checkout with the units' full sandbox.  What each test checks is what a
reader's record and the journal say: contiguous seqs across a restart, lost
counts equal to the gaps, the events each side logs.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REPO, RUNTIME_DEBS, missing_debs

from testbed.nsystemd import DEV_TREE, NamespacedSystemd
from testbed.soak import (
    SOAK_DIR,
    WRITER,
    JournalTail,
    Process,
    bus_config,
    parse_log,
    prepare,
    render,
    reset,
    run_soak,
    unit_states,
)

pytestmark = pytest.mark.system

READERS = ("1", "2", "3")
UNITS = tuple(f"shm-reader@{r}.service" for r in READERS)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def bus(systemd_ns: NamespacedSystemd) -> NamespacedSystemd:
    """The module's systemd with shmd installed from the checkout, plus the soak modules."""
    missing = missing_debs(RUNTIME_DEBS)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed on the host (packaging/dev setup)")
    prepare(systemd_ns, REPO)
    return systemd_ns


@pytest.fixture
def fresh(bus: NamespacedSystemd) -> Iterator[NamespacedSystemd]:
    """No writer, no reader, an empty soak directory; the socket listening."""
    reset(bus, READERS)
    try:
        yield bus
    finally:
        reset(bus, READERS)


def configure(ns: NamespacedSystemd, policy: str, **overrides: Any) -> str:
    """Write the configuration (a fresh segment name; see bus_config for ``overrides``);
    returns the segment name."""
    segment = f"/shmd-test-{uuid.uuid4().hex}"
    ns.write_file(
        "/etc/shmd/shmd.yaml",
        bus_config(segment, policy, READERS, rate=500, capacity=64, **overrides),
    )
    return segment


def sink_log(ns: NamespacedSystemd, reader: str) -> list[Process]:
    """What reader ``reader``'s sink wrote down, per process."""
    return parse_log(ns.run("cat", f"{SOAK_DIR}/{reader}.log", check=False).stdout)


def last_seq(ns: NamespacedSystemd, reader: str) -> int:
    """The highest seq reader ``reader`` delivered so far (-1: none)."""
    procs = sink_log(ns, reader)
    return max((p.runs[-1].last for p in procs if p.runs), default=-1)


def wait_delivered(ns: NamespacedSystemd, seq: int, readers: tuple[str, ...] = READERS) -> None:
    """Wait until every reader delivered record ``seq``."""
    ns.wait_for(
        lambda: all(last_seq(ns, r) >= seq for r in readers),
        TIMEOUT,
        f"readers {readers} delivering seq {seq}",
        interval=0.2,
    )


def start(ns: NamespacedSystemd, tail: JournalTail) -> None:
    """Start the readers (which activates the writer) and wait until all three read."""
    tail.poll()
    mark = len(tail.entries)
    ns.systemctl("start", *UNITS)
    attached = wait_events(ns, tail, "reader_attached", READERS, since=mark)
    wait_delivered(ns, max(int(e["SHMD_SEQ"]) for e in attached.values()) + 100)


def wait_events(
    ns: NamespacedSystemd,
    tail: JournalTail,
    event: str,
    readers: tuple[str, ...],
    since: int = 0,
    **fields: str,
) -> dict[str, Any]:
    """Wait until the journal holds ``event`` for each reader (SHMD_READER, or the reader's
    own SHMD_INSTANCE); returns them by reader."""

    def seen() -> dict[str, Any] | None:
        tail.poll()
        got = {}
        for e in tail.events(event, since, **fields):
            who = e.get("SHMD_READER") or e.get("SHMD_INSTANCE")
            if who in readers:
                got[who] = e
        return got if len(got) == len(readers) else None

    try:
        found: dict[str, Any] = ns.wait_for(
            seen, TIMEOUT, f"{event} {fields} for {readers}", interval=0.2
        )
    except TimeoutError as exc:
        recent = [
            f"{e.get('_SYSTEMD_UNIT')} {e.get('SHMD_EVENT')} "
            f"{ {k: v for k, v in e.items() if k.startswith('SHMD_')} }"
            for e in tail.entries[since:]
            if e.get("SHMD_EVENT") not in (None, "stats")
        ]
        raise AssertionError(f"{exc}; events since:\n" + "\n".join(recent[-40:])) from None
    return found


def stop_and_collect(ns: NamespacedSystemd, tail: JournalTail) -> int:
    """Stop the writer (readers drain and exit 0); returns the records published."""
    mark = len(tail.entries)
    ns.systemctl("stop", WRITER)
    for unit in UNITS:
        ns.wait_unit(unit, TIMEOUT, ActiveState="inactive")
    drained = wait_events(ns, tail, "drained", READERS, since=mark)
    [cleared] = tail.events("active_cleared", mark)
    published = int(cleared["SHMD_SEQ"])
    assert {int(e["SHMD_SEQ"]) for e in drained.values()} == {published}
    return published


def assert_gapless(procs: list[Process], published: int) -> None:
    """One process delivered every seq from its first to the last published, once, intact."""
    assert len(procs) == 1, [p.pid for p in procs]
    runs = procs[0].runs
    seqs = [(r.first, r.last) for r in runs]
    for (_, a_last), (b_first, _) in itertools.pairwise(seqs):
        assert b_first == a_last + 1, f"a break between {a_last} and {b_first}"
    assert runs[-1].last == published - 1
    assert sum(r.bad for r in runs) == 0
    assert procs[0].clean_end


# -- a writer restart loses nothing ------------------------------------------------------------


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_a_writer_restart_loses_nothing_under_block(fresh: NamespacedSystemd, how: str) -> None:
    """Under block, systemctl restart (adopted by copy) and SIGKILL + Restart=on-failure
    (adopted in place) leave every reader's seqs contiguous, without loss or duplicate;
    the readers resume in the same processes."""
    segment = configure(fresh, "block")
    tail = JournalTail(fresh)
    start(fresh, tail)
    pids = {u: s["MainPID"] for u, s in unit_states(fresh, UNITS).items()}
    mark = len(tail.entries)
    if how == "restart":
        fresh.systemctl("restart", WRITER)
    else:
        fresh.systemctl("kill", "--signal=KILL", WRITER)
    resumed = wait_events(fresh, tail, "reader_attached", READERS, since=mark, start="resume")
    [adopted] = tail.events("segment_adopted", mark)
    assert adopted["SHMD_SEGMENT"] == segment
    assert adopted["SHMD_IN_PLACE"] == ("true" if how == "kill" else "false")
    [restored] = tail.events("readers_restored", mark)
    assert sorted(restored["SHMD_READERS"].split(",")) == list(READERS)
    generations = {e["SHMD_GENERATION"] for e in tail.events("segment_created")}
    assert {e["SHMD_GENERATION"] for e in resumed.values()} == generations  # the same one
    if how == "kill":
        lost = wait_events(fresh, tail, "writer_lost", READERS, since=mark)
        assert len(lost) == 3
        assert fresh.show(WRITER, "NRestarts")["NRestarts"] == "1"
    seq = max(int(e["SHMD_SEQ"]) for e in resumed.values())
    wait_delivered(fresh, seq + 200)
    published = stop_and_collect(fresh, tail)
    assert unit_states(fresh, UNITS) == {
        u: {"Id": u, "ActiveState": "inactive", "MainPID": "0", "NRestarts": "0"} for u in UNITS
    }
    for r, unit in zip(READERS, UNITS, strict=True):
        procs = sink_log(fresh, r)
        assert [p.pid for p in procs] == [pids[unit]]
        assert_gapless(procs, published)


CLIENT = "shm-client.service"


def test_a_client_program_resumes_across_a_writer_restart_and_loses_nothing(
    fresh: NamespacedSystemd,
) -> None:
    """A program on shmd.connect() (tests/helpers/client.py, as user shmd) reads on across
    systemctl restart of the writer under block: every seq once, in order, exit 0."""
    configure(fresh, "block")
    tail = JournalTail(fresh)
    start(fresh, tail)
    fresh.copy_tree(REPO, ["tests/helpers/client.py"])
    out = f"{SOAK_DIR}/client.out"
    mark = len(tail.entries)
    fresh.run(
        "systemd-run",
        f"--unit={CLIENT}",
        "--property=User=shmd",
        "--property=Group=shmd",
        "--property=RemainAfterExit=yes",
        f"--setenv=PYTHONPATH={DEV_TREE}",
        "/usr/bin/python3",
        f"{DEV_TREE}/tests/helpers/client.py",
        "/run/shmd/control.sock",
        "client-1",
        "all",
        "batches",
        out,
        "latest",
    )
    try:
        wait_events(fresh, tail, "reader_attached", ("client-1",), since=mark)

        def client_seqs() -> list[int]:
            text = fresh.run("cat", out, check=False).stdout
            return [int(line.split()[0]) for line in text.splitlines() if line]

        fresh.wait_for(
            lambda: len(client_seqs()) >= 200, TIMEOUT, "the client reading", interval=0.2
        )
        mark = len(tail.entries)
        fresh.systemctl("restart", WRITER)
        resumed = wait_events(fresh, tail, "reader_attached", ("client-1",), since=mark)
        seq = int(resumed["client-1"]["SHMD_SEQ"])
        assert resumed["client-1"]["SHMD_START"] == "resume"
        fresh.wait_for(lambda: max(client_seqs()) >= seq + 200, TIMEOUT, "reading on", interval=0.2)
        published = stop_and_collect(fresh, tail)
        state = fresh.wait_unit(CLIENT, TIMEOUT, ActiveState="active", SubState="exited")
        assert fresh.show(CLIENT, "ExecMainStatus")["ExecMainStatus"] == "0", state
        seqs = client_seqs()
        assert seqs == list(range(seqs[0], published)), "a gap or a duplicate"
    finally:
        fresh.systemctl("stop", CLIENT, check=False)
        fresh.systemctl("reset-failed", CLIENT, check=False)


def test_loss_under_drop_oldest_is_counted_exactly_across_a_restart(
    fresh: NamespacedSystemd,
) -> None:
    """Under drop-oldest a reader stopped while the ring wraps loses records; its lost
    counts (stats, and drained at the end, carried across a writer restart) equal the
    records missing from its sink, and the readers that kept up lose none."""
    configure(fresh, "drop-oldest")
    tail = JournalTail(fresh)
    start(fresh, tail)
    slow = "shm-reader@2.service"
    mark = len(tail.entries)
    fresh.systemctl("kill", "--signal=STOP", slow)
    try:
        wait_delivered(fresh, last_seq(fresh, "1") + 4 * 64, ("1", "3"))  # four ring-fulls
    finally:
        fresh.systemctl("kill", "--signal=CONT", slow)
    overrun = wait_events(fresh, tail, "overrun", ("2",), since=mark)["2"]
    stats = wait_events(fresh, tail, "stats", ("2",), since=mark, lost=overrun["SHMD_LOST"])["2"]
    mark = len(tail.entries)
    fresh.systemctl("restart", WRITER)
    resumed = wait_events(fresh, tail, "reader_attached", READERS, since=mark, start="resume")
    wait_delivered(fresh, max(int(e["SHMD_SEQ"]) for e in resumed.values()) + 100)
    published = stop_and_collect(fresh, tail)
    [slow_log] = sink_log(fresh, "2")
    missing = sum(b.first - a.last - 1 for a, b in itertools.pairwise(slow_log.runs))
    assert missing >= 3 * 64
    drained = [e for e in tail.events("drained") if e["SHMD_INSTANCE"] == "2"]
    assert int(drained[-1]["SHMD_LOST"]) == missing  # the total, across the restart
    assert slow_log.runs[-1].last == published - 1
    # The stats line counted exactly what was missing below its seq at that moment.
    below = int(stats["SHMD_SEQ"])
    start_seq = slow_log.runs[0].first
    assert int(stats["SHMD_LOST"]) == (below - start_seq) - slow_log.delivered_below(below)
    for r in ("1", "3"):
        assert_gapless(sink_log(fresh, r), published)
        assert [e["SHMD_LOST"] for e in tail.events("drained") if e["SHMD_INSTANCE"] == r] == [
            "0",
            "0",
        ]


def test_an_invalid_stored_segment_starts_a_new_generation(fresh: NamespacedSystemd) -> None:
    """A restart whose configuration changed the geometry cannot reuse the stored segment:
    the writer logs segment_invalid and creates a new generation, and the readers, woken
    through their stored eventfds, log generation_changed and start over in it."""
    segment = configure(fresh, "block")
    tail = JournalTail(fresh)
    start(fresh, tail)
    pids = {u: s["MainPID"] for u, s in unit_states(fresh, UNITS).items()}
    [created] = tail.events("segment_created")
    fresh.write_file(
        "/etc/shmd/shmd.yaml", bus_config(segment, "block", READERS, rate=500, capacity=128)
    )
    mark = len(tail.entries)
    fresh.systemctl("restart", WRITER)
    changed = wait_events(fresh, tail, "generation_changed", READERS, since=mark)
    [invalid] = tail.events("segment_invalid", mark)
    assert "capacity" in invalid["SHMD_ERROR"]
    [new] = tail.events("segment_created", mark)
    assert new["SHMD_GENERATION"] != created["SHMD_GENERATION"]
    assert new["SHMD_CAPACITY"] == "128"
    assert not tail.events("segment_adopted", mark)
    for e in changed.values():
        assert (e["SHMD_OLD_GENERATION"], e["SHMD_GENERATION"]) == (
            created["SHMD_GENERATION"],
            new["SHMD_GENERATION"],
        )
    # Each reader starts over with the oldest record the new generation holds.
    again = wait_events(fresh, tail, "reader_attached", READERS, since=mark)
    wait_delivered(fresh, max(int(e["SHMD_SEQ"]) for e in again.values()) + 100)
    assert {u: s["MainPID"] for u, s in unit_states(fresh, UNITS).items()} == pids
    published = stop_and_collect(fresh, tail)
    for r in READERS:
        [proc] = sink_log(fresh, r)
        restart = next(
            i for i, (a, b) in enumerate(itertools.pairwise(proc.runs)) if b.first <= a.last
        )
        assert proc.runs[restart + 1].first == int(again[r]["SHMD_SEQ"]) < 64
        assert_gapless([Process(proc.pid, proc.runs[restart + 1 :], proc.clean_end)], published)


def test_a_reader_that_cannot_reconnect_in_time_is_restarted(fresh: NamespacedSystemd) -> None:
    """A reader with reconnect_timeout 0 gives up on a killed writer at once, exits 1, and
    systemd restarts it; it attaches afresh while the others resume."""
    configure(fresh, "drop-oldest", r3={"reconnect_timeout": 0.0})
    tail = JournalTail(fresh)
    start(fresh, tail)
    impatient = "shm-reader@3.service"
    pid = fresh.show(impatient, "MainPID")["MainPID"]
    mark = len(tail.entries)
    fresh.systemctl("kill", "--signal=KILL", WRITER)
    exiting = wait_events(fresh, tail, "exiting", ("3",), since=mark)["3"]
    assert exiting["SHMD_STATUS"] == "1" and exiting["_PID"] == pid
    wait_events(fresh, tail, "reader_attached", ("1", "2"), since=mark, start="resume")
    fresh_attach = wait_events(fresh, tail, "reader_attached", ("3",), since=mark, start="latest")[
        "3"
    ]
    props = fresh.wait_unit(impatient, TIMEOUT, ActiveState="active", NRestarts="1")
    assert fresh_attach["SHMD_PID"] == fresh.show(impatient, "MainPID")["MainPID"] != pid
    assert props["NRestarts"] == "1"
    for unit in UNITS[:2]:
        assert fresh.show(unit, "NRestarts")["NRestarts"] == "0"


def test_a_reader_back_after_the_grace_resumes_and_counts_what_it_missed(
    fresh: NamespacedSystemd,
) -> None:
    """A reader stopped across a writer restart misses its reconnect_grace (reader_lost);
    woken when it runs again, it still resumes in the same process, at the oldest record
    the ring holds, and counts every record it skipped as lost."""
    configure(fresh, "drop-oldest", shutdown_grace=1.0, reconnect_grace=2.0)
    tail = JournalTail(fresh)
    start(fresh, tail)
    late = "shm-reader@3.service"
    pid = fresh.show(late, "MainPID")["MainPID"]
    mark = len(tail.entries)
    fresh.systemctl("kill", "--signal=STOP", late)
    try:
        fresh.systemctl("restart", WRITER)
        gone = wait_events(fresh, tail, "reader_lost", ("3",), since=mark)["3"]
        assert "did not reconnect within 2 s" in gone["SHMD_REASON"]
        wait_delivered(fresh, last_seq(fresh, "1") + 4 * 64, ("1", "2"))  # the ring wrapped
    finally:
        fresh.systemctl("kill", "--signal=CONT", late)
    back = wait_events(fresh, tail, "attached", ("3",), since=mark)["3"]
    assert back["SHMD_RESUMED"] == "true" and back["_PID"] == pid
    wait_delivered(fresh, int(back["SHMD_SEQ"]) + 100)
    published = stop_and_collect(fresh, tail)
    [proc] = sink_log(fresh, "3")
    missing = sum(b.first - a.last - 1 for a, b in itertools.pairwise(proc.runs))
    assert missing >= 3 * 64
    drained = [e for e in tail.events("drained") if e["SHMD_INSTANCE"] == "3"]
    assert int(drained[-1]["SHMD_LOST"]) == missing
    assert proc.runs[-1].last == published - 1
    assert fresh.show(late, "NRestarts")["NRestarts"] == "0"


def test_stop_then_start_begins_a_new_generation(fresh: NamespacedSystemd) -> None:
    """systemctl stop releases the fd store (systemd 252): readers drain and exit 0, the
    segment is gone, and the next start creates a new generation instead of adopting."""
    configure(fresh, "block")
    tail = JournalTail(fresh)
    start(fresh, tail)
    [first] = tail.events("segment_created")
    stop_and_collect(fresh, tail)
    for unit in UNITS:
        assert fresh.show(unit, "Result", "ExecMainStatus") == {
            "Result": "success",
            "ExecMainStatus": "0",
        }
    assert fresh.run("ls", "/dev/shm").stdout.split() == []
    mark = len(tail.entries)
    start(fresh, tail)
    [second] = tail.events("segment_created", mark)
    assert second["SHMD_GENERATION"] != first["SHMD_GENERATION"]
    assert not tail.events("segment_adopted")
    assert not tail.events("generation_changed")


# -- soak -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["block", "drop-oldest"])
def test_a_30_second_soak_accounts_for_every_record(bus: NamespacedSystemd, policy: str) -> None:
    """30 s of random reader kills and stops, writer restarts and kills, and bursts with
    8 readers: no record lost unexpectedly, none duplicated, none torn (block: nothing
    lost at all but across killed or evicted readers; drop-oldest: exactly what the
    readers counted)."""
    result = run_soak(bus, policy=policy, seconds=30, seed=7)
    table = render(result)
    assert result.published > 0 and sum(result.faults.values()) > 0, table
    assert result.ok, table
    for v in result.verdicts:
        assert v.delivered > 0 and v.unexpected_lost == 0 and v.duplicates == 0, table


def test_a_30_second_soak_of_durable_readers_loses_nothing_across_kills(
    bus: NamespacedSystemd,
) -> None:
    """Durable readers under block (block_timeout 5 s): reader kills, stops, writer restarts
    and kills lose no record at all; what a successor gets twice is what the writer counted."""
    result = run_soak(bus, policy="block", seconds=30, seed=11, durable=True, block_timeout=5.0)
    table = render(result)
    assert result.faults["reader_kill"] > 0 and result.evictions == 0, table
    assert result.ok, table
    for v in result.verdicts:
        lost = v.counted_lost + v.down_lost + v.unexpected_lost
        assert v.delivered > 0 and lost == 0 and v.duplicates == 0, table
