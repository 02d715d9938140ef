"""`alignkit plan`: what a run needs, from configs alone. Parameters and trainable parameters equal the real models';
the memory of weights and optimizer states equals what a trained trainer holds; with 16-bit mixed precision and every
weight trained, the model states equal DeepSpeed's own estimator; the what-if prices a step from the stated MFU; it
runs on every recipe, and bad flags end with one line."""

import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.run.estimate import GPUS, deepspeed_estimate, gpu_peak_tflops, parse_gpus, plan_recipe
from alignkit.run.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_plan_runs_on_every_recipe(recipe, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their data files from the repository's root
    assert main(["plan", recipe]) == 0
    out = capsys.readouterr().out
    assert "| policy" in out or "| reward model (trained)" in out
    assert "per device:" in out and "tokens per optimizer step:" in out


def test_counts_and_one_process_memory_are_the_trained_trainers(tiny_model_path, tmp_path, monkeypatch):
    """The quickstart's f-DPO run, with and without LoRA: the parameters the plan counts on the meta device are the
    built models', and the memory of weights and optimizer states (AdamW's two moments) is the bytes of those
    tensors after a step, exactly."""
    from alignkit.run.recipe import parse_recipe
    from alignkit.run import train

    monkeypatch.chdir(tmp_path)
    for peft in (None, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}):
        raw = {"method": "fdpo", "model": {"name_or_path": "builtin:tiny-llama", "dtype": "float32"},
               "dataset": {"name": "builtin:sentiment", "builtin_kwargs": {"num_samples": 16}}, "max_steps": 1,
               "per_device_train_batch_size": 4, "report_to": "none", "save_strategy": "no", "bf16": False,
               "output_dir": str(tmp_path / f"run{peft is not None}"), **({"peft": peft} if peft else {})}
        recipe = parse_recipe(raw, source="r.yaml")
        plan = plan_recipe(recipe)
        trained = {}

        import alignkit.run.build as build

        real_train = build.trainer_class

        def spy(method):
            cls = real_train(method)

            class Spy(cls):
                def train(self, *a, **k):
                    out = super().train(*a, **k)
                    trained["trainer"] = self
                    return out
            return Spy

        monkeypatch.setattr(build, "trainer_class", spy)
        train(recipe)
        trainer = trained["trainer"]
        model = trainer.model
        policy = plan.models[0]
        assert policy.params == sum(p.numel() for p in model.parameters())
        assert policy.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if trainer.ref_model is not None:
            weights += sum(p.numel() * p.element_size() for p in trainer.ref_model.parameters())
            ref_params = sum(p.numel() for p in trainer.ref_model.parameters())
            assert len(plan.models) == 2 and plan.models[1].params == ref_params
        else:
            assert len(plan.models) == 1  # LoRA: the reference is the adapter switched off
        assert sum(m.weights_gb for m in plan.models) * 1e9 == pytest.approx(weights)
        state = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim() > 0)
        assert policy.optimizer_gb * 1e9 == pytest.approx(state)
        monkeypatch.setattr(build, "trainer_class", real_train)


@pytest.mark.parametrize("stage", [2, 3])
def test_mixed_precision_model_states_are_deepspeeds_estimate(stage, tmp_path):
    """A full fine-tune in bf16 under ZeRO-2/3 on 2x8 GPUs (no reference model: a reward model): weights, gradients
    and optimizer states per GPU add up to DeepSpeed's own estimator for the same parameter count."""
    pytest.importorskip("deepspeed")
    recipe = load_recipe(ROOT / "recipes" / "crm-sycophancy.yaml",
                         [f"distributed.deepspeed=zero{stage}", "bf16=true", f"output_dir={tmp_path}"])
    plan = plan_recipe(recipe, gpus="2x8xH100")
    (m,) = plan.models
    ours = m.weights_gb + m.gradients_gb + m.optimizer_gb
    theirs = deepspeed_estimate(m.params, m.largest_layer, 8, 2, stage)
    assert plan.deepspeed_estimate_gb == pytest.approx(theirs)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_gpus_what_if_prices_a_step_and_says_whether_it_fits(capsys):
    machines, per, name = parse_gpus("2x8xH100")
    assert (machines, per, name) == (2, 8, "H100")
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    plan = plan_recipe(recipe, gpus="8xH100", mfu=0.5)
    assert plan.devices == 8 and plan.gpu_memory_gb == GPUS["H100"] == 80
    assert plan.step_seconds == pytest.approx(plan.flops_per_step / (8 * gpu_peak_tflops("H100") * 1e12 * 0.5))
    assert plan.tokens_per_step == 8 * plan.sequences_per_micro_batch * plan.sequence_length
    assert main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), "--gpus", "1xL4", "--seq-len", "400000"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["params"] > 0


@pytest.mark.parametrize("args,message", [
    (["--gpus", "8xH1000"], "--gpus '8xH1000': give COUNTxNAME"),
    (["--gpus", "0xH100"], "--gpus '0xH100'"),
    (["--mfu", "1.5"], "--mfu 1.5: a fraction in (0, 1]"),
    (["--seq-len", "0"], "--seq-len 0"),
    (["--set", "distributed.deepspeed=zero9"], "distributed.deepspeed"),
    (["--set", "model.name_or_path=/no/such/model"], "no such folder"),
])
def test_bad_plan_arguments_end_with_one_line(args, message, capsys):
    assert main(["plan", str(ROOT / "recipes" / "quickstart.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
