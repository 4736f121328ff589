"""Images larger than memory as float32: a 224 px copy of the CIFAR-10 train split (`make bench-scale`).

Builds `bench-scale-224/` beside the shared copy's parent unless told where (`--copy`): the 50,000
train images scaled to 224x224 (bicubic, JPEG quality 90) and 200 test images a class — 7.5 GB
as uint8, 30 GB as float32, more than this machine's 24 GB. Then, each under `bench/memory.py`'s
/proc poll (peak anonymous memory, RssAnon: what the process allocates; file-backed cache pages
aside), with an empty studies home:

1. decode: `kdsearch train --method ce --epochs 1 --limit-train 64` decodes and caches every image
   (the decode is of the whole folder, whatever the limit) — its wall time is the decode's;
2. a small teacher: `kdsearch teacher --model lightnn --preset tutorial --epochs 1 --limit-train 2000`;
3. `kdsearch train --method kd --epochs 1` with that teacher: the teacher's logits cached for the
   50,000 images, then one epoch of the LightNN student on them.

Rows in bench/results/scale.json; the README quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from memory import measure

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "scale.json"
SIZE = 224
TEST_PER_CLASS = 200


def _resize(job: tuple[str, str]) -> None:
    from PIL import Image

    source, target = job
    with Image.open(source) as image:
        image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC).save(target, quality=90)


def build_copy(source: Path, copy: Path) -> dict[str, Any]:
    """The 224 px copy (resumable: a file already there is kept)."""
    start = time.perf_counter()
    jobs = []
    for split in ("train", "test"):
        for folder in sorted((source / split).iterdir()):
            files = sorted(folder.iterdir())
            if split == "test":
                files = files[:TEST_PER_CLASS]
            (copy / split / folder.name).mkdir(parents=True, exist_ok=True)
            for file in files:
                target = copy / split / folder.name / (file.stem + ".jpg")
                if not target.exists():
                    jobs.append((str(file), str(target)))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_resize, jobs, chunksize=256))
    images = sum(1 for _ in copy.rglob("*.jpg"))
    disk = sum(p.stat().st_size for p in copy.rglob("*.jpg"))
    return {"images": images, "jpeg_bytes": disk, "built": len(jobs), "seconds": round(time.perf_counter() - start, 1)}


def run(label: str, args: list[str], home: Path) -> dict[str, Any]:
    """One kdsearch command under the memory poll; its JSON result and the peaks."""
    command = [sys.executable, "-m", "kdsearch", *args, "--json", "-q"]
    print(f"$ kdsearch {' '.join(args)}", file=sys.stderr, flush=True)
    os.environ["KDSEARCH_HOME"] = str(home)
    with tempfile.TemporaryFile("w+") as out:
        peaks = measure(command, stdout=out)
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    return {"label": label, "command": "kdsearch " + " ".join(args), **peaks, "result": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="the CIFAR-10 ImageFolder copy to scale up")
    parser.add_argument("--copy", type=Path, default=None, help="where the 224 px copy goes")
    parser.add_argument("--home", type=Path, default=None, help="studies home for the runs [default: a fresh one]")
    args = parser.parse_args()
    source = Path(args.data_dir).resolve()
    copy = args.copy or source.parent / f"bench-scale-{SIZE}"
    home = args.home or Path(tempfile.mkdtemp(prefix="kdsearch-scale-"))
    rows: dict[str, Any] = {"copy": str(copy), "home": str(home), "build": build_copy(source, copy)}
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    data = ["--dataset", "imagefolder", "--data-dir", str(copy)]
    rows["decode"] = run("decode and cache", ["train", "--method", "ce", *data, "--val-size", "0", "--epochs", "1",
                                               "--limit-train", "64"], home)  # fmt: skip
    teacher = home / "lightnn-224.pt"
    teacher_args = ["teacher", *data, "--model", "lightnn", "--preset", "tutorial", "--epochs", "1",
                    "--limit-train", "2000", "--val-size", "0", "--out", str(teacher)]  # fmt: skip
    rows["teacher"] = run("small teacher", teacher_args, home)
    rows["kd_epoch"] = run("teacher logits and one kd epoch", ["train", "--method", "kd", *data, "--val-size", "0",
                                                               "--epochs", "1", "--teacher", str(teacher)],
                           home)  # fmt: skip
    caches = {p.name: p.stat().st_size for p in (home / "cache").rglob("*.pt")}
    rows["cache_files"] = caches
    kd = rows["kd_epoch"]["result"]
    rows["summary"] = {
        "images": rows["build"]["images"],
        "uint8_gb": round(50_000 * 3 * SIZE * SIZE / 1e9, 2),
        "float32_gb": round(50_000 * 3 * SIZE * SIZE * 4 / 1e9, 2),
        "decode_seconds": rows["decode"]["wall_seconds"],
        "teacher_logits_seconds": kd.get("teacher_outputs_seconds"),
        "epoch_seconds": (kd.get("epoch_seconds") or [None])[0],
        "peak_rss_anon_mib": max(rows[k]["peak_RssAnon_mib"] for k in ("decode", "teacher", "kd_epoch")),
        "test_accuracy_after_one_epoch": kd.get("test_accuracy"),
    }
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
