"""A real PostgreSQL server for tests: initdb into a fresh folder, ``pg_ctl start`` on a free loopback port, password
authentication (scram-sha-256), stopped and removed on exit. Debian's ``postgresql`` package provides the binaries
(``.ci/run`` installs it); as root the server runs as the ``postgres`` user, since PostgreSQL refuses root."""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg2


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    username: str
    password: str
    db_name: str

    def env(self) -> dict[str, str]:
        """The variables ``orchestration/presets/dagster_cluster.yaml`` reads the connection from."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": self.username,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db_name}

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with contextlib.closing(psycopg2.connect(host=self.host, port=self.port, user=self.username,
                                                 password=self.password, dbname=self.db_name)) as connection:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()


def bin_dir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's newest ``/usr/lib/postgresql/*/bin``."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise FileNotFoundError("no PostgreSQL server binaries: initdb is not on PATH nor in /usr/lib/postgresql/*/bin "
                                "(apt-get install postgresql)")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_postgres(db_name: str = "dagster"):
    """Start a server in a new folder, create ``db_name`` and yield its :class:`Postgres`; stop and remove it after."""
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="weft-postgres-"))
    data, log, password_file = folder / "data", folder / "server.log", folder / "password"
    server = Postgres(host="127.0.0.1", port=_free_port(), username="weft", password="weft-test", db_name=db_name)
    password_file.write_text(server.password)
    if as_user:
        shutil.chown(folder, "postgres")
        shutil.chown(password_file, "postgres")
    pg_ctl = [*as_user, str(bin_dir() / "pg_ctl"), "-D", str(data)]
    subprocess.run([*as_user, str(bin_dir() / "initdb"), "-D", str(data), "-U", server.username,
                    f"--pwfile={password_file}", "--auth=scram-sha-256", "--encoding=UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {folder} -c fsync=off"
    started = subprocess.run([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "60", "start"], capture_output=True,
                             text=True)
    try:
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({started.stderr.strip()}); {log}: "
                               f"{log.read_text()[-2000:] if log.exists() else 'no log'}")
        with contextlib.closing(psycopg2.connect(host=server.host, port=server.port, user=server.username,
                                                 password=server.password, dbname="postgres")) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{db_name}"')
        yield server
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
