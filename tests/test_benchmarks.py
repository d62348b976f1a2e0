"""The benchmark scripts' plumbing (their figures are in BENCHMARKS.md, never asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def test_start_cost_imports_each_module_with_and_without_bytecode(tmp_path):
    from benchmarks import start_cost

    out = tmp_path / "start.json"
    assert start_cost.main(["--modules", "json", "numpy", "--repeats", "1", "--no-job", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["imports_cpu_s"]) == {"json", "numpy"}
    for row in result["imports_cpu_s"].values():
        assert row["bytecode"] > 0 and row["source"] > 0 and row["ratio"] > 0
    assert isinstance(result["installed_bytecode"], bool) and "job" not in result
    assert result["command"].startswith("uv run python benchmarks/start_cost.py --modules json numpy")


def test_start_cost_source_mode_finds_no_bytecode_and_writes_none(tmp_path):
    """The ``source`` mode reads bytecode only from an empty folder and writes none there: the
    interpreter compiles what it imports (a module it compiled reports no cached file)."""
    from benchmarks.start_cost import mode_env

    empty = tmp_path / "empty"
    probe = "import sys, json.decoder; print(sys.pycache_prefix, sys.dont_write_bytecode, json.decoder.__cached__)"
    done = subprocess.run(
        [sys.executable, "-c", probe], env=mode_env("source", str(empty)), capture_output=True, text=True, check=True
    )
    prefix, dont_write, cached = done.stdout.split()
    assert prefix == str(empty) and dont_write == "True" and cached.startswith(str(empty))
    assert not empty.exists() or not any(empty.rglob("*.pyc"))
    as_is = subprocess.run(
        [sys.executable, "-c", probe], env=mode_env("bytecode", str(empty)), capture_output=True, text=True, check=True
    )
    assert as_is.stdout.split()[0] == "None"


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


def _objectness_split(features_of, n: int = 12, seed: int = 0):
    """A split of 64 px images on an 8 x 8 grid (8 px cells), each with one cell-aligned box away
    from the border; ``features_of(inside)`` makes the ``[N, C, 8, 8]`` features."""
    import torch

    from benchmarks.trunk_objectness import Split

    generator = torch.Generator().manual_seed(seed)
    inside = torch.zeros(n, 8, 8, dtype=torch.bool)
    boxes = []
    for i in range(n):
        x0, y0 = (int(v) for v in torch.randint(1, 4, (2,), generator=generator))
        w, h = (int(v) for v in torch.randint(2, 4, (2,), generator=generator))
        inside[i, y0 : y0 + h, x0 : x0 + w] = True
        boxes.append(torch.tensor([[8.0 * x0, 8.0 * y0, 8.0 * (x0 + w) - 1, 8.0 * (y0 + h) - 1]]))
    return Split({"s": features_of(inside, generator)}, boxes, torch.full((n, 2), 64)), inside


def test_trunk_objectness_scores_a_direction_that_marks_the_object_and_none_in_noise():
    import torch

    from benchmarks.trunk_objectness import cell_auc, coverage, measure_stage, principal_directions

    # The AUC: perfect, reversed, and a constant map (all ties) at chance.
    truth = torch.tensor([True, True, False, False])
    assert cell_auc(torch.tensor([3.0, 2.0, 1.0, 0.0]), truth) == 1.0
    assert cell_auc(torch.tensor([0.0, 1.0, 2.0, 3.0]), truth) == 0.0
    assert cell_auc(torch.zeros(4), truth) == 0.5
    with pytest.raises(ValueError, match="both inside and outside"):
        cell_auc(torch.zeros(2), torch.tensor([True, True]))
    # Principal directions: the axis of largest variance first, with its share of the variance.
    rows = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.tensor(
        [2.0, 1.0], dtype=torch.float64
    )
    _, directions, explained = principal_directions(rows, 2)
    assert abs(float(directions[0, 0])) > 0.99 and float(explained[0]) == pytest.approx(0.8, abs=0.03)

    def marked(inside, generator):  # channel 0 carries the object, above the others' noise
        noise = 0.3 * torch.randn(len(inside), 4, 8, 8, generator=generator)
        noise[:, 0] += 3.0 * inside
        return noise

    def noise_only(inside, generator):
        return torch.randn(len(inside), 4, 8, 8, generator=generator)

    val, _ = _objectness_split(marked, seed=1)
    test, inside = _objectness_split(marked, seed=2)
    assert torch.equal(coverage(test, (8, 8)) > 0.5, inside)  # the boxes land on the cells meant
    found = measure_stage(val, test, "s", components=2)
    first = found["components"][0]
    assert max(first["cell_auc"], 1 - first["cell_auc"]) > 0.99
    assert first["better_maxboxacc_v2"] > 90.0 and first["explained_variance"] > 0.5
    # The object is away from the border, so the border check picks the better side.
    assert first["picked_maxboxacc_v2"] == first["better_maxboxacc_v2"]
    assert found["probe"]["cell_auc"] > 0.99 and found["probe"]["maxboxacc_v2"] > 90.0
    assert found["components"][1]["better_maxboxacc_v2"] < first["better_maxboxacc_v2"]

    val, _ = _objectness_split(noise_only, seed=1)
    test, _ = _objectness_split(noise_only, seed=2)
    blind = measure_stage(val, test, "s", components=1)
    assert abs(blind["components"][0]["cell_auc"] - 0.5) < 0.1
    assert abs(blind["probe"]["cell_auc"] - 0.5) < 0.1
    assert blind["probe"]["maxboxacc_v2"] < found["probe"]["maxboxacc_v2"] - 30


def test_c2am_split_overlap_tells_a_map_on_the_object_from_a_map_on_the_trunks_split():
    import torch

    from benchmarks.c2am_split_overlap import agreement, on_grid

    generator = torch.Generator().manual_seed(0)
    n, size = 16, 8
    inside = torch.zeros(n, size, size, dtype=torch.bool)
    inside[:, 2:5, 2:5] = True  # the object
    other = torch.zeros(n, size, size, dtype=torch.bool)
    other[:, 5:8, 0:4] = True  # the split the trunk's direction marks, off the object
    # The trunk's projection: high on its split, with its sign flipped (a direction's sign is arbitrary).
    pc_map = -(other.float() * 2.0 - 1.0) + 0.1 * torch.randn(n, size, size, generator=generator)

    on_object = inside.float() + 0.1 * torch.rand(n, size, size, generator=generator)
    found = agreement(on_object, pc_map, inside)
    assert found["auc_vs_box"] > 0.99 and found["auc_vs_pc1_split"] < 0.75

    on_split = other.float() + 0.1 * torch.rand(n, size, size, generator=generator)
    found = agreement(on_split, pc_map, inside)
    assert found["auc_vs_pc1_split"] > 0.99 and found["pc1_side"] == "minus"
    assert found["corr_with_pc1"] > 0.9  # signed on the side that agrees
    assert found["auc_vs_box"] < 0.5  # the split lies off the object: it ranks the box low

    with pytest.raises(ValueError, match="shapes differ"):
        agreement(on_split[:, :4], pc_map, inside)
    assert on_grid(torch.ones(2, 4, 4), (8, 8)).shape == (2, 8, 8)
    assert on_grid(on_split, (size, size)) is on_split


def test_trunk_objectness_runs_on_a_trunk_file_and_the_benchmarks_shards(tmp_path):
    import torch

    from benchmarks import trunk_objectness
    from wsol_core.data.batch import Batch
    from wsol_core.models import TinyCNN

    torch.manual_seed(1)
    backbone = TinyCNN()
    trunk = tmp_path / "trunk.pth"
    torch.save({k: v for k, v in backbone.state_dict().items() if not k.startswith("conv6.")}, trunk)

    # collect: every stage asked for, the padding left out.
    batch = Batch(
        images=torch.randn(3, 3, 64, 64),
        labels=torch.tensor([0, 1, 1]),
        keys=["a", "b", "pad"],
        orig_sizes=torch.full((3, 2), 64),
        boxes=torch.tensor([[[8.0, 8.0, 40.0, 40.0]], [[20.0, 0.0, 63.0, 30.0]], [[8.0, 8.0, 40.0, 40.0]]]),
        num_boxes=torch.ones(3, dtype=torch.long),
        is_padding=torch.tensor([False, False, True]),
    )
    split = trunk_objectness.collect(backbone, [batch], ["image", "block3", "block4"])
    assert {k: tuple(v.shape) for k, v in split.features.items()} == {
        "image": (2, 3, 8, 8),
        "block3": (2, 128, 16, 16),
        "block4": (2, 128, 8, 8),
    }
    assert len(split.boxes) == 2 and split.sizes.shape == (2, 2)

    out = tmp_path / "objectness.json"
    small = [
        f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        "data.synthetic.num_train=4",
        "data.synthetic.num_val=12",
        "data.synthetic.num_test=12",
    ]
    argv = ["--trunk", str(trunk), "--stages", "image,block4", "--components", "1", "--out", str(out)]
    payload = trunk_objectness.main(argv + [a for s in small for a in ("--set", s)])
    assert json.loads(out.read_text())["sources"] == payload["sources"]
    assert payload["images"] == {"val": 12, "test": 12} and payload["form"] == "textured"
    stages = {source: payload["sources"][source]["stages"] for source in ("pretrained", "random_init")}
    assert set(stages["pretrained"]) == {"image", "block4"}
    assert set(stages["random_init"]) == {"block4"}  # the input does not depend on the weights
    # The two sources are different weights, so their block4 directions score differently.
    pretrained = stages["pretrained"]["block4"]["components"][0]
    random_init = stages["random_init"]["block4"]["components"][0]
    assert pretrained["cell_auc"] != random_init["cell_auc"]
    objective = stages["pretrained"]["block4"]["c2am_objective"]
    assert set(objective) == {"gt_box", "other_images_box", "pc1"} and objective["gt_box"]["total"] > 0
    for figure in (pretrained["plus"]["maxboxacc_v2"], stages["pretrained"]["block4"]["probe"]["iou50"]):
        assert 0.0 <= figure <= 100.0
    with pytest.raises(SystemExit):
        trunk_objectness.main(["--trunk", str(tmp_path / "missing.pth")])
    # Without a trunk: the random initialisation alone, the input measured with it.
    alone = trunk_objectness.main(
        ["--stages", "image", "--out", str(tmp_path / "alone.json")] + [a for s in small for a in ("--set", s)]
    )
    assert alone["trunk"] is None and list(alone["sources"]) == ["random_init"]
    assert set(alone["sources"]["random_init"]["stages"]) == {"image"}


def test_trunk_objectness_c2am_objective_is_lowest_at_the_split_the_features_mark():
    import torch

    from benchmarks.trunk_objectness import c2am_objective

    generator = torch.Generator().manual_seed(0)
    n, c = 16, 8
    inside = torch.zeros(n, 6, 6)
    inside[:, 1:4, 1:4] = 1.0
    inside[::2] = inside[::2].roll(2, dims=2)  # the object in one of two places
    common = torch.rand(c, generator=generator)  # every object alike, every background its own
    backgrounds = torch.rand(n, c, 1, 1, generator=generator)
    features = torch.where(inside[:, None].bool(), common[None, :, None, None], backgrounds.expand(n, c, 6, 6))
    features = features + 0.01 * torch.rand(n, c, 6, 6, generator=generator)
    at_object = c2am_objective(features, inside, batch_size=8)
    off_object = c2am_objective(features, inside.roll(1, dims=0), batch_size=8)
    assert at_object["total"] == pytest.approx(at_object["neg"] + at_object["pos_fg"] + at_object["pos_bg"])
    assert at_object["total"] < off_object["total"] - 0.1
    assert at_object["pos_fg"] < 0.01 < off_object["pos_fg"]  # the objects are alike, the mixed masks not
    # Symmetric in P and 1 - P (eq. 9), so the sign of a split does not matter.
    assert c2am_objective(features, 1 - inside, batch_size=8)["total"] == pytest.approx(at_object["total"])
    with pytest.raises(ValueError, match="two images"):
        c2am_objective(features[:1], inside[:1])


def test_suite_cpu_gives_each_sample_to_the_test_its_worker_was_running():
    from benchmarks.suite_cpu import OUTSIDE, attribute

    timelines = {
        "gw0": [(10.0, "start", "tests/test_a.py::one"), (20.0, "end", "tests/test_a.py::one")]
        + [(20.5, "start", "tests/test_b.py::two"), (40.0, "end", "tests/test_b.py::two")],
        "gw1": [(10.0, "start", "tests/test_a.py::three"), (40.0, "end", "tests/test_a.py::three")],
    }
    job, ray = "job drivers and scripts", "Ray's daemons"
    samples = [
        (15.0, {("gw0", job): 2.0, ("gw1", ray): 1.0, (OUTSIDE, "other"): 0.5}),
        (20.4, {("gw0", ray): 0.25}),  # its interval's middle (19.9) lies in test one
        (20.9, {("gw0", job): 0.25}),  # its middle (20.4) lies between the two tests
        (30.0, {("gw0", job): 3.0, ("gw1", job): 1.0}),
    ]
    per_test, per_file, per_owner = attribute(samples, timelines, interval=1.0)
    assert per_test["tests/test_a.py::one"] == {job: 2.0, ray: 0.25}
    assert per_test["(between tests)"] == {job: 0.25}
    assert per_test["tests/test_b.py::two"] == {job: 3.0}
    assert per_test["tests/test_a.py::three"] == {ray: 1.0, job: 1.0}
    assert per_test[f"({OUTSIDE})"] == {"other": 0.5}
    assert per_file["tests/test_a.py"] == {job: 3.0, ray: 1.25}
    assert {owner: sum(kinds.values()) for owner, kinds in per_owner.items()} == {"gw0": 5.5, "gw1": 2.0, OUTSIDE: 0.5}


def test_suite_cpu_sampler_charges_a_workers_children_to_it(tmp_path):
    """Real processes: a child of the (stand-in) xdist worker that burns CPU is charged to that
    worker, and the worker's own CPU to the in-process kind."""
    from benchmarks.suite_cpu import Sampler

    (tmp_path / "gw7.pid").write_text(str(os.getpid()))
    sampler = Sampler(tmp_path)
    sampler.sample()
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    charged = 0.0
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # the child stays (asleep) until it is charged: a loaded box samples slowly
            sampler.sample()
            charged = sum(
                spent for _, used in sampler.samples for (owner, kind), spent in used.items() if owner == "gw7"
            )
            if charged >= 0.35:
                break
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    kinds = {kind for _, used in sampler.samples for (owner, kind) in used if owner == "gw7"}
    assert charged >= 0.35, sampler.samples
    assert "other" in kinds  # the child's "python -c" matches no marker
    assert sampler.kind[os.getpid()] == "pytest worker (in-process tests)"


