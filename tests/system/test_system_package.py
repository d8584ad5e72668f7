"""shmd's Debian package, built from the checkout and installed in a real systemd."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from testbed.nsystemd import NamespacedSystemd

pytestmark = pytest.mark.system

UNITS = ("shm-writer.socket", "shm-writer.service", "shm-reader@.service")
UNIT_DIR = "/lib/systemd/system"
# systemd-analyze security: 0.0 (locked down) .. 10.0 (exposed).
MAX_EXPOSURE = 2.0


def dpkg_deb(option: str, deb: Path, *args: str) -> str:
    """Return the output of ``dpkg-deb OPTION DEB ARGS...``."""
    return subprocess.run(
        ["dpkg-deb", option, str(deb), *args], capture_output=True, text=True, check=True
    ).stdout


def test_deb_ships_units_sysusers_config_and_entry_points(built_deb: Path) -> None:
    """The .deb carries the three units, the sysusers file, the config and the three
    commands, and marks /etc/shmd/shmd.yaml as a conffile."""
    listing = dpkg_deb("--contents", built_deb)
    paths = {line.split()[-1].removeprefix(".") for line in listing.splitlines()}
    expected = {f"{UNIT_DIR}/{unit}" for unit in UNITS} | {
        "/usr/lib/sysusers.d/shmd.conf",
        "/usr/lib/tmpfiles.d/shmd.conf",
        # Uncompressed: the units' Documentation= points at it.
        "/usr/share/doc/shmd/OPERATIONS.md",
        "/etc/shmd/shmd.yaml",
        "/usr/bin/shm-writer",
        "/usr/bin/shm-reader",
        "/usr/bin/shmctl",
        "/usr/lib/python3/dist-packages/shmd/__init__.py",
    }
    assert expected <= paths, sorted(expected - paths)
    assert dpkg_deb("--info", built_deb, "conffiles").split() == ["/etc/shmd/shmd.yaml"]
    depends = dpkg_deb("--field", built_deb, "Depends")
    for dep in ("python3-yaml", "python3-structlog", "python3-systemd"):
        assert dep in depends


def test_install_creates_the_shmd_system_user(installed: NamespacedSystemd) -> None:
    """Installing runs systemd-sysusers: user and group shmd exist, system range, no login."""
    name, _pw, uid, gid, _gecos, home, shell = (
        installed.run("getent", "passwd", "shmd").stdout.strip().split(":")
    )
    assert name == "shmd"
    assert 0 < int(uid) < 1000
    assert installed.run("getent", "group", "shmd").stdout.split(":")[2] == gid
    assert home == "/nonexistent"
    assert shell.endswith("nologin")


def test_config_is_a_registered_conffile(installed: NamespacedSystemd) -> None:
    """dpkg records /etc/shmd/shmd.yaml as shmd's conffile, with the shipped content."""
    conffiles = installed.run("dpkg-query", "-W", "-f=${Conffiles}", "shmd").stdout.split()
    assert conffiles[0] == "/etc/shmd/shmd.yaml"
    md5 = installed.run("md5sum", "/etc/shmd/shmd.yaml").stdout.split()[0]
    assert conffiles[1] == md5


def test_socket_is_enabled_and_listening(installed: NamespacedSystemd) -> None:
    """After install the control socket is enabled, listening as SOCK_SEQPACKET, 0660 shmd:shmd."""
    assert installed.systemctl("is-enabled", "shm-writer.socket").stdout.strip() == "enabled"
    props = installed.show("shm-writer.socket", "ActiveState", "Listen", "FileDescriptorName")
    assert props["ActiveState"] == "active"
    assert props["Listen"] == "/run/shmd/control.sock (SequentialPacket)"
    assert props["FileDescriptorName"] == "control"
    stat = installed.run("stat", "-c", "%F %a %U %G", "/run/shmd/control.sock").stdout
    assert stat.split() == ["socket", "660", "shmd", "shmd"]
    # Listening alone starts no writer.
    assert installed.show("shm-writer.service", "ActiveState")["ActiveState"] == "inactive"


def test_install_creates_the_publish_fifo(installed: NamespacedSystemd) -> None:
    """Installing runs systemd-tmpfiles: /run/shmd/publish.fifo is a fifo, 0660 shmd:shmd."""
    stat = installed.run("stat", "-c", "%F %a %U %G", "/run/shmd/publish.fifo").stdout
    assert stat.split() == ["fifo", "660", "shmd", "shmd"]


def test_socket_refuses_users_outside_group_shmd(installed: NamespacedSystemd) -> None:
    """A user outside group shmd gets EACCES from connect(), and the writer stays inactive."""
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "try:\n"
        "    s.connect('/run/shmd/control.sock')\n"
        "except PermissionError:\n"
        "    print('refused')\n"
        "else:\n"
        "    print('connected')\n"
    )
    done = installed.run(
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "python3",
        "-c",
        code,
    )
    assert done.stdout.strip() == "refused"
    assert installed.show("shm-writer.service", "ActiveState")["ActiveState"] == "inactive"


def test_units_verify_clean(installed: NamespacedSystemd) -> None:
    """systemd-analyze verify reports nothing for the installed units."""
    done = installed.run(
        "systemd-analyze", "verify", *(f"{UNIT_DIR}/{unit}" for unit in UNITS), check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


@pytest.mark.parametrize("unit", ["shm-writer.service", "shm-reader@.service"])
def test_services_are_hardened(installed: NamespacedSystemd, unit: str) -> None:
    """systemd-analyze security --offline=true rates the installed service 2.0 or lower."""
    done = installed.run(
        "systemd-analyze", "security", "--offline=true", f"{UNIT_DIR}/{unit}", check=False
    )
    match = re.search(r"Overall exposure level for (\S+): (\d+\.\d+)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert match.group(1).startswith(unit.split("@", maxsplit=1)[0])
    assert float(match.group(2)) <= MAX_EXPOSURE, done.stdout


def test_writer_starts_from_the_package(installed: NamespacedSystemd) -> None:
    """systemctl start shm-writer brings the packaged writer to active (READY=1 received)."""
    installed.systemctl("start", "shm-writer.service")
    try:
        props = installed.wait_unit("shm-writer.service", 30, ActiveState="active")
        assert props["ActiveState"] == "active"
        assert installed.show("shm-writer.service", "User")["User"] == "shmd"
    finally:
        installed.systemctl("stop", "shm-writer.service", check=False)
