"""The GPU check's kit (benchmarks/gpu/): the bundles' plan and assembly, the carry plan's
commands, the tier runner's budget, and the whole measurement as a dry run on CPU (the same code
paths short of CUDA, with Ray and MLflow hidden from tiers 1-3 as on the GPU machine)."""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.gpu import kit

REPO = Path(__file__).resolve().parents[1]


# -- bundles: plan, stash, install ---------------------------------------------------------------


def _fake_bundle(tmp_path: Path, part_bytes: int) -> Path:
    """A staged tree like prepare.sh's (with an extension per Python), packed and cut into parts."""
    k = tmp_path / "kit"
    stage = k / "stage" / "base"
    (stage / "pkg").mkdir(parents=True)
    (stage / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    (stage / "pkg" / "data.bin").write_bytes(os.urandom(300_000))  # incompressible: several parts
    for tag in ("cpython-311", "cpython-312", "cpython-313"):
        (stage / "pkg" / f"_impl.{tag}-x86_64-linux-gnu.so").write_bytes(tag.encode() * 1000)
    assert kit.prune_other_pythons(stage) == 2 * len(b"cpython-311") * 1000
    assert [f.name for f in (stage / "pkg").glob("_impl.*")] == ["_impl.cpython-312-x86_64-linux-gnu.so"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(stage, arcname=".")
    data = lzma.compress(buf.getvalue())
    (k / "base.tar.xz").write_bytes(data)
    (k / "parts").mkdir()
    for n, start in enumerate(range(0, len(data), part_bytes)):
        (k / "parts" / f"base.{n:02d}").write_bytes(data[start : start + part_bytes])
    (k / "base.versions").write_text("pkg==1.0\n")
    return k


def test_parts_are_stashed_checked_and_installed(tmp_path):
    k = _fake_bundle(tmp_path, part_bytes=100_000)
    plan = kit.write_plan(k)
    parts = plan["bundles"]["base"]["parts"]
    assert len(parts) >= 3 and sum(p["bytes"] for p in parts) == plan["bundles"]["base"]["bytes"]
    assert "calls: " in kit.describe(plan) and plan["bundles"]["base"]["packages"] == ["pkg==1.0"]
    store = tmp_path / "machine"
    # Nothing stashed yet: install says what to do.
    with pytest.raises(kit.KitError, match="nothing stashed"):
        kit.install(store)
    for p in parts[:-1]:
        kit.stash(k / "parts" / p["name"], k, store)
    report = kit.install(store)
    assert report["installed"] == [] and report["incomplete"] == {"base": [parts[-1]["name"]]}
    # A damaged part is refused by name; a foreign one too; a retried stash does no harm.
    last = k / "parts" / parts[-1]["name"]
    good = last.read_bytes()
    last.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(kit.KitError, match=rf"{parts[-1]['name']} arrived damaged"):
        kit.stash(last, k, store)
    last.write_bytes(good)
    with pytest.raises(kit.KitError, match="not a part of this plan"):
        kit.stash(tmp_path / "base.99", k, store)
    kit.stash(last, k, store)
    kit.stash(last, k, store)
    report = kit.install(store)
    assert report["installed"] == ["base"] and not report["incomplete"]
    site = store / "site"
    assert (site / "pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    env = (store / "env.sh").read_text()
    out = subprocess.run(
        ["bash", "-c", f". {store / 'env.sh'} && {sys.executable} -c 'import pkg; print(pkg.VALUE)'"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42" and str(site) in env


def test_a_joined_bundle_that_does_not_match_is_not_unpacked(tmp_path):
    k = _fake_bundle(tmp_path, part_bytes=200_000)
    kit.write_plan(k)
    store = tmp_path / "machine"
    for p in sorted((k / "parts").iterdir()):
        kit.stash(p, k, store)
    plan = json.loads((store / "plan.json").read_text())
    plan["bundles"]["base"]["sha256"] = "0" * 64
    (store / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(kit.KitError, match="do not match the plan's SHA-256"):
        kit.install(store)
    assert not (store / "site" / "pkg").exists()


def test_plan_refuses_what_cannot_travel(tmp_path, monkeypatch):
    k = _fake_bundle(tmp_path, part_bytes=200_000)
    monkeypatch.setattr(kit, "TRANSFER_LIMIT", 150_000)
    with pytest.raises(kit.KitError, match=r"base\.00 .* exceed one 64 MiB transfer"):
        kit.write_plan(k)
    monkeypatch.undo()
    (k / "parts" / "base.01").unlink()
    with pytest.raises(kit.KitError, match="do not add up"):
        kit.write_plan(k)
    so = k / "stage" / "base" / "pkg" / "_other.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"x")
    with pytest.raises(kit.KitError, match="no build for CPython 3.12"):
        kit.prune_other_pythons(k / "stage" / "base")


def test_wheel_list_and_lock_versions(tmp_path):
    names = kit.wheel_names()
    assert "nvidia-dali-cuda130" in names["base"] and "webdataset" in names["base"]
    assert "ray" in names["tier4"] and "mlflow" in names["tier4"]
    assert not set(names["base"]) & set(names["tier4"])
    versions = kit.lock_versions(["ray", "nvidia-dali-cuda130"])
    lock = (REPO / "uv.lock").read_text()
    for name, version in versions.items():
        assert re.search(rf'name = "{name}"\nversion = "{re.escape(version)}"', lock)
    bad = tmp_path / "wheels.txt"
    bad.write_text("base ray\ntier5 mlflow\n")
    with pytest.raises(kit.KitError, match=r"wheels.txt:2: expected 'GROUP NAME'"):
        kit.wheel_names(bad)
    with pytest.raises(kit.KitError, match="no locked version of"):
        kit.lock_versions(["not-a-package-of-this-project"])


def test_carry_plan_commands_fit_one_call():
    text = (REPO / "benchmarks" / "gpu" / "carry.md").read_text()
    rows = [r for r in text.splitlines() if re.match(r"\| \d", r)]
    assert len(rows) >= 3
    carried = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        command = cells[2].strip("`")
        assert 0 < len(command) <= 2000
        carry = json.loads(cells[1].strip("`"))
        assert len(carry) <= 8
        carried += carry
        for part in re.findall(r"stash (\S+)", command):
            assert part in carry, f"{part} is stashed but not carried in: {row}"
    assert any("kit.py install" in r for r in rows) and "run.sh" in rows[-1]
    # every part prepare.sh makes by default is carried, if the kit was prepared here
    plan = REPO / ".gpukit" / "plan.json"
    if plan.exists():
        parts = {
            f".gpukit/parts/{p['name']}" for b in json.loads(plan.read_text())["bundles"].values() for p in b["parts"]
        }
        assert parts <= set(carried), sorted(parts - set(carried))


# -- the measurement ------------------------------------------------------------------------------


@pytest.mark.integration
def test_tier_one_runs_without_ray_mlflow_dali_or_webdataset():
    """The training epoch, the evaluator and the methods import nothing the GPU machine lacks."""
    hide = REPO / "benchmarks" / "gpu" / "_hide.py"
    code = (
        "import wsol_core.train.loop, wsol_core.train.evaluate, wsol_core.methods, wsol_core.data.loader; print('ok')"
    )
    script = Path(REPO / ".pytest_hide_probe.py")
    script.write_text(code + "\n")
    try:
        out = subprocess.run(
            [sys.executable, str(hide), "ray,mlflow,nvidia.dali,webdataset", str(script)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
        script.write_text("import wsol_core.tracking\n")
        out = subprocess.run(
            [sys.executable, str(hide), "mlflow", str(script)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert out.returncode != 0 and "No module named 'mlflow' (hidden" in out.stderr
    finally:
        script.unlink()


@pytest.mark.integration
def test_budget_stops_cleanly_with_partial_results(tmp_path):
    # A step starts only with 15 s of the budget left and is stopped 5 s before the budget ends: a
    # 22 s budget (the check's own start, torch's import, counts in it) runs the first step and
    # cuts tier 1 short, by skipping its last steps or stopping the one that would overrun. 30 s
    # relied on the box being slow: once processes stopped compiling their imports (bytecode
    # written at install), all four steps of tier 1 fitted in it.
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu/tiers.py",
            "--dry-run",
            "--out",
            str(out),
            "--tiers",
            "1",
            "--budget",
            "22",
            "--cap-scale",
            "0.5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["finished"] is True and report["dry_run"] is True
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    assert statuses["dali_vs_exact"] == "not asked for" and statuses["train_job"] == "not asked for"
    cut = [n for n, s in statuses.items() if s == "skipped: time budget spent" or s.startswith("stopped at its")]
    assert cut and "train_step_eager" not in cut, statuses  # the first step ran, a later one was cut
    assert report["steps"]["train_step_eager"]["result"]["benchmark"] == "gpu_train_step"  # its JSON came back
    assert report["elapsed_s"] < 60, proc.stdout
    assert (out / "gpu_check.log").stat().st_size > 0


@pytest.mark.integration
def test_dry_run_measures_every_tier(tmp_path):
    # The device's budget (450 s, each step capped) is for an H200; on a 2-core box that shares its
    # CPUs with another test the same steps take longer, so here the caps and the budget are tripled.
    out = tmp_path / "out"
    env = dict(
        os.environ, OUT=str(out), PYTHON=sys.executable, GPUKIT_STORE=str(tmp_path / "no-kit"), GPU_CHECK_LIMIT_S="1400"
    )
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--dry-run", "--budget", "1350", "--cap-scale", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert proc.returncode == 0, (proc.stdout[-3000:], {n: (s["status"], s.get("tail")) for n, s in steps.items()})
    assert report["finished"] and all(s["status"] == "ok" for s in steps.values()), {
        n: s["status"] for n, s in steps.items()
    }
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log"]  # the device tool returns at most 8 files

    rows = steps["train_step_eager"]["result"]["rows"]
    assert {r["method"] for r in rows} == {"cam", "fmcg", "icl", "caml", "c2am", "regressor"}
    assert all(r["images_per_s"] > 0 and r["ratio_to_cam"] > 0 for r in rows)
    compiled = steps["train_step_compiled"]["result"]["rows"]
    assert compiled and compiled[0]["mode"] == "compiled" and compiled[0]["images_per_s"] > 0
    assert steps["evaluator_50k_maps"]["result"]
    decode = steps["decode_anchor"]["result"]
    assert decode["decode_images_per_s"] > 0 and decode["decode_resize_crop_images_per_s"] > 0
    paths = steps["dali_vs_exact"]["result"]["paths"]
    assert paths["exact"]["pixel_max_diff"] == 0.0 and paths["dali"]["backend"] == "dali"
    for name in ("dali", "torch_device_decode"):
        assert paths[name]["pixel_mean_diff"] < 0.02 and paths[name]["map_mean_diff"] < 0.05
    assert (
        steps["input_pipeline"]["result"]
        and steps["train_throughput"]["result"]["rows"][0]["torch_loader_decode"] == "device"
    )
    tests = steps["pytest_gpu"]["tests"]
    assert (
        tests["tests"] >= 2 and tests["failures"] == tests["errors"] == 0 and tests["skipped"] == tests["tests"]
    )  # no GPU here
    assert steps["train_job"]["exit"] == 0
    summary = report["summary"]
    assert len(summary["train_step_img_s"]) == 7 and summary["evaluator"]["maps"] == 64  # 6 methods eager, cam compiled
    assert (
        set(summary["inputs_vs_exact"]) == {"exact", "dali", "torch_device_decode"}
        and summary["gpu_tests"]["tests"] >= 2
    )
