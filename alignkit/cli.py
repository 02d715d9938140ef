"""The `alignkit` command.

    alignkit train RECIPE.yaml [--set key=value ...]
    alignkit validate RECIPE.yaml [--set key=value ...]
    alignkit plan RECIPE.yaml [--gpus 8xH100] [--set key=value ...]

User errors (bad recipe, bad data, bad values) print one line, `alignkit: error: ...`, and exit 2. Any other failure
prints one line naming it and the log that holds its traceback, and exits 1 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2

_EPILOG = """\
examples:
  alignkit train recipes/quickstart.yaml
  alignkit train recipes/quickstart.yaml --set divergence=jsd --set beta=0.2
  alignkit validate recipes/quickstart.yaml --set model.dtype=bfloat16
  alignkit train recipes/quickstart.yaml --set distributed.num_processes=2 --set distributed.deepspeed=zero3
  alignkit train recipes/quickstart.yaml --set distributed.num_processes=8 --dry-run
  alignkit plan recipes/real/mipo-random-numbers.yaml --gpus 8xH100 --set distributed.deepspeed=zero3
  alignkit eval outputs/quickstart --ref builtin:tiny-llama --pairs builtin:sentiment -k 4
  alignkit plot outputs/quickstart
  alignkit dashboard --project alignkit --entity my-team

