"""The namespaced-systemd harness itself: boot, isolation, journal, power-off."""

from __future__ import annotations

import os
import signal
import socket
import uuid
from pathlib import Path

import pytest
from conftest import REPO, cached_preflight

from testbed.nsystemd import DEV_TREE, HOST_SHM, NamespacedSystemd, SystemdError

pytestmark = pytest.mark.system


def processes_in_pidns(pidns: str) -> list[int]:
    """Return the host pids whose pid namespace is pidns."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") == pidns:
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_boot_and_poweroff_leave_nothing_behind() -> None:
    """A boot reaches running/degraded without touching the host's /tmp or hostname,
    and power-off ends every process of the namespace and removes its cgroup."""
    reason = cached_preflight()
    if reason is not None:
        pytest.skip(reason)
    # systemd-tmpfiles --boot empties /tmp: a marker in the host's /tmp must survive.
    marker = Path("/tmp") / f"shmd-test-marker-{uuid.uuid4().hex}"
    marker.write_text("host file\n")
    hostname = socket.gethostname()
    ns = NamespacedSystemd()
    try:
        state = ns.boot()
        assert state in ("running", "degraded")
        assert ns.run("hostname").stdout.strip() == ns.name
        assert ns.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
        pid, pidns, cgroup = ns.pid, ns.pidns, ns.cgroup
        assert pidns is not None and cgroup is not None
        assert pid in processes_in_pidns(pidns)
        inner_tmp = ns.run("ls", "-A", "/tmp").stdout
        assert marker.name not in inner_tmp
        status = ns.poweroff()
        # reboot(POWER_OFF) by a pid namespace's init ends it with SIGINT; a
        # kill after a timeout would show SIGKILL instead.
        assert status == -signal.SIGINT
        assert processes_in_pidns(pidns) == []
        assert not cgroup.exists()
        assert marker.read_text() == "host file\n"
        assert socket.gethostname() == hostname
    finally:
        ns.poweroff()
        marker.unlink(missing_ok=True)


def test_dev_shm_is_the_namespaces_own(systemd_ns: NamespacedSystemd) -> None:
    """A segment a sandboxed unit makes lands in the namespace's /dev/shm, not the host's."""
    name = f"shmd-test-private-{uuid.uuid4().hex}"
    # PrivateDevices= as the shmd units have it: the unit's /dev binds the
    # namespace's /dev/shm.
    systemd_ns.run(
        "systemd-run",
        "--wait",
        "--quiet",
        "-p",
        "PrivateDevices=yes",
        "--",
        "python3",
        "-c",
        f"open('/dev/shm/{name}', 'w').close()",
    )
    try:
        assert name in systemd_ns.run("ls", "-A", "/dev/shm").stdout.split()
        assert not (Path(HOST_SHM) / name).exists()
    finally:
        systemd_ns.run("rm", "-f", f"/dev/shm/{name}")


def test_poweroff_fails_when_a_segment_created_inside_is_on_the_host() -> None:
    """The harness says so at power-off when a segment a writer inside logged as created
    is in the host's /dev/shm."""
    reason = cached_preflight()
    if reason is not None:
        pytest.skip(reason)
    leak = Path(HOST_SHM) / f"shmd-test-leak-{uuid.uuid4().hex}"
    ns = NamespacedSystemd()
    try:
        ns.boot()
        # What a writer running outside the namespace's /dev/shm would leave:
        # its segment_created line inside, its segment on the host.
        code = (
            "from systemd import journal; "
            f"journal.send('segment_created', SHMD_EVENT='segment_created', "
            f"SHMD_SEGMENT='/{leak.name}')"
        )
        ns.run("python3", "-c", code)
        leak.write_bytes(b"")
        with pytest.raises(
            SystemdError,
            match=rf"Failed to leave the host clean since "
            rf"{leak.name} appeared",
        ):
            ns.poweroff()
    finally:
        leak.unlink(missing_ok=True)
        ns.poweroff()


