"""The MLflow dashboard end to end: real servers started by cluster/mlflow_server.py on free
loopback ports, a run logged through HTTP by the training job's logging code (RunLogger + viz +
the run summary), headless Chromium driven by selenium, and the basic-auth mode's refusals.

Browser tests skip (with the reason) only when /usr/bin/chromium or /usr/bin/chromedriver is
missing: ``bash cluster/install_browser.sh`` installs both. Screenshots are written under the
test's tmp_path and copied to /tmp/wsol-test-artifacts/; the paths are printed.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACT_DIR = Path("/tmp/wsol-test-artifacts")
STARTUP_TIMEOUT_S = 480  # a cold MLflow server on a busy 2-core machine takes a minute, CI's far more at times
PAGE_TIMEOUT_S = 90
EXPERIMENT = "dashboard-test"
# Opt-in check against a real training run (minutes on 2 cores, so not part of the default suite):
# WSOL_DASHBOARD_TRAIN=1 trains the tiny default for one epoch; WSOL_DASHBOARD_TRACKING_DB=path
# reuses the SQLite store of a finished training run instead.
TRAIN_ENV, DB_ENV = "WSOL_DASHBOARD_TRAIN", "WSOL_DASHBOARD_TRACKING_DB"

needs_browser = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"headless browser tests need {CHROMIUM} and {CHROMEDRIVER}: run `bash cluster/install_browser.sh`",
)


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``cluster/mlflow_server.py`` in its own process group, killed (the group) at teardown."""

    def __init__(self, root: Path, auth: bool, admin_password: str = "", extra_args: tuple[str, ...] = ()) -> None:
        self.root, self.auth, self.admin_password = root, auth, admin_password
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root.parent / f"{root.name}.log"
        command = [
            sys.executable,
            str(ROOT / "cluster" / "mlflow_server.py"),
            "--root",
            str(root),
            "--port",
            str(self.port),
            "--workers",
            "1",
            *extra_args,
        ]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "MLFLOW_ADMIN_"))
        }
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        if auth:
            command += ["--auth", "--default-permission", "NO_PERMISSIONS"]
            env["MLFLOW_ADMIN_PASSWORD"] = admin_password
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started = time.monotonic()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> Server:
        while time.monotonic() - self.started < STARTUP_TIMEOUT_S:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"mlflow server not ready after {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        try:  # uvicorn workers left behind by an abrupt parent exit share the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


@pytest.fixture(scope="module")
def servers(request, tmp_path_factory):
    """The open server and the basic-auth one that the selected tests use, started together so
    their start-ups overlap."""
    wanted = {
        name
        for item in request.session.items
        for name in getattr(item, "fixturenames", ())
        if name in ("open_server", "auth_server")
    }
    base = tmp_path_factory.mktemp("mlflow-servers")
    started = {}
    if "open_server" in wanted:
        started["open"] = Server(base / "open", auth=False)
    if "auth_server" in wanted:
        started["auth"] = Server(base / "auth", auth=True, admin_password=secrets.token_urlsafe(18))
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def open_server(servers) -> Server:
    return servers["open"].wait_ready()


@pytest.fixture(scope="module")
def auth_server(servers) -> Server:
    return servers["auth"].wait_ready()


# --------------------------------------------------------------------------------------------
# A run logged by the training job's logging code
# --------------------------------------------------------------------------------------------


