"""Fixtures of the system tests: a real systemd booted in private namespaces.

Each test module gets one booted systemd (module scope) and every test in it
shares that boot; the namespace is powered off, or killed, even when a test
fails.  Tests are skipped with the reason when this machine cannot run them
(not root, no unshare/overlayfs, no systemd).
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.nsystemd import NamespacedSystemd, preflight

REPO = Path(__file__).resolve().parents[2]

# The Debian packages the container needs from the host to install shmd's
# .deb offline (the overlay's lower layer is the host's root).
RUNTIME_DEBS = ("python3-yaml", "python3-structlog", "python3-systemd")


@functools.cache
def cached_preflight() -> str | None:
    """preflight(), probed once per session."""
    return preflight()


def missing_debs(names: tuple[str, ...]) -> list[str]:
    """Return which of these Debian packages are not installed on the host."""
    missing = []
    for name in names:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if "install ok installed" not in done.stdout:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def systemd_ns() -> Iterator[NamespacedSystemd]:
    """A booted systemd, shared by one test module and powered off after it."""
    reason = cached_preflight()
    if reason is not None:
        pytest.skip(reason)
    ns = NamespacedSystemd()
    ns.boot()
    try:
        yield ns
    finally:
        ns.poweroff()


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shmd's .deb built from this checkout by packaging/build-deb."""
    reason = cached_preflight()
    if reason is not None:
        pytest.skip(reason)
    check = subprocess.run(
        ["dpkg-checkbuilddeps", str(REPO / "packaging" / "debian" / "control")],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        pytest.skip(
            f"build dependencies missing (packaging/dev setup installs them): "
            f"{check.stderr.strip()}"
        )
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run(
        [str(REPO / "packaging" / "build-deb"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"packaging/build-deb failed:\n{done.stderr[-6000:]}"
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.parent == out and deb.name.startswith("shmd_") and deb.suffix == ".deb"
    return deb


@pytest.fixture(scope="module")
def installed(systemd_ns: NamespacedSystemd, built_deb: Path) -> NamespacedSystemd:
    """The module's systemd with shmd's .deb installed by apt-get."""
    missing = missing_debs(RUNTIME_DEBS)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed on the host (packaging/dev setup)")
    systemd_ns.install_deb(built_deb)
    return systemd_ns