def test_suite_cpu_counts_the_processes_a_test_starts(tmp_path):
    """Real processes: one started during a test and named like a job driver is counted for that
    test; one that was running before the first sample is not."""
    from benchmarks.suite_cpu import Sampler, counted_as

    assert counted_as("ray::TrainController") == "Ray Train fits"
    assert counted_as("ray::RayTrainWorker.__init__") == "Ray Train workers"
    assert counted_as("site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=x") == "Ray instances"
    assert counted_as("ray::IDLE") is None

    (tmp_path / "gw7.pid").write_text(str(os.getpid()))
    asleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    before = subprocess.Popen([*asleep, "jobs/already_running.py"])
    during = None
    try:
        sampler = Sampler(tmp_path)
        sampler.sample()
        began = time.time()
        # A driver that forks a child, which keeps its command line (as a torch data-loader
        # worker keeps its Ray worker's): one start, not two.
        forks = "import os, time\nif os.fork() == 0: time.sleep(120)\ntime.sleep(120)"
        during = subprocess.Popen([sys.executable, "-c", forks, "jobs/stand_in.py"])
        deadline = time.time() + 60
        while len(sampler.counted) < 2:
            assert time.time() < deadline, sampler.counted
            time.sleep(0.1)
            sampler.sample()
    finally:
        import psutil

        for process in (before, during):
            if process is not None:
                for child in psutil.Process(process.pid).children():
                    child.kill()
                process.kill()
                process.wait()
    timelines = {"gw7": [(began - 1, "start", "tests/test_x.py::a"), (time.time() + 1, "end", "tests/test_x.py::a")]}
    assert before.pid not in sampler.counted and during.pid in sampler.counted
    assert set(sampler.counted.values()) == {"job drivers"}
    assert sampler.starts(timelines) == {"tests/test_x.py::a": {"job drivers": 1}}


