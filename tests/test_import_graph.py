"""The package's import graph (benchmarks/module_graph.py builds it): no circles, a core that
knows nothing of Ray or MLflow, every import pointing down the layers of ARCHITECTURE.md, and
one file that builds Ray Train's TorchTrainer."""

from __future__ import annotations

from benchmarks.module_graph import CORE, PACKAGE, circles, import_graph, layer_of, up_arrows


def test_the_package_has_no_import_circles():
    inside, _ = import_graph()
    assert circles(inside) == []


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_core_imports_no_ray_no_mlflow_and_nothing_above_it():
    inside, outside = import_graph()
    for module in inside:
        if module.startswith(CORE):
            assert not outside[module] & {"ray", "mlflow"}, (module, outside[module])
            above = {
                t
                for t in inside[module]
                if t.startswith(("wsol_core.train", "wsol_core.experiments", "wsol_core.commands"))
            }
            assert not above, (module, above)


def test_every_import_points_down_the_layers():
    inside, _ = import_graph()
    for module in inside:  # every module has its place
        if module != "wsol_core":
            layer_of(module)
    assert up_arrows(inside) == []


def test_the_layer_check_finds_an_up_arrow():
    assert up_arrows({"wsol_core.train.loop": {"wsol_core.experiments.trials", "wsol_core.config"}}) == [
        ("wsol_core.train.loop", "wsol_core.experiments.trials")
    ]


def test_ray_train_is_built_in_one_place():
    """``TorchTrainer`` is constructed only by wsol_core.train.trainer."""
    builders = sorted(
        str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "TorchTrainer(" in p.read_text()
    )
    assert builders == ["wsol_core/train/trainer.py"]


def test_what_the_driver_and_ray_trains_controller_load_leaves_torchvision_out():
    """The job's driver imports the trainer, and Ray Train's controller unpickles the run's
    ``Config`` (it travels in the trainer's ``train_loop_config``); neither builds a backbone, so
    neither may import torchvision, which imports ``torch._dynamo`` (BENCHMARKS.md, "What a process
    start costs"). Building a protocol backbone still finds it."""
    import subprocess
    import sys

    probe = """
import pickle, sys
import wsol_core.train.driver, wsol_core.train.trainer
from wsol_core.config import Config
config = pickle.loads(pickle.dumps(Config()))
print(sorted(m for m in ("torchvision", "torch._dynamo") if m in sys.modules))
from wsol_core.models import VGG16, build_backbone
build_backbone("resnet50")
print(VGG16.__module__, "torchvision" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["[]", "wsol_core.models.vgg True"], done.stdout
