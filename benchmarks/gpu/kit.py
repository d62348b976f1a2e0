"""The wheel bundles of the GPU check: their plan, and their assembly on the GPU machine.

Here (``prepare.sh`` calls these)::

    python benchmarks/gpu/kit.py versions base          # NAME==VERSION per line, from uv.lock
    python benchmarks/gpu/kit.py prune .gpukit/stage/base   # drop extensions built for other Pythons
    python benchmarks/gpu/kit.py plan                   # .gpukit/plan.json from the parts; prints the calls
    python benchmarks/gpu/kit.py rehearse [--record]    # stash + install every part as the GPU machine will, timed

On the GPU machine (``carry.md`` gives the exact calls)::

    python3 benchmarks/gpu/kit.py stash .gpukit/parts/base.00    # one carried part, checked, kept in /tmp/gpukit
    python3 benchmarks/gpu/kit.py install                        # joins, checks, unpacks; writes /tmp/gpukit/env.sh

A bundle is an xz-compressed tar of a ``pip install --target`` tree (Python 3.12, manylinux
x86_64), cut into parts of at most 60 MiB, so that a part and the repository fit in one 64 MiB
transfer. Every part and every bundle carries its SHA-256 in ``plan.json``: a part that arrives
damaged is refused at once, by name, and a bundle is unpacked only whole. Stashing copies, so a
repeated call (a retried transfer) does no harm. Standard library only: it runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / ".gpukit"
STORE = Path(os.environ.get("GPUKIT_STORE", "/tmp/gpukit"))
PART_BYTES = 60 * 2**20  # 60 MiB: a part plus the repository stays under the 64 MiB per transfer
TRANSFER_LIMIT = 64 * 2**20
GROUPS = ("base", "tier4")


class KitError(RuntimeError):
    """A wrong or missing part, bundle or plan: said with what and where."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_names(path: Path = Path(__file__).with_name("wheels.txt")) -> dict[str, list[str]]:
    """The packages of each bundle, from ``wheels.txt`` (``GROUP NAME`` per line)."""
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in GROUPS:
            raise KitError(f"{path}:{number}: expected 'GROUP NAME' with GROUP one of {GROUPS}, got {line!r}")
        out[parts[0]].append(parts[1])
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions(names: list[str], lock: Path = REPO / "uv.lock") -> dict[str, str]:
    """Each name's version in ``uv.lock`` (the releases this project is tested with)."""
    import tomllib

    packages = {_norm(p["name"]): p["version"] for p in tomllib.loads(lock.read_text())["package"] if "version" in p}
    missing = [n for n in names if _norm(n) not in packages]
    if missing:
        raise KitError(f"{lock}: no locked version of {missing}; add them to the project or drop them from wheels.txt")
    return {n: packages[_norm(n)] for n in names}


# -- here: the plan ----------------------------------------------------------------------------


