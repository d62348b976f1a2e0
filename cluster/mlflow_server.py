"""Run the MLflow tracking server for WSOL runs: SQLite backend, local artifacts, loopback only
unless told otherwise, and an optional basic-auth mode (MLflow's ``basic-auth`` app).

    uv run python cluster/mlflow_server.py                        # http://127.0.0.1:5000, no auth
    MLFLOW_ADMIN_PASSWORD='a long secret' \\
        uv run python cluster/mlflow_server.py --auth             # users, passwords, permissions
    uv run python cluster/mlflow_server.py --auth --admin-password-file ~/.mlflow-admin \\
        --host 0.0.0.0 --allowed-hosts mlflow.lab.example:5000    # reachable from other nodes

Everything lives under --root (default ``$WSOL_MLFLOW_ROOT``, else ``./mlflow-server``):
``mlflow.db`` (runs), ``artifacts/`` (served to clients through the server), and in auth mode
``basic_auth.db`` (users and password hashes), ``basic_auth.ini`` and ``flask_secret_key`` (mode 0600;
the server refuses to start with a ``basic_auth.db`` that others can read).

Auth mode: the admin password comes from ``$MLFLOW_ADMIN_PASSWORD`` or ``--admin-password-file``
and never from a default: the server refuses to start without one, with MLflow's old shipped
default (``password1234``) or another well-known one, with fewer than 12 characters (MLflow's
rule), with one that is easy to guess however long (zxcvbn's score under 3: repeats such as
``adminadminadmin``, dictionary words, keyboard walks, the user name), or when the auth database already holds the admin user with a different password
(MLflow uses the configured password only to create the admin; change it afterwards with the
update-password API and restart with the new one). The password is handed to MLflow through
``MLFLOW_AUTH_ADMIN_PASSWORD`` in the server's environment and never written to disk.

Clients set ``MLFLOW_TRACKING_URI`` and, in auth mode, ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD``; the command prints them. See cluster/DASHBOARD.md.
"""

from __future__ import annotations

import argparse
import configparser
import ipaddress
import os
import secrets
import socket
import sqlite3
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

ADMIN_PASSWORD_ENV = "MLFLOW_ADMIN_PASSWORD"
ROOT_ENV = "WSOL_MLFLOW_ROOT"
MIN_PASSWORD_LENGTH = 12  # mlflow.utils.validation._validate_password
# zxcvbn's score 3: "safely unguessable: moderate protection from offline slow-hash scenario"
# (under 10^10 guesses scores 2 or less); the hashes in basic_auth.db are such a scenario.
MIN_PASSWORD_SCORE = 3
# Passwords that must never guard a server: MLflow's old shipped default and the usual suspects.
WELL_KNOWN_PASSWORDS = frozenset(
    {
        "password1234",
        "password",
        "password123",
        "password12345",
        "password123456",
        "passwordpassword",
        "admin",
        "adminadmin",
        "administrator",
        "changeme",
        "changemechangeme",
        "mlflow",
        "mlflowmlflow",
        "secret",
        "123456789012",
        "qwertyuiopas",
    }
)
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


class ServerError(RuntimeError):
    """A configuration the server must not start with; the message says what to change."""


