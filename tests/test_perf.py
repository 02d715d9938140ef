"""perf/* metrics: the FLOPs formula against torch's own count of a forward and backward pass and against the
model's shape counted by hand, and every trainer logging tokens/s, MFU and peak memory."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from alignkit.metrics.perf import (DEVICE_PEAK_TFLOPS, device_peak_tflops, flops_per_token, matmul_parameters,
                                   peak_memory_gb, training_flops)
from tests.conftest import base_args


def _llama():
    """A Llama with grouped-query attention and an untied output layer, so every term of the count differs."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                         attn_implementation="eager")
    return LlamaForCausalLM(config), config


def test_matmul_parameters_match_a_hand_count_of_the_shape():
    model, c = _llama()
    head = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head, c.num_key_value_heads * head
    per_layer = c.hidden_size * q + 2 * c.hidden_size * kv + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    by_hand = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size  # + the output layer
    assert matmul_parameters(model) == by_hand


@pytest.mark.parametrize("seq_len", [8, 24])
def test_training_flops_match_torchs_count_of_forward_and_backward(seq_len):
    """torch.utils.flop_counter counts every matmul (and attention product) that a forward and backward pass of the
    model actually runs: our formula must give the same number."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = _llama()
    batch = 3
    ids = torch.randint(0, 101, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counted = counter.get_total_flops()
    assert training_flops(model, batch * seq_len, batch * seq_len ** 2) == pytest.approx(counted, rel=1e-9)
    assert flops_per_token(model, seq_len) * batch * seq_len == pytest.approx(counted, rel=1e-9)


def test_device_peak_and_memory_on_this_machine():
    assert all(v > 0 for v in DEVICE_PEAK_TFLOPS.values())
    if not torch.cuda.is_available():
        assert device_peak_tflops() is None  # a CPU's peak is not guessed
    assert 0.05 < peak_memory_gb() < 1000


def _perf_logs(trainer):
    return [e for e in trainer.state.log_history if "perf/tokens_per_second" in e]


def _check(trainer, mfu: bool):
    logs = _perf_logs(trainer)
    assert len(logs) == trainer.state.global_step  # logging_steps=1: every training log has them
    for e in logs:
        assert e["perf/tokens_per_second"] > 0 and e["perf/peak_memory_gb"] > 0.05
        assert ("perf/mfu" in e) == mfu
        if mfu:
            assert 0 < e["perf/mfu"] < 1
    assert not any(k.startswith("perf/") for e in trainer.state.log_history if "train_runtime" in e for k in e)


def test_fdpo_logs_perf_metrics_with_mfu_from_the_configured_peak(tiny_model_path, tokenizer, pair_dataset, tmp_path):
    from alignkit import FDPOConfig, FDPOTrainer

    args = FDPOConfig(**base_args(tmp_path, peak_tflops=1.0))  # a peak given: perf/mfu is logged on a CPU too
    trainer = FDPOTrainer(tiny_model_path, args=args, train_dataset=pair_dataset(16), processing_class=tokenizer)
    trainer.train()
    _check(trainer, mfu=True)
    # the MFU is the FLOPs formula applied to the logged throughput (sequences of this batch's lengths)
    e = _perf_logs(trainer)[0]
    assert e["perf/mfu"] * 1e12 <= e["perf/tokens_per_second"] * flops_per_token(trainer.model, 64)


def test_multisample_counts_the_packed_tokens(tiny_model_path, tokenizer, tmp_path):
    from alignkit import MultiSampleDPOConfig, MultiSampleDPOTrainer

    rows = [{"prompt": f"Prompt {i}:", "chosen": [" good one", " fine"], "rejected": [" bad", " awful here"]}
            for i in range(8)]
    trainer = MultiSampleDPOTrainer(tiny_model_path, args=MultiSampleDPOConfig(**base_args(tmp_path, shared_prefix=True,
                                    per_device_train_batch_size=4)),
                                    train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    _check(trainer, mfu=False)


def test_causal_reward_and_ppo_log_perf_metrics(tiny_model_path, tokenizer, tmp_path):
    from alignkit import CausalRewardConfig, CausalRewardTrainer, PPOConfig, PPOTrainer
    from alignkit.data.synthetic import sentiment, sycophancy

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    crm = CausalRewardTrainer(model=rm, args=CausalRewardConfig(**base_args(tmp_path / "crm",
                              attributes=["sycophantic"])), train_dataset=sycophancy("train", num_samples=16),
                              processing_class=tokenizer)
    crm.train()
    _check(crm, mfu=False)

    ppo = PPOTrainer(args=PPOConfig(**base_args(tmp_path / "ppo", response_length=4, peak_tflops=1.0)),
                     processing_class=tokenizer, model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                     ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_path),
                     reward_model=lambda prompts, completions, **_: [float(len(c)) for c in completions],
                     value_model=AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1),
                     train_dataset=sentiment("train", num_samples=16).select_columns(["prompt"]))
    ppo.train()
    _check(ppo, mfu=True)


def test_peak_tflops_must_be_positive(tmp_path):
    from alignkit import FDPOConfig

    with pytest.raises(ValueError, match="peak_tflops must be > 0"):
        FDPOConfig(**base_args(tmp_path, peak_tflops=0))


def test_peak_memory_is_the_process_own_not_its_parents():
    """A process started by a parent that holds 1.5 GB reports its own peak resident set: Linux carries a parent's
    high-water mark over fork and exec into the child's `ru_maxrss` (so the workers of a launcher, or a benchmark's
    runs, read the launcher's memory as theirs); /proc/self/status' VmHWM belongs to the process' own address space."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's")
    ballast = bytearray(1_500_000_000)  # touched: resident
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    code = "from alignkit.metrics.perf import peak_memory_gb; print(peak_memory_gb('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    del ballast
    assert float(out.strip().splitlines()[-1]) < 1.2  # measured: 0.29 (torch imported); the parent's is above 1.5
