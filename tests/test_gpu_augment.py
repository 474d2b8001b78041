"""GPU-resident batch augmentation, run on the CPU: shapes, per-seed determinism, identity
when augmentation is off, agreement with the CPU eval transform."""
from __future__ import annotations

import math

import pytest
import torch

from components.common.images import resize_size
from components.training.dataset import SplitDataset, load_rgb
from components.training.gpu_augment import (GpuAugment, ResidentImages, affine_matrices, fits_on_device,
                                    resample, resident_bytes)
from components.training.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from tiny_data import make_images

SIZE = 32


@pytest.fixture(scope="module")
def resident(tmp_path_factory):
    img_dir, frame = make_images(tmp_path_factory.mktemp("img"), n_per_class=2, size=45)
    dataset = SplitDataset(frame, img_dir)
    return dataset, ResidentImages.load(dataset, SIZE, torch.device("cpu"))


def test_prepared_images_are_uint8_squares_of_the_resize_side(resident):
    dataset, images = resident
    side = resize_size(SIZE)
    assert images.images.shape == (len(dataset), 3, side, side)
    assert images.images.dtype == torch.uint8 and torch.equal(images.targets, dataset.targets)


def test_train_augmentation_shapes_and_per_sample_randomness(resident):
    _, images = resident
    batch = images.images[:1].repeat(6, 1, 1, 1)  # one image six times
    out = GpuAugment(SIZE, train=True, seed=0)(batch)
    assert out.shape == (6, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    distinct = {tuple(x.flatten()[:50].tolist()) for x in out}
    assert len(distinct) == 6, "each sample draws its own crop, flip, rotation and jitter"


def test_same_seed_same_batch_other_seed_other_batch(resident):
    _, images = resident
    batch = images.images[:8]
    a = GpuAugment(SIZE, train=True, seed=3)(batch)
    b = GpuAugment(SIZE, train=True, seed=3)(batch)
    c = GpuAugment(SIZE, train=True, seed=4)(batch)
    assert torch.equal(a, b) and not torch.equal(a, c)
    reseeded = GpuAugment(SIZE, train=True, seed=0)
    reseeded.generator.manual_seed(3)
    assert torch.equal(reseeded(batch), a)


def test_without_augmentation_it_is_the_eval_transform(resident):
    dataset, images = resident
    out = GpuAugment(SIZE, train=False)(images.images)
    cpu = torch.stack([eval_transform(SIZE)(load_rgb(p)) for p in dataset.paths])
    torch.testing.assert_close(out, cpu, atol=1e-5, rtol=0)


def test_identity_affine_reproduces_the_image():
    x = torch.rand(3, 3, SIZE, SIZE)
    ones, zeros = torch.ones(3), torch.zeros(3)
    theta = affine_matrices(ones, ones, zeros, zeros, zeros)
    torch.testing.assert_close(resample(x, theta, SIZE), x, atol=1e-6, rtol=0)


def test_affine_flip_and_quarter_turn_match_tensor_ops():
    x = torch.rand(1, 3, 8, 8)
    one, zero = torch.ones(1), torch.zeros(1)
    flipped = resample(x, affine_matrices(-one, one, zero, zero, zero), 8)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-6, rtol=0)
    turned = resample(x, affine_matrices(one, one, torch.full((1,), math.pi / 2), zero, zero), 8)
    torch.testing.assert_close(turned, x.rot90(1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotation_corners_stay_black_after_colour_jitter():
    # A white image: any pixel rotated in from outside must stay black (0) before
    # normalisation, as torchvision's rotate-after-jitter gives.
    white = torch.full((16, 3, 40, 40), 255, dtype=torch.uint8)
    out = GpuAugment(SIZE, train=True, seed=0)(white)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = out * std + mean
    corner = pixels[:, :, 0, 0]
    assert (corner < 0.5).any(), "some of 16 rotations reach the corner"
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_resident_budget():
    assert resident_bytes(10, 224) == 10 * 3 * 256 * 256
    assert not fits_on_device(10, 224, torch.device("cpu"), 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_matches_its_own_seed(resident):
    _, images = resident
    batch = images.images[:8].cuda()
    a = GpuAugment(SIZE, train=True, device="cuda", seed=1)(batch)
    b = GpuAugment(SIZE, train=True, device="cuda", seed=1)(batch)
    assert a.is_cuda and torch.equal(a, b)
