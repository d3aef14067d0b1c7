"""Tests for the GLNet reference implementation: `python -m pytest -q test_glnet.py`.

testdata/ holds the released checkpoints' tensor layouts (<variant>.keys.txt) and, in goldens.pt,
the released model's logits and a strided sample of its stage outputs for the deterministic
weights below (both copied from ../shared/reference, which the last test checks when present).
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import glnet

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "testdata")
REFERENCE = os.path.join(HERE, "..", "shared", "reference")
GOLDEN_SAMPLE = (slice(None), slice(None, None, 8), slice(None, None, 4), slice(None, None, 4))


def released_keys(variant):
    """{name: (shape, dtype)} of a released checkpoint, from its keys.txt."""
    keys = {}
    with open(os.path.join(TESTDATA, f"{variant}.keys.txt")) as f:
        for line in f:
            name, rest = line.split(" ", 1)
            shape, dtype = rest.rsplit(" ", 1)
            keys[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()),
                          getattr(torch, dtype.strip()))
    return keys


def deterministic_state_dict(variant):
    """The reference README's recipe: the released names and shapes, filled from one generator."""
    g = torch.Generator().manual_seed(0)
    state_dict = {}
    for name, (shape, dtype) in sorted(released_keys(variant).items()):
        if not dtype.is_floating_point:
            state_dict[name] = torch.zeros(shape, dtype=dtype)
            continue
        r = torch.randn(shape, generator=g)
        if name.endswith("running_var"):
            state_dict[name] = 1 + 0.1 * r.abs()
        elif len(shape) == 0:
            state_dict[name] = 10 * (1 + 0.1 * r)
        elif len(shape) >= 2:
            state_dict[name] = r / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".weight"):
            state_dict[name] = 1 + 0.1 * r
        else:
            state_dict[name] = 0.1 * r
    return state_dict


def golden_input():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def assert_close_relative(actual, expected, rtol=1e-4):
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max |difference| {error}"


# --- released checkpoints -------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_4g"])
def test_golden_outputs(variant):
    model = glnet.load_checkpoint(glnet.create_model(variant).eval(), {"model": deterministic_state_dict(variant)})
    golden = torch.load(os.path.join(TESTDATA, "goldens.pt"))[variant]
    with torch.no_grad():
        features = model.forward_features(golden_input())
        logits = model.forward_head(features[-1])
    assert_close_relative(logits, golden["logits"])
    for feature, sample in zip(features, golden["stage_samples"]):
        assert_close_relative(feature[GOLDEN_SAMPLE], sample)


@pytest.mark.parametrize("variant", glnet.RELEASED)
def test_released_key_list_loads_strictly(variant):
    state_dict = deterministic_state_dict(variant)
    wrapper = "model_ema" if variant == "glnet_16g" else "model"
    model = glnet.load_checkpoint(glnet.create_model(variant).eval(), {wrapper: state_dict})
    assert len(model.state_dict()) == len(state_dict)
    converted = glnet.unwrap_state_dict({wrapper: state_dict})
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, converted[name].view(tensor.shape)), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="../shared/reference not present")
@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_4g"])
def test_testdata_copied_from_reference(variant):
    reference = torch.load(os.path.join(REFERENCE, f"{variant}.golden.pt"))
    shipped = torch.load(os.path.join(TESTDATA, "goldens.pt"))[variant]
    assert torch.equal(reference["input"], golden_input())
    assert torch.equal(reference["logits"], shipped["logits"])
    for full, sample in zip(reference["stage_outputs"], shipped["stage_samples"]):
        assert torch.equal(full[GOLDEN_SAMPLE], sample)
    with open(os.path.join(REFERENCE, f"{variant}.keys.txt")) as a, open(os.path.join(TESTDATA, f"{variant}.keys.txt")) as b:
        assert a.read() == b.read()


# --- checkpoint round trips and errors ---------------------------------------------------------

