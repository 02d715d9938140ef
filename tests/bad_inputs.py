"""The bad-input table: inputs a user can get wrong, each run through the `alignkit` CLI.

Every case must end with exit code 2, no traceback, and one line `alignkit: error: ...` that names the key,
flag or file (``names``) and says what to do (``fix``). tests/test_bad_inputs.py runs them all;
``python tests/bad_inputs.py`` prints the table of docs/bad-inputs.md (input -> the message it gets).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
PPO = str(ROOT / "recipes" / "ppo-fdiv.yaml")


@dataclass
class Case:
    id: str
    what: str  # the input, in words (docs)
    argv: list[str]  # with {dir} for the case's folder and {files} entries written first
    names: str  # the key / flag / file the message must name
    fix: str  # a fragment of the fix the message must give
    files: dict[str, str | bytes] | None = None  # relative name -> content


def _recipe(extra: str = "", method: str = "fdpo", model: str = "builtin:tiny-llama",
            dataset: str = "builtin:sentiment") -> str:
    return (f"method: {method}\nmodel: {model}\ndataset: {dataset}\nreport_to: none\nmax_steps: 1\n"
            f"output_dir: {{dir}}/out\n{extra}")


def _model_files(folder: str, model_type: str, architecture: str, **config) -> dict[str, str]:
    """A model folder with a config.json (no weights: the checks read configs only) and a tokenizer config."""
    cfg = {"model_type": model_type, "architectures": [architecture], "vocab_size": 1024, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, **config}
    return {f"{folder}/config.json": json.dumps(cfg), f"{folder}/tokenizer_config.json": "{}"}


def _jsonl(rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


PAIR = {"prompt": "Write a review of the movie.", "chosen": "A great movie.", "rejected": "An awful movie."}
CHAT = {"prompt": [{"role": "user", "content": "Review the movie."}],
        "chosen": [{"role": "assistant", "content": "Great."}], "rejected": [{"role": "assistant", "content": "Bad."}]}


def _pairs(n=64, **changes) -> str:
    rows = [dict(PAIR) for _ in range(n)]
    for i, row in changes.items():
        rows[int(i[1:])] = row
    return _jsonl(rows)


def _data_recipe(extra: str = "", name: str = "data.jsonl", method: str = "fdpo") -> str:
    return _recipe(extra, method=method, dataset=f"{{dir}}/{name}")


def _train(name: str = "r.yaml") -> list[str]:
    return ["train", f"{{dir}}/{name}"]


def _validate(name: str = "r.yaml") -> list[str]:
    return ["validate", f"{{dir}}/{name}"]


_TINY_CONFIG = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "vocab_size": 1029})
_TWO_LABELS = json.dumps({**json.loads(_TINY_CONFIG), "architectures": ["LlamaForSequenceClassification"],
                          "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1}})
_PPO_REWARD_MODEL = ("method: ppo\nmodel: builtin:tiny-llama\ndataset: builtin:sentiment\nreport_to: none\n"
                     "max_steps: 1\noutput_dir: {dir}/out\nreward: {model: {dir}/rm}\n")

CASES: list[Case] = [
    # ---- the recipe file
    Case("recipe-missing", "a recipe path that does not exist", ["train", "{dir}/nope.yaml"], "nope.yaml",
         "does not exist"),
    Case("recipe-folder", "a folder given as the recipe", ["train", "{dir}"], "is a folder", "path of the YAML file"),
    Case("recipe-empty", "an empty recipe file", _validate(), "r.yaml", "recipes/quickstart.yaml", {"r.yaml": ""}),
    Case("recipe-not-utf8", "a recipe that is not UTF-8 (Latin-1)", _validate(), "line 2", "save the file as UTF-8",
         {"r.yaml": b"method: fdpo\n# r\xe9sum\xe9\n"}),
    Case("recipe-malformed", "malformed YAML", _validate(), "line", "Check indentation",
         {"r.yaml": "method: fdpo\nmodel: {name_or_path: x\n beta: [1,\n"}),
    Case("recipe-list", "a recipe that is a YAML list", _validate(), "r.yaml", "method: ...",
         {"r.yaml": "- method: fdpo\n- beta: 0.1\n"}),
    Case("recipe-duplicate-key", "the same key twice (YAML keeps the last)", _validate(), "'beta'",
         "lines 7 and 9", {"r.yaml": _recipe("beta: 0.1\nseed: 1\nbeta: 0.5\n")}),
    Case("recipe-deep", "YAML nested 10,000 levels deep", _validate(), "nested", "a few levels deep",
         {"r.yaml": "method: fdpo\nx: " + "[" * 10000 + "]" * 10000 + "\n"}),
    Case("recipe-no-method", "no method", _validate(), "method", "fdpo, mdpo, crm, ppo",
         {"r.yaml": "model: builtin:tiny-llama\ndataset: builtin:sentiment\n"}),
    Case("recipe-unknown-method", "a misspelled method", _validate(), "'fdp'", "Did you mean 'fdpo'?",
         {"r.yaml": _recipe(method="fdp")}),
    Case("recipe-no-model", "no model section", _validate(), "'model'", "name_or_path",
         {"r.yaml": "method: fdpo\ndataset: builtin:sentiment\n"}),
    Case("recipe-null-dataset", "an empty dataset section", _validate(), "'dataset'", "builtin:sentiment",
         {"r.yaml": "method: fdpo\nmodel: builtin:tiny-llama\ndataset:\n"}),
    Case("recipe-unknown-key", "a misspelled config field", _validate(), "'learning_rte'", "'learning_rate'",
         {"r.yaml": _recipe("learning_rte: 1e-3\n")}),
    Case("recipe-unknown-section-key", "a misspelled key in a section", _validate(), "dataset.eval_splt",
         "'eval_split'", {"r.yaml": _recipe(dataset="{name: builtin:sentiment, eval_splt: test}")}),
    Case("recipe-unknown-peft-key", "an unknown peft key", _validate(), "peft.rank", "peft.LoraConfig",
         {"r.yaml": _recipe("peft: {rank: 4}\n")}),
    Case("recipe-section-not-mapping", "a section that is a list", _validate(), "'wandb'", "must be a mapping",
         {"r.yaml": _recipe("wandb: [a, b]\n")}),
    Case("set-no-equals", "--set without key=value", ["validate", QUICKSTART, "--set", "beta"], "--set 'beta'",
         "expected key=value"),
    Case("set-into-value", "--set into a value that is not a section", ["validate", QUICKSTART, "--set", "beta.x=1"],
         "beta", "is not a section"),
    # ---- values
    Case("value-not-a-number", "beta: lots", _validate(), "beta", "a number", {"r.yaml": _recipe("beta: lots\n")}),
    Case("value-mapping-for-number", "beta: {value: 0.1}", _validate(), "beta", "a number",
         {"r.yaml": _recipe("beta: {value: 0.1}\n")}),
    Case("value-list-for-number", "learning_rate: [1e-3]", _validate(), "learning_rate", "a number",
         {"r.yaml": _recipe("learning_rate: [1e-3]\n")}),
    Case("beta-negative", "beta: -0.1 (would move towards the rejected answers)", _validate(), "beta", "e.g. beta: 0.1",
         {"r.yaml": _recipe("beta: -0.1\n")}),
    Case("beta-zero", "beta: 0", _validate(), "beta", "> 0", {"r.yaml": _recipe("beta: 0\n")}),
    Case("lr-negative", "a negative learning rate", _validate(), "learning_rate", ">= 0",
         {"r.yaml": _recipe("learning_rate: -1e-3\n")}),
    Case("batch-zero", "per_device_train_batch_size: 0", _validate(), "per_device_train_batch_size", ">= 1",
         {"r.yaml": _recipe("per_device_train_batch_size: 0\n")}),
    Case("grad-accum-zero", "gradient_accumulation_steps: 0", _validate(), "gradient_accumulation_steps", ">= 1",
         {"r.yaml": _recipe("gradient_accumulation_steps: 0\n")}),
    Case("max-steps-fraction", "max_steps: 2.5", _validate(), "max_steps", "an integer",
         {"r.yaml": _recipe().replace("max_steps: 1", "max_steps: 2.5")}),
    Case("nothing-to-train", "num_train_epochs: 0 without max_steps", _validate(), "num_train_epochs",
         "max_steps >= 1", {"r.yaml": _recipe().replace("max_steps: 1", "num_train_epochs: 0")}),
    Case("seed-negative", "seed: -1", _validate(), "seed", "[0, 2**32)", {"r.yaml": _recipe("seed: -1\n")}),
    Case("bool-not-bool", "a true/false field given 'maybe'", _validate(), "gradient_checkpointing", "true or false",
         {"r.yaml": _recipe("gradient_checkpointing: maybe\n")}),
    Case("alpha-out-of-range", "divergence: alpha with alpha: 1.5", _validate(), "alpha", "strictly between 0 and 1",
         {"r.yaml": _recipe("divergence: alpha\nalpha: 1.5\n")}),
    Case("divergence-total-variation", "divergence: total_variation", _validate(), "total_variation", "Theorem 1",
         {"r.yaml": _recipe("divergence: total_variation\n")}),
    Case("num-bins-one", "Causal DPO with num_bins: 1", _validate(), "num_bins", "at least two",
         {"r.yaml": _recipe("mmd_coef: 1.0\nnum_bins: 1\n")}),
    Case("mmd-negative", "mmd_coef: -1 (crm)", _validate(), "mmd_coef", "0 turns the MMD penalty off",
         {"r.yaml": _recipe("mmd_coef: -1\n", method="crm")}),
    Case("ppo-temperature-zero", "PPO with temperature: 0", ["validate", PPO, "--set", "temperature=0"], "temperature",
         "e.g. 0.7"),
    Case("dtype-unknown", "model.dtype: float8", _validate(), "model.dtype", "'bfloat16'",
         {"r.yaml": _recipe(model="{name_or_path: builtin:tiny-llama, dtype: float8}")}),
    Case("test-size-out-of-range", "dataset.test_size: 1.5", _validate(), "dataset.test_size", "(0, 1)",
         {"r.yaml": _recipe(dataset="{name: builtin:sentiment, test_size: 1.5}")}),
    Case("max-train-samples-zero", "dataset.max_train_samples: 0", _validate(), "dataset.max_train_samples", ">= 1",
         {"r.yaml": _recipe(dataset="{name: builtin:sentiment, max_train_samples: 0}")}),
    Case("eval-without-split", "eval_strategy: steps without an eval split", _validate(), "eval_strategy",
         "dataset.eval_split", {"r.yaml": _recipe("eval_strategy: steps\neval_steps: 1\n")}),
    # ---- data
    Case("data-missing-file", "a data file that does not exist", _validate(), "dataset.name", "check the path",
         {"r.yaml": _data_recipe(name="missing.jsonl")}),
    Case("data-unknown-extension", "a .txt data file", _validate(), "dataset.name", ".jsonl",
         {"r.yaml": _data_recipe(name="data.txt"), "data.txt": "hello\n"}),
    Case("data-empty-file", "an empty .jsonl file", _validate(), "data.jsonl", "one example per line",
         {"r.yaml": _data_recipe(), "data.jsonl": ""}),
    Case("data-broken-json-line", "a broken JSON line (line 3)", _validate(), "data.jsonl, line 3", "Fix or remove",
         {"r.yaml": _data_recipe(), "data.jsonl": _pairs(2) + '{"prompt": "p", "chosen": \n' + _pairs(2)}),
    Case("data-line-not-object", "a JSON line that is a list", _validate(), "line 2", "one object",
         {"r.yaml": _data_recipe(), "data.jsonl": _pairs(1) + '["a", "b"]\n'}),
    Case("data-missing-columns", "columns named differently, not mapped", _validate(), "'chosen'",
         "columns: {prompt: question", {"r.yaml": _data_recipe(),
                                        "data.jsonl": _jsonl([{"question": "q", "good": "a", "bad": "b"}] * 4)}),
    Case("data-mapping-absent-column", "a column mapping naming an absent column", _validate(), "'answer'",
         "its columns are", {"r.yaml": _recipe(dataset="{name: {dir}/data.jsonl, columns: {chosen: answer}}"),
                             "data.jsonl": _pairs(4)}),
    Case("data-null-row-40", "chosen is null in row 40", _validate(), "row 40", "Fix or drop that row",
         {"r.yaml": _data_recipe(), "data.jsonl": _pairs(64, r40={**PAIR, "chosen": None})}),
    Case("data-mixed-formats-later", "chat rows mixed with plain rows from row 30", _validate(), "row 30",
         "use one format", {"r.yaml": _data_recipe(), "data.jsonl": _pairs(64, r30=CHAT)}),
    Case("data-number-completion", "a number where a completion should be", _validate(), "row 5",
         "must be a string", {"r.yaml": _data_recipe(), "data.jsonl": _pairs(8, r5={**PAIR, "rejected": 3})}),
    Case("data-empty-completion", "an empty chosen completion", _validate(), "row 2", "Fix or drop",
         {"r.yaml": _data_recipe(), "data.jsonl": _pairs(8, r2={**PAIR, "chosen": "  "})}),
    Case("data-message-without-content", "a chat message with null content", _validate(), "row 1",
         "string 'content'", {"r.yaml": _data_recipe(), "data.jsonl": _jsonl(
             [CHAT, {**CHAT, "chosen": [{"role": "assistant", "content": None}]}])}),
    Case("data-all-identical", "chosen == rejected in every row", _validate(), "'chosen' and 'rejected'",
         "column mapping", {"r.yaml": _data_recipe(), "data.jsonl": _jsonl([{**PAIR, "rejected": PAIR["chosen"]}] * 8)}),
    Case("data-all-too-long", "every prompt longer than max_length", _validate(), "max_length",
         "Raise max_length", {"r.yaml": _data_recipe("max_length: 16\n"),
                              "data.jsonl": _jsonl([{**PAIR, "prompt": "Write a long review. " * 20}] * 8)}),
    Case("data-builtin-unknown", "an unknown built-in dataset", _validate(), "builtin:sentimnt",
         "Did you mean 'builtin:sentiment'?", {"r.yaml": _recipe(dataset="builtin:sentimnt")}),
    Case("data-builtin-kwargs", "an unknown option of a built-in dataset", _validate(), "dataset.builtin_kwargs",
         "takes num_samples", {"r.yaml": _recipe(dataset="{name: builtin:sentiment, builtin_kwargs: {num_sample: 3}}")}),
    Case("data-eval-split-of-file", "dataset.eval_split with a single file", _validate(), "dataset.eval_split",
         "dataset.test_size", {"r.yaml": _recipe(dataset="{name: {dir}/data.jsonl, eval_split: test}"),
                               "data.jsonl": _pairs(4)}),
    Case("data-groups-not-lists", "method mdpo on pair rows", _validate(), "'chosen'", "Wrap it in a list",
         {"r.yaml": _data_recipe(method="mdpo"), "data.jsonl": _pairs(4)}),
    Case("data-ppo-no-prompt", "method ppo on data without a prompt column", _validate(), "'prompt'",
         "columns: {prompt: question}", {"r.yaml": _PPO_REWARD_MODEL.replace("reward: {model: {dir}/rm}",
                                                                            "reward: {function: builtin:sentiment}")
                                         .replace("builtin:sentiment\nreport", "{dir}/data.jsonl\nreport"),
                                         "data.jsonl": _jsonl([{"question": "q"}] * 4)}),
    # ---- models
    Case("model-missing-folder", "a model folder that does not exist", _validate(), "model.name_or_path",
         "check the path", {"r.yaml": _recipe(model="./models/nope")}),
    Case("model-missing-two-slashes", "a missing local path that looks like org/name/x", _validate(),
         "model.name_or_path", "no such folder", {"r.yaml": _recipe(model="outputs/my-run/final")}),
    Case("model-no-config", "a model folder without config.json", _validate(), "model.name_or_path",
         "save_pretrained", {"r.yaml": _recipe(model="{dir}/empty-model"), "empty-model/notes.txt": "x"}),
    Case("model-no-tokenizer", "a model folder without a tokenizer", _validate(), "model.name_or_path",
         "tokenizer.save_pretrained", {"r.yaml": _recipe(model="{dir}/m"), "m/config.json": _TINY_CONFIG}),
    Case("model-is-a-file", "a file given as the model", _validate(), "model.name_or_path", "folder",
         {"r.yaml": _recipe(model="{dir}/weights.bin"), "weights.bin": "x"}),
    Case("model-hub-offline", "a hub id not in the cache, offline", _validate(), "model.name_or_path",
         "HF_HUB_OFFLINE", {"r.yaml": _recipe(model="someone/not-cached-model")}),
    Case("model-builtin-unknown", "an unknown built-in model", _validate(), "builtin:tiny-lama",
         "Did you mean 'builtin:tiny-llama'?", {"r.yaml": _recipe(model="builtin:tiny-lama")}),
    Case("model-ref-missing", "a reference model that does not exist", _validate(), "model.ref_name_or_path",
         "no such folder", {"r.yaml": _recipe(model="{name_or_path: builtin:tiny-llama, ref_name_or_path: ./ref}")}),
    Case("reward-model-missing", "PPO with a reward model folder that does not exist", _validate(), "reward.model",
         "no such folder", {"r.yaml": _PPO_REWARD_MODEL}),
    Case("reward-model-two-labels", "PPO with a 2-label classifier as reward model", _validate(), "reward.model",
         "one (a scalar score)", {"r.yaml": _PPO_REWARD_MODEL, "rm/config.json": _TWO_LABELS}),
    Case("reward-model-causal-lm", "PPO with a causal LM as reward model (random head)", _validate(), "reward.model",
         "sequence-classification model", {"r.yaml": _PPO_REWARD_MODEL, "rm/config.json": _TINY_CONFIG}),
    Case("reward-function-unknown", "an unknown built-in reward function", _validate(), "reward.function",
         "builtin:sentiment", {"r.yaml": _PPO_REWARD_MODEL.replace("{model: {dir}/rm}", "{function: builtin:nope}")}),
    Case("reward-function-unimportable", "a reward function that cannot be imported", _validate(), "reward.function",
         "check the module path", {"r.yaml": _PPO_REWARD_MODEL.replace("{model: {dir}/rm}",
                                                                      "{function: 'nowhere.mod:score'}")}),
    Case("reward-both-sources", "reward.model and reward.function both set", _validate(), "reward",
         "exactly one", {"r.yaml": _PPO_REWARD_MODEL.replace("{model: {dir}/rm}",
                                                            "{model: x, function: builtin:sentiment}")}),
    Case("reward-without-ppo", "a reward section for method fdpo", _validate(), "'reward'", "method 'ppo'",
         {"r.yaml": _recipe("reward: {function: builtin:sentiment}\n")}),
    Case("ppo-without-reward", "method ppo without a reward section", _validate(), "'reward'", "reward.function",
         {"r.yaml": _recipe(method="ppo")}),
    # ---- distributed
    Case("deepspeed-unknown-one-process", "distributed.deepspeed: zero7 with one process", _train(),
         "distributed.deepspeed", "zero2, zero3", {"r.yaml": _recipe("distributed: {deepspeed: zero7}\n")}),
    Case("deepspeed-unknown-validate", "distributed.deepspeed: zero7 (validate)", _validate(),
         "distributed.deepspeed", "zero2, zero3", {"r.yaml": _recipe("distributed: {deepspeed: zero7}\n")}),
    Case("offload-params-zero2", "offload_params with ZeRO-2", _train(), "distributed.offload_params", "zero3",
         {"r.yaml": _recipe("distributed: {num_processes: 2, deepspeed: zero2, offload_params: true}\n")}),
    Case("offload-without-deepspeed", "offload_optimizer without deepspeed", _validate(),
         "distributed.offload_optimizer", "distributed.deepspeed", {"r.yaml": _recipe(
             "distributed: {offload_optimizer: true}\n")}),
    Case("processes-zero", "distributed.num_processes: 0", _train(), "distributed.num_processes", ">= 1",
         {"r.yaml": _recipe("distributed: {num_processes: 0}\n")}),
    Case("machine-rank-out-of-range", "distributed.machine_rank 2 of num_machines 2", _train(),
         "machine_rank", "0..1", {"r.yaml": _recipe(
             "distributed: {num_machines: 2, machine_rank: 2, main_process_ip: 10.0.0.1}\n")}),
    Case("machines-without-address", "num_machines: 2 without main_process_ip", _train(), "main_process_ip",
         "machine with machine_rank 0", {"r.yaml": _recipe("distributed: {num_machines: 2}\n")}),
    Case("timeout-zero", "distributed.timeout: 0", _validate(), "distributed.timeout", ">= 1",
         {"r.yaml": _recipe("distributed: {timeout: 0}\n")}),
    Case("port-out-of-range", "distributed.main_process_port: 70000", _validate(), "distributed.main_process_port",
         "1-65535", {"r.yaml": _recipe("distributed: {main_process_port: 70000}\n")}),
    # ---- plan
    Case("plan-unknown-gpu", "alignkit plan --gpus 8xH1000", ["plan", QUICKSTART, "--gpus", "8xH1000"], "--gpus",
         "e.g. 8xH100"),
    Case("plan-mfu-above-one", "alignkit plan --mfu 1.5", ["plan", QUICKSTART, "--mfu", "1.5"], "--mfu",
         "--mfu 0.4"),
    Case("plan-model-missing", "alignkit plan with a model folder that does not exist",
         ["plan", QUICKSTART, "--set", "model.name_or_path={dir}/no-model"], "model.name_or_path",
         "check the path"),
    # ---- output_dir and resuming
    Case("output-dir-is-file", "output_dir is a file", _train(), "output_dir", "choose another output_dir",
         {"r.yaml": _recipe().replace("{dir}/out", "{dir}/out.txt"), "out.txt": "x"}),
    Case("output-dir-holds-run", "output_dir holds another run", _train(), "output_dir",
         "overwrite_output_dir: true", {"r.yaml": _recipe(), "out/model.safetensors": "x",
                                        "out/checkpoint-64/trainer_state.json": "{}"}),
    Case("output-dir-holds-run-distributed", "output_dir holds another run, two processes (refused before launching)",
         _train(), "output_dir", "overwrite_output_dir: true",
         {"r.yaml": _recipe("distributed: {num_processes: 2}\n"), "out/alignkit_recipe.yaml": "method: fdpo\n"}),
    Case("data-null-distributed", "a null row, two processes (refused before launching)", _train(), "row 3",
         "Fix or drop", {"r.yaml": _data_recipe("distributed: {num_processes: 2}\n"),
                         "data.jsonl": _pairs(8, r3={**PAIR, "prompt": None})}),
    Case("resume-nothing", "resume_from_checkpoint: true with no checkpoint", _train(), "resume_from_checkpoint",
         "Remove resume_from_checkpoint", {"r.yaml": _recipe("resume_from_checkpoint: true\n")}),
    Case("resume-missing-path", "resume_from_checkpoint: a folder that does not exist", _train(),
         "resume_from_checkpoint", "checkpoint-N", {"r.yaml": _recipe("resume_from_checkpoint: {dir}/out/ckpt-9\n")}),
    Case("resume-partial-checkpoint", "resume from a checkpoint interrupted while being written", _train(),
         "resume_from_checkpoint", "earlier checkpoint-N",
         {"r.yaml": _recipe("resume_from_checkpoint: {dir}/out/checkpoint-8\n"), "out/checkpoint-8/config.json": "{}"}),
    Case("resume-other-recipe", "resume a checkpoint trained with another beta", _train(), "beta",
         "start a new run", {"r.yaml": _recipe("beta: 0.5\nresume_from_checkpoint: true\n"),
                             "out/alignkit_recipe.yaml": _recipe("beta: 0.1\n"),
                             "out/checkpoint-8/trainer_state.json": "{}"}),
    # ---- alignkit eval
    Case("eval-pairs-without-ref", "eval --pairs without --ref or --reward-model",
         ["eval", "builtin:tiny-llama", "--pairs", "builtin:sentiment"], "--pairs", "add one of them"),
    Case("eval-k-one", "eval -k 1", ["eval", "builtin:tiny-llama", "-k", "1"], "-k 1", "k >= 2"),
    Case("eval-exact-without-bounds", "eval --exact on prompts without low/high columns",
         ["eval", "builtin:tiny-llama", "--exact"], "--exact", "builtin:random_numbers"),
    Case("eval-num-prompts-zero", "eval --num-prompts 0", ["eval", "builtin:tiny-llama", "--num-prompts", "0"],
         "--num-prompts", "at least 1"),
    Case("eval-temperature-zero", "eval --temperature 0", ["eval", "builtin:tiny-llama", "--temperature", "0"],
         "--temperature", "> 0"),
    Case("eval-model-missing", "eval of a policy folder that does not exist", ["eval", "{dir}/no-model"], "MODEL",
         "check the path"),
    Case("eval-prompts-missing", "eval --prompts of a missing file",
         ["eval", "builtin:tiny-llama", "--prompts", "{dir}/p.jsonl"], "p.jsonl", "give a data file"),
    Case("eval-prompts-broken", "eval --prompts with a broken JSON line",
         ["eval", "builtin:tiny-llama", "--prompts", "{dir}/p.jsonl"], "p.jsonl, line 2", "Fix or remove",
         {"p.jsonl": '{"prompt": "a"}\n{"prompt": \n'}),
    Case("eval-reward-model-causal", "eval --reward-model that is a causal LM",
         ["eval", "builtin:tiny-llama", "--reward-model", "builtin:tiny-llama"], "--reward-model",
         "sequence-classification"),
    Case("eval-compare-without-reward", "eval --compare-model without --reward-model",
         ["eval", "builtin:tiny-llama", "--compare-model", "builtin:tiny-llama"], "--compare-model",
         "add one of them"),
    Case("eval-unknown-reward-function", "eval --reward-function naming no reward function",
         ["eval", "builtin:tiny-llama", "--reward-function", "builtin:vadr"], "--reward-function",
         "builtin:vader"),
    Case("plot-missing-run", "plot of a folder that does not exist", ["plot", "{dir}/nowhere"], "nowhere",
         "output_dir"),
    Case("plot-no-metrics", "plot of a folder without metrics.json", ["plot", "{dir}/run"], "run",
         "finished", files={"run/config.json": "{}"}),
    Case("plot-not-json", "plot of a metrics.json that is not JSON", ["plot", "{dir}/run"], "metrics.json",
         "metrics.json", files={"run/metrics.json": "{oops"}),
    Case("plot-no-history", "plot of a metrics.json without training logs", ["plot", "{dir}/run"], "metrics.json",
         "logging_steps", files={"run/metrics.json": '{"train": {"train_loss": 0.6}}'}),
    Case("dashboard-no-project", "dashboard without --project", ["dashboard"], "--project", "--project alignkit"),
    Case("dashboard-run-dir-no-recipe", "dashboard --run-dir of a folder that is not a run",
         ["dashboard", "--project", "p", "--run-dir", "{dir}/run", "--output", "{dir}/ws.json"], "--run-dir",
         "output_dir", files={"run/config.json": "{}"}),
    Case("dashboard-push-not-definition", "dashboard --push of a file that is not a workspace definition",
         ["dashboard", "--push", "{dir}/ws.json", "--entity", "me"], "--push", "alignkit dashboard",
         files={"ws.json": '{"hello": 1}'}),
    # numbers that overflow or are not finite (issue 29): refused by validate, before anything trains
    Case("number-overflows-to-inf", "beta: 1e400 (YAML reads it as infinity)", _validate(), "beta", "finite",
         {"r.yaml": _recipe("beta: 1e400\n")}),
    Case("number-inf", "learning_rate: .inf", _validate(), "learning_rate", "finite",
         {"r.yaml": _recipe("learning_rate: .inf\n")}),
    Case("number-epochs-inf", "num_train_epochs: .inf", _validate(), "num_train_epochs", "finite",
         {"r.yaml": _recipe("num_train_epochs: .inf\n")}),
    Case("number-batch-size-huge", "per_device_train_batch_size: 1e23", _validate(), "per_device_train_batch_size",
         "at most", {"r.yaml": _recipe("per_device_train_batch_size: 1e23\n")}),
    Case("number-negative-inf-section", "a section value of -.inf (peft.lora_dropout)", _validate(),
         "peft.lora_dropout", "finite", {"r.yaml": _recipe("peft: {r: 4, lora_dropout: -.inf}\n")}),
    Case("output-dir-empty", "--set output_dir= (empty)", [*_train(), "--set", "output_dir="], "output_dir",
         "outputs/my-run", {"r.yaml": _recipe()}),
    Case("output-dir-users-readme", "an output_dir holding the user's own README.md", _train(), "README.md",
         "overwrite_output_dir: true", {"r.yaml": _recipe(), "out/README.md": "# My notes\n"}),
    Case("ppo-load-best-model", "PPO with load_best_model_at_end: true (its loop never loads one)", _validate(),
         "load_best_model_at_end", "remove it", {"r.yaml": _recipe("load_best_model_at_end: true\n", method="ppo")
                                                 + "reward: {function: builtin:sentiment}\n"}),
    # the kind of model, from config.json before any weights load (issue 29, item 4)
    Case("policy-is-an-encoder", "an encoder (BertModel) as the f-DPO policy", _validate(), "model.name_or_path",
         "causal language model", {"r.yaml": _recipe(model="{dir}/enc"), **_model_files("enc", "bert", "BertModel")}),
    Case("policy-is-a-reward-model", "a reward model (…ForSequenceClassification) as the policy", _validate(),
         "model.name_or_path", "reward.model", {"r.yaml": _recipe(model="{dir}/rm"),
                                                **_model_files("rm", "llama", "LlamaForSequenceClassification")}),
    Case("reference-other-vocabulary", "a reference whose vocabulary is not the policy's", _validate(),
         "model.ref_name_or_path", "same tokenizer",
         {"r.yaml": _recipe(model="{name_or_path: builtin:tiny-llama, ref_name_or_path: '{dir}/ref'}"),
          **_model_files("ref", "llama", "LlamaForCausalLM", vocab_size=50)}),
    Case("lora-targets-nothing", "LoRA target_modules that match no module of the model", _validate(),
         "peft.target_modules", "q_proj", {"r.yaml": _recipe("peft: {r: 4, target_modules: [query_projection]}\n")}),
    Case("eval-policy-is-an-encoder", "eval of an encoder as the policy", ["eval", "{dir}/enc"], "MODEL",
         "causal language model", _model_files("enc", "bert", "BertModel")),
    Case("eval-reference-other-vocabulary", "eval --ref with another vocabulary", ["eval", "builtin:tiny-llama",
         "--ref", "{dir}/ref"], "--ref", "same tokenizer", _model_files("ref", "llama", "LlamaForCausalLM",
                                                                        vocab_size=50)),
    # outputs of eval / dashboard, and broken model files (issue 29)
    Case("eval-output-is-a-file", "eval --output naming a file", ["eval", "builtin:tiny-llama", "--output",
         "{dir}/afile"], "--output", "a folder", {"afile": "x"}),
    Case("eval-output-holds-a-report", "eval into a folder that holds an earlier report",
         ["eval", "builtin:tiny-llama", "--output", "{dir}/ev"], "--output", "--overwrite",
         {"ev/report.json": "{}"}),
    Case("eval-truncated-weights", "eval of a model folder whose model.safetensors is truncated",
         ["eval", "{dir}/m"], "model.safetensors", "save the model again",
         {**_model_files("m", "llama", "LlamaForCausalLM"), "m/model.safetensors": b"\x10\x00\x00"}),
    Case("dashboard-project-with-slash", "dashboard --project team/proj", ["dashboard", "--project", "team/proj",
         "--output", "{dir}/ws.json"], "--project", "--entity team"),
    Case("dashboard-output-exists", "dashboard --output naming a definition written before",
         ["dashboard", "--project", "p", "--output", "{dir}/ws.json"], "--output", "--overwrite",
         {"ws.json": "{}"}),
    Case("crm-shared-prefix-encoder", "a shipped crm recipe (shared_prefix: true) pointed at an encoder (MiniLM)",
         ["validate", "{dir}/r.yaml"], "shared_prefix", "shared_prefix: false",
         {"r.yaml": _recipe(method="crm", model="builtin:minilm-l6") + "shared_prefix: true\n"}),
    Case("reward-texts-beyond-positions", "reward-model texts longer than the encoder's 512 positions (MiniLM)",
         _validate(), "max_length", "max_length: 512",
         {"r.yaml": _data_recipe(method="crm") .replace("builtin:tiny-llama", "builtin:minilm-l6"),
          "data.jsonl": _jsonl([dict(PAIR, chosen="a great film " * 300)] + [PAIR] * 15)}),
    # more of every command (issue 29: at least 150, covering each one)
    Case("plan-zero-gpus", "plan --gpus 0xH100", ["plan", QUICKSTART, "--gpus", "0xH100"], "--gpus", "8xH100"),
    Case("plan-seq-len-zero", "plan --seq-len 0", ["plan", QUICKSTART, "--seq-len", "0"], "--seq-len", "at least 1"),
    Case("eval-two-reward-sources", "eval with both --reward-model and --reward-function",
         ["eval", "builtin:tiny-llama", "--reward-model", "x", "--reward-function", "builtin:vader"],
         "--reward-function", "give one of them"),
    Case("eval-attribute-without-pairs", "eval --attribute without --reward-model and --pairs",
         ["eval", "builtin:tiny-llama", "--attribute", "length"], "--attribute", "--pairs"),
    Case("eval-max-new-tokens-zero", "eval --max-new-tokens 0", ["eval", "builtin:tiny-llama", "--max-new-tokens",
         "0"], "--max-new-tokens", "at least 1"),
    Case("eval-beta-zero", "eval --beta 0", ["eval", "builtin:tiny-llama", "--beta", "0"], "--beta", "> 0"),
    Case("eval-num-pairs-zero", "eval --num-pairs 0", ["eval", "builtin:tiny-llama", "--num-pairs", "0"],
         "--num-pairs", "every pair"),
    Case("eval-ref-missing", "eval --ref naming a folder that does not exist",
         ["eval", "builtin:tiny-llama", "--ref", "{dir}/noref"], "--ref", "check the path"),
    Case("dashboard-push-missing-file", "dashboard --push of a file that does not exist",
         ["dashboard", "--push", "{dir}/nope.json", "--entity", "me"], "--push", "alignkit dashboard"),
    Case("peft-rank-zero", "peft.r: 0", _validate(), "peft", "r", {"r.yaml": _recipe("peft: {r: 0}\n")}),
    Case("loss-type-unknown", "loss_type: hingee (a typo)", _validate(), "loss_type", "hinge",
         {"r.yaml": _recipe("loss_type: hingee\n")}),
    Case("mdpo-loss-without-group-form", "an mDPO loss_type with no group form (hinge)", _validate(), "hinge",
         "no group form", {"r.yaml": _recipe("loss_type: hinge\n", method="mdpo", dataset="builtin:random_numbers")}),
    Case("crm-no-attributes", "a causal reward model with a penalty and no attribute", _validate(), "attributes",
         "at least one", {"r.yaml": _recipe("mmd_coef: 1.0\nattributes: []\n", method="crm")}),
    Case("mmd-estimator-unknown", "mmd_estimator: fast", _validate(), "mmd_estimator", "unbiased",
         {"r.yaml": _recipe("mmd_estimator: fast\n", method="crm")}),
    Case("online-one-generation", "online groups of one completion (num_generations: 1)", _validate(),
         "num_generations", "2", {"r.yaml": _recipe("num_generations: 1\n", method="online_mdpo")
                                  + "reward: {function: builtin:sentiment}\n"}),
    Case("ppo-mini-batches-zero", "PPO num_mini_batches: 0", _validate(), "num_mini_batches", ">= 1",
         {"r.yaml": _recipe("num_mini_batches: 0\n", method="ppo") + "reward: {function: builtin:sentiment}\n"}),
    Case("mixed-precision-unknown", "distributed.mixed_precision: fp8", _validate(), "distributed.mixed_precision",
         "bf16", {"r.yaml": _recipe("distributed: {mixed_precision: fp8}\n")}),
    Case("typo-in-a-config-field", "learnig_rate (a typo of a config field)", _validate(), "learnig_rate",
         "learning_rate", {"r.yaml": _recipe("learnig_rate: 0.001\n")}),
    Case("eval-split-and-test-size", "dataset with both eval_split and test_size", _validate(), "dataset",
         "not both", {"r.yaml": _recipe(dataset="{name: builtin:sentiment, eval_split: test, test_size: 0.1}")}),
    Case("plot-output-holds-plots", "plot into a folder that holds earlier plots", ["plot", "{dir}/run"], "plots",
         "--overwrite", {"run/metrics.json": json.dumps({"log_history": [{"loss": 0.6, "step": 1}]}),
                         "run/plots/train.png": b"png"}),
    Case("output-dir-under-a-file", "an output_dir inside a path that is a file", _validate(), "output_dir",
         "another output_dir", {"r.yaml": _recipe().replace("output_dir: {dir}/out", "output_dir: {dir}/afile/out"),
                                "afile": "x"}),
    Case("policy-is-minilm", "builtin:minilm-l6 (an encoder) as the f-DPO policy", _validate(), "model.name_or_path",
         "causal language model", {"r.yaml": _recipe(model="builtin:minilm-l6")}),
    Case("eval-policy-is-a-reward-model", "eval of a reward-model folder as the policy", ["eval", "{dir}/rm"],
         "MODEL", "reward.model", _model_files("rm", "llama", "LlamaForSequenceClassification")),
    Case("eval-ref-is-a-reward-model", "eval --ref naming a reward model", ["eval", "builtin:tiny-llama", "--ref",
         "{dir}/rm"], "--ref", "causal language model", _model_files("rm", "llama", "LlamaForSequenceClassification")),
]


def materialise(case: Case, folder: Path) -> list[str]:
    """Write the case's files into ``folder`` and return its argv."""
    for name, content in (case.files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, bytes) else content.replace("{dir}", str(folder)).encode()
        path.write_bytes(text)
    return [a.replace("{dir}", str(folder)) for a in case.argv]


def run_case(case: Case, folder: Path) -> tuple[int, str]:
    """Run one case in this process; returns (exit code, stderr)."""
    import contextlib
    import io

    from alignkit.cli import main

    argv = materialise(case, folder)
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.chdir(cwd)
    return code, err.getvalue()


if __name__ == "__main__":  # print docs/bad-inputs.md's table
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print("| # | input | command | exit | message |")
    print("|---|---|---|---|---|")
    for i, case in enumerate(CASES, 1):
        with tempfile.TemporaryDirectory() as d:
            code, err = run_case(case, Path(d))
            line = err.strip().splitlines()[-1] if err.strip() else ""
            line = line.replace(str(Path(d).resolve()), "DIR").replace(d, "DIR").replace(str(ROOT) + "/", "")
            line = line.replace("alignkit: error: ", "").replace("|", "\\|")
        cmd = case.argv[0]
        print(f"| {i} | {case.what} | `{cmd}` | {code} | {line} |")