def _scene(count: int = 4, size: int = 224, seed: int = 0):
    """Images with one bright object each, a CAM peaking inside it, GT and predicted boxes."""
    import torch

    from wsol_core.viz import IMAGENET_MEAN, IMAGENET_STD, denormalize

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, maps, gts, preds = [], [], [], []
    for _ in range(count):
        x0, y0 = rng.integers(20, 90, size=2)
        w, h = rng.integers(70, 120, size=2)
        x1, y1 = min(x0 + w, size - 1), min(y0 + h, size - 1)
        pixels = np.full((size, size, 3), 0.35) + rng.normal(0, 0.03, (size, size, 3))
        pixels[y0:y1, x0:x1] = rng.uniform(0.5, 0.9, 3)
        images.append(pixels)
        cx, cy = (x0 + x1) / 2 + rng.normal(0, 8), (y0 + y1) / 2 + rng.normal(0, 8)
        cam = np.exp(-(((xx - cx) / (0.35 * w)) ** 2 + ((yy - cy) / (0.35 * h)) ** 2))
        maps.append(cam)
        gts.append(np.array([[x0, y0, x1, y1]]))
        ys, xs = np.nonzero(cam > 0.3)
        preds.append(np.array([[xs.min(), ys.min(), xs.max(), ys.max()]]))
    tensor = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    normalized = (tensor - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return denormalize(normalized), np.stack(maps), gts, preds


def log_training_like_run(tracking_uri: str, run_key: str, epochs: int = 3) -> tuple[str, str, dict]:
    """What the training job logs, through the same code: params, per-epoch metrics, the CAM grid
    and threshold curves per val epoch, test metrics and the run summary. Returns (experiment id,
    run id, final metrics)."""
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from wsol_core.config import flatten, load_config
    from wsol_core.reporting import log_run_summary
    from wsol_core.tracking import RunLogger, start_or_resume_run
    from wsol_core.viz import cam_overlay_grid, threshold_curves

    cfg = load_config(overrides=[f"train.epochs={epochs}", "method.pnl.enabled=false"])
    cfg_flat = flatten(cfg)
    run_id, _ = start_or_resume_run(
        tracking_uri,
        EXPERIMENT,
        run_key,
        run_name=f"fmcg-tiny-synthetic-{run_key}",
        tags={"wsol.method": cfg.method.name, "wsol.backbone": cfg.model.backbone},
    )
    logger = RunLogger(tracking_uri, run_id)
    logger.log_params(cfg_flat)
    images, maps, gts, preds = _scene()
    thresholds = np.arange(0, 1, 0.01)
    for epoch in range(1, epochs + 1):
        curves = {
            d: 100
            * np.clip(1.2 - (thresholds - 0.2 * d / 30) ** 2 * (1 + d / 20), 0, 1)
            * (1 - d / 140)
            * (0.6 + 0.1 * epoch)
            for d in (30, 50, 70)
        }
        best = {d: float(thresholds[int(np.argmax(c))]) for d, c in curves.items()}
        box = {d: float(np.max(c)) for d, c in curves.items()}
        metrics = {
            "train/loss": 2.0 / epoch,
            "train/loss_cls": 1.5 / epoch,
            "train/lr": 0.01,
            "train/images_per_s": 120.0 + epoch,
            "train/data_wait": 0.05,
            "val/top1_acc": 40.0 + 5 * epoch,
            "val/top5_acc": 80.0 + epoch,
            **{f"val/boxacc_v2_iou{d}": box[d] for d in (30, 50, 70)},
            "val/maxboxacc_v2": sum(box.values()) / 3,
            "val/maxboxacc_v1": box[50] * 0.95,
            "val/gt_known_loc": box[50] * 0.9,
            "val/top1_loc": box[50] * 0.7,
            "val/top5_loc": box[50] * 0.9,
        }
        logger.log_metrics(metrics, step=epoch)
        overlay = cam_overlay_grid(images, maps, gts, preds, titles=[f"val {i}" for i in range(len(images))])
        logger.log_figure(overlay, f"val/cams/epoch_{epoch:03d}.png")
        plt.close(overlay)
        figure = threshold_curves(thresholds, curves, best)
        logger.log_figure(figure, f"val/box_accuracy_vs_threshold/epoch_{epoch:03d}.png")
        plt.close(figure)
    final = {k.replace("val/", "test/"): v for k, v in metrics.items() if k.startswith("val/")}
    logger.log_metrics(final, step=epochs)
    logger.log_dict(final, "test/metrics.json")
    log_run_summary(logger, cfg_flat, final, dataset="synthetic", synthetic=True)
    logger.finish()
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return experiment_id, run_id, {**metrics, **final}


@pytest.fixture(scope="module")
def open_run(open_server):
    return log_training_like_run(open_server.url, "open-run")


@pytest.fixture(scope="module")
def auth_run(auth_server, servers):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        patch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.admin_password)
        return log_training_like_run(auth_server.url, "auth-run")


