"""Tests of shmd.daemons.journal: an event's journal fields, and libsystemd's native protocol."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmd.daemons import journal

REPO = Path(__file__).resolve().parent.parent
FIELD_RE = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


@pytest.fixture(autouse=True)
def _every_test_cleans_logging(clean_logging: None) -> None:
    """Every test here starts and ends with structlog's defaults."""


# ---------------------------------------------------------------------------
# journal_fields
# ---------------------------------------------------------------------------


def test_journal_fields_of_an_event() -> None:
    """An event dict becomes SHMD_* fields, PRIORITY, SYSLOG_IDENTIFIER and a readable MESSAGE."""
    fields = journal.journal_fields(
        {
            "event": "reader_attached",
            "reader": "1",
            "pid": 123,
            "generation": 7,
            "level": "info",
            "role": "writer",
        }
    )
    assert fields == {
        "MESSAGE": "reader_attached reader=1 pid=123 generation=7",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "shm-writer",
        "SHMD_EVENT": "reader_attached",
        "SHMD_ROLE": "writer",
        "SHMD_READER": "1",
        "SHMD_PID": "123",
        "SHMD_GENERATION": "7",
    }


@pytest.mark.parametrize(
    ("level", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priority_follows_the_level(level: str, priority: str) -> None:
    """PRIORITY is the syslog priority of the event's level."""
    assert journal.journal_fields({"event": "x", "level": level})["PRIORITY"] == priority


def test_field_names_are_sanitised() -> None:
    """Keys become upper-case SHMD_ names of A-Z, 0-9 and _ only, at most 64 characters."""
    assert journal.journal_field_name("seq") == "SHMD_SEQ"
    assert journal.journal_field_name("lost") == "SHMD_LOST"
    assert journal.journal_field_name("a-b.c d") == "SHMD_A_B_C_D"
    assert journal.journal_field_name("_private") == "SHMD__PRIVATE"
    assert journal.journal_field_name("grüße") == "SHMD_GR_SSE"
    assert len(journal.journal_field_name("k" * 100)) == 64


def test_colliding_keys_keep_both_values() -> None:
    """Two keys that sanitise to the same field name both reach the journal."""
    fields = journal.journal_fields({"event": "e", "a-b": "one", "a_b": "two"})
    assert fields["SHMD_A_B"] == "one" and fields["SHMD_A_B_2"] == "two"


def test_values_are_rendered_as_text() -> None:
    """bytes become hex, booleans true/false, everything else str(); MESSAGE quotes spaces."""
    fields = journal.journal_fields(
        {
            "event": "e",
            "raw": b"\x00\xff",
            "ok": True,
            "ratio": 0.5,
            "why": "peer hung up",
            "empty": "",
        }
    )
    assert fields["SHMD_RAW"] == "00ff" and fields["SHMD_OK"] == "true"
    assert fields["SHMD_RATIO"] == "0.5" and fields["SHMD_WHY"] == "peer hung up"
    assert fields["MESSAGE"] == 'e raw=00ff ok=true ratio=0.5 why="peer hung up" empty=""'


META = {"event", "level", "role", "timestamp", "exception", "code_file", "code_line", "code_func"}


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=80).filter(lambda k: k not in META),
        st.integers() | st.text(),
        max_size=8,
    )
)
def test_every_field_name_is_valid_for_journald(extra: dict[str, object]) -> None:
    """Whatever the keys, every field name matches journald's rules and no key is lost."""
    event = {"event": "e", "level": "info", "role": "reader", **extra}
    fields = journal.journal_fields(event)
    for name in fields:
        assert FIELD_RE.fullmatch(name), name
    assert len(fields) == 5 + len(extra)
    assert sorted(
        fields[n] for n in fields if n.startswith("SHMD_") and n not in ("SHMD_EVENT", "SHMD_ROLE")
    ) == sorted(map(str, extra.values()))


# ---------------------------------------------------------------------------
# The real journald socket protocol (default sender), in a private mount namespace
# ---------------------------------------------------------------------------

_NAMESPACED = r"""
import json, os, socket, struct, sys
from shmd.daemons import logs

def parse(datagram):
    fields, data = {}, datagram
    while data:
        nl = data.index(b"\n")
        head = data[:nl]
        if b"=" in head:
            key, _, value = head.partition(b"=")
            data = data[nl + 1:]
        else:  # binary-safe form: KEY\n <le64 size> value \n
            key = head
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + size]
            data = data[nl + 9 + size + 1:]
        fields[key.decode()] = value.decode()
    return fields

logs.configure_logging("writer", level="info", target="journal")
os.makedirs("/run/systemd/journal", exist_ok=True)
# 1: something that is not journald at its path (a stream socket: sendmsg
# fails with EPROTOTYPE) -> one line on stderr, the process carries on.
wrong = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
wrong.bind("/run/systemd/journal/socket")
logs.get_logger().info("before_socket", n=1)
wrong.close()
os.unlink("/run/systemd/journal/socket")
# 2: a datagram socket where libsystemd sends native journal entries.
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
sock.settimeout(30)
logs.get_logger(reader="9").error("reader_lost", reason="two\nlines")
print(json.dumps(parse(sock.recv(1 << 20))))
"""


def test_default_sender_speaks_journald_native_protocol() -> None:
    """Through libsystemd, an event arrives at journald's socket as the expected fields."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a private /run")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not permitted here: {probe.stderr.decode().strip()}")
    # A tmpfs over /run, private to this one process tree: journald's socket
    # path can be bound without touching the host's /run.
    child = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs shmd-test /run && exec "$0" -c "$1"',
            sys.executable,
            _NAMESPACED,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        cwd=str(REPO),
    )
    assert child.returncode == 0, child.stderr
    assert child.stderr.startswith("Failed to send a log entry to the journal since "), child.stderr
    assert child.stderr.rstrip().endswith("before_socket n=1")
    fields = json.loads(child.stdout)
    assert fields["MESSAGE"] == 'reader_lost reader=9 reason="two\\nlines"'
    assert fields["SHMD_REASON"] == "two\nlines"
    assert fields["SHMD_EVENT"] == "reader_lost" and fields["SHMD_READER"] == "9"
    assert fields["PRIORITY"] == "3" and fields["SYSLOG_IDENTIFIER"] == "shm-writer"
    assert fields["CODE_FUNC"] == "<module>" and fields["CODE_FILE"] == "<string>"
