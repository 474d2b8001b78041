"""Hybrid ConvNeXtV2 + separable self-attention classifier.

Ozdemir & Pacal, "A robust deep learning framework for multiclass skin cancer classification",
Sci Rep 2025, 15:4938. A CAFormer-style four-stage MetaFormer whose stages 1-2 are ConvNeXtV2
blocks and whose stages 3-4 use separable self-attention as the token mixer. The paper gives no
channel widths; the `paper` preset is the reading in docs/DESIGN.md that reproduces its
21.92M parameters.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from timm.layers import LayerNorm, LayerNorm2d, SelectAdaptivePool2d, calculate_drop_path_rates
from timm.models.convnext import ConvNeXtStage
from timm.models.metaformer import Downsampling, MetaFormerStage, MlpHead
from torch import nn

from .attention import SeparableSelfAttention
from .pretrained import load_pretrained_weights

_PAPER = dict(dims=(128, 256, 320, 512), depths=(3, 3, 9, 3), attn_ratio=0.5, mlp_ratio=4.0,
              head="mlp", downsample_kernel=3)
PRESETS: dict[str, dict] = {
    # 21.885M with 8 classes: Figure 2's stage-4 depth of 3 (the only depth that fits 21.92M).
    "paper": _PAPER,
    # The paper's text says stage 4 has 12 blocks (44.3M).
    "paper-depth12": {**_PAPER, "depths": (3, 3, 9, 12)},
    # The seed repository's README reading (95.3M): ConvNeXt-T widths, 12 attention blocks in
    # stage 4, full-width attention, ConvNeXt's 2x2 patchify downsampling, a linear head.
    "seed-readme": dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 12), attn_ratio=1.0,
                        mlp_ratio=4.0, head="linear", downsample_kernel=2),
    # The paper's layout at widths 16-64, one block per stage (0.1M): the model of the CPU
    # tests, the benchmarks' smoke runs and docs/ui_pictures.py.
    "tiny": {**_PAPER, "dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1)},
}

PART_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "head")


def _convnext_stage(dim: int, depth: int, drop_path_rates: list[float]) -> nn.Module:
    """ConvNeXtV2 blocks (dw 7x7, LN, 1x1 4x, GELU, GRN, 1x1, residual; no layer scale)."""
    return ConvNeXtStage(dim, dim, stride=1, depth=depth, drop_path_rates=drop_path_rates,
                         ls_init_value=None, use_grn=True)


def _attention_stage(dim: int, depth: int, drop_path_rates: list[float], attn_ratio: float):
    """MetaFormer blocks: x + SepSA(LN x); x + MLP(LN x), MLP 4x with StarReLU, no bias."""
    return MetaFormerStage(dim, dim, depth=depth, token_mixer=SeparableSelfAttention,
                           dp_rates=drop_path_rates, norm_layer=LayerNorm2d, attn_ratio=attn_ratio)


class HybridConvNeXtV2(nn.Module):
    """Stem -> 2 ConvNeXtV2 stages -> 2 separable-self-attention MetaFormer stages -> head.

    Args:
        num_classes: output classes (8 for ISIC 2019).
        preset: a key of PRESETS; keyword overrides (dims, depths, attn_ratio, mlp_ratio, head,
            downsample_kernel) replace its values.
        pretrained: False, True (ConvNeXtV2-base ImageNet weights through timm's hub), or a path
            to a local .safetensors/.pth state dict: timm convnextv2 keys load the stem and the
            stage 1-2 blocks, a backbone of this model (the self-supervised warm start) all but
            the head (model/pretrained.py).
        drop_path_rate: stochastic depth, rising linearly over all blocks.
        dims, depths: widths and block counts of the four stages.
        attn_ratio: separable attention width as a share of the stage width (paper: 1/2).
        mlp_ratio: hidden width of the MLP head as a multiple of the last width (CAFormer: 4).
        head: "mlp" (CAFormer's MlpHead) or "linear".
        downsample_kernel: 3 (MetaFormer's LN + 3x3/s2 conv between stages) or 2 (ConvNeXt's).
        pretrained_tag: timm tag of convnextv2_base used when pretrained=True.
    """

    def __init__(
        self,
        num_classes: int = 8,
        preset: str = "paper",
        pretrained: bool | str = False,
        drop_path_rate: float = 0.0,
        *,
        head_drop_rate: float = 0.0,
        in_chans: int = 3,
        pretrained_tag: str = "fcmae_ft_in22k_in1k",
        **overrides,
    ):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - set(PRESETS[preset])
        if unknown:
            raise TypeError(f"unknown model options {sorted(unknown)}; "
                            f"overridable: {sorted(PRESETS[preset])}")
        cfg = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        dims, depths = tuple(cfg["dims"]), tuple(cfg["depths"])
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"dims and depths need 4 stages, got dims={dims} depths={depths}")
        if cfg["head"] not in ("mlp", "linear") or cfg["downsample_kernel"] not in (2, 3):
            raise ValueError(f"head must be mlp|linear and downsample_kernel 2|3, got {cfg}")
        # Everything needed to rebuild this model (checkpoints and MLflow store it).
        self.config = dict(cfg, dims=dims, depths=depths, num_classes=num_classes, preset=preset,
                           drop_path_rate=drop_path_rate, head_drop_rate=head_drop_rate,
                           in_chans=in_chans)
        self.num_classes = num_classes
        self.num_features = dims[-1]

        # ConvNeXtV2 stem: 4x4 patchify, stride 4, then LayerNorm (timm names stem.0 / stem.1).
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                                  LayerNorm2d(dims[0]))
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)
        stages = [_convnext_stage(dims[i], depths[i], dpr[i]) for i in (0, 1)]
        stages += [_attention_stage(dims[i], depths[i], dpr[i], cfg["attn_ratio"]) for i in (2, 3)]
        for i in (1, 2, 3):
            # One kind of downsampling joins every pair of stages (LN, then a strided conv).
            # Block names stay timm's (stages.N.blocks.*), so ImageNet weights map 1:1.
            k = cfg["downsample_kernel"]
            stages[i].downsample = Downsampling(dims[i - 1], dims[i], kernel_size=k, stride=2,
                                                padding=(k - 1) // 2, norm_layer=LayerNorm2d)
        self.stages = nn.Sequential(*stages)

        if cfg["head"] == "mlp":
            fc = MlpHead(dims[-1], num_classes, mlp_ratio=cfg["mlp_ratio"], drop_rate=head_drop_rate)
        else:
            fc = nn.Sequential(nn.Dropout(head_drop_rate), nn.Linear(dims[-1], num_classes))
        self.head = nn.Sequential(OrderedDict(
            global_pool=SelectAdaptivePool2d(pool_type="avg", flatten=True),
            norm=LayerNorm(dims[-1]),
            fc=fc,
        ))
        self.apply(_init_weights)

        self.pretrained_report: dict | None = None
        if pretrained:
            self.pretrained_report = load_pretrained_weights(self, pretrained, tag=pretrained_tag)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def parts(self) -> dict[str, nn.Module]:
        """The model's named parts, in order: stem, stage1..stage4, head."""
        return dict(zip(PART_NAMES, [self.stem, *self.stages, self.head]))

    def count_parameters(self) -> dict[str, int]:
        counts = {name: sum(p.numel() for p in part.parameters())
                  for name, part in self.parts().items()}
        counts["total"] = sum(p.numel() for p in self.parameters())
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts


def _init_weights(module: nn.Module) -> None:
    # timm's MetaFormer/ConvNeXt initialisation: truncated normal (std 0.02), zero bias.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
