"""Run summaries with published anchors, and ablation tables (pure functions + a SQLite MLflow)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import statistics
from pathlib import Path

import pytest

from wsol_core import reporting
from wsol_core.reporting import (
    ANCHORS,
    SOURCES,
    RunRecord,
    ablation_csv,
    ablation_markdown,
    build_ablation_table,
    build_run_summary,
    group_key,
    log_run_summary,
    method_switches,
    render_summary_html,
    render_summary_markdown,
    select_anchors,
    switch_label,
    template_label,
)
from wsol_core.reporting.summary import summary_rows

ROOT = Path(__file__).resolve().parents[1]


def _anchor(method, backbone, dataset, source=None):
    found = [
        a
        for a in ANCHORS
        if (a.method, a.backbone, a.dataset) == (method, backbone, dataset) and (source is None or a.source == source)
    ]
    assert found, (method, backbone, dataset, source)
    return found[0]


# --------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------


def test_cam_anchors_are_the_protocol_papers_numbers():
    # Choe et al. (CVPR 2020) CAM MaxBoxAccV2, as reprinted in FMCG Table 5.
    expected = {
        ("vgg16", "cub"): 63.7,
        ("resnet50", "cub"): 63.0,
        ("inception_v3", "cub"): 56.7,
        ("vgg16", "imagenet"): 60.0,
        ("resnet50", "imagenet"): 63.7,
        ("inception_v3", "imagenet"): 63.4,
    }
    for (backbone, dataset), value in expected.items():
        assert _anchor("cam", backbone, dataset, "choe2020").maxboxacc_v2 == value
    vgg_cub = _anchor("cam", "vgg16", "cub", "choe2020")
    assert (vgg_cub.boxacc_v2_iou30 + vgg_cub.boxacc_v2_iou50 + vgg_cub.boxacc_v2_iou70) / 3 == pytest.approx(
        63.72, abs=0.01
    )


def test_fmcg_anchors_match_its_tables():
    table5 = {
        ("vgg16", "cub"): 80.5,
        ("inception_v3", "cub"): 75.8,
        ("resnet50", "cub"): 73.3,
        ("vgg16", "imagenet"): 65.3,
        ("inception_v3", "imagenet"): 64.8,
        ("resnet50", "imagenet"): 65.5,
    }
    for (backbone, dataset), value in table5.items():
        rows = [
            a
            for a in ANCHORS
            if (a.method, a.backbone, a.dataset) == ("fmcg", backbone, dataset) and a.maxboxacc_v2 is not None
        ]
        assert rows and rows[0].maxboxacc_v2 == pytest.approx(value, abs=0.05)
    table6 = {
        ("vgg16", "cub"): (88.54, 65.60),
        ("resnet50", "imagenet"): (66.46, 52.59),
        ("inception_v3", "imagenet"): (66.86, 50.63),
    }
    for (backbone, dataset), (gt, top1) in table6.items():
        row = _anchor("fmcg", backbone, dataset, "fmcg_t6")
        assert (row.gt_known_loc, row.top1_loc) == (gt, top1)
    # Table 1's full model is the mean of its three IoU columns.
    full = reporting.FMCG_TABLE1[1][2]
    assert sum(full[:3]) / 3 == pytest.approx(full[3], abs=0.01)


def test_every_anchor_is_cited_and_plausible():
    for anchor in ANCHORS:
        assert anchor.source in SOURCES
        assert anchor.backbone in reporting.KNOWN_BACKBONES and anchor.dataset in reporting.KNOWN_DATASETS
        values = [getattr(anchor, k) for k in reporting.LOC_KEYS if getattr(anchor, k) is not None]
        assert values and all(0 < v <= 100 for v in values)


def test_select_anchors_matches_backbone_and_dataset():
    rows, matched = select_anchors("fmcg", "vgg16", "CUB-200-2011")
    assert matched
    assert {(a.backbone, a.dataset) for a in rows} == {("vgg16", "cub")}
    assert {"cam", "fmcg"} <= {a.method for a in rows}
    rows, matched = select_anchors("fmcg", "tiny", "synthetic")
    assert not matched
    assert {a.method for a in rows} == {"cam", "fmcg"}
    assert {a.dataset for a in rows} == {"cub", "imagenet"}
    assert reporting.normalize_dataset("ILSVRC2012") == "imagenet"
    assert reporting.normalize_backbone("InceptionV3") == "inception_v3"


# --------------------------------------------------------------------------------------------
# Run summary
# --------------------------------------------------------------------------------------------

CFG = {
    "method.name": "fmcg",
    "model.backbone": "vgg16",
    "model.pretrained": "/weights/vgg16.pth",
    "method.srd.enabled": True,
    "method.cg.enabled": True,
    "method.pnl.enabled": False,
    "eval.cam_curve_interval": 0.001,
}
METRICS = {
    "val/maxboxacc_v2": 70.0,
    "test/maxboxacc_v2": 75.0,
    "test/boxacc_v2_iou30": 97.0,
    "test/boxacc_v2_iou50": 83.0,
    "test/boxacc_v2_iou70": 45.0,
    "test/gt_known_loc": 84.0,
    "test/top1_loc": 61.5,
}


def test_summary_real_data_is_comparable_with_deltas():
    summary = build_run_summary(CFG, METRICS, "CUB-200-2011", synthetic=False)
    assert summary.comparable and summary.split == "test"
    assert summary.run["maxboxacc_v2"] == 75.0 and summary.run["top1_loc"] == 61.5
    assert summary.switches == {"srd": True, "cg": True, "pnl": False}
    text = render_summary_markdown(summary)
    assert "SRD on, CG on, PNL off" in text
    assert "not comparable" not in text
    assert "CAM: +11.30" in text and "FMCG: -5.50" in text  # 75.0 - 63.7 and 75.0 - 80.5
    assert "Evaluating Weakly Supervised Object Localization Methods Right" in text


def test_summary_synthetic_run_is_marked_not_comparable():
    cfg = {**CFG, "model.backbone": "tiny", "eval.cam_curve_interval": 0.01}
    summary = build_run_summary(cfg, METRICS, "synthetic", synthetic=True)
    assert not summary.comparable
    text = render_summary_markdown(summary)
    assert "**Synthetic data.**" in text and "cannot be compared" in text
    assert "(synthetic: not comparable)" in text
    assert "the protocol's step is 0.001" in text
    assert "minus the published" not in text  # no deltas for incomparable numbers
    page = render_summary_html(summary)
    assert page.startswith("<!DOCTYPE html>") and "synthetic: not comparable" in page and "<script" not in page


def test_summary_real_data_on_a_known_backbone_but_synthetic_flag_is_not_comparable():
    summary = build_run_summary(CFG, METRICS, "cub", synthetic=True)
    assert summary.anchors_match and not summary.comparable


def test_summary_falls_back_to_val_and_computes_the_mean():
    metrics = {
        "val/boxacc_v2_iou30": 90.0,
        "val/boxacc_v2_iou50": 60.0,
        "val/boxacc_v2_iou70": 30.0,
        "val/maxboxacc_v2": 60.0,
    }
    summary = build_run_summary(CFG, metrics, "cub", synthetic=False)
    assert summary.split == "val" and summary.run["maxboxacc_v2"] == 60.0
    assert any("validation split" in note for note in summary.notes)
    summary = build_run_summary(
        CFG, {"boxacc_v2_iou30": 90.0, "boxacc_v2_iou50": 60.0, "boxacc_v2_iou70": 30.0}, "cub", synthetic=False
    )
    assert summary.split is None and summary.run["maxboxacc_v2"] == pytest.approx(60.0)


def test_summary_shows_v1_and_pxap_and_reads_runs_logged_under_the_old_names():
    summary = build_run_summary(CFG, {**METRICS, "test/maxboxacc_v1": 77.5}, "cub", synthetic=False)
    header, rows, _ = summary_rows(summary)
    assert "MaxBoxAcc (v1)" in header and "PxAP" in header
    assert rows[0][header.index("MaxBoxAcc (v1)")] == "77.50" and rows[0][header.index("PxAP")] == "–"
    legacy = {
        "test/maxboxacc_30": 97.0,
        "test/maxboxacc_50": 83.0,
        "test/maxboxacc_70": 45.0,
        "test/maxboxacc_v2": 75.0,
    }
    old = build_run_summary(CFG, legacy, "cub", synthetic=False)
    assert old.run["boxacc_v2_iou30"] == 97.0 and old.run["boxacc_v2_iou70"] == 45.0 and old.run["maxboxacc_v1"] is None
    masks_only = build_run_summary(
        {**CFG, "model.backbone": "resnet50"}, {"test/pxap": 61.2, "val/pxap": 60.0}, "openimages", synthetic=False
    )
    assert masks_only.split == "test" and masks_only.run["pxap"] == 61.2 and masks_only.run["maxboxacc_v2"] is None


class _RecordingLogger:
    def __init__(self, enabled=True):
        self.enabled, self.run_id, self.calls = enabled, "r1", []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args))


def test_log_run_summary_logs_artifacts_and_tags():
    logger = _RecordingLogger()
    markdown = log_run_summary(logger, CFG, METRICS, "cub", False)
    names = {args[1] for name, args in logger.calls if name in ("log_text", "log_dict")}
    assert names == {"summary.md", "summary.html", "summary.json"}
    tags = next(args[0] for name, args in logger.calls if name == "set_tags")
    assert tags["wsol.synthetic"] == "false" and tags["wsol.comparable"] == "true" and tags["wsol.dataset"] == "cub"
    assert tags["mlflow.note.content"] == markdown
    summary_json = next(args[0] for name, args in logger.calls if name == "log_dict")
    json.dumps(summary_json)  # serializable
    assert summary_json["anchors"][0]["citation"]
    long_text = "# head\n\nnotes\n\n## Against published numbers\n\n" + "| row |\n" * 2000
    short = reporting.description_text(long_text)
    assert len(short) <= 5000 and short.startswith("# head") and "summary.html" in short
    disabled = _RecordingLogger(enabled=False)
    assert log_run_summary(disabled, CFG, METRICS, "cub", False) == markdown
    assert disabled.calls == []


# --------------------------------------------------------------------------------------------
# Ablation tables
# --------------------------------------------------------------------------------------------


def _params(srd=True, cg=True, pnl=True, seed=0, method="fmcg", **extra):
    params = {
        "method.name": method,
        "model.backbone": "vgg16",
        "train.seed": str(seed),
        "run.name": f"{method}-{srd}-{cg}-{pnl}-{seed}",
        "data.root": "/data/cub",
        "optim.lr": "0.01",
    }
    if method == "fmcg":
        params.update({"method.srd.enabled": str(srd), "method.cg.enabled": str(cg), "method.pnl.enabled": str(pnl)})
    params.update(extra)
    return params


def _metrics(v30, v50, v70, top1, split="test"):
    return {
        f"{split}/boxacc_v2_iou30": v30,
        f"{split}/boxacc_v2_iou50": v50,
        f"{split}/boxacc_v2_iou70": v70,
        f"{split}/maxboxacc_v2": (v30 + v50 + v70) / 3,
        f"{split}/top1_loc": top1,
    }


def _ablation_records():
    return [
        RunRecord("full-0", _params(seed=0), _metrics(99.0, 88.0, 54.0, 65.0)),
        RunRecord("full-1", _params(seed=1), _metrics(98.0, 90.0, 52.0, 66.0)),
        RunRecord("nocg-0", _params(cg=False, seed=0), _metrics(98.0, 83.0, 41.0, 62.0)),
        RunRecord("nocg-1", _params(cg=False, seed=1), _metrics(98.6, 83.2, 42.2, 63.0)),
        RunRecord("nosrd-0", _params(srd=False), _metrics(98.6, 86.0, 46.8, 64.2)),
        RunRecord("nopnl-0", _params(pnl=False), _metrics(98.5, 86.8, 47.2, 64.0)),
        RunRecord("base-0", _params(srd=False, cg=False, pnl=False), _metrics(97.5, 78.9, 34.6, 59.8)),
        RunRecord("cam-0", _params(method="cam"), _metrics(96.0, 73.0, 21.0, 44.0)),
        RunRecord("report", {}, {}, tags={"wsol.report": "ablation"}),
        RunRecord("unfinished", _params(seed=5), {"val/maxboxacc_v2": 50.0}),
    ]


def test_switches_and_labels():
    assert method_switches(
        {"method.pnl.enabled": "False", "method.srd.enabled": "True", "method.cg.enabled": True, "method.name": "fmcg"}
    ) == {"srd": True, "cg": True, "pnl": False}
    assert switch_label("fmcg", {"srd": True, "cg": False, "pnl": True}) == "FMCG w/o CG"
    assert switch_label("fmcg", {"srd": True, "cg": True, "pnl": True}) == "FMCG (full)"
    assert switch_label("fmcg", {"srd": False, "cg": False, "pnl": False}) == "FMCG w/o SRD, CG, PNL"
    assert switch_label("cam", {}) == "CAM"
    assert (
        template_label("{method.name} lr={optim.lr} {missing}", {"method.name": "fmcg", "optim.lr": "0.1"})
        == "fmcg lr=0.1 ?"
    )


def test_group_key_ignores_seed_and_bookkeeping():
    assert group_key(_params(seed=0)) == group_key(_params(seed=3, **{"run.name": "other", "data.resolved_root": "/x"}))
    assert group_key(_params(cg=False)) != group_key(_params())
    assert group_key(_params(), group_by=["method.*.enabled"]) == group_key(
        _params(**{"optim.lr": "0.1"}), group_by=["method.*.enabled"]
    )


def test_ablation_table_groups_seeds_and_orders_like_the_paper():
    table = build_ablation_table(_ablation_records())
    labels = [row.label for row in table.rows]
    assert labels == ["CAM", "FMCG w/o SRD, CG, PNL", "FMCG (full)", "FMCG w/o SRD", "FMCG w/o CG", "FMCG w/o PNL"]
    assert table.switch_keys == ["srd", "cg", "pnl"]
    full = table.rows[2]
    assert full.n == 2 and full.run_ids == ["full-0", "full-1"] and full.seeds == ["0", "1"]
    assert full.mean["boxacc_v2_iou30"] == pytest.approx(98.5)
    assert full.std["boxacc_v2_iou30"] == pytest.approx(statistics.stdev([99.0, 98.0]))
    assert full.mean["maxboxacc_v2"] == pytest.approx(statistics.fmean([(99 + 88 + 54) / 3, (98 + 90 + 52) / 3]))
    assert full.delta_vs_full == pytest.approx(0.0)
    no_cg = table.rows[4]
    assert no_cg.delta_vs_full == pytest.approx(no_cg.mean["maxboxacc_v2"] - full.mean["maxboxacc_v2"])
    single = table.rows[3]
    assert single.n == 1 and single.std["boxacc_v2_iou30"] is None
    assert table.rows[0].delta_vs_full is None  # CAM has no "full" configuration
    assert sorted(s.split(":")[0] for s in table.skipped) == ["report", "unfinished"]


def test_ablation_markdown_and_csv():
    table = build_ablation_table(_ablation_records())
    text = ablation_markdown(table, title="FMCG ablation")
    assert text.startswith("# FMCG ablation")
    assert (
        "| Method | SRD | CG | PNL | n | IoU 0.3 | IoU 0.5 | IoU 0.7 | Mean (MaxBoxAccV2) | Top-1 Loc | Δ Mean vs full |"
        in text
    )
    assert "| FMCG w/o CG | ✓ | ✗ | ✓ | 2 | 98.30 ± 0.42 |" in text
    assert "| CAM |  |  |  | 1 | 96.00 |" in text
    assert (
        "Published reference: FMCG Table 1" in text
        and "| Ours | ✓ | ✓ | ✓ | 99.00 | 88.63 | 53.88 | 80.50 | 65.60 |" in text
    )
    assert "Synthetic data" not in text
    rows = list(csv.DictReader(io.StringIO(ablation_csv(table))))
    assert [r["label"] for r in rows] == [row.label for row in table.rows]
    no_cg = rows[4]
    assert no_cg["cg_enabled"] == "false" and no_cg["srd_enabled"] == "true" and no_cg["n"] == "2"
    assert no_cg["run_ids"] == "nocg-0;nocg-1"
    assert float(no_cg["boxacc_v2_iou30_mean"]) == pytest.approx(98.3)
    assert float(no_cg["boxacc_v2_iou30_std"]) == pytest.approx(statistics.stdev([98.0, 98.6]), abs=1e-4)
    assert rows[0]["cg_enabled"] == "" and rows[0]["delta_maxboxacc_v2_vs_full"] == ""


def test_ablation_synthetic_runs_are_flagged_and_labels_disambiguated():
    records = [
        RunRecord("a", _params(**{"data.root": "", "optim.lr": "0.01"}), _metrics(90, 60, 30, 40)),
        RunRecord("b", _params(**{"data.root": "", "optim.lr": "0.1"}), _metrics(91, 61, 31, 41)),
    ]
    table = build_ablation_table(records)
    assert table.synthetic
    assert sorted(row.label for row in table.rows) == ["FMCG (full) [optim.lr=0.01]", "FMCG (full) [optim.lr=0.1]"]
    text = ablation_markdown(table)
    assert "**Synthetic data**" in text and "not comparable with the synthetic runs" in text
    grouped = build_ablation_table(records, group_by=["method.*.enabled"], label_template="{method.name}")
    assert [(row.label, row.n) for row in grouped.rows] == [("fmcg", 2)]
    # A sweep groups by its variant names; two variants with the same switches are told apart
    # by those names, not by a list of the params that differ.
    named = [
        RunRecord(r.run_id, {**r.params, "sweep.variant": name}, r.metrics)
        for r, name in zip(records, ("fmcg", "fmcg-searched"))
    ]
    no_srd = RunRecord(
        "c",
        {**records[0].params, "sweep.variant": "fmcg-no-srd", "method.srd.enabled": "False"},
        _metrics(90, 50, 20, 30),
    )
    by_variant = build_ablation_table([*named, no_srd], group_by=["sweep.variant"])
    labels = {row.label: row for row in by_variant.rows}
    assert set(labels) == {
        "FMCG (full) [sweep.variant=fmcg-searched]",
        "FMCG (full) [sweep.variant=fmcg]",
        "FMCG w/o SRD",
    }
    # The ablated row is compared with the full configuration it differs from only by its switch
    # (the same lr), not with the other full row.
    paper, searched = labels["FMCG (full) [sweep.variant=fmcg]"], labels["FMCG (full) [sweep.variant=fmcg-searched]"]
    assert paper.delta_vs_full == searched.delta_vs_full == pytest.approx(0.0)
    without = labels["FMCG w/o SRD"]
    assert without.delta_vs_full == pytest.approx(without.mean["maxboxacc_v2"] - paper.mean["maxboxacc_v2"])
    assert without.delta_vs_full != pytest.approx(without.mean["maxboxacc_v2"] - searched.mean["maxboxacc_v2"])


def test_ablation_val_split_and_missing_columns():
    records = [RunRecord("v", _params(), {**_metrics(90, 60, 30, 40, split="val")})]
    assert build_ablation_table(records, split="test").rows == []
    table = build_ablation_table(records, split="val", columns=("maxboxacc_v2", "gt_known_loc"))
    assert table.rows[0].mean == {"maxboxacc_v2": pytest.approx(60.0), "gt_known_loc": None}
    assert "| – |" in ablation_markdown(table)


# --------------------------------------------------------------------------------------------
# Against a real MLflow store (SQLite): the training job's logger, the CLI, the summary run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store holding an FMCG ablation logged with the training job's RunLogger."""
    from wsol_core.tracking import RunLogger, start_or_resume_run

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    ids = {}
    for record in _ablation_records()[:7]:
        run_id, _ = start_or_resume_run(
            uri, "ablation-test", record.run_id, record.run_id, tags={"wsol.method": "fmcg"}
        )
        logger = RunLogger(uri, run_id)
        logger.log_params(record.params)
        logger.log_metrics(record.metrics, step=3)
        logger.finish()
        ids[record.run_id] = run_id
    running, _ = start_or_resume_run(uri, "ablation-test", "still-running", "still-running")
    RunLogger(uri, running).log_metrics(_metrics(1, 1, 1, 1), step=1)
    return uri, ids


