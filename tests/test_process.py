"""Tests of shmd.daemons.process: arguments, config loading, --check-config, logging, exits.

Both daemons go through these functions at start-up, so most tests run the
real ``shm-writer`` and ``shm-reader`` and look at their exit status,
stdout and stderr.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml
from daemon_bus import Bus, program, running_bus, wait_until
from structlog.testing import capture_logs

from shmd._sys.reactor import Reactor
from shmd.config import EXIT_CONFIG, ConfigError, load_config
from shmd.daemons import logs, process
from shmd.errors import ShmdError

ROLES = ["shm-writer", "shm-reader"]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shmd.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def bus() -> Iterator[Bus]:
    """A Bus whose processes (by pid), segment, socket and files are gone after the test."""
    with running_bus() as b:
        yield b


def run(
    bus: Bus, name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a daemon to completion (only for runs that end by themselves)."""
    argv = [*program(name), *args]
    if name == "shm-reader" and not any(a.startswith("--instance") for a in args):
        argv += ["--instance", "1"]
    return subprocess.run(
        argv, env=env or bus.env, capture_output=True, text=True, timeout=30, check=False
    )


BROKEN = """\
segment:
  name: /shmd-test-broken
  capacity: 64
  slot_size: 1001
logging:
  target: json
"""


@pytest.mark.parametrize("name", ROLES)
def test_config_error_at_start_exits_78_with_one_located_line(bus: Bus, name: str) -> None:
    """A bad file makes the daemon exit 78 with one config_error line naming file, line and key."""
    path = bus.dir / "broken.yaml"
    path.write_text(BROKEN)
    done = run(bus, name, "--config", str(path))
    assert done.returncode == 78
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    event = yaml.safe_load(lines[0])  # a JSON line
    assert event["event"] == "config_error" and event["level"] == "error"
    assert event["path"] == str(path) and event["line"] == 4
    assert event["key"] == "segment.slot_size"
    assert event["error"] == f"{path}:4: segment.slot_size: must be a multiple of 8 (got 1001)"
    assert event["role"] == name.removeprefix("shm-")
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("name", ROLES)
def test_missing_explicit_config_file_exits_78(bus: Bus, name: str) -> None:
    """A --config file that does not exist is a configuration error (78), not the defaults."""
    path = bus.dir / "missing.yaml"
    done = run(bus, name, "--config", str(path))
    assert done.returncode == 78
    assert "the file does not exist" in done.stderr and str(path) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ROLES)
def test_check_config_prints_the_effective_settings(bus: Bus, name: str) -> None:
    """--check-config on a good file exits 0 printing the effective settings, starting nothing."""
    path = bus.configure(segment={"capacity": 64})
    done = run(bus, name, "--config", str(path), "--check-config")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# configuration OK: {path}\n")
    printed = yaml.safe_load(done.stdout)
    assert printed["segment"]["name"] == bus.segment and printed["segment"]["capacity"] == 64
    assert printed["segment"]["slot_size"] == 256  # from the file
    assert printed["segment"]["policy"] == "drop-oldest"  # a default, spelled out
    assert printed["control"]["socket"] == bus.socket
    assert printed["reader"]["defaults"]["sink"]["type"] == "journal"
    # What it prints loads back into the same configuration.
    again = bus.dir / "printed.yaml"
    again.write_text(done.stdout)
    assert load_config(again) == load_config(path)
    assert done.stderr == ""
    assert not bus.segment_exists() and not os.path.lexists(bus.socket)


@pytest.mark.parametrize("name", ROLES)
def test_check_config_on_a_bad_file_exits_78(bus: Bus, name: str) -> None:
    """--check-config on a bad file exits 78 with the located error and prints no settings."""
    path = bus.dir / "broken.yaml"
    path.write_text(BROKEN)
    done = run(bus, name, "--config", str(path), "--check-config")
    assert done.returncode == 78
    assert done.stdout == ""
    assert f"{path}:4: segment.slot_size" in done.stderr


