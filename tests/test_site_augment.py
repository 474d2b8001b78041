"""The robustness study's recipe switches (issue 29): strong photometric augmentation, the
dermoscope field-of-view cut, the wide crop scale, and the class x site sampler; on both input
paths, replayable, and refused when out of range."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from components.common.config import ConfigError, TrainConfig
from components.training.gpu_augment import GpuAugment
from components.training.photometric import field_of_view, gaussian_blur, strong_colour
from components.training.samplers import MIN_SITE_CELL, class_site_weights, make_sampler
from components.training.transforms import Augmentation, train_transform

SIZE = 32
SWITCHES = Augmentation(crop_scale=(0.35, 1.0), photometric="strong", field_of_view=1.0)


def _gray_ramp(n: int) -> torch.Tensor:
    ramp = torch.linspace(0.2, 0.8, SIZE)
    return torch.stack([ramp.view(1, -1).expand(SIZE, SIZE)] * 3).unsqueeze(0).repeat(n, 1, 1, 1)


def test_strong_colour_stays_in_range_replays_and_changes_each_image_its_own_way():
    x = torch.rand(6, 3, SIZE, SIZE)
    a = strong_colour(x, torch.Generator().manual_seed(1))
    b = strong_colour(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)
    ratios = {round(float((a[i] / x[i].clamp(min=1e-3)).median()), 4) for i in range(6)}
    assert len(ratios) == 6, "one gamma and hue per image, not one per batch"


def test_a_hue_rotation_leaves_a_gray_image_gray():
    gray = _gray_ramp(4)
    out = strong_colour(gray, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-4, rtol=0)  # no colour appears
    torch.testing.assert_close(out[:, 1], out[:, 2], atol=1e-4, rtol=0)


def test_blur_keeps_a_flat_image_and_smooths_an_edge():
    flat = torch.full((2, 3, SIZE, SIZE), 0.4)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.5, 1.0])), flat)
    edge = torch.zeros(1, 1, SIZE, SIZE)
    edge[..., SIZE // 2:] = 1
    blurred = gaussian_blur(edge, torch.tensor([1.0]))
    assert 0 < blurred[0, 0, 0, SIZE // 2 - 1] < 0.5 < blurred[0, 0, 0, SIZE // 2] < 1


def test_the_field_of_view_cut_blacks_out_the_corners_only_where_chosen():
    x = torch.ones(8, 3, SIZE, SIZE)
    every = field_of_view(x, 1.0, torch.Generator().manual_seed(0))
    assert (every[:, :, 0, 0] == 0).all() and (every[:, :, SIZE // 2, SIZE // 2] == 1).all()
    assert torch.equal(field_of_view(x, 0.0, torch.Generator().manual_seed(0)), x)
    some = field_of_view(x, 0.5, torch.Generator().manual_seed(0))
    cut = (some[:, 0, 0, 0] == 0).sum()
    assert 0 < cut < 8


def test_both_input_paths_apply_the_switches():
    from PIL import Image

    image = Image.fromarray(np.full((45, 45, 3), 200, np.uint8))
    torch.manual_seed(0)
    loader = train_transform(SIZE, SWITCHES)(image)
    resident = GpuAugment(SIZE, train=True, seed=0, augmentation=SWITCHES)(
        torch.full((4, 3, 45, 45), 200, dtype=torch.uint8))
    black = (torch.tensor(0.0) - 0.485) / 0.229  # a black pixel, normalised (red channel)
    assert torch.isclose(loader[0, 0, 0], black, atol=1e-4)  # the corner is outside the circle
    assert torch.isclose(resident[:, 0, 0, 0], black, atol=1e-4).all()
    plain = GpuAugment(SIZE, train=True, seed=0)(torch.full((4, 3, 45, 45), 200, dtype=torch.uint8))
    assert not torch.isclose(plain[:, 0, SIZE // 2, SIZE // 2], black).any()


def test_the_crop_scale_reaches_the_resident_path():
    ramp = (_gray_ramp(64) * 255).to(torch.uint8)
    wide = GpuAugment(SIZE, train=True, seed=0, augmentation=Augmentation(crop_scale=(0.1, 0.1)))
    narrow = GpuAugment(SIZE, train=True, seed=0)
    # a crop of 10% of the area spans a third of the ramp: its spread is far smaller
    assert wide(ramp).std((1, 2, 3)).mean() < 0.6 * narrow(ramp).std((1, 2, 3)).mean()


def test_class_site_weights_keep_each_class_total_and_even_out_its_sites():
    # class 0: 300 at site a, 100 at b; class 1: 60 at a, 60 at c, 3 at b (too few to spread)
    labels = [0] * 300 + [0] * 100 + [1] * 60 + [1] * 60 + [1] * 3
    sites = ["a"] * 300 + ["b"] * 100 + ["a"] * 60 + ["c"] * 60 + ["b"] * 3
    targets = torch.tensor(labels)
    class_weights = torch.tensor([1.0, 3.0] + [0.0] * 6)
    weights = class_site_weights(targets, sites, class_weights)
    frame = pd.DataFrame({"label": labels, "site": sites, "w": weights.numpy()})
    totals = frame.groupby("label")["w"].sum()
    assert totals[0] == pytest.approx(400.0) and totals[1] == pytest.approx(3.0 * 123)
    cells = frame.groupby(["label", "site"])["w"].sum()
    assert cells[(0, "a")] == pytest.approx(cells[(0, "b")])
    assert cells[(1, "a")] == pytest.approx(cells[(1, "c")])
    assert cells[(1, "b")] == pytest.approx(3 * 3.0) and 3 < MIN_SITE_CELL  # natural share


def test_the_class_site_sampler_draws_a_class_evenly_from_its_sites():
    targets = torch.tensor([0] * 900 + [0] * 100 + [1] * 500)
    sites = ["a"] * 900 + ["b"] * 100 + ["a"] * 500
    sampler = make_sampler(targets, torch.tensor([0.75, 1.5] + [0.0] * 6), seed=0, sites=sites)
    sampler.set_epoch(0)
    drawn = np.array(list(sampler))
    from_b = (drawn >= 900) & (drawn < 1000)
    from_class_0 = drawn < 1000
    assert from_b.sum() / from_class_0.sum() == pytest.approx(0.5, abs=0.06)


def test_training_with_class_site_and_one_site_says_it_balances_classes_only(tmp_path):
    from components import train
    from tiny_data import make_images

    img_dir, frame = make_images(tmp_path / "img", n_per_class=2, size=40)
    frame.to_csv(tmp_path / "train.csv", index=False)
    data = train.TrainingData.read(tmp_path / "train.csv", img_dir, val_csv=None,
                                   class_weights=None)
    cfg = TrainConfig(preset="tiny", img_size=SIZE, epochs=1, batch_size=8, warmup_epochs=0,
                      num_workers=0, gpu_resident="on", sampler_balance="class_site",
                      photometric="strong", field_of_view=0.5, crop_scale=(0.35, 1.0),
                      self_supervised_epochs=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train.run(data, tmp_path / "out", config=cfg, use_mlflow=False)
    assert summary["completed"]
    assert any("names one site only" in str(w.message) for w in caught)


@pytest.mark.parametrize("key, value, message", [
    ("crop_scale", [0.9, 0.2], "0 < low <= high <= 1"),
    ("crop_scale", [0.5], "0 < low <= high <= 1"),
    ("field_of_view", 1.5, r"\[0, 1\]"),
    ("photometric", "vivid", "paper"),
    ("sampler_balance", "site", "class_site"),
])
def test_a_switch_out_of_range_is_refused_with_its_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({key: value}, "params.yaml")