def _load_cli():
    spec = importlib.util.spec_from_file_location("ablation_report_cli", ROOT / "jobs" / "ablation_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_run_summary_into_mlflow(store):
    from mlflow.tracking import MlflowClient

    from wsol_core.tracking import RunLogger, start_or_resume_run

    uri, _ = store
    run_id, _ = start_or_resume_run(uri, "summary-test", "summary-run", "summary-run")
    logger = RunLogger(uri, run_id)
    markdown = log_run_summary(logger, {**CFG, "model.backbone": "tiny"}, METRICS, "synthetic", True)
    client = MlflowClient(uri)
    assert {f.path for f in client.list_artifacts(run_id)} >= {"summary.md", "summary.html", "summary.json"}
    run = client.get_run(run_id)
    assert run.data.tags["wsol.synthetic"] == "true" and run.data.tags["mlflow.note.content"] == markdown
    local = client.download_artifacts(run_id, "summary.md")
    assert Path(local).read_text() == markdown


def test_ablation_cli_by_experiment_and_filter(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri, ids = store
    cli = _load_cli()
    rc = cli.main(
        [
            "--tracking-uri",
            uri,
            "--experiment",
            "ablation-test",
            "--filter",
            "params.`method.name` = 'fmcg'",
            "--output-dir",
            str(tmp_path / "out"),
            "--summary-name",
            "fmcg-ablation",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "FMCG w/o CG" in out and "logged ablation/ablation.md" in out
    text = (tmp_path / "out" / "ablation.md").read_text()
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "ablation.csv").read_text())))
    assert [r["label"] for r in rows] == [
        "FMCG w/o SRD, CG, PNL",
        "FMCG (full)",
        "FMCG w/o SRD",
        "FMCG w/o CG",
        "FMCG w/o PNL",
    ]
    assert rows[1]["n"] == "2"  # two seeds; the still-running run is left out
    assert ids["full-0"] in rows[1]["run_ids"] and ids["full-1"] in rows[1]["run_ids"]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ablation-test")
    summary_runs = client.search_runs([experiment.experiment_id], "tags.`wsol.report` = 'ablation'")
    assert len(summary_runs) == 1
    summary = summary_runs[0]
    assert summary.info.run_name == "fmcg-ablation" and summary.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(summary.info.run_id, "ablation")} == {
        "ablation/ablation.md",
        "ablation/ablation.csv",
        "ablation/sources.json",
    }
    assert Path(client.download_artifacts(summary.info.run_id, "ablation/ablation.md")).read_text() == text
    assert summary.data.params["report.num_runs"] == "7"

    # A second report over the same experiment skips the summary run it finds there.
    assert (
        cli.main(
            [
                "--tracking-uri",
                uri,
                "--experiment",
                "ablation-test",
                "--output-dir",
                str(tmp_path / "again"),
                "--no-log",
            ]
        )
        == 0
    )
    again = (tmp_path / "again" / "ablation.md").read_text()
    assert "a report run" in again and again.count("FMCG (full)") >= 1


