"""The packed forward of `shared_prefix` (FDPOTrainer's pairs, MultiSampleDPOTrainer's groups): each row holds a
prompt once, then its completions, with a 4D attention mask (alignkit.data.groups' packed collators). One forward per
row, then every completion's tokens are gathered back into TRL's [completions, tokens] layout, so that the loss and
the metrics are those of the unshared path."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .. import _adapter

__all__ = ["check_config", "check_model", "model_mask", "pad_token_id", "forward", "unpack", "reference_logps", "forward_logps"]


def check_config(args) -> None:
    """What `shared_prefix` cannot pack, refused with the reason (FDPOConfig and its subclasses)."""
    if not args.shared_prefix:
        return
    if args.padding_free:
        raise ValueError("shared_prefix packs rows itself; set padding_free: false.")
    if args.max_length is not None and args.truncation_mode != "keep_start":
        raise ValueError(f"shared_prefix with truncation_mode {args.truncation_mode!r}: cutting each sequence from "
                         "its start cuts the chosen and rejected sequences' prompts differently, so they cannot "
                         "share one. Use truncation_mode: keep_start, or max_length: null, or drop shared_prefix.")
    if args.use_weighting:
        raise ValueError("use_weighting (WPO) reads every token's full distribution, which the packed forward does "
                         "not return; drop shared_prefix or use_weighting.")
    if args.ld_alpha is not None:
        raise ValueError("ld_alpha (LD-DPO) is not available with shared_prefix yet; drop one of them.")


def check_model(trainer) -> None:
    """The model can take a packed row: no router (aux) loss to keep equal, and an attention taking a custom mask."""
    if trainer.aux_loss_enabled:
        raise ValueError("shared_prefix does not compute a Mixture-of-Experts model's router (aux) loss: it is a mean "
                         "over the batch's tokens, and packing changes the tokens. Drop shared_prefix for this model, "
                         "or set router_aux_loss_coef: 0.")
    impl = _adapter.attn_implementation(trainer.accelerator.unwrap_model(trainer.model))
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"shared_prefix needs attn_implementation 'sdpa' or 'eager' (custom 4D masks); the model uses "
                         f"{impl!r}. Load it with attn_implementation='sdpa' or drop shared_prefix.")


def pad_token_id(model, processing_class) -> int:
    """The pad token TRL pads with: the tokenizer's, else its EOS (loaded from the model when not given)."""
    if processing_class is None:
        from transformers import AutoTokenizer

        processing_class = AutoTokenizer.from_pretrained(model if isinstance(model, str) else model.config.name_or_path)
    tok = getattr(processing_class, "tokenizer", processing_class)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def model_mask(base, mask: torch.Tensor) -> torch.Tensor:
    """A packed batch's boolean 4D mask as `base` takes it: as it is for sdpa, additive (0 / the dtype's minimum) for
    eager attention."""
    if _adapter.attn_implementation(base) != "eager":
        return mask
    dtype = next(base.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def forward(trainer, model, inputs, fields) -> dict[str, torch.Tensor]:
    """The fused-LM-head fields of a packed batch, per row and token."""
    mask = model_mask(trainer.accelerator.unwrap_model(trainer.model), inputs["attention_mask"])
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    out = _adapter.fused_forward(model, dict(input_ids=inputs["input_ids"], attention_mask=mask,
                                             position_ids=inputs["position_ids"], use_cache=False), labels)
    return {f: getattr(out, f) for f in fields}


def unpack(inputs, packed):
    """[rows, L-1] per-token fields (aligned with the next-token labels) -> [completions, tokens]."""
    rows, pos, mask = inputs["completion_row"], inputs["completion_positions"], inputs["completion_token_mask"]
    idx = (pos - 1).clamp(min=0)  # the prediction of the token at position t is output t - 1

    def take(x, fill=0):
        return x[rows.unsqueeze(1), idx].masked_fill(mask == 0, fill)

    log_probs = take(packed["log_probs"])
    rest = {k: take(v, False if v.dtype == torch.bool else 0) for k, v in packed.items()
            if k != "log_probs" and v is not None}
    return log_probs, SimpleNamespace(log_probs=log_probs, aux_loss=None, **rest)


def reference_logps(trainer, inputs) -> torch.Tensor:
    """The reference's sequence log-probs of every completion of a packed batch (a separate reference, or the policy
    with its adapter off)."""
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    with _adapter.reference_context(trainer):
        packed = forward(trainer, model, inputs, ("log_probs",))
    return unpack(inputs, packed)[0].sum(dim=1)


def forward_logps(trainer, model, inputs) -> dict[str, Any]:
    """FDPOTrainer._forward_logps of a packed batch: the same keys, in the [chosen; rejected] completion layout."""
    outputs = forward(trainer, model, inputs, _adapter.FUSED_HEAD_FIELDS)
    per_token_logps, unpacked = unpack(inputs, outputs)
    mask = inputs["completion_token_mask"]
    logps = per_token_logps.sum(dim=1)
    if trainer.precompute_ref_logps:
        ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps.dtype)
    else:
        ref_logps = reference_logps(trainer, inputs)
    return {
        "outputs": unpacked,
        "model_kwargs": {},
        "per_token_logps": per_token_logps,
        "shift_mask": mask,
        "logps": logps,
        "ref_logps": ref_logps,
        "is_chosen": torch.arange(logps.size(0), device=logps.device) < inputs["chosen_row_index"].numel(),
        "lengths": mask.sum(dim=1).to(logps.dtype),
        # what the unshared layout holds, so that num_tokens means the same with and without shared_prefix
        "num_input_tokens": inputs["unpacked_tokens"],
    }
