"""The benchmark scripts' plumbing (their figures are in BENCHMARKS.md, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run_all, train_throughput

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_rejects_unknown_names_and_lists_every_plan_script():
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "eval_speed,warp_drive"])
    assert exc.value.code == 2
    for device, plan in run_all.PLANS.items():
        for name, (script, _, result) in plan.items():
            assert (ROOT / "benchmarks" / script).is_file(), (device, name)
            assert result.endswith(".json")


def test_run_all_records_a_failed_benchmark_and_goes_on(tmp_path, monkeypatch):
    # Two tiny stand-in benchmarks: one fails, one writes its JSON; both are in the index.
    (tmp_path / "bad.py").write_text("import sys; sys.exit(3)\n")
    (tmp_path / "good.py").write_text(
        f"from pathlib import Path; Path({str(tmp_path / 'results' / 'good.json')!r}).write_text('{{}}')\n"
    )
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    monkeypatch.setitem(run_all.PLANS, "cpu", {"bad": ("bad.py", [], "bad.json"), "good": ("good.py", [], "good.json")})
    assert run_all.main([]) == 1
    index = json.loads((tmp_path / "results" / "index_cpu.json").read_text())["benchmarks"]
    assert index["bad"]["exit_status"] == 3 and index["bad"]["result"] is None
    assert index["good"]["exit_status"] == 0 and index["good"]["result"].endswith("good.json")


def test_train_throughput_measures_every_mode(tmp_path):
    out = tmp_path / "tt.json"
    payload = train_throughput.main(
        [
            "--method",
            "cam",
            "--num-train",
            "64",
            "--synthetic-size",
            "64",
            "--batch-size",
            "16",
            "--threads",
            "1",
            "--set",
            f"data.synthetic.cache_dir={tmp_path / 'data'}",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    (row,) = payload["rows"]
    assert row["in_memory"]["backend"] == "in_memory" and row["torch_loader"]["backend"] == "torch"
    assert row["pipeline"]["steps"] == row["in_memory"]["steps"] == 4  # 64 images / 16, remainder dropped
    for mode in ("in_memory", "pipeline", "torch_loader"):
        assert row[mode]["images_per_s"] > 0 and 0.0 <= row[mode]["data_wait"] < 1.0
    assert row["pipeline_over_in_memory"] == pytest.approx(
        row["pipeline"]["images_per_s"] / row["in_memory"]["images_per_s"]
    )


def test_scaling_rejects_a_single_epoch():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_scaling.py"), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--epochs must be >= 2" in out.stderr


def test_every_mutant_still_applies_to_the_current_source(tmp_path):
    """benchmarks/mutants.py edits exact lines; a refactor that moves one must update the mutant
    (its run would stop with a message naming it), and each mutant names tests that exist."""
    from benchmarks import mutants

    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids))
    for mutant in mutants.MUTANTS:
        source = (ROOT / mutant.file).read_text()
        for old, new in mutant.edits:
            assert source.count(old) == 1, (mutant.id, old)
            assert new != old
        assert all((ROOT / test).is_file() for test in mutant.tests), mutant.id
    # Applying one in a scratch copy changes that copy only.
    (tmp_path / "wsol_core" / "methods").mkdir(parents=True)
    first = mutants.MUTANTS[0]
    (tmp_path / first.file).write_text((ROOT / first.file).read_text())
    mutants.apply(first, tmp_path)
    assert first.edits[0][1] in (tmp_path / first.file).read_text()
    assert first.edits[0][1] not in (ROOT / first.file).read_text()


def test_mutants_rejects_an_unknown_selection():
    from benchmarks import mutants

    assert mutants.main(["--only", "no-such-mutant"]) == 2


def test_ablation_diagnostics_average_each_variants_logged_terms(tmp_path):
    """The ablation JSON carries, per variant, the mean and std of the loss terms, mask
    statistics and inference-map scores its runs logged (and nothing else)."""
    from mlflow.tracking import MlflowClient

    from benchmarks import ablation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("diag")
    run_ids = []
    for value in (0.2, 0.4):
        run = client.create_run(experiment)
        for key, v in (
            ("train/loss_caml", value),
            ("test/mask_caml_bg_in_box", value / 10),
            ("val/maxboxacc_v2", 50.0),
        ):
            client.log_metric(run.info.run_id, key, v)
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    result = tmp_path / "ablation.json"
    result.write_text(json.dumps({"rows": {"caml": {"run_ids": run_ids}}, "mlflow": {"tracking_uri": uri}}))
    payload = ablation.add_diagnostics(result)
    diag = payload["diagnostics"]["caml"]
    assert set(diag) == {"train/loss_caml", "test/mask_caml_bg_in_box"}
    assert diag["train/loss_caml"]["mean"] == pytest.approx(0.3) and diag["train/loss_caml"]["n"] == 2
    assert diag["test/mask_caml_bg_in_box"]["std"] == pytest.approx(0.01414, rel=1e-3)
    assert json.loads(result.read_text())["diagnostics"] == payload["diagnostics"]


def test_localize_speed_runs_the_job_on_a_few_pictures(tmp_path):
    """The localize benchmark's whole path on 6 pictures (its figures come from 1,000)."""
    from benchmarks import localize_speed

    payload = localize_speed.main(
        [
            "--num-images",
            "6",
            "--backbones",
            "tiny",
            "--batch-size",
            "4",
            "--num-threads",
            "0",
            "--out",
            str(tmp_path / "l.json"),
        ]
    )
    assert [(r["backbone"], r["overlays"], r["images"]) for r in payload["runs"]] == [
        ("tiny", True, 6),
        ("tiny", False, 6),
    ]
    assert all(r["command_images_per_s"] > 0 for r in payload["runs"]) and (tmp_path / "l.json").is_file()


