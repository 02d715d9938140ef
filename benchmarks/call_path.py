"""Count the moves between alignkit's modules on one command's path (issue: a run path that reads top to bottom).

    python benchmarks/call_path.py                      # alignkit train recipes/quickstart.yaml, 2 steps
    python benchmarks/call_path.py -- validate recipes/quickstart.yaml
    python benchmarks/call_path.py --only 'alignkit\.(cli|run.*)'   # the run pipeline's own modules

Traces every call from one alignkit module into another (sys.setprofile) while the command runs and keeps each
call site once (caller function -> callee function, first occurrence first), so loops over steps count once. A
move is such a call; a *back-call* is a move into a module the path had already entered before and left. Prints
the totals, the back-calls per module, and with --list every move in order.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "alignkit") + os.sep


def _module(code) -> str | None:
    path = code.co_filename
    if not path.startswith(PACKAGE):
        return None
    return "alignkit." + path[len(PACKAGE):-3].replace(os.sep, ".").removesuffix(".__init__")


def trace(argv: list[str]) -> list[tuple[str, str, str, str]]:
    moves: dict[tuple, None] = {}

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = _module(frame.f_code)
        caller_frame = frame.f_back
        caller = _module(caller_frame.f_code) if caller_frame is not None else None
        if callee is None or caller is None or callee == caller:
            return
        moves.setdefault((caller, caller_frame.f_code.co_qualname, callee, frame.f_code.co_qualname), None)

    from alignkit import cli

    sys.setprofile(profile)
    try:
        code = cli.main(argv)
    finally:
        sys.setprofile(None)
    if code:
        raise SystemExit(f"the command failed (exit {code})")
    return list(moves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print every move in order")
    parser.add_argument("--only", metavar="REGEX", help="count only moves between modules whose names match, e.g. "
                        "'alignkit\\.(cli|run|runner|recipes|distributed|estimate)' for the run pipeline")
    parser.add_argument("command", nargs="*", help="an alignkit command (default: train the quickstart, 2 steps)")
    args = parser.parse_args()
    out = ROOT / "outputs" / "call_path"
    argv = args.command or ["train", str(ROOT / "recipes" / "quickstart.yaml"), "--set", "max_steps=2",
                            "--set", "eval_strategy=no", "--set", "eval_on_start=false",
                            "--set", "generate_during_eval=false", "--set", f"output_dir={out}",
                            "--set", "overwrite_output_dir=true"]
    moves = trace(argv)
    if args.only:
        import re

        keep = re.compile(args.only)
        moves = [m for m in moves if keep.fullmatch(m[0]) and keep.fullmatch(m[2])]
    entered: list[str] = []  # modules in the order the path first entered them
    back = collections.Counter()
    for caller, caller_fn, callee, callee_fn in moves:
        if caller not in entered:
            entered.append(caller)
        if callee in entered:
            back[callee] += 1
            mark = "  <- back"
        else:
            entered.append(callee)
            mark = ""
        if args.list:
            print(f"{caller}.{caller_fn} -> {callee}.{callee_fn}{mark}")
    print(f"alignkit {' '.join(argv[:2])}: {len(moves)} moves between {len(entered)} modules, "
          f"{sum(back.values())} of them back into a module already entered")
    for module, n in back.most_common():
        print(f"  {module}: {n}")


if __name__ == "__main__":
    main()
