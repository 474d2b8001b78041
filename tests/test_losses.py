"""The class-weighted loss: PyTorch's for hard labels, and the same scale for mixup targets."""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from components.losses import WeightedSoftTargetCrossEntropy


def test_hard_labels_match_pytorch_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 8), torch.randint(0, 8, (16,))
    weight = torch.rand(8) * 10 + 0.1
    expected = torch.nn.CrossEntropyLoss(weight=weight)(logits, labels)
    torch.testing.assert_close(WeightedSoftTargetCrossEntropy(weight)(logits, labels), expected)
    one_hot = torch.nn.functional.one_hot(labels, 8).float()
    torch.testing.assert_close(WeightedSoftTargetCrossEntropy(weight)(logits, one_hot), expected)


def test_uniform_weights_are_timms_soft_target_cross_entropy():
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 4, 4), torch.randint(0, 8, (8,))
    _, soft = Mixup(mixup_alpha=0.4, num_classes=8)(images, labels)
    logits = torch.randn(8, 8)
    torch.testing.assert_close(WeightedSoftTargetCrossEntropy(torch.full((8,), 3.0))(logits, soft),
                               SoftTargetCrossEntropy()(logits, soft))


def test_mixup_targets_do_not_scale_the_loss_with_the_class_weights():
    """nn.CrossEntropyLoss(weight) multiplies a soft-target loss by the weights; this does not."""
    torch.manual_seed(2)
    logits = torch.randn(32, 8)
    soft = torch.softmax(torch.randn(32, 8) * 3, dim=1)
    weight = torch.rand(8) + 0.5
    ours = WeightedSoftTargetCrossEntropy(weight)
    torch.testing.assert_close(WeightedSoftTargetCrossEntropy(weight * 11)(logits, soft), ours(logits, soft))
    pytorch = torch.nn.CrossEntropyLoss(weight=weight * 11)(logits, soft)
    assert pytorch > 5 * ours(logits, soft)