@dataclass
class ServerSettings:
    root: Path
    host: str = "127.0.0.1"
    port: int = 5000
    backend_store_uri: str = ""
    artifacts_destination: str = ""
    workers: int | None = None
    auth: bool = False
    admin_username: str = "admin"
    default_permission: str = "READ"
    auth_db_uri: str = ""
    allowed_hosts: str = ""
    insecure: bool = False
    enable_jobs: bool = False
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser().resolve()
        self.backend_store_uri = self.backend_store_uri or f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts_destination = self.artifacts_destination or str(self.root / "artifacts")
        self.auth_db_uri = self.auth_db_uri or f"sqlite:///{self.root / 'basic_auth.db'}"

    @property
    def auth_config_path(self) -> Path:
        return self.root / "basic_auth.ini"

    @property
    def secret_key_path(self) -> Path:
        return self.root / "flask_secret_key"

    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_password(password: str | None, username: str, source: str) -> str:
    """``password`` if it may guard a server, else :class:`ServerError` naming ``source``."""
    if not password:
        raise ServerError(
            f"auth mode needs the admin password: set ${ADMIN_PASSWORD_ENV} or pass --admin-password-file "
            "(there is no default password)"
        )
    if password.strip() != password:
        raise ServerError(f"the admin password from {source} starts or ends with whitespace; remove it")
    if password.lower() in WELL_KNOWN_PASSWORDS or password.lower() == username.lower():
        raise ServerError(f"the admin password from {source} is a well-known default (or the username); choose another")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ServerError(
            f"the admin password from {source} has {len(password)} characters; MLflow requires at least {MIN_PASSWORD_LENGTH}"
        )
    # Length is not strength: "adminadminadmin" is 15 characters and a guess away. zxcvbn (Dropbox's
    # estimator) finds repeats, sequences, dictionary words, l33t and the username in it.
    from zxcvbn import zxcvbn

    estimate = zxcvbn(password, user_inputs=[username, "mlflow", "wsol", "admin"])
    if estimate["score"] < MIN_PASSWORD_SCORE:
        why = estimate["feedback"]["warning"] or "built from words, names or patterns that are guessed first"
        hint = (
            " ".join(estimate["feedback"]["suggestions"])
            or "Use a passphrase of several unrelated words or a generated secret."
        )
        raise ServerError(
            f"the admin password from {source} is easy to guess (about 10^{estimate['guesses_log10']:.0f} guesses: "
            f"{why.rstrip('.')}). {hint}"
        )
    return password


def read_admin_password(password_file: str | None, environ: dict[str, str], username: str) -> tuple[str, str]:
    """(password, where it came from): ``--admin-password-file`` first, else ``$MLFLOW_ADMIN_PASSWORD``."""
    if password_file:
        path = Path(password_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ServerError(f"--admin-password-file {path}: {err.strerror or err}") from err
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(
                f"[mlflow_server] warning: {path} is readable by others (mode {stat.filemode(mode)}); chmod 600 it",
                file=sys.stderr,
            )
        lines = text.splitlines()
        source = str(path)
        return check_password(lines[0] if lines else "", username, source), source
    return check_password(environ.get(ADMIN_PASSWORD_ENV), username, f"${ADMIN_PASSWORD_ENV}"), f"${ADMIN_PASSWORD_ENV}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def check_existing_admin(settings: ServerSettings, password: str) -> str:
    """When the auth DB already has the admin user, the configured password must be its password
    (MLflow ignores it then). Returns "new", "matches" or "rotates-legacy-default"."""
    path = _sqlite_path(settings.auth_db_uri)
    if path is None or not path.is_file():
        return "new"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            row = db.execute(
                "SELECT password_hash FROM users WHERE username = ?", (settings.admin_username,)
            ).fetchone()
    except sqlite3.Error:
        return "new"  # no users table yet: MLflow creates it
    if row is None:
        return "new"
    from werkzeug.security import check_password_hash

    if check_password_hash(row[0], password):
        return "matches"
    if check_password_hash(row[0], "password1234"):
        return "rotates-legacy-default"  # MLflow replaces the legacy default with the configured one
    raise ServerError(
        f"the admin user {settings.admin_username!r} already exists in {path} with a different password; MLflow uses "
        "the configured password only when it creates the admin. Give the current admin password, or change it "
        "first (PATCH /api/2.0/mlflow/users/update-password) and restart with the new one"
    )


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def private_auth_db(settings: ServerSettings) -> Path | None:
    """The auth database holds every user's password hash: create it readable by the owner only
    (SQLite keeps the mode, and gives its journal the same), and refuse one that others can read."""
    path = _sqlite_path(settings.auth_db_uri)
    if path is None:
        return None  # a database server: its own access control applies
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ServerError(
                f"{path} holds the users' password hashes and is readable by others (mode {mode:04o}); "
                f"restrict it with: chmod 600 {path}"
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # an empty file is an empty SQLite database
    os.chmod(path, 0o600)  # whatever the umask
    return path


def write_auth_config(settings: ServerSettings) -> Path:
    """MLflow's auth ini (``MLFLOW_AUTH_CONFIG_PATH``) without any password in it."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": settings.default_permission,
        "database_uri": settings.auth_db_uri,
        "admin_username": settings.admin_username,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access": "false",
    }
    buffer = [
        "# Written by cluster/mlflow_server.py. The admin password is not stored here: it is passed\n",
        f"# to the server as MLFLOW_AUTH_ADMIN_PASSWORD, read from ${ADMIN_PASSWORD_ENV} or --admin-password-file.\n",
    ]
    from io import StringIO

    out = StringIO()
    config.write(out)
    write_private(settings.auth_config_path, "".join(buffer) + out.getvalue())
    return settings.auth_config_path


def flask_secret_key(settings: ServerSettings, environ: dict[str, str]) -> str:
    """``$MLFLOW_FLASK_SERVER_SECRET_KEY``, else a random key kept in ``<root>/flask_secret_key``
    (stable across restarts, so CSRF tokens of the sign-up page stay valid)."""
    if environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    path = settings.secret_key_path
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    key = secrets.token_urlsafe(32)
    write_private(path, key + "\n")
    return key


def default_workers() -> int:
    """Server worker processes: MLflow's 4 where there are 8 cores or more, fewer below (with 4 on
    a 2-core machine the workers kept dying and nothing was served)."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def build_command(settings: ServerSettings) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        settings.backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        settings.artifacts_destination,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
    ]
    command += ["--workers", str(settings.workers or default_workers())]
    if settings.allowed_hosts:
        command += ["--allowed-hosts", settings.allowed_hosts]
    if settings.auth:
        command += ["--app-name", "basic-auth"]
    return command + list(settings.extra)