def test_transient_unit_logs_structured_field(systemd_ns: NamespacedSystemd) -> None:
    """A structured field logged by a systemd-run unit shows up in journalctl -o json."""
    token = uuid.uuid4().hex
    unit = f"shmd-test-probe-{token[:8]}.service"
    cursor = systemd_ns.cursor()
    # The sender stays alive until stopped: journald attributes an entry to a
    # unit by reading the sender's /proc/<pid>/cgroup when the entry arrives,
    # which fails for a process that has already exited.
    code = (
        "import signal; from systemd import journal; "
        f"journal.send('probe', SHMD_TEST_TOKEN='{token}'); signal.pause()"
    )
    systemd_ns.run("systemd-run", f"--unit={unit}", "--quiet", "--", "python3", "-c", code)
    try:
        entry = systemd_ns.wait_for_journal(
            lambda e: e.get("SHMD_TEST_TOKEN") == token, 20, unit=unit, after_cursor=cursor
        )
    finally:
        systemd_ns.systemctl("stop", unit, check=False)
    assert entry["MESSAGE"] == "probe"
    assert entry["_SYSTEMD_UNIT"] == unit
    listed = systemd_ns.journal(unit, after_cursor=cursor, SHMD_TEST_TOKEN=token)
    assert [e["SHMD_TEST_TOKEN"] for e in listed] == [token]


def test_wait_for_journal_times_out_without_a_match(systemd_ns: NamespacedSystemd) -> None:
    """wait_for_journal raises TimeoutError when no entry satisfies the predicate."""
    with pytest.raises(TimeoutError, match="Failed to see"):
        systemd_ns.wait_for_journal(lambda e: False, 0.5, after_cursor=systemd_ns.cursor())


def test_run_raises_on_failure(systemd_ns: NamespacedSystemd) -> None:
    """run() with check=True raises SystemdError naming the command and its status."""
    with pytest.raises(SystemdError, match=r"Failed to run sh -c 'exit 3' .* exited with 3"):
        systemd_ns.run("sh", "-c", "exit 3")
    assert systemd_ns.run("sh", "-c", "exit 3", check=False).returncode == 3


def test_write_file_stays_inside(systemd_ns: NamespacedSystemd) -> None:
    """write_file creates the file inside the container only, with the given mode."""
    path = f"/var/lib/shmd-test-{uuid.uuid4().hex}/file.txt"
    systemd_ns.write_file(path, "inside\n", 0o600)
    assert systemd_ns.read_file(path) == "inside\n"
    assert systemd_ns.run("stat", "-c", "%a", path).stdout.strip() == "600"
    assert not Path(path).parent.exists()


def test_install_dev_tree_points_units_at_a_copy_of_the_checkout(
    systemd_ns: NamespacedSystemd,
) -> None:
    """install_dev_tree loads the three units, runs them from a copy that user shmd can
    read (whatever the checkout's own modes) and creates shmd."""
    systemd_ns.install_dev_tree(REPO)
    for unit in ("shm-writer.socket", "shm-writer.service", "shm-reader@1.service"):
        assert systemd_ns.show(unit, "LoadState")["LoadState"] == "loaded"
    for unit, module in (
        ("shm-writer.service", "shmd.daemons.writer"),
        ("shm-reader@1.service", "shmd.daemons.reader"),
    ):
        props = systemd_ns.show(unit, "ExecStart", "Environment", "User")
        assert f"from {module} import main" in props["ExecStart"]
        assert f"PYTHONPATH={DEV_TREE}" in props["Environment"]
        assert props["User"] == "shmd"
    assert "--instance 1" in systemd_ns.show("shm-reader@1.service", "ExecStart")["ExecStart"]
    assert systemd_ns.run("getent", "passwd", "shmd").returncode == 0
    # The copy is the checkout's code, byte for byte, and user shmd imports it.
    copied = systemd_ns.read_file(f"{DEV_TREE}/shmd/bus/subscriber.py")
    assert copied == (REPO / "shmd" / "bus" / "subscriber.py").read_text()
    done = systemd_ns.run(
        "setpriv",
        "--reuid=shmd",
        "--regid=shmd",
        "--clear-groups",
        "env",
        f"PYTHONPATH={DEV_TREE}",
        "PYTHONDONTWRITEBYTECODE=1",
        "python3",
        "-c",
        "import shmd.daemons.writer, shmd.daemons.reader; print(shmd.__file__)",
    )
    assert done.stdout.strip() == f"{DEV_TREE}/shmd/__init__.py"
