"""Mutation check of the loss terms: every mutant must be killed by a test.

    uv run python benchmarks/mutants.py                 # all mutants, one JSON + a table
    uv run python benchmarks/mutants.py --only caml-     # the mutants whose id starts with caml-

Each mutant is a small edit of the method code that a reader could make by mistake and that
would leave the code running: a loss term scaled to zero, a negative or positive taken from the
wrong branch or view, a schedule that no longer moves, a reading that kills a hinge. For every
mutant the package and the tests are copied to a scratch folder, the edit is applied there (the
working tree is never touched), and the mutant's tests run with ``pytest -x``. A mutant is
killed when a test fails; the report names the first test that killed it. Exit status 1 when any
mutant survives.

Writes ``benchmarks/results/mutants.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import payload_header, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOSS_TESTS = "tests/test_loss_terms.py"


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact text, replacement); each text occurs once
    tests: tuple[str, ...]
    what: str

    @property
    def select(self) -> str:
        """``pytest -k``: the tests of the mutant's method (its whole test file, its rows of the
        loss-term tests; FMCG's also the loop-level SRD test)."""
        method = self.id.split("-")[0]
        return f"{method} or srd" if method == "fmcg" else method


def _zero(term_line: str, lhs: str) -> tuple[str, str]:
    """Scale the term assigned on ``term_line`` to zero."""
    return term_line, term_line.replace(f"{lhs} = ", f"{lhs} = 0.0 * ", 1)