def test_extract_speed_runs_the_command_on_a_few_images(tmp_path):
    """The extraction benchmark's whole path on 8 images (its figures come from 512)."""
    from benchmarks import extract_speed

    assert (
        extract_speed.main(
            [
                "--num-images",
                "8",
                "--size",
                "64",
                "--backbones",
                "tiny",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    payload = json.loads((tmp_path / "e.json").read_text())
    assert payload["results"]["tiny"]["loop_images_per_s"] > 0 and payload["settings"]["num_images"] == 8


def test_jpeg_check_times_every_path(tmp_path):
    from benchmarks import jpeg_check

    result = jpeg_check.main(["--repeat", "8", "--out", str(tmp_path / "jpeg_check.json")])
    for key in ("pil_decode_ms", "strict_decode_ms", "structure_check_ms", "strict_check_ms"):
        assert result[key] > 0, key
    assert result["strict_check_ms"] > result["structure_check_ms"]  # the strict pass decodes: it cannot be free
    assert (tmp_path / "jpeg_check.json").is_file()


def _row(maxboxacc_v2: float, std: float = 1.0, iou70: float = 10.0) -> dict:
    return {"maxboxacc_v2": {"mean": maxboxacc_v2, "std": std}, "boxacc_v2_iou70": {"mean": iou70, "std": std}}


def test_ablation_targets_of_issues_9_and_16():
    from benchmarks import ablation

    rows = {
        "cam": _row(40.0),
        "fmcg": _row(52.0),
        "fmcg-no-srd": _row(45.0),
        "fmcg-no-cg": _row(47.0),
        "fmcg-no-pnl": _row(49.0),
        "icl": _row(40.0),
        "caml": _row(41.0),
        "c2am": _row(39.0, iou70=12.0),
    }
    found = ablation.targets(rows, "upright")
    assert found["fmcg_over_cam"]["gap_beyond_spread"] == pytest.approx(10.0) and found["fmcg_over_cam"]["met"]
    assert found["table1_ordering"]["met"] and found["icl_at_or_above_cam"]["met"]
    assert found["caml_over_cam"] == {"gap_maxboxacc_v2": 1.0, "met": True, "judged_on": "upright", "applies": True}
    assert found["c2am_over_cam_iou70"]["met"] and not found["c2am_over_cam_iou70"]["applies"]

    # Each target fails when its comparison does.
    broken = dict(rows, **{"fmcg-no-cg": _row(53.0), "icl": _row(39.9), "caml": _row(40.0), "cam": _row(40.0, std=8)})
    found = ablation.targets(broken, "upright+textured")
    assert not found["table1_ordering"]["met"] and not found["icl_at_or_above_cam"]["met"]
    assert not found["caml_over_cam"]["met"] and not found["fmcg_over_cam"]["met"]  # 12 - (1 + 8) < 5
    assert found["c2am_over_cam_iou70"]["applies"] and found["caml_over_cam"]["applies"]
    below_cam = ablation.targets(dict(rows, **{"fmcg-no-srd": _row(39.0)}), "default")
    assert not below_cam["table1_ordering"]["met"]  # an ablation must still beat CAM
    assert set(ablation.targets({"cam": rows["cam"]})) == set()  # nothing to compare: no target

    # A tie is "at or above", also when the two means were summed in different orders.
    scores = [100 * 103 / 300, 100 * 93 / 300, 100 * 91 / 300]  # per-seed MaxBoxAccV2 out of 300 images
    cam_mean, icl_mean = sum(scores) / 3, sum(scores[::-1]) / 3
    assert icl_mean < cam_mean  # the float noise this guards against (-7e-15 in a real sweep)
    tied = ablation.targets(dict(rows, cam=_row(cam_mean), icl=_row(icl_mean)))
    assert tied["icl_at_or_above_cam"]["met"]
    assert not ablation.targets(dict(rows, cam=_row(cam_mean), icl=_row(cam_mean - 0.01)))["icl_at_or_above_cam"]["met"]


def test_ablation_fine_tuning_regime_scales_the_protocols_decay(tmp_path):
    from benchmarks import ablation
    from wsol_core.config import load_config

    for epochs, every in ((3, 1), (6, 2), (10, 3), (50, 15)):  # 10 of 50 and 3 of 10 are the protocol's own
        cfg = load_config(base=ablation.merged(ablation.BASE, ablation.finetune_base(str(tmp_path / "t.pth"), epochs)))
        assert cfg.optim.lr_decay_every == every and cfg.optim.schedule == "step"
        assert cfg.optim.head_lr_mult == 10.0 and cfg.model.pretrained == str(tmp_path / "t.pth")
        assert cfg.run.num_workers == 1 and cfg.data.synthetic.num_train == 1200  # the rest of BASE kept
    assert ablation.benchmark_form(load_config(overrides=["data.synthetic.upright=true"])) == "upright"
    assert ablation.benchmark_form(load_config()) == "default"


def test_trunk_budget_times_every_candidate(tmp_path):
    from benchmarks import trunk_budget

    out = tmp_path / "budget.json"
    assert trunk_budget.main(["--image-size", "32", "--batch-size", "4", "--steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"tiny", "resnet18", "resnet18-large"}
    assert rows["tiny"]["map"] == "4x4" and rows["resnet18"]["map"] == "2x2" and rows["resnet18-large"]["map"] == "4x4"
    assert all(row["images_per_s"] > 0 and row["plan_hours"] > 0 for row in rows.values())


def test_payload_header_gives_a_command_that_pastes_back_into_a_shell():
    import shlex

    from benchmarks._common import payload_header

    argv = ["--variant", "cam-erased=method.name=fmcg method.cg.enabled=false", "--seeds", "0,1"]
    header = payload_header("ablation", argv)
    assert header["benchmark"] == "ablation"
    assert shlex.split(header["command"]) == ["uv", "run", "python", "benchmarks/ablation.py", *argv]
    assert len(header["machine"]["load_average"]) == 3 and header["machine"]["cpu_cores"] >= 1


def test_every_benchmark_names_itself_in_its_header():
    # payload_header builds the command from the name, so a copied line that keeps another
    # script's name would record a command that reruns the wrong benchmark.
    import re

    named = 0
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for name in re.findall(r'payload_header\(\s*"([^"]+)"', script.read_text()):
            assert name == script.stem, f"{script.name} records itself as {name!r}"
            named += 1
    assert named >= 14


def test_the_two_stage_first_stage_fine_tunes_with_the_ablations_recipe(tmp_path):
    # The pipeline's fine-tuned first stage must be the ablation's row of the same method, so the
    # two benchmarks' figures can sit side by side: the same config from the same trunk.
    from benchmarks import ablation, two_stage
    from wsol_core.config import load_config

    trunk = tmp_path / "trunk.pth"
    trunk.write_bytes(b"weights")
    overrides = two_stage.finetune_overrides(str(trunk), epochs=6)
    cfg = load_config(overrides=[*two_stage.BASE, *overrides, "method.name=cam", "train.epochs=6"])
    assert cfg.model.pretrained == str(trunk)
    expected = ablation.finetune_base(str(trunk), 6)["optim"]
    assert {k: getattr(cfg.optim, k) for k in expected} == expected and cfg.optim.lr_decay_every == 2
    with pytest.raises(SystemExit, match="no such file"):
        two_stage.finetune_overrides(str(tmp_path / "missing.pth"), epochs=3)


def test_pnl_attention_says_where_each_query_attends_and_what_the_residual_adds():
    import torch

    from benchmarks.pnl_attention import attention_sums, mass_in_box, measure, residual_removed
    from wsol_core.config import load_config
    from wsol_core.data.batch import Batch
    from wsol_core.methods import build_method

    # Four cells, the first inside the box: every query attending to it, then attention spread evenly.
    coverage = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    onto_box = torch.zeros(1, 4, 4)
    onto_box[..., 0] = 1.0
    s = attention_sums(onto_box, coverage)
    assert s["to_box_from_background"] / s["background_queries"] == pytest.approx(1.0)
    assert s["to_box_from_object"] / s["object_queries"] == pytest.approx(1.0)
    assert (s["row_max"], s["effective_cells"]) == (pytest.approx(1.0), pytest.approx(1.0))
    even = attention_sums(torch.full((1, 4, 4), 0.25), coverage)
    assert even["to_box_from_background"] / even["background_queries"] == pytest.approx(even["box_area"])
    assert even["effective_cells"] == pytest.approx(4.0)
    maps = torch.tensor([[[2.0, 0.0], [-1.0, 2.0]]])
    assert mass_in_box(maps, torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])).item() == pytest.approx(0.5)

    cfg = load_config(base={"method": {"name": "fmcg"}}, overrides=["model.backbone=tiny", "model.pretrained=null"])
    torch.manual_seed(0)
    method = build_method(cfg, 3).eval()
    images = torch.randn(2, 3, 64, 64)
    batch = Batch(
        images=images,
        labels=torch.tensor([0, 1]),
        keys=["a", "b"],
        orig_sizes=torch.full((2, 2), 64),
        boxes=torch.tensor([[[8.0, 8.0, 40.0, 40.0]], [[20.0, 0.0, 63.0, 30.0]]]),
        num_boxes=torch.ones(2, dtype=torch.long),
        is_padding=torch.tensor([False, False]),
    )
    block = method.pnl
    # Zero-initialized, the block is the identity: no residual, the same map without it.
    start = measure(method, [batch], with_pnl=True)
    assert start["residual_norm_ratio"] == pytest.approx(0.0, abs=1e-7)
    assert start["map_mass_in_box"] == pytest.approx(start["map_mass_in_box_residual_removed"])
    assert start["images"] == 2 and 0.0 < start["box_area_share"] < 1.0
    # Switched on, the residual is measured, and removing it changes the map; the block comes back.
    torch.nn.init.ones_(block.bn.weight)
    active = measure(method, [batch], with_pnl=True)
    assert active["residual_norm_ratio"] > 0.01
    assert active["map_mass_in_box"] != pytest.approx(active["map_mass_in_box_residual_removed"], abs=1e-6)
    with residual_removed(method):
        assert isinstance(method.pnl, torch.nn.Identity)
    assert method.pnl is block