# --------------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1600,1200",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


def keep_screenshot(driver, tmp_path: Path, name: str, capsys) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACT_DIR / name
    shutil.copyfile(path, kept)
    with capsys.disabled():
        print(f"\n[dashboard test] screenshot: {path} (copy: {kept})")
    return kept


def body_text(driver) -> str:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except WebDriverException:  # the page is being replaced
        return ""


def wait_for_text(driver, *texts: str) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, PAGE_TIMEOUT_S).until(
        lambda d: all(t in body_text(d) for t in texts), message=f"page never showed {texts}"
    )
    return body_text(driver)


def wait_for_image(driver, width: int, height: int) -> dict:
    """An <img> that finished loading with exactly the logged PNG's size."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = (
        "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => ({src: i.src.slice(0, 80), w: i.naturalWidth, h: i.naturalHeight}));"
    )

    def loaded(d):
        return next((img for img in d.execute_script(script) if (img["w"], img["h"]) == (width, height)), False)

    return WebDriverWait(driver, PAGE_TIMEOUT_S).until(loaded, message=f"no loaded {width}x{height} image")


def png_size(tracking_uri: str, run_id: str, path: str, tmp_path: Path) -> tuple[int, int]:
    from mlflow.tracking import MlflowClient
    from PIL import Image

    local = MlflowClient(tracking_uri).download_artifacts(run_id, path, str(tmp_path))
    with Image.open(local) as image:
        return image.size


def open_page(driver, url: str) -> None:
    """A fresh load: the MLflow UI ignores a hash-only change of the artifact path."""
    driver.get("about:blank")
    driver.get(url)


def box_pixels(path: str | Path) -> tuple[int, int]:
    """(red, lime) pixel counts of a CAM grid: the GT boxes (red) and predicted boxes (green)."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 200) & (g < 40) & (b < 40)).sum()), int(((g > 220) & (r < 40) & (b < 40)).sum())


def run_url(server: Server, experiment_id: str, run_id: str, suffix: str = "") -> str:
    return f"{server.url}/#/experiments/{experiment_id}/runs/{run_id}{suffix}"


# --------------------------------------------------------------------------------------------
# Tests: the run page
# --------------------------------------------------------------------------------------------


@needs_browser
def test_run_page_shows_metrics_summary_and_cam_grid(open_server, open_run, browser, tmp_path, capsys):
    experiment_id, run_id, _ = open_run
    browser.get(run_url(open_server, experiment_id, run_id))
    text = wait_for_text(browser, "val/maxboxacc_v2", "test/maxboxacc_v2", "train/loss", "method.srd.enabled")
    assert "fmcg-tiny-synthetic-open-run" in text
    assert "WSOL run summary" in text  # the description written by log_run_summary
    keep_screenshot(browser, tmp_path, "dashboard_run_overview.png", capsys)

    width, height = png_size(open_server.url, run_id, "val/cams/epoch_003.png", tmp_path)
    open_page(browser, run_url(open_server, experiment_id, run_id, "/artifacts/val/cams/epoch_003.png"))
    wait_for_text(browser, "val/cams/epoch_003.png")
    image = wait_for_image(browser, width, height)
    assert image["w"] == width
    keep_screenshot(browser, tmp_path, "dashboard_cam_grid.png", capsys)

    width, height = png_size(open_server.url, run_id, "val/box_accuracy_vs_threshold/epoch_003.png", tmp_path)
    open_page(
        browser, run_url(open_server, experiment_id, run_id, "/artifacts/val/box_accuracy_vs_threshold/epoch_003.png")
    )
    wait_for_text(browser, "val/box_accuracy_vs_threshold/epoch_003.png")
    wait_for_image(browser, width, height)
    keep_screenshot(browser, tmp_path, "dashboard_box_accuracy_vs_threshold.png", capsys)


