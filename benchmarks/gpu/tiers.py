"""The GPU check's measurement, in tiers, inside one time budget (``run.sh`` calls this).

    python benchmarks/gpu/tiers.py --out $OUT                 # on the GPU machine
    python benchmarks/gpu/tiers.py --out DIR --dry-run        # here, on CPU, tiny sizes, same code

Each step runs as its own process (CUDA contexts, DALI threads and Ray do not leak between
them) with a time limit: its own cap, cut to what is left of ``--budget``. A step that is cut
short, fails or lacks its packages is recorded as such and the next one runs. After every step
``gpu_check.json`` under ``--out`` is rewritten with everything so far (each step's JSON, exit
status, seconds, and the tail of its output), so whatever stops the run, what finished comes back.
The full log is ``gpu_check.log``: two files, inside the device tool's limit of 8.

Tiers:

1. what the machine has (torch, torchvision): every method's training step on VGG16, ResNet50
   and InceptionV3 (``train_step.py``); the evaluator on 50,000 maps at 1000 thresholds
   (``benchmarks/eval_speed.py``); batched nvJPEG decode (``decode_anchor.py``); and, last, the
   ``torch.compile`` variants with whatever time is left;
2. with the base bundle (DALI, webdataset): DALI against the exact path (``dali_check.py``),
   the input pipeline (``benchmarks/input_pipeline.py``), the job's epoch fed by DALI and by the
   torch loader's GPU decode against in-memory tensors (``benchmarks/train_throughput.py``);
3. the GPU-marked tests (``pytest -m gpu``);
4. with the tier4 bundle (Ray, MLflow): one real ``jobs/train_imagenet.py --use-gpu`` run.

Tiers 1-3 run with Ray and MLflow hidden (and tier 1 also without DALI and webdataset), here as
there (``_hide.py``), so that the dry run fails in CI where the GPU run would.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TIER1_HIDDEN = "ray,mlflow,nvidia.dali,webdataset"
TIER23_HIDDEN = "ray,mlflow"


@dataclass
class Step:
    tier: int
    name: str
    argv: list[str]  # after the interpreter; "{json}" is replaced by the step's JSON path
    cap_s: float
    hidden: str = ""
    needs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def plan(dry: bool, cores: int) -> list[Step]:
    """The steps in the order they run; sizes for the GPU machine, or tiny for ``--dry-run``."""
    dev = "cpu" if dry else "cuda"
    threads = "1" if dry else str(max(1, min(cores - 2, 12)))
    bench = "benchmarks"
    if dry:
        step_args = ["--backbones", "tiny", "--batches", "4", "--image-size", "64", "--steps", "2", "--warmup", "1"]
        compiled = ["--methods", "cam", "--compiled-methods", "cam"]
        eval_args = ["--num-maps", "64", "--batch-size", "32", "--fast-only", "--chunk", "32"]
        decode_args = ["--unique", "6", "--batch", "3", "--rounds", "1"]
        dali_args = ["--backbone", "tiny", "--size", "64", "--num-val", "16", "--batch", "8"]
        pipe_args = [
            "--num-images",
            "48",
            "--unique",
            "6",
            "--batch-size",
            "8",
            "--synthetic-images",
            "8",
            "--warmup",
            "1",
        ]
        tput_args = [
            "--backbone",
            "tiny",
            "--method",
            "cam",
            "--synthetic-size",
            "64",
            "--num-train",
            "48",
            "--batch-size",
            "8",
        ]
        job_args = [
            "--backbone",
            "tiny",
            "--method",
            "cam",
            "--epochs",
            "1",
            "--num-workers",
            "1",
            "--batch-size",
            "8",
            "--set",
            "data.synthetic.size=64",
            "--set",
            "data.synthetic.num_train=32",
            "--set",
            "data.synthetic.num_val=16",
            "--set",
            "data.synthetic.num_test=16",
            "--set",
            "data.synthetic.classes=4",
        ]
    else:
        step_args = [
            "--backbones",
            "resnet50,vgg16,inception_v3",
            "--batches",
            "64,128",
            "--steps",
            "10",
            "--warmup",
            "3",
        ]
        compiled = ["--backbones", "resnet50", "--batches", "128", "--compiled-methods", "cam,fmcg,icl,caml,c2am"]
        eval_args = ["--num-maps", "50000", "--fast-only"]
        decode_args = []
        dali_args = ["--num-val", "512"]
        pipe_args = ["--num-images", "4096", "--unique", "256", "--batch-size", "256", "--synthetic-images", "200"]
        tput_args = [
            "--backbone",
            "resnet50",
            "--method",
            "cam,fmcg",
            "--synthetic-size",
            "256",
            "--num-train",
            "2048",
            "--batch-size",
            "128",
        ]
        job_args = [
            "--backbone",
            "resnet50",
            "--method",
            "fmcg",
            "--epochs",
            "1",
            "--num-workers",
            "1",
            "--batch-size",
            "64",
            "--cpus-per-worker",
            threads,
            "--set",
            "data.synthetic.size=256",
            "--set",
            "data.synthetic.num_train=2048",
            "--set",
            "data.synthetic.num_val=256",
            "--set",
            "data.synthetic.num_test=256",
            "--use-gpu",
        ]
    gpu_tests = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()
    )
    return [
        Step(
            1,
            "train_step_eager",
            [
                f"{bench}/gpu/train_step.py",
                "--device",
                dev,
                "--modes",
                "eager",
                *step_args,
                "--out",
                "{json}",
                "--deadline",
                "{deadline}",
            ],
            170,
            TIER1_HIDDEN,
        ),
        Step(
            1,
            "evaluator_50k_maps",
            [f"{bench}/eval_speed.py", "--device", dev, *eval_args, "--out", "{json}"],
            60,
            TIER1_HIDDEN,
        ),
        Step(
            1,
            "decode_anchor",
            [f"{bench}/gpu/decode_anchor.py", "--device", dev, *decode_args, "--out", "{json}"],
            40,
            TIER1_HIDDEN,
        ),
        Step(
            2,
            "dali_vs_exact",
            [f"{bench}/gpu/dali_check.py", "--device", dev, "--threads", threads, *dali_args, "--out", "{json}"],
            60,
            TIER23_HIDDEN,
            needs=("nvidia.dali", "webdataset"),
        ),
        Step(
            2,
            "input_pipeline",
            [
                f"{bench}/input_pipeline.py",
                "--device",
                dev,
                "--threads",
                threads,
                *pipe_args,
                "--workdir",
                "{tmp}",
                "--out",
                "{json}",
            ],
            60,
            TIER23_HIDDEN,
            needs=("nvidia.dali", "webdataset"),
        ),
        Step(
            2,
            "train_throughput",
            [
                f"{bench}/train_throughput.py",
                "--device",
                dev,
                "--threads",
                threads,
                *tput_args,
                "--set",
                "data.decode=device",
                "--out",
                "{json}",
            ],
            90,
            TIER23_HIDDEN,
            needs=("nvidia.dali", "webdataset"),
        ),
        Step(
            3,
            "pytest_gpu",
            ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", "{tmp}/junit.xml", *gpu_tests],
            60,
            TIER23_HIDDEN,
            needs=("webdataset",),
        ),
        Step(
            4,
            "train_job",
            [
                "jobs/train_imagenet.py",
                *job_args,
                "--name",
                "gpu-check",
                "--storage-path",
                "{tmp}/ray",
                "--tracking-uri",
                "sqlite:///{tmp}/mlflow.db",
                "--experiment",
                "gpu-check",
            ],
            120,
            needs=("ray", "mlflow", "nvidia.dali", "webdataset"),
        ),
        Step(
            1,
            "train_step_compiled",
            [
                f"{bench}/gpu/train_step.py",
                "--device",
                dev,
                "--modes",
                "compiled",
                *step_args,
                *compiled,
                "--out",
                "{json}",
                "--deadline",
                "{deadline}",
            ],
            150,
            TIER1_HIDDEN,
        ),
    ]


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _junit_counts(path: Path) -> dict | None:
    if not path.exists():
        return None
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else None


def summarize(steps: dict) -> dict:
    """The figures the issues ask for, read off the steps' results (absent where a step did not run)."""
    out: dict = {}

    def result(name: str) -> dict:
        r = steps.get(name, {}).get("result")
        return r if isinstance(r, dict) else {}

    rows = result("train_step_eager").get("rows", []) + result("train_step_compiled").get("rows", [])
    for r in rows:
        if "images_per_s" in r:
            key = f"{r['mode']}/{r['backbone']}/b{r['batch']}/{r['method']}"
            out.setdefault("train_step_img_s", {})[key] = round(r["images_per_s"], 1)
            if r.get("host_syncs_per_step") is not None:
                out.setdefault("host_syncs_per_step", {})[key] = r["host_syncs_per_step"]
            if "ratio_to_cam" in r:
                out.setdefault("ratio_to_cam", {})[key] = round(r["ratio_to_cam"], 3)
    anchors = result("train_step_eager").get("resnet50_cam_over_anchor")
    if anchors:
        out["resnet50_cam_over_anchors"] = anchors
    ev = result("evaluator_50k_maps")
    if ev:
        out["evaluator"] = {
            "maps": ev.get("num_maps"),
            "thresholds": ev.get("num_thresholds"),
            "seconds": ev.get("end_to_end", {}).get("seconds"),
            "under_10_s": (ev.get("end_to_end", {}).get("seconds") or 1e9) < 10,
        }
    dec = result("decode_anchor")
    if dec:
        out["decode_img_s"] = {k: round(v, 1) for k, v in dec.items() if k.endswith("images_per_s")}
    paths = result("dali_vs_exact").get("paths")
    if paths:
        out["inputs_vs_exact"] = {
            n: {
                k: v
                for k, v in p.items()
                if k in ("backend", "pixel_max_diff", "map_mean_diff", "maxboxacc_v2_diff_points", "error")
            }
            for n, p in paths.items()
        }
    if steps.get("pytest_gpu", {}).get("tests"):
        out["gpu_tests"] = steps["pytest_gpu"]["tests"]
    return out


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.budget
    cores = os.cpu_count() or 1
    steps = plan(args.dry_run, cores)
    wanted_tiers = {int(t) for t in args.tiers.split(",") if t}
    report: dict = {
        "check": "gpu",
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "python": sys.executable,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
        "steps": {},
    }
    try:
        import torch

        report["torch"] = torch.__version__
        report["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:
        report["torch"] = f"not importable: {exc}"
    log = open(out / "gpu_check.log", "a")

    def save() -> None:
        report["elapsed_s"] = round(time.time() - started, 1)
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out / "gpu_check.json")

    save()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    )
    if args.dry_run:
        env.setdefault("XDG_CACHE_HOME", str(work / "cache"))
    for step in steps:
        record: dict = {"tier": step.tier}
        report["steps"][step.name] = record
        left = deadline - time.time()
        missing = [n for n in step.needs if not _importable(n)]
        if step.tier not in wanted_tiers:
            record["status"] = "not asked for"
        elif missing:
            record["status"] = (
                f"skipped: {', '.join(missing)} not installed (carry its bundle: benchmarks/gpu/carry.md)"
            )
        elif left < 15:
            record["status"] = "skipped: time budget spent"
        else:
            step_dir = work / step.name
            step_dir.mkdir()
            json_path = step_dir / "result.json"
            limit = min(step.cap_s * (args.cap_scale or 1.0), left - 5)
            argv = [
                a.replace("{json}", str(json_path))
                .replace("{tmp}", str(step_dir))
                .replace("{deadline}", str(time.time() + limit - 5))
                for a in step.argv
            ]
            prefix = [str(HERE / "_hide.py"), step.hidden] if step.hidden else []
            cmd = [args.python, *prefix, *argv]
            log.write(f"\n===== tier {step.tier} {step.name} (limit {limit:.0f} s): {' '.join(cmd)}\n")
            log.flush()
            t0 = time.time()
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=limit,
                    start_new_session=True,
                )
                rc, output = proc.returncode, proc.stdout
                record["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired as exc:
                rc = None
                output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                record["status"] = f"stopped at its {limit:.0f} s limit"
            record["seconds"] = round(time.time() - t0, 1)
            record["exit"] = rc
            log.write(output)
            log.flush()
            record["tail"] = output.strip().splitlines()[-6:]
            if json_path.exists():
                try:
                    record["result"] = json.loads(json_path.read_text())
                except json.JSONDecodeError:
                    record["result"] = "unreadable (cut while written)"
            if step.name == "pytest_gpu":
                record["tests"] = _junit_counts(step_dir / "junit.xml")
        report["summary"] = summarize(report["steps"])
        print(
            f"tier {step.tier} {step.name:>20}: {record['status']}"
            + (f" ({record['seconds']} s)" if "seconds" in record else ""),
            flush=True,
        )
        save()
    shutil.rmtree(work, ignore_errors=True)
    report["finished"] = True
    save()
    log.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for every step together")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same code paths short of CUDA")
    parser.add_argument("--tiers", default="1,2,3,4")
    parser.add_argument("--cap-scale", type=float, default=0.0, help="multiply every step's cap (default 1)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    report = run(args)
    failed = [n for n, r in report["steps"].items() if str(r.get("status", "")).startswith(("failed", "stopped"))]
    return 1 if failed and args.dry_run else 0


if __name__ == "__main__":
    sys.exit(main())