def build_env(settings: ServerSettings, environ: dict[str, str], password: str | None) -> dict[str, str]:
    env = dict(environ)
    env.pop(ADMIN_PASSWORD_ENV, None)  # the server process gets MLflow's variable only
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    # MLflow's GenAI job runner (7 huey worker processes, ~1 GB) serves no WSOL feature.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if settings.enable_jobs else "false"
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)  # client settings of the caller, not the server's
    if settings.auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(settings.auth_config_path)
        env["MLFLOW_AUTH_ADMIN_USERNAME"] = settings.admin_username
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password or ""
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = flask_secret_key(settings, environ)
    else:
        for key in ("MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
            env.pop(key, None)
    return env


def client_instructions(settings: ServerSettings) -> str:
    lines = [
        f"[mlflow_server] MLflow UI and API: {settings.url()}",
        "[mlflow_server] clients (training jobs, ablation reports) set:",
    ]
    lines.append(f"    export MLFLOW_TRACKING_URI={settings.url()}")
    if settings.auth:
        lines.append(f"    export MLFLOW_TRACKING_USERNAME={settings.admin_username}   # or a user the admin created")
        lines.append("    export MLFLOW_TRACKING_PASSWORD=...                          # that user's password")
        lines.append(
            f"[mlflow_server] new users get {settings.default_permission} on every experiment unless granted otherwise;"
        )
        lines.append(f"    create users at {settings.url()}/signup or POST /api/2.0/mlflow/users/create (as admin)")
    if not is_loopback(settings.host):
        lines.append(f"[mlflow_server] listening on {settings.host}: reachable from other machines")
    lines.append(f"[mlflow_server] store: {settings.backend_store_uri}; artifacts: {settings.artifacts_destination}")
    return "\n".join(lines)


def prepare(
    settings: ServerSettings, password_file: str | None, environ: dict[str, str]
) -> tuple[list[str], dict[str, str], str]:
    """Validate, write the auth files, and return (command, environment, banner)."""
    if not settings.auth and not is_loopback(settings.host) and not settings.insecure:
        raise ServerError(
            f"--host {settings.host} without --auth would let anyone who reaches this machine read and write every run; "
            "add --auth (recommended), or --insecure to do it anyway"
        )
    if settings.default_permission not in PERMISSIONS:
        raise ServerError(f"--default-permission must be one of {', '.join(PERMISSIONS)}")
    settings.root.mkdir(parents=True, exist_ok=True)
    Path(settings.artifacts_destination).mkdir(parents=True, exist_ok=True)
    password = None
    banner = client_instructions(settings)
    if settings.auth:
        try:
            import flask_wtf  # noqa: F401  (MLflow's auth app imports it)
        except ImportError as err:
            raise ServerError(
                "auth mode needs the Flask-WTF package: install mlflow[auth] (add it to pyproject.toml)"
            ) from err
        password, source = read_admin_password(password_file, environ, settings.admin_username)
        private_auth_db(settings)  # before reading it: a database others can read is refused first
        state = check_existing_admin(settings, password)
        write_auth_config(settings)
        what = {
            "new": "creates",
            "matches": "uses existing",
            "rotates-legacy-default": "replaces the legacy default password of",
        }[state]
        banner += f"\n[mlflow_server] auth: basic-auth app; {what} admin user {settings.admin_username!r} with the password from {source}"
    return build_command(settings), build_env(settings, environ, password), banner


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root",
        default=os.environ.get(ROOT_ENV, "mlflow-server"),
        metavar="DIR",
        help=f"state directory (default: ${ROOT_ENV}, else ./mlflow-server)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend-store-uri", default="", metavar="URI", help="default: sqlite:///<root>/mlflow.db")
    parser.add_argument("--artifacts-destination", default="", metavar="DIR", help="default: <root>/artifacts")
    parser.add_argument(
        "--workers", type=int, default=None, help="server worker processes (default: half the cores, 1 to 4)"
    )
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="Host headers to accept when serving beyond loopback (MLflow's DNS-rebinding guard)",
    )
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --auth")
    parser.add_argument(
        "--enable-jobs", action="store_true", help="start MLflow's GenAI job runner (off: WSOL does not use it)"
    )
    auth = parser.add_argument_group("authentication (MLflow basic-auth app)")
    auth.add_argument("--auth", action="store_true", help="require a username and password for the UI and the API")
    auth.add_argument("--admin-username", default="admin")
    auth.add_argument(
        "--admin-password-file",
        default=None,
        metavar="FILE",
        help=f"first line is the admin password (default: ${ADMIN_PASSWORD_ENV})",
    )
    auth.add_argument(
        "--default-permission",
        default="READ",
        choices=PERMISSIONS,
        help="what users may do on experiments they were not granted (default: READ)",
    )
    auth.add_argument(
        "--auth-db-uri",
        default="",
        metavar="URI",
        help="users and permissions (default: sqlite:///<root>/basic_auth.db)",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and print the command, start nothing")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more `mlflow server` options")
    args = parser.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    settings = ServerSettings(
        root=Path(args.root),
        host=args.host,
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        workers=args.workers,
        auth=args.auth,
        admin_username=args.admin_username,
        default_permission=args.default_permission,
        auth_db_uri=args.auth_db_uri,
        allowed_hosts=args.allowed_hosts,
        insecure=args.insecure,
        enable_jobs=args.enable_jobs,
        extra=extra,
    )
    return settings, args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    try:
        command, env, banner = prepare(settings, args.admin_password_file, dict(os.environ))
    except ServerError as err:
        print(f"[mlflow_server] error: {err}", file=sys.stderr)
        return 2
    print(banner, flush=True)
    print("[mlflow_server] " + " ".join(command), flush=True)
    if args.dry_run:
        return 0
    os.execvpe(command[0], command, env)  # the server replaces this process: signals reach it directly
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
