"""shmd's units at work under a real systemd: activation, shutdown, crashes,
reload, configuration errors and peer admission, with the daemons from the
checkout running inside the units' full sandbox."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from conftest import REPO, RUNTIME_DEBS, missing_debs

from testbed.nsystemd import DEV_TREE, NamespacedSystemd

pytestmark = pytest.mark.system

READERS = ("1", "2", "3")
READER_UNITS = tuple(f"shm-reader@{r}.service" for r in READERS)
WRITER = "shm-writer.service"
SEGMENT = f"/shmd-test-{uuid.uuid4().hex}"
OPERATOR = "shmd-test-op"  # in group shmd (supplementary)
OUTSIDER = "shmd-test-other"  # in no shmd group
TIMEOUT = 60.0


def config_text(**changes: Any) -> str:
    """The shipped config/shmd.yaml with this module's segment name and changes
    (keyword = key path with ``__`` between keys, e.g. ``writer__source__rate``)."""
    config = yaml.safe_load((REPO / "config" / "shmd.yaml").read_text())
    config["segment"]["name"] = SEGMENT
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return yaml.safe_dump(config)


@pytest.fixture(scope="module")
def bus(systemd_ns: NamespacedSystemd) -> NamespacedSystemd:
    """The module's systemd with shmd installed from the checkout and two extra users."""
    missing = missing_debs(RUNTIME_DEBS)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed on the host (packaging/dev setup)")
    systemd_ns.install_dev_tree(REPO)
    systemd_ns.run("useradd", "--no-create-home", "--groups", "shmd", OPERATOR)
    systemd_ns.run("useradd", "--no-create-home", OUTSIDER)
    return systemd_ns


def stop_everything(ns: NamespacedSystemd) -> None:
    """Stop every reader and the writer and forget failures (the socket keeps listening)."""
    ns.systemctl("stop", *READER_UNITS, WRITER, check=False)
    ns.systemctl("reset-failed", *READER_UNITS, WRITER, check=False)


@pytest.fixture
def fresh(bus: NamespacedSystemd) -> Iterator[NamespacedSystemd]:
    """The socket listening, no writer, no reader, the stock configuration."""
    stop_everything(bus)
    bus.write_file("/etc/shmd/shmd.yaml", config_text())
    bus.systemctl("start", "shm-writer.socket")
    try:
        yield bus
    finally:
        stop_everything(bus)


