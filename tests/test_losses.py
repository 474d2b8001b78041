"""The recipe's loss: PyTorch's weighted cross-entropy for hard labels, the same scale for
mixup targets, and Menon et al.'s logit adjustment."""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy as TimmSoftTargetCE

from components.training.losses import SoftTargetCrossEntropy


def test_hard_labels_match_pytorch_cross_entropy_weighted_or_not():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 8), torch.randint(0, 8, (16,))
    weight = torch.rand(8) * 10 + 0.1
    expected = torch.nn.CrossEntropyLoss(weight=weight)(logits, labels)
    torch.testing.assert_close(SoftTargetCrossEntropy(weight)(logits, labels), expected)
    one_hot = torch.nn.functional.one_hot(labels, 8).float()
    torch.testing.assert_close(SoftTargetCrossEntropy(weight)(logits, one_hot), expected)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, labels),
                               torch.nn.CrossEntropyLoss()(logits, labels))


def test_uniform_weights_are_timms_soft_target_cross_entropy():
    torch.manual_seed(1)
    images, labels = torch.randn(8, 3, 4, 4), torch.randint(0, 8, (8,))
    _, soft = Mixup(mixup_alpha=0.4, num_classes=8)(images, labels)
    logits = torch.randn(8, 8)
    expected = TimmSoftTargetCE()(logits, soft)
    torch.testing.assert_close(SoftTargetCrossEntropy(torch.full((8,), 3.0))(logits, soft), expected)
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, soft), expected)


def test_mixup_targets_do_not_scale_the_loss_with_the_class_weights():
    """nn.CrossEntropyLoss(weight) multiplies a soft-target loss by the weights; this does not."""
    torch.manual_seed(2)
    logits = torch.randn(32, 8)
    soft = torch.softmax(torch.randn(32, 8) * 3, dim=1)
    weight = torch.rand(8) + 0.5
    ours = SoftTargetCrossEntropy(weight)
    torch.testing.assert_close(SoftTargetCrossEntropy(weight * 11)(logits, soft), ours(logits, soft))
    pytorch = torch.nn.CrossEntropyLoss(weight=weight * 11)(logits, soft)
    assert pytorch > 5 * ours(logits, soft)


def test_logit_adjustment_shifts_logits_by_tau_log_prior():
    """Menon et al. eq. 10: the loss of f(x) is plain cross-entropy of f(x) + tau * log(pi)."""
    torch.manual_seed(3)
    logits, labels = torch.randn(16, 8), torch.randint(0, 8, (16,))
    prior = torch.softmax(torch.randn(8), 0)
    adjusted = SoftTargetCrossEntropy(log_prior=prior.log(), tau=1.5)(logits, labels)
    expected = torch.nn.CrossEntropyLoss()(logits + 1.5 * prior.log(), labels)
    torch.testing.assert_close(adjusted, expected)
    # a rare class's logit must rise further for the same loss: its gradient pushes harder
    rare = int(prior.argmin())
    logits = torch.zeros(1, 8, requires_grad=True)
    SoftTargetCrossEntropy(log_prior=prior.log())(logits, torch.tensor([rare])).backward()
    plain = torch.zeros(1, 8, requires_grad=True)
    SoftTargetCrossEntropy()(plain, torch.tensor([rare])).backward()
    assert logits.grad[0, rare] < plain.grad[0, rare] < 0
    assert SoftTargetCrossEntropy(log_prior=prior.log(), tau=0.0).logit_offset is None
