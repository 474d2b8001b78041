"""The self-supervised warm start (issue 29): SimCLR's loss, a pretext that resumes exactly, its
backbone loading whole into the classifier, and `train.self_supervised_epochs` in a real
training."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from components import train
from components.common.config import ConfigError, TrainConfig
from components.training import self_supervised
from components.training.trainer import Runtime
from model import HybridConvNeXtV2, PretrainedWeightsError

SIZE = 32


def _tiny(**changes) -> TrainConfig:
    return TrainConfig(preset="tiny", img_size=SIZE, epochs=1, batch_size=8, warmup_epochs=0,
                       num_workers=0, gpu_resident="on", **changes)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    from tiny_data import make_images

    root = tmp_path_factory.mktemp("ssl")
    img_dir, frame = make_images(root / "img", n_per_class=2, size=40)
    frame.to_csv(root / "train.csv", index=False)
    return img_dir, frame, root


def test_nt_xent_is_lowest_when_each_view_matches_its_pair():
    z1 = torch.eye(4, 8) * 5
    matched = self_supervised.nt_xent(z1, z1.clone())
    shuffled = self_supervised.nt_xent(z1, z1[[1, 2, 3, 0]])
    assert matched < 0.1 < shuffled
    # symmetric in the two views, and finite for a batch of one pair
    z2 = torch.randn(4, 8)
    assert torch.isclose(self_supervised.nt_xent(z1, z2), self_supervised.nt_xent(z2, z1))
    assert torch.isfinite(self_supervised.nt_xent(z1[:1], z2[:1]))


def test_a_stopped_pretext_resumes_to_the_uninterrupted_backbone(tiny_split, tmp_path):
    img_dir, frame, _ = tiny_split
    cfg = _tiny(self_supervised_epochs=2)
    cpu = Runtime(torch.device("cpu"))
    whole = self_supervised.pretrain(frame, img_dir, tmp_path / "whole", cfg, "f" * 64, cpu)
    folder = self_supervised.pretrain(frame, img_dir, tmp_path / "cut", cfg, "f" * 64, cpu,
                                      stop_after_epoch=1)
    assert not (folder / self_supervised.BACKBONE_FILE).exists()
    resumed = self_supervised.pretrain(frame, img_dir, tmp_path / "cut", cfg, "f" * 64, cpu)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys() and not any(k.startswith("head.") for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # another recipe: another folder, the first one kept
    other = self_supervised.pretrain(frame, img_dir, tmp_path / "cut", cfg, "e" * 64, cpu,
                                     stop_after_epoch=1)
    assert other != resumed.parent and resumed.is_file()


def test_the_backbone_loads_whole_and_the_head_starts_fresh(tiny_split, tmp_path):
    torch.manual_seed(3)
    source = HybridConvNeXtV2(preset="tiny")
    path = tmp_path / "backbone.safetensors"
    self_supervised.write_backbone(source, path)
    model = HybridConvNeXtV2(preset="tiny", pretrained=str(path))
    own, theirs = model.state_dict(), source.state_dict()
    backbone = [k for k in own if not k.startswith("head.")]
    assert all(torch.equal(own[k], theirs[k]) for k in backbone)
    assert not torch.equal(own["head.fc.fc1.weight"], theirs["head.fc.fc1.weight"])
    assert model.pretrained_report["fresh_parts"] == ["head"]
    # written for other widths: refused with the reason, not half loaded
    with pytest.raises(PretrainedWeightsError, match="shape mismatch"):
        HybridConvNeXtV2(preset="tiny", dims=(8, 16, 24, 32), pretrained=str(path))
    partial = {k: v for k, v in load_file(str(path)).items() if not k.startswith("stages.3.")}
    from safetensors.torch import save_file
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(PretrainedWeightsError, match="backbone tensors of this model"):
        HybridConvNeXtV2(preset="tiny", pretrained=str(tmp_path / "partial.safetensors"))


def test_a_training_with_the_warm_start_starts_from_its_backbone(tiny_split, tmp_path, capsys):
    img_dir, _, root = tiny_split
    data = train.TrainingData.read(root / "train.csv", img_dir, val_csv=None, class_weights=None)
    cfg = _tiny(self_supervised_epochs=1)
    summary = train.run(data, tmp_path / "out", config=cfg, use_mlflow=False, resume="auto")
    assert summary["completed"]
    backbones = list((tmp_path / "out" / self_supervised.FOLDER).glob("*/backbone.safetensors"))
    assert len(backbones) == 1
    ckpt = torch.load(tmp_path / "out" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["train_config"]["warm_start"] == str(backbones[0])
    assert "self-supervised epoch 1/1" in capsys.readouterr().out
    # a second run of the same recipe resumes the classifier: no second pretext
    train.run(data, tmp_path / "out", config=cfg, use_mlflow=False, resume="auto")
    assert "self-supervised" not in capsys.readouterr().out


def test_given_pretrained_weights_take_the_warm_starts_place(tiny_split, tmp_path, capsys):
    img_dir, _, root = tiny_split
    weights = tmp_path / "backbone.safetensors"
    self_supervised.write_backbone(HybridConvNeXtV2(preset="tiny"), weights)
    cfg = _tiny(self_supervised_epochs=3, pretrained=str(weights))
    assert not cfg.warm_start and TrainConfig().warm_start  # the default starts warm
    data = train.TrainingData.read(root / "train.csv", img_dir, val_csv=None, class_weights=None)
    train.run(data, tmp_path / "out", config=cfg, use_mlflow=False)
    assert "no self-supervised warm start" in capsys.readouterr().out
    assert not (tmp_path / "out" / self_supervised.FOLDER).exists()


@pytest.mark.parametrize("changes, message", [
    ({"self_supervised_epochs": -1}, "must be >= 0"),
    ({"sampler_balance": "class_site", "weighted_sampler": False}, "needs weighted_sampler"),
])
def test_conflicting_warm_start_and_sampler_settings_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(changes, "params.yaml")