def test_shmd_config_variable_names_the_file(bus: Bus) -> None:
    """Without --config the file comes from $SHMD_CONFIG."""
    path = bus.configure()
    done = run(bus, "shm-writer", "--check-config", env={**bus.env, "SHMD_CONFIG": str(path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# configuration OK: {path}\n")


def test_check_config_lists_warnings(bus: Bus) -> None:
    """--check-config prints each non-fatal warning as a comment line."""
    path = bus.configure(control={"allowed_groups": ["shmd-test-no-such-group"]})
    done = run(bus, "shm-writer", "--config", str(path), "--check-config")
    assert done.returncode == 0, done.stderr
    assert (
        "# warning: control.allowed_groups: group 'shmd-test-no-such-group' does not exist"
        in done.stdout
    )


def test_daemon_logs_config_loaded_and_each_warning_at_start(bus: Bus) -> None:
    """A started daemon logs config_loaded with its file, then one config_warning per warning."""
    bus.configure(control={"allowed_groups": ["shmd-test-no-such-group"]})
    w = bus.writer()
    loaded = w.events[0]
    assert loaded["event"] == "config_loaded" and loaded["path"] == str(bus.config_path)
    assert loaded["segment"] == bus.segment and loaded["socket"] == bus.socket
    assert loaded["policy"] == "drop-oldest"
    warning = w.wait_for("config_warning")
    assert "group 'shmd-test-no-such-group' does not exist" in warning["warning"]
    assert warning["path"] == str(bus.config_path)
    w.terminate()
    assert w.wait_exit() == 0


def test_log_target_option_overrides_the_file(bus: Bus) -> None:
    """--log-target console replaces the file's json target: stderr is no longer JSON lines."""
    path = bus.configure()
    w = bus.spawn(
        "shm-writer", [*program("shm-writer"), "--config", str(path), "--log-target", "console"]
    )
    wait_until(
        lambda: any("listener_ready" in line for line in w.lines),
        what="a listener_ready console line",
    )
    w.terminate()
    assert w.wait_exit() == 0
    assert not w.events  # nothing parsed as JSON
    assert any("config_loaded" in line and not line.startswith("{") for line in w.lines)


def test_reader_needs_a_valid_instance_name(bus: Bus) -> None:
    """shm-reader without --instance, or with an impossible name, is a usage error (exit 2)."""
    path = bus.configure()
    done = run(bus, "shm-reader", "--config", str(path), "--instance=")
    assert done.returncode == 2 and "--instance is required" in done.stderr
    done = run(bus, "shm-reader", "--config", str(path), "--instance", "a/b")
    assert done.returncode == 2 and "--instance 'a/b'" in done.stderr
    assert "Traceback" not in done.stderr


# -- in-process --------------------------------------------------------------------------------


def test_check_config_writes_to_the_given_stream(bus: Bus) -> None:
    """check_config prints the header, warnings and YAML to the stream it is given and returns 0."""
    cfg = load_config(bus.configure(control={"allowed_groups": ["shmd-test-no-such-group"]}))
    out = io.StringIO()
    assert process.check_config(cfg, out) == process.EXIT_OK
    text = out.getvalue()
    assert text.startswith(f"# configuration OK: {bus.config_path}\n# warning: ")
    assert yaml.safe_load(text)["segment"]["name"] == bus.segment


def test_fail_logs_a_known_error_without_traceback_and_exits() -> None:
    """fail() logs one event with the error text (no traceback for a ShmdError) and exits."""
    with capture_logs() as captured, pytest.raises(SystemExit) as info:
        process.fail(
            logs.get_logger(),
            "start_failed",
            ShmdError("Failed to start since testing"),
            status=3,
            extra=1,
        )
    assert info.value.code == 3
    assert captured == [
        {
            "event": "start_failed",
            "error": "Failed to start since testing",
            "extra": 1,
            "log_level": "error",
        }
    ]


def test_fail_keeps_the_traceback_of_a_bug() -> None:
    """fail() logs an unexpected exception with exc_info (a bug keeps its traceback)."""
    with capture_logs() as captured, pytest.raises(SystemExit) as info:
        try:
            raise KeyError("bug")
        except KeyError as exc:
            process.fail(logs.get_logger(), "crashed", exc)
    assert info.value.code == process.EXIT_FAILURE
    assert captured[0]["event"] == "crashed" and captured[0]["exc_info"] is True


def test_pid_alive() -> None:
    """pid_alive is true for a running process and false for a reaped one or a pid <= 0."""
    assert process.pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    child.wait()
    assert not process.pid_alive(child.pid)
    assert not process.pid_alive(0) and not process.pid_alive(-1)


def test_base_parser_options() -> None:
    """The shared parser knows --config, --check-config and --log-target (with its choices)."""
    p = process.base_parser("x", "y")
    args = p.parse_args(["--config", "f.yaml", "--check-config", "--log-target", "json"])
    assert (args.config, args.check_config, args.log_target) == ("f.yaml", True, "json")
    assert p.parse_args([]).log_target is None
    with pytest.raises(SystemExit):
        p.parse_args(["--log-target", "syslog"])


# ---------------------------------------------------------------------------
# Exiting on a configuration error
# ---------------------------------------------------------------------------


def test_exit_on_config_error_logs_one_event_and_exits_78(
    tmp_path: Path, clean_logging: None
) -> None:
    """exit_on_config_error logs a config_error event with the location and exits 78."""
    path = write(tmp_path, "segment:\n  capacity: 3\n")
    logs.configure_logging("writer", level="info", target="json")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    with capture_logs() as captured, pytest.raises(SystemExit) as exited:
        process.exit_on_config_error(info.value, role="writer")
    assert exited.value.code == EXIT_CONFIG == 78
    assert len(captured) == 1
    event = captured[0]
    assert event["event"] == "config_error" and event["log_level"] == "error"
    assert (event["path"], event["line"], event["key"]) == (path, 2, "segment.capacity")
    assert event["error"] == f"{path}:2: segment.capacity: must be a power of two (got 3)"


def test_daemon_start_with_broken_config_prints_one_line_and_exits_78(tmp_path: Path) -> None:
    """load_config_or_exit in a fresh process writes one JSON line, no traceback, exit 78."""
    path = write(tmp_path, "segment:\n  policy: sometimes\n")
    code = (
        "import sys\nfrom shmd.daemons.process import load_config_or_exit\n"
        "load_config_or_exit(sys.argv[1], role='reader', instance='4')\n"
        "print('not reached')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    child = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert child.returncode == 78, child.stderr
    assert child.stdout == ""
    assert "Traceback" not in child.stderr
    lines = child.stderr.splitlines()
    assert len(lines) == 1, child.stderr
    event = json.loads(lines[0])
    assert event["event"] == "config_error" and event["level"] == "error"
    assert event["role"] == "reader" and event["instance"] == "4"
    assert event["line"] == 2 and event["key"] == "segment.policy"
    assert "must be one of drop-oldest | block" in event["error"]


def test_test_children_start_with_sigint_sigquit_sighup_not_ignored() -> None:
    """A child of the suite never inherits an ignored SIGINT, SIGQUIT or SIGHUP."""
    out = subprocess.run(
        ["sh", "-c", "grep SigIgn /proc/self/status"], capture_output=True, text=True, check=True
    ).stdout
    ignored = int(out.split()[1], 16)
    assert ignored & 0b111 == 0, out


class _Owner:
    """A daemon stand-in: handles SIGUSR1 only."""

    def __init__(self) -> None:
        self.handled: list[str] = []

    def handle_sigusr1(self) -> None:
        self.handled.append("SIGUSR1")


def test_signal_dispatch_calls_handle_methods_and_logs_the_others() -> None:
    """A caught signal runs its handle_<name> on the loop; one without a method is logged."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    reactor = Reactor()
    owner = _Owner()
    with capture_logs() as captured:
        dispatch = process.SignalDispatch(
            reactor, owner, structlog.get_logger(), [signal.SIGUSR1, signal.SIGUSR2]
        )
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            # Only queued so far: the handler runs when the loop reads the pipe.
            assert owner.handled == []
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 20
            while len(owner.handled) + len(captured) < 2 and time.monotonic() < deadline:
                reactor.poll(1)
        finally:
            dispatch.close()
            dispatch.close()  # idempotent
            reactor.close()
    assert owner.handled == ["SIGUSR1"]
    assert captured == [{"event": "signal_ignored", "signal": "SIGUSR2", "log_level": "warning"}]
    assert {s: signal.getsignal(s) for s in previous} == previous
