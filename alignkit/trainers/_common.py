"""Helpers shared by the alignkit config classes."""

from __future__ import annotations

import torch


def accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def default_precision_for_this_machine(config) -> None:
    """TRL turns bf16 on when it is left unset; on a machine without an accelerator that makes
    `TrainingArguments` raise ("Your setup doesn't support bf16/gpu") and, where it runs, emulated bf16
    is 2-10x slower. Leave an unset `bf16` off there; keep TRL's default wherever an accelerator exists.
    An explicit `bf16: true` is never changed."""
    if config.bf16 is None and not config.fp16 and (config.use_cpu or not accelerator_available()):
        config.bf16 = False


class ConfigResolverMixin:
    """`_resolve_args` for alignkit trainers: the given config, or a default one named after the model
    (as TRL does); a config of the wrong class (e.g. TRL's own) is refused with the fix."""

    config_class: type
    _config_with_article: str
    _default_run_suffix: str

    @classmethod
    def _resolve_args(cls, model, args):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            return cls.config_class(f"{str(name).rstrip('/').split('/')[-1]}-{cls._default_run_suffix}")
        if not isinstance(args, cls.config_class):
            base = cls.config_class.__mro__[1].__name__
            raise TypeError(
                f"{cls.__name__} needs {cls._config_with_article}, got {type(args).__name__}. Build "
                f"{cls._config_with_article} with the arguments you gave {type(args).__name__} (it is a {base} "
                "subclass)."
            )
        return args
