"""Step 1 of a run: the recipe, one YAML file that names the method, the model, the data and the TRL config.

This module is the schema and is pure: it reads and checks YAML, and builds config objects; it starts nothing.

A recipe speaks TRL: every top-level key that is not one of alignkit's sections is a field of the
method's config class (for ``method: fdpo``, :class:`alignkit.FDPOConfig`, i.e. TRL's ``DPOConfig``
plus ``divergence``/``alpha``), spelled as TRL spells it::

    method: fdpo
    model:   {name_or_path: builtin:tiny-llama, dtype: float32}
    dataset: {name: builtin:sentiment, eval_split: test}
    peft:    {r: 8, lora_alpha: 16}          # optional, any peft.LoraConfig field
    wandb:   {project: alignkit}             # optional, used when report_to includes wandb
    divergence: jsd                          # FDPOConfig / DPOConfig fields from here on
    beta: 0.1
    learning_rate: 5.0e-4
    output_dir: outputs/quickstart

Errors are :class:`RecipeError` with one message that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .._util import first_line

__all__ = ["RecipeError", "Recipe", "load_recipe", "apply_overrides", "METHODS"]


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the problem and the fix."""


# method name -> (config class, trainer class, dataset validator)
METHODS: dict[str, tuple[str, str, str]] = {
    "fdpo": ("alignkit.trainers.fdpo:FDPOConfig", "alignkit.trainers.fdpo:FDPOTrainer",
             "alignkit.data.validation:validate_preference_dataset"),
    "mdpo": ("alignkit.trainers.multisample:MultiSampleDPOConfig", "alignkit.trainers.multisample:MultiSampleDPOTrainer",
             "alignkit.data.groups:validate_group_dataset"),
    "crm": ("alignkit.trainers.causal_reward:CausalRewardConfig", "alignkit.trainers.causal_reward:CausalRewardTrainer",
            "alignkit.data.validation:validate_preference_dataset"),
    "ppo": ("alignkit.trainers.ppo:PPOConfig", "alignkit.trainers.ppo:PPOTrainer",
            "alignkit.data.validation:validate_prompt_dataset"),
    "online_mdpo": ("alignkit.trainers.online:OnlineMultiSampleConfig",
                    "alignkit.trainers.online:OnlineMultiSampleTrainer",
                    "alignkit.data.validation:validate_prompt_dataset"),
}
#: methods that sample from the policy on prompts and score the samples with the recipe's `reward` section
ON_POLICY_METHODS = {"ppo", "online_mdpo"}
#: methods that train a reward model (AutoModelForSequenceClassification, one output, no reference model)
REWARD_MODEL_METHODS = {"crm"}


def _import(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def config_class(method: str):
    return _import(METHODS[method][0])


def trainer_class(method: str):
    return _import(METHODS[method][1])


def dataset_validator(method: str):
    return _import(METHODS[method][2])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    #: hub id, local folder, or ``builtin:tiny-llama`` / ``builtin:small-llama``
    name_or_path: str
    #: reference model (defaults to a copy of the policy; unused with PEFT, where the adapter is disabled)
    ref_name_or_path: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    revision: str | None = None


class DatasetSection(_Section):
    #: ``builtin:sentiment``, a hub id, a local .json/.jsonl/.parquet/.csv file, or a saved dataset folder
    name: str
    #: hub configuration name
    config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    #: carve an eval split of this fraction out of the train split (instead of ``eval_split``)
    test_size: float | None = None
    #: ``{alignkit_name: your_column}``, e.g. ``{prompt: question, chosen: good, rejected: bad}``
    columns: dict[str, str] = {}
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    #: options of a built-in dataset (``num_samples``, ``seed``, ``conversational``)
    builtin_kwargs: dict[str, Any] = {}

    @field_validator("test_size")
    @classmethod
    def _frac(cls, v):
        if v is not None and not (0.0 < v < 1.0):
            raise ValueError("test_size must be a fraction in (0, 1)")
        return v

    @field_validator("max_train_samples", "max_eval_samples")
    @classmethod
    def _at_least_one(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be >= 1; remove it to use every row")
        return v


class RewardSection(_Section):
    """The reward source of PPO and online mDPO: a sequence-classification reward model, or a function."""

    #: folder or hub id of a reward model with one output (e.g. a `method: crm` run's output_dir)
    model: str | None = None
    #: ``builtin:sentiment`` or ``package.module:function`` taking (prompts, completions)
    function: str | None = None
    #: PPO's value model to start from (default: the reward model, else the policy's weights with a new head)
    value_model: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.function is None):
            raise ValueError("set exactly one of reward.model and reward.function")
        return self


class DistributedSection(_Section):
    """Multi-process training: `alignkit train` relaunches itself under torchrun (see alignkit.run.launch)."""

    num_processes: int = 1
    #: zero2 | zero3 | zero3_offload | path to a DeepSpeed JSON | null (plain DDP)
    deepspeed: str | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    #: seconds a process waits for its peers (every machine to join; a collective) before the job ends with an error
    timeout: int = 1800

    @field_validator("num_processes", "num_machines", "timeout")
    @classmethod
    def _positive(cls, v):
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("main_process_port")
    @classmethod
    def _port(cls, v):
        if not 1 <= v <= 65535:
            raise ValueError("must be a TCP port, 1-65535 (e.g. 29500)")
        return v

    @model_validator(mode="after")
    def _machines(self):
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"machine_rank must be in 0..{self.num_machines - 1} (num_machines is "
                             f"{self.num_machines}), got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip, the address of the machine with machine_rank 0 "
                             "(every machine connects to it), e.g. main_process_ip: 10.0.0.1")
        return self