def test_suite_cpu_plugin_writes_each_workers_pid_and_timeline(tmp_path):
    (tmp_path / "test_tiny.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    timeline = tmp_path / "timeline"
    timeline.mkdir()
    env = dict(os.environ, WSOL_SUITE_CPU_DIR=str(timeline), PYTHONPATH=str(ROOT))
    for name in [n for n in env if n.startswith("PYTEST_XDIST_")]:  # this test's own worker's
        del env[name]

    def run_tiny_suite(*extra: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "benchmarks.suite_cpu", "-p", "no:cacheprovider", "-c", "pytest.ini"]
            + ["test_tiny.py", "-q", *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    run_tiny_suite()
    assert int((timeline / "main.pid").read_text()) > 0
    events = [line.split("\t") for line in (timeline / "main.tsv").read_text().splitlines()]
    assert [(kind, nodeid) for kind, _, nodeid in events] == [
        ("start", "test_tiny.py::test_one"),
        ("end", "test_tiny.py::test_one"),
        ("start", "test_tiny.py::test_two"),
        ("end", "test_tiny.py::test_two"),
    ]
    stamps = [float(stamp) for _, stamp, _ in events]
    assert stamps == sorted(stamps)

    # Under xdist each worker writes its own files, and the controller, which runs no test, none.
    for path in timeline.iterdir():
        path.unlink()
    run_tiny_suite("-n", "1")
    assert sorted(path.name for path in timeline.iterdir()) == ["gw0.pid", "gw0.tsv"]
    assert int((timeline / "gw0.pid").read_text()) > 0
    assert len((timeline / "gw0.tsv").read_text().splitlines()) == 4


def test_leftover_cleaners_sums_each_processs_cpu_by_kind_between_two_samples():
    from benchmarks.leftover_cleaners import cpu_by_kind

    before = {
        1: (10.0, "ray::PlacementGroupCleaner"),
        2: (5.0, "python -u .../ray/_private/log_monitor.py --session-dir=x"),
        3: (1.0, ".../ray/core/src/ray/gcs/gcs_server --log_dir=x"),
        9: (7.0, "ray::PlacementGroupCleaner"),  # exits before the second sample
    }
    after = {
        1: (10.6, "ray::PlacementGroupCleaner"),
        2: (5.5, "python -u .../ray/_private/log_monitor.py --session-dir=x"),
        3: (1.2, ".../ray/core/src/ray/gcs/gcs_server --log_dir=x"),
        4: (0.3, ".../ray/core/src/ray/raylet/raylet --raylet_socket_name=x"),  # started in between
        5: (0.4, "ray::RuntimeEnvAgent"),
    }
    assert cpu_by_kind(before, after) == {
        "GCS and raylet": pytest.approx(0.5),
        "leftover cleaners": pytest.approx(0.6),
        "log monitor": pytest.approx(0.5),
        "the rest of the head": pytest.approx(0.4),
    }