def repo_transfer_bytes() -> int:
    """What travels with every call besides the part: tracked and untracked, not ignored files."""
    import subprocess

    names = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def write_plan(kit: Path = KIT) -> dict:
    """``plan.json`` from the bundles and parts ``prepare.sh`` made, and the calls they need."""
    repo_bytes = repo_transfer_bytes()
    plan: dict = {"part_bytes_max": PART_BYTES, "repo_bytes": repo_bytes, "bundles": {}}
    for group in GROUPS:
        bundle = kit / f"{group}.tar.xz"
        if not bundle.exists():
            continue
        parts = sorted((kit / "parts").glob(f"{group}.[0-9][0-9]"))
        if not parts:
            raise KitError(f"{bundle} has no parts under {kit / 'parts'}: run prepare.sh")
        if sum(p.stat().st_size for p in parts) != bundle.stat().st_size:
            raise KitError(f"the parts of {bundle} do not add up to it: run prepare.sh again")
        for p in parts:
            if p.stat().st_size + repo_bytes > TRANSFER_LIMIT:
                raise KitError(
                    f"{p} ({p.stat().st_size} bytes) and the repository ({repo_bytes} bytes) exceed one 64 MiB transfer"
                )
        stage = kit / "stage" / group
        wrong_abi = (
            sorted(str(f.relative_to(stage)) for f in stage.rglob("*.cpython-*.so") if "cpython-312-" not in f.name)
            if stage.exists()
            else []
        )
        if wrong_abi:
            raise KitError(
                f"{group}: extensions for another Python than the GPU machine's 3.12 remain: {wrong_abi[:3]}"
            )
        versions_file = kit / f"{group}.versions"
        plan["bundles"][group] = {
            "bytes": bundle.stat().st_size,
            "sha256": sha256(bundle),
            "unpacked_bytes": sum(f.stat().st_size for f in (kit / "stage" / group).rglob("*") if f.is_file())
            if (kit / "stage" / group).exists()
            else None,
            "packages": versions_file.read_text().split() if versions_file.exists() else [],
            "parts": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in parts],
        }
    if not plan["bundles"]:
        raise KitError(f"no bundle under {kit}: run benchmarks/gpu/prepare.sh first")
    (kit / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def describe(plan: dict) -> str:
    lines = []
    calls = 0
    for group, bundle in plan["bundles"].items():
        sizes = ", ".join(f"{p['name']} {p['bytes'] / 2**20:.1f} MiB" for p in bundle["parts"])
        lines.append(
            f"{group}: {len(bundle['packages'])} packages, {bundle['bytes'] / 2**20:.1f} MiB compressed "
            f"in {len(bundle['parts'])} parts ({sizes})"
        )
        calls += len(bundle["parts"])
    lines.append(f"repository per call: {plan['repo_bytes'] / 2**20:.2f} MiB")
    lines.append(
        f"calls: {calls} carrying parts (the last one also installs), then 1 measuring: {calls + 1} in all; "
        f"without tier4: {len(plan['bundles'].get('base', {}).get('parts', [])) + 1}"
    )
    return "\n".join(lines)


def prune_other_pythons(stage: Path) -> int:
    """Delete the extension modules built for other Pythons than 3.12 (DALI and nvImageCodec ship
    one per version in a single wheel: 73 MB the GPU machine never loads). Refuses when a module
    has no 3.12 build. Returns the bytes removed."""
    variants: dict[tuple[Path, str], list[Path]] = {}
    for f in stage.rglob("*.cpython-*.so"):
        variants.setdefault((f.parent, f.name.split(".cpython-")[0]), []).append(f)
    removed = 0
    for (folder, stem), files in sorted(variants.items()):
        if not any("cpython-312-" in f.name for f in files):
            raise KitError(f"{folder / stem}: no build for CPython 3.12 among {[f.name for f in files]}")
        for f in files:
            if "cpython-312-" not in f.name:
                removed += f.stat().st_size
                f.unlink()
    return removed


# -- there: stash and install ------------------------------------------------------------------


def _load_plan(kit: Path) -> dict:
    path = kit / "plan.json"
    if not path.exists():
        raise KitError(f"{path} is missing: carry .gpukit/plan.json with the parts")
    return json.loads(path.read_text())


def stash(part: Path, kit: Path = KIT, store: Path = STORE) -> Path:
    """Check one carried part against the plan and keep it on the machine for ``install``."""
    plan = _load_plan(kit)
    entry = next((p for b in plan["bundles"].values() for p in b["parts"] if p["name"] == part.name), None)
    if entry is None:
        raise KitError(f"{part.name} is not a part of this plan ({kit / 'plan.json'})")
    if not part.exists():
        raise KitError(f"{part} did not arrive: name it in the call's carry")
    if part.stat().st_size != entry["bytes"] or sha256(part) != entry["sha256"]:
        raise KitError(
            f"{part} arrived damaged ({part.stat().st_size} bytes, {entry['bytes']} expected, or a SHA-256 "
            "mismatch): carry it again"
        )
    (store / "parts").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(part, store / "parts" / part.name)
    (store / "plan.json").write_text(json.dumps(plan))
    return store / "parts" / part.name


def install(store: Path = STORE, groups: tuple[str, ...] | None = None) -> dict:
    """Join each bundle whose parts are all stashed, check it, unpack it to ``store/site``, and
    write ``store/env.sh`` (``PYTHONPATH``). A bundle with missing parts is named and left out."""
    plan = json.loads((store / "plan.json").read_text()) if (store / "plan.json").exists() else None
    if plan is None:
        raise KitError(f"nothing stashed in {store}: run 'kit.py stash PART' for each carried part first")
    site = store / "site"
    site.mkdir(parents=True, exist_ok=True)
    report: dict = {"installed": [], "incomplete": {}, "seconds": {}}
    for group, bundle in plan["bundles"].items():
        if groups and group not in groups:
            continue
        missing = [p["name"] for p in bundle["parts"] if not (store / "parts" / p["name"]).exists()]
        if missing:
            report["incomplete"][group] = missing
            continue
        if (store / f"{group}.installed").exists():
            report["installed"].append(group)
            continue
        start = time.perf_counter()
        joined = store / f"{group}.tar.xz"
        with open(joined, "wb") as out:
            for p in bundle["parts"]:
                with open(store / "parts" / p["name"], "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if sha256(joined) != bundle["sha256"]:
            raise KitError(f"{joined}: the joined parts do not match the plan's SHA-256; stash the parts again")
        with lzma.open(joined) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
            tar.extractall(site, filter="data")
        joined.unlink()
        (store / f"{group}.installed").write_text("\n".join(bundle["packages"]) + "\n")
        report["installed"].append(group)
        report["seconds"][group] = round(time.perf_counter() - start, 2)
    (store / "env.sh").write_text(
        f'export PYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}"\nexport PATH="{site}/bin:$PATH"\n'
    )
    return report


def rehearse(kit: Path = KIT, record: bool = False) -> dict:
    """Run the machine's side here, timed: stash each part (as the part calls do), then install."""
    import tempfile

    plan = _load_plan(kit)
    timings: dict = {"stash_s": {}, "install": None}
    with tempfile.TemporaryDirectory(prefix="gpukit-rehearsal-") as tmp:
        store = Path(tmp)
        for bundle in plan["bundles"].values():
            for p in bundle["parts"]:
                start = time.perf_counter()
                stash(kit / "parts" / p["name"], kit, store)
                timings["stash_s"][p["name"]] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        timings["install"] = install(store)
        timings["install_s"] = round(time.perf_counter() - start, 2)
    timings["load_average"] = os.getloadavg()
    (kit / "rehearsal.json").write_text(json.dumps(timings, indent=2) + "\n")
    if record:  # the plan's measured sizes and this rehearsal, for BENCHMARKS.md
        sys.path.insert(0, str(REPO))
        from benchmarks._common import machine_info, write_result

        bundles = {
            g: {
                "packages": b["packages"],
                "compressed_mib": round(b["bytes"] / 2**20, 1),
                "unpacked_mib": round((b["unpacked_bytes"] or 0) / 2**20, 1),
                "parts_mib": [round(p["bytes"] / 2**20, 1) for p in b["parts"]],
            }
            for g, b in plan["bundles"].items()
        }
        parts = sum(len(b["parts"]) for b in plan["bundles"].values())
        write_result(
            "gpu_kit",
            {
                "benchmark": "gpu_kit",
                "machine": machine_info("cpu"),
                "bundles": bundles,
                "repo_mib": round(plan["repo_bytes"] / 2**20, 2),
                "calls": {
                    "all_tiers": parts + 1,
                    "without_tier4": len(plan["bundles"]["base"]["parts"]) + 1,
                    "tier1_only": 1,
                },
                "rehearsal": timings,
            },
        )
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions").add_argument("group", choices=GROUPS)
    sub.add_parser("plan")
    sub.add_parser("prune").add_argument("stage", type=Path)
    sub.add_parser("rehearse").add_argument(
        "--record", action="store_true", help="also write benchmarks/results/gpu_kit.json"
    )
    sub.add_parser("stash").add_argument("parts", nargs="+", type=Path)
    inst = sub.add_parser("install")
    inst.add_argument("--only", default="", help="comma-separated bundles (default: every complete one)")
    args = parser.parse_args(argv)
    try:
        if args.command == "versions":
            versions = lock_versions(wheel_names()[args.group])
            print("\n".join(f"{n}=={v}" for n, v in versions.items()))
        elif args.command == "prune":
            print(
                f"pruned {prune_other_pythons(args.stage) / 2**20:.1f} MiB of extensions for other Pythons from {args.stage}"
            )
        elif args.command == "plan":
            print(describe(write_plan()))
        elif args.command == "rehearse":
            t = rehearse(record=args.record)
            print(f"stash per part: {t['stash_s']}; install {t['install_s']} s; load {t['load_average'][0]:.1f}")
        elif args.command == "stash":
            for part in args.parts:
                print(f"stashed {stash(part)}")
        elif args.command == "install":
            report = install(groups=tuple(g for g in args.only.split(",") if g) or None)
            print(json.dumps(report))
            if not report["installed"]:
                return 1
    except KitError as err:
        print(f"kit: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