def small_trained_model():
    """A glnet_4g whose weights differ from any fresh initialisation, BN statistics included."""
    torch.manual_seed(0)
    model = glnet.glnet_4g(num_classes=10)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 64, 64))
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("fmt", ["bare", "model", "model_ema", "ddp", "averaged_model", "compiled"])
def test_checkpoint_round_trip(tmp_path, fmt):
    model = small_trained_model()
    state_dict = model.state_dict()
    if fmt == "bare":
        checkpoint = state_dict
    elif fmt in ("model", "model_ema"):
        checkpoint = {fmt: state_dict, "epoch": 3}
    elif fmt == "ddp":
        checkpoint = {"model": {f"module.{k}": v for k, v in state_dict.items()}}
    elif fmt == "compiled":
        checkpoint = {f"_orig_mod.{k}": v for k, v in state_dict.items()}
    else:
        checkpoint = {"model_ema": torch.optim.swa_utils.AveragedModel(model).state_dict()}
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    restored = glnet.load_checkpoint(glnet.glnet_4g(num_classes=10).eval(), str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_checkpoint_prefers_ema_and_key_selects():
    ema, plain = small_trained_model(), glnet.glnet_4g(num_classes=10).eval()
    checkpoint = {"model": plain.state_dict(), "model_ema": ema.state_dict()}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(glnet.load_checkpoint(glnet.glnet_4g(num_classes=10).eval(), checkpoint)(x), ema(x))
        assert torch.equal(glnet.load_checkpoint(glnet.glnet_4g(num_classes=10).eval(), checkpoint, key="model")(x), plain(x))
    with pytest.raises(KeyError, match="no 'optimizer' entry"):
        glnet.load_checkpoint(plain, checkpoint, key="optimizer")


def test_checkpoint_of_another_variant_is_named():
    with pytest.raises(ValueError) as error:
        glnet.load_checkpoint(glnet.glnet_stl(), {"model": deterministic_state_dict("glnet_4g")})
    message = str(error.value)
    assert "missing: " in message and "unexpected: " in message
    assert "looks like glnet_4g(num_classes=1000) exactly" in message


def test_checkpoint_with_other_num_classes_lists_shapes():
    with pytest.raises(ValueError) as error:
        glnet.load_checkpoint(glnet.glnet_stl(num_classes=10), {"model": deterministic_state_dict("glnet_stl")})
    message = str(error.value)
    assert "0 missing, 0 unexpected, 2 wrongly shaped" in message
    assert "head.weight: checkpoint (1000, 768), model (10, 768)" in message
    assert "looks like glnet_stl(num_classes=1000) exactly" in message


def test_checkpoint_missing_file_and_unknown_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        glnet.load_checkpoint(glnet.glnet_stl(), str(tmp_path / "nothing.pth"))
    with pytest.raises(ValueError, match="known models: glnet_stl, glnet_stl_paramslot, glnet_4g, glnet_9g, glnet_16g, glnet_mini"):
        glnet.create_model("glnet_8g")


# --- forward, backward and the dense-prediction interface -------------------------------------

@pytest.mark.parametrize("variant", list(glnet.MODELS))
def test_forward_backward_every_variant(variant):
    torch.manual_seed(0)
    model = glnet.create_model(variant, num_classes=7).train()
    for size in [(64, 64), (72, 100)]:
        model.zero_grad()
        logits = model(torch.randn(2, 3, *size))
        assert logits.shape == (2, 7)
        logits.logsumexp(dim=1).mean().backward()
        for name, p in model.named_parameters():
            # Every parameter takes part, the slot scale tau and the learned slots included.
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_drop_path_is_stochastic_in_training_only():
    torch.manual_seed(0)
    model = glnet.glnet_4g(num_classes=7, drop_path_rate=0.5)
    rates = [m.p for m in model.modules() if isinstance(m, glnet.StochasticDepth)]
    assert rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_4g"])
@pytest.mark.parametrize("size", [(64, 64), (100, 132), (513, 771)])
def test_dense_features_at_any_size(variant, size):
    model = glnet.create_model(variant).eval()
    assert model.stage_channels == ((96, 192, 384, 768) if variant == "glnet_stl" else (64, 128, 256, 512))
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, *size))
    assert len(features) == 4
    for feature, channels, stride in zip(features, model.stage_channels, model.stage_strides):
        assert feature.shape == (1, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(feature).all()


def test_padding_keeps_non_overlapped_model_translation_consistent():
    """An input padded with zeros at the bottom/right to a multiple of 32 gives the same top-left
    stage-1 features as the unpadded one: the patch convolutions pad, they do not crop."""
    model = glnet.glnet_stl().eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        stem_out = model.downsample_layers[0](x)
        padded_out = model.downsample_layers[0](torch.nn.functional.pad(x, (0, 6, 0, 26)))
    assert stem_out.shape[2:] == (18, 23)
    assert torch.allclose(stem_out, padded_out[:, :, :18, :23], atol=1e-6)


def test_clustering_weights():
    model = glnet.glnet_stl().eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected_logits = model(x)
    weights = model.clustering_weights(x)
    assert list(weights) == [f"stages.{i}.blocks.{j}" for i, n in enumerate((2, 2, 6)) for j in range(n)]
    for name, w in weights.items():
        stride = 4 * 2 ** int(name.split(".")[1])
        assert w.shape == (2, glnet.NUM_SLOTS, 96 // stride, 128 // stride)
        # Eq. 3: each slot's weights are a softmax over the pixels, so they sum to 1 over H and W.
        torch.testing.assert_close(w.sum(dim=(2, 3)), torch.ones(2, glnet.NUM_SLOTS))
    assert not any(hasattr(m, "clustering_weights") or m.keep_clustering_weights
                   for m in model.modules() if isinstance(m, glnet.GLMixBlock))
    with torch.no_grad():
        assert torch.equal(model(x), expected_logits)


def test_num_classes_zero_gives_pooled_features():
    model = glnet.glnet_4g(num_classes=0).eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 512) and model.num_features == 512


@pytest.mark.parametrize("bad_input, error, message", [
    (torch.randn(2, 1, 64, 64), ValueError, r"expects a float image batch of shape \(B, 3, H, W\).*got shape \(2, 1, 64, 64\)"),
    (torch.randn(3, 64, 64), ValueError, r"got shape \(3, 64, 64\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, r"got dtype torch.uint8"),
    (torch.randn(1, 3, 16, 64), ValueError, r"H, W >= 32, got 16x64"),
    ([[0.0]], TypeError, r"got list"),
])
def test_bad_input_is_explained(bad_input, error, message):
    with pytest.raises(error, match=message):
        glnet.glnet_stl()(bad_input)


# --- speed-related properties (the speed itself is a benchmark: python glnet.py --bench) -------------

class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


def largest_tensor(fn, *args):
    with torch.inference_mode(), LargestTensor() as mode:
        fn(*args)
    return mode.numel


def test_glmix_block_tensors_are_at_most_64_or_mlp_width_times_pixels():
    block = glnet.GLMixBlock(dim=32, mlp_ratio=3, conv_pos=True, conv_ffn=True).eval()
    for size in (16, 48):
        pixels = size * size
        assert largest_tensor(block, torch.randn(2, 32, size, size)) == 2 * pixels * max(glnet.NUM_SLOTS, 3 * 32)


@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_4g"])
def test_no_tensor_grows_with_the_square_of_the_pixel_count(variant):
    """Full attention (stage 3 odd blocks, stage 4) must not materialise the N x N matrix either:
    at 512x512 it would be 10x larger than at 256x256 instead of 4x."""
    model = glnet.create_model(variant).eval()
    small, large = (largest_tensor(model.forward_features, torch.randn(1, 3, s, s)) for s in (256, 512))
    assert large <= 4 * small


def test_compiles_without_graph_breaks():
    for model in (glnet.glnet_mini().eval(), glnet.glnet_stl(num_classes=0).eval()):
        explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64))
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_4g"])
def test_bf16_autocast_stays_close_to_fp32(variant):
    model = glnet.load_checkpoint(glnet.create_model(variant).eval(), deterministic_state_dict(variant))
    with torch.no_grad():
        reference = model(golden_input())
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(golden_input()).float()
    assert (logits - reference).abs().max() <= 0.05 * reference.abs().max()
    assert torch.nn.functional.cosine_similarity(logits, reference).min() >= 0.999
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_residual_dwconv_is_z_plus_dwconv():
    conv = glnet.ResidualDWConv(8)
    z = torch.randn(2, 8, 9, 11)
    expected = z + torch.nn.functional.conv2d(z, conv.weight, conv.bias, padding=1, groups=8)
    torch.testing.assert_close(conv(z), expected)
    assert list(conv.state_dict()) == ["weight", "bias"]


