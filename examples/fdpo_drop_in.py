"""f-DPO as a drop-in for TRL's DPOTrainer in an existing script.

Runs offline on a CPU in a few seconds with the built-in tiny model and synthetic data:

    python examples/fdpo_drop_in.py            # or: python examples/fdpo_drop_in.py --divergence forward_kl

In your own script, replace `DPOConfig`/`DPOTrainer` by `FDPOConfig`/`FDPOTrainer` and add `divergence`.
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit import FDPOConfig, FDPOTrainer
from alignkit.data.synthetic import sentiment
from alignkit.models import build_tiny_model


def steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"give a whole number of steps of at least 1, not {text!r}")
    return int(text)


def alpha_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"give a number strictly between 0 and 1, not {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--divergence", default="jsd", choices=["reverse_kl", "forward_kl", "jsd", "alpha"])
    parser.add_argument("--alpha", type=alpha_value, default=None, help="for --divergence alpha: in (0, 1)")
    parser.add_argument("--max-steps", type=steps, default=40)
    parser.add_argument("--output-dir", default="outputs/fdpo-drop-in")
    opts = parser.parse_args(argv)
    if (opts.divergence == "alpha") != (opts.alpha is not None):
        parser.error("--alpha goes with --divergence alpha, and only with it (e.g. --divergence alpha --alpha 0.5)")

    path = build_tiny_model("tiny-llama")  # any causal LM folder or hub id works the same way
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    args = FDPOConfig(
        output_dir=opts.output_dir,
        divergence=opts.divergence,
        alpha=opts.alpha,
        beta=0.1,
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        max_steps=opts.max_steps,
        logging_steps=10,
        eval_strategy="steps",
        eval_steps=opts.max_steps,
        save_strategy="no",
        report_to="none",
    )
    trainer = FDPOTrainer(
        model=model,
        args=args,
        train_dataset=sentiment("train"),
        eval_dataset=sentiment("test"),
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval reward accuracy {metrics['eval_rewards/accuracies']:.2f}, ECE {metrics['eval_calibration/ece']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