class WandbSection(_Section):
    project: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = []
    #: ``auto`` (online with an API key, else offline), ``online``, ``offline``
    mode: Literal["auto", "online", "offline"] = "auto"


SECTIONS = {"method": None, "model": ModelSection, "dataset": DatasetSection, "peft": None, "wandb": WandbSection,
            "reward": RewardSection, "distributed": DistributedSection}
#: top-level keys of alignkit's own that are not config fields: `overwrite_output_dir: true` lets a run
#: replace another run in its output_dir (transformers 5 dropped TrainingArguments.overwrite_output_dir)
RECIPE_KEYS: dict[str, Any] = {"overwrite_output_dir": bool}


@dataclasses.dataclass
class Recipe:
    """A validated recipe: the sections, and the keyword arguments of the method's config class."""

    method: str
    model: ModelSection
    dataset: DatasetSection
    training: dict[str, Any]
    peft: dict[str, Any] | None = None
    wandb: WandbSection | None = None
    reward: RewardSection | None = None
    distributed: DistributedSection | None = None
    overwrite_output_dir: bool = False
    source: str | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build_config(self, training: dict[str, Any] | None = None):
        """The method's config object (e.g. FDPOConfig) from `training` (default: the recipe's own fields; the plan
        passes them resolved for this process). Raises RecipeError on a bad value."""
        try:
            return config_class(self.method)(**(self.training if training is None else training))
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{self._where()}: {exc}") from None

    def build_peft_config(self):
        if self.peft is None:
            return None
        from peft import LoraConfig

        kwargs = dict(self.peft)
        kwargs.setdefault("task_type", "SEQ_CLS" if self.method in REWARD_MODEL_METHODS else "CAUSAL_LM")
        kwargs.setdefault("target_modules", "all-linear")
        try:
            return LoraConfig(**kwargs)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{self._where()}: peft: {exc}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)

    def _where(self) -> str:
        return self.source or "recipe"


def _closest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _members(tp: Any) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(tp) for m in _members(a))
    return (tp,)


def _accepts(members: tuple, kind: type) -> bool:
    """Whether a field whose type has these union members takes a YAML list or mapping."""
    for m in members:
        if m is Any or m is kind or typing.get_origin(m) is kind:
            return True
        if kind is dict and isinstance(m, type) and m not in (str, int, float, bool, type(None)) and \
                not issubclass(m, (str, list)):
            return True  # a config object (e.g. accelerate's ParallelismConfig) built from a mapping
    return False


def _expected(members: tuple) -> str:
    names = []
    for m in members:
        if m is type(None):
            continue
        if typing.get_origin(m) is Literal:
            names.append("one of " + ", ".join(repr(a) for a in typing.get_args(m)))
        elif m in (int, float):
            names.append("a number" if m is float else "an integer")
        elif m is bool:
            names.append("true or false")
        elif m is str or (isinstance(m, type) and issubclass(m, str)):
            names.append("a string")
        elif typing.get_origin(m) is list or m is list:
            names.append("a list")
        elif typing.get_origin(m) is dict or m is dict:
            names.append("a mapping")
    return " or ".join(dict.fromkeys(names)) or "a value of another kind"


