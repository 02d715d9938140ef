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


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--divergence", default="jsd", choices=["reverse_kl", "forward_kl", "jsd", "alpha"])
    parser.add_argument("--alpha", type=float, default=None, help="for --divergence alpha: in (0, 1), default 0.5")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--output-dir", default="outputs/fdpo-drop-in")
    opts = parser.parse_args(argv)

    # The config checks the options (max_steps >= 1, alpha in (0, 1)); built before the model, so that a bad value
    # costs nothing and reads as one line, as argparse's own errors do.
    try:
        args = FDPOConfig(
            output_dir=opts.output_dir,
            divergence=opts.divergence,
            alpha=opts.alpha,  # with another divergence, FDPOConfig warns that it is ignored
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
    except ValueError as error:
        parser.error(str(error))

    path = build_tiny_model("tiny-llama")  # any causal LM folder or hub id works the same way
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

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
