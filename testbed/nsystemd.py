"""A real systemd booted as PID 1 of private namespaces, over a volatile overlay.

The host's PID 1 is not systemd, but systemd boots happily as PID 1 of a fresh
pid+mount namespace.  Booting it on the host's root directly would be a
disaster: at boot it runs ``systemd-tmpfiles --remove``, which empties /tmp,
and journald writes into /var/log/journal.  So the namespace never sees the
host's root writable:

* a tmpfs holds an overlay (lower: the host's ``/``, upper: the tmpfs); we
  ``pivot_root`` into it and detach the old root, so every write lands in RAM
  and vanishes at power-off.  The units never run code from the checkout:
  :meth:`NamespacedSystemd.install_dev_tree` copies it into the overlay
  (:data:`DEV_TREE`, readable by every user), wherever the checkout lives
  and whatever its directories' modes (CI clones into a 0700 home);
* /run, /tmp and /dev/shm are fresh tmpfs; /dev is a small private tmpfs with
  bind-mounted null/zero/full/random/urandom/tty and a private devpts, and
  /dev/console is a plain file (the boot log), so nothing reaches the host's
  console or kernel log;
* /sys is a fresh read-only sysfs (so udev and friends skip themselves) with a
  private cgroup2 hierarchy: the namespace is started inside its own cgroup
  below the host's cgroup2 mount and gets a cgroup namespace rooted there;
* network, UTS and IPC namespaces are private too (systemd sets the hostname
  and brings up ``lo``; neither may touch the host).

Commands run inside with ``nsenter``.  Waiting is always on real state: the
journal (followed with ``journalctl -f``), unit properties polled against a
deadline, or process exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SYSTEMD = "/lib/systemd/system"
SYSTEMD_BINARY = "/lib/systemd/systemd"

# Units that are enabled on a typical Debian image but have no business in a
# throw-away test container; masking them keeps boot fast and quiet.  Units
# that check ConditionVirtualization=!container or a writable /sys skip
# themselves and need no mask.
MASKED_UNITS = (
    "postgresql.service",
    "postgresql@.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "systemd-pstore.service",
    "console-getty.service",
    "container-getty@.service",
    "getty@.service",
    "systemd-firstboot.service",
)

# The environment commands inside the namespace see: nothing leaks from the
# test runner (no pager, no colours, no virtualenv).
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "PAGER": "cat",
    "SYSTEMD_COLORS": "0",
    "DEBIAN_FRONTEND": "noninteractive",
}

NAMESPACES = ("--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--cgroup")

#: Where install_dev_tree puts the code the units run, inside the namespace.
DEV_TREE = "/opt/shmd-dev"


def debian_core(repo: Path) -> Path:
    """shmd's compiled core built for Debian's /usr/bin/python3, which the units run.

    The editable install compiled ``shmd/_sys/_core.c`` for the virtualenv's
    interpreter; when that is another Python version (a pyenv build, say),
    its ``.so`` does not load in Debian's.  Then the core is built once for
    Debian's python3 under the checkout's ``build/`` (git-ignored, like
    ``.venv``), keyed by the C source and setup.py, and reused.
    """
    suffix = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    source = repo / "shmd" / "_sys" / "_core.c"
    in_tree = source.with_name(f"_core{suffix}")
    if in_tree.exists() and in_tree.stat().st_mtime >= source.stat().st_mtime:
        return in_tree
    key = hashlib.sha256(source.read_bytes() + (repo / "setup.py").read_bytes()).hexdigest()[:16]
    out = repo / "build" / f"debian-core-{key}"
    built = out / "shmd" / "_sys" / f"_core{suffix}"
    if not built.exists():
        subprocess.run(
            [
                "/usr/bin/python3",
                "setup.py",
                "-q",
                "build_ext",
                "--build-lib",
                str(out),
                "--build-temp",
                str(out / "tmp"),
            ],
            cwd=repo,
            capture_output=True,
            check=True,
            timeout=300,
        )
    return built


#: The host's POSIX shared-memory directory, checked at power-off.
HOST_SHM = "/dev/shm"

# Runs as PID 1 of the new namespaces, as root, with "$1" = container name.
# Every mount below happens in the private mount namespace; the host only
# ever sees its root as the overlay's read-only lower layer.
BOOT_SCRIPT = r"""
set -eu
name=$1
base=/tmp
mount -t tmpfs -o mode=0700,size=50% "$name" "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
root=$base/root

mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
# sysctls are mostly not namespaced: keep /proc/sys read-only.
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
if [ -e "$root/proc/sysrq-trigger" ]; then
    mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
    mount -o remount,bind,ro "$root/proc/sysrq-trigger"
fi

mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"

mount -t tmpfs -o mode=0755,nosuid,size=4m "$name-dev" "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev "$name-shm" "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
# The console is a plain file: the boot log, readable from the host through
# /proc/<pid>/root/dev/console.
touch "$root/dev/console"

mount -t tmpfs -o mode=0755,nosuid,nodev "$name-run" "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev "$name-tmp" "$root/tmp"

# Masks live in the overlay's upper layer, i.e. in RAM.
mkdir -p "$root/etc/systemd/system"
shift
for unit in "$@"; do
    ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
echo "$name" > "$root/etc/hostname"
# A throw-away journal: kept in /run, and never rate-limited, since tests
# wait for entries that a burst of log lines must not drop.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' \
    > "$root/etc/systemd/journald.conf.d/shmd-test.conf"
# Images built for Docker carry a policy-rc.d that forbids maintainer scripts
# to start services; a real machine has none, and the package tests need
# postinst to behave as it would there.
rm -f "$root/usr/sbin/policy-rc.d"

cd "$root"
mkdir -p .old-root
pivot_root . .old-root
cd /
umount -l /.old-root
rmdir /.old-root
# No capability that reaches past the namespaces into the shared kernel:
# modules, clock, kernel log, raw I/O, wake alarms, process accounting.
exec setpriv --bounding-set=-sys_module,-sys_time,-syslog,-sys_rawio,-wake_alarm,-sys_pacct \
    env -i container="$name" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    SYSTEMD_COLORS=0 /lib/systemd/systemd --system --show-status=yes \
    </dev/null >/dev/console 2>&1
"""


class SystemdError(RuntimeError):
    """The namespaced systemd failed to boot, run a command, or stop."""


def _cgroup2_mount() -> Path | None:
    """Return where the host's cgroup2 hierarchy (its root) is mounted, if anywhere."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if right.split()[0] == "cgroup2" and fields[3] == "/":
                return Path(fields[4])
    return None


def _missing_prerequisite() -> str | None:
    """Return the first thing this machine lacks for the harness, if any."""
    if os.geteuid() != 0:
        return "system tests need root (mount/pid namespaces, overlayfs, pivot_root)"
    for tool in ("unshare", "nsenter", "mount", "pivot_root", "setpriv"):
        if shutil.which(tool) is None:
            return f"system tests need {tool} (util-linux)"
    if not os.access(SYSTEMD_BINARY, os.X_OK):
        return f"system tests need systemd ({SYSTEMD_BINARY} is missing)"
    if _cgroup2_mount() is None:
        return "system tests need a cgroup2 hierarchy mounted on the host"
    return None