def _coerce(name: str, value: Any, tp: Any, where: str) -> Any:
    """Coerce a YAML value to the field's type (YAML reads ``5e-4`` as a string, for one), or raise
    RecipeError naming the key and what it takes."""
    if value is None:
        return None
    args = _members(tp)
    if Any in args:
        return value

    def wrong():
        shown = "true" if value is True else "false" if value is False else repr(value)
        return RecipeError(f"{where}: {name} must be {_expected(args)}, got {shown}.")

    if name == "resume_from_checkpoint" and isinstance(value, bool):
        return "true" if value else None  # `resume_from_checkpoint: true` (YAML bool) means the latest checkpoint
    if isinstance(value, (dict, list)):
        if not _accepts(args, type(value)):
            raise wrong()
        return value
    if isinstance(value, bool):
        if bool in args:
            return value
        if value is False and str in args:
            return "no"  # YAML 1.1 reads an unquoted `no`/`off` as False: `eval_strategy: no` means "no"
        raise wrong()
    if bool in args and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if float in args and isinstance(value, (int, float, str)):
        if int in args and isinstance(value, int):
            return _bounded_int(name, value, where)
        try:
            number = float(value)
        except ValueError:
            if str not in args:
                raise RecipeError(f"{where}: {name} must be a number, got {value!r}.") from None
        else:
            return _finite(name, number, where)
    if int in args and float not in args and isinstance(value, int):
        return _bounded_int(name, value, where)
    if int in args and float not in args and isinstance(value, (str, float)):
        try:
            as_float = float(value)
        except ValueError:
            as_float = None
        if as_float is not None:
            _finite(name, as_float, where)
        if as_float is not None and as_float.is_integer():
            return _bounded_int(name, int(as_float), where)
        if str not in args:
            raise RecipeError(f"{where}: {name} must be an integer, got {value!r}.")
    if args == (bool,) or (set(args) <= {bool, type(None)}):
        raise RecipeError(f"{where}: {name} must be true or false, got {value!r}.")
    if isinstance(value, (int, float)) and not any(m in (int, float) for m in args):
        if str in args:
            return str(value)
        raise wrong()
    return value


#: the largest integer a recipe may give (a count of steps, samples or tokens); anything above cannot be meant and
#: overflows the 32-bit sizes of tensors and samplers deep inside training
MAX_INT = 2**31 - 1


def _finite(name: str, value: float, where: str) -> float:
    if not math.isfinite(value):
        raise RecipeError(f"{where}: {name} must be a finite number, got {value!r} (YAML reads a number beyond "
                          "1.8e308 as infinity); give a finite value.")
    return value


def _bounded_int(name: str, value: int, where: str) -> int:
    if abs(value) > MAX_INT:
        raise RecipeError(f"{where}: {name} must be at most {MAX_INT}, got {value:.3g}; give a realistic value.")
    return value