@needs_browser
def test_model_metrics_tab_charts_the_epochs(open_server, open_run, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    experiment_id, run_id, _ = open_run
    open_page(browser, run_url(open_server, experiment_id, run_id, "/model-metrics"))
    wait_for_text(browser, "maxboxacc_v2", "Step")
    browser.find_element(By.CSS_SELECTOR, "input[placeholder*='Search metric']").send_keys("val/boxacc_v2")
    # The val section alone: one chart per IoU criterion of MaxBoxAccV2, over the epochs.
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")) == 3 and "test\n(" not in body_text(d),
        message="no val-only charts",
    )
    text = wait_for_text(browser, "val\n(3)", "boxacc_v2_iou30", "boxacc_v2_iou50", "boxacc_v2_iou70")
    assert "train\n(" not in text
    keep_screenshot(browser, tmp_path, "dashboard_model_metrics.png", capsys)


@needs_browser
def test_summary_html_renders_with_the_published_anchors(open_server, open_run, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    experiment_id, run_id, _ = open_run
    open_page(browser, run_url(open_server, experiment_id, run_id, "/artifacts/summary.html"))
    frame = WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.find_elements(By.TAG_NAME, "iframe"), message="no HTML preview"
    )[0]
    browser.switch_to.frame(frame)
    text = wait_for_text(browser, "WSOL run summary", "this run (synthetic: not comparable)")
    assert "63.70" in text and "Evaluating Weakly Supervised Object Localization Methods Right" in text
    browser.switch_to.default_content()
    keep_screenshot(browser, tmp_path, "dashboard_run_summary.png", capsys)


def test_logged_run_has_what_the_dashboard_needs(open_server, open_run):
    from mlflow.tracking import MlflowClient

    _, run_id, metrics = open_run
    client = MlflowClient(open_server.url)
    run = client.get_run(run_id)
    assert run.data.metrics["val/maxboxacc_v2"] == pytest.approx(metrics["val/maxboxacc_v2"])
    history = client.get_metric_history(run_id, "val/maxboxacc_v2")
    assert [m.step for m in history] == [1, 2, 3]
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"val", "test", "summary.md", "summary.html", "summary.json"} <= names
    assert {f.path for f in client.list_artifacts(run_id, "val/cams")} == {
        f"val/cams/epoch_{e:03d}.png" for e in (1, 2, 3)
    }
    assert run.data.tags["wsol.synthetic"] == "true"
    red, lime = box_pixels(client.download_artifacts(run_id, "val/cams/epoch_003.png"))
    assert red > 500 and lime > 500  # GT boxes red, predicted boxes green
    # Artifacts went through the server's proxy into its local artifact root.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((open_server.root / "artifacts").rglob("epoch_003.png"))


# --------------------------------------------------------------------------------------------
# Tests: authentication and permissions
# --------------------------------------------------------------------------------------------


def _api(server: Server, path: str) -> str:
    return f"{server.url}/api/2.0/mlflow/{path}"


