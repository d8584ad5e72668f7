"""The one error of the configuration layer, and the exit status the daemons give it.

Kept tiny so every module of :mod:`shmd.config` can import it without loops.
"""

from __future__ import annotations

from shmd.errors import ShmdError

# sysexits.h EX_CONFIG: systemd shows it as "status=78/CONFIG".
EXIT_CONFIG = 78


class ConfigError(ShmdError):
    """A configuration mistake, located as precisely as the YAML allows.

    ``path`` is the file (None for built-in defaults), ``line`` the 1-based
    line of the offending key (None when unknown), ``key`` its dotted path
    (None for file-level problems) and ``message`` the bare reason.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path or "<configuration>"
        if self.line is not None:
            where += f":{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"
