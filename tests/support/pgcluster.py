"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb, start, restart, stop.

Uses the machine's PostgreSQL binaries (PGNOTIFY_TEST_PGBIN, pg_config, /usr/lib/postgresql/*,
or pgserver's bundled ones). PostgreSQL refuses to run as root, so as root the cluster runs as an
unprivileged system user created on first use.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RUN_AS = "pgnotify-test"


def find_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres."""
    explicit = os.environ.get("PGNOTIFY_TEST_PGBIN")
    candidates: list[Path] = [Path(explicit)] if explicit else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    candidates.extend(Path(p) for p in versions)
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    try:
        import pgserver  # the embedded extra's binaries, as a last resort

        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (bundled / "initdb").exists():
            return bundled
    except ImportError:
        pass
    raise RuntimeError(
        "no PostgreSQL server binaries found: install postgresql (Debian), pip install pgserver, "
        "set PGNOTIFY_TEST_PGBIN, or point PGNOTIFY_TEST_DSN at a running server"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(RUN_AS)


def _traversable(path: Path) -> None:
    """Let the unprivileged user reach `path` (directories need o+x)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)


@dataclass
class TempCluster:
    """One running cluster listening on 127.0.0.1:port with trust authentication."""

    bindir: Path = field(default_factory=find_bindir)
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pgnotify-pg-")))
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if os.geteuid() == 0:
            kwargs["user"] = RUN_AS
            kwargs["group"] = _ensure_user().pw_gid
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            list(args), capture_output=True, text=True, check=check, timeout=timeout, **kwargs
        )

    def _options(self) -> str:
        base = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "log_min_messages": "warning",
            "log_lock_waits": "on",
            "deadlock_timeout": "1s",
        }
        base.update(self.settings)
        return " ".join(f"-c {key}={value}" for key, value in base.items()) + f" -p {self.port}"

    def start(self) -> TempCluster:
        """initdb (once) and start; returns self."""
        if os.geteuid() == 0:
            user = _ensure_user()
            _traversable(self.bindir)
            _traversable(self.root)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        if not self.datadir.exists():
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            )
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.logfile), "-o", self._options())
        return self

    def pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run pg_ctl against this cluster."""
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args, check=check)

    def restart(self) -> None:
        """Fast restart: every connection is cut, as in a failover or a deploy."""
        self.pg_ctl(
            "restart",
            "-w",
            "-t",
            "60",
            "-m",
            "fast",
            "-l",
            str(self.logfile),
            "-o",
            self._options(),
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop (ignored if not running)."""
        self.pg_ctl("stop", "-w", "-t", "60", "-m", mode, check=False)

    def destroy(self) -> None:
        """Stop and delete the files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self) -> str:
        """The server log (for assertions such as 'no deadlock detected')."""
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""