A recipe is YAML: `method`, `model`, `dataset` and optional `peft`, `wandb`, `distributed` (and for ppo and
online_mdpo `reward`) sections, and any field of the method's config class at the top level (fdpo: DPOConfig fields
plus divergence/alpha and the MMD penalty of Causal DPO; mdpo: those plus unbiased/nll_weight/...; crm:
RewardConfig plus mmd_coef/attributes/...; ppo: TRL's former PPOConfig plus divergence/...; online_mdpo:
num_generations/grouping/loss_type/beta/... of OnlineMultiSampleConfig).
See docs/recipes.md for the format.
"""


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Robust preference alignment on top of TRL: f-DPO and Causal DPO (method: fdpo), mDPO/mIPO "
                    "(mdpo), causal reward models (crm), PPO with f-divergence penalties (ppo), online mDPO/mIPO on "
                    "the policy's own samples (online_mdpo).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="let an unexpected failure's traceback through (also ALIGNKIT_DEBUG=1); without it, "
                             "one line names the failure and the log that holds the traceback")
    # the `deepspeed` launcher passes --local_rank=N to each process, before the command (the same as $LOCAL_RANK,
    # which is what is read)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
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
    pp = sub.add_parser("plan", help="what a run needs before it starts: parameters, memory per device, tokens and "
                                     "time per step (no weights loaded)",
                        description="Estimate what a recipe's run needs, from the models' configs (no weights are "
                                    "loaded): parameters and trainable parameters, per-device memory of weights, "
                                    "gradients, optimizer states and activations under the recipe's distributed "
                                    "section (or --gpus), tokens per optimizer step, and with --gpus the time per step "
                                    "at a stated MFU.")
    pp.add_argument("recipe", help="path to the recipe YAML")
    pp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, as in train")
    pp.add_argument("--gpus", help="what-if: COUNTxNAME or MACHINESxCOUNTxNAME, e.g. 8xH100 or 2x8xH100 (ZeRO stage "
                                   "and precision from the recipe)")
    pp.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the step time (default 0.4)")
    pp.add_argument("--seq-len", type=int, help="tokens per sequence (default: the recipe's max_length, or prompt + "
                                                "response length)")
    pp.add_argument("--json", action="store_true", help="print the plan as JSON")
    ev = sub.add_parser("eval", help="sample from a policy and report diversity, divergences, calibration, reward "
                                     "and its bias (JSON, PNGs, optionally W&B)",
                        description="Sample k completions per prompt from a policy and report what alignment changed.")
    ev.add_argument("model", help="policy folder (or builtin:tiny-llama)")
    ev.add_argument("--ref", help="reference model: enables the f-divergence estimates and pair calibration")
    ev.add_argument("--prompts", default="builtin:sentiment", help="builtin:<task>, a data file or a saved dataset")
    ev.add_argument("--split", default="test", help="split of a built-in task (default: test)")
    ev.add_argument("--num-prompts", type=int, default=32)
    ev.add_argument("-k", "--k", type=int, default=4, help="samples per prompt (self-BLEU needs k >= 2)")
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--pairs", help="preference pairs (same forms as --prompts) for calibration and RM bias")
    ev.add_argument("--pairs-split", default="test")
    ev.add_argument("--num-pairs", type=int, default=None, help="use the first N pairs (default: all)")
    ev.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward for pair calibration")
    ev.add_argument("--reward-model", help="sequence-classification reward model to score the samples")
    ev.add_argument("--reward-function", help="score the samples with a function instead: builtin:vader (real "
                                              "text), builtin:sentiment, or package.module:function")
    ev.add_argument("--compare-model", help="another policy; with --reward-model, gives the win-rate score")
    ev.add_argument("--exact", action="store_true", help="random-number prompts (low/high columns): score every "
                                                          "integer's probability from the logits too")
    ev.add_argument("--attribute", help="spurious attribute for reward-model bias (length, a column, regex:...)")
    ev.add_argument("--output", default="outputs/eval", help="folder for report.json, samples.jsonl and PNGs")
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier report in --output")
    ev.add_argument("--report-to", choices=["none", "wandb"], default="none")
    ev.add_argument("--seed", type=int, default=0)
    pl = sub.add_parser("plot", help="training curves as PNGs from a run's metrics.json (no W&B needed)",
                        description="Write one PNG per metric family (train, rewards, perf, ...) from the log_history "
                                    "of a run's metrics.json (or a checkpoint's trainer_state.json).")
    pl.add_argument("run", help="a run's output_dir, or its metrics.json / trainer_state.json")
    pl.add_argument("--output", help="folder for the PNGs (default: RUN/plots)")
    pl.add_argument("--overwrite", action="store_true", help="replace plots made earlier in that folder")
    db = sub.add_parser("dashboard", help="a W&B workspace with each method's panels (offline: a file to push later)",
                        description="Build a W&B workspace with one section per method (f-DPO, mDPO/mIPO, causal reward "
                                    "model, PPO) and one for throughput. With a W&B API key it is saved to the "
                                    "project; without one (or with --output) its definition is written to a file.")
    db.add_argument("--project", help="the W&B project your runs log to")
    db.add_argument("--entity", default=os.environ.get("WANDB_ENTITY", ""), help="W&B user or team (default: "
                                                                                   "$WANDB_ENTITY)")
    db.add_argument("--run-dir", help="an alignkit train output_dir: only its method's section (and throughput)")
    db.add_argument("--output", help="write the definition to this JSON file instead of saving it to W&B")
    db.add_argument("--push", metavar="FILE", help="save a definition written earlier to W&B (needs an API key)")
    db.add_argument("--overwrite", action="store_true", help="replace a definition file written earlier")
    return parser


def _run_dashboard(args) -> int:
    from .dashboard import DashboardError, build_workspace, push_definition, save_definition
    from ._util import has_wandb_key

    if args.push:
        print(push_definition(args.push, args.entity))
        return 0
    if not args.project:
        raise DashboardError("--project is missing; give the W&B project your runs log to, e.g. --project alignkit.")
    if "/" in args.project:
        team, _, project = args.project.partition("/")
        raise DashboardError(f"--project {args.project}: a W&B project name has no '/'; give the team apart: "
                             f"--entity {team} --project {project}.")
    output = args.output or f"wandb-workspace-{args.project}.json"
    if Path(output).exists() and not args.overwrite and not (args.output is None and has_wandb_key() and args.entity):
        raise DashboardError(f"--output {output}: a definition written earlier is there; choose another file, or add "
                             "--overwrite to replace it.")
    workspace = build_workspace(args.project, args.entity, args.run_dir)
    if args.output is None and has_wandb_key() and args.entity:
        print(workspace.save().url)
        return 0
    path = save_definition(workspace, output)
    entity = args.entity or "YOUR_ENTITY"
    print(f"W&B workspace definition written to {path} ({len(workspace.sections)} sections); save it to W&B with: "
          f"alignkit dashboard --push {path} --entity {entity}")
    return 0


def _run_eval(args) -> int:
    from .metrics.evaluate import EvalError, evaluate, load_prompts, log_to_wandb, write_report

    from .models import causal_lm_config, check_model_source, check_same_vocabulary, check_score_head

    if args.k < 2:
        raise EvalError(f"-k {args.k}: self-BLEU and distinct-n compare the samples of a prompt with each other; "
                        "use k >= 2.")
    for flag, value in (("--num-prompts", args.num_prompts), ("--num-pairs", args.num_pairs),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} {value}: give at least 1" + (" (or leave --num-pairs out to use every pair)."
                                                                   if flag == "--num-pairs" else "."))
    for flag, value in (("--temperature", args.temperature), ("--beta", args.beta)):
        if not value > 0:
            raise EvalError(f"{flag} {value}: must be > 0 (e.g. {flag} {1.0 if flag == '--temperature' else 0.1}).")
    if args.pairs and not (args.ref or args.reward_model):
        raise EvalError("--pairs needs --ref (calibration of the policy's implicit reward against the reference) "
                        "or --reward-model (its accuracy and bias on the pairs); add one of them.")
    if args.compare_model and not (args.reward_model or args.reward_function):
        raise EvalError("--compare-model needs --reward-model or --reward-function: the win rate compares the two "
                        "policies' samples by reward; add one of them.")
    if args.reward_model and args.reward_function:
        raise EvalError("--reward-model and --reward-function both score the samples; give one of them.")
    if args.reward_function:
        from .rewards import load_reward_function

        try:
            load_reward_function(args.reward_function)
        except ValueError as exc:
            raise EvalError(f"--reward-function: {exc}") from None
    if args.attribute and not (args.reward_model and args.pairs):
        raise EvalError("--attribute measures a reward model's bias on pairs; add --reward-model and --pairs.")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output {args.output}: a file; give a folder for report.json, samples.jsonl and the plots.")
    if (out / "report.json").exists() and not args.overwrite:
        raise EvalError(f"--output {args.output}: holds an earlier report (report.json); choose another folder, or add "
                        "--overwrite to replace it.")
    check_model_source(args.model, "MODEL (the policy)", need_tokenizer=True)
    policy = causal_lm_config(args.model, "MODEL (the policy)")  # an encoder or a reward model is refused here
    for flag, name in (("--ref", args.ref), ("--compare-model", args.compare_model)):
        if name:
            check_model_source(name, flag, need_tokenizer=flag == "--compare-model")
            other = causal_lm_config(name, flag)
            if flag == "--ref":  # log-ratios compare the same token ids; a compared policy has its own tokenizer
                check_same_vocabulary(policy, other, flag, name)
    if args.reward_model:
        check_model_source(args.reward_model, "--reward-model", need_tokenizer=True)
        check_score_head(args.reward_model, "--reward-model", must_be_trained=True)
    prompts = load_prompts(args.prompts, args.split, args.num_prompts)
    if args.exact and not {"low", "high"} <= set(prompts.column_names):
        raise EvalError(f"--exact scores random-number prompts, which carry 'low' and 'high' columns; --prompts "
                        f"{args.prompts} has {prompts.column_names}: use --prompts builtin:random_numbers or add them.")
    pairs = load_prompts(args.pairs, args.pairs_split, args.num_pairs) if args.pairs else None
    if pairs is not None:
        from .data.validation import validate_preference_dataset

        validate_preference_dataset(pairs, f"--pairs {args.pairs}")
    report = evaluate(args.model, prompts, ref=args.ref, k=args.k, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, reward_model=args.reward_model, compare_model=args.compare_model,
                      pairs=pairs, beta=args.beta, attribute=args.attribute, seed=args.seed,
                      reward_function=args.reward_function, exact_numbers=args.exact)
    files = write_report(report, args.output)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in report.items()
             if k not in ("samples",) and not isinstance(v, dict)}
    print(json.dumps(shown))
    for key in ("divergence", "pairs", "reward", "reward_model_bias", "random_numbers",
                "random_numbers_exact"):
        if key in report:
            print(f"{key}: " + json.dumps({k: round(v, 4) for k, v in report[key].items()}))
    print(f"[alignkit] wrote {', '.join(p.name for p in files)} to {args.output}", file=sys.stderr)
    if args.report_to == "wandb":
        from ._util import configure_wandb

        configure_wandb(args.output)  # offline without an API key, as training runs
        run = log_to_wandb(report, files)
        print(f"[alignkit] W&B run {run.id} ({os.environ.get('WANDB_MODE', 'online')})", file=sys.stderr)
    return 0


def _run_plan(args, recipe) -> int:
    from .run.estimate import EstimateError, format_plan, plan_recipe

    if not 0 < args.mfu <= 1:
        raise EstimateError(f"--mfu {args.mfu}: a fraction in (0, 1], e.g. --mfu 0.4.")
    if args.seq_len is not None and args.seq_len < 1:
        raise EstimateError(f"--seq-len {args.seq_len}: give at least 1 token.")
    plan = plan_recipe(recipe, gpus=args.gpus, mfu=args.mfu, seq_len=args.seq_len)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan, args.recipe))
    return 0


def _user_errors():
    from .dashboard import DashboardError
    from .data.validation import DatasetError
    from .divergences import UnsupportedDivergenceError
    from .run.estimate import EstimateError
    from .metrics.evaluate import EvalError
    from .models import ModelError
    from .plot import PlotError
    from .run.recipe import RecipeError

    return (RecipeError, DatasetError, UnsupportedDivergenceError, EvalError, ModelError, PlotError, DashboardError,
            EstimateError)


def _one_line_warnings() -> None:
    """alignkit's own warnings (a regex attribute that never matches, too few distinct values for num_bins)
    print as one line, like its other messages, instead of two with the source line."""
    default = warnings.formatwarning
    package = os.path.dirname(os.path.abspath(__file__))

    def formatwarning(message, category, filename, lineno, line=None):
        from ._util import AlignkitWarning

        if issubclass(category, AlignkitWarning) or os.path.abspath(filename).startswith(package):
            return f"[alignkit] warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def _run_recipe(args) -> int:
    """`train`, `validate` and `plan`: the run pipeline, top to bottom (alignkit/run/, docs/architecture.md). The
    launcher of several processes stops at step 4; each worker, like a single process, runs steps 2 to 6."""
    from .run import checks, launch
    from .run.plan import Role, make_plan
    from .run.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)          # 1. the recipe: schema only
    if args.command == "plan":
        return _run_plan(args, recipe)
    plan = make_plan(recipe)                                   # 2. the plan: pure
    if args.command == "validate":
        import datasets

        datasets.disable_progress_bars()
        summary = checks.validate(plan)                        # 3. the checks
        print(f"{args.recipe}: OK " + ", ".join(f"{k}={v}" for k, v in summary.items()))
        return 0
    section = plan.section
    if plan.role is Role.LAUNCHER and plan.finished is not None and not args.dry_run:
        from ._util import info

        info(checks.finished_line(plan))                       # resuming a finished run: nothing to launch
        return 0
    if plan.role is Role.LAUNCHER:
        cmd, env = launch.launch_command(section, args.recipe, args.overrides)
        if args.dry_run:
            print(launch.format_command(cmd, env))
            return 0
        checked = checks.check(plan)                           # every check once, here, before N workers start
        machines = f" on machine {section.machine_rank} of {section.num_machines}" if section.num_machines > 1 else ""
        print(f"[alignkit] launching {section.num_processes} process(es){machines}: "
              f"{launch.format_command(cmd, env)}", file=sys.stderr)
        out = Path(checked.config.output_dir)
        try:                                                   # 4. launch: the workers run steps 2-6
            with launch.output_dir_lock(plan):
                launch.run_workers(section, args.recipe, args.overrides, out / "logs")
        except launch.LaunchError as exc:
            from .run.outputs import mark_failed

            mark_failed(out, str(exc))
            # on a line of its own: a worker stopped mid-update leaves its progress bar's line open
            print(f"\nalignkit: error: {exc}", file=sys.stderr)
            return 1
        return 0
    if getattr(args, "dry_run", False):
        print(f"{args.recipe}: single process (no distributed section with num_processes > 1 or deepspeed); run "
              f"alignkit train {args.recipe}")
        return 0
    from .run import train

    train(recipe, plan)                                        # 2-6 in this process (alignkit/run/__init__.py)
    return 0


def _first_line(exc: BaseException) -> str:
    from ._util import first_line

    return first_line(exc)[:300]


def _write_error_log(exc: BaseException, argv: list[str] | None) -> Path | None:
    """The traceback of an unexpected failure, with the command, in $ALIGNKIT_CACHE/logs (else the temp folder)."""
    import tempfile
    import time
    import traceback

    from .models import cache_dir

    text = (f"alignkit {' '.join(sys.argv[1:] if argv is None else argv)}\n"
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n{''.join(traceback.format_exception(exc))}")
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _one_line_warnings()
    # Deprecation chatter from inside transformers/torch that a recipe user cannot act on.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true", category=UserWarning)
    if "DS_ACCELERATOR" not in os.environ:
        from .trainers._common import accelerator_available

        if not accelerator_available():
            # DeepSpeed (imported by accelerate and TRL when installed) otherwise prints a warning on stdout at
            # import that it fell back to the CPU; naming the CPU accelerator is what it would pick anyway.
            os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        if args.command == "dashboard":
            return _run_dashboard(args)
        if args.command == "plot":
            from .plot import plot_run

            for path in plot_run(args.run, args.output, overwrite=args.overwrite):
                print(path)
            return 0
        if args.command == "eval":
            from .run.launch import set_threads

            set_threads(say=False)  # an error in the eval arguments stays the only line printed
            return _run_eval(args)
        from .console import quiet_third_party

        quiet_third_party()
        return _run_recipe(args)
    except Exception as exc:
        from .run.launch import LAUNCHED_BY_ALIGNKIT, record_worker_failure
        from .run.plan import is_launched_worker

        if is_launched_worker() and os.environ.get(LAUNCHED_BY_ALIGNKIT):
            # a worker of `alignkit train`'s launcher: the launcher reports the job's failure in one line
            record_worker_failure(exc)
            return 1
        if isinstance(exc, _user_errors()):
            print(f"alignkit: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        from .run.execute import TrainingStopped

        if isinstance(exc, TrainingStopped):  # a run that failed on purpose, with its own one line
            print(f"\nalignkit: error: {exc}", file=sys.stderr)
            return 1
        if args.debug or os.environ.get("ALIGNKIT_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        log = _write_error_log(exc, argv)
        where = f"the traceback is in {log}" if log is not None else "no log could be written"
        print(f"\nalignkit: error: unexpected {type(exc).__name__}: {_first_line(exc)}; {where} (--debug shows it "
              "here). Please report it with that log.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