def parse_recipe(data: Any, source: str | None = None) -> Recipe:
    where = source or "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a YAML mapping of keys to values, got {type(data).__name__}.")
    method = data.get("method")
    if method is None:
        raise RecipeError(f"{where}: missing 'method'. Set it to one of: {', '.join(METHODS)}.")
    if not isinstance(method, str) or method not in METHODS:
        raise RecipeError(f"{where}: unknown method {method!r}.{_closest(str(method), METHODS)} Methods: {', '.join(METHODS)}.")
    examples = {"model": "model: {name_or_path: builtin:tiny-llama}", "dataset": "dataset: {name: builtin:sentiment}"}
    for required in ("model", "dataset"):
        if data.get(required) is None:
            raise RecipeError(f"{where}: missing section {required!r}, e.g. {examples[required]}.")
    cfg_cls = config_class(method)
    fields = _field_types(cfg_cls)
    training = {}
    own = {}
    for key, value in data.items():
        if key in SECTIONS:
            continue
        if key in RECIPE_KEYS:
            own[key] = _coerce(key, value, RECIPE_KEYS[key], where)
            continue
        if key not in fields:
            raise RecipeError(
                f"{where}: unknown key {key!r}.{_closest(key, list(fields) + list(SECTIONS) + list(RECIPE_KEYS))} A "
                f"recipe's top-level keys are the sections {', '.join(SECTIONS)}, {', '.join(RECIPE_KEYS)} and the "
                f"fields of {cfg_cls.__name__}."
            )
        training[key] = _coerce(key, value, fields[key], where)
    if "output_dir" not in training and source:
        training["output_dir"] = str(Path("outputs") / Path(source).stem)

    sections = {}
    for name in ("model", "dataset", "wandb", "reward", "distributed"):
        if name not in data or data[name] is None:
            continue
        value = data[name]
        if isinstance(value, str) and name in ("model", "dataset"):
            value = {"name_or_path" if name == "model" else "name": value}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: section {name!r} must be a mapping, got {value!r}.")
        try:
            sections[name] = SECTIONS[name](**value)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                options = SECTIONS[name].model_fields
                raise RecipeError(f"{where}: unknown key '{name}.{loc}'.{_closest(str(err['loc'][0]), options)} "
                                  f"Valid keys: {', '.join(options)}.") from None
            msg = err["msg"].removeprefix("Value error, ")
            got = f" (got {err.get('input')!r})" if loc else ""  # a check of the whole section: the keys are named
            raise RecipeError(f"{where}: {name}{'.' + loc if loc else ''}: {msg}{got}.") from None
    peft = data.get("peft")
    if peft is not None:
        if not isinstance(peft, dict):
            raise RecipeError(f"{where}: section 'peft' must be a mapping of peft.LoraConfig fields.")
        from peft import LoraConfig

        lora_fields = _field_types(LoraConfig)
        for key in peft:
            if key not in lora_fields:
                raise RecipeError(f"{where}: unknown key 'peft.{key}'.{_closest(key, lora_fields)} The peft section takes "
                                  "peft.LoraConfig fields (r, lora_alpha, lora_dropout, target_modules, ...).")
        peft = {k: _coerce(f"peft.{k}", v, lora_fields[k], where) for k, v in peft.items()}
    if (method in ON_POLICY_METHODS) != ("reward" in sections):
        raise RecipeError(f"{where}: " + (f"method {method!r} needs a 'reward' section (reward.model: a reward model "
                                          "folder, or reward.function: builtin:sentiment / package.module:function)."
                                          if method in ON_POLICY_METHODS else
                                          f"the 'reward' section is for method 'ppo' or 'online_mdpo', not {method!r}."))
    if method != "ppo" and "reward" in sections and sections["reward"].value_model is not None:
        raise RecipeError(f"{where}: reward.value_model is PPO's; method {method!r} trains no value model. Remove it.")
    return Recipe(method=method, model=sections["model"], dataset=sections["dataset"], training=training,
                  peft=peft, wandb=sections.get("wandb"), reward=sections.get("reward"),
                  distributed=sections.get("distributed"), overwrite_output_dir=bool(own.get("overwrite_output_dir")),
                  source=source, raw=data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set key=value`` overrides (dotted keys reach into sections; values are YAML)."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set beta=0.2 or --set model.dtype=bfloat16.")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {key}: {part!r} is not a section.")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


#: deeper nesting than this is refused (a recipe is a few levels deep; YAML parsers recurse per level)
MAX_DEPTH = 32


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently) and
    nesting deeper than MAX_DEPTH."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeError(f"{self.name}: nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}; a "
                                  "recipe is a mapping of sections and values, a few levels deep.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor`: YAML's merge (an explicit key beside it wins), which SafeLoader resolves
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except TypeError:
                    continue  # unhashable keys: SafeLoader reports them itself
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise RecipeError(f"{self.name}: key {key!r} appears twice in the same mapping (lines "
                                      f"{seen[key]} and {line}); YAML would keep only the last. Keep one of them.")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike, what: str = "recipe") -> Any:
    """Parse a YAML file strictly: UTF-8, no duplicate keys, bounded depth. Errors are RecipeError."""
    path = str(path)
    if not os.path.exists(path):
        raise RecipeError(f"{what} file {path!r} does not exist.")
    if os.path.isdir(path):
        raise RecipeError(f"{path!r} is a folder, not a {what} file; give the path of the YAML file, e.g. "
                          "recipes/quickstart.yaml.")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); save the file as "
                          "UTF-8.") from None
    loader = _RecipeLoader(text)
    loader.name = path
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise RecipeError(f"{path}: malformed YAML{at}: {problem}. Check indentation and quoting there.") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to read; a recipe is a mapping of sections and values, a few "
                          "levels deep.") from None
    finally:
        loader.dispose()


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = str(path)
    data = read_yaml(path)
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; start from recipes/quickstart.yaml.")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of keys to values (method: ..., model: ..., "
                          f"dataset: ...), got a {type(data).__name__}.")
    return parse_recipe(apply_overrides(data, overrides or []), source=path)