def wait_attached(
    ns: NamespacedSystemd, cursor: str, readers: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Wait until the writer logged reader_attached for each reader; return them by reader."""
    seen: dict[str, dict[str, Any]] = {}

    def done(entry: dict[str, Any]) -> bool:
        if entry.get("SHMD_EVENT") == "reader_attached" and entry.get("SHMD_READER") in readers:
            seen[entry["SHMD_READER"]] = entry
        return len(seen) == len(readers)

    ns.wait_for_journal(
        done,
        TIMEOUT,
        unit=WRITER,
        after_cursor=cursor,
        what=f"reader_attached for readers {readers}",
    )
    return seen


def start_readers(ns: NamespacedSystemd, *readers: str) -> dict[str, dict[str, Any]]:
    """Start reader units and wait until the writer attached each of them."""
    cursor = ns.cursor()
    ns.systemctl("start", *(f"shm-reader@{r}.service" for r in readers))
    return wait_attached(ns, cursor, readers)


def events(ns: NamespacedSystemd, cursor: str, event: str) -> list[dict[str, Any]]:
    """Journal entries of one shmd event since cursor."""
    return ns.journal(after_cursor=cursor, SHMD_EVENT=event)


def shmctl_as(ns: NamespacedSystemd, user: str, *args: str) -> tuple[int, str]:
    """Run the installed dev tree's shmctl as user (with its groups); return status and stderr."""
    code = "import sys; from shmd.cli import main; sys.exit(main())"
    done = ns.run(
        "setpriv",
        f"--reuid={user}",
        f"--regid={user}",
        "--init-groups",
        "env",
        f"PYTHONPATH={DEV_TREE}",
        "python3",
        "-c",
        code,
        *args,
        check=False,
    )
    return done.returncode, done.stderr


def test_readers_activate_the_writer_through_the_socket(fresh: NamespacedSystemd) -> None:
    """Starting three readers activates the writer via the socket; all attach to one
    segment owned by shmd and closed to other users."""
    assert fresh.show(WRITER, "ActiveState")["ActiveState"] == "inactive"
    cursor = fresh.cursor()
    attached = start_readers(fresh, *READERS)
    props = fresh.show(WRITER, "ActiveState", "SubState", "User", "TriggeredBy")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["User"] == "shmd"
    assert props["TriggeredBy"] == "shm-writer.socket"
    [ready] = events(fresh, cursor, "listener_ready")
    assert ready["SHMD_ACTIVATED"] == "true"
    shmd_uid = fresh.run("id", "-u", "shmd").stdout.strip()
    assert {e["SHMD_UID"] for e in attached.values()} == {shmd_uid}
    assert {e["SHMD_GENERATION"] for e in attached.values()} == {ready["SHMD_GENERATION"]}
    for unit in READER_UNITS:
        assert fresh.show(unit, "ActiveState")["ActiveState"] == "active"
    owner, mode = fresh.run("stat", "-c", "%U %a", f"/dev/shm{SEGMENT}").stdout.split()
    assert owner == "shmd"
    assert int(mode, 8) & 0o007 == 0


def test_stopping_the_writer_lets_readers_exit_cleanly(fresh: NamespacedSystemd) -> None:
    """systemctl stop shm-writer clears the active flag: readers drain, exit 0 and are
    not restarted; the segment is unlinked and the socket keeps listening."""
    start_readers(fresh, *READERS)
    cursor = fresh.cursor()
    fresh.systemctl("stop", WRITER)
    for unit in READER_UNITS:
        fresh.wait_unit(unit, TIMEOUT, ActiveState="inactive")
        props = fresh.show(unit, "Result", "ExecMainStatus", "NRestarts")
        assert props == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}
    exits = {e["SHMD_INSTANCE"]: e["SHMD_STATUS"] for e in events(fresh, cursor, "exiting")}
    assert exits == dict.fromkeys(READERS, "0")
    assert len(events(fresh, cursor, "shutdown_complete")) == 1
    assert fresh.run("test", "-e", f"/dev/shm{SEGMENT}", check=False).returncode == 1
    assert fresh.show("shm-writer.socket", "ActiveState")["ActiveState"] == "active"


def test_killed_writer_is_restarted_and_readers_reconnect(fresh: NamespacedSystemd) -> None:
    """After SIGKILL the writer is restarted (Restart=on-failure), takes its segment
    back from PID 1's fd store, and every reader that lost it attaches again."""
    start_readers(fresh, *READERS)
    cursor = fresh.cursor()
    fresh.systemctl("kill", "--signal=KILL", WRITER)
    after = wait_attached(fresh, cursor, READERS)
    assert fresh.show(WRITER, "NRestarts")["NRestarts"] == "1"
    [adopted] = events(fresh, cursor, "segment_adopted")
    assert adopted["SHMD_SEGMENT"] == SEGMENT
    assert {e["SHMD_GENERATION"] for e in after.values()} == {adopted["SHMD_GENERATION"]}
    lost = {e["SHMD_INSTANCE"] for e in events(fresh, cursor, "writer_lost")}
    assert lost == set(READERS)
    for unit in READER_UNITS:
        fresh.wait_unit(unit, TIMEOUT, ActiveState="active")


def test_killed_reader_is_restarted_alone(fresh: NamespacedSystemd) -> None:
    """A reader killed with SIGKILL is restarted and re-attached; the writer and the
    other readers keep running untouched."""
    start_readers(fresh, *READERS)
    pids = {u: fresh.show(u, "MainPID")["MainPID"] for u in (WRITER, *READER_UNITS)}
    cursor = fresh.cursor()
    fresh.systemctl("kill", "--signal=KILL", "shm-reader@2.service")
    order: list[str] = []

    def lost_then_attached(entry: dict[str, Any]) -> bool:
        if entry.get("SHMD_READER") == "2" and entry.get("SHMD_EVENT") in (
            "reader_lost",
            "reader_attached",
        ):
            order.append(entry["SHMD_EVENT"])
        return order[-1:] == ["reader_attached"]

    fresh.wait_for_journal(
        lost_then_attached,
        TIMEOUT,
        unit=WRITER,
        after_cursor=cursor,
        what="reader 2 lost and attached again",
    )
    assert order == ["reader_lost", "reader_attached"]
    assert fresh.show("shm-reader@2.service", "NRestarts")["NRestarts"] == "1"
    assert fresh.show("shm-reader@2.service", "MainPID")["MainPID"] != pids[READER_UNITS[1]]
    for unit in (WRITER, READER_UNITS[0], READER_UNITS[2]):
        assert fresh.show(unit, "MainPID", "NRestarts") == {"MainPID": pids[unit], "NRestarts": "0"}