def test_unauthenticated_and_wrong_credentials_are_refused(auth_server, auth_run):
    experiment_id, run_id, _ = auth_run
    assert requests.get(f"{auth_server.url}/", timeout=30).status_code == 401
    assert (
        requests.get(_api(auth_server, "experiments/search"), params={"max_results": 5}, timeout=30).status_code == 401
    )
    assert requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, timeout=30).status_code == 401
    assert (
        requests.post(_api(auth_server, "runs/create"), json={"experiment_id": experiment_id}, timeout=30).status_code
        == 401
    )
    artifact = f"{auth_server.url}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/val/cams/epoch_003.png"
    assert requests.get(artifact, timeout=30).status_code == 401
    wrong = ("admin", auth_server.admin_password + "x")
    assert (
        requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, auth=wrong, timeout=30).status_code
        == 401
    )
    legacy = ("admin", "password1234")
    assert (
        requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, auth=legacy, timeout=30).status_code
        == 401
    )
    response = requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, timeout=30)
    assert response.headers.get("WWW-Authenticate", "").lower().startswith("basic")
    # The password hashes that MLflow wrote are for the owner's eyes only.
    auth_db = auth_server.root / "basic_auth.db"
    with sqlite3.connect(f"file:{auth_db}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM users WHERE username = 'admin'").fetchone() == (1,)
    assert stat.S_IMODE(auth_db.stat().st_mode) == 0o600


def test_admin_credentials_are_let_in(auth_server, auth_run):
    _, run_id, metrics = auth_run
    admin = ("admin", auth_server.admin_password)
    response = requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, auth=admin, timeout=30)
    assert response.status_code == 200
    logged = {m["key"]: m["value"] for m in response.json()["run"]["data"]["metrics"]}
    assert logged["val/maxboxacc_v2"] == pytest.approx(metrics["val/maxboxacc_v2"])
    assert requests.get(f"{auth_server.url}/", auth=admin, timeout=30).status_code == 200


def test_read_only_user_can_read_but_not_write(auth_server, auth_run, monkeypatch):
    from mlflow.exceptions import MlflowException

    from wsol_core.tracking import RunLogger

    experiment_id, run_id, metrics = auth_run
    admin = ("admin", auth_server.admin_password)
    reader = ("reader", secrets.token_urlsafe(16))
    created = requests.post(
        _api(auth_server, "users/create"), json={"username": reader[0], "password": reader[1]}, auth=admin, timeout=30
    )
    assert created.status_code == 200, created.text
    # The server's default permission is NO_PERMISSIONS: nothing before a grant.
    assert (
        requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, auth=reader, timeout=30).status_code
        == 403
    )
    grant = requests.post(
        f"{auth_server.url}/api/3.0/mlflow/users/permissions/grant",
        json={"username": reader[0], "resource_type": "experiment", "resource_id": experiment_id, "permission": "READ"},
        auth=admin,
        timeout=30,
    )
    assert grant.status_code == 200, grant.text
    # Reads work: the run, and its CAM grid through the artifact proxy.
    assert (
        requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, auth=reader, timeout=30).status_code
        == 200
    )
    artifact = f"{auth_server.url}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/val/cams/epoch_003.png"
    fetched = requests.get(artifact, auth=reader, timeout=30)
    assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Writes are refused with 403: new runs, metrics, tags, artifacts.
    writes = [
        ("post", _api(auth_server, "runs/create"), {"json": {"experiment_id": experiment_id}}),
        (
            "post",
            _api(auth_server, "runs/log-metric"),
            {"json": {"run_id": run_id, "key": "val/maxboxacc_v2", "value": 99.0, "timestamp": 0, "step": 99}},
        ),
        ("post", _api(auth_server, "runs/set-tag"), {"json": {"run_id": run_id, "key": "tampered", "value": "yes"}}),
        ("post", _api(auth_server, "runs/delete"), {"json": {"run_id": run_id}}),
        (
            "put",
            f"{auth_server.url}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/evil.txt",
            {"data": b"x"},
        ),
    ]
    for method, url, kwargs in writes:
        response = getattr(requests, method)(url, auth=reader, timeout=30, **kwargs)
        assert response.status_code == 403, (url, response.status_code, response.text[:200])
    # The training job's logger with the reader's credentials is refused too.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", reader[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader[1])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match="(?i)permission|403"):
        RunLogger(auth_server.url, run_id).log_metrics({"val/maxboxacc_v2": 99.0}, step=99)
    # Nothing changed.
    run = requests.get(_api(auth_server, "runs/get"), params={"run_id": run_id}, auth=admin, timeout=30).json()["run"]
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["val/maxboxacc_v2"] == pytest.approx(
        metrics["val/maxboxacc_v2"]
    )
    assert "tampered" not in {t["key"] for t in run["data"].get("tags", [])}
    assert run["info"]["lifecycle_stage"] == "active"
    assert not list((auth_server.root / "artifacts").rglob("evil.txt"))


