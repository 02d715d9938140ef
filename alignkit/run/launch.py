"""Step 4 of a run: launch. The one place that changes process state: it starts and watches the workers of the
recipe's `distributed` section, or sets this process up (threads, W&B's environment, and in a worker the
environment and accelerate's state of its job).

    recipe -> plan -> checks -> **launch** -> build -> execute

The `distributed` section:

    distributed:
      num_processes: 2          # per machine
      deepspeed: zero3          # zero2 | zero3 | zero3_offload | path/to/ds_config.json | null (plain DDP)
      mixed_precision: bf16     # no | bf16 | fp16 (sets the config's bf16/fp16)

`alignkit train` then starts that many worker processes with torchrun's elastic agent, in its own process
(`--dry-run` prints the equivalent `torchrun` command instead, for users with their own launcher). Multi-node:
`num_machines`, `machine_rank`, `main_process_ip`, `main_process_port`, run once per machine (the usual
torchrun/accelerate arguments). `timeout` (seconds, default 1800 as transformers' `ddp_timeout`) bounds how long
a process waits for its peers, at start-up for every machine to join and in every collective operation: a worker
that dies, or a machine that never arrives, ends the whole job with one line naming the rank (or the machine) and
the cause, never a hang (`run_workers`). Launched by another launcher (`accelerate launch`, `deepspeed`, `srun`
running `alignkit train` per node), a worker sets itself up the same way (`join`).

On a machine without GPU, DeepSpeed runs on its CPU accelerator with the gloo backend. accelerate then
builds a one-process state while DeepSpeed starts a world of N, and the batch-size check fails
(`train_batch_size ... 2 != 2 * 1 * 2`); the worker set-up below creates accelerate's state with the
gloo backend first and tells the Trainer to use it (`accelerator_config.use_configured_state`), which
is what makes ZeRO-2/3 work on CPUs (tested in tests/test_zero.py). On GPUs the same code path uses NCCL.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from .._util import configure_wandb, set_torch_threads_for_this_machine, wants_wandb
from .plan import Plan, Role, check_output_dir, has_gpu, worker_kwargs
from .recipe import RecipeError

__all__ = ["set_up_process", "output_dir_lock", "join", "prepare_worker", "run_workers", "launch_command", "format_command",
           "LaunchError", "record_worker_failure", "LAUNCHED_BY_ALIGNKIT"]

def set_up_process(plan: Plan, config) -> str | None:
    """Set this process up to train: torch threads (a single process; torchrun gives workers theirs), W&B's
    environment when the config reports to W&B, and, in a worker, the job's state (`join`). Returns the W&B
    directory of an offline run (or None)."""
    if plan.role is Role.SINGLE:
        set_threads()
    wandb_dir = None
    if wants_wandb(config):
        w = plan.recipe.wandb
        wandb_dir = configure_wandb(config.output_dir, **({} if w is None else dict(
            mode=w.mode, project=w.project, entity=w.entity, group=w.group, tags=w.tags)),
            say=lambda line: print(f"[alignkit] {line}", file=sys.stderr, flush=True))
    return wandb_dir


#: the lock a run holds on its output_dir (an OS file lock: released when the process ends, however it ends, so a
#: lock is never left stale), and who holds it
LOCK_FILE, HOLDER_FILE = ".alignkit.lock", ".alignkit.lock.json"


@contextlib.contextmanager
def output_dir_lock(plan: Plan):
    """Hold the run's output_dir for as long as it trains: a second run into the same folder, started meanwhile, is
    refused (RecipeError) with the holder's host, pid and start time. Once held, the output_dir checks run again,
    since another run may have finished there after this one's plan was made."""
    import socket
    import time

    from filelock import FileLock, Timeout

    if plan.section is not None and plan.section.machine_rank > 0:
        yield  # machine 0 holds it (and only it writes there)
        return
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads((out / HOLDER_FILE).read_text())
            who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
        except (OSError, ValueError, KeyError):
            who = "a process that has not said who it is yet"
        raise RecipeError(f"output_dir: {str(out)!r} is in use by another alignkit run ({who}); wait for it to end, "
                          "or choose another output_dir.") from None
    try:
        (out / HOLDER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        check_output_dir(plan)
        yield
    finally:
        (out / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def set_threads(say: bool = True) -> None:
    """A single process's torch threads (one per idle core unless OMP_NUM_THREADS says otherwise)."""
    if os.environ.get("LOCAL_RANK") is None:
        line = set_torch_threads_for_this_machine()
        if line and say:
            print(f"[alignkit] {line}", file=sys.stderr)


def join(section, config_kwargs: dict[str, Any]) -> None:
    """In a launched worker, before its config is built: the environment DeepSpeed and accelerate read, and, without
    a GPU, accelerate's state with the gloo backend (the config's `accelerator_config.use_configured_state`, set by
    `alignkit.run.plan.worker_kwargs`, makes the Trainer use it)."""
    if section.deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not has_gpu():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not has_gpu():
        import datetime

        from accelerate import PartialState

        # Without DeepSpeed the state must be marked as CPU: a plain gloo PartialState is accelerate's
        # single-process state (DistributedType.NO) even in a world of N, and each rank then trains its own copy
        # with no gradient synchronisation (tests/test_ddp.py). Under DeepSpeed the engine's type is used.
        uses_deepspeed = section.deepspeed or "deepspeed" in config_kwargs or \
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        PartialState(backend="gloo", timeout=datetime.timedelta(seconds=config_kwargs.get("ddp_timeout", 1800)),
                     **({} if uses_deepspeed else {"cpu": True}))


def prepare_worker(section, training: dict[str, Any]) -> dict[str, Any]:
    """`worker_kwargs` then `join`: what `alignkit train` does in a worker, for scripts that build their own
    trainers under torchrun (the tests' and benchmarks' multi-process runs). Returns the config's keyword
    arguments."""
    training = worker_kwargs(section, training)
    join(section, training)
    return training


# ---- running the workers ---------------------------------------------------------------------------------------

def _torchrun_args(section) -> list[str]:
    args = [f"--nproc_per_node={section.num_processes}"]
    if section.num_machines > 1:
        args += [f"--nnodes={section.num_machines}", f"--node_rank={section.machine_rank}",
                 f"--master_addr={section.main_process_ip or '127.0.0.1'}",
                 f"--master_port={section.main_process_port}", f"--rdzv_conf=timeout={section.timeout}"]
    else:
        args += ["--standalone"]
    return args


def _worker_args(recipe_path: str, overrides: list[str]) -> list[str]:
    """What each worker runs: `alignkit train` on the same recipe and overrides."""
    return ["-m", "alignkit.cli", "train", recipe_path, *[a for item in overrides for a in ("--set", item)]]


def launch_command(section, recipe_path: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command (and extra environment) that runs this recipe on `num_processes` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *_torchrun_args(section), *_worker_args(recipe_path,
                                                                                              overrides)]
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if section.deepspeed:
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        if not has_gpu():
            env["DS_ACCELERATOR"] = "cpu"
    return cmd, env


def format_command(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(c) for c in cmd])


#: set in the workers `run_workers` starts: a worker's failure is written to torchelastic's error file (read back by
#: the launcher, which prints one line for the whole job) instead of as a traceback on the console
LAUNCHED_BY_ALIGNKIT = "ALIGNKIT_LAUNCHED"


class LaunchError(RuntimeError):
    """The job ended early: a worker failed or was killed, or the machines did not all meet. The message is one
    line that names the rank or machine and the cause."""


def record_worker_failure(exc: BaseException) -> None:
    """In a worker started by `run_workers`: write the failure (type, message, traceback) to the error file
    torchelastic gave this process, for the launcher to report.

    The format is torchelastic's `ErrorHandler.record_exception`; unlike it, the file is written beside its place and
    renamed into it, so that it is whole or absent: the agent may stop this process (SIGTERM) at any moment once
    another rank failed, and reading a half-written file crashed the agent (seen in CI)."""
    import tempfile
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(exc).__name__}: {exc}",
                        "extraInfo": {"py_callstack": "".join(traceback.format_exception(exc)),
                                      "timestamp": str(int(time.time()))}}}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".error-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fp:
            json.dump(data, fp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: what a worker's error says when another process of the job went away first
_PEER_LOST = ("Connection closed", "Connection reset", "Broken pipe", "DistBackendError", "DistNetworkError",
              "timed out", "Timed out", "NCCL communicator was aborted", "ProcessGroupGloo")


def _failure_line(exc, section, log: Path | None) -> str:
    """One line for a ChildFailedError: the root cause (a killed process, else the earliest error), which ranks
    stopped, and where the full tracebacks are."""
    failures = exc.failures

    def likely_root(item) -> tuple:
        # the process that failed on its own, not one stopped because of it: a signal other than the agent's SIGTERM
        # (SIGKILL from the OOM killer, SIGSEGV), then an error of its own, then an error about a lost peer, then the
        # SIGTERM the agent sends the others; earliest first within each
        rank, f = item
        text = str(f.message)
        lost_peer = any(s in text for s in _PEER_LOST)
        order = 3 if f.exitcode == -signal.SIGTERM else 0 if f.exitcode < 0 else 2 if lost_peer else 1
        return order, f.timestamp, rank

    rank, first = min(failures.items(), key=likely_root)
    world = section.num_processes * section.num_machines
    if first.exitcode < 0:
        cause = f"was killed by {first.signal_name()}"
    else:
        message = first.message if isinstance(first.message, str) else first.message.get("message", "")
        message = (message or "").strip().splitlines()
        cause = f"failed: {message[-1][:300]}" if message and not message[-1].startswith("To enable traceback") \
            else f"exited with code {first.exitcode}"
    others = sorted(set(failures) - {rank})
    stopped = f"; rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} stopped with it" if others else ""
    where = f" (machine {section.machine_rank})" if section.num_machines > 1 else ""
    see = f"; tracebacks in {log}" if log is not None else ""
    return f"the job stopped: rank {rank} of {world}{where} {cause}{stopped}{see}."


def _write_failure_log(exc, log_dir: Path, machine_rank: int) -> Path | None:
    """The failures' full tracebacks (from the workers' error files) in log_dir/error-machine<m>.log."""
    lines = []
    for rank, f in sorted(exc.failures.items()):
        data = f.error_file_data.get("message") if isinstance(f.error_file_data, dict) else None
        trace = data.get("extraInfo", {}).get("py_callstack") if isinstance(data, dict) else None
        lines.append(f"=== rank {rank} (pid {f.pid}, exit code {f.exitcode}"
                     f"{', ' + f.signal_name() if f.exitcode < 0 else ''}) ===\n{trace or f.message}\n")
    return _write_log(log_dir, f"error-machine{machine_rank}.log", "\n".join(lines))


def _write_log(log_dir: Path, name: str, text: str) -> Path | None:
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / name
        path.write_text(text)
        return path
    except OSError:
        return None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else ""


def _is_rendezvous_failure(exc: BaseException) -> bool:
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous import RendezvousError

    return isinstance(exc, (RendezvousError, DistError, TimeoutError, ConnectionError))


def _rendezvous_line(exc: BaseException, section) -> str:
    addr = f"{section.main_process_ip or '127.0.0.1'}:{section.main_process_port}"
    if section.machine_rank == 0:
        return (f"machine 0 waited {section.timeout} s at {addr} for the {section.num_machines} machines of "
                f"distributed.num_machines, and not all arrived; start `alignkit train` with the same recipe and "
                f"machine_rank 1..{section.num_machines - 1} on the others (or raise distributed.timeout).")
    return (f"machine {section.machine_rank} could not join machine 0 at {addr} within {section.timeout} s; start "
            "machine_rank 0 too, and check main_process_ip / main_process_port and that the port is open "
            f"({type(exc).__name__}).")


def run_workers(section, recipe_path: str, overrides: list[str], log_dir: str | os.PathLike) -> None:
    """Start this machine's workers (torchrun's elastic agent, in this process) and wait for them. Returns when
    every worker finished; raises LaunchError with one line when a worker failed or was killed (the agent then
    stops the others) or the machines did not meet within `section.timeout`. The failures' tracebacks go to
    LOG_DIR/error-machine<m>.log."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    _, env = launch_command(section, recipe_path, overrides)
    os.environ.update(env)
    os.environ[LAUNCHED_BY_ALIGNKIT] = "1"
    # the agent checks its workers every 0.1 s (torchrun's default): a dead one is noticed, the others stopped, at once
    args = get_args_parser().parse_args([*_torchrun_args(section), *_worker_args(recipe_path, overrides)])
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its ERROR lines repeat what the one line below says
    try:
        run(args)
    except SignalException as exc:  # Ctrl-C (or a scheduler's SIGTERM): the agent has stopped the workers
        raise KeyboardInterrupt(str(exc)) from None
    except ChildFailedError as exc:
        log = _write_failure_log(exc, Path(log_dir), section.machine_rank)
        raise LaunchError(_failure_line(exc, section, log)) from None
    except Exception as exc:
        if section.num_machines > 1 and _is_rendezvous_failure(exc):  # a machine that never arrived, or no answer
            raise LaunchError(_rendezvous_line(exc, section)) from None
        # anything else that broke inside the agent while it watched the workers: one line, the traceback in the log
        log = _write_log(Path(log_dir), f"agent-machine{section.machine_rank}.log",
                         "".join(traceback.format_exception(exc)))
        see = f"; traceback in {log}" if log is not None else ""
        raise LaunchError(f"the launcher (torchrun's agent) stopped: {type(exc).__name__}: "
                          f"{_first_line(exc)}{see}.") from None
    finally:
        quiet.setLevel(level)
        os.environ.pop(LAUNCHED_BY_ALIGNKIT, None)
