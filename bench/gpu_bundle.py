"""The bundle that bench/gpu.py needs on a GPU machine which reaches no package registry.

Made here, where pip reaches PyPI (``make bench-gpu-prepare``), into bench/gpu-bundle/ (git-ignored; it
travels with the working tree, which may hold 64 MiB, so the bundle may take 48):

- the wheels of what kdsearch and the device tests need that the device's torch image may lack (optuna
  and its needs, cmaes, pytest; plotly and optuna-dashboard unless ``--no-plots``): pip resolves them for
  the device's platform and Python, pinned to the versions installed here (those the CPU tests passed
  with), and downloads those the device does not provide (never torch, numpy, ...);
- a fixed slice of the CIFAR-10 JPEG copy (the first images of each class, by name).

On the device, ``install`` puts the wheels it lacks into a folder of their own, offline, with pip.

pip evaluates the dependencies' environment markers with the Python that runs it, not the one named by
``--python-version`` (pypa/pip#11010): a bundle made here from another Python than the device's can lack a
dependency that only the device's version needs (the run then fails on its import), so prepare says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cli_runner

BUNDLE = Path(__file__).resolve().parent / "gpu-bundle"
MANIFEST = "manifest.json"
SCHEMA = "kdsearch-gpu-bundle/1"
MIB = 1024 * 1024
MAX_BUNDLE_BYTES = 48 * MIB
DEVICE_PYTHON = "3.12"  # the device's python3 is 3.12.3 (its image's listing)
# pip matches a manylinux tag exactly: every glibc level a wheel may be tagged with, up to torch's own 2.28.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
ROOTS = ("optuna", "cmaes", "pytest")
# Only `kdsearch report` and `dashboard` import these, which no step runs; they fit, for a report there.
PLOT_ROOTS = ("plotly", "optuna-dashboard")
# The device's torch image has these; a second copy on the path could shadow them.
DEVICE_PROVIDED = frozenset(
    {"torch", "torchvision", "triton", "numpy", "pillow", "click", "joblib", "pyyaml", "tqdm", "filelock",
     "typing-extensions", "jinja2", "sympy", "mpmath", "networkx", "fsspec", "setuptools"}
)  # fmt: skip
SITE_MARKER = ".kdsearch-gpu-site"  # install empties only a folder holding this file


def canonical(name: str) -> str:
    """PEP 503 name, so ``SQLAlchemy``, ``sqlalchemy`` and a wheel file's ``sqlalchemy`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> str:
    """The canonical distribution name of a wheel file (``optuna_dashboard-0.21.0-py3-none-any.whl``)."""
    return canonical(Path(filename).name.split("-", 1)[0])


def local_pins() -> str:
    """A pip constraints file of the distributions installed here: the bundle gets the tested versions."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"]:
            pins.setdefault(canonical(dist.metadata["Name"]), dist.version)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def target_options(python_version: str) -> list[str]:
    """pip's options for wheels that run on the device: CPython ``python_version`` on x86-64 manylinux."""
    options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    return options + [word for platform in PLATFORMS for word in ("--platform", platform)]


def pip_command(python: str, *args: str) -> list[str]:
    """Quiet: ``--report -`` must be all that is on stdout."""
    return [python, "-m", "pip", *args, "-q", "--disable-pip-version-check"]


def needed_from_report(report: Mapping[str, Any], provided: frozenset[str] = DEVICE_PROVIDED) -> list[str]:
    """``name==version`` of each package in pip's installation report that the device does not provide."""
    metadata = [item["metadata"] for item in report["install"]]
    return sorted(f"{canonical(m['name'])}=={m['version']}" for m in metadata if canonical(m["name"]) not in provided)


