"""SmolLM2's random-number bias before and after multi-sample training, as numbers and a picture.

Run after `alignkit train recipes/real/mipo-random-numbers.yaml` (`make demo-real` does both):

    python examples/real_demo.py outputs/real/mipo-random-numbers

It asks the base model and the trained one (the run's LoRA adapter on the same base) for a random integer in
[a, b] on held-out intervals (widths outside the training widths 5-10), `k` times each, and prints per model the
fraction of valid answers (an integer in [a, b]), the entropy of the answers per prompt (uniform over 16 draws of
a wide interval: about 2.7 nats) and how often it answers `a` itself; the histograms go to `<run>/demo.png`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "reproduce"))
from _common import count, pyplot, sample_groups, setup  # noqa: E402
from random_numbers_real import MODEL, intervals, prompt_text, score  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="output_dir of a recipes/real/mipo-random-numbers.yaml run (a LoRA adapter)")
    p.add_argument("--prompts", type=count, default=20, help="held-out intervals to ask about")
    p.add_argument("--k", type=count, default=16, help="answers per interval")
    p.add_argument("--threads", type=count, default=None)
    a = p.parse_args(argv)
    setup(a.threads)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.metrics import first_integer
    from alignkit.models import resolve_model_path

    run = Path(a.run)
    if not (run / "adapter_config.json").is_file():
        raise SystemExit(f"{run}: no LoRA adapter there; run `alignkit train recipes/real/mipo-random-numbers.yaml` "
                         "first (or give its output_dir).")
    base_path = resolve_model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(base_path)
    bounds = intervals("test", a.prompts, seed=1)
    prompts = [prompt_text(tok, lo, hi) for lo, hi in bounds]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    answers = {"before": sample_groups(base, tok, prompts, a.k, seed=0)}
    trained = PeftModel.from_pretrained(base, str(run)).eval()
    answers["after"] = sample_groups(trained, tok, prompts, a.k, seed=0)

    figures = {}
    for name, groups in answers.items():
        _, agg = score(groups, bounds)
        figures[name] = agg
        print(f"{name:>6}: valid answers {agg['valid_fraction']:.0%}, entropy per prompt {agg['entropy']:.2f} nats, "
              f"answers a itself {agg['answers_a']:.0%}")
        print(f"        e.g. [{bounds[0][0]}, {bounds[0][1]}]: {', '.join(repr(c) for c in groups[0][:6])}")
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    show = [i for i, (lo, hi) in enumerate(bounds) if hi - lo <= 30][:4] or list(range(min(4, len(bounds))))
    fig, axes = plt.subplots(2, len(show), figsize=(3.2 * len(show), 4.4), squeeze=False)
    for c, i in enumerate(show):
        lo, hi = bounds[i]
        xs = list(range(lo, hi + 1))
        for r, name in enumerate(answers):
            got = [first_integer(s) for s in answers[name][i]]
            axes[r][c].bar(xs, [got.count(x) for x in xs], color="#4C72B0" if name == "before" else "#55A868")
            invalid = sum(x is None or not lo <= x <= hi for x in got)
            axes[r][c].set_title(f"{name}: [{lo}, {hi}], {invalid}/{len(got)} invalid", fontsize=8)
            axes[r][c].tick_params(labelsize=6)
            axes[r][c].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"SmolLM2-135M-Instruct's answers to 'a random integer between a and b' ({a.k} each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(run / "demo.png", dpi=100)
    print(f"[alignkit] histograms: {run / 'demo.png'}")
    return figures


if __name__ == "__main__":
    main()