@needs_browser
def test_browser_needs_credentials_on_the_auth_server(auth_server, auth_run, browser, tmp_path, capsys):
    experiment_id, run_id, _ = auth_run
    url = run_url(auth_server, experiment_id, run_id)
    browser.get(url)
    time.sleep(2)
    assert "val/maxboxacc_v2" not in body_text(browser) and "fmcg-tiny-synthetic" not in body_text(browser)
    token = base64.b64encode(f"admin:{auth_server.admin_password}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    browser.get(url)
    text = wait_for_text(browser, "val/maxboxacc_v2", "fmcg-tiny-synthetic-auth-run")
    assert "admin" in text  # the signed-in user in the side bar
    keep_screenshot(browser, tmp_path, "dashboard_auth_run_overview.png", capsys)


# --------------------------------------------------------------------------------------------
# Opt-in: a run of the real training job on the dashboard
# --------------------------------------------------------------------------------------------


@needs_browser
@pytest.mark.skipif(
    not (os.environ.get(TRAIN_ENV) or os.environ.get(DB_ENV)),
    reason=f"opt-in (minutes on 2 cores): set {TRAIN_ENV}=1 to train a real run, or {DB_ENV}=/path/mlflow.db to reuse one",
)
def test_real_training_run_on_the_dashboard(tmp_path, browser, capsys):
    from mlflow.tracking import MlflowClient

    database = os.environ.get(DB_ENV)
    if not database:
        database = str(tmp_path / "mlflow.db")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        command = [
            sys.executable,
            str(ROOT / "jobs" / "train_imagenet.py"),
            "--epochs",
            "1",
            "--set",
            "data.synthetic.num_train=200",
            "--set",
            "data.synthetic.num_val=50",
            "--set",
            "data.synthetic.num_test=50",
            "--tracking-uri",
            f"sqlite:///{database}",
            "--storage-path",
            str(tmp_path / "ray"),
            "--experiment",
            "dashboard-training",
        ]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    uri = f"sqlite:///{Path(database).resolve()}"
    client = MlflowClient(uri)
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], "attributes.status = 'FINISHED'")
    ]
    runs = [r for r in runs if "val/maxboxacc_v2" in r.data.metrics]
    assert runs, f"no finished training run with val/maxboxacc_v2 in {uri}"
    run = max(runs, key=lambda r: r.info.start_time)
    cams = sorted(f.path for f in client.list_artifacts(run.info.run_id, "val/cams"))
    assert cams, "the training run logged no CAM grid"
    width, height = png_size(uri, run.info.run_id, cams[-1], tmp_path)
    red, lime = box_pixels(client.download_artifacts(run.info.run_id, cams[-1], str(tmp_path)))

    server = Server(tmp_path / "server", auth=False, extra_args=("--backend-store-uri", uri))
    try:
        server.wait_ready()
        browser.get(run_url(server, run.info.experiment_id, run.info.run_id))
        wait_for_text(browser, "val/maxboxacc_v2", run.info.run_name)
        keep_screenshot(browser, tmp_path, "dashboard_training_run_overview.png", capsys)
        open_page(browser, run_url(server, run.info.experiment_id, run.info.run_id, f"/artifacts/{cams[-1]}"))
        wait_for_text(browser, cams[-1])
        wait_for_image(browser, width, height)
        keep_screenshot(browser, tmp_path, "dashboard_training_run_cams.png", capsys)
    finally:
        server.stop()
    assert red > 0, f"no GT boxes (red) in {cams[-1]}"
    assert lime > 0, f"no predicted boxes (green) in {cams[-1]}"
