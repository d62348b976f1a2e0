"""Released checkpoints of the field load into this project's methods.

``fixtures/released_layouts.json`` lists, for each reference model, its state dict's key names and
shapes as the reference code builds them (clovaai/wsolevaluation ``wsol/vgg.py``,
``wsol/resnet.py``, ``wsol/inception.py`` with ``architecture_type='cam'``, 200 classes; CCAM's
``WSOL/models/model.py``), recorded by running that code. The tests build state dicts in that
layout with random weights, save them the way the reference saves checkpoints, and load them with
``load_model`` (strict). That the loaded models compute the reference's logits and maps was
checked against the reference code itself (benchmarks/results/released_models_check.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wsol_core.models.released import ReleasedCheckpointError, convert_released
from wsol_core.train.offline_eval import load_model

LAYOUTS = json.loads((Path(__file__).parent / "fixtures" / "released_layouts.json").read_text())


def reference_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in LAYOUTS[name].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


def save(tmp_path: Path, state: dict, name: str = "last_checkpoint.pth.tar", **extra) -> Path:
    path = tmp_path / name
    torch.save({"state_dict": state, **extra}, path)
    return path


@pytest.mark.parametrize(
    "name, backbone, large, overrides",
    [
        ("wsolevaluation_vgg16_14x14", "vgg16", False, []),
        ("wsolevaluation_vgg16_28x28", "vgg16", True, []),
        ("wsolevaluation_resnet50_14x14", "resnet50", False, []),
        ("wsolevaluation_inception_v3_28x28", "inception_v3", True, ["model.large_feature_map=true"]),
    ],
)
def test_wsolevaluation_checkpoint_loads_every_tensor_where_it_belongs(tmp_path, name, backbone, large, overrides):
    state = reference_state(name)
    loaded = load_model(str(save(tmp_path, state, architecture=backbone, epoch=50)), overrides=overrides)
    assert loaded.source == "wsolevaluation" and loaded.loc_threshold is None
    assert loaded.cfg.method.name == "cam" and loaded.cfg.model.backbone == backbone
    assert loaded.cfg.model.large_feature_map is large
    ours = loaded.method.state_dict()
    # Every reference tensor is in the model, at its mapped name, unchanged.
    for key, value in state.items():
        if key.startswith("fc."):
            target = ours[f"head.{key}"]
        elif key == "SPG_A4.weight":
            target = ours["head.fc.weight"][:, :, None, None]
        elif key == "SPG_A4.bias":
            target = ours["head.fc.bias"]
        elif large and backbone == "vgg16" and key.split(".")[1] in ("23", "25", "27"):
            target = ours[f"backbone.features.{int(key.split('.')[1]) + 1}.{key.split('.', 2)[2]}"]
        else:
            target = ours[f"backbone.{key}"]
        assert torch.equal(target, value), key
    side = 28 if large else 14
    with torch.no_grad():
        out = loaded.method.inference(torch.randn(1, 3, 224, 224), torch.tensor([5]))
    assert out.maps.shape == (1, side, side) and out.logits.shape == (1, 200)


def test_vgg28_without_the_pool4_shift_would_not_load(tmp_path):
    """The 28x28 VGG keys must be shifted: read as the 14x14 layout they do not fit."""
    state = reference_state("wsolevaluation_vgg16_28x28")
    with pytest.raises(ReleasedCheckpointError, match="28x28 layout"):
        convert_released(save(tmp_path, state), large_feature_map=False)
    converted = convert_released(save(tmp_path, state)).state_dict
    assert "backbone.features.23.weight" not in converted and torch.equal(
        converted["backbone.features.24.weight"], state["features.23.weight"]
    )


@pytest.mark.parametrize("flag, orientation", [(False, 1.0), (True, -1.0)])
def test_ccam_checkpoint_loads_with_its_orientation(tmp_path, flag, orientation):
    state = reference_state("ccam_resnet50")
    path = save(
        tmp_path, {f"module.{k}": v for k, v in state.items()}, "current_epoch.pth", epoch=20, Threshold=0.4, Flag=flag
    )
    loaded = load_model(str(path))
    assert loaded.source == "ccam" and loaded.cfg.method.name == "c2am" and loaded.cfg.method.concat_stage == "layer3"
    ours = loaded.method.state_dict()
    assert torch.equal(ours["activation_head.weight"], state["ac_head.activation_head.weight"])
    assert torch.equal(ours["bn_head.running_var"], state["ac_head.bn_head.running_var"])
    assert torch.equal(ours["backbone.layer4.2.conv3.weight"], state["backbone.layer4.2.conv3.weight"])
    assert float(ours["orientation"]) == orientation and bool(ours["orientation_calibrated"])
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        raw = loaded.method.raw_maps(images)
        maps = loaded.method.inference(images).maps
    torch.testing.assert_close(maps, 1 - raw if flag else raw)


def test_unknown_or_damaged_files_get_a_clear_error(tmp_path):
    path = save(tmp_path, {"encoder.weight": torch.zeros(2, 2)}, "other.pth")
    with pytest.raises(ReleasedCheckpointError, match="not a released checkpoint"):
        load_model(str(path))
    truncated = tmp_path / "cut.pth.tar"
    truncated.write_bytes(save(tmp_path, reference_state("wsolevaluation_vgg16_14x14")).read_bytes()[:5000])
    with pytest.raises(ReleasedCheckpointError, match="cannot be read"):
        load_model(str(truncated))
    with pytest.raises(ReleasedCheckpointError, match="asked for the ccam layout"):
        convert_released(save(tmp_path, reference_state("wsolevaluation_resnet50_14x14")), layout="ccam")
