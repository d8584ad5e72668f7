"""Tests of shmd.daemons.logs: targets, live level changes, the event contract."""

from __future__ import annotations

import ast
import functools
import io
import json
import os
import re
import select
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from shmd.daemons import logs

REPO = Path(__file__).resolve().parent.parent
JOURNAL_DOC = REPO / "docs" / "JOURNAL.md"
SHMD_DIR = REPO / "shmd"
FIELD_RE = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")


@pytest.fixture(autouse=True)
def _every_test_cleans_logging(clean_logging: None) -> None:
    """Every test here configures logging: each starts and ends with structlog's defaults."""


@pytest.fixture
def sent() -> list[dict[str, str]]:
    """Journal entries captured in place of journald, configured for the writer role."""
    entries: list[dict[str, str]] = []
    assert (
        logs.configure_logging("writer", level="info", target="journal", sender=entries.append)
        == "journal"
    )
    return entries


# ---------------------------------------------------------------------------
# The journal target end to end (sender swapped)
# ---------------------------------------------------------------------------


def test_journal_target_sends_fields_with_the_call_site(sent: list[dict[str, str]]) -> None:
    """Logging under the journal target hands the sender the fields and the caller's location."""
    log = logs.get_logger(reader="2")
    line = sys._getframe().f_lineno + 1  # the warning's line, next
    log.warning(logs.READER_LOST, pid=77, reason="hang-up")
    assert len(sent) == 1
    fields = sent[0]
    assert fields["SHMD_EVENT"] == "reader_lost" and fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "shm-writer" and fields["SHMD_ROLE"] == "writer"
    assert fields["SHMD_READER"] == "2" and fields["SHMD_PID"] == "77"
    assert fields["MESSAGE"] == "reader_lost reader=2 pid=77 reason=hang-up"
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_LINE"] == str(line)
    assert fields["CODE_FUNC"] == "test_journal_target_sends_fields_with_the_call_site"


def test_reader_role_binds_its_instance() -> None:
    """A reader's events carry SHMD_INSTANCE and the shm-reader identifier."""
    entries: list[dict[str, str]] = []
    logs.configure_logging(
        "reader", level="info", target="journal", instance="3", sender=entries.append
    )
    logs.get_logger().info(logs.STATS, records=10, lost=0)
    (fields,) = entries
    assert fields["SYSLOG_IDENTIFIER"] == "shm-reader" and fields["SHMD_ROLE"] == "reader"
    assert fields["SHMD_INSTANCE"] == "3" and fields["SHMD_RECORDS"] == "10"
    assert fields["SHMD_LOST"] == "0"


def test_level_filters_and_set_level_reaches_bound_loggers(sent: list[dict[str, str]]) -> None:
    """Events below the level are dropped, and set_level changes loggers bound earlier."""
    log = logs.get_logger(reader="1")
    log.debug("quiet")
    log.info("loud")
    logs.set_level("debug")
    log.debug("now-visible")
    logs.set_level("error")
    log.warning("dropped")
    log.error("kept")
    assert [e["SHMD_EVENT"] for e in sent] == ["loud", "now-visible", "kept"]


def test_exceptions_travel_as_a_field(sent: list[dict[str, str]]) -> None:
    """log.exception() sends the traceback in SHMD_EXCEPTION at error priority."""
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logs.get_logger().exception("unexpected")
    (fields,) = sent
    assert fields["PRIORITY"] == "3"
    assert "RuntimeError: boom" in fields["SHMD_EXCEPTION"]
    assert fields["MESSAGE"].startswith("unexpected\nTraceback")


def test_capture_logs_sees_events_with_their_context(sent: list[dict[str, str]]) -> None:
    """structlog's capture_logs records our events and bound keys instead of sending them."""
    with capture_logs() as captured:
        logs.get_logger(reader="5").info(logs.DRAINED, records=3)
    assert captured == [{"event": "drained", "reader": "5", "records": 3, "log_level": "info"}]
    assert sent == []