FMCG, ICL, CAML, C2AM, CAM, REGRESSOR = (
    f"wsol_core/methods/{m}.py" for m in ("fmcg", "icl", "caml", "c2am", "cam", "regressor")
)
COMPONENTS = "wsol_core/methods/components.py"
FMCG_EQ5 = "per_image = triplet_term(z_fg, zb_fg, z_bg, cg.margin) + triplet_term("  # eq. 5; its second term follows
ICL_CAL = "triplet_term(z[:, 2], z[:, 0], z[:, 1], self.cfg.cal.margin)"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "cam-cls-zero",
        CAM,
        (('return {"cls": F.cross_entropy(', 'return {"cls": 0.0 * F.cross_entropy('),),
        (LOSS_TESTS, "tests/test_methods_common.py"),
        "CAM's cross-entropy scaled to 0",
    ),
    Mutant(
        "fmcg-cg-zero",
        FMCG,
        (_zero('terms["cg"] = w.cg * self.cg_loss(outputs["z"], outputs["z_valid"])', 'terms["cg"]'),),
        (LOSS_TESTS, "tests/test_method_fmcg.py"),
        "eq. 5 (L_cg) scaled to 0",
    ),
    Mutant(
        "fmcg-cls-erased-zero",
        COMPONENTS,
        (('"cls_erased": w_erased * F.cross_entropy(', '"cls_erased": 0.0 * w_erased * F.cross_entropy('),),
        (LOSS_TESTS, "tests/test_method_fmcg.py"),
        "eq. 1's L_cls of the erased branch scaled to 0",
    ),
    Mutant(
        "fmcg-cg-negative-from-erased-branch",
        FMCG,
        ((FMCG_EQ5, FMCG_EQ5.replace("triplet_term(z_fg, zb_fg, z_bg,", "triplet_term(z_fg, zb_fg, zb_bg,")),),
        (LOSS_TESTS, "tests/test_method_fmcg.py"),
        "eq. 5, first term: the negative is the erased branch's background",
    ),
    Mutant(
        "fmcg-cg-positive-from-own-branch",
        FMCG,
        ((FMCG_EQ5, FMCG_EQ5.replace("triplet_term(z_fg, zb_fg, z_bg,", "triplet_term(z_fg, z_fg, z_bg,")),),
        (LOSS_TESTS, "tests/test_method_fmcg.py"),
        "eq. 5, first term: the positive is the anchor's own branch",
    ),
    Mutant(
        "fmcg-srd-no-ramp",
        FMCG,
        (("return scheduled_theta(progress, srd.theta_drop, srd.schedule_fraction)", "return srd.theta_drop"),),
        (LOSS_TESTS, "tests/test_method_fmcg.py"),
        "Sec. 3.2's schedule frozen at theta_drop",
    ),
    Mutant(
        "fmcg-no-erasing",
        FMCG,
        (("erased = x * (1.0 - dropped).to(x.dtype)", "erased = x"),),
        (LOSS_TESTS, "tests/test_method_fmcg.py"),
        "SRD's mask computed but never applied",
    ),
    Mutant(
        "icl-cal-zero",
        ICL,
        (_zero('terms["cal"] = w.cal * self.cal_loss(outputs["z"], outputs["z_valid"])', 'terms["cal"]'),),
        (LOSS_TESTS, "tests/test_method_icl.py"),
        "the contrastive attention loss scaled to 0",
    ),
    Mutant(
        "icl-fcl-zero",
        ICL,
        (_zero('terms["fcl"] = w.fcl * self.fcl_loss(outputs)', 'terms["fcl"]'),),
        (LOSS_TESTS, "tests/test_method_icl.py"),
        "the foreground consistency loss scaled to 0",
    ),
    Mutant(
        "icl-cal-negative-from-erased-branch",
        ICL,
        ((ICL_CAL, ICL_CAL.replace("z[:, 1]", "z[:, 2]")),),
        (LOSS_TESTS, "tests/test_method_icl.py"),
        "the negative is the erased foreground",
    ),
    Mutant(
        "icl-cal-positive-is-background",
        ICL,
        ((ICL_CAL, ICL_CAL.replace("z[:, 0], z[:, 1]", "z[:, 1], z[:, 1]")),),
        (LOSS_TESTS, "tests/test_method_icl.py"),
        "the positive is the original background",
    ),
    Mutant(
        "caml-zero",
        CAML,
        (_zero('terms["caml"] = cfg.caml.weight * (first + second).sum() / m', 'terms["caml"]'),),
        (LOSS_TESTS, "tests/test_method_caml.py"),
        "eq. 4 (L_caml) scaled to 0",
    ),
    Mutant(
        "caml-cls-zero",
        CAML,
        (_zero('terms["cls"] = cfg.cls_weight * cls', 'terms["cls"]'),),
        (LOSS_TESTS, "tests/test_method_caml.py"),
        "eq. 6 (the pretext L_cls) scaled to 0",
    ),
    Mutant(
        "caml-negative-from-other-view",
        CAML,
        (('parts["n1"].append(ori_emb * ori_bg)', 'parts["n1"].append(trans_emb * trans_bg)'),),
        (LOSS_TESTS, "tests/test_method_caml.py"),
        "eq. 4, first triplet: the negative is the transformed view's background",
    ),
    Mutant(
        "caml-anchor-not-inverted",
        CAML,
        (('parts["a1"].append(invert_ops(trans_emb, ops))', 'parts["a1"].append(trans_emb)'),),
        (LOSS_TESTS, "tests/test_method_caml.py"),
        "eq. 4: A_trans2ori without T^-1",
    ),
    Mutant(
        "caml-literal-sigmoid-reading",
        CAML,
        (
            (
                'bg_rule: Literal["reverse_min", "map_min"] = "map_min"',
                'bg_rule: Literal["reverse_min", "map_min"] = "reverse_min"',
            ),
            (
                'map_activation: Literal["l2", "sigmoid", "none", "minmax"] = "l2"',
                'map_activation: Literal["l2", "sigmoid", "none", "minmax"] = "sigmoid"',
            ),
        ),
        (LOSS_TESTS,),
        "the earlier default reading (sigmoid maps, reverse-min rule): the hinge never fires",
    ),
    Mutant(
        "c2am-neg-zero",
        C2AM,
        (('terms["neg"] = cfg.neg_weight * negative_loss(', 'terms["neg"] = 0.0 * cfg.neg_weight * negative_loss('),),
        (LOSS_TESTS, "tests/test_method_c2am.py"),
        "eq. 2 scaled to 0",
    ),
    Mutant(
        "c2am-pos-zero",
        C2AM,
        (("terms[name] = weight * positive_loss(", "terms[name] = 0.0 * weight * positive_loss("),),
        (LOSS_TESTS, "tests/test_method_c2am.py"),
        "eqs. 7-8 scaled to 0",
    ),
    Mutant(
        "c2am-neg-pairs-fg-fg",
        C2AM,
        (("negative_loss(cosine_matrix(fg, bg, cfg.sim_eps))", "negative_loss(cosine_matrix(fg, fg, cfg.sim_eps))"),),
        (LOSS_TESTS, "tests/test_method_c2am.py"),
        "eq. 2 contrasts foregrounds with foregrounds",
    ),
    Mutant(
        "c2am-pos-bg-from-fg",
        C2AM,
        (('("pos_bg", cfg.pos_bg_weight, bg)', '("pos_bg", cfg.pos_bg_weight, fg)'),),
        (LOSS_TESTS, "tests/test_method_c2am.py"),
        "eq. 8 built from the foreground representations",
    ),
    Mutant(
        "c2am-official-head-10x",
        C2AM,
        (
            (
                '(probe if name.startswith("probe.") else encoder_and_head).append(param)',
                '(encoder_and_head if name.startswith("backbone.") else probe).append(param)',
            ),
        ),
        ("tests/test_method_c2am.py",),
        "the released groups read as intended, not as run: the activation head at 10x",
    ),
    Mutant(
        "c2am-pos-mean-over-n2",
        C2AM,
        (("return -terms.sum() / max(n * (n - 1), 1)", "return -terms.sum() / max(n * n, 1)"),),
        ("tests/test_method_c2am.py",),
        "eqs. 7-8 averaged over all n^2 entries with the diagonal weighted 0",
    ),
    Mutant(
        "regressor-box-zero",
        REGRESSOR,
        (('return {"box": self.cfg.loss_weight * ', 'return {"box": 0.0 * self.cfg.loss_weight * '),),
        (LOSS_TESTS, "tests/test_method_regressor.py"),
        "the regressor's box loss scaled to 0",
    ),
    Mutant(
        "regressor-target-from-gt",
        REGRESSOR,
        (("boxes_in_view(batch.pseudo_boxes.float(),", "boxes_in_view(batch.boxes[:, 0].float(),"),),
        (LOSS_TESTS, "tests/test_method_regressor.py"),
        "the regressor's target taken from the GT boxes instead of the pseudo boxes",
    ),
    Mutant(
        "regressor-ignores-the-crop",
        "wsol_core/data/batch.py",
        (
            (
                "    left, top, right, bottom, mirrored = views.unbind(1)\n",
                "    left, top, right, bottom, mirrored = views.unbind(1)\n    mirrored = mirrored * 0\n",
            ),
        ),
        (LOSS_TESTS, "tests/test_method_regressor.py"),
        "a mirrored crop's pseudo box left unmirrored",
    ),
)


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(
                f"mutant {mutant.id}: expected exactly one {old!r} in {mutant.file}, found {count} (update the mutant)"
            )
        text = text.replace(old, new)
    path.write_text(text)


