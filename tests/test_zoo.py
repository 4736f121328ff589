"""Users' models and weights: torchvision and timm models by name, zoo state_dicts from files, layer listings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kdsearch.checkpoints import load_checkpoint, load_weights
from kdsearch.config import TEACHER_PRESETS
from kdsearch.errors import ConfigError, UserError
from kdsearch.models import build_model, count_parameters
from tests.helpers import run_cli

TV = "torchvision.models:"
SLICE_RUN = ["--dataset", "imagefolder", "--val-size", "50", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]


def zoo(name: str, num_classes: int = 10, in_channels: int = 3) -> torch.nn.Module:
    return build_model(name, num_classes=num_classes, in_channels=in_channels, image_size=(32, 32))


@pytest.mark.parametrize(
    ("name", "params"),
    [(f"{TV}resnet18", 11_181_642), (f"{TV}mobilenet_v3_small", 1_528_106), ("timm:resnet18", 11_181_642)],
)
def test_zoo_models_are_built_for_the_datasets_classes(name: str, params: int) -> None:
    model = zoo(name)
    assert count_parameters(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_zoo_models_take_the_datasets_channel_count_each_zoos_way() -> None:
    gray = zoo(f"{TV}resnet18", num_classes=7, in_channels=1)
    assert gray.conv1.in_channels == 1 and gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)  # type: ignore[union-attr]
    timm_gray = zoo("timm:resnet18", num_classes=7, in_channels=1)
    assert timm_gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (f"{TV}resnet1800", "torchvision has no classification model 'resnet1800'"),
        ("timm:no_such_net", "timm has no model 'no_such_net'"),
    ],
)
def test_unknown_zoo_models_are_one_user_error(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        zoo(name)
    with pytest.raises(ConfigError, match="width must stay 1"):
        build_model(f"{TV}resnet18", num_classes=10, in_channels=3, image_size=(32, 32), width=0.5)


def test_timm_not_installed_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'kdsearch\[timm\]'"):
        zoo("timm:resnet18")


def test_zoo_state_dicts_load_from_pth_nested_and_safetensors_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = zoo(f"{TV}resnet18")
    state = trained.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "nested.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "weights.safetensors")
    for name in ("plain.pth", "nested.pt", "weights.safetensors"):
        model = zoo(f"{TV}resnet18")
        load_weights(model, load_checkpoint(tmp_path / name), source=name, model_name="resnet18")
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values(), strict=True)), name
    imagenet_head = zoo(f"{TV}resnet18", num_classes=1000)
    torch.save(imagenet_head.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match=r"its head \(fc.weight\) has 1000 outputs and this dataset 10 classes"):
        load_weights(zoo(f"{TV}resnet18"), load_checkpoint(tmp_path / "imagenet.pth"), source="x", model_name="r")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UserError, match=r"junk\.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_layers_lists_every_tappable_layer_with_its_shape(
    cifar_slice: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        ["layers", "--model", f"{TV}resnet18", "--dataset", "imagefolder", "--data-dir", cifar_slice, "--json"], capsys
    )
    assert code == 0, err
    listed = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    assert listed["layer4"]["shape"] == [512, 1, 1] and listed["layer3"]["shape"] == [256, 2, 2]
    assert listed["fc"]["kind"] == "Linear" and listed["fc"]["shape"] == [10]
    code, out, _ = run_cli(
        ["layers", "--model", "lightnn", "--dataset", "imagefolder", "--data-dir", cifar_slice], capsys
    )
    assert code == 0 and "features.5" in out and "16x8x8" in out and "267,738 parameters" in out
    code, _, err = run_cli(
        ["layers", "--model", "timm:nope", "--dataset", "imagefolder", "--data-dir", cifar_slice], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "timm has no model 'nope'" in err


def _teacher_file(tmp_path: Path, name: str, suffix: str) -> Path:
    """A zoo teacher's plain state_dict, as a user's fine-tuning script would save it."""
    torch.manual_seed(0)
    state = zoo(name).state_dict()
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("teacher", "student", "teacher_layer", "student_layer", "suffix"),
    [
        (f"{TV}resnet18", f"{TV}mobilenet_v3_small", "layer4", "features", ".pth"),
        ("timm:resnet18", "timm:mobilenetv3_small_050", "layer4", "conv_head", ".safetensors"),
    ],
)
@pytest.mark.parametrize("method", ["kd", "cosine"])
def test_a_zoo_teacher_distils_into_a_zoo_student(
    method: str,
    teacher: str,
    student: str,
    teacher_layer: str,
    student_layer: str,
    suffix: str,
    cifar_slice: Path,
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _teacher_file(tmp_path, teacher, suffix)
    args = ["train", "--method", method, "--data-dir", cifar_slice, *SLICE_RUN, "--teacher", path]
    args += ["--teacher-model", teacher, "--student-model", student, "--json", "-q"]
    args += ["--teacher-layer", teacher_layer, "--student-layer", student_layer]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["params"] == count_parameters(zoo(student)) and 0 <= result["test_accuracy"] <= 100
    assert result["teacher_sha256"] is not None and result["config"]["models"]["student_model"] == student


@pytest.mark.slow
def test_student_init_starts_the_student_from_weights_and_refuses_a_misfit_before_any_work(
    pattern_folder: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lightnn = build_model("lightnn", num_classes=10, in_channels=3, image_size=(32, 32))
    torch.save(lightnn.state_dict(), tmp_path / "start.pth")
    run = ["train", "--method", "ce", "--dataset", "imagefolder", "--data-dir", pattern_folder, "--epochs", "1"]
    run += ["--val-size", "50"]
    code, out, err = run_cli([*run, "--student-init", tmp_path / "start.pth", "--json", "-q"], capsys)
    assert code == 0, err
    assert json.loads(out)["config"]["models"]["student_init"] == str(tmp_path / "start.pth")
    torch.save(zoo(f"{TV}resnet18").state_dict(), tmp_path / "other.pth")
    code, _, err = run_cli([*run, "--method", "kd", "--student-init", tmp_path / "other.pth", "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not fit model lightnn" in err
    assert not (home / "teachers").exists()  # refused before the default teacher was trained


@pytest.mark.slow
def test_a_quick_run_trains_a_teacher_on_its_own_rows_named_for_them(
    pattern_folder: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The naming and the announcement are the point, not the teacher's skill: one epoch of its recipe.
    monkeypatch.setitem(TEACHER_PRESETS, "tutorial", TEACHER_PRESETS["tutorial"] | {"epochs": 1})
    run = ["train", "--method", "kd", "--dataset", "imagefolder", "--data-dir", pattern_folder, "--val-size", "50"]
    code, _, err = run_cli([*run, "--limit-train", "60", "--epochs", "1", "--teacher-preset", "tutorial"], capsys)
    assert code == 0, err
    (teacher,) = (home / "teachers").glob("*.pt")
    assert teacher.name.endswith("-val50-limit60.pt") and "training one, once, on 60 images" in err
    assert load_checkpoint(teacher).metadata["train_images"] == 60
    assert json.loads(run_cli([*run, "--limit-train", "60", "--epochs", "1", "--teacher-preset", "tutorial",
                               "--json", "-q"], capsys)[1])["teacher"] == str(teacher)  # fmt: skip


def test_a_pretrained_student_with_another_head_keeps_its_body_and_learns_a_new_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    imagenet = zoo(f"{TV}mobilenet_v3_small", num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "imagenet.pth")
    student = zoo(f"{TV}mobilenet_v3_small")
    fresh_head = student.classifier[3].weight.detach().clone()  # type: ignore[index]
    checkpoint = load_checkpoint(tmp_path / "imagenet.pth")
    for _ in range(2):
        load_weights(student, checkpoint, source="imagenet.pth", model_name="m", new_head=True)
    assert torch.equal(student.features[0][0].weight, imagenet.features[0][0].weight)  # type: ignore[index]
    assert torch.equal(student.classifier[3].weight, fresh_head)  # type: ignore[index]
    assert capsys.readouterr().err.count("has 1000 outputs; a new one learns 10") == 1  # once per process