def preflight() -> str | None:
    """Return why the namespaced systemd cannot run here, or None when it can."""
    missing = _missing_prerequisite()
    if missing is not None:
        return missing
    # Try the namespaces and mounts boot() needs, in a throw-away namespace.
    probe = (
        "set -e; mount -t tmpfs probe /tmp; mkdir /tmp/u /tmp/w /tmp/r; "
        "mount -t overlay overlay -o lowerdir=/,upperdir=/tmp/u,workdir=/tmp/w /tmp/r; "
        "mount -t proc proc /tmp/r/proc"
    )
    try:
        done = subprocess.run(
            ["unshare", *NAMESPACES, "--propagation", "private", "sh", "-c", probe],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare is not usable here: {e}"
    if done.returncode != 0:
        return f"unshare/overlayfs is not permitted here: {done.stderr.strip()}"
    return None


def entry_matches(entry: Mapping[str, Any], unit: str | None, fields: Mapping[str, str]) -> bool:
    """Whether a journal entry is about unit (None: any) and has every FIELD=value.

    Filtering happens here rather than with journalctl's own matches: journalctl
    252 combined with --after-cursor skips the first matching entry when the
    cursor's entry does not match (it skips one entry too many).  A unit's
    entries are those its processes logged and those PID 1 logged about it,
    as with ``journalctl -u``.
    """
    if (
        unit is not None
        and entry.get("_SYSTEMD_UNIT") != unit
        and not (entry.get("_PID") == "1" and entry.get("UNIT") == unit)
    ):
        return False
    return all(entry.get(key) == value for key, value in fields.items())


class NamespacedSystemd:
    """One systemd booted as PID 1 of private namespaces over a volatile overlay."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"shmd-test-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._cgroup: Path | None = None
        self.pidns: str | None = None
        # The host's /dev/shm at boot: nothing of ours may appear there.
        self._host_shm: set[str] | None = None

    # --- lifecycle ------------------------------------------------------

    @property
    def pid(self) -> int:
        """systemd's pid as the host sees it."""
        if self._pid is None:
            raise SystemdError(f"Failed to reach {self.name} since it is not booted")
        return self._pid

    @property
    def cgroup(self) -> Path | None:
        """The host-side cgroup2 directory the namespace lives in."""
        return self._cgroup

    def boot(self, timeout: float = 90.0, masked: Iterable[str] = MASKED_UNITS) -> str:
        """Boot systemd and wait until it is up; return is-system-running's verdict."""
        if self._proc is not None:
            raise SystemdError(f"Failed to boot {self.name} since it is already booted")
        mount = _cgroup2_mount()
        if mount is None:
            raise SystemdError(f"Failed to boot {self.name} since no cgroup2 is mounted")
        self._cgroup = mount / self.name
        self._cgroup.mkdir()
        self._host_shm = set(os.listdir(HOST_SHM))
        deadline = time.monotonic() + timeout
        # The shell moves itself into the fresh cgroup, then becomes unshare,
        # whose cgroup namespace is therefore rooted there.  If this process
        # dies without powering off, unshare gets SIGKILL (parent death
        # signal) and takes PID 1 of the namespace with it (--kill-child).
        launcher = 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"'
        argv = [
            "sh",
            "-c",
            launcher,
            "sh",
            str(self._cgroup),
            "setpriv",
            "--pdeathsig",
            "KILL",
            "unshare",
            *NAMESPACES,
            "--propagation",
            "private",
            "--kill-child",
            "sh",
            "-c",
            BOOT_SCRIPT,
            "boot",
            self.name,
            *masked,
        ]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._pid = self.wait_for(
                self._find_systemd,
                deadline - time.monotonic(),
                "systemd to exec as PID 1 of the namespace",
            )
            self.pidns = os.readlink(f"/proc/{self._pid}/ns/pid")
            # The private bus socket exists once PID 1 accepts systemctl.
            self.wait_for(
                lambda: self._host_path("/run/systemd/private").exists(),
                deadline - time.monotonic(),
                "systemd's private bus socket",
            )
            done = self.run(
                "systemctl",
                "is-system-running",
                "--wait",
                check=False,
                timeout=max(1.0, deadline - time.monotonic()),
            )
            state = done.stdout.strip()
            if state not in ("running", "degraded"):
                raise SystemdError(
                    f"Failed to boot {self.name} since it reports {state!r}:\n"
                    + self.console_log()[-4000:]
                )
            return state
        except BaseException:
            self.poweroff()
            raise

    def _find_systemd(self) -> int | None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
            raise SystemdError(
                f"Failed to boot {self.name} since the namespace exited "
                f"with {self._proc.returncode}: {out.strip()}"
            )
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        try:
            pids = children.read_text().split()
        except FileNotFoundError:
            return None
        for pid in pids:
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if os.path.basename(exe) == "systemd":
                return int(pid)
        return None

    def poweroff(self, timeout: float = 30.0) -> int | None:
        """Power the namespace off (killing its PID 1 if it will not go) and clean up.

        Returns the namespace's exit status (None when it was not running).
        """
        proc, self._proc = self._proc, None
        status: int | None = None
        created = self._segments_created() if proc is not None else set()
        if proc is not None:
            if self._pid is not None and proc.poll() is None:
                # The bus connection may drop as PID 1 goes: not an error.
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            try:
                status = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Killing a pid namespace's init kills everything inside it.
                target = self._pid if self._pid is not None else proc.pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
                status = proc.wait(timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        self._pid = None
        self._remove_cgroup(timeout)
        self._check_host_shm(created)
        return status

    def _segments_created(self) -> set[str]:
        """The names of every segment a writer inside logged as created (best effort:
        a namespace that no longer answers has nothing to say)."""
        if self._pid is None:
            return set()
        try:
            entries = self.journal(SHMD_EVENT="segment_created")
        except (SystemdError, subprocess.SubprocessError, OSError, ValueError):
            return set()
        return {e["SHMD_SEGMENT"].lstrip("/") for e in entries if "SHMD_SEGMENT" in e}

    def _check_host_shm(self, created: set[str]) -> None:
        """Raise if a segment a writer inside created is in the host's /dev/shm now.

        The namespace has a /dev/shm of its own (and units with
        PrivateDevices= bind that one), so none should be: one that is
        would outlive the test, and a later run (or a real bus of that
        name) would meet it.  Only the names the writers logged are
        checked: other processes on the host may make segments meanwhile.
        """
        before, self._host_shm = self._host_shm, None
        if before is None:
            return  # not booted
        leaked = sorted(n for n in created - before if (Path(HOST_SHM) / n).exists())
        if leaked:
            raise SystemdError(
                f"Failed to leave the host clean since {', '.join(leaked)} appeared in its "
                f"{HOST_SHM} while {self.name} ran"
            )

    def _remove_cgroup(self, timeout: float) -> None:
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is None or not cgroup.exists():
            return

        # Processes of a dead pid namespace leave the cgroup asynchronously;
        # cgroup.events says when the subtree is empty.
        def empty() -> bool:
            return "populated 0" in (cgroup / "cgroup.events").read_text()

        self.wait_for(empty, timeout, f"cgroup {cgroup} to empty")
        for dirpath, _dirs, _files in sorted(os.walk(cgroup), key=lambda w: -len(w[0])):
            os.rmdir(dirpath)

    def __enter__(self) -> NamespacedSystemd:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    # --- running things inside ------------------------------------------

    def _host_path(self, path: str) -> Path:
        """The host's view of an inner path, for reading only.

        Absolute symlinks below /proc/<pid>/root resolve against the host's
        root, so never write through this: use write_file().
        """
        return Path(f"/proc/{self.pid}/root") / path.lstrip("/")

    def _nsenter(self) -> list[str]:
        """The command prefix that enters every namespace of the container."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", "-C", "--"]

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside every namespace of the container and return its result."""
        data = input.encode() if isinstance(input, str) else input
        done = subprocess.run(
            [*self._nsenter(), *argv],
            input=data,
            capture_output=True,
            timeout=timeout,
            env={**INNER_ENV, **(env or {})},
            check=False,
        )
        result = subprocess.CompletedProcess(
            argv,
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise SystemdError(
                f"Failed to run {shlex.join(argv)} in {self.name} since it exited with "
                f"{result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run systemctl inside."""
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """Return the named properties of a unit (``systemctl show``)."""
        out = self.systemctl("show", unit, "--property=" + ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write_file(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Create or replace a file (and its parent directories) inside the container."""
        self.run(
            "sh",
            "-c",
            'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
            "write_file",
            path,
            f"{mode:o}",
            input=content,
        )

    def read_file(self, path: str) -> str:
        """Return a text file's content from inside the container."""
        return self.run("cat", "--", path).stdout

    # --- journal ----------------------------------------------------------

    def journal(
        self,
        unit: str | None = None,
        *,
        after_cursor: str | None = None,
        **fields: str,
    ) -> list[dict[str, Any]]:
        """Return journal entries (``journalctl -o json``), optionally of one unit,
        after a cursor, and matching FIELD=value pairs.

        Everything logged before the call is included (``journalctl --sync``).
        """
        self.run("journalctl", "--sync")
        argv = ["journalctl", "--no-pager", "-o", "json"]
        if after_cursor is not None:
            argv += ["--after-cursor", after_cursor]
        out = self.run(*argv).stdout
        entries = (json.loads(line) for line in out.splitlines() if line.strip())
        return [e for e in entries if entry_matches(e, unit, fields)]

    def cursor(self) -> str:
        """Return the cursor of the newest journal entry (start point for waits)."""
        self.run("journalctl", "--sync")
        entries = self.run("journalctl", "--no-pager", "-o", "json", "-n", "1").stdout
        return str(json.loads(entries.splitlines()[-1])["__CURSOR"])

    def wait_for_journal(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        *,
        unit: str | None = None,
        after_cursor: str | None = None,
        what: str = "a matching journal entry",
    ) -> dict[str, Any]:
        """Follow the journal (``journalctl -f``) until an entry satisfies predicate."""
        # journalctl must run inside the pid namespace: it sets its inotify
        # watches through /proc/self/fd, and the container's /proc has no
        # "self" for a process outside it.  nsenter then forks it, so killing
        # nsenter would orphan it; instead we close the pipe (journalctl -f
        # polls its stdout and exits on hang-up), and timeout(1) bounds its
        # life in case we cannot.
        life = str(int(timeout) + 10)
        argv = [
            *self._nsenter(),
            "timeout",
            life,
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            "--follow",
        ]
        argv += ["--after-cursor", after_cursor] if after_cursor else ["--lines", "all"]
        deadline = time.monotonic() + timeout
        follow = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=INNER_ENV
        )
        assert follow.stdout is not None
        try:
            buffer = b""
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([follow.stdout], [], [], left)
                if not ready:
                    break
                chunk = os.read(follow.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    entry = json.loads(line)
                    if entry_matches(entry, unit, {}) and predicate(entry):
                        return dict(entry)
        finally:
            follow.stdout.close()
            try:
                follow.wait(10)
            except subprocess.TimeoutExpired:
                follow.kill()
                follow.wait()
        raise TimeoutError(f"Failed to see {what} in {self.name} within {timeout}s")

    # --- waiting ----------------------------------------------------------

    @staticmethod
    def wait_for(
        predicate: Callable[[], T | None],
        timeout: float,
        what: str = "the awaited condition",
        interval: float = 0.05,
    ) -> T:
        """Poll predicate until it returns something truthy, with a deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Failed to see {what} within {timeout}s")
            time.sleep(interval)

    def wait_unit(self, unit: str, timeout: float = 30.0, **expected: str) -> dict[str, str]:
        """Wait until a unit's properties (e.g. ActiveState="active") all match."""

        def matches() -> dict[str, str] | None:
            props = self.show(unit, *expected)
            return props if all(props.get(k) == v for k, v in expected.items()) else None

        return self.wait_for(matches, timeout, f"{unit} with {expected}")

    def console_log(self) -> str:
        """Return what PID 1 wrote to its console (the boot log)."""
        try:
            return self._host_path("/dev/console").read_text(errors="replace")
        except (OSError, SystemdError):
            return ""

    # --- installing shmd --------------------------------------------------

    def install_deb(self, deb: Path) -> subprocess.CompletedProcess[str]:
        """Install a shmd .deb inside with apt-get (its dependencies must be installed)."""
        inner = f"/var/cache/shmd-test/{deb.name}"
        # apt-get drops to user _apt to read local packages: keep them world-readable.
        self.run("install", "-d", "-m", "0755", "/var/cache/shmd-test")
        self.write_file(inner, deb.read_bytes(), 0o644)
        return self.run(
            "apt-get",
            "install",
            "-y",
            inner,
            timeout=300,
        )

    def copy_tree(self, repo: Path, parts: Iterable[str], dest: str = DEV_TREE) -> None:
        """Copy ``parts`` of a checkout (relative paths) to ``dest`` inside, readable by all.

        A copy rather than the checkout itself: the units run as user shmd,
        which may not traverse to the checkout (a clone in a 0700 home), and
        a checkout under /tmp or /run is hidden by the namespace's own.
        """
        buf = io.BytesIO()

        def readable(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            if "__pycache__" in Path(info.name).parts:
                return None
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
            return info

        with tarfile.open(fileobj=buf, mode="w") as tar:
            for part in parts:
                tar.add(repo / part, arcname=part, filter=readable)
            if "shmd" in parts:
                core = debian_core(repo)
                tar.add(core, arcname=f"shmd/_sys/{core.name}", filter=readable)
        self.run(
            "sh",
            "-c",
            'install -d -m 0755 "$1" && tar -x -C "$1" --no-same-owner',
            "copy_tree",
            dest,
            input=buf.getvalue(),
        )

    def install_dev_tree(self, repo: Path, extra: Iterable[str] = ()) -> None:
        """Install units, sysusers, tmpfiles and config from a checkout, with drop-ins
        that run the daemons from a copy of its ``shmd/`` (and of ``extra`` paths)
        in :data:`DEV_TREE`, under Debian's python3 and libraries.

        Not the checkout's .venv: its interpreter may live where the shmd user
        cannot reach it (a pyenv build under /root, say), and Debian's
        python3-yaml/structlog/systemd are what the package runs on anyway.
        """
        self.copy_tree(repo, ("shmd", *extra))
        for unit_file in sorted((repo / "systemd").iterdir()):
            if unit_file.suffix in (".service", ".socket"):
                self.write_file(f"/etc/systemd/system/{unit_file.name}", unit_file.read_text())
        packaging = repo / "packaging"
        self.write_file(
            "/etc/sysusers.d/shmd.conf", (packaging / "sysusers.d" / "shmd.conf").read_text()
        )
        tmpfiles = packaging / "tmpfiles.d" / "shmd.conf"
        if tmpfiles.exists():
            self.write_file("/etc/tmpfiles.d/shmd.conf", tmpfiles.read_text())
        config = repo / "config" / "shmd.yaml"
        if config.exists():
            self.write_file("/etc/shmd/shmd.yaml", config.read_text())
        common = f'Environment="PYTHONPATH={DEV_TREE}" PYTHONDONTWRITEBYTECODE=1\n'
        for unit, module, program, args in (
            ("shm-writer.service", "shmd.daemons.writer", "shm-writer", ""),
            ("shm-reader@.service", "shmd.daemons.reader", "shm-reader", " --instance %i"),
            ("shm-bridge@.service", "shmd.daemons.reader", "shm-reader", " --instance %i"),
        ):
            code = (
                f"import sys; from {module} import main; "
                f"sys.argv[0] = '{program}'; sys.exit(main())"
            )
            self.write_file(
                f"/etc/systemd/system/{unit}.d/dev-tree.conf",
                f'[Service]\n{common}ExecStart=\nExecStart=/usr/bin/python3 -c "{code}"{args}\n',
            )
        self.run("systemd-sysusers")
        if tmpfiles.exists():
            self.run("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/shmd.conf")
        self.systemctl("daemon-reload")
