"""State dicts saved by MONAI GenerativeModels (the "old" naming) mapped onto today's MONAI networks.

MONAI ships ``load_old_state_dict`` for this, but its behaviour changed between releases: GenerativeModels created a
``proj_attn`` layer in its self-attention blocks and never applied it, and MONAI >= 1.6 copies those weights into
``out_proj``, which changes the outputs of networks that have such blocks (MONAI issues #8030, #7991; PR #8786). This
mapping reproduces the old networks exactly, and says which keys it could not place instead of printing them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from medldm.errors import InputError

# (new name part, old name part), tried in order for a key the old state dict does not have
RENAMES = (
    (".attn.to_q.", ".to_q."),  # self-attention: the projections moved into an inner SABlock
    (".attn.to_k.", ".to_k."),
    (".attn.to_v.", ".to_v."),
    (".out_proj.", ".to_out.0."),  # cross-attention output projection (transformer attn1 / attn2)
    (".postconv.", ".conv."),  # the autoencoder's upsampling convolution
)
# the self-attention output projection; the old blocks had none in their forward pass (proj_attn was unused)
SELF_ATTENTION_OUT = ".attn.out_proj."
UNUSED_OLD = ".proj_attn."


def convert_old_state_dict(model: torch.nn.Module, old: Mapping[str, torch.Tensor], source: str = "state dict"
                           ) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` from ``old`` (new or old naming); raises ValueError naming any key that has no
    counterpart, or a shape that does not fit ``model``."""
    target = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing = []
    for key, like in target.items():
        if key in old:
            converted[key] = old[key]
            used.add(key)
            continue
        if SELF_ATTENTION_OUT in key:
            # identity and zero: the block then computes exactly what the old block did
            converted[key] = torch.eye(*like.shape, dtype=like.dtype) if like.dim() == 2 else torch.zeros_like(like)
            continue
        for new_part, old_part in RENAMES:
            candidate = key.replace(new_part, old_part)
            if new_part in key and candidate in old:
                converted[key] = old[candidate]
                used.add(candidate)
                break
        else:
            missing.append(key)
    unexpected = [k for k in old if k not in used and UNUSED_OLD not in k]
    if missing or unexpected:
        raise InputError(f"{source} does not fit {type(model).__name__} as configured: {len(missing)} weight(s) "
                         f"missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                         "check that the network definition matches the weights")
    wrong = [f"{k}: {list(converted[k].shape)} vs {list(v.shape)}" for k, v in target.items()
             if converted[k].shape != v.shape]
    if wrong:
        raise InputError(f"{source}: {len(wrong)} weight(s) have other shapes than {type(model).__name__} as "
                         f"configured, e.g. {wrong[:2]}")
    return converted