def test_bad_arguments_are_refused() -> None:
    """Unknown roles, levels and targets raise ValueError with a 'Failed to' message."""
    with pytest.raises(ValueError, match="Failed to configure logging since role"):
        logs.configure_logging("daemon", level="info", target="json")
    with pytest.raises(ValueError, match="Failed to set the log level since"):
        logs.set_level("verbose")
    with pytest.raises(ValueError, match="Failed to choose a log target since"):
        logs.configure_logging("writer", level="info", target="syslog")
    assert not logs.is_configured()


# ---------------------------------------------------------------------------
# Console and JSON targets, and auto
# ---------------------------------------------------------------------------


def test_json_target_writes_one_object_per_line() -> None:
    """The json target writes one parseable JSON object per event with role and timestamp."""
    out = io.StringIO()
    assert logs.configure_logging("ctl", level="debug", target="json", stream=out) == "json"
    logs.get_logger(segment="/shmd-test-x").debug("first", n=1)
    logs.get_logger().error("second")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "first" and first["n"] == 1 and first["level"] == "debug"
    assert first["role"] == "ctl" and first["segment"] == "/shmd-test-x"
    assert first["timestamp"].endswith("Z")
    assert second["level"] == "error"


def test_console_target_has_no_colour_off_a_tty() -> None:
    """The console target writes a readable line without ANSI colours to a non-tty."""
    out = io.StringIO()
    logs.configure_logging("writer", level="info", target="console", stream=out)
    logs.get_logger().info(logs.LISTENER_READY, socket="/run/shmd/control.sock")
    text = out.getvalue()
    assert "listener_ready" in text and "socket=/run/shmd/control.sock" in text
    assert "\x1b[" not in text


class WriteRecorder(io.StringIO):
    """A text stream that keeps every write() call's text apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


@pytest.mark.parametrize("target", ["console", "json"])
def test_each_line_is_one_write_call(target: str) -> None:
    """Every event goes out as one write() of the whole line, newline included."""
    # Under PYTHONUNBUFFERED each write() on stderr is a write(2) of its own:
    # a line written in parts interleaves mid-line with the lines of other
    # processes on the same terminal or pipe (shmctl demo).
    out = WriteRecorder()
    logs.configure_logging("reader", level="info", target=target, stream=out, instance="1")
    log = logs.get_logger()
    log.info("records", count=3, payload="tick 1")
    log.warning("overrun", lost=7)
    assert len(out.calls) == 2, out.calls
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in out.calls), out.calls


def _read_pty(master: int, needle: bytes, deadline: float) -> bytes:
    data = b""
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} on the pty; got {data!r}"
        ready, _, _ = select.select([master], [], [], left)
        if ready:
            data += os.read(master, 4096)
    return data


def test_console_target_is_coloured_on_a_tty_and_auto_picks_it() -> None:
    """On a real pty, auto chooses console and the console renderer uses colours."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", buffering=1)
    try:
        assert logs.resolve_target("auto", stream=stream, env={}) == "console"
        logs.configure_logging("writer", level="info", target="auto", stream=stream, env={})
        logs.get_logger().info(logs.RELOAD, live="logging.level")
        data = _read_pty(master, b"logging.level", time.monotonic() + 10)
        assert b"reload" in data and b"\x1b[" in data
    finally:
        stream.close()
        os.close(master)


def test_auto_picks_journal_only_when_journal_stream_matches() -> None:
    """auto means journal when JOURNAL_STREAM is stderr's dev:inode, else json off a tty."""
    with tempfile.TemporaryFile("w+") as stream:
        st_ = os.fstat(stream.fileno())
        matching = {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}"}
        assert logs.resolve_target("auto", stream=stream, env=matching) == "journal"
        other = {"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino + 1}"}
        assert logs.resolve_target("auto", stream=stream, env=other) == "json"
        assert logs.resolve_target("auto", stream=stream, env={"JOURNAL_STREAM": "x"}) == "json"
        assert logs.resolve_target("auto", stream=stream, env={}) == "json"
        assert logs.resolve_target("console", stream=stream, env=matching) == "console"
    assert logs.resolve_target("auto", stream=io.StringIO(), env={}) == "json"