def scratch_copy(dest: Path) -> None:
    for name in ("wsol_core", "tests", "benchmarks", "jobs", "tune", "cluster"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml",):
        shutil.copy2(ROOT / name, dest / name)


def run_tests(root: Path, tests: tuple[str, ...], select: str, timeout: float) -> tuple[bool, str, float]:
    """(killed, first failing test, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", "-k", select, *tests],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return (
        proc.returncode != 0,
        (failed[0] if failed else proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""),
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose id starts with this")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant's test run")
    parser.add_argument("--out", default="", help="JSON result (default: benchmarks/results/mutants.json)")
    args = parser.parse_args(argv)
    selected = [m for m in MUTANTS if m.id.startswith(args.only)]
    if not selected:
        print(f"error: no mutant id starts with {args.only!r}", file=sys.stderr)
        return 2
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wsol-mutants-") as tmp:
        base = Path(tmp) / "clean"
        scratch_copy(base)
        # The scratch copy must be what the tests import, not the installed package.
        probe = subprocess.run(
            [sys.executable, "-c", "import wsol_core; print(wsol_core.__file__)"],
            cwd=base,
            env={**os.environ, "PYTHONPATH": str(base)},
            capture_output=True,
            text=True,
            check=True,
        )
        if not probe.stdout.strip().startswith(str(base)):
            raise SystemExit(f"the tests would import {probe.stdout.strip()}, not the scratch copy")
        for mutant in selected:
            work = Path(tmp) / mutant.id
            shutil.copytree(base, work)
            apply(mutant, work)
            killed, by, seconds = run_tests(work, mutant.tests, mutant.select, args.timeout)
            rows.append(
                {
                    "id": mutant.id,
                    "what": mutant.what,
                    "file": mutant.file,
                    "killed": killed,
                    "killed_by": by if killed else "",
                    "tests": list(mutant.tests),
                    "select": mutant.select,
                    "seconds": round(seconds, 1),
                }
            )
            print(
                f"{'KILLED  ' if killed else 'SURVIVED'} {mutant.id:40s} {by if killed else ''} ({seconds:.0f} s)",
                flush=True,
            )
            shutil.rmtree(work)
    survived = [r["id"] for r in rows if not r["killed"]]
    payload = {
        **payload_header("mutants", argv, "cpu"),
        "mutants": rows,
        "killed": len(rows) - len(survived),
        "survived": survived,
        "wall_s": time.perf_counter() - start,
    }
    path = write_result("mutants", payload, args.out or None)
    print(f"[wsol] {len(rows) - len(survived)} of {len(rows)} mutants killed; wrote {path}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
