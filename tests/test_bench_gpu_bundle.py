"""bench/gpu_bundle.py offline: what pip is asked to resolve and download, the bundle prepare writes, and the
install on the device (a real, offline pip install of a wheel made here).

pip's resolution and downloads are replaced by fakes where they would reach PyPI: these tests need no network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # as the scripts see each other: bench/ is their sys.path[0]

import cli_runner  # noqa: E402 - after bench/ is importable
import gpu_bundle  # noqa: E402


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal, installable wheel: one module ``<name>_mod``."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}_mod.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for n, text in files.items():
            archive.writestr(n, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


def image_folder(root: Path, per_class: dict[str, dict[str, int]]) -> None:
    for split, classes in per_class.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (i, 0, 0)).save(folder / f"{i:04d}.jpg")


REPORT = {
    "install": [
        {"metadata": {"name": "optuna", "version": "5.1.0"}},
        {"metadata": {"name": "SQLAlchemy", "version": "2.1.9"}},
        {"metadata": {"name": "typing_extensions", "version": "4.16.0"}},  # the device has it
        {"metadata": {"name": "numpy", "version": "2.4.6"}},  # the device has it
        {"metadata": {"name": "Mako", "version": "1.4.3"}},
    ]
}


def test_needed_from_report_pins_what_the_device_lacks() -> None:
    assert gpu_bundle.needed_from_report(REPORT) == ["mako==1.4.3", "optuna==5.1.0", "sqlalchemy==2.1.9"]
    assert gpu_bundle.wheel_distribution("optuna_dashboard-0.21.0-py3-none-any.whl") == "optuna-dashboard"
    assert gpu_bundle.canonical("Typing.Extensions") == "typing-extensions"


def test_target_options_ask_for_the_device_platform_and_python() -> None:
    options = gpu_bundle.target_options("3.12")
    assert options[:5] == ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.12"]
    platforms = [options[i + 1] for i, word in enumerate(options) if word == "--platform"]
    assert "manylinux2014_x86_64" in platforms and "manylinux_2_28_x86_64" in platforms


def test_local_pins_are_the_versions_installed_here() -> None:
    import importlib.metadata

    pins = gpu_bundle.local_pins().splitlines()
    assert f"pytest=={importlib.metadata.version('pytest')}" in pins
    assert len(pins) == len({line.split("==")[0] for line in pins})  # one pin a distribution


class FakePip:
    """Stands in for cli_runner.run: records each pip command and answers as pip would."""

    def __init__(self, fail_with_pins: bool = False, wheels: Sequence[str] = ()) -> None:
        self.commands: list[list[str]] = []
        self.fail_with_pins, self.wheels = fail_with_pins, wheels

    def __call__(self, command: Sequence[str], env: object = None, timeout: object = None) -> cli_runner.Finished:
        command = list(command)
        self.commands.append(command)
        returncode, stdout = 0, ""
        if "--report" in command:
            if self.fail_with_pins and "-c" in command:
                returncode = 1
            stdout = json.dumps(REPORT)
        if "download" in command:
            dest = Path(command[command.index("-d") + 1])
            for name in self.wheels:
                (dest / name).write_bytes(b"wheel")
        return cli_runner.Finished(command, returncode, stdout, "ERROR: no version", 0.1, None, False)


def test_resolve_is_a_pip_dry_run_pinned_to_the_local_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    pip = FakePip()
    monkeypatch.setattr(cli_runner, "run", pip)
    assert gpu_bundle.resolve(("optuna", "cmaes"), "3.12", python="/py") == [
        "mako==1.4.3", "optuna==5.1.0", "sqlalchemy==2.1.9"
    ]  # fmt: skip
    (command,) = pip.commands
    assert command[:7] == ["/py", "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report"]
    assert command[command.index("--python-version") + 1] == "3.12" and "-c" in command
    assert command[-4:] == ["optuna", "cmaes", "-q", "--disable-pip-version-check"]


def test_resolve_takes_pips_newest_when_the_local_versions_do_not_resolve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pip = FakePip(fail_with_pins=True)
    monkeypatch.setattr(cli_runner, "run", pip)
    assert gpu_bundle.resolve(("optuna",), "3.10") == ["mako==1.4.3", "optuna==5.1.0", "sqlalchemy==2.1.9"]
    assert ["-c" in command for command in pip.commands] == [True, False]
    assert "taking pip's newest" in capsys.readouterr().out


def test_download_fetches_exactly_the_pins_into_the_wheels_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip(wheels=["optuna-5.1.0-py3-none-any.whl", "Mako-1.4.3-py3-none-any.whl"])
    monkeypatch.setattr(cli_runner, "run", pip)
    names = gpu_bundle.download(["mako==1.4.3", "optuna==5.1.0"], "3.12", tmp_path, python="/py")
    assert names == ["Mako-1.4.3-py3-none-any.whl", "optuna-5.1.0-py3-none-any.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    (command,) = pip.commands
    assert command[:5] == ["/py", "-m", "pip", "download", "--no-deps"] and "mako==1.4.3" in command


def test_copy_slice_takes_the_first_images_of_each_class(tmp_path: Path) -> None:
    source = tmp_path / "cifar"
    image_folder(source, {"train": {"cat": 7, "dog": 7, "frog": 3}, "test": {"cat": 4, "dog": 4, "frog": 4}})
    (source / "train" / ".hidden").mkdir()
    counts = gpu_bundle.copy_slice(source, tmp_path / "slice", train_per_class=5, test_per_class=2)
    assert counts == {"train": {"cat": 5, "dog": 5, "frog": 3}, "test": {"cat": 2, "dog": 2, "frog": 2}}
    assert sorted(p.name for p in (tmp_path / "slice" / "train" / "dog").iterdir()) == [
        "0000.jpg", "0001.jpg", "0002.jpg", "0003.jpg", "0004.jpg"
    ]  # fmt: skip
    assert len(list((tmp_path / "slice").rglob("*.jpg"))) == 19
    with pytest.raises(FileNotFoundError, match="missing"):
        gpu_bundle.copy_slice(tmp_path / "missing", tmp_path / "other", 1, 1)


def test_prepare_writes_the_bundle_and_fails_over_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "cifar"
    image_folder(source, {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    wheel = make_wheel(tmp_path, "optuna", "5.0.0")
    asked: list[tuple[tuple[str, ...], str]] = []

    def fake_resolve(roots: tuple[str, ...], version: str) -> list[str]:
        asked.append((roots, version))
        return ["optuna==5.0.0"]

    def fake_download(pins: Sequence[str], version: str, dest: Path) -> list[str]:
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return [wheel.name]

    monkeypatch.setattr(gpu_bundle, "resolve", fake_resolve)
    monkeypatch.setattr(gpu_bundle, "download", fake_download)
    bundle = tmp_path / "bundle"
    argv = ["--data-dir", str(source), "--bundle", str(bundle), "--train-per-class", "3"]
    assert gpu_bundle.main([*argv, "--test-per-class", "1"]) == 0
    assert asked == [(("optuna", "cmaes", "pytest", "plotly", "optuna-dashboard"), "3.12")]  # the device's Python
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["wheels"] == {"3.12": [wheel.name]} and manifest["schema"] == "kdsearch-gpu-bundle/1"
    assert manifest["slice"]["counts"] == {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}
    assert (bundle / ".gitignore").read_text().splitlines()[-1] == "*"
    out = capsys.readouterr().out
    assert "slice: 6 train + 2 test images" in out and f"bundle {bundle}:" in out
    monkeypatch.setattr(gpu_bundle, "MAX_BUNDLE_BYTES", 10)
    argv[-1] = "2"
    assert gpu_bundle.main([*argv, "--python-versions", "3.10,3.11", "--no-plots"]) == 1
    assert "bundle is over" in capsys.readouterr().err
    assert asked[-1] == (("optuna", "cmaes", "pytest"), "3.11")
    assert json.loads((bundle / "manifest.json").read_text())["wheels"] == {"3.10": [wheel.name], "3.11": [wheel.name]}
    assert len(list((bundle / "cifar-slice" / "train" / "a").iterdir())) == 2  # rebuilt, not added to


def test_wheels_to_install_skips_what_the_device_has() -> None:
    manifest = {"wheels": {"3.12": ["optuna-5.0.0-py3-none-any.whl", "MarkupSafe-3.0.4-cp312-cp312-x.whl"]}}
    missing, present = gpu_bundle.wheels_to_install(manifest, "3.12", installed=lambda name: name == "markupsafe")
    assert missing == ["optuna-5.0.0-py3-none-any.whl"] and present == ["markupsafe"]
    with pytest.raises(RuntimeError, match=r"no wheels for Python 3\.13 \(made for 3\.12\)"):
        gpu_bundle.wheels_to_install(manifest, "3.13")


def test_install_installs_offline_into_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    wheel = make_wheel(bundle / "wheels", "kdsearch-bench-fake", "1.0")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (bundle / "manifest.json").write_text(
        json.dumps({"wheels": {version: [wheel.name, "pytest-8.0-py3-none-any.whl"]}})
    )
    site = tmp_path / "site"
    result = gpu_bundle.install(bundle, site, timeout=120.0)
    assert result["installed"] == [wheel.name] and result["already_there"] == ["pytest"]
    proc = subprocess.run(
        [sys.executable, "-c", "import kdsearch_bench_fake_mod as m; print(m.VALUE)"],
        env={"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "42", proc.stderr
    monkeypatch.syspath_prepend(str(site))  # as if an earlier run's PYTHONPATH were still set: not "there"
    assert gpu_bundle.install(bundle, site, timeout=120.0)["installed"] == [wheel.name]  # emptied and refilled
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(RuntimeError, match="not made by this script"):
        gpu_bundle.install(bundle, foreign, timeout=120.0)
    assert (foreign / "keep.txt").exists()
    with pytest.raises(FileNotFoundError, match="make bench-gpu-prepare"):
        gpu_bundle.install(tmp_path / "no-bundle", site, timeout=120.0)