# ---------------------------------------------------------------------------
# The event contract
# ---------------------------------------------------------------------------

BRIEFED = {
    "writer": [
        "config_loaded",
        "config_error",
        "segment_created",
        "segment_adopted",
        "segment_unlinked",
        "listener_ready",
        "reader_connected",
        "reader_refused",
        "reader_attached",
        "reader_detached",
        "reader_lost",
        "overrun",
        "reload",
        "active_cleared",
        "shutdown_complete",
    ],
    "reader": ["attached", "stats", "writer_inactive", "drained", "writer_lost", "exiting"],
    "either": ["mutex_owner_died"],
}


def test_event_contract_contains_the_agreed_names() -> None:
    """EVENTS holds every agreed event name, each sorted into its role's set."""
    assert set(BRIEFED["writer"]) <= logs.WRITER_EVENTS
    assert set(BRIEFED["reader"]) <= logs.READER_EVENTS
    assert set(BRIEFED["either"]) <= logs.COMMON_EVENTS
    assert logs.EVENTS == logs.WRITER_EVENTS | logs.READER_EVENTS | logs.COMMON_EVENTS
    for name in logs.EVENTS:
        assert getattr(logs, name.upper()) == name


def test_journal_doc_describes_every_event() -> None:
    """docs/JOURNAL.md has a section for every name in EVENTS and none that do not exist."""
    text = JOURNAL_DOC.read_text()
    documented = set(re.findall(r"^### `([a-z_]+)`", text, flags=re.MULTILINE))
    assert documented == set(logs.EVENTS)


# ---------------------------------------------------------------------------
# The contract against the code: every log call in shmd/, read from the source
# ---------------------------------------------------------------------------

#: Log method -> the level it logs at (structlog's names, as _METHOD_LEVEL).
LOG_METHODS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
}
#: Calls (of a bare name) that carry an event name to a log call somewhere else:
#: name -> (position of the event argument, (module, function, event expression)
#: of the log call that logs it).  That log call's own keywords are the
#: event's fields, plus the carrier call's keywords that are not parameters
#: of the carrier itself (its ``**fields``).
CARRIERS = {
    # shmd.daemons.process.fail(log, event, err, status, **fields): log.error/exception(event, ...)
    "fail": (1, ("daemons/process.py", "fail", "event")),
    # raise ReaderExit(status, event, message, **fields): shm-reader's main logs it
    "ReaderExit": (1, ("daemons/reader.py", "main", "exc.event")),
}
#: Which process logs the events of each module (for the role sets).
MODULE_ROLES = {
    "daemons/writer.py": "writer",
    "daemons/server.py": "writer",
    "daemons/fdstore.py": "writer",
    "daemons/dormant.py": "writer",
    "bus/publisher.py": "writer",
    "bus/readers.py": "writer",
    "bus/adopt.py": "writer",
    "daemons/sources.py": "writer",
    "daemons/reader.py": "reader",
    "client/handshake.py": "reader",
    "client/subscription.py": "reader",
    "client/session.py": "reader",
    "bus/subscriber.py": "reader",
    "daemons/sinks.py": "reader",
    "daemons/zenoh_sink.py": "reader",
    "daemons/zenoh_source.py": "writer",
    "cli.py": "reader",
    "daemons/process.py": "either",
    "config/__init__.py": "either",
    "daemons/sdnotify.py": "either",
}


@dataclass
class LogCall:
    """One place in shmd/ that logs an event: where, which names, at which levels, what keys."""

    where: str
    events: set[str]
    levels: set[str]
    fields: set[str]
    role: str


@dataclass
class Scan:
    """Everything the scan found in shmd/."""

    calls: list[LogCall] = field(default_factory=list)
    #: Event names referenced as logs.CONSTANT anywhere (compared, passed on...).
    referenced: dict[str, str] = field(default_factory=dict)
    #: Log calls whose event is an expression the scan cannot resolve:
    #: (module, function, expression) -> (levels, fields, whether it spreads **).
    dynamic: dict[tuple[str, str, str], tuple[set[str], set[str]]] = field(default_factory=dict)
    #: What the scan could not make sense of (must stay empty).
    problems: list[str] = field(default_factory=list)


