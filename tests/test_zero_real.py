"""Real pretrained models under DeepSpeed ZeRO-3 with 2 CPU processes, as benchmarks/zero_real.py runs them (`make
zero-real` covers every trainer under ZeRO-2 and ZeRO-3; docs/distributed.md has its table): MiniLM-L6 fully
fine-tuned as a causal reward model, and SmolLM2-135M-Instruct with a LoRA adapter under f-DPO, both with gradient
checkpointing. Each equals the one-process run on the same global batch, saves a normal Hugging Face folder (the
whole model, or the adapter) that loads without DeepSpeed and gives the trained model's logits, and (MiniLM) resumes
from a ZeRO-3 checkpoint as the uninterrupted run."""

import sys
from pathlib import Path

import pytest
import torch

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import zero_real  # noqa: E402

pytest.importorskip("deepspeed")


def _reload_logits(case: str, folder: Path) -> torch.Tensor:
    """The saved model's logits on zero_real.PROBE, loaded the way a user would, without DeepSpeed."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.models import resolve_model_path

    if case == "crm-minilm":
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        from peft import PeftModel

        base = resolve_model_path("builtin:smollm2-135m-instruct")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder)
        tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        return model.eval()(input_ids=tok(zero_real.PROBE, return_tensors="pt")["input_ids"]).logits.float()


# Tolerances, measured (float32, gloo, 1 thread per process; benchmarks/zero_real.py prints the same figures): MiniLM
# (4 steps, lr 1e-4) within 6.0e-6 relative of one process in the loss and 2.7e-4 of the update's norm in the weights;
# SmolLM2 LoRA (2 steps) 1.7e-7 and 1.5e-4. The bounds are 15-60 times those (another CPU's kernels round otherwise);
# the logits of the reloaded folder equal the trained model's to 1e-6 or better (the same weights, the same kernels).
@pytest.mark.parametrize("case,steps", [("crm-minilm", 4), ("fdpo-lora", 2)])
def test_a_real_model_under_zero3_trains_as_one_process_saves_and_resumes(case, steps, tmp_path):
    port = free_port()
    resume = case == "crm-minilm"
    single = zero_real.launch(case, "single", tmp_path / "single", steps, port, max_length=64)
    runs = zero_real.launch(case, "zero3", tmp_path / "zero3", steps, port, resume=resume, max_length=64)
    assert [r["world"] for r in runs] == [2, 2] and all(r["deepspeed"] for r in runs)
    row = zero_real.compare(case, single, runs, tmp_path / "single", tmp_path / "zero3")
    assert row["loss_rel"] < 1e-4 and row["diff_over_update"] < 1e-2, row
    # ZeRO-3 holds half of the weights on each rank
    assert row["weights_gb"][0] == pytest.approx(row["weights_gb_single"] / 2, rel=0.02)
    # the saved folder is a plain Hugging Face checkpoint: it loads without DeepSpeed, with the trained logits
    saved = _reload_logits(case, tmp_path / "zero3" / "final")
    torch.testing.assert_close(saved, torch.load(tmp_path / "zero3" / "logits.pt"), rtol=0, atol=1e-4)
    if resume:  # resumed from the ZeRO-3 checkpoint at the half: the uninterrupted run's losses and weights
        # (the resumed trainer's log history starts with the checkpoint's: the first half is the main run's)
        assert runs[0]["resumed_losses"][steps // 2:] == pytest.approx(runs[0]["losses"][steps // 2:], rel=1e-6)
        resumed = _reload_logits(case, tmp_path / "zero3" / "resumed")
        torch.testing.assert_close(resumed, saved, rtol=0, atol=1e-6)