def resolve(roots: Sequence[str], python_version: str, python: str = sys.executable) -> list[str]:
    """pip's resolution of ``roots`` for the device (a dry run, so only metadata is fetched), as pins.

    Pinned to this interpreter's versions; where those cannot be had for ``python_version``, pip's newest.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(local_pins())
        constraints.flush()
        dry_run = ["install", "--dry-run", "--ignore-installed", "--report", "-", *target_options(python_version)]
        for pins in (["-c", constraints.name], []):
            finished = cli_runner.run(pip_command(python, *dry_run, *pins, *roots))
            if finished.returncode == 0 or not pins:
                break
            print(f"pip found no resolution with the local versions for Python {python_version}: taking pip's newest")
    return needed_from_report(json.loads(finished.check().stdout))


def download(pins: Sequence[str], python_version: str, dest: Path, python: str = sys.executable) -> list[str]:
    """Download exactly ``pins`` (no dependencies: they are resolved already) into ``dest``; their file names."""
    with tempfile.TemporaryDirectory(prefix="kdsearch-wheels-") as fresh:
        command = pip_command(python, "download", "--no-deps", *target_options(python_version), "-d", fresh, *pins)
        cli_runner.run(command).check()
        names = sorted((p.name for p in Path(fresh).glob("*.whl")), key=str.lower)
        for name in names:
            if not (dest / name).exists():
                shutil.move(str(Path(fresh) / name), dest / name)
    return names


def copy_slice(source: Path, dest: Path, train_per_class: int, test_per_class: int) -> dict[str, dict[str, int]]:
    """Copy the first N images (by name) of each class of an ImageFolder; return the counts per class.

    A fixed choice, so every bundle holds the same slice; a class with fewer images gives what it has.
    """
    counts: dict[str, dict[str, int]] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        split_dir = source / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} is missing: the data dir needs train/<class>/ and test/<class>/")
        counts[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            target = dest / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            images = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
            for path in images[:per_class]:
                shutil.copy2(path, target / path.name)
            counts[split][class_dir.name] = min(per_class, len(images))
    return counts


def tree_bytes(path: Path) -> int:
    """Bytes of all files under ``path``: what the bundle adds to the tree sent to the device."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(args: argparse.Namespace) -> int:
    """Make the bundle from scratch: the wheels for each device Python, the slice, and the manifest."""
    bundle = Path(args.bundle)
    wheels_dir, slice_dir = bundle / "wheels", bundle / "cifar-slice"
    for folder in (wheels_dir, slice_dir):  # our own sub-folders only
        if folder.exists():
            shutil.rmtree(folder)
    wheels_dir.mkdir(parents=True)
    (bundle / ".gitignore").write_text("# made by `make bench-gpu-prepare`; carried to the device\n*\n")
    roots = ROOTS if args.no_plots else ROOTS + PLOT_ROOTS
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels: dict[str, list[str]] = {}
    for version in args.python_versions:
        if version != here:
            print(f"note: pip reads the dependencies' markers for Python {here}, not {version} (pypa/pip#11010)")
        wheels[version] = download(resolve(roots, version), version, wheels_dir)
        print(f"Python {version}: {len(wheels[version])} wheels")
    counts = copy_slice(Path(args.data_dir), slice_dir, args.train_per_class, args.test_per_class)
    manifest = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "roots": list(roots),
        "wheels": wheels,
        "slice": {"source": str(args.data_dir), "counts": counts},
        "wheel_bytes": tree_bytes(wheels_dir),
    }
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for path in sorted(wheels_dir.glob("*.whl")):
        print(f"  {path.stat().st_size / MIB:6.2f} MiB  {path.name}")
    n_train, n_test = sum(counts["train"].values()), sum(counts["test"].values())
    print(f"slice: {n_train} train + {n_test} test images, {tree_bytes(slice_dir) / MIB:.1f} MiB")
    total = tree_bytes(bundle)
    print(f"bundle {bundle}: {total / MIB:.1f} MiB (limit {MAX_BUNDLE_BYTES / MIB:.0f} MiB)")
    if total > MAX_BUNDLE_BYTES:
        print(f"bundle is over {MAX_BUNDLE_BYTES / MIB:.0f} MiB: try --no-plots or a smaller slice", file=sys.stderr)
        return 1
    return 0


# --- on the device ------------------------------------------------------------------------------------


def is_installed(name: str, ignore: Path | None = None) -> bool:
    """Whether this Python has ``name``, not counting a copy under ``ignore``: our own site folder, should an
    earlier run's PYTHONPATH still point there (install empties it)."""
    paths = [p for p in sys.path if ignore is None or not Path(p or ".").resolve().is_relative_to(ignore.resolve())]
    return next(iter(importlib.metadata.distributions(name=name, path=paths)), None) is not None


def wheels_to_install(
    manifest: Mapping[str, Any], python_version: str, installed: Callable[[str], bool] = is_installed
) -> tuple[list[str], list[str]]:
    """The bundle's wheels for ``python_version`` that this Python lacks, and the names it already has:
    what is there is kept."""
    wheels = manifest.get("wheels", {}).get(python_version)
    if wheels is None:
        made = ", ".join(sorted(manifest.get("wheels", {})))
        raise RuntimeError(f"the bundle has no wheels for Python {python_version} (made for {made})")
    missing = [f for f in wheels if not installed(wheel_distribution(f))]
    present = [wheel_distribution(f) for f in wheels if f not in missing]
    return missing, present


def install(bundle: Path, site: Path, timeout: float, python: str = sys.executable) -> dict[str, Any]:
    """Install the missing wheels into ``site`` (emptied first), offline and without dependencies."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make bench-gpu-prepare` where pip reaches PyPI")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    missing, present = wheels_to_install(json.loads(path.read_text()), version, lambda n: is_installed(n, site))
    if site.exists():
        if not (site / SITE_MARKER).exists() and any(site.iterdir()):
            raise RuntimeError(f"{site} exists and was not made by this script; pass another --site")
        shutil.rmtree(site)
    site.mkdir(parents=True)
    (site / SITE_MARKER).write_text("made by bench/gpu.py; emptied by its next run\n")
    if missing:
        # --no-compile: modules are compiled when first imported; plotly alone would take seconds here.
        command = pip_command(python, "install", "--no-index", "--no-deps", "--no-cache-dir", "--no-compile")
        command += ["--target", str(site), *(str(bundle / "wheels" / f) for f in missing)]
        cli_runner.run(command, timeout=timeout).check()
    return {"python": version, "site": str(site), "installed": missing, "already_there": present}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/gpu_bundle.py", description="Make the bundle bench/gpu.py needs.")
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 JPEG copy (train/<class>/, test/<class>/)")
    parser.add_argument("--bundle", default=str(BUNDLE), help="where to write it (default bench/gpu-bundle)")
    parser.add_argument("--train-per-class", type=int, default=500, help="slice train images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="slice test images per class")
    parser.add_argument(
        "--python-versions",
        type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()),
        default=(DEVICE_PYTHON,),
        help=f"the device Pythons to fetch compiled wheels for, comma-separated (default {DEVICE_PYTHON})",
    )
    parser.add_argument("--no-plots", action="store_true", help="leave plotly and optuna-dashboard out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return prepare(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