def _own_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``scope`` outside the functions and classes nested in it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))


def _scopes(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    yield "<module>", tree
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node


def _parameters(tree: ast.Module, name: str) -> set[str]:
    """Named parameters of function ``name``, or of class ``name``'s __init__."""
    for node in ast.walk(tree):
        func: ast.FunctionDef | None = None
        if isinstance(node, ast.ClassDef) and node.name == name:
            func = next(
                (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                None,
            )
        elif isinstance(node, ast.FunctionDef) and node.name == name:
            func = node
        if func is not None:
            args = func.args
            return {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
    return set()


class _Module:
    """One module under shmd/: its imports from shmd.daemons.logs, per scope its assignments."""

    def __init__(self, path: Path) -> None:
        self.name = path.relative_to(SHMD_DIR).as_posix()  # e.g. "bus/publisher.py"
        self.tree = ast.parse(path.read_text(), str(path))
        self.imported: dict[str, str] = {}  # local name -> logs attribute
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module == "shmd.daemons.logs":
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = alias.name

    def constant(self, expr: ast.expr) -> str | None:
        """The logs attribute ``expr`` names (``logs.X`` or an imported ``X``), if any."""
        if (
            isinstance(expr, ast.Attribute)
            and isinstance(expr.value, ast.Name)
            and expr.value.id == "logs"
            and expr.attr.isupper()
        ):
            return expr.attr
        if isinstance(expr, ast.Name) and expr.id in self.imported:
            return self.imported[expr.id]
        return None

    @staticmethod
    def assigned(scope: ast.AST, name: str) -> list[ast.expr]:
        values = []
        for node in _own_nodes(scope):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                values.append(node.value)
        return values

    def events(self, scope: ast.AST, expr: ast.expr) -> set[str] | None:
        """The event names ``expr`` can be, or None when the source does not say."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}
        const = self.constant(expr)
        if const is not None:
            return {getattr(logs, const)}
        if isinstance(expr, ast.IfExp):
            body, orelse = self.events(scope, expr.body), self.events(scope, expr.orelse)
            return None if body is None or orelse is None else body | orelse
        if isinstance(expr, ast.Name):
            values = self.assigned(scope, expr.id)
            found: set[str] = set()
            for value in values:
                names = self.events(scope, value)
                if names is None:
                    return None
                found |= names
            return found or None
        return None

    def levels(self, scope: ast.AST, func: ast.expr) -> set[str] | None:
        """The levels a call of ``func`` logs at, or None when it is no log method."""
        if isinstance(func, ast.Attribute):
            receiver = func.value
            if isinstance(receiver, ast.Name) and receiver.id == "parser":
                return None  # argparse's parser.error(message)
            return {LOG_METHODS[func.attr]} if func.attr in LOG_METHODS else None
        if isinstance(func, ast.IfExp):
            body, orelse = self.levels(scope, func.body), self.levels(scope, func.orelse)
            return None if body is None or orelse is None else body | orelse
        if isinstance(func, ast.Name):
            values = self.assigned(scope, func.id)
            found: set[str] = set()
            for value in values:
                levels = self.levels(scope, value)
                if levels is None:
                    return None
                found |= levels
            return found or None
        return None

    def spread_keys(self, scope: ast.AST, expr: ast.expr) -> set[str] | None:
        """The keys of a ``**name`` dict built in this scope (literal, update(), [key]=)."""
        if not isinstance(expr, ast.Name):
            return None
        keys: set[str] = set()
        for value in self.assigned(scope, expr.id):
            if not isinstance(value, ast.Dict):
                return None
            for k in value.keys:
                if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                    return None
                keys.add(k.value)
        for node in _own_nodes(scope):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == expr.id
            ):
                if node.args or any(k.arg is None for k in node.keywords):
                    return None
                keys |= {k.arg for k in node.keywords if k.arg is not None}
            if (
                isinstance(node, ast.Subscript)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == expr.id
            ):
                if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
                    return None
                keys.add(node.slice.value)
        return keys or None


@functools.lru_cache(maxsize=1)
def scan_shmd() -> Scan:
    """Read every log call in shmd/ (the logging module itself aside)."""
    scan = Scan()
    modules = [
        _Module(p) for p in sorted(SHMD_DIR.rglob("*.py")) if p != SHMD_DIR / "daemons" / "logs.py"
    ]
    carried: list[tuple[_Module, str, ast.Call, str]] = []
    for mod in modules:
        for fname, scope in _scopes(mod.tree):
            for node in _own_nodes(scope):
                if isinstance(node, ast.expr):
                    const = mod.constant(node)
                    if const is not None and isinstance(getattr(logs, const, None), str):
                        scan.referenced[getattr(logs, const)] = f"{mod.name}:{node.lineno}"
                if not isinstance(node, ast.Call):
                    continue
                where = f"{mod.name}:{node.lineno}"
                callee = node.func.id if isinstance(node.func, ast.Name) else ""
                if callee in CARRIERS:
                    carried.append((mod, fname, node, callee))
                    continue
                levels = mod.levels(scope, node.func)
                if levels is None or not node.args:
                    continue
                fields = {k.arg for k in node.keywords if k.arg is not None}
                if isinstance(node.func, ast.Attribute) and node.func.attr == "exception":
                    fields.add("exception")  # the traceback: SHMD_EXCEPTION
                events = mod.events(scope, node.args[0])
                if events is None:
                    key = (mod.name, fname, ast.unparse(node.args[0]))
                    old_levels, old_fields = scan.dynamic.get(key, (set(), set()))
                    scan.dynamic[key] = (old_levels | levels, old_fields | fields)
                    continue
                for k in node.keywords:
                    if k.arg is None:
                        keys = mod.spread_keys(scope, k.value)
                        if keys is None:
                            scan.problems.append(
                                f"{where}: cannot tell the keys of **{ast.unparse(k.value)}"
                            )
                        else:
                            fields |= keys
                role = MODULE_ROLES.get(mod.name, "")
                if not role:
                    scan.problems.append(f"{where}: add {mod.name} to MODULE_ROLES")
                scan.calls.append(LogCall(where, events, levels, fields, role))
    for mod, fname, node, callee in carried:
        position, site = CARRIERS[callee]
        where = f"{mod.name}:{node.lineno}"
        if len(node.args) <= position:
            scan.problems.append(f"{where}: {callee}() without its event argument")
            continue
        events = mod.events(
            mod.tree
            if fname == "<module>"
            else next(s for n, s in _scopes(mod.tree) if n == fname),
            node.args[position],
        )
        if events is None:
            scan.problems.append(f"{where}: {callee}() with an event the scan cannot resolve")
            continue
        if site not in scan.dynamic:
            scan.problems.append(f"{where}: no log call of {site} found for {callee}()")
            continue
        site_mod = next(m for m in modules if m.name == site[0])
        own = _parameters(site_mod.tree, callee)  # the carrier is defined where it logs
        _, fields = scan.dynamic[site]
        extra = {k.arg for k in node.keywords if k.arg is not None and k.arg not in own}
        # No levels: a carried event's level is chosen at run time (ReaderExit's
        # by its status), so only direct calls are checked against Level: lines.
        scan.calls.append(
            LogCall(where, events, set(), fields | extra, MODULE_ROLES.get(mod.name, ""))
        )
    return scan


@dataclass
class DocEvent:
    """One ``###`` section of docs/JOURNAL.md."""

    part: str
    level: str
    fields: set[str]


def journal_doc() -> dict[str, DocEvent]:
    """docs/JOURNAL.md's event sections: the ``##`` part, the Level: paragraph, the bullets."""
    sections: dict[str, DocEvent] = {}
    part = ""
    for chunk in re.split(r"^(?=##+ )", JOURNAL_DOC.read_text(), flags=re.MULTILINE):
        heading = re.match(r"### `([a-z_]+)`", chunk)
        if heading is None:
            part = chunk.splitlines()[0] if chunk.startswith("## ") else part
            continue
        level = re.search(r"^Level: (.*?)(?:\n\n|\Z)", chunk, flags=re.MULTILINE | re.DOTALL)
        # "- `key`: meaning" or "- `key`, `other`: what both are"
        keys = {
            key
            for bullet in re.findall(r"^- ((?:`[a-z_]+`(?:, )?)+):", chunk, flags=re.MULTILINE)
            for key in re.findall(r"`([a-z_]+)`", bullet)
        }
        sections[heading.group(1)] = DocEvent(part, level.group(1) if level else "", keys)
    return sections


def test_the_scan_resolves_every_log_call() -> None:
    """Every log call in shmd/ names its event statically, or through a known carrier."""
    scan = scan_shmd()
    assert scan.problems == []
    # The only log calls whose event is a variable are the carriers' own;
    # a new one needs a CARRIERS entry (or a logs constant at the call).
    assert set(scan.dynamic) == {site for _, site in CARRIERS.values()}


def test_every_logged_event_is_in_the_contract_and_documented() -> None:
    """Each event name shmd/ logs (literal or logs constant) has a ### section and is in EVENTS."""
    documented = journal_doc()
    scan = scan_shmd()
    missing = sorted(
        f"{name} ({call.where})"
        for call in scan.calls
        for name in call.events
        if name not in documented or name not in logs.EVENTS
    )
    missing += sorted(
        f"{name} ({where})"
        for name, where in scan.referenced.items()
        if name not in documented or name not in logs.EVENTS
    )
    assert missing == []


def test_every_contract_event_is_logged_somewhere() -> None:
    """No documented event is dead: each name in EVENTS is logged by some call in shmd/."""
    logged = {name for call in scan_shmd().calls for name in call.events}
    assert sorted(logs.EVENTS - logged) == []


def test_journal_doc_lists_exactly_the_fields_each_event_logs() -> None:
    """An event's section lists (as ``- `key` `` bullets) every key its log calls pass, no other."""
    documented = journal_doc()
    logged: dict[str, set[str]] = {}
    for call in scan_shmd().calls:
        for name in call.events:
            logged.setdefault(name, set()).update(call.fields)
    wrong = {
        name: {
            "undocumented": sorted(keys - documented[name].fields),
            "not logged": sorted(documented[name].fields - keys),
        }
        for name, keys in logged.items()
        if name in documented and keys != documented[name].fields
    }
    assert wrong == {}


def test_journal_doc_names_the_levels_each_event_is_logged_at() -> None:
    """An event's Level: line names every level its log calls use."""
    documented = journal_doc()
    wrong = sorted(
        f"{name} at {level} ({call.where})"
        for call in scan_shmd().calls
        for name in call.events
        for level in call.levels
        if name in documented and not re.search(rf"\b{level}\b", documented[name].level)
    )
    assert wrong == []


def test_events_are_sorted_into_the_roles_that_log_them() -> None:
    """Role sets and doc parts agree with which daemon's modules log each event."""
    both = logs.COMMON_EVENTS | (logs.WRITER_EVENTS & logs.READER_EVENTS)
    allowed = {
        "writer": logs.WRITER_EVENTS | logs.COMMON_EVENTS,
        "reader": logs.READER_EVENTS | logs.COMMON_EVENTS,
        "either": both,
    }
    wrong = sorted(
        f"{name} logged by the {call.role} ({call.where})"
        for call in scan_shmd().calls
        for name in call.events
        if name not in allowed.get(call.role, set())
    )
    assert wrong == []
    parts = {
        "writer": logs.WRITER_EVENTS - both,
        "reader": logs.READER_EVENTS - both,
        "either": both,
    }
    for name, section in journal_doc().items():
        part = section.part.lower()
        role = (
            "writer"
            if "writer" in part
            else "reader"
            if "reader" in part
            else ("either" if "either" in part else "")
        )
        assert name in parts.get(role, set()), f"{name} is under {section.part!r}"
