"""The hybrid model: parameter counts, shapes, gradients, the attention's equations, pretrained
loading and torch.compile."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from model import HybridConvNeXtV2, PretrainedWeightsError, SeparableSelfAttention

TINY = dict(preset="tiny", depths=(1, 1, 2, 1))  # two attention blocks in stage 3


@pytest.mark.parametrize("preset, expected", [
    ("paper", 21.92e6),          # the paper's Table 3
    ("paper-depth12", 44.3e6),   # docs/DESIGN.md
    ("seed-readme", 95.3e6),     # docs/DESIGN.md
])
def test_parameter_count_matches_reference(preset, expected):
    counts = HybridConvNeXtV2(num_classes=8, preset=preset).count_parameters()
    assert abs(counts["total"] - expected) / expected < 0.005, counts
    parts = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
    assert sum(counts[p] for p in parts) == counts["total"] == counts["trainable"]


def test_tiny_preset_is_the_papers_layout_narrowed():
    """`tiny`: the paper's layout (attention ratio, MLP head, 3x3 downsampling) at widths
    16-64 and one block per stage, the model every CPU test, benchmark smoke run and picture
    uses; TrainConfig accepts it like any preset."""
    from components.common.config import TrainConfig

    config = HybridConvNeXtV2(preset="tiny").config
    assert config["dims"] == (16, 32, 48, 64) and config["depths"] == (1, 1, 1, 1)
    paper = HybridConvNeXtV2(preset="paper").config
    assert {k: v for k, v in config.items() if k not in ("dims", "depths", "preset")} == \
        {k: v for k, v in paper.items() if k not in ("dims", "depths", "preset")}
    assert TrainConfig(preset="tiny", img_size=32).preset == "tiny"


def test_overrides_and_bad_options():
    model = HybridConvNeXtV2(num_classes=3, **TINY, attn_ratio=0.25)
    assert model.config["depths"] == TINY["depths"] and model.config["attn_ratio"] == 0.25
    rebuilt = HybridConvNeXtV2(**model.config)
    assert rebuilt.count_parameters() == model.count_parameters()
    with pytest.raises(ValueError, match="unknown preset"):
        HybridConvNeXtV2(preset="nope")
    with pytest.raises(TypeError, match="unknown model options"):
        HybridConvNeXtV2(widths=(1, 2, 3, 4))


def test_output_shapes_at_224_and_256():
    model = HybridConvNeXtV2().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 8)
        assert model(torch.randn(1, 3, 256, 256)).shape == (1, 8)


def test_every_parameter_receives_a_gradient():
    model = HybridConvNeXtV2(**TINY)
    model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad


@pytest.mark.parametrize("size", [224, 288])
def test_channels_last_and_bf16_autocast(size):
    model = HybridConvNeXtV2(**TINY).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, size, size).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.shape == (2, 8) and torch.isfinite(low).all()
    assert torch.allclose(low.float(), reference, atol=0.1)


def naive_separable_attention(x: torch.Tensor, module: SeparableSelfAttention) -> torch.Tensor:
    """Eqs. 5-10 written out token by token, in float64."""
    a = module.attn_dim
    weight = module.qkv.weight[:, :, 0, 0]
    bias = module.qkv.bias
    w_i, w_k, w_v = weight[:1], weight[1:1 + a], weight[1 + a:]
    b_i, b_k, b_v = bias[:1], bias[1:1 + a], bias[1 + a:]
    w_o, b_o = module.proj.weight[:, :, 0, 0], module.proj.bias
    outputs = []
    for image in x:
        tokens = image.flatten(1).T  # (N, C)
        scores = torch.stack([t @ w_i.T + b_i for t in tokens])[:, 0]  # eq. 5, before softmax
        c_s = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
        keys = [t @ w_k.T + b_k for t in tokens]  # eq. 6
        c_v = sum(c_s[i] * keys[i] for i in range(len(tokens)))  # eq. 7
        out = [(c_v * torch.relu(t @ w_v.T + b_v)) @ w_o.T + b_o for t in tokens]  # eqs. 8-10
        outputs.append(torch.stack(out).T.reshape(image.shape))
    return torch.stack(outputs)


def test_separable_attention_matches_naive_equations():
    torch.manual_seed(0)
    module = SeparableSelfAttention(dim=12, attn_ratio=0.5).double()
    for p in module.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 12, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x), naive_separable_attention(x, module), rtol=0, atol=1e-10)


def test_context_vector_is_invariant_to_token_order():
    torch.manual_seed(1)
    module = SeparableSelfAttention(dim=16).double()
    x = torch.randn(3, 16, 6, 6, dtype=torch.float64)
    perm = torch.randperm(36)
    shuffled = x.flatten(2)[:, :, perm].reshape(x.shape)
    torch.testing.assert_close(module.context_vector(shuffled), module.context_vector(x),
                               rtol=0, atol=1e-12)
    assert not torch.allclose(module(shuffled), module(x))  # the output itself follows the tokens


@pytest.fixture(scope="module")
def convnextv2_base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return timm.create_model("convnextv2_base", pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_loads_stem_and_stage12_blocks_only(tmp_path, convnextv2_base_state, suffix):
    path = tmp_path / f"convnextv2_base{suffix}"
    if suffix == ".safetensors":
        save_file(convnextv2_base_state, str(path))
    else:
        torch.save({"state_dict": convnextv2_base_state}, path)

    torch.manual_seed(3)
    fresh = HybridConvNeXtV2().state_dict()
    torch.manual_seed(3)
    model = HybridConvNeXtV2(pretrained=str(path))
    loaded = model.state_dict()

    transferred = [k for k in loaded if k.startswith(("stem.", "stages.0.blocks.", "stages.1.blocks."))]
    assert len(transferred) == len(model.pretrained_report["loaded"]) > 40
    for key, value in loaded.items():
        expected = convnextv2_base_state[key] if key in transferred else fresh[key]
        assert torch.equal(value, expected), key
    assert "stages.1.downsample" in model.pretrained_report["fresh_parts"]
    assert "head" in model.pretrained_report["fresh_parts"]


def test_pretrained_rejects_truncated_and_wrong_shape_files(tmp_path, convnextv2_base_state):
    good = tmp_path / "good.safetensors"
    save_file(convnextv2_base_state, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PretrainedWeightsError, match="truncated.safetensors"):
        HybridConvNeXtV2(pretrained=str(truncated))

    wrong = dict(convnextv2_base_state)
    wrong["stages.0.blocks.1.mlp.fc1.weight"] = torch.zeros(10, 10)
    wrong_path = tmp_path / "wrong.pth"
    torch.save(wrong, wrong_path)
    with pytest.raises(PretrainedWeightsError, match=r"shape mismatch: stages\.0\.blocks\.1\.mlp\.fc1"):
        HybridConvNeXtV2(pretrained=str(wrong_path))

    with pytest.raises(PretrainedWeightsError, match="lacks"):
        partial = {k: v for k, v in convnextv2_base_state.items() if not k.startswith("stem.")}
        torch.save(partial, tmp_path / "partial.pth")
        HybridConvNeXtV2(pretrained=str(tmp_path / "partial.pth"))


def test_pretrained_from_hub_offline_says_to_pass_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here either way; make it fail fast
    with pytest.raises(PretrainedWeightsError, match="Pass pretrained="):
        HybridConvNeXtV2(pretrained=True, pretrained_tag="no_such_tag_offline")


def test_pretrained_file_carrying_a_pickle_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(PretrainedWeightsError, match="evil.pth"):
        HybridConvNeXtV2(pretrained=str(path))


@pytest.mark.slow  # about a minute of inductor compilation on 2 cores
def test_compiled_training_step_on_cpu():
    torch.manual_seed(4)
    model = HybridConvNeXtV2(**TINY)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    before = model.head.fc.fc2.weight.detach().clone()
    loss = torch.nn.functional.cross_entropy(compiled(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.head.fc.fc2.weight)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)  # eager agrees
