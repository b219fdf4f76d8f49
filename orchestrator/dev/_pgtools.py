"""OS-level helpers for the embedded Postgres: binaries, the server's OS user, initdb."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import anyio

from orchestrator.dev._proc import reap
from orchestrator.errors import ConfigError

__all__ = [
    "as_server_user",
    "check_reachable_by_server_user",
    "find_pg_bindir",
    "give_to_server_user",
    "initdb",
    "postgres_account",
    "server_env",
]

INSTALL_HINT = "install the server: apt-get install postgresql (Debian/Ubuntu)"
# libpq variables that would make the server's tools or our clients look elsewhere.
_SCRUBBED_ENV = ("PGDATA", "PGPORT", "PGHOST", "PGHOSTADDR", "PGDATABASE", "PGUSER", "PGOPTIONS")


def find_pg_bindir() -> Path:
    """Directory holding the server binaries (``initdb`` and ``postgres``).

    ``pg_config --bindir`` first, else the newest ``/usr/lib/postgresql/*/bin`` (Debian).
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "postgres")):
            return bindir
    raise ConfigError(
        "no PostgreSQL server binaries found (tried `pg_config --bindir` and "
        f"/usr/lib/postgresql/*/bin): {INSTALL_HINT}"
    )


async def initdb(
    bindir: Path, data_dir: Path, *, limit: float
) -> subprocess.CompletedProcess[bytes] | None:
    """Run initdb (as the ``postgres`` user when we are root); ``None`` on timeout.

    Output (stderr merged) goes to a temporary file, not a pipe. initdb runs in its own
    process group: on timeout or cancellation the whole group is killed, including the
    bootstrap backend initdb runs.
    """
    command = [str(bindir / "initdb"), "-D", str(data_dir), "--no-sync"]
    command += ["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"]
    with tempfile.TemporaryFile() as out:
        process = await anyio.open_process(
            as_server_user(command),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env(),
            cwd="/",
            start_new_session=True,
        )
        try:
            with anyio.move_on_after(limit):
                await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    with contextlib.suppress(OSError):
                        os.killpg(process.pid, signal.SIGKILL)
                    # No second signal through the Popen: its poll() would reap the child
                    # behind asyncio's child watcher.
                    with anyio.move_on_after(5):
                        await process.wait()
                await reap(process, grace=1, kill_first=True)
        if process.returncode is None or process.returncode < 0:
            return None
        out.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read())


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["LC_ALL"] = "C"
    return env


def give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        account = postgres_account()
        os.chown(path, account.pw_uid, account.pw_gid)


def postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError(
            "running as root, the embedded Postgres needs a 'postgres' OS user to run initdb "
            f"and the server (both refuse root): {INSTALL_HINT} creates it, or run as a "
            "normal user"
        ) from None


def check_reachable_by_server_user(path: Path) -> None:
    """As root, fail early (with the fix) when ``postgres`` cannot reach ``path``."""
    if os.geteuid() != 0:
        return
    account = postgres_account()
    groups = {account.pw_gid, *(g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem)}
    for parent in reversed(path.parents):
        try:
            st = parent.stat()
        except FileNotFoundError:
            break  # created by us below, with the default (traversable) mode
        if st.st_uid == account.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise ConfigError(
                f"EmbeddedPostgres data_dir {path}: running as root, the server runs as the "
                f"'postgres' OS user, which cannot enter {parent} (mode "
                f"{stat.filemode(st.st_mode)}): choose a directory elsewhere or "
                f"chmod o+x {parent}"
            )


def as_server_user(command: list[str]) -> list[str]:
    """``command``, run as the ``postgres`` account when we are root.

    ``setpriv`` drops privileges and then execs the command, so the server stays our direct
    child (its PID is the one we wait on and signal). It works on every event loop,
    including uvloop, whose subprocess API has no ``user``/``group`` arguments.
    """
    if os.geteuid() != 0:
        return command
    account = postgres_account()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise ConfigError("running as root needs `setpriv` (util-linux) to start Postgres")
    return [
        setpriv,
        f"--reuid={account.pw_uid}",
        f"--regid={account.pw_gid}",
        "--clear-groups",
        "--",
        *command,
    ]