def test_benchmark_runs():
    result = subprocess.run([sys.executable, "glnet.py", "--bench", "--models", "glnet_mini", "--rounds", "1",
                             "--batch-size", "1", "--image-size", "64",
                             "--latency-sizes", "64", "128", "--memory-sizes", "128"],
                            cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert float(rows["swin_t"][2]) == 1.0 and float(rows["convnext_tiny"][3]) == 1.0
    assert float(rows["glnet_mini"][1]) > 0 and float(rows["128x128:"][1]) > 0
    assert "training step" in result.stdout and float(rows["128"][3]) == 4.0


# --- parameters, FLOPs, the report ---------------------------------------------------------------

def test_attention_flops_are_counted():
    block = glnet.MHSA(64).eval()  # 2 heads of 32 channels
    tokens = 49
    projections = tokens * 64 * (3 * 64) + tokens * 64 * 64
    attention = 2 * tokens * tokens * (32 + 32)  # per head: Q K^T and A V
    expected = projections + attention
    assert glnet.flop_analysis(block, torch.zeros(1, tokens, 64)).total() == expected


@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_4g", "glnet_9g", "glnet_16g"])
def test_params_and_flops_match_the_paper(variant):
    model = glnet.create_model(variant)
    paper_params, paper_flops, _ = glnet.PAPER[variant]
    assert abs(glnet.count_params(model) / 1e6 - paper_params) <= 0.1
    assert abs(glnet.count_flops(model) - paper_flops) <= 0.15


def test_report_script_runs():
    result = subprocess.run([sys.executable, "glnet.py", "--models", "glnet_stl", "--batch-size", "1", "--steps", "1"],
                            cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = [line for line in result.stdout.splitlines() if line.startswith("glnet_stl ")]
    assert len(row) == 1
    name, params, paper_params, flops, paper_flops, top1, speed = row[0].split()
    assert float(params) == pytest.approx(30.30, abs=0.01) and float(flops) == pytest.approx(4.36, abs=0.01)
    assert float(speed) > 0


def test_import_has_no_side_effects():
    result = subprocess.run([sys.executable, "-c", "import glnet"], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