def test_ablation_cli_by_run_ids(store, tmp_path, capsys):
    uri, ids = store
    cli = _load_cli()
    chosen = [ids["full-0"], ids["full-1"], ids["nocg-0"]]
    rc = cli.main(
        ["--tracking-uri", uri, "--run-ids", *chosen, "--output-dir", str(tmp_path), "--no-log", "--switches", "cg"]
    )
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "ablation.csv").read_text())))
    assert [(r["label"], r["n"]) for r in rows] == [
        ("FMCG w/o CG", "1"),
        ("FMCG (full)", "2"),
    ]  # all shown switches off = the baseline, first
    assert "srd_enabled" not in rows[0]
    assert cli.main(["--tracking-uri", uri, "--experiment", "no-such-experiment", "--no-log"]) == 2
    assert "no MLflow experiment" in capsys.readouterr().err


def test_the_table_is_the_same_from_records_from_their_frame_and_from_mlflow_search_runs(store, monkeypatch):
    """The aggregation runs on a frame in ``mlflow.search_runs``' layout; a user can hand that
    frame straight to build_ablation_table and get the table the CLI builds from records."""
    import mlflow

    from wsol_core.reporting.ablation import records_from_frame, runs_frame

    records = _ablation_records()
    from_records = build_ablation_table(records)
    from_frame = build_ablation_table(runs_frame(records))
    assert [(r.label, r.run_ids, r.mean, r.std, r.count) for r in from_frame.rows] == [
        (r.label, r.run_ids, r.mean, r.std, r.count) for r in from_records.rows
    ]
    assert [(r.run_id, r.params, r.metrics, r.tags) for r in records_from_frame(runs_frame(records))] == [
        (r.run_id, r.params, r.metrics, r.tags) for r in records
    ]

    uri, ids = store
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    frame = mlflow.search_runs(experiment_names=["ablation-test"], filter_string="attributes.status = 'FINISHED'")
    through_mlflow = build_ablation_table(frame)
    by_id = {v: k for k, v in ids.items()}
    rows = {r.label: r for r in through_mlflow.rows}
    logged = build_ablation_table(records[:7])  # what the store holds
    assert sorted(rows) == sorted(r.label for r in logged.rows)
    for row in logged.rows:
        got = rows[row.label]
        assert sorted(by_id[i] for i in got.run_ids) == sorted(row.run_ids)
        for column in logged.columns:
            assert got.mean[column] == pytest.approx(row.mean[column]) and got.count[column] == row.count[column]
            assert (got.std[column] is None) == (row.std[column] is None)
            assert got.std[column] is None or got.std[column] == pytest.approx(row.std[column])
    full = rows["FMCG (full)"]
    assert full.n == 2 and full.std["boxacc_v2_iou30"] == pytest.approx(statistics.stdev([99.0, 98.0]))
