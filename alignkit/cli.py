"""The `alignkit` command.

    alignkit train RECIPE.yaml [--set key=value ...]
    alignkit validate RECIPE.yaml [--set key=value ...]

User errors (bad recipe, bad data, bad values) print one line, `alignkit: error: ...`, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

EXIT_USAGE = 2

_EPILOG = """\
examples:
  alignkit train recipes/quickstart.yaml
  alignkit train recipes/quickstart.yaml --set divergence=jsd --set beta=0.2
  alignkit validate recipes/quickstart.yaml --set model.dtype=bfloat16
  alignkit train recipes/quickstart.yaml --set distributed.num_processes=2 --set distributed.deepspeed=zero3
  alignkit train recipes/quickstart.yaml --set distributed.num_processes=8 --dry-run

A recipe is YAML: `method`, `model`, `dataset` and optional `peft`, `wandb`, `distributed` (and for ppo
`reward`) sections, and any field of the method's config class at the top level (fdpo: DPOConfig fields
plus divergence/alpha and the MMD penalty of Causal DPO; mdpo: those plus unbiased/nll_weight/...; crm:
RewardConfig plus mmd_coef/attributes/...; ppo: TRL's former PPOConfig plus divergence/...).
See README.md for the format.
"""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Robust preference alignment on top of TRL: f-DPO and Causal DPO (method: fdpo), mDPO/mIPO "
                    "(mdpo), causal reward models (crm), PPO with f-divergence penalties (ppo).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in (("train", "train as a recipe says"), ("validate", "check a recipe, its data and model without training")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("recipe", help="path to the recipe YAML")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value; dotted keys reach into sections (model.dtype=bfloat16)")
        if name == "train":
            p.add_argument("--dry-run", action="store_true",
                           help="print the multi-process launch command of the recipe's distributed section, "
                                "and exit")
    return parser


def _user_errors():
    from .data.validation import DatasetError
    from .divergences import UnsupportedDivergenceError
    from .recipes import RecipeError

    return (RecipeError, DatasetError, UnsupportedDivergenceError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Deprecation chatter from inside transformers/torch that a recipe user cannot act on.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true", category=UserWarning)
    try:
        from . import runner
        from .recipes import RecipeError, load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            import datasets

            datasets.disable_progress_bars()
            summary = runner.validate(recipe)
            print(f"{args.recipe}: OK " + ", ".join(f"{k}={v}" for k, v in summary.items()))
            return 0
        dist = recipe.distributed
        from .distributed import format_command, is_launched_worker, launch_command

        if dist is not None and dist.num_processes * dist.num_machines > 1 and not is_launched_worker():
            # fail here with one line, not in N workers with N tracebacks
            if recipe.method == "ppo":
                raise RecipeError("method 'ppo' runs on one process for now (PPOTrainer's loop is not DDP/DeepSpeed-"
                                  "aware yet); remove the distributed section or set distributed.num_processes: 1.")
            if recipe.training.get("precompute_ref_log_probs") and dist.deepspeed:
                raise RecipeError("precompute_ref_log_probs is not supported under DeepSpeed with several processes; "
                                  "set precompute_ref_log_probs: false (the reference then runs each step, sharded "
                                  "under ZeRO-3).")
            if dist.deepspeed:
                from .distributed import deepspeed_config

                try:
                    deepspeed_config(dist.deepspeed, dist.offload_optimizer, dist.offload_params)
                except ValueError as exc:
                    raise RecipeError(str(exc)) from None
            cmd, env = launch_command(dist, args.recipe, args.overrides)
            if args.dry_run:
                print(format_command(cmd, env))
                return 0
            import subprocess

            print(f"[alignkit] launching {dist.num_processes} processes: {format_command(cmd, env)}", file=sys.stderr)
            return subprocess.call(cmd, env={**os.environ, **env})
        if getattr(args, "dry_run", False):
            print(f"{args.recipe}: single process (no distributed section with num_processes > 1); run "
                  f"alignkit train {args.recipe}")
            return 0
        runner.train(recipe)
        return 0
    except _user_errors() as exc:
        print(f"alignkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
