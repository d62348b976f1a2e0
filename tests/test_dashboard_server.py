"""cluster/mlflow_server.py without starting a server: the command, the auth files, the refusals."""

from __future__ import annotations

import configparser
import importlib.util
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def server():
    spec = importlib.util.spec_from_file_location("wsol_mlflow_server", ROOT / "cluster" / "mlflow_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _prepare(server, tmp_path, argv, environ=None, password_file=None):
    settings, args = server.parse_args(["--root", str(tmp_path / "root"), *argv])
    return settings, server.prepare(settings, password_file or args.admin_password_file, dict(environ or {}))


def test_default_is_loopback_sqlite_and_local_artifacts(server, tmp_path):
    _, (command, env, banner) = _prepare(server, tmp_path, [])
    root = (tmp_path / "root").resolve()
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "5000"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{root / 'mlflow.db'}"
    assert command[command.index("--artifacts-destination") + 1] == str(root / "artifacts")
    assert "--serve-artifacts" in command and "--app-name" not in command
    assert (root / "artifacts").is_dir()
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in banner


def test_extra_options_pass_through(server, tmp_path):
    _, (command, _, _) = _prepare(
        server, tmp_path, ["--port", "6001", "--workers", "2", "--", "--static-prefix", "/mlflow"]
    )
    assert command[-2:] == ["--static-prefix", "/mlflow"]
    assert command[command.index("--workers") + 1] == "2"


def test_auth_mode_files_and_environment(server, tmp_path):
    environ = {
        "MLFLOW_ADMIN_PASSWORD": GOOD,
        "MLFLOW_TRACKING_URI": "http://elsewhere",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "stale-value-123",
    }
    settings, (command, env, banner) = _prepare(
        server, tmp_path, ["--auth", "--default-permission", "NO_PERMISSIONS"], environ
    )
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == GOOD  # the validated password, not an inherited one
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert "MLFLOW_ADMIN_PASSWORD" not in env and "MLFLOW_TRACKING_URI" not in env
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert ini == settings.auth_config_path and stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert GOOD not in ini.read_text()
    parsed = configparser.ConfigParser()
    parsed.read(ini)
    assert parsed["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert parsed["mlflow"]["database_uri"] == f"sqlite:///{settings.root / 'basic_auth.db'}"
    assert "admin_password" not in parsed["mlflow"]
    key_file = settings.secret_key_path
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The key is stable across restarts.
    _, (_, env_again, _) = _prepare(server, tmp_path, ["--auth"], environ)
    assert env_again["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert "MLFLOW_TRACKING_USERNAME=admin" in banner and GOOD not in banner


@pytest.mark.parametrize(
    ("password", "message"),
    [
        (None, "there is no default password"),
        ("", "there is no default password"),
        ("password1234", "well-known default"),
        ("PASSWORD1234", "well-known default"),
        ("changeme", "well-known default"),
        ("short-pw", "at least 12"),
        (" leading-space-password", "whitespace"),
        ("adminadminadmin", "easy to guess .*Repeats"),  # long enough, and a guess away
        ("Password2024!", "easy to guess"),
        ("qwertyuiop123", "easy to guess"),
        ("admin-admin-admin", "easy to guess"),
        ("iloveyou1234", "easy to guess"),
    ],
)
def test_auth_refuses_missing_default_or_weak_passwords(server, tmp_path, password, message):
    environ = {} if password is None else {"MLFLOW_ADMIN_PASSWORD": password}
    with pytest.raises(server.ServerError, match=message):
        _prepare(server, tmp_path, ["--auth"], environ)
    assert not (tmp_path / "root" / "basic_auth.ini").exists()


def test_password_equal_to_username_is_refused(server, tmp_path):
    with pytest.raises(server.ServerError, match="username"):
        _prepare(
            server,
            tmp_path,
            ["--auth", "--admin-username", "researcher-admin"],
            {"MLFLOW_ADMIN_PASSWORD": "researcher-admin"},
        )


def test_password_file_wins_over_the_environment(server, tmp_path):
    secret = tmp_path / "admin-password"
    secret.write_text("from-the-file-password\nignored second line\n")
    secret.chmod(0o600)
    _, (_, env, banner) = _prepare(
        server, tmp_path, ["--auth", "--admin-password-file", str(secret)], {"MLFLOW_ADMIN_PASSWORD": GOOD}
    )
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "from-the-file-password"
    assert str(secret) in banner
    with pytest.raises(server.ServerError, match="admin-password-file"):
        _prepare(server, tmp_path, ["--auth", "--admin-password-file", str(tmp_path / "missing")], {})


def test_non_loopback_host_needs_auth_or_insecure(server, tmp_path):
    with pytest.raises(server.ServerError, match="--auth"):
        _prepare(server, tmp_path, ["--host", "0.0.0.0"])
    _, (command, _, banner) = _prepare(
        server, tmp_path, ["--host", "0.0.0.0", "--insecure", "--allowed-hosts", "mlflow.lab:5000"]
    )
    assert command[command.index("--allowed-hosts") + 1] == "mlflow.lab:5000"
    assert "reachable from other machines" in banner
    _, (command, _, _) = _prepare(server, tmp_path, ["--host", "0.0.0.0", "--auth"], {"MLFLOW_ADMIN_PASSWORD": GOOD})
    assert "--app-name" in command
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("10.0.0.5")


def _auth_db_with_admin(path: Path, password: str) -> None:
    from werkzeug.security import generate_password_hash

    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT UNIQUE, password_hash TEXT, is_admin BOOLEAN)"
        )
        db.execute(
            "INSERT INTO users (username, password_hash, is_admin) VALUES ('admin', ?, 1)",
            (generate_password_hash(password),),
        )
    path.chmod(0o600)  # as the server creates it


def test_existing_admin_must_have_the_configured_password(server, tmp_path):
    _auth_db_with_admin(tmp_path / "root" / "basic_auth.db", "the-password-set-before")
    with pytest.raises(server.ServerError, match="already exists"):
        _prepare(server, tmp_path, ["--auth"], {"MLFLOW_ADMIN_PASSWORD": GOOD})
    _, (_, _, banner) = _prepare(server, tmp_path, ["--auth"], {"MLFLOW_ADMIN_PASSWORD": "the-password-set-before"})
    assert "uses existing admin user" in banner


def test_legacy_default_in_an_old_auth_db_gets_rotated(server, tmp_path):
    _auth_db_with_admin(tmp_path / "root" / "basic_auth.db", "password1234")
    _, (_, env, banner) = _prepare(server, tmp_path, ["--auth"], {"MLFLOW_ADMIN_PASSWORD": GOOD})
    assert "replaces the legacy default password" in banner and env["MLFLOW_AUTH_ADMIN_PASSWORD"] == GOOD


def test_main_dry_run_and_refusal_exit_codes(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", GOOD)
    assert server.main(["--root", str(tmp_path / "a"), "--auth", "--port", "5055", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:5055" in out and "--app-name basic-auth" in out and GOOD not in out
    monkeypatch.setenv("MLFLOW_ADMIN_PASSWORD", "password1234")
    assert server.main(["--root", str(tmp_path / "b"), "--auth", "--dry-run"]) == 2
    assert "well-known default" in capsys.readouterr().err


@pytest.mark.parametrize("password", [None, "password1234"])
def test_the_script_refuses_to_start_auth_mode_without_a_real_password(tmp_path, password):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_ADMIN_", "MLFLOW_AUTH_"))}
    if password is not None:
        env["MLFLOW_ADMIN_PASSWORD"] = password
    done = subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "mlflow_server.py"), "--root", str(tmp_path), "--auth", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error:" in done.stderr and "mlflow server" not in done.stdout
    assert not (tmp_path / "basic_auth.db").exists()


def test_the_auth_database_is_private(server, tmp_path):
    settings, _ = _prepare(server, tmp_path, ["--auth"], {"MLFLOW_ADMIN_PASSWORD": GOOD})
    auth_db = settings.root / "basic_auth.db"
    assert auth_db.is_file() and stat.S_IMODE(auth_db.stat().st_mode) == 0o600  # created before MLflow opens it
    auth_db.chmod(0o644)
    with pytest.raises(
        server.ServerError,
        match=r"basic_auth.db holds the users' password hashes and is readable by others "
        r"\(mode 0644\); restrict it with: chmod 600 ",
    ):
        _prepare(server, tmp_path, ["--auth"], {"MLFLOW_ADMIN_PASSWORD": GOOD})
    assert stat.S_IMODE(auth_db.stat().st_mode) == 0o644  # refused, not silently changed
    auth_db.chmod(0o600)
    _prepare(server, tmp_path, ["--auth"], {"MLFLOW_ADMIN_PASSWORD": GOOD})


@pytest.mark.integration
def test_the_dashboard_command_the_job_prints_serves(tmp_path):
    """The ``mlflow ui`` line printed at the end of every training run, run as printed."""
    import shlex
    import signal
    import socket
    import time

    import requests
    from mlflow.tracking import MlflowClient

    from wsol_core.train.driver import TrainingOutcome

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("synthetic"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = TrainingOutcome("job", str(tmp_path), run.info.run_id, uri, "synthetic", False, {}, None)
    command = outcome.dashboard_command(port)
    assert command.startswith("uv run mlflow ui ") and "--workers 1" in command
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    process = subprocess.Popen(
        shlex.split(command),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        served = False
        while time.monotonic() < deadline and process.poll() is None:
            try:
                response = requests.get(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get", params={"run_id": run.info.run_id}, timeout=5
                )
                if response.status_code == 200:
                    served = response.json()["run"]["info"]["run_id"] == run.info.run_id
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        assert served, (
            process.stdout.read().decode(errors="replace")[-3000:] if process.poll() is not None else "not serving"
        )
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
