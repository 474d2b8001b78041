"""Load pretrained weights into the hybrid: ConvNeXtV2-base ImageNet weights, or a backbone of
the hybrid itself.

- A timm convnextv2_base state dict: the paper initialises its ConvNeXtV2 part from ImageNet;
  only the stem and stage 1-2 blocks load, the rest (3x3 downsamplings, attention stages, head)
  has no counterpart in ConvNeXtV2-base and starts fresh. Keys keep timm's names (`stem.*`,
  `stages.{0,1}.blocks.*`), so the checkpoint filter is a prefix match.
- A hybrid backbone (every stem and stage tensor, as components/training/self_supervised.py
  writes it; recognised by its attention stages' `token_mixer` keys): all of it loads, the
  head starts fresh.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

TRANSFERRED = re.compile(r"^(stem\.|stages\.[01]\.blocks\.)")
BACKBONE = re.compile(r"^(stem|stages)\.")  # the hybrid's all but its head


class PretrainedWeightsError(RuntimeError):
    """The pretrained weights could not be read or do not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (loaded with weights_only=True).

    A torch file holding {"state_dict": ...} or {"model": ...} is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or a pickle carrying more than tensors
        raise PretrainedWeightsError(f"cannot read pretrained weights {path}: {err}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict of tensors")
    return state


def filter_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """The entries of `state` the hybrid takes, checked for shape: its whole backbone from a
    hybrid backbone, else stem and stage 1-2 blocks from a timm convnextv2 state dict.

    Every model tensor of the part taken must be present with the same shape: a partial or
    differently sized checkpoint is an error, never a silent skip.
    """
    hybrid = any(".token_mixer." in k for k in state)
    wanted = BACKBONE if hybrid else TRANSFERRED
    own = {k: v for k, v in model.state_dict().items() if wanted.match(k)}
    missing = sorted(set(own) - set(state))
    if missing:
        kind = ("backbone tensors of this model" if hybrid else "ConvNeXtV2 tensors the model "
                "needs")
        hint = ("(was it written for other dims or depths?)" if hybrid else
                "(is it a timm convnextv2_base state dict?)")
        raise PretrainedWeightsError(
            f"checkpoint lacks {len(missing)} {kind}, e.g. {missing[:3]} {hint}")
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise PretrainedWeightsError("shape mismatch: " + "; ".join(wrong[:5]))
    return {k: state[k] for k in own}


def _hub_state_dict(tag: str) -> dict[str, torch.Tensor]:
    import timm

    name = f"convnextv2_base.{tag}"
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as err:  # no network, no hub cache, unknown tag
        raise PretrainedWeightsError(
            f"could not fetch {name} from the hub ({err.__class__.__name__}: {err}). Offline? "
            "Pass pretrained='path/to/convnextv2_base.safetensors' (a timm state dict) instead."
        ) from err


def load_pretrained_weights(model: nn.Module, source: bool | str | Path,
                            tag: str = "fcmae_ft_in22k_in1k") -> dict:
    """Copy pretrained weights into `model` (see the module docstring for which); returns what
    loaded and what stayed fresh."""
    state = _hub_state_dict(tag) if source is True else read_state_dict(source)
    transferred = filter_state_dict(state, model)
    result = model.load_state_dict(transferred, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filter keeps only own keys
    fresh = sorted({k.split(".")[0] if k.startswith(("stem", "head")) else ".".join(k.split(".")[:3])
                    for k in result.missing_keys})
    report = {"source": f"timm:convnextv2_base.{tag}" if source is True else str(source),
              "loaded": sorted(transferred), "fresh_parts": fresh}
    log.info("loaded %d pretrained tensors from %s; fresh: %s",
             len(transferred), report["source"], ", ".join(fresh))
    return report