def test_writer_reports_status_and_feeds_the_watchdog(fresh: NamespacedSystemd) -> None:
    """The writer publishes STATUS= and keeps pinging WATCHDOG=1 within WatchdogSec=."""
    dropin = "/run/systemd/system/shm-writer.service.d/shmd-test-watchdog.conf"
    fresh.write_file(dropin, "[Service]\nWatchdogSec=2s\n")
    fresh.systemctl("daemon-reload")
    try:
        fresh.systemctl("start", WRITER)
        stamps: list[str] = []

        def two_more_pings() -> bool:
            stamp = fresh.show(WRITER, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
            if not stamps or stamp != stamps[-1]:
                stamps.append(stamp)
            return len(stamps) >= 3

        fresh.wait_for(two_more_pings, TIMEOUT, "two watchdog pings after READY=1")
        props = fresh.show(WRITER, "ActiveState", "NRestarts", "StatusText", "WatchdogUSec")
        assert props["WatchdogUSec"] == "2s"
        assert (props["ActiveState"], props["NRestarts"]) == ("active", "0")
        assert props["StatusText"] != ""
    finally:
        fresh.run("rm", "-f", dropin)
        fresh.systemctl("daemon-reload")


def test_reload_applies_a_live_key_in_place(fresh: NamespacedSystemd) -> None:
    """systemctl reload (SIGHUP through ExecReload=) applies a live key without
    restarting the writer."""
    start_readers(fresh, "1")
    pid = fresh.show(WRITER, "MainPID")["MainPID"]
    fresh.write_file("/etc/shmd/shmd.yaml", config_text(writer__source__rate=25.0))
    cursor = fresh.cursor()
    fresh.systemctl("reload", WRITER)
    reload = fresh.wait_for_journal(
        lambda e: e.get("SHMD_EVENT") == "reload", TIMEOUT, unit=WRITER, after_cursor=cursor
    )
    assert reload["SHMD_APPLIED"] == "writer.source.rate"
    assert reload["SHMD_REFUSED"] == "none"
    assert fresh.show(WRITER, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}


def test_broken_config_fails_with_status_78_and_no_restart(fresh: NamespacedSystemd) -> None:
    """A writer with an invalid configuration exits 78, is not restarted
    (RestartPreventExitStatus=78) and logs the offending key."""
    fresh.write_file("/etc/shmd/shmd.yaml", config_text(segment__slot_size=1001))
    cursor = fresh.cursor()
    assert fresh.systemctl("start", WRITER, check=False).returncode != 0
    props = fresh.show(WRITER, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }
    [error] = events(fresh, cursor, "config_error")
    assert error["SHMD_KEY"] == "segment.slot_size"
    assert error["_SYSTEMD_UNIT"] == WRITER


def test_peers_are_admitted_by_group_and_allow_list(fresh: NamespacedSystemd) -> None:
    """A user in group shmd may publish, one outside it cannot even connect, and
    dropping the group from control.allowed_groups (live reload) refuses the member."""
    fresh.systemctl("start", WRITER)
    status, err = shmctl_as(fresh, OPERATOR, "publish", "-v", "hello")
    assert status == 0, err
    assert "published 1 records" in err
    status, err = shmctl_as(fresh, OUTSIDER, "publish", "hello")
    assert status != 0
    assert "permission denied" in err.lower()
    fresh.write_file("/etc/shmd/shmd.yaml", config_text(control__allowed_groups=[]))
    cursor = fresh.cursor()
    fresh.systemctl("reload", WRITER)
    fresh.wait_for_journal(
        lambda e: e.get("SHMD_EVENT") == "reload", TIMEOUT, unit=WRITER, after_cursor=cursor
    )
    status, _err = shmctl_as(fresh, OPERATOR, "publish", "hello")
    assert status != 0
    refused = fresh.wait_for_journal(
        lambda e: e.get("SHMD_EVENT") == "reader_refused",
        TIMEOUT,
        unit=WRITER,
        after_cursor=cursor,
    )
    assert refused["SHMD_CODE"] == "not_allowed"
    assert refused["SHMD_UID"] == fresh.run("id", "-u", OPERATOR).stdout.strip()
