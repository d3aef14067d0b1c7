"""Tests for the GLNet reference implementation: `python -m pytest -q -n auto test_glnet.py`.

One section per file: glnet.py, train.py, analyze.py, detect_seg.py. Everything runs on the CPU
on data the tests generate (real image files in tmp_path) or that testdata/ ships.

testdata/ holds the released checkpoints' tensor layouts (<variant>.keys.txt) and, in goldens.pt,
the released model's logits and a strided sample of its stage outputs (of glnet_4g_tklb: its
eval logits, class logits and a strided sample of its token logits) for the deterministic weights
below (all copied from ../shared/reference, which tests check when present).
"""

import collections
import contextlib
import copy
import dataclasses
import argparse
import itertools
import json
import math
import os
import pathlib
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
import typing
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image, ImageEnhance, ImageOps
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from einops import rearrange
from torchvision import tv_tensors
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms import v2

import analyze
import detect_seg
import glnet
import train

HERE = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: one core for each test process
    torch.set_num_threads(1)
TESTDATA = os.path.join(HERE, "testdata")
REFERENCE = os.path.join(HERE, "..", "shared", "reference")
GOLDEN_SAMPLE = (slice(None), slice(None, None, 8), slice(None, None, 4), slice(None, None, 4))
TOKEN_SAMPLE = (slice(None), slice(None), slice(None, None, 4))  # every token, every 4th class
# pycocotools' mask.decode warns on every call under NumPy 2 (its __array__ lacks the copy keyword): not ours to fix
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning:pycocotools.mask")


# =================================================================================================
# glnet.py: the model, released checkpoints, speed-related properties, FLOPs
# =================================================================================================


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


@pytest.fixture(scope="module")
def token_head_golden_outputs():
    """glnet_4g_tklb's eval logits, class logits and token logits on the golden input."""
    model = glnet.create_model("glnet_4g_tklb", checkpoint={"model": deterministic_state_dict("glnet_4g_tklb")})
    with torch.no_grad():
        features = model.eval().forward_features(golden_input())[-1]
        logits = model.forward_head(features)
        class_logits, token_logits = model.forward_head(features, return_tokens=True)
    return {"logits": logits, "class_logits": class_logits, "token_logits": token_logits}


def test_token_head_golden_outputs(token_head_golden_outputs):
    golden = torch.load(os.path.join(TESTDATA, "goldens.pt"))["glnet_4g_tklb"]
    outputs = token_head_golden_outputs
    assert outputs["token_logits"].shape == (2, 49, 1000)
    assert_close_relative(outputs["logits"], golden["logits"])
    assert_close_relative(outputs["class_logits"], golden["class_logits"])
    assert_close_relative(outputs["token_logits"][TOKEN_SAMPLE], golden["token_sample"])


# The released names -> this file's names, as the README documents them (the spec the loader implements).
RELEASED_RENAMES = [(".slot_scale", ".tau"), (".relation_mha.", ".slot_mhsa."), (".feature_conv.", ".local_branch."),
                    (".mha_op.", ".mhsa."), ("tklb_aux_head.", "token_head.")]
OVERLAPPED_STEM_INDICES = {"1": "0", "2": "1", "4": "3", "5": "4"}  # the released stem has a module first


def documented_name(released_name, overlapped):
    name = released_name
    for old, new in RELEASED_RENAMES:
        name = name.replace(old, new)
    parts = name.split(".")
    if overlapped and parts[:2] == ["downsample_layers", "0"]:
        parts[2] = OVERLAPPED_STEM_INDICES[parts[2]]
    return ".".join(parts)


@pytest.mark.parametrize("variant", glnet.RELEASED)
def test_released_key_list_loads_strictly(variant):
    """Every released tensor lands, value for value, in the module the README's renaming names,
    and the model has no tensor that did not come from the checkpoint."""
    state_dict = deterministic_state_dict(variant)
    wrapper = "model_ema" if variant == "glnet_16g" else "model"
    model = glnet.load_checkpoint(glnet.create_model(variant).eval(), {wrapper: state_dict})
    loaded = model.state_dict()
    overlapped = "downsample_layers.0.5.weight" in state_dict
    assert len(loaded) == len(state_dict)
    for released_name, tensor in state_dict.items():
        name = documented_name(released_name, overlapped)
        assert name in loaded, f"{released_name} -> {name} is not a tensor of {variant}"
        assert torch.equal(loaded[name], tensor.view(loaded[name].shape)), f"{released_name} -> {name}"
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


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="../shared/reference not present")
def test_token_head_testdata_copied_from_reference_and_full_golden(token_head_golden_outputs):
    reference = torch.load(os.path.join(REFERENCE, "glnet_4g_tklb.golden.pt"))
    shipped = torch.load(os.path.join(TESTDATA, "goldens.pt"))["glnet_4g_tklb"]
    assert torch.equal(reference["input"], golden_input())
    assert torch.equal(reference["logits"], shipped["logits"])
    assert torch.equal(reference["class_logits"], shipped["class_logits"])
    assert torch.equal(reference["token_logits"][TOKEN_SAMPLE], shipped["token_sample"])
    assert_close_relative(token_head_golden_outputs["token_logits"], reference["token_logits"])
    for variant in ("glnet_4g_tklb", "glnet_9g_tklb"):
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
    with pytest.raises(glnet.InputError) as error:
        glnet.load_checkpoint(glnet.glnet_stl(), {"model": deterministic_state_dict("glnet_4g")})
    message = str(error.value)
    assert "missing: " in message and "unexpected: " in message
    assert "looks like glnet_4g(num_classes=1000) exactly" in message


def test_checkpoint_with_other_num_classes_lists_shapes():
    with pytest.raises(glnet.InputError) as error:
        glnet.load_checkpoint(glnet.glnet_stl(num_classes=10), {"model": deterministic_state_dict("glnet_stl")})
    message = str(error.value)
    assert "0 missing, 0 unexpected, 2 wrongly shaped" in message
    assert "head.weight: checkpoint (1000, 768), model (10, 768)" in message
    assert "looks like glnet_stl(num_classes=1000) exactly" in message


def test_checkpoint_missing_file_and_unknown_model(tmp_path):
    with pytest.raises(glnet.InputError, match="cannot read checkpoint .*nothing.pth: No such file or directory"):
        glnet.load_checkpoint(glnet.glnet_stl(), str(tmp_path / "nothing.pth"))
    with pytest.raises(glnet.InputError, match="known models: glnet_stl, glnet_stl_paramslot, glnet_4g, glnet_9g, "
                                               "glnet_16g, glnet_4g_tklb, glnet_9g_tklb, glnet_mini"):
        glnet.create_model("glnet_8g")


def mini_with_token_head():
    """A glnet_mini with a token head and BatchNorm statistics that differ from their defaults."""
    torch.manual_seed(0)
    model = glnet.create_model("glnet_mini", token_head=True, num_classes=5)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 64, 96))
    return model.eval()


def test_create_model_loads_a_checkpoint_path_or_dict(tmp_path):
    model = mini_with_token_head()
    path = tmp_path / "mini_tklb.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        from_path = glnet.create_model("glnet_mini", token_head=True, num_classes=5, checkpoint=str(path))
        from_dict = glnet.create_model("glnet_mini", token_head=True, num_classes=5,
                                       checkpoint={"model_ema": {}, "model": model.state_dict()}, checkpoint_key="model")
        assert torch.equal(from_path.eval()(x), expected) and torch.equal(from_dict.eval()(x), expected)
        # A backbone (num_classes=0) takes a classifier checkpoint without its two classifiers.
        backbone = glnet.create_model("glnet_mini", num_classes=0, checkpoint=str(path)).eval()
        assert torch.equal(backbone(x), model.norm(model.forward_features(x)[-1]).mean(dim=(2, 3)))
    with pytest.raises(glnet.InputError, match=r"unexpected: token_head.weight, token_head.bias"):
        glnet.create_model("glnet_mini", num_classes=5, checkpoint=str(path))
    with pytest.raises(glnet.InputError, match=r"wrongly shaped: head.weight: checkpoint \(5, 256\), model \(1000, 256"):
        glnet.create_model("glnet_mini", token_head=True, checkpoint=str(path))


def test_token_head_checkpoint_in_the_standard_variant_is_named():
    with pytest.raises(glnet.InputError) as error:
        glnet.create_model("glnet_4g", checkpoint={"model": deterministic_state_dict("glnet_4g_tklb")})
    message = str(error.value)
    assert "0 missing, 2 unexpected, 0 wrongly shaped" in message
    assert "looks like glnet_4g_tklb(num_classes=1000) exactly" in message


class DictConfig:
    """omegaconf's DictConfig as pickle writes it (omegaconf is not installed): its module and name, metadata that
    names typing.Any and dict, and the resolver cache, a defaultdict filled item by item."""

    def __init__(self, **content):
        self._metadata = {"ref_type": typing.Any, "object_type": dict,
                          "resolver_cache": collections.defaultdict(dict, {"now": {("%Y-%m-%d",): "2024-05-01"}})}
        self._content = content


DictConfig.__module__ = "omegaconf.dictconfig"


def save_as_the_released_training(path, weights, args, ema=None):
    """The file the released training's save_model writes: {'model', 'optimizer', 'epoch', 'scaler', 'args',
    'model_ema'}, 'args' its hydra config or a Namespace; omegaconf's module exists only while saving."""
    optimizer = {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.arange(3.0)}},
                 "param_groups": [{"lr": 4e-3, "weight_decay": 0.05, "params": [0]}]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
        patch.setitem(sys.modules, "omegaconf.dictconfig", types.SimpleNamespace(DictConfig=DictConfig))
        torch.save({"model": weights, "optimizer": optimizer, "epoch": 299, "scaler": {"scale": 65536.0},
                    "args": args, "model_ema": weights if ema is None else ema}, path)
    assert "omegaconf" not in sys.modules
    return path


RELEASED_ARGS = {"DictConfig": DictConfig(model="glnet_mini", lr=None, output_dir="outputs"),
                 "Namespace": argparse.Namespace(model="glnet_mini", output_dir=pathlib.Path("outputs"),
                                                 _max_accuracy=np.float64(81.2), nb_classes=np.int64(5))}


@pytest.mark.parametrize("args", RELEASED_ARGS)
def test_the_released_trainings_files_are_read_without_their_classes(args, tmp_path):
    """What the released training saves, with hydra's config (omegaconf not installed) or a plain script's Namespace
    (a path and numpy scalars) in 'args': its tensors and plain values come back, 'args' is left out, nothing is
    imported, the weights load strictly. A truncated copy is named so."""
    model = mini_with_token_head()
    path = save_as_the_released_training(tmp_path / "checkpoint-299.pth", model.state_dict(), RELEASED_ARGS[args])
    checkpoint = glnet.read_checkpoint(str(path))
    assert sorted(checkpoint) == ["epoch", "model", "model_ema", "optimizer", "scaler"] and checkpoint["epoch"] == 299
    assert torch.equal(checkpoint["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert checkpoint["scaler"] == {"scale": 65536.0} and "omegaconf" not in sys.modules
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        restored = glnet.create_model("glnet_mini", token_head=True, num_classes=5, checkpoint=str(path)).eval()
        assert torch.equal(restored(x), model(x))
    with pytest.raises(glnet.InputError, match=r"wrongly shaped: head.weight: checkpoint \(5, 256\), model \(10, 256"):
        glnet.create_model("glnet_mini", token_head=True, num_classes=10, checkpoint=str(path))
    path.write_bytes(file_bytes(path)[:100_000])
    with pytest.raises(glnet.InputError, match="truncated, or not a torch.save file of tensors and plain values"):
        glnet.read_checkpoint(str(path))


class RunsACommand:
    """What an attacker's checkpoint holds: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_names_a_function_is_refused_and_runs_nothing(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "checkpoint.pth"
    torch.save({"model": glnet.create_model("glnet_mini").state_dict(), "args": RunsACommand(f"touch {marker}")}, path)
    with pytest.raises(glnet.InputError, match=f"refusing checkpoint {path}: it names {os.system.__module__}.system, "
                                               f"which no file of weights and settings needs; nothing in it was run"):
        glnet.create_model("glnet_mini", checkpoint=str(path))
    assert not marker.exists()
    torch.save(glnet.create_model("glnet_mini"), path)  # a whole pickled model: its classes are listed, the first 4
    with pytest.raises(glnet.InputError, match=r"it names glnet\.\w+, glnet\.\w+, glnet\.\w+, glnet\.\w+, \.\.\., which"):
        glnet.read_checkpoint(str(path))


# --- forward, backward and the dense-prediction interface -------------------------------------

@pytest.mark.parametrize("variant", [name for name in glnet.MODELS if not name.endswith("_tklb")])  # tklb: below
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


def test_token_head_trains_on_both_outputs():
    model = mini_with_token_head().train()
    class_logits, token_logits = model(torch.randn(2, 3, 64, 96))
    assert class_logits.shape == (2, 5) and token_logits.shape == (2, 2 * 3, 5)  # 64x96 / 32: 2x3 tokens
    targets = torch.randint(5, (2, 6))  # a label per token, as token labeling gives them
    loss = class_logits.logsumexp(dim=1).mean() + torch.nn.functional.cross_entropy(token_logits.transpose(1, 2), targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert {"head.weight", "token_head.weight"} <= {name for name, _ in model.named_parameters()}


def test_token_head_eval_output_is_class_plus_half_the_token_maximum():
    model = mini_with_token_head()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.norm(model.forward_features(x)[-1])                         # (2, 256, 2, 3)
        class_logits = model.head(features.mean(dim=(2, 3)))
        tokens = [model.token_head(features[:, :, i, j]) for i in range(2) for j in range(3)]  # row-major
        token_logits = torch.stack(tokens, dim=1)                                    # (2, 6, 5)
        expected = class_logits + 0.5 * token_logits.max(dim=1).values
        torch.testing.assert_close(model(x), expected)
        both = model.forward_head(model.forward_features(x)[-1], return_tokens=True)
    torch.testing.assert_close(both[0], class_logits)
    torch.testing.assert_close(both[1], token_logits)
    with pytest.raises(ValueError, match="needs a model with a token head"):
        glnet.glnet_mini().forward_head(torch.randn(1, 256, 2, 2), return_tokens=True)


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
    with torch.no_grad():
        assert torch.equal(model(x), expected_logits)


def test_clustering_weights_leave_a_training_model_as_it_was():
    """Slots visualised during training (the paper's Figure 7) change nothing: the weights are
    eval-mode ones, and mode, buffers and hooks are as before, also when the forward is interrupted."""
    torch.manual_seed(0)
    model = glnet.create_model("glnet_mini").train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)  # BatchNorm statistics that differ from their initial values
    before = copy.deepcopy(model.state_dict())
    expected = copy.deepcopy(model).eval().clustering_weights(x)
    weights = model.clustering_weights(x)
    assert model.training and list(weights) == list(expected)
    for name, w in weights.items():
        torch.testing.assert_close(w, expected[name], rtol=0, atol=0)
    interrupt = model.stages[2].register_forward_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        model.clustering_weights(x)
    interrupt.remove()
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def fx_nodes(model):
    """The four stage outputs and the first GLMix block's clustering weights, as node names."""
    nodes = {f"stages.{i}": f"c{i + 2}" for i in range(4)}
    first = next(name for name, m in model.named_modules() if isinstance(m, glnet.GLMixBlock))
    return nodes | {f"{first}.clustering": "clustering"}, first


@pytest.mark.parametrize("variant", list(glnet.MODELS))
def test_fx_feature_extraction_of_every_variant(variant):
    """torchvision's feature extraction traces every variant (on the meta device: shapes only) and
    gives the stage outputs and an inner node, a block's clustering weights (B, 64, HW)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    with torch.device("meta"):
        model = glnet.create_model(variant, num_classes=10).eval()
        nodes, _ = fx_nodes(model)
        x = torch.zeros(2, 3, 33, 47)
        features = create_feature_extractor(model, nodes)(x)
        eager = model.forward_features(x)
    assert [features[f"c{i + 2}"].shape for i in range(4)] == [f.shape for f in eager]
    assert features["clustering"].shape == (2, glnet.NUM_SLOTS, 9 * 12)  # stage 1: 33x47 / 4, rounded up


@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_mini"])  # non-overlapped and overlapped stems
def test_fx_features_equal_the_eager_ones(variant):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    torch.manual_seed(0)
    model = glnet.create_model(variant, num_classes=10).eval()
    nodes, first = fx_nodes(model)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert f"{first}.clustering" in train_nodes and f"{first}.clustering" in eval_nodes
    x = torch.randn(2, 3, 33, 47)
    with torch.no_grad():
        features = create_feature_extractor(model, nodes)(x)
        for feature, expected in zip((features[f"c{i + 2}"] for i in range(4)), model.forward_features(x)):
            torch.testing.assert_close(feature, expected)
        clustering = model.clustering_weights(x)[first]
        torch.testing.assert_close(features["clustering"].unflatten(2, clustering.shape[2:]), clustering)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), model(x))
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 33, 47\)"):  # the traced model keeps the check
        traced(torch.randn(2, 1, 33, 47))


@pytest.mark.parametrize("variant", ["glnet_stl", "glnet_mini"])  # non-overlapped and overlapped stems
def test_traced_exported_and_onnx_models_are_right_at_other_sizes(variant, tmp_path):
    """torch.jit.trace at 64x64, torch.export with a dynamic height and width (from 33) and its ONNX export run in
    onnxruntime give the eager outputs at sizes not divisible by 32 (glnet_mini with a token head: GLNet-4G*'s eval
    rule, a max over the tokens, is in the graphs too)."""
    import onnxruntime
    torch.manual_seed(0)
    model = glnet.create_model(variant, num_classes=10, token_head=variant == "glnet_mini").eval()
    dynamic = {"x": {2: torch.export.Dim("height", min=33), 3: torch.export.Dim("width", min=33)}}
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(2, 3, 64, 64), check_trace=False)
        exported = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=dynamic)
    torch.onnx.export(exported, (torch.randn(2, 3, 64, 64),), tmp_path / f"{variant}.onnx", dynamo=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(tmp_path / f"{variant}.onnx", options, providers=["CPUExecutionProvider"])
    for size in ((97, 130), (224, 320), (33, 47)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(traced(x), expected)
            torch.testing.assert_close(exported.module()(x), expected)
        (logits,) = session.run(None, {"x": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-5)


def test_num_classes_zero_gives_pooled_features():
    model = glnet.glnet_4g(num_classes=0).eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 512) and model.num_features == 512
    assert glnet.create_model("glnet_mini", token_head=True, num_classes=0).token_head is None  # no classifier at all


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


# --- speed-related properties (the speed itself is a benchmark: python train.py --bench) -------------

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


# --- deployment and fine-tuning: released weights by name, torch.hub, classifiers, checkpointing --------

def test_exported_slot_initialisation_pools_as_adaptive_average_pooling_at_every_size():
    """Exported graphs pool the grid to the 64 initial slots (Eq. 1) with matrices computed from the size: a block
    exported with a dynamic grid gives the eager block's output (F.adaptive_avg_pool2d) where the grid is not a
    multiple of 8 or is smaller than 8 (overlapping windows)."""
    torch.manual_seed(0)
    block = glnet.GLMixBlock(dim=32, mlp_ratio=3).eval()
    dynamic = {"x": {2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)}}
    exported = torch.export.export(block, (torch.randn(2, 32, 16, 24),), dynamic_shapes=dynamic).module()
    for height, width in itertools.product((2, 3, 7, 9, 14, 57), (5, 8, 12, 17, 64)):
        x = torch.randn(2, 32, height, width).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), block(x))


RELEASED_4G_URL = ("https://api.onedrive.com/v1.0/shares/u!aHR0cHM6Ly8xZHJ2Lm1zL3UvcyFBa0JiY3pkUmxadkN5RzlEalNfQU1xbkpR"
                   "aVgxP2U9dE9raEhQ/root/content")  # the released code's URL of glnet_4g.pth


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME whose downloads fail as OneDrive's do for scripts, but for the files of `served` ({file
    name: path}); {url: file} records the attempts."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts, served = {}, {}

    def download(url, dst, *args, **kwargs):
        attempts[url] = dst
        if os.path.basename(dst) not in served:
            raise urllib.error.HTTPError(url, 403, "Forbidden", None, None)
        shutil.copyfile(served[os.path.basename(dst)], dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return tmp_path / "torch" / "hub" / "checkpoints", attempts, served


def test_pretrained_downloads_to_the_hub_folder_and_reads_the_released_trainings_files(torch_home, tmp_path):
    """As the released code: <torch hub dir>/checkpoints/<name>.pth, downloaded there when missing, then used as it
    is: the file the released training wrote (hydra's config in 'args'), its 'model' loaded strictly (glnet_16g: its
    EMA, 'model_ema'); without it the error names the file to put there and the link to download it."""
    folder, attempts, served = torch_home
    released = deterministic_state_dict("glnet_stl")
    served["glnet_stl.pth"] = save_as_the_released_training(tmp_path / "glnet_stl.pth", released, DictConfig(),
                                                            ema={"head.weight": torch.zeros(1)})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = glnet.create_model("glnet_stl", checkpoint={"model": released}).eval()(x)
        torch.testing.assert_close(glnet.create_model("glnet_stl", pretrained=True).eval()(x), expected, rtol=0, atol=0)
        assert list(attempts.values()) == [str(folder / "glnet_stl.pth")]
        served.clear()  # the file there is used as it is
        torch.testing.assert_close(glnet.create_model("glnet_stl", pretrained=True).eval()(x), expected, rtol=0, atol=0)
    with torch.device("meta"):  # shapes only: the EMA is glnet_16g's, 'model' another variant's
        save_as_the_released_training(folder / "glnet_16g.pth", glnet.glnet_4g().state_dict(), DictConfig(),
                                      ema=glnet.glnet_16g().state_dict())
        glnet.create_model("glnet_16g", pretrained=True)
    torch.save({"model": {}}, folder / "glnet_16g.pth")
    with pytest.raises(KeyError, match="no 'model_ema' entry"):
        glnet.create_model("glnet_16g", pretrained=True)
    attempts.clear()

    with pytest.raises(glnet.InputError) as error:
        glnet.create_model("glnet_4g", pretrained=True)
    assert list(attempts) == [RELEASED_4G_URL]
    assert f"download it from {glnet.CHECKPOINT_LINKS['glnet_4g']} to {folder / 'glnet_4g.pth'}" in str(error.value)
    assert "HTTP Error 403" in str(error.value) and not (folder / "glnet_4g.pth").exists()
    (folder / "glnet_9g.pth").write_text("<!DOCTYPE html>")  # what a browser may save instead of the file
    with pytest.raises(glnet.InputError) as error:
        glnet.create_model("glnet_9g", pretrained=True)
    assert "could not be downloaded or read" in str(error.value) and str(folder / "glnet_9g.pth") in str(error.value)
    with pytest.raises(glnet.InputError, match="pretrained=True takes no checkpoint and one of glnet_stl, .*'glnet_mini'"):
        glnet.create_model("glnet_mini", pretrained=True)


def test_torch_hub_loads_every_released_variant(torch_home):
    folder, attempts, _ = torch_home
    os.makedirs(folder)
    with torch.device("meta"):
        for name in glnet.RELEASED:
            model = torch.hub.load(HERE, name, source="local", num_classes=10)
            assert glnet.count_params(model) == glnet.count_params(glnet.create_model(name, num_classes=10))
    released = deterministic_state_dict("glnet_stl_paramslot")
    torch.save({"model": released}, folder / "glnet_stl_paramslot.pth")
    model = torch.hub.load(HERE, "glnet_stl_paramslot", source="local", pretrained=True)
    assert all(torch.equal(model.state_dict()[glnet_name], released[released_name]) for glnet_name, released_name in
               (("stages.0.blocks.0.init_slots", "stages.0.blocks.0.init_slots"), ("head.weight", "head.weight")))
    assert not attempts


def test_reset_classifier_for_fine_tuning():
    """reset_classifier(K) gives new classifiers (the token head too) on the same features; 0 gives the features."""
    model = mini_with_token_head()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)[-1]
        model.reset_classifier(3)
        assert model.get_classifier() is model.head and model.head.out_features == model.token_head.out_features == 3
        assert model.num_classes == 3 and model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model.token_head is None and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), model.norm(features).mean(dim=(2, 3)), rtol=0, atol=0)
        model.reset_classifier(5)  # built with a token head: it comes back
        class_logits, token_logits = model.train()(x)
    assert class_logits.shape == (2, 5) and token_logits.shape == (2, 4, 5)


def saved_bytes_and_gradients(model, x):
    """Logits, gradients and the bytes autograd keeps for the backward pass of one training step."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(1)  # the same drop path draws
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(x)
    logits.logsumexp(dim=1).sum().backward()
    return logits, {k: p.grad.clone() for k, p in model.named_parameters()}, sum(saved)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients_keeping_fewer_activations():
    torch.manual_seed(0)
    model = glnet.create_model("glnet_mini", num_classes=7, drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 64, 96)
    logits, gradients, saved = saved_bytes_and_gradients(model, x)
    model.set_grad_checkpointing(True)
    logits_checkpointed, gradients_checkpointed, saved_checkpointed = saved_bytes_and_gradients(model, x)
    torch.testing.assert_close(logits_checkpointed, logits, rtol=0, atol=0)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradients_checkpointed[name], gradient, rtol=1e-5, atol=1e-6, msg=name)
    assert saved_checkpointed < saved / 3  # the blocks keep only their inputs
    model.set_grad_checkpointing(False)
    assert saved_bytes_and_gradients(model, x)[2] == saved


# --- parameters, FLOPs, the report ---------------------------------------------------------------

def test_attention_flops_are_counted():
    block = glnet.MHSA(64).eval()  # 2 heads of 32 channels
    tokens = 49
    projections = tokens * 64 * (3 * 64) + tokens * 64 * 64
    attention = 2 * tokens * tokens * (32 + 32)  # per head: Q K^T and A V
    expected = projections + attention
    assert glnet.flop_analysis(block, torch.zeros(1, tokens, 64)).total() == expected


def attention_flops(model, x):
    """Multiply-accumulates of every attention (Q K^T and A V, per head of 32 channels) in a forward
    of x, from the shapes the MHSA modules see: independent of fvcore and of its attention handle."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        batch, tokens, channels = inputs[0].shape
        total += batch * (channels // glnet.HEAD_DIM) * tokens * tokens * 2 * glnet.HEAD_DIM

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, glnet.MHSA)]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return total


@pytest.mark.parametrize("variant", glnet.RELEASED)
def test_params_and_flops_match_the_paper(variant):
    """Parameters and FLOPs against the paper's model card, and the attention's own FLOPs (which
    fvcore cannot count without the added handle) exactly as computed from the shapes."""
    model = glnet.create_model(variant)
    paper_params, paper_flops, _ = glnet.PAPER[variant]
    x = torch.zeros(1, 3, 224, 224)
    flops = glnet.flop_analysis(model.eval(), x)
    assert abs(glnet.count_params(model) / 1e6 - paper_params) <= 0.1
    assert abs(flops.total() / 1e9 - paper_flops) <= 0.1
    assert flops.by_operator().get("scaled_dot_product_attention", 0) == attention_flops(model, x) > 0


def test_report_script_runs():
    result = subprocess.run([sys.executable, "glnet.py", "--models", "glnet_stl"], cwd=HERE, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    row = [line for line in result.stdout.splitlines() if line.startswith("glnet_stl ")]
    assert len(row) == 1
    name, params, paper_params, flops, paper_flops, top1 = row[0].split()
    assert float(params) == pytest.approx(30.30, abs=0.01) and float(flops) == pytest.approx(4.36, abs=0.01)
    assert (float(paper_params), float(paper_flops), float(top1)) == glnet.PAPER["glnet_stl"]


def test_import_has_no_side_effects(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import glnet, train, detect_seg, analyze"], cwd=HERE, text=True,
                            capture_output=True, env={**os.environ, "PYTHONPATH": HERE, "XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert not os.listdir(tmp_path)  # nothing generated, nothing downloaded


# =================================================================================================
# train.py
# =================================================================================================

TINY = ["--model", "glnet_mini", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--print-freq", "1", "--warmup-epochs", "0.5"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread: fast on a busy CPU; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes, 8 train and 5 val images each: 15 val images, odd for 2 ranks."""
    root = str(tmp_path_factory.mktemp("data") / "shapes")
    return train.make_shapes_dataset(root, train_per_class=8, val_per_class=5, image_size=40,
                                     classes=("circle", "square", "vertical_stripes"))


def run_script(args, launcher=(sys.executable,), timeout=120):
    result = subprocess.run([*launcher, os.path.join(HERE, "train.py"), *args], cwd=HERE, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def kill_process_tree(pid):
    """SIGKILL a process and all its descendants (torchrun's workers run in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry))
    pending, tree = [pid], []
    while pending:
        tree.append(pending.pop())
        pending += children.get(tree[-1], [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def torchrun(nproc):
    return (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}")


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def settings(*argv):
    """The settings a run of `python train.py ARGV` trains with."""
    return train.make_settings(train.parse_args(list(argv))[1])


# --- flags, checkpoint files ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--image-size", "16"], "argument --image-size: must be at least 32, got 16"),
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--accum-steps", "0"], "argument --accum-steps: must be at least 1, got 0"),
    (["--checkpoint-every", "0"], "argument --checkpoint-every: must be at least 1, got 0"),
    (["--repeated-aug", "0"], "argument --repeated-aug: must be at least 1, got 0"),
    (["--interpolation", "nearest"], "argument --interpolation: invalid choice: 'nearest'"),
    (["--teacher", "teacher.pth"], "--make-token-labels DIR and --teacher CHECKPOINT go together"),
    (["--eval"], "--eval needs --checkpoint FILE"),
    (["--crop-pct", "0"], "argument --crop-pct: must be greater than 0 and at most 1, got 0"),
    (["--crop-pct", "1.5"], "argument --crop-pct: must be greater than 0 and at most 1, got 1.5"),
    (["--lr", "0"], "argument --lr: must be greater than 0, got 0"),
    (["--label-smoothing", "nan"], "argument --label-smoothing: must be at least 0 and at most 1, got nan"),
    (["--weight-decay", "-0.05"], "argument --weight-decay: must be at least 0, got -0.05"),
    (["--lr-steps", "8", "0"], "argument --lr-steps: must be at least 1, got 0"),
    (["--seed", "-1"], "argument --seed: must be at least 0, got -1"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
])
def test_bad_flags_are_usage_errors(argv, message, capsys):
    """One line, `prog: error: ... (see prog --help)`, exit status 2: every numeric flag has its range."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in stderr
    assert re.fullmatch(r"(\S+): error: .* \(see \1 --help\)\n", stderr), stderr


@pytest.mark.parametrize("argv, message", [
    (["--model", "glnet_4g_tklb"], "trains with token labels: pass --token-labels DIR"),
    (["--recipe", "imagenet-tklb"], "trains with token labels: pass --token-labels DIR (the NFNet-F6 maps, or "
                                    "make them with --make-token-labels DIR --teacher CHECKPOINT)"),
    (["--token-labels", "labels", "--cutmix", "1.0"], "pass --mixup 0 --cutmix 0 (got 0.0, 1.0)"),
])
def test_runs_that_cannot_do_what_they_say_are_refused(argv, message, tmp_path):
    with pytest.raises(glnet.InputError, match=re.escape(message)):
        train.main([*argv, "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


SAVE_FOREVER = """
import sys, torch, train
train.save_checkpoint({"version": 1, "w": torch.full((4,), 1.0)}, sys.argv[1])
print("saved", flush=True)
big = {"version": 2, "w": torch.randn(16 * 2 ** 20)}  # 64 MiB: the kill lands inside the write
while True:
    train.save_checkpoint(big, sys.argv[1])
"""


def test_sigkill_during_save_keeps_a_readable_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "saved"
        deadline = time.time() + 60
        while not (os.path.exists(f"{path}.tmp") and os.path.getsize(f"{path}.tmp") > 0) and time.time() < deadline:
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert os.path.exists(f"{path}.tmp"), "the kill did not land inside a save"
    checkpoint = torch.load(path)
    assert checkpoint["version"] in (1, 2)
    if checkpoint["version"] == 1:
        assert torch.equal(checkpoint["w"], torch.ones(4))


SAVE_WITH_INJECTED_FAILURES = """
import json, os, sys, torch, train
path = sys.argv[1]
folder = os.path.dirname(path)
FILESYSTEM = ("open", "os.rename", "os.remove", "os.truncate", "shutil.copyfile", "shutil.move", "os.symlink")
events, fail_at, checking = [], None, False


def hook(event, args):
    global checking
    if checking or event not in FILESYSTEM or not (args and isinstance(args[0], str) and args[0].startswith(folder)):
        return
    mode = args[1] if event == "open" and len(args) > 1 else None
    events.append([event, args[0], args[1] if event in ("os.rename", "shutil.copyfile", "shutil.move") else mode])
    if event == "os.rename" and args[1] == path:  # what is published must be complete already
        checking = True
        events[-1].append(torch.load(args[0])["version"])
        checking = False
    if len(events) == fail_at:
        raise OSError(f"injected failure at {event}")


sys.addaudithook(hook)
train.save_checkpoint({"version": 1, "w": torch.ones(4)}, path)
events.clear()
train.save_checkpoint({"version": 2, "w": torch.zeros(4)}, path)
steps = [list(e) for e in events]
survivors = []
for step in range(1, len(steps) + 1):
    fail_at = None
    train.save_checkpoint({"version": 1, "w": torch.ones(4)}, path)
    events.clear()
    fail_at = step
    try:
        train.save_checkpoint({"version": 2, "w": torch.zeros(4)}, path)
    except OSError:
        pass
    checking = True
    survivors.append(torch.load(path)["version"])
    checking = False
print(json.dumps({"steps": steps, "survivors": survivors}))
"""


def test_checkpoint_publication_is_atomic_at_every_step(tmp_path):
    """A save that fails at any of its filesystem steps leaves a loadable last.pth, the old one or the
    new one: the new file is written elsewhere and published by one rename, and last.pth itself is
    never opened for writing, truncated or removed."""
    path = str(tmp_path / "last.pth")
    result = subprocess.run([sys.executable, "-c", SAVE_WITH_INJECTED_FAILURES, path], cwd=HERE, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    touching_last = [step for step in report["steps"] if path in step[1:3]]
    assert [step[0] for step in touching_last] == ["os.rename"], touching_last
    assert touching_last[0][3] == 2  # the renamed file was complete before it was published
    assert len(report["survivors"]) == len(report["steps"]) >= 2
    assert set(report["survivors"]) <= {1, 2} and report["survivors"][0] == 1


# --- the Trainer ----------------------------------------------------------------------------------

def test_ema_is_the_exponential_average_of_weights_and_buffers(tmp_path, data):
    decay = 0.9
    trainer = train.build_trainer(settings("--data", data, "--output-dir", str(tmp_path), *TINY, "--ema-decay", str(decay)))
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    batches = iter(trainer.train_loader)
    trainer.model.train()
    for _ in range(2):
        trainer.train_step([next(batches)])
        weights = trainer.model.state_dict()
        expected = {k: decay * v + (1 - decay) * weights[k] for k, v in expected.items()}
    averaged = trainer.ema.module.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, msg=name)
    stem_mean = "downsample_layers.0.1.running_mean"
    assert not torch.equal(weights[stem_mean], averaged[stem_mean])  # the buffers moved, and are averaged too


def decayed_by_kind(model):
    """{parameter name: should it be decayed}, as the released optimizer (ConvNeXt-V2's parameter groups) decays
    them: the weights of convolutions, linear layers and attention projections, tau and the learned slots are;
    norms, biases and layer-scale gammas are not."""
    kinds = {}
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            matrix = (isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and leaf == "weight") or \
                (isinstance(module, glnet.MHSA) and leaf == "in_proj_weight")
            kinds[f"{module_name}.{leaf}".lstrip(".")] = matrix or leaf in ("tau", "init_slots")
    return kinds


def assert_optimizer_decays(trainer, weight_decay):
    group_of = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    names = dict(trainer.model.named_parameters())
    assert len(group_of) == len(names) == sum(len(g["params"]) for g in trainer.optimizer.param_groups)
    for name, decayed in decayed_by_kind(trainer.model).items():
        assert group_of[id(names[name])] == (weight_decay if decayed else 0.0), name
    return names


def test_the_trainer_decays_as_the_released_optimizer_tau_and_slots_included(tmp_path, data):
    s = settings("--data", data, "--output-dir", str(tmp_path), *TINY)
    model = glnet.glnet_mini(num_classes=3, layer_scale=1e-4, learned_slots=True, token_head=True)
    trainer = train.build_trainer(s, model=model)
    names = assert_optimizer_decays(trainer, s.weight_decay)
    for kind in (".tau", ".gamma", ".init_slots", "norm1.weight", "downsample_layers.0.1.weight", "head.bias"):
        assert any(name.endswith(kind) for name in names), kind  # every kind is there and was checked
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert all(id(p) in decayed for name, p in names.items() if name.endswith((".tau", ".init_slots")))


@pytest.mark.parametrize("batch_size, accum_steps, reference", [(4, 1, 2048), (2, 3, 2048), (3, 2, 16)])
def test_the_peak_lr_scales_linearly_with_the_global_batch(batch_size, accum_steps, reference, tmp_path, data):
    """lr x global batch / reference batch, the global batch being batch size x processes x accum steps
    (two processes: test_torchrun_ddp_training_resume_and_exactly_once_evaluation)."""
    s = settings("--data", data, "--output-dir", str(tmp_path), *TINY, "--lr", "0.5", "--batch-size",
                 str(batch_size), "--accum-steps", str(accum_steps))
    trainer = train.build_trainer(s)
    trainer = train.Trainer(s, trainer.model, dataclasses.replace(trainer.task, reference_batch=reference))
    assert trainer.global_batch == batch_size * accum_steps
    assert trainer.lr == pytest.approx(0.5 * batch_size * accum_steps / reference)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(trainer.lr * s.warmup_factor)] * 2


# --- data and bad input ---------------------------------------------------------------------------

def test_builtin_dataset_is_an_imagefolder_tree(data):
    task = train.build_trainer(settings("--data", data, *TINY)).task
    train_set, val_set = task.train_set, task.evaluate.keywords["loader"].dataset.dataset
    assert train_set.classes == val_set.classes == ["circle", "square", "vertical_stripes"]
    assert len(train_set) == 24 and len(val_set) == 15
    image, label = val_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    assert all(f.endswith(".png") for f in os.listdir(os.path.join(data, "val", "circle")))


def test_bad_data_layouts_are_named(tmp_path, data):
    def run(folder):
        train.main(["--data", str(folder), "--output-dir", str(tmp_path / "out"), *TINY])

    with pytest.raises(glnet.InputError, match="No such file or directory: .*nope/train'; expected the ImageNet layout"):
        run(tmp_path / "nope")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(glnet.InputError, match="Found no valid file for the classes cat.*empty/train/<class>/<image>"):
        run(tmp_path / "empty")
    shutil.copytree(os.path.join(data, "train"), tmp_path / "flat" / "train")
    (tmp_path / "flat" / "val").mkdir(parents=True)
    (tmp_path / "flat" / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(glnet.InputError, match="Couldn't find any class folder in .*flat/val"):
        run(tmp_path / "flat")
    shutil.copytree(os.path.join(data, "train"), tmp_path / "noval" / "train")
    with pytest.raises(glnet.InputError, match="noval/val'; expected the ImageNet layout"):
        run(tmp_path / "noval")
    shutil.copytree(data, tmp_path / "mismatch")
    os.rename(tmp_path / "mismatch" / "val" / "square", tmp_path / "mismatch" / "val" / "ring")
    with pytest.raises(glnet.InputError, match=r"mismatch/val differ in \['ring', 'square'\]"):
        run(tmp_path / "mismatch")
    assert not (tmp_path / "out").exists()


def test_usage_errors_of_the_three_scripts_are_one_line_with_status_2(tmp_path, data, capsys, monkeypatch):
    """As users run them (`python train.py ...` in a process of its own, the others' __main__ in this one): a
    truncated last.pth on resume, a flat ImageNet val/ (as its tarball unpacks), a truncated checkpoint given to
    detect_seg.py and analyze.py, a COCO folder without annotations, a checkpoint that would run a command, a bad
    flag of each script: one line on stderr, exit status 2, nothing written, nothing run."""
    attack, marker = tmp_path / "attack.pth", tmp_path / "marker"
    torch.save({"model": {}, "args": RunsACommand(f"touch {marker}")}, attack)
    checkpoint = tmp_path / "resumed" / "last.pth"
    os.makedirs(checkpoint.parent)
    torch.save({"model": glnet.create_model("glnet_mini", num_classes=3).state_dict()}, checkpoint)
    checkpoint.write_bytes(file_bytes(checkpoint)[:100_000])   # as a copy cut short leaves it
    truncated = f"error: cannot read checkpoint {checkpoint}: truncated, or not a torch.save file"
    resumed = subprocess.Popen([sys.executable, "train.py", "--data", data, "--output-dir", str(checkpoint.parent),
                                *TINY], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    flat = tmp_path / "flat"
    shutil.copytree(os.path.join(data, "train"), flat / "train")
    os.makedirs(flat / "val")
    for i in (1, 2):
        Image.new("RGB", (40, 40)).save(flat / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG")
    runs = {("train.py", "--data", str(flat), "--output-dir", str(tmp_path / "out"), *TINY):
            f"train.py: error: Couldn't find any class folder in {flat}/val; expected the ImageNet layout, "
            f"{flat}/val/<class>/<image>; ImageNet's val tarball unpacks flat: sort it into a folder per synset",
            ("detect_seg.py", "--eval", "--checkpoint", str(checkpoint)): f"detect_seg.py: {truncated}",
            ("analyze.py", "evaluate", "--checkpoint", str(checkpoint)): f"analyze.py: {truncated}",
            ("detect_seg.py", "--task", "maskrcnn", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out")):
            f"detect_seg.py: error: {tmp_path}/annotations/instances_train2017.json not found: expected the COCO",
            ("train.py", "--eval", "--checkpoint", str(attack), "--model", "glnet_mini"):
            f"train.py: error: refusing checkpoint {attack}: it names {os.system.__module__}.system",
            ("train.py", "--crop-pct", "0"): "train.py: error: argument --crop-pct: must be greater than 0 and at most 1, "
                                             "got 0 (see train.py --help)",
            ("detect_seg.py", "--score-threshold", "2"): "detect_seg.py: error: argument --score-threshold: must be at "
                                                         "least 0 and at most 1, got 2 (see detect_seg.py --help)",
            ("analyze.py", "approximate", "--checkpoint", "x.pth", "--search", "0"): "analyze.py approximate: error: "
            "argument --search: must be at least 1, got 0 (see analyze.py approximate --help)"}
    for argv, message in runs.items():
        monkeypatch.setattr(sys, "argv", [os.path.join(HERE, argv[0]), *argv[1:]])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(os.path.join(HERE, argv[0]), run_name="__main__")
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.count("\n") == 1 and stderr.startswith(message), stderr
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 2 and stderr.count("\n") == 1 and stderr.startswith(f"train.py: {truncated}"), stderr
    assert os.listdir(checkpoint.parent) == ["last.pth"] and not (tmp_path / "out").exists() and not marker.exists()


def test_only_input_errors_become_one_line(capsys, monkeypatch):
    """train.run, the scripts' __main__: the errors this project raises about its input (glnet.InputError) end as
    one line and exit status 2; any other, of whatever type, keeps its traceback."""
    def fail(error):
        raise error

    monkeypatch.setattr(sys, "argv", ["/somewhere/train.py", "--data", "x"])
    with pytest.raises(SystemExit) as exit_info:
        train.run(lambda: fail(glnet.InputError("the data is bad")))
    assert exit_info.value.code == 2 and capsys.readouterr().err == "train.py: error: the data is bad\n"
    for bug in (ValueError("a bug"), FileNotFoundError(2, "No such file or directory", "a bug"), KeyError("a bug")):
        with pytest.raises(type(bug), match="a bug"):
            train.run(lambda: fail(bug))
        assert capsys.readouterr().err == ""


def test_unreadable_image_is_named(tmp_path, data):
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    bad = broken / "train" / "square" / "00003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(glnet.InputError, match=f"cannot read image {bad}"):
        train.main(["--data", str(broken), "--output-dir", str(tmp_path / "out"), "--epochs", "1", *TINY,
                    "--repeated-aug", "1"])  # every image in the epoch
    assert not (tmp_path / "out" / "last.pth").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch):
    out = tmp_path / "out"
    train.main(["--data", data, "--output-dir", str(out), "--epochs", "1", *TINY])
    good = file_bytes(out / "last.pth")

    class NaNLoss(torch.nn.CrossEntropyLoss):
        def forward(self, logits, targets):
            return super().forward(logits, targets) * float("nan")

    monkeypatch.setattr(train.nn, "CrossEntropyLoss", NaNLoss)
    with pytest.raises(FloatingPointError, match="at epoch 2 step 1; the last good checkpoint is kept"):
        train.main(["--data", data, "--output-dir", str(out), "--epochs", "2", *TINY])
    assert file_bytes(out / "last.pth") == good


def test_resuming_another_model_or_class_count_fails_and_touches_nothing(tmp_path, data):
    out = tmp_path / "out"
    train.main(["--data", data, "--output-dir", str(out), "--epochs", "1", *TINY])
    before = {name: file_bytes(out / name) for name in os.listdir(out)}
    other = train.make_shapes_dataset(str(tmp_path / "two"), 4, 2, 40, classes=("circle", "ring"))
    with pytest.raises(glnet.InputError, match="is a classification checkpoint of glnet_mini with 3 classes, but this run "
                                         "trains classification with glnet_mini and 2 classes"):
        train.main(["--data", other, "--output-dir", str(out), "--epochs", "1", *TINY])
    with pytest.raises(glnet.InputError, match="checkpoint of glnet_mini with 3 classes, but this run trains classification "
                                         "with glnet_stl and 3 classes"):
        train.main(["--data", data, "--output-dir", str(out), "--epochs", "1", *TINY, "--model", "glnet_stl"])
    assert {name: file_bytes(out / name) for name in os.listdir(out)} == before


# --- evaluation and metrics -----------------------------------------------------------------------

class FixedLogits(nn.Module):
    """A 'model' whose logits for image i are row i of a table (the image's first pixel holds i)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, images):
        return self.table[images[:, 0, 0, 0].long()]


def test_top1_and_top5_of_hand_made_logits():
    # four images of six classes; the target's rank among the logits: 1st, 2nd, 5th, 6th
    table = torch.tensor([[9.0, 1, 2, 3, 4, 5], [1, 9, 8, 2, 3, 4], [5, 4, 3, 2, 1, 9], [5, 4, 3, 2, 1, 0]])
    targets = torch.tensor([0, 2, 3, 5])
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)
    loader = torch.utils.data.DataLoader(list(zip(images, targets)), batch_size=3)
    metrics = train.evaluate(FixedLogits(table), loader, torch.device("cpu"))
    loss = nn.functional.cross_entropy(table, targets).item()
    assert metrics == {"top1": 25.0, "top5": 75.0, "loss": pytest.approx(loss), "images": 4}


def test_eval_of_the_best_checkpoint_matches_its_record(tmp_path, data):
    out = tmp_path / "out"
    train.main(["--data", data, "--output-dir", str(out), "--epochs", "2", *TINY])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    best = max(records, key=lambda r: max(r["val_top1"], r["ema_top1"]))
    metrics = train.main(["--eval", "--checkpoint", str(out / "best.pth")])
    assert metrics["images"] == 15
    assert metrics["top1"] == pytest.approx(max(best["val_top1"], best["ema_top1"]))


@pytest.fixture
def checkpointed_blocks(monkeypatch):
    """Every call of torch.utils.checkpoint.checkpoint (a GLNet block whose activations the backward recomputes):
    whether gradients were on."""
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint

    def record(function, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", record)
    return calls


def test_grad_checkpointing_flag_checkpoints_every_block_and_is_recorded(tmp_path, data, checkpointed_blocks):
    train.main(["--data", data, "--output-dir", str(tmp_path / "plain"), "--iters", "1", *TINY])
    assert not checkpointed_blocks
    train.main(["--data", data, "--output-dir", str(tmp_path / "out"), "--iters", "1", "--grad-checkpointing", *TINY])
    assert checkpointed_blocks.count(True) == 6  # glnet_mini's 6 blocks in the one training step
    assert glnet.read_checkpoint(str(tmp_path / "out" / "last.pth"))["args"]["grad_checkpointing"] is True


def test_eval_of_a_checkpoint_from_elsewhere(tmp_path, data):
    """A released-style checkpoint ({'model_ema': AveragedModel state}) needs --model and --data;
    the top-1 equals a plain loop over the validation images, resized as the released models were."""
    model = glnet.create_model("glnet_mini", num_classes=3).eval()
    path = str(tmp_path / "foreign.pth")
    torch.save({"model_ema": torch.optim.swa_utils.AveragedModel(model).state_dict()}, path)
    with pytest.raises(glnet.InputError, match="does not say which model it holds: pass --model"):
        train.main(["--eval", "--checkpoint", path])
    with pytest.raises(glnet.InputError, match="does not say which data it is for: pass --data"):
        train.main(["--eval", "--checkpoint", path, "--model", "glnet_mini"])
    with pytest.raises(glnet.InputError, match="checkpoint does not match GLNet"):
        train.main(["--eval", "--checkpoint", path, "--model", "glnet_4g", "--data", data, "--workers", "0"])
    metrics = train.main(["--eval", "--checkpoint", path, "--model", "glnet_mini", "--data", data,
                          "--image-size", "32", "--workers", "0"])
    val_set = train.image_folder(data, "val", train.eval_transform(32, "bicubic"))
    with torch.no_grad():
        correct = sum(model(image[None]).argmax().item() == label for image, label in val_set)
    assert metrics["images"] == 15 and metrics["top1"] == pytest.approx(100 * correct / 15)


def glnet_inputs(monkeypatch):
    """Every input GLNet's forward_features receives from now on (what a classifier or a dense model is fed)."""
    inputs, forward_features = [], glnet.GLNet.forward_features

    def spy(model, x):
        inputs.append(x)
        return forward_features(model, x)
    monkeypatch.setattr(glnet.GLNet, "forward_features", spy)
    return inputs


def test_eval_flags_override_the_checkpoints_settings(checkpoint, tiny_data, monkeypatch):
    """A checkpoint whose settings say 64x64, bilinear, 32 per batch, crop 0.875, evaluated with --image-size 48
    --interpolation bicubic --batch-size 3 --crop-pct 0.8: its 20 validation images reach the model in batches of 3
    (and 2), resized bicubically to 60 and center-cropped to 48."""
    trained = torch.load(checkpoint)["args"]
    assert (trained["image_size"], trained["interpolation"], trained["batch_size"], trained["crop_pct"]) == \
        (64, "bilinear", 32, 0.875)
    inputs = glnet_inputs(monkeypatch)
    metrics = train.main(["--eval", "--checkpoint", checkpoint, "--image-size", "48", "--interpolation", "bicubic",
                          "--batch-size", "3", "--crop-pct", "0.8", "--workers", "0"])
    assert metrics["images"] == 20 and [len(x) for x in inputs] == [3] * 6 + [2]
    transforms = [train.eval_transform(48, "bicubic", 0.8), train.eval_transform(48, "bilinear", 0.8),
                  train.eval_transform(48, "bicubic")]
    expected, *others = (torch.stack([image for image, _ in train.image_folder(tiny_data, "val", transform)])
                         for transform in transforms)
    assert not any(torch.allclose(expected, other, atol=1e-3) for other in others)
    torch.testing.assert_close(torch.cat(inputs), expected)


def test_eval_of_a_released_token_labeling_checkpoint_crops_as_released(tmp_path, data, monkeypatch):
    """A released-style GLNet-4G* checkpoint is evaluated as the released token-labeling run evaluated it: resized
    bicubically to size / 0.96 (timm's floor: 33 for 32), center-cropped; its eval rule adds the token logits.
    analyze.py evaluates it so too."""
    model = glnet.create_model("glnet_4g_tklb", num_classes=3).eval()
    path = str(tmp_path / "glnet_4g_tklb.pth")
    torch.save({"model": model.state_dict()}, path)
    inputs = glnet_inputs(monkeypatch)
    metrics = train.main(["--eval", "--checkpoint", path, "--model", "glnet_4g_tklb", "--data", data,
                          "--image-size", "32", "--workers", "0"])
    (expected, labels), (at_0875, _) = (torch.utils.data.default_collate(list(train.image_folder(data, "val", t)))
                                        for t in (train.eval_transform(32, "bicubic", 0.96),
                                                  train.eval_transform(32, "bicubic")))
    assert not torch.allclose(expected, at_0875, atol=1e-3)
    torch.testing.assert_close(torch.cat(inputs), expected)
    with torch.no_grad():
        correct = (model(expected).argmax(1) == labels).sum().item()
    assert metrics["top1"] == pytest.approx(100 * correct / len(labels))
    analyzed = analyze.main(["evaluate", "--checkpoint", path, "--model", "glnet_4g_tklb", "--data", data,
                             "--image-size", "32", "--workers", "0"])                 # train.py's settings too
    assert analyzed["top1"] == metrics["top1"] and analyzed["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


# --- training runs: resume, DDP, the README's command ---------------------------------------------

def test_resume_after_sigkill_gives_the_same_weights(tmp_path, data):
    """Kill a run with SIGKILL after its first mid-epoch checkpoint, restart the same command:
    the weights equal those of an uninterrupted run, augmentation, mixup, drop path and gradient
    accumulation included (2 micro-batches per step: 3 steps per epoch)."""
    args = ["--data", data, "--epochs", "3", "--checkpoint-every", "1", "--randaugment", "--mixup", "0.8",
            "--cutmix", "1.0", "--drop-path", "0.1", *TINY, "--accum-steps", "2"]
    run_script([*args, "--output-dir", str(tmp_path / "straight")])

    interrupted = str(tmp_path / "interrupted")
    command = [sys.executable, os.path.join(HERE, "train.py"), *args, "--output-dir", interrupted]
    child = subprocess.Popen(command, cwd=HERE, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not os.path.exists(os.path.join(interrupted, "last.pth")) and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = torch.load(os.path.join(interrupted, "last.pth"))
    assert (killed_at["epoch"], killed_at["step"]) < (3, 0), "the run finished before it was killed"
    resumed = run_script([*args, "--output-dir", interrupted])
    assert f"resuming from {interrupted}/last.pth: epoch {killed_at['epoch'] + 1}, step {killed_at['step']}" in resumed

    straight = torch.load(tmp_path / "straight" / "last.pth")
    final = torch.load(os.path.join(interrupted, "last.pth"))
    assert (final["epoch"], final["step"]) == (3, 0)
    for key in ("model", "model_ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, final[key][name]), f"{key}.{name} differs"


def test_torchrun_ddp_training_resume_and_exactly_once_evaluation(tmp_path, data):
    """Two processes (gloo): rank 0 alone reports; the peak lr is scaled to the global batch of both;
    a run killed with SIGKILL after its first mid-epoch checkpoint and restarted ends with the weights
    of an uninterrupted run; evaluation counts each validation image once, with the figures of a
    1-process evaluation."""
    args = ["--data", data, "--epochs", "2", "--checkpoint-every", "1", *TINY, "--batch-size", "2", "--accum-steps", "2"]
    out = str(tmp_path / "ddp")
    log = run_script([*args, "--output-dir", out], launcher=torchrun(2))
    assert "global batch 8 = 2 per process x 2 processes x 2 accumulation steps; peak lr " \
           f"{2e-3 * 8 / 2048:.2e} (2.00e-03 per 2048)" in log
    assert "epoch 1/2  step 3/3  loss" in log and "val top1" in log
    assert log.count("epoch 1/2 done") == 1  # rank 0 only
    assert f"python train.py --eval --checkpoint {out}/best.pth" in log

    interrupted = str(tmp_path / "interrupted")
    child = subprocess.Popen([*torchrun(2), os.path.join(HERE, "train.py"), *args, "--output-dir", interrupted], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not os.path.exists(os.path.join(interrupted, "last.pth")) and child.poll() is None:
        time.sleep(0.01)
    kill_process_tree(child.pid)  # torchrun and both of its processes, as a killed job
    child.wait()
    killed_at = torch.load(os.path.join(interrupted, "last.pth"))
    assert (killed_at["epoch"], killed_at["step"]) < (2, 0), "the run finished before it was killed"
    resumed = run_script([*args, "--output-dir", interrupted], launcher=torchrun(2))
    assert f"resuming from {interrupted}/last.pth: epoch {killed_at['epoch'] + 1}, step {killed_at['step']}" in resumed
    straight, final = torch.load(os.path.join(out, "last.pth")), torch.load(os.path.join(interrupted, "last.pth"))
    for key in ("model", "model_ema"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, final[key][name]), f"{key}.{name} differs"

    two_ranks = run_script(["--eval", "--checkpoint", os.path.join(out, "last.pth"), "--batch-size", "4"],
                           launcher=torchrun(2))
    assert "on 15 images" in two_ranks  # 8 + 7: nothing padded, nothing dropped
    one_rank = train.main(["--eval", "--checkpoint", os.path.join(out, "last.pth")])
    assert train.format_metrics(one_rank) in two_ranks


def test_readme_main_command_on_an_empty_cache(tmp_path):
    """`python train.py` exactly as the README runs it, as a new user: the built-in dataset is
    generated into an empty cache, the first epoch trains, evaluates and checkpoints; the run is
    then killed (all five epochs take minutes) and the same command resumes it."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}  # a busy CI machine

    def run_until(marker):
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in child.stdout:
            lines.append(line)
            if marker in line:
                break
        child.kill()
        child.wait()
        return "".join(lines)

    log = run_until("epoch 2/5  step")  # epoch 1 is evaluated and saved
    shapes = tmp_path / "cache" / "glnet" / train.SHAPES_VERSION
    assert sorted(os.listdir(tmp_path / "cache" / "glnet")) == [train.SHAPES_VERSION]
    assert sorted(os.listdir(shapes / "train")) == sorted(train.SHAPES_CLASSES)
    assert sum(len(os.listdir(shapes / "val" / c)) for c in train.SHAPES_CLASSES) == 500
    assert "3000 train / 500 val images" in log and "global batch 32" in log
    record = json.loads((tmp_path / "runs" / "glnet_mini-builtin" / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and record["val_top1"] > 30  # 10 classes: it learns in one epoch
    resumed = run_until("resuming from")
    assert "resuming from runs/glnet_mini-builtin/last.pth: epoch 2, step 0" in resumed


def test_builtin_dataset_is_generated_once_and_reused(tmp_path):
    calls = []

    def generate(folder):
        calls.append(folder)
        os.makedirs(os.path.join(folder, "train"))

    root = train.builtin_dataset(str(tmp_path), "toy-v1", generate)
    assert root == str(tmp_path / "toy-v1") and os.path.isdir(os.path.join(root, "train"))
    assert train.builtin_dataset(str(tmp_path), "toy-v1", generate) == root and len(calls) == 1
    assert sorted(os.listdir(tmp_path)) == ["toy-v1"]

    def another_job_finishes_first(folder):
        os.makedirs(os.path.join(folder, "mine"))
        os.makedirs(tmp_path / "race-v1" / "theirs")

    root = train.builtin_dataset(str(tmp_path), "race-v1", another_job_finishes_first)
    assert os.listdir(root) == ["theirs"] and sorted(os.listdir(tmp_path)) == ["race-v1", "toy-v1"]


# --- recipes --------------------------------------------------------------------------------------

def test_recipes_are_chosen_by_flag_or_data_and_every_flag_overrides():
    assert (settings().recipe, settings("--data", "d").recipe) == ("builtin", "imagenet")
    assert settings("--data", "d", "--token-labels", "l").recipe == "imagenet-tklb"
    assert settings("--recipe", "imagenet").model == "glnet_4g"  # explicit, on the built-in data
    imagenet = settings("--data", "d")
    for key, value in train.RECIPES["imagenet"].items():
        assert getattr(imagenet, key) == value, key
    assert settings().output_dir == os.path.join("runs", "glnet_mini-builtin")
    tklb = settings("--recipe", "imagenet-tklb", "--token-labels", "l", "--epochs", "3", "--lr", "1e-3")
    assert (tklb.model, tklb.epochs, tklb.lr, tklb.drop_path, tklb.mixup, tklb.cutmix) == \
        ("glnet_4g_tklb", 3, 1e-3, 0.1, 0.0, 0.0)
    assert tklb.token_labels == os.path.abspath("l")
    assert settings("--token-labels", "l").output_dir == os.path.join("runs", "glnet_mini-builtin-tklb")
    assert (settings("--model", "glnet_9g", "--data", "d").drop_path, settings("--drop-path", "0.2").drop_path) == (0.3, 0.2)


def test_help_shows_every_default_as_the_recipes_set_it(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and "--min-lr MIN_LR where the decay ends (default: 1e-05)" in help_text
    assert "(default: imagenet 0.0, imagenet-tklb 0.0005, builtin 0.001)" in help_text  # --warmup-factor
    assert "--clip-grad CLIP_GRAD max gradient norm, 0 = off (default: 5.0)" in help_text


# README.md, "Recipes": the table's values, checked below on the objects a run trains with.
RECIPE_TABLE = {
    "builtin": dict(model="glnet_mini", epochs=5, image_size=64, batch_size=32, lr_per_2048=6.4e-2,
                    weight_decay=0.05, warmup_epochs=1, warmup_factor=1e-3, min_lr=1e-5, clip_grad=5.0,
                    drop_path=0.0, randaugment=None, label_smoothing=0.1, mixup_cutmix=None, repeated_aug=1,
                    random_erasing=None, interpolation="bilinear", ema_decay=0.99, eval_resize=73, token_labels=False),
    "imagenet": dict(model="glnet_4g", epochs=300, image_size=224, batch_size=128, lr_per_2048=2e-3,
                     weight_decay=0.05, warmup_epochs=5, warmup_factor=0.0, min_lr=1e-5, clip_grad=5.0,
                     drop_path=0.15, randaugment=(2, 9, 0.5), label_smoothing=0.1, mixup_cutmix=(0.8, 1.0),
                     repeated_aug=3, random_erasing=0.25, interpolation="bicubic", ema_decay=0.9999, eval_resize=256,
                     token_labels=False),
    "imagenet-tklb": dict(model="glnet_4g_tklb", epochs=310, image_size=224, batch_size=128, lr_per_2048=2e-3,
                          weight_decay=0.05, warmup_epochs=5, warmup_factor=5e-4, min_lr=1e-5, clip_grad=5.0,
                          drop_path=0.1, randaugment=(2, 9, 0.5), label_smoothing=0.1, mixup_cutmix=None,
                          repeated_aug=1, random_erasing=0.25, interpolation="bicubic", ema_decay=0.0,
                          eval_resize=233, token_labels=True),
}


def interpolation(transform):
    return v2.InterpolationMode(transform.interpolation).value


def transforms_of(transform):
    """Every transform inside (nested) v2.Compose objects."""
    inner = getattr(transform, "transforms", None)
    return [t for child in inner for t in transforms_of(child)] if inner is not None else [transform]


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """Enough images for one batch of 128 (3 classes of 44, 32x32), and a label map for each."""
    root = tmp_path_factory.mktemp("recipes")
    data = train.make_shapes_dataset(str(root / "shapes"), 44, 1, 32, classes=("circle", "square", "ring"))
    for folder, _, names in os.walk(os.path.join(data, "train")):
        for name in names:
            path = train.label_map_path(str(root / "labels"), os.path.join(data, "train"), os.path.join(folder, name))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(torch.stack([torch.randn(5, 2, 2), torch.randint(0, 3, (5, 2, 2)).float()]).half(), path)
    return data, str(root / "labels")


def recipe_trainer(recipe, recipe_data, tmp_path):
    data, labels = recipe_data
    tokens = ["--token-labels", labels] if RECIPE_TABLE[recipe]["token_labels"] else []
    return train.build_trainer(settings("--recipe", recipe, "--data", data, "--output-dir", str(tmp_path),
                                        "--workers", "0", *tokens))


@pytest.mark.parametrize("recipe", list(RECIPE_TABLE))
def test_the_recipes_as_training_applies_them(recipe, recipe_data, tmp_path, monkeypatch):
    """Each value of the README's recipe table, on what a run trains with (train.build_trainer):
    the model, the datasets' transforms, the sampler, the optimizer, the schedule, the loss, the
    EMA and one real training step."""
    expected = RECIPE_TABLE[recipe]
    trainer = recipe_trainer(recipe, recipe_data, tmp_path)
    model, task, train_set = trainer.model, trainer.task, trainer.task.train_set

    reference = glnet.create_model(expected["model"], num_classes=3, token_head=expected["token_labels"])
    assert glnet.count_params(model) == glnet.count_params(reference) and model.stage_channels == reference.stage_channels
    assert max(m.p for m in model.modules() if isinstance(m, glnet.StochasticDepth)) == expected["drop_path"]
    assert trainer.epochs == expected["epochs"] and trainer.train_loader.batch_size == expected["batch_size"]
    assert trainer.sampler.repeated_aug == expected["repeated_aug"]

    if expected["token_labels"]:  # LV-ViT's order: RandAugment on the whole image, then the crop
        augment = [t for t in (train_set.randaugment, train_set.crop) if t] + transforms_of(train_set.augment)
    else:
        augment = transforms_of(train_set.transform)
    crop = next(t for t in augment if isinstance(t, v2.RandomResizedCrop))
    assert tuple(crop.size) == (expected["image_size"],) * 2 and interpolation(crop) == expected["interpolation"]
    assert (crop.scale, crop.ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    randaugment = [t for t in augment if isinstance(t, train.RandAugment)]
    assert [(t.num_ops, t.magnitude, t.magnitude_std) for t in randaugment] == \
        ([expected["randaugment"]] if expected["randaugment"] else [])
    assert all(interpolation(t) == expected["interpolation"] for t in randaugment)
    erasing = [(t.p, t.value, t.scale, t.ratio) for t in augment if isinstance(t, v2.RandomErasing)]  # timm's
    assert erasing == ([(expected["random_erasing"], None, (0.02, 1 / 3), (0.3, 1 / 0.3))]  # value None: random
                       if expected["random_erasing"] else [])
    val_set = task.evaluate.keywords["loader"].dataset.dataset
    resize, center = (t for t in transforms_of(val_set.transform) if isinstance(t, (v2.Resize, v2.CenterCrop)))
    assert resize.size == [expected["eval_resize"]] and interpolation(resize) == expected["interpolation"]
    assert center.size == (expected["image_size"],) * 2 and val_set[0][0].shape == (3,) + center.size

    if expected["token_labels"]:
        assert task.loss.func is train.token_labeling_loss and train_set.smoothing == expected["label_smoothing"]
    else:
        assert task.loss.keywords["criterion"].label_smoothing == expected["label_smoothing"]
        mixing = task.loss.keywords["mixup"]
        alphas = tuple(t.alpha for t in mixing.transforms) if mixing is not None else None
        assert alphas == expected["mixup_cutmix"]

    peak = expected["lr_per_2048"] * trainer.global_batch / 2048
    assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.lr == pytest.approx(peak)
    assert {g["betas"] for g in trainer.optimizer.param_groups} == {(0.9, 0.999)}
    assert sorted(g["weight_decay"] for g in trainer.optimizer.param_groups) == [0.0, expected["weight_decay"]]
    lr_at = lambda step: peak * trainer.scheduler.lr_lambdas[0](step)  # noqa: E731
    warmup, total = expected["warmup_epochs"] * trainer.steps_per_epoch, trainer.total_steps
    assert lr_at(0) == pytest.approx(expected["warmup_factor"] * peak) and lr_at(warmup - 1) < peak
    assert lr_at(warmup) == pytest.approx(peak) and lr_at(total) == pytest.approx(expected["min_lr"])
    assert lr_at((warmup + total) / 2) == pytest.approx((peak + expected["min_lr"]) / 2)  # the cosine's middle

    assert (trainer.ema is not None) == (expected["ema_decay"] > 0)
    clipped_at = []
    clip = train.nn.utils.clip_grad_norm_
    monkeypatch.setattr(train.nn.utils, "clip_grad_norm_", lambda p, max_norm: clipped_at.append(max_norm) or clip(p, max_norm))
    model.train()
    trainer.train_step([torch.utils.data.default_collate([train_set[i] for i in range(2)])])
    assert clipped_at == [expected["clip_grad"]]
    if not trainer.ema:
        return
    with torch.no_grad():  # the step's own update is too small to tell 0.9999 from 0.9998: move the weights by 1
        model.head.weight.add_(1.0)
    before = trainer.ema.module.head.weight.detach().clone()
    trainer.ema.update_parameters(model)
    moved = (trainer.ema.module.head.weight - before) / (model.head.weight - before)
    torch.testing.assert_close(moved, torch.full_like(moved, 1 - expected["ema_decay"]), rtol=1e-3, atol=0)


def lut_operation(lut):
    """(operation, level) of a colour lookup table as timm's RandAugment makes it; level = magnitude / 10."""
    table = [lut(v) for v in range(256)] if callable(lut) else list(lut[:256])
    threshold = next((v for v in range(256) if table[v] != v), 256)
    if table == [255 - v for v in range(256)]:
        return "Invert", None
    if table == [v if v < threshold else 255 - v for v in range(256)]:
        return "SolarizeIncreasing", (256 - threshold) / 256             # threshold 256 - int(256 level)
    if table == [min(v + table[0], 255) if v < 128 else v for v in range(256)]:
        return "SolarizeAdd", table[0] / 110                             # adds int(110 level)
    if table == [v & table[255] for v in range(256)]:
        return "PosterizeIncreasing", bin(table[255]).count("1")         # bits kept: 4 - int(4 level)
    return "point", None


def affine_operation(matrix, size):
    """(operation, signed level) of an affine map (PIL's inverse one) as timm's RandAugment makes it."""
    a, b, c, d, e, f = matrix
    if abs(b + d) < 1e-9 and abs(b) > 1e-9:
        return "Rotate", math.degrees(math.atan2(d, a)) / 30             # 30 degrees at level 1
    return next((name, value / scale) for name, value, scale in (("ShearX", b, 0.3), ("ShearY", d, 0.3),
                ("TranslateXRel", c / size[0], 0.45), ("TranslateYRel", f / size[1], 0.45)) if value)


def record_pil_operations(monkeypatch):
    """[(operation, level, (resample, fill) of affine maps)] of every PIL operation run from now on (not those PIL
    runs inside another): a spy on PIL itself, so it sees any RandAugment alike (torchvision's, timm's, train.py's)."""
    calls, depth = [], [0]

    def spy(owner, attribute, describe):
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                calls.append(describe(*args, **kwargs))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(owner, attribute, wrapper)

    spy(Image.Image, "transform", lambda image, size, method, data, resample=0, fill=1, fillcolor=None:
        (*affine_operation(data, image.size), (resample, fillcolor)))
    spy(ImageEnhance._Enhance, "enhance", lambda enhancer, factor:
        (type(enhancer).__name__ + "Increasing", (factor - 1) / 0.9, None))  # factor 1 +- 0.9 level
    spy(ImageOps, "autocontrast", lambda *args, **kwargs: ("AutoContrast", None, None))
    spy(ImageOps, "equalize", lambda *args, **kwargs: ("Equalize", None, None))
    spy(Image.Image, "point", lambda image, lut, mode=None: (*lut_operation(lut), None))
    return calls


TIMM_INCREASING = {"AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing"}  # level ~ +-N(0.9, 0.05), the sign at random


def test_randaugment_is_timms_rand_m9_mstd05_inc1(recipe_data, tmp_path, monkeypatch):
    """The imagenet recipe's training transform, as a run builds it, runs timm's rand-m9-mstd0.5-inc1 (seen through
    the PIL operations it calls): 2 of timm's 15 operations, each applied with probability 0.5 (a quarter of the
    images untouched), each at its own magnitude ~ N(9, 0.5) clipped to 10 (rotations by 27 degrees on average,
    translations by 40% of the side), bicubic, filled with the mean colour."""
    transform = recipe_trainer("imagenet", recipe_data, tmp_path).task.train_set.transform
    calls = record_pil_operations(monkeypatch)
    image = Image.fromarray(np.random.default_rng(0).integers(60, 180, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    per_image = []
    for _ in range(600):
        start = len(calls)
        transform(image)
        per_image.append(calls[start:])
    shares = [sum(len(ops) == n for ops in per_image) / 600 for n in (0, 1, 2)]
    assert abs(shares[0] - 0.25) < 0.06 and abs(shares[1] - 0.5) < 0.07 and sum(shares) == 1
    drawn = collections.Counter(name for ops in per_image for name, _, _ in ops)
    assert set(drawn) == TIMM_INCREASING and min(drawn.values()) >= 15  # each ~40 times
    levels = {name: torch.tensor([level for ops in per_image for op, level, _ in ops if op == name])
              for name in drawn if name not in ("AutoContrast", "Equalize", "Invert")}
    for name in SIGNED:
        assert abs(levels[name].abs().mean() - 0.9) < 0.04 and 0.25 < (levels[name] < 0).float().mean() < 0.75, name
    signed = torch.cat([levels[name] for name in SIGNED]).abs()
    assert abs(signed.mean() - 0.9) < 0.015 and abs(signed.std() - 0.05) < 0.012 and signed.max() <= 1 + 1e-6
    for name in ("SolarizeIncreasing", "SolarizeAdd"):
        assert levels[name].min() > 0.65 and levels[name].max() <= 1 + 1e-6, name
    bits = collections.Counter(levels["PosterizeIncreasing"].tolist())  # 1 bit kept at magnitude 7.5-10, 0 at 10
    assert set(bits) <= {0, 1, 2} and bits[1] > 0.8 * sum(bits.values())
    pairs = [ops for ops in per_image if len(ops) == 2 and {ops[0][0], ops[1][0]} <= SIGNED]
    assert len(pairs) > 10 and all(abs(abs(a[1]) - abs(b[1])) > 1e-6 for a, b in pairs)  # a magnitude per operation
    affine = [extra for ops in per_image for _, _, extra in ops if extra is not None]
    assert len(affine) > 100 and set(affine) == {(Image.Resampling.BICUBIC, (124, 116, 104))}


def test_repeated_augmentation_sampler_spreads_three_copies_over_two_ranks():
    dataset = list(range(30))
    samplers = [train.ResumableDistributedSampler(dataset, 2, rank, shuffle=True, seed=0, drop_last=True,
                                                  repeated_aug=3) for rank in (0, 1)]
    plain = torch.utils.data.DistributedSampler(dataset, 2, 0, shuffle=True, seed=0, drop_last=True)
    shown = []
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        ranks = [list(sampler) for sampler in samplers]
        assert [len(r) for r in ranks] == [len(s) for s in samplers] == [len(plain)] * 2 == [15, 15]
        counts = collections.Counter(ranks[0] + ranks[1])
        assert len(counts) == 10 and set(counts.values()) == {3}  # a third of the images, each 3 times
        assert all(i in ranks[0] and i in ranks[1] for i in counts)  # the copies of an image on both ranks
        shown.append(set(counts))
    assert shown[0] != shown[1]
    samplers[0].start = 4  # a mid-epoch resume continues the same order
    assert list(samplers[0]) == ranks[0][4:] and len(samplers[0]) == 11


# --- token labeling -------------------------------------------------------------------------------

RAMP = 8.0  # logit per unit of image width / height in the label maps below


def ramp_data(root, classes=6, size=(96, 128), cells=(48, 32)):
    """Every class folder holds the same image, whose red and green channels are each pixel's x and y
    (fractions of the width and height), and its label map, whose classes 0 and 1 have the logits
    RAMP * x and RAMP * y of each cell's centre (classes 2-4 logit 0, class 5 not in the top 5)."""
    height, width = size
    y, x = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
    image = v2.functional.to_pil_image((torch.stack([x, y, torch.zeros_like(x)]) * 255).round().to(torch.uint8))
    cy, cx = torch.meshgrid((torch.arange(cells[0]) + 0.5) / cells[0], (torch.arange(cells[1]) + 0.5) / cells[1],
                            indexing="ij")
    logits = torch.stack([RAMP * cx, RAMP * cy, *torch.zeros(3, *cells)])
    label_map = torch.stack([logits, torch.arange(5.0)[:, None, None].expand(5, *cells)]).half()
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"class{c}"))
        os.makedirs(os.path.join(root, "labels", f"class{c}"))
        image.save(os.path.join(root, "train", f"class{c}", "img.png"))
        torch.save(label_map, os.path.join(root, "labels", f"class{c}", "img.pt"))
    return root


def test_label_map_follows_the_crop_and_the_flip(tmp_path):
    """The x and y that the token labels (and the crop label) say land where the image's pixels have them."""
    root = ramp_data(str(tmp_path))
    crop = v2.RandomResizedCrop(64, antialias=True)
    dataset = train.TokenLabeledImages(root, os.path.join(root, "labels"), crop, train.augment_and_normalize(),
                                       label_smoothing=0.0)
    smoothed = train.TokenLabeledImages(root, os.path.join(root, "labels"), crop, train.augment_and_normalize())
    flips = []
    for seed in range(12):
        torch.manual_seed(seed)
        image, target, crop_label, token_labels = dataset[0]
        assert image.shape == (3, 64, 64) and target == 0 and token_labels.shape == (4, 6) and crop_label.shape == (6,)
        pixels = image[:2] * torch.tensor(train.STD[:2])[:, None, None] + torch.tensor(train.MEAN[:2])[:, None, None]
        said = (token_labels[:, :2] / token_labels[:, 5:]).log().T / RAMP        # (x, y) of the 2 x 2 tokens
        torch.testing.assert_close(said, pixels.reshape(2, 2, 32, 2, 32).mean((2, 4)).flatten(1), atol=0.006, rtol=0)
        torch.testing.assert_close((crop_label[:2] / crop_label[5]).log() / RAMP, pixels.mean((1, 2)),
                                   atol=0.006, rtol=0)
        flips.append(bool(pixels[0, :, 0].mean() > pixels[0, :, -1].mean()))
        torch.manual_seed(seed)
        torch.testing.assert_close(smoothed[0][2], 0.9 * crop_label + 0.1 / 6)
    assert 0 < sum(flips) < len(flips)


GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def test_label_map_follows_randaugments_rotations_shears_and_translations(tmp_path, monkeypatch):
    """The imagenet-tklb recipe's training set as a run builds it (LV-ViT's order: RandAugment on the whole image,
    then the crop): wherever only geometric operations ran, each token's label says the x and y its pixels hold,
    although the label map's cells are 4 x 2 pixels; tokens that show the fill colour (blue) are left out."""
    root = ramp_data(str(tmp_path))
    shutil.copytree(os.path.join(root, "train"), os.path.join(root, "val"))
    s = settings("--recipe", "imagenet-tklb", "--data", root, "--token-labels", os.path.join(root, "labels"),
                 "--image-size", "128", "--random-erasing", "0", "--label-smoothing", "0", "--batch-size", "2",
                 "--workers", "0", "--output-dir", str(tmp_path / "out"))
    dataset = train.build_trainer(s, model=glnet.glnet_mini(num_classes=6, token_head=True)).task.train_set
    calls, moved, errors = record_pil_operations(monkeypatch), collections.Counter(), []
    for seed in range(150):
        torch.manual_seed(seed)
        start = len(calls)
        image, _, _, token_labels = dataset[0]
        ops = {name for name, _, _ in calls[start:]}
        if not ops or not ops <= GEOMETRIC:
            continue
        pixels = image * torch.tensor(train.STD)[:, None, None] + torch.tensor(train.MEAN)[:, None, None]
        said = (token_labels[:, :2] / token_labels[:, 5:]).log().T / RAMP        # (x, y) of the 4 x 4 tokens
        seen = pixels[:2].reshape(2, 4, 32, 4, 32).mean((2, 4)).flatten(1)
        inside = pixels[2].reshape(4, 32, 4, 32).amax((1, 3)).flatten() < 0.02   # no fill colour in the token
        errors.append((said - seen)[:, inside].abs().amax().item() if inside.any() else 0.0)
        moved.update(ops)
    assert moved["Rotate"] >= 3 and moved["ShearX"] + moved["ShearY"] >= 3 and len(errors) >= 20
    assert moved["TranslateXRel"] + moved["TranslateYRel"] >= 3 and max(errors) < 0.02


class TokenGrid(nn.Module):
    """A stand-in for GLNet whose token logits are the mean of its input over each 32 x 32 token (through
    a stride-4 'stem'), and whose class logits are their mean: MixToken's swaps show up unblurred."""
    stage_strides = (4, 8, 16, 32)

    def __init__(self):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.AvgPool2d(4)])

    def forward(self, x):
        tokens = rearrange(nn.functional.avg_pool2d(self.downsample_layers[0](x), 8), "b k h w -> b (h w) k")
        return tokens.mean(dim=1), tokens


def test_mix_token_puts_every_token_back_and_mixes_the_class_by_area():
    model = TokenGrid().train()
    mix_token = train.MixToken(model)
    images = torch.randn(4, 3, 96, 64)                                   # 3 x 2 tokens
    own_class, own_tokens = model(images)
    mixed = 0
    for seed in range(20):
        torch.manual_seed(seed)
        box = train.MixToken.random_box(3, 2).flatten()[None, :, None]
        torch.manual_seed(seed)
        class_logits, token_logits, lam = mix_token(model, images)
        torch.testing.assert_close(token_logits, own_tokens)              # every token back with its image
        # the class logits saw the other image in the box: a share 1 - lam of the tokens
        torch.testing.assert_close(class_logits, torch.where(box, own_tokens.flip(0), own_tokens).mean(1))
        assert lam == 1 - box.float().mean()
        mixed += bool(0 < lam < 1)
    assert mixed >= 10 and mix_token.box is None
    mix_token.box = torch.ones(3, 2, dtype=torch.bool)
    assert not torch.equal(model(images)[1], own_tokens)                 # the hook swaps in training mode ...
    assert torch.equal(model.eval()(images)[1], own_tokens)              # ... and not in eval mode


def test_token_labeling_loss_by_hand():
    torch.manual_seed(0)
    B, K, T = 3, 4, 4                                                    # 64 x 64 images: 2 x 2 tokens
    class_logits, token_logits = torch.randn(B, K), torch.randn(B, T, K)
    crop_labels, token_labels = torch.randn(B, K).softmax(-1), torch.randn(B, T, K).softmax(-1)
    batch = (torch.zeros(B, 3, 64, 64), torch.zeros(B, dtype=torch.long), crop_labels, token_labels)
    seed = next(s for s in range(100) if 0 < (torch.manual_seed(s), train.MixToken.random_box(2, 2))[1].sum() < 4)
    torch.manual_seed(seed)
    box = train.MixToken.random_box(2, 2).flatten().tolist()
    torch.manual_seed(seed)
    loss = train.token_labeling_loss(lambda images: (class_logits, token_logits), batch, torch.device("cpu"),
                                     train.MixToken(TokenGrid()))

    def cross_entropy(logits, target):
        return -sum(p * math.log(math.exp(l) / sum(math.exp(m) for m in logits)) for p, l in zip(target, logits))

    lam = 1 - sum(box) / T
    class_loss = sum(cross_entropy(class_logits[b].tolist(),
                                   (lam * crop_labels[b] + (1 - lam) * crop_labels[B - 1 - b]).tolist())
                     for b in range(B)) / B
    token_loss = sum(cross_entropy(token_logits[B - 1 - b if box[t] else b, t].tolist(), token_labels[b, t].tolist())
                     for b in range(B) for t in range(T)) / (B * T)
    assert loss.item() == pytest.approx(class_loss + 0.5 * token_loss, rel=1e-5)


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    """Label maps hold the top 5 classes: 5 classes, 6 train and 3 val images each."""
    root = str(tmp_path_factory.mktemp("five") / "shapes")
    return train.make_shapes_dataset(root, train_per_class=6, val_per_class=3, image_size=40,
                                     classes=("circle", "square", "vertical_stripes", "ring", "cross"))


def test_token_labeling_demo_teacher_labels_student_eval(tmp_path, five_classes):
    """The README's CPU demo, shortened: a teacher, its label maps, a student trained on them under
    torchrun (MixToken inside the DDP forward), and --eval of the student."""
    small = [*TINY, "--image-size", "64", "--epochs", "1", "--recipe", "builtin"]
    teacher_dir, labels, student_dir = (str(tmp_path / name) for name in ("teacher", "labels", "student"))
    train.main(["--data", five_classes, "--output-dir", teacher_dir, *small])
    train.main(["--make-token-labels", labels, "--teacher", os.path.join(teacher_dir, "best.pth"), "--workers", "0"])

    teacher = glnet.create_model("glnet_mini", num_classes=5, checkpoint=os.path.join(teacher_dir, "best.pth")).eval()
    images = train.image_folder(five_classes, "train", v2.Compose([v2.Resize((64, 64)), train.to_tensor]))
    paths = [os.path.join(labels, os.path.basename(os.path.dirname(p)), os.path.basename(p)[:-4] + ".pt")
             for p, _ in images.samples]
    assert sorted(os.path.relpath(p, labels) for p in paths) == \
        sorted(os.path.join(d, f) for d in os.listdir(labels) for f in os.listdir(os.path.join(labels, d)))
    with torch.no_grad():
        x = torch.stack([images[i][0] for i in (0, 29)])
        tokens = teacher.head(teacher.norm(teacher.forward_features(x)[-1]).permute(0, 2, 3, 1))  # the class head ...
        torch.testing.assert_close(tokens.mean((1, 2)), teacher(x))                              # ... on each token
    for i, logits in zip((0, 29), tokens.permute(0, 3, 1, 2)):
        label_map = torch.load(paths[i])
        assert label_map.shape == (2, 5, 2, 2) and label_map.dtype == torch.float16
        assert torch.equal(label_map[1, 0].long(), logits.argmax(0))     # the teacher's top class at each token
        torch.testing.assert_close(label_map[0].float(), logits.topk(5, dim=0).values, atol=2e-2, rtol=1e-2)

    log = run_script(["--token-labels", labels, "--data", five_classes, "--output-dir", student_dir, *small],
                     launcher=torchrun(2))
    assert "recipe builtin: model glnet_mini" in log and "with a token head" in log
    assert "epoch 1/1  step 3/3  loss" in log and log.count("epoch 1/1 done") == 1
    checkpoint = torch.load(os.path.join(student_dir, "best.pth"))
    assert (checkpoint["args"]["recipe"], checkpoint["args"]["token_labels"]) == ("builtin", labels)
    assert checkpoint["model"]["token_head.weight"].shape == (5, 256)
    metrics = train.main(["--eval", "--checkpoint", os.path.join(student_dir, "best.pth")])
    record = checkpoint["metrics"]
    assert metrics["images"] == 15 and metrics["top1"] == pytest.approx(max(record["val_top1"], record["ema_top1"]))

    before = {name: file_bytes(os.path.join(teacher_dir, name)) for name in os.listdir(teacher_dir)}
    with pytest.raises(glnet.InputError, match="differ in token_head.bias, token_head.weight"):
        train.main(["--token-labels", labels, "--data", five_classes, "--output-dir", teacher_dir, *small])
    assert {name: file_bytes(os.path.join(teacher_dir, name)) for name in os.listdir(teacher_dir)} == before


def test_bad_label_maps_are_named_before_training(tmp_path, five_classes):
    labels = str(tmp_path / "labels")
    for image_path, _ in train.image_folder(five_classes, "train", None).samples:
        path = train.label_map_path(labels, os.path.join(five_classes, "train"), image_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(torch.zeros(2, 5, 3, 3, dtype=torch.float16), path)
    args = ["--data", five_classes, "--output-dir", str(tmp_path / "out"), *TINY, "--recipe", "builtin"]
    image = os.path.join(five_classes, "train", "ring", "00002.png")
    label_map = os.path.join(labels, "ring", "00002.pt")
    dataset = train.TokenLabeledImages(five_classes, labels, v2.RandomResizedCrop(32), train.augment_and_normalize())
    index = dataset.images.samples.index((image, dataset.images.class_to_idx["ring"]))

    torch.save(torch.zeros(5, 3, 3), label_map)
    with pytest.raises(glnet.InputError, match=f"the label map {label_map} of {image} holds shape \\(5, 3, 3\\); expected a "
                                         r"tensor \(2, 5, H, W\): the teacher's top-5 logits and their class indices"):
        dataset[index]
    torch.save(torch.full((2, 5, 3, 3), 7.0), label_map)
    with pytest.raises(glnet.InputError, match=r"holds class indices 7-7; expected .* class indices \(0-4\)"):
        dataset[index]
    os.remove(label_map)
    with pytest.raises(glnet.InputError, match=f"1 of 30 training images have no label map, e.g. {image}: expected "
                                                f"{label_map}, a tensor \\(2, 5, H, W\\)"):
        train.main([*args, "--token-labels", labels])
    shutil.rmtree(os.path.join(labels, "ring"))
    with pytest.raises(glnet.InputError, match="6 of 30 training images have no label map"):
        train.main([*args, "--token-labels", labels])
    with pytest.raises(glnet.InputError, match="30 of 30 training images have no label map, e.g. .*nowhere/"):
        train.main([*args, "--token-labels", str(tmp_path / "nowhere")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(glnet.InputError, match=f"{labels} is not empty"):
        train.main(["--make-token-labels", labels, "--teacher", "teacher.pth"])


# --- the benchmark (a structure check: speeds are figures, never assertions) ----------------------

def test_interleaved_medians_time_each_call():
    calls = {"short": lambda: time.sleep(0.01), "long": lambda: time.sleep(0.05)}
    seconds = train.interleaved_medians(calls, rounds=3, device=torch.device("cpu"))
    assert set(seconds) == {"short", "long"} and 0.01 <= seconds["short"] and seconds["long"] >= 0.05


def test_bench_prints_a_row_per_model_and_a_latency_per_size(capsys):
    result = train.main(["--bench", "--models", "glnet_mini", "--rounds", "1", "--batch-size", "1",
                         "--latency-sizes", "64", "96"])
    tables = capsys.readouterr().out.split("\n\n")
    for title in ("inference", "training step"):
        table = next(t for t in tables if t.startswith(title))
        rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
        assert set(rows) == {"glnet_mini", "swin_t", "convnext_tiny"} and all(len(v) == 3 for v in rows.values())
        assert rows["swin_t"][1] == "1.00" and rows["convnext_tiny"][2] == "1.00"
    assert set(result["latency"]) == {64, 96} and all(t > 0 for t in result["latency"].values())


# =================================================================================================
# analyze.py
# =================================================================================================

IMAGE_SIZE = 64
FAST = ["--workers", "0"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A few real PNG files per class of the built-in shapes, in the ImageNet layout."""
    return train.make_shapes_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), train_per_class=4,
                                     val_per_class=2, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A checkpoint in train.py's layout: the weights under 'model', the run's settings under 'args'."""
    torch.manual_seed(0)
    model = glnet.create_model("glnet_mini", num_classes=len(train.SHAPES_CLASSES))
    settings = train.ClassificationSettings(model="glnet_mini", image_size=IMAGE_SIZE, data=tiny_data)
    path = str(tmp_path_factory.mktemp("run") / "best.pth")
    train.save_checkpoint({"model": model.state_dict(), "args": dict(vars(settings)), "task": "classification",
                           "num_classes": len(train.SHAPES_CLASSES), "classes": list(train.SHAPES_CLASSES)}, path)
    return path


def positions(x):
    """(B, C, H, W) -> (B*H*W, C) in float64: every position of a feature grid as a row."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double()


@torch.no_grad()
def stage_positions(model, folder):
    """By hand, without analyze.py: {stage: [h_0, ..., h_n]} on every training image, as positions."""
    images = train.image_folder(folder, "train", train.eval_transform(IMAGE_SIZE))
    outputs = {s: [] for s in (1, 2, 3, 4)}
    hooks = [m.register_forward_hook(lambda module, inputs, output, s=s: outputs[s].append(positions(output)))
             for s in outputs for m in (model.downsample_layers[s - 1], *model.stages[s - 1].blocks)]
    model.eval().forward_features(torch.stack([image for image, _ in images]))
    for hook in hooks:
        hook.remove()
    return outputs


def least_squares_by_hand(x, y):
    """(prediction of y from x with a bias, relative residual), by torch.linalg.lstsq on the rows."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    prediction = design @ torch.linalg.lstsq(design, y).solution
    return prediction, float(((y - prediction) ** 2).sum() / (y ** 2).sum())


def test_fit_recovers_an_exactly_linear_map_and_the_residual_of_any_other():
    g = torch.Generator().manual_seed(0)
    h, other = torch.randn(4, 8, 3, 5, generator=g), torch.randn(4, 8, 3, 5, generator=g)
    exact = nn.Conv2d(8, 8, 1)
    stats = analyze.StageStatistics(3, 8, torch.device("cpu"))
    with torch.no_grad():
        stats.update([positions(h), positions(exact(h)), positions(other)])
    fitted = stats.fit(0, 1)
    torch.testing.assert_close(fitted.weight, exact.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, exact.bias, atol=1e-4, rtol=1e-4)
    residual = stats.fit_residual()
    assert residual[0, 1] < 1e-8 and residual.diagonal().isnan().all() and residual[1, 0].isnan()   # i < j only
    assert residual[0, 2] == pytest.approx(least_squares_by_hand(positions(h), positions(other))[1], rel=1e-6)


def test_similarities_of_identical_and_scaled_representations():
    h = torch.randn(3, 16, 4, 5)
    other = torch.randn(3, 16, 4, 5)
    stats = analyze.StageStatistics(4, 16, torch.device("cpu"))
    stats.update([positions(h), positions(h.clone()), positions(2 * h), positions(other)])
    br, cka, cosine = stats.block_redundancy(), stats.linear_cka(), stats.cosine()
    assert br[0, 1] == 0 and (br.diagonal() == 0).all()
    torch.testing.assert_close(br[0, 2], -(positions(h) ** 2).sum(1).mean())
    torch.testing.assert_close(br[0, 3], -((positions(h) - positions(other)) ** 2).sum(1).mean())
    torch.testing.assert_close(cka[0, 2], torch.tensor(1.0, dtype=torch.float64))  # CKA ignores scale, BR does not
    torch.testing.assert_close(cosine[0, 2], torch.tensor(1.0, dtype=torch.float64))
    x, y = positions(h), positions(other)
    torch.testing.assert_close(cosine[0, 3], torch.nn.functional.cosine_similarity(x, y).mean())
    x, y = x - x.mean(0), y - y.mean(0)
    expected_cka = (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())
    torch.testing.assert_close(cka[0, 3], expected_cka)
    torch.testing.assert_close(br, br.T)


def test_statistics_accumulate_batch_by_batch():
    reps = [torch.randn(6, 8, 3, 3) for _ in range(3)]
    whole = analyze.StageStatistics(3, 8, torch.device("cpu"))
    whole.update([positions(r) for r in reps])
    parts = analyze.StageStatistics(3, 8, torch.device("cpu"))
    parts.update([positions(r[:2]) for r in reps])
    parts.update([positions(r[2:]) for r in reps])
    for method in ("block_redundancy", "linear_cka", "cosine", "fit_residual"):
        torch.testing.assert_close(getattr(parts, method)(), getattr(whole, method)(), equal_nan=True)


def test_kept_positions_are_the_same_positions_of_every_representation():
    h = torch.randn(4, 8, 3, 3)
    stats = analyze.StageStatistics(2, 8, torch.device("cpu"), keep=5)
    stats.update([positions(h), positions(2 * h)])
    stats.update([positions(h), positions(2 * h)])
    kept = torch.cat(stats.kept).view(-1, 2, 8)                           # (positions, representation, channel)
    assert kept.shape == (10, 2, 8) and torch.equal(kept[:, 1], 2 * kept[:, 0])
    assert all((positions(h).float() == row).all(1).any() for row in kept[:, 0])


def test_approximate_saves_the_least_squares_map_and_it_evaluates_the_same(checkpoint, tiny_data, tmp_path,
                                                                           capsys, monkeypatch):
    train_translator = analyze.train_translator                          # 20 of its 300 steps are enough here
    monkeypatch.setattr(analyze, "train_translator", lambda *args, **kwargs: train_translator(*args, steps=20,
                                                                                               **kwargs))
    out = str(tmp_path / "out")
    common = [*FAST, "--batch-size", "16", "--output-dir", out, "--latency-rounds", "1"]
    results = analyze.main(["approximate", "--checkpoint", checkpoint, *common, "--blocks", "3:1-3",
                            "--translator", "resmlp", "--rank-by", "br"])
    printed = capsys.readouterr().out
    assert set(results) == {(None, "original"), *(((3, 1, 3), mode) for mode in ("linear", "resmlp", "skip"))}
    assert all(mode in printed for mode in ("original", "linear", "resmlp", "skip"))
    run = {mode: results[(3, 1, 3), mode] for mode in ("linear", "resmlp", "skip")}
    assert run["linear"]["fit_s"] > 0 and run["resmlp"]["fit_s"] > 0 and run["skip"]["fit_s"] is None
    assert run["skip"]["params"] < run["linear"]["params"] < results[None, "original"]["params"]
    assert run["linear"]["gflops"] < results[None, "original"]["gflops"]

    saved = os.path.join(out, "approximated.pth")
    loaded, _ = train.load_trained(saved, analyze.build)
    original, _ = train.load_trained(checkpoint, analyze.build)
    blocks = loaded.stages[2].blocks
    assert isinstance(blocks[1], nn.Conv2d) and isinstance(blocks[2], nn.Identity)
    h = stage_positions(original, tiny_data)[3]                          # h_1 -> h_3 fitted on the training images
    score = next(float(line.split()[1]) for line in printed.splitlines() if line.startswith("3:1-3"))
    assert score == pytest.approx(float(((h[3] - h[1]) ** 2).sum(1).mean()), rel=1e-3)   # -BR, the paper's score
    expected, _ = least_squares_by_hand(h[1], h[3])
    with torch.no_grad():
        fitted = positions(blocks[1](h[1].float().T[None, :, :, None]))       # the N positions as an N x 1 grid
    torch.testing.assert_close(fitted, expected, atol=1e-3 * float(expected.abs().max()), rtol=1e-3)
    metrics = analyze.main(["evaluate", "--checkpoint", saved, *FAST])
    assert metrics["top1"] == run["linear"]["top1"] and metrics["images"] == 2 * len(train.SHAPES_CLASSES)
    before = file_bytes(saved)
    with pytest.raises(glnet.InputError, match="already replaced"):
        analyze.main(["approximate", "--checkpoint", saved, *common, "--blocks", "3:0-2"])
    assert file_bytes(saved) == before


def test_search_evaluates_the_most_redundant_runs(checkpoint, tiny_data, tmp_path):
    common = ["--checkpoint", checkpoint, *FAST, "--batch-size", "16", "--output-dir", str(tmp_path)]
    matrices = analyze.main(["redundancy", *common])
    h = stage_positions(train.load_trained(checkpoint, analyze.build)[0], tiny_data)
    assert Image.open(tmp_path / "redundancy.png").format == "PNG"
    with open(tmp_path / "redundancy.json") as f:
        assert json.load(f) == {metric: {str(s): m.tolist() for s, m in per_stage.items()}
                                for metric, per_stage in matrices.items()}
    for per_stage in matrices.values():
        assert [m.shape[0] for m in per_stage.values()] == [2, 2, 4, 2]   # glnet_mini: depths (1, 1, 3, 1)
    runs = [(s, i, j) for s, m in matrices["BR"].items() for i in range(len(m)) for j in range(i + 1, len(m))]
    torch.testing.assert_close(matrices["BR"][3][1, 3], -((h[3][3] - h[3][1]) ** 2).sum(1).mean())

    results = analyze.main(["approximate", *common, "--search", "3", "--latency-rounds", "1"])  # by the fit residual
    by_residual = sorted(runs, key=lambda run: least_squares_by_hand(h[run[0]][run[1]], h[run[0]][run[2]])[1])
    assert {run for run, _ in results if run} == set(by_residual[:3])


@pytest.mark.parametrize("kind", ["mlp", "resmlp"])
def test_mlp_translators_reduce_their_training_loss(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 16, generator=g) / 4) + 0.5 * x
    torch.manual_seed(0)                                                  # the translator's initialisation
    untrained = torch.nn.functional.mse_loss(analyze.Translator(16, kind == "resmlp", 1)(x), y).item()
    translator, record = analyze.train_translator(kind, x, y, 1, steps=50, lr=1e-2, batch_size=128)
    assert record["epoch"] == 2 and record["val_mse"] < 0.5 * untrained                  # 50 steps of 128 of 4096
    grid = torch.randn(2, 16, 3, 5, generator=g)                          # 1x1 convolutions: each position alone
    with torch.no_grad():
        torch.testing.assert_close(translator(grid)[:, :, 1, 2], translator(grid[:, :, 1:2, 2:3])[:, :, 0, 0])


def test_redundancy_figure_has_one_heatmap_per_stage_and_metric():
    matrices = {metric: {s: torch.rand(n, n) - (metric == "BR") * 1.0 for s, n in zip((1, 2, 3, 4), (2, 2, 4, 2))}
                for metric in analyze.METRICS}
    figure = analyze.redundancy_figure(matrices)
    heatmaps = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(figure.axes) - len(heatmaps) == len(analyze.METRICS)      # a colour bar per metric
    assert [ax.get_title() for ax in heatmaps] == [f"stage {s} - {metric}" for metric in analyze.METRICS
                                                   for s in (1, 2, 3, 4)]
    for ax, matrix in zip(heatmaps, (m for per_stage in matrices.values() for m in per_stage.values())):
        ticks = [f"h{a}" for a in range(len(matrix))]
        assert [t.get_text() for t in ax.get_xticklabels()] == ticks == [t.get_text() for t in ax.get_yticklabels()]
        assert [t.get_text() for t in ax.texts] == [f"{v:.3g}" for v in matrix.flatten().tolist()]


def test_slots_figure_rows_and_panels(checkpoint, tiny_data, tmp_path):
    images = [f"{tiny_data}/val/circle/00000.png", f"{tiny_data}/val/cross/00001.png"]
    path = analyze.main(["slots", "--checkpoint", checkpoint, "--image", *images, "--block", "2.1", "3.1",
                         "--output-dir", str(tmp_path)])
    assert path == str(tmp_path / "slots-00000.png") and Image.open(path).format == "PNG"
    g = torch.Generator().manual_seed(0)
    weights = {"2.1": torch.rand(2, 64, 8, 8, generator=g), "3.1": torch.rand(2, 64, 4, 4, generator=g)}
    figure, representative = analyze.slot_figure(torch.rand(2, 3, 32, 32, generator=g), weights, ["a", "b"])
    assert len(figure.axes) == 2 * (1 + 2 * 2)                            # one row per image: input, 2 panels per block
    titles = [ax.get_title() for ax in figure.axes]
    chosen, shallow = representative[1, "3.1"], representative[1, "2.1"]
    assert titles[5:] == ["input: b", "block 2.1: all 64 slots", f"block 2.1: slots {', '.join(map(str, shallow))}",
                          "block 3.1: all 64 slots", f"block 3.1: slots {', '.join(map(str, chosen))}"]
    assert len(figure.axes[8].patches) == 4                               # the representative slots are framed
    assert [t.get_text() for t in figure.axes[9].texts] == [str(slot) for slot in chosen]
    with pytest.raises(glnet.InputError, match=r"--block 4\.1: not a GLMix block .* 1\.1, 2\.1, 3\.1, 3\.3"):
        analyze.main(["slots", "--checkpoint", checkpoint, "--image", images[0], "--block", "4.1", "3.1"])
    with pytest.raises(glnet.InputError, match="cannot read image missing.png"):
        analyze.main(["slots", "--checkpoint", checkpoint, "--image", "missing.png"])


@pytest.mark.parametrize("argv, message", [
    (["approximate", "--search", "2", "--rank-by", "mse"], "argument --rank-by: invalid choice: 'mse'"),
    (["approximate", "--search", "2", "--translator", "cnn"], "argument --translator: invalid choice: 'cnn'"),
    (["approximate", "--search", "2", "--translator"], "argument --translator: expected at least one argument"),
    (["approximate", "--search", "2", "--latency-rounds", "0"], "argument --latency-rounds: must be at least 1, got 0"),
    (["approximate", "--search", "0"], "argument --search: must be at least 1, got 0"),
    (["approximate"], "one of the arguments --blocks --search is required"),
    (["approximate", "--blocks", "3:1-3", "--search", "2"], "argument --search: not allowed with argument --blocks"),
    (["approximate", "--blocks", "3-1"], "argument --blocks: expected STAGE:I-J"),
    (["approximate", "--blocks", "3:2-1"], "argument --blocks: expected STAGE:I-J"),
    (["approximate", "--blocks", "0:0-1"], "argument --blocks: expected STAGE:I-J"),
    (["redundancy", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["evaluate", "--image-size", "16"], "argument --image-size: must be at least 32, got 16"),
    (["slots", "--image", "a.png", "--model", "glnet_99g"], "argument --model: expected a GLNet"),
])
def test_bad_analyze_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.main([*argv, "--checkpoint", "x.pth"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_k_medoids_picks_one_point_per_cluster():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    points = torch.cat([c + 0.1 * torch.randn(10, 16, generator=g) for c in centres])
    medoids = analyze.k_medoids(points, 4)
    assert sorted(m // 10 for m in medoids) == [0, 1, 2, 3]
    unit = torch.nn.functional.normalize(points, dim=1)
    distance = 1 - unit @ unit.T
    for m in medoids:                                                      # each its cluster's most central member
        start = m // 10 * 10
        assert start + int(distance[start:start + 10, start:start + 10].sum(1).argmin()) == m


@pytest.mark.parametrize("blocks", ["5:0-1", "3:0-4", "1:1-2"])
def test_runs_the_model_lacks_are_explained(blocks, checkpoint):
    with pytest.raises(glnet.InputError, match=f"--blocks {blocks}: this model has no such blocks.*1, 1, 3, 1 blocks"):
        analyze.main(["approximate", "--checkpoint", checkpoint, "--blocks", blocks, *FAST])


def test_released_checkpoint_needs_model_and_data(tiny_data, tmp_path):
    path = str(tmp_path / "bare.pth")
    torch.save(glnet.create_model("glnet_mini", num_classes=len(train.SHAPES_CLASSES)).state_dict(), path)
    with pytest.raises(glnet.InputError, match="pass --model"):
        analyze.main(["evaluate", "--checkpoint", path, *FAST])
    with pytest.raises(glnet.InputError, match="pass --data"):
        analyze.main(["evaluate", "--checkpoint", path, "--model", "glnet_mini", *FAST])
    metrics = analyze.main(["evaluate", "--checkpoint", path, "--model", "glnet_mini", "--data", tiny_data,
                            "--image-size", "32", *FAST])
    assert metrics["images"] == 2 * len(train.SHAPES_CLASSES)



# --- any backbone: torchvision's and timm's layouts, named datasets, the BR paper's probe --------------

HUBCONF = """dependencies = ["torch", "torchvision"]
import torch
import torch.nn as nn
from torchvision import models
from torchvision.models.vision_transformer import EncoderBlock


def tiny_vit(pretrained=False, identity_blocks=()):  # image 32, patch 8: [CLS] and 16 tokens
    torch.manual_seed(0)
    model = models.VisionTransformer(32, 8, num_layers=4, num_heads=2, hidden_dim=64, mlp_dim=128)
    for i in identity_blocks:  # x + 0 + 0: the block is an exact identity
        block = model.encoder.layers[i]
        for linear in (block.self_attention.out_proj, block.mlp[3]):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    return model


def identity_vit(pretrained=False):  # blocks 2 and 3 (numbered from 1) are identities
    return tiny_vit(identity_blocks=(1, 2))


class TimmLayoutViT(nn.Module):  # timm's and DINOv2's layout: patch_embed, cls_token, pos_embed, blocks, norm, head
    def __init__(self, dim=64, depth=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, stride=8)
        self.cls_token, self.pos_embed = nn.Parameter(torch.randn(1, 1, dim)), nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(2, dim, 2 * dim, 0.0, 0.0) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def timm_layout_vit(pretrained=False):
    torch.manual_seed(0)
    return TimmLayoutViT()


def tiny_swin(pretrained=False, v2=False):
    torch.manual_seed(0)
    extra = dict(block=models.swin_transformer.SwinTransformerBlockV2,
                 downsample_layer=models.swin_transformer.PatchMergingV2) if v2 else {}
    return models.SwinTransformer([4, 4], 16, [2, 2, 2, 2], [1, 1, 2, 2], [2, 2], **extra)


def tiny_swin_v2(pretrained=False):
    return tiny_swin(v2=True)


def tiny_convnext(pretrained=False):
    torch.manual_seed(0)
    C = models.convnext.CNBlockConfig
    return models.ConvNeXt([C(16, 32, 2), C(32, 64, 2), C(64, None, 3)])
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local torch.hub repository (as DINOv2's) of small backbones of every family analyze.py knows."""
    folder = tmp_path_factory.mktemp("hub")
    (folder / "hubconf.py").write_text(HUBCONF)
    return str(folder)


def write_mnist(root, name="MNIST", train_images=300, test_images=60, seed=0):
    """MNIST's raw idx files in torchvision's layout, root/<name>/raw: a bright bar per class on noise."""
    g, raw = torch.Generator().manual_seed(seed), os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, count in (("train", train_images), ("t10k", test_images)):
        labels = torch.arange(count) % 10
        images = torch.rand(count, 28, 28, generator=g) * 80
        for image, label in zip(images, labels.tolist()):
            image[2 + 2 * label:6 + 2 * label, 4:24] = 255
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            with open(os.path.join(raw, f"{prefix}-{kind}-ubyte"), "wb") as f:  # big-endian magic and sizes
                f.write(bytes([0, 0, 8, array.dim()]) + b"".join(s.to_bytes(4, "big") for s in array.shape))
                f.write(array.to(torch.uint8).numpy().tobytes())


def write_cifar(root, hundred=False, train_images=50, test_images=20, seed=1):
    """CIFAR-10's (or CIFAR-100's) pickled batches and class names in torchvision's layout."""
    kind = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    g, folder = torch.Generator().manual_seed(seed), os.path.join(root, kind.base_folder)
    os.makedirs(folder, exist_ok=True)
    files = [(name, train_images // len(kind.train_list)) for name, _ in kind.train_list] + [(kind.test_list[0][0],
                                                                                             test_images)]
    for name, count in files:
        labels = torch.randint(100 if hundred else 10, (count,), generator=g)
        colours = torch.stack([labels % 3, labels % 5, labels % 7]).T[:, :, None] * 30.0   # a colour per class
        data = (colours + 60 * torch.rand(count, 3, 1024, generator=g)).clamp(0, 255).to(torch.uint8)
        entry = {"data": data.flatten(1).numpy(), "fine_labels" if hundred else "labels": labels.tolist()}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, kind.meta["filename"]), "wb") as f:
        pickle.dump({kind.meta["key"]: [f"class{i}" for i in range(100 if hundred else 10)]}, f)


@pytest.fixture(scope="module")
def named_data(tmp_path_factory):
    """A --data-dir with MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 files as torchvision's downloads lay them out."""
    root = str(tmp_path_factory.mktemp("datasets"))
    write_mnist(root)
    write_mnist(root, "FashionMNIST", train_images=40, test_images=20, seed=1)
    write_cifar(root)
    write_cifar(root, hundred=True)
    return root


@pytest.fixture
def cifar_files(monkeypatch):
    """CIFAR's files written here lack the downloads' checksums, which torchvision checks before reading them."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)


def approximate_json(folder):
    with open(os.path.join(folder, "approximate.json")) as f:
        return {(record["run"], record["mode"]): record for record in json.load(f)}


@torch.no_grad()
def vit_tokens(model, images):
    """By hand, with hooks: [h_0, ..., h_n] of a torchvision ViT's encoder on a batch, each (B, tokens, C)."""
    layers, outputs = model.encoder.layers, []
    hooks = [layers[0].register_forward_pre_hook(lambda module, inputs: outputs.append(inputs[0]))]
    hooks += [layer.register_forward_hook(lambda module, inputs, output: outputs.append(output)) for layer in layers]
    model.eval()(images)
    for hook in hooks:
        hook.remove()
    return outputs


def mnist_images(root, split="train"):
    """By hand: MNIST as analyze.py reads it for a model without weights: RGB, resized to 32 / 0.875, cropped to 32."""
    images = torchvision.datasets.MNIST(root, train=split == "train")
    transform = train.eval_transform(32, "bicubic")
    return torch.stack([transform(image.convert("RGB")) for image, _ in images]), images.targets


@pytest.mark.parametrize("model, stages", [
    ("tiny_vit", [5]), ("timm_layout_vit", [4]), ("tiny_swin", [3, 3, 3, 3]), ("tiny_swin_v2", [3, 3, 3, 3]),
    ("tiny_convnext", [3, 3, 4]), ("resnet18", [3, 2, 2, 2]),   # ResNet: a layer's first block may downsample
])
def test_every_family_is_stages_of_same_shaped_blocks_and_keeps_its_classifier(model, stages, hub, tiny_data,
                                                                                 tmp_path):
    """Each family's stages (h_0..h_n of same-shaped blocks), and its own classifier run from its blocks: the
    top-1 and loss of `evaluate --probe head` of a state_dict (--checkpoint) are those of the model's own forward."""
    spec = model if model == "resnet18" else f"{hub}:{model}"
    network = analyze.create(spec).eval()
    torch.save(network.state_dict(), tmp_path / "weights.pth")
    common = ["--model", spec, "--checkpoint", str(tmp_path / "weights.pth"), "--data", tiny_data, "--image-size",
              "32", *FAST, "--batch-size", "8"]
    matrices = analyze.main(["redundancy", *common, "--calibration-images", "8", "--output-dir", str(tmp_path)])
    assert [len(m) for m in matrices["BR"].values()] == stages
    assert all((m.diagonal() == 0).all() and (m <= 0).all() for m in matrices["BR"].values())
    metrics = analyze.main(["evaluate", *common, "--probe", "head"])
    images, labels = torch.utils.data.default_collate(list(train.image_folder(
        tiny_data, "val", train.eval_transform(32, "bicubic"))))
    with torch.no_grad():
        logits = network(images)
    assert metrics["top1"] == 100 * (logits.argmax(1) == labels).sum().item() / len(labels)
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_block_redundancy_of_a_vit_compares_its_cls_tokens(hub, named_data, tmp_path):
    """BR, linear CKA and cosine of a ViT are those of its [CLS] tokens (first, before the final norm), over the
    calibration images: here all 300 MNIST training images, grayscale read as 3 channels."""
    matrices = analyze.main(["redundancy", "--model", f"{hub}:tiny_vit", "--data", "mnist", "--data-dir", named_data,
                             *FAST, "--output-dir", str(tmp_path)])
    images, _ = mnist_images(named_data)
    cls = [h[:, 0].double() for h in vit_tokens(analyze.create(f"{hub}:tiny_vit"), images)]
    br, cka, cosine = (matrices[metric][1] for metric in analyze.METRICS)
    for a, b in itertools.combinations(range(5), 2):
        torch.testing.assert_close(br[a, b], -((cls[a] - cls[b]) ** 2).sum(1).mean())
        torch.testing.assert_close(cosine[a, b], torch.nn.functional.cosine_similarity(cls[a], cls[b]).mean())
        if a == 0:  # h_0's [CLS] is the same for every image: no covariance
            continue
        x, y = cls[a] - cls[a].mean(0), cls[b] - cls[b].mean(0)
        torch.testing.assert_close(cka[a, b], (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_identity_blocks_are_redundant_and_approximating_exactly_them_keeps_the_accuracy(hub, named_data, tmp_path):
    """Blocks 2 and 3 of the ViT are identities: BR(h1, h3) = 0 and the fit h1 -> h3 is exact, so replacing exactly
    those blocks (1:1-3) keeps the probe's accuracy and loss, skipping them too; replacing blocks 1-2 from h_0 does
    not. The saved approximation evaluates as the run did."""
    common = ["--model", f"{hub}:identity_vit", "--data", "mnist", "--data-dir", named_data, *FAST,
              "--output-dir", str(tmp_path)]
    br = analyze.main(["redundancy", *common])["BR"][1]
    assert br[1, 2] == br[1, 3] == br[2, 3] == 0 and br[0, 1] < 0 and br[3, 4] < 0
    results = analyze.main(["approximate", *common, "--blocks", "1:1-3", "--latency-rounds", "1"])
    records = approximate_json(tmp_path)
    assert set(records) == {(None, "original"), ("1:1-3", "linear"), ("1:1-3", "skip")}
    original, linear = records[None, "original"], records["1:1-3", "linear"]
    assert linear["score"] < 1e-9 and 10 < original["top1"] < 100                           # the fit residual
    for mode in ("linear", "skip"):
        assert records["1:1-3", mode]["top1"] == original["top1"] and records["1:1-3", mode]["delta"] == 0
        assert records["1:1-3", mode]["loss"] == pytest.approx(original["loss"], rel=1e-5)
    block, translator = 4 * 64 * 64 + 4 * 64 + 2 * 64 * 128 + 128 + 64 + 4 * 64, 64 * 64 + 64  # two blocks out, T in
    assert linear["params"] == pytest.approx(original["params"] - (2 * block - translator) / 1e6, abs=1e-9)
    assert results[(1, 1, 3), "linear"]["top1"] == linear["top1"]
    metrics = analyze.main(["evaluate", "--checkpoint", str(tmp_path / "approximated.pth"), "--data-dir", named_data,
                            *FAST])
    assert metrics["top1"] == linear["top1"] and metrics["loss"] == pytest.approx(linear["loss"], rel=1e-6)
    analyze.main(["approximate", *common, "--blocks", "1:0-2", "--latency-rounds", "1"])
    assert approximate_json(tmp_path)["1:0-2", "linear"]["loss"] != pytest.approx(original["loss"], rel=1e-3)


def test_the_probe_is_the_papers_and_seeded(hub, named_data, capsys):
    """The linear probe trains by train.py's Trainer as the BR paper's: Adam at lr 0.01, 5 epochs of batch 256 (the
    MLP probe: lr 1e-3, 50 epochs); the same features and seed give the same top-1 and loss, another seed not."""
    common = ["evaluate", "--model", f"{hub}:tiny_vit", "--data", "mnist", "--data-dir", named_data, *FAST]
    first, again = analyze.main(common), analyze.main(common)
    printed = capsys.readouterr().out
    assert first == again and first["images"] == 60
    assert "global batch 256 = 256 per process" in printed and "peak lr 1.00e-02" in printed
    assert "1 steps per epoch, 5 in all" in printed
    assert analyze.main([*common, "--seed", "1"])["loss"] != first["loss"]
    analyze.main([*common, "--probe", "mlp"])
    printed = capsys.readouterr().out
    assert "peak lr 1.00e-03" in printed and "1 steps per epoch, 50 in all" in printed


def test_fit_on_fits_the_map_on_another_datasets_training_images(hub, named_data, tmp_path, cifar_files):
    """The BR paper's Table 3: with --fit-on cifar10, T is the least-squares map h_1 -> h_3 of every token of
    CIFAR-10's training images, not of MNIST's; the probe still trains and evaluates on MNIST."""
    analyze.main(["approximate", "--model", f"{hub}:tiny_vit", "--data", "mnist", "--fit-on", "cifar10",
                  "--data-dir", named_data, "--blocks", "1:1-3", *FAST, "--output-dir", str(tmp_path),
                  "--latency-rounds", "1"])
    saved = torch.load(tmp_path / "approximated.pth")["model"]
    transform = train.eval_transform(32, "bicubic")
    cifar = torch.stack([transform(image) for image, _ in torchvision.datasets.CIFAR10(named_data)])
    model = analyze.create(f"{hub}:tiny_vit")
    for images, fitted in ((cifar, True), (mnist_images(named_data)[0], False)):
        h = [t.flatten(0, 1).double() for t in vit_tokens(model, images)]
        expected, _ = least_squares_by_hand(h[1], h[3])
        with torch.no_grad():
            mapped = torch.nn.functional.linear(h[1].float(), saved["encoder.layers.encoder_layer_1.weight"],
                                                saved["encoder.layers.encoder_layer_1.bias"]).double()
        assert torch.allclose(mapped, expected, atol=1e-3 * float(expected.abs().max())) == fitted
    assert approximate_json(tmp_path)[None, "original"]["loss"] == pytest.approx(analyze.main([
        "evaluate", "--model", f"{hub}:tiny_vit", "--data", "mnist", "--data-dir", named_data, *FAST])["loss"])


def test_named_datasets_are_read_in_torchvisions_layouts(named_data, cifar_files):
    """MNIST's and Fashion-MNIST's idx files (grayscale, read as RGB), CIFAR-10's and CIFAR-100's pickles."""
    read = lambda name, split="train": analyze.dataset(name, split, v2.Identity(), named_data)  # noqa: E731
    assert len(read("mnist")) == 300 and len(read("mnist", "val")) == 60 and len(read("fashion-mnist")) == 40
    image, label = read("fashion-mnist")[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 3
    assert len(read("cifar100").classes) == 100 and len(read("cifar10", "val")) == 20


def test_downloads_that_fail_offline_name_what_to_put_where(hub, tmp_path, monkeypatch):
    """Offline, a named dataset that is not in --data-dir, or torchvision weights not in the hub cache, end in one
    line naming the files and where they go; unknown weights name torchvision's."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    empty = str(tmp_path / "empty")
    expected = {"mnist": f"train-images-idx3-ubyte.gz, .* into {empty}/MNIST/raw",
                "cifar100": f"cifar-100-python.tar.gz \\(https://www.cs.toronto.edu/.*\\) into {empty}$"}
    for name, files in expected.items():
        with pytest.raises(glnet.InputError, match=f"{name} is not in {empty} and cannot be downloaded .*; put {files}") as e:
            analyze.main(["evaluate", "--model", f"{hub}:tiny_vit", "--data", name, "--data-dir", empty, *FAST])
        assert "\n" not in str(e.value)
    with pytest.raises(glnet.InputError, match=r"cannot download resnet18's weights .*; download https://download\.pytorch"
                                         rf"\.org/models/resnet18-.*\.pth into {tmp_path}/torch/hub/checkpoints/"):
        analyze.main(["evaluate", "--model", "resnet18", "--weights", "DEFAULT", "--data", "x", *FAST])
    with pytest.raises(glnet.InputError, match=r"cannot download facebookresearch/dinov2:dinov2_vits14's code or weights "
                                               r".*; download the repository and pass its folder as --model FOLDER:ENTRY"):
        analyze.main(["evaluate", "--model", "facebookresearch/dinov2:dinov2_vits14", "--data", "x", *FAST])
    with pytest.raises(glnet.InputError, match="--weights V9: resnet18's weights are IMAGENET1K_V1, DEFAULT"):
        analyze.main(["evaluate", "--model", "resnet18", "--weights", "V9", "--data", "x", *FAST])


# =================================================================================================
# detect_seg.py
# =================================================================================================

QUIET = ["--workers", "0", "--print-freq", "1"]
SMALL_DETECTOR = ["--min-size", "96", "--max-size", "160", "--fpn-channels", "32", "--rois-per-image", "32", *QUIET]
SEGMENTATION = ["--task", "semfpn", "--crop-size", "64", "--scale", "80", "--fpn-channels", "32", *QUIET]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A cache folder holding tiny synthetic scenes where detect_seg.py looks for them."""
    cache = tmp_path_factory.mktemp("cache")
    detect_seg.make_scenes_dataset(str(cache / detect_seg.SCENES_VERSION), splits={"train": 12, "val": 4})
    return cache


@pytest.fixture(scope="module")
def scenes(cache_dir):
    return str(cache_dir / detect_seg.SCENES_VERSION)


def dense_trainer(task, argv):
    """The Trainer of a run of `task` with these flags, built as main builds it."""
    args, given, _ = detect_seg.parse_args(argv)
    return detect_seg.make_trainer(detect_seg.make_settings(task, given), 0, 1, CPU)


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_detect_seg(args, launcher=(sys.executable,), script=os.path.join(HERE, "detect_seg.py"), timeout=300):
    result = subprocess.run([*launcher, script, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def drawn_differs(image, output):
    drawn, original = np.array(Image.open(output)), np.array(Image.open(image).convert("RGB"))
    return drawn.shape == original.shape and (drawn != original).any()


# --- data: the scenes, COCO and ADE20K folders, bad input ----------------------------------------

def test_synthetic_scenes_are_consistent(scenes):
    coco = COCO(os.path.join(scenes, "annotations", "instances_train2017.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(detect_seg.SCENE_CLASSES)
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = np.array(Image.open(os.path.join(scenes, "train2017", info["file_name"])))
        semantic = np.array(Image.open(os.path.join(scenes, "semantic", "train2017", info["file_name"])))
        assert image.shape == (info["height"], info["width"], 3) and semantic.shape == image.shape[:2]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert annotations, "every synthetic scene has at least one shape"
        for ann in annotations:
            mask = mask_util.decode(ann["segmentation"])
            ys, xs = np.nonzero(mask)
            assert mask.sum() == ann["area"] > 0
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (semantic[mask > 0] == ann["category_id"] + 1).all()  # label 1 = background
        instances = sum(mask_util.decode(a["segmentation"]) for a in annotations)
        assert (semantic[instances == 0] == 1).all() and instances.max() == 1


def ade20k_folder(root, train_sizes, val_sizes, label=None):
    """ADEChallengeData2016's layout with grey images of the given (H, W) sizes and labels of class 1 (or `label`)."""
    for split, sizes in (("training", train_sizes), ("validation", val_sizes)):
        for kind in ("images", "annotations"):
            os.makedirs(root / kind / split)
        for i, (height, width) in enumerate(sizes):
            Image.new("RGB", (width, height), (90, 90, 90)).save(root / "images" / split / f"{i:04d}.jpg")
            Image.fromarray(np.ones((height, width), np.uint8) if label is None else label).save(
                root / "annotations" / split / f"{i:04d}.png")
    return str(root)


def test_bad_dense_data_and_flags_are_named_before_training(tmp_path, scenes, cache_dir, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    coco = tmp_path / "coco"
    os.makedirs(coco / "annotations")
    with pytest.raises(glnet.InputError, match="instances_train2017.json not found: expected the COCO 2017 layout"):
        detect_seg.main(["--task", "maskrcnn", "--data", str(coco), *out])
    ann_file = coco / "annotations" / "instances_train2017.json"
    ann_file.write_text(open(os.path.join(scenes, "annotations", "instances_train2017.json")).read())
    with pytest.raises(glnet.InputError, match="train2017 not found: expected the COCO 2017 layout"):
        detect_seg.main(["--task", "maskrcnn", "--data", str(coco), *out])
    os.symlink(os.path.join(scenes, "train2017"), coco / "train2017")
    ann_file.write_text(ann_file.read_text()[:500])  # truncated
    with pytest.raises(glnet.InputError, match=f"{ann_file} is not valid JSON .*expected a COCO instances file"):
        detect_seg.main(["--task", "maskrcnn", "--data", str(coco), *out])
    ann_file.write_text(json.dumps({"images": []}))
    with pytest.raises(glnet.InputError, match="has no 'annotations', 'categories' entry"):
        detect_seg.main(["--task", "maskrcnn", "--data", str(coco), *out])

    ade = tmp_path / "ade"
    os.makedirs(ade / "images" / "training")
    with pytest.raises(glnet.InputError, match="annotations/training not found; expected the ADEChallengeData2016"):
        detect_seg.main(["--task", "semfpn", "--data", str(ade), *out])
    ade = ade20k_folder(tmp_path / "ade2", [(40, 30), (40, 30)], [(40, 30)])
    os.remove(os.path.join(ade, "annotations", "training", "0001.png"))
    with pytest.raises(glnet.InputError, match="1 image.* have no label PNG in .*annotations/training, e.g. 0001.png"):
        detect_seg.main(["--task", "semfpn", "--data", ade, *out])
    wrong = os.path.join(ade, "annotations", "training", "0001.png")
    Image.fromarray(np.ones((30, 40), np.uint8)).save(wrong)
    with pytest.raises(glnet.InputError, match=f"label {wrong} is 40x30 but its image .*0001.jpg is 30x40"):
        detect_seg.main(["--task", "semfpn", "--data", ade, *out])

    with pytest.raises(glnet.InputError, match="12 training images are fewer than one global batch of 16"):
        detect_seg.main([*SEGMENTATION, "--cache-dir", str(cache_dir), *out, "--batch-size", "8", "--accum-steps", "2"])
    classifier = tmp_path / "classifier.pth"
    torch.save({"model": glnet.create_model("glnet_mini", num_classes=3).state_dict(), "task": "classification",
                "args": {"model": "glnet_mini"}, "num_classes": 3}, classifier)
    with pytest.raises(glnet.InputError, match="names the task None, not one of maskrcnn, .*: not detect_seg.py's"):
        detect_seg.main(["--eval", "--checkpoint", str(classifier)])
    assert not (tmp_path / "out").exists()
    for argv, message in ((["--data", str(coco)], "--task is required with --data"), (["--task", "yolo"], "invalid choice"),
                          (["--crop-size", "16"], "must be at least 32")):
        with pytest.raises(SystemExit):
            detect_seg.parse_args(argv)
        assert message in capsys.readouterr().err


def test_training_skips_crowds_empty_boxes_and_unannotated_images(tmp_path, scenes):
    """As torchvision's detection reference: crowd regions and boxes without area never reach the loss, and an
    image left without annotations is not drawn. Evaluation keeps every validation image."""
    with open(os.path.join(scenes, "annotations", "instances_train2017.json")) as f:
        data = json.load(f)
    first, second, third = (image["id"] for image in data["images"][:3])
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    empty = dict(copy.deepcopy(next(a for a in data["annotations"] if a["image_id"] == second)), id=10 ** 6)
    empty["bbox"][2] = 0.0
    crowd = [dict(a, iscrowd=1) for a in data["annotations"] if a["image_id"] == third]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != third] + [empty] + crowd
    os.makedirs(tmp_path / "annotations")
    with open(tmp_path / "annotations" / "instances_train2017.json", "w") as f:
        json.dump(data, f)
    shutil.copy(os.path.join(scenes, "annotations", "instances_val2017.json"), tmp_path / "annotations")
    for split in ("train2017", "val2017"):
        os.symlink(os.path.join(scenes, split), tmp_path / split)

    trainer = dense_trainer("maskrcnn", ["--task", "maskrcnn", "--data", str(tmp_path), "--output-dir",
                                         str(tmp_path / "out"),
                                         "--batch-size", "1", "--model", "glnet_mini", *SMALL_DETECTOR])
    train_set = trainer.task.train_set
    image_ids = [train_set[i][1]["image_id"] for i in range(len(train_set))]
    assert len(train_set) == len(data["images"]) - 2 and first not in image_ids and third not in image_ids
    _, target = train_set[image_ids.index(second)]
    boxes = target["boxes"]
    assert len(boxes) == len(target["masks"]) == len(target["labels"]) == sum(
        a["image_id"] == second for a in data["annotations"]) - 1
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert len(trainer.task.evaluate.keywords["dataset"]) == 4


def rectangle(x, y, w, h, **fields):
    """A COCO annotation of a box (XYWH, may run past the image) whose polygon is the same rectangle."""
    return dict(bbox=[x, y, w, h], segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]], area=w * h,
                category_id=1, iscrowd=0) | fields


def test_training_keeps_every_object_overlapping_the_image_its_box_clipped(tmp_path):
    """MMDetection's CocoDataset rule on real files: an object whose box runs past an edge (40 px, 0.4 px, the
    left edge, all four, 0.4 px of it inside) trains with its box clipped to the image; a box outside the image or
    under 1 px wide, and a crowd region, do not; an image left with none is not drawn. Masks stay as they are."""
    sizes = {1: (100, 80), 2: (60, 90), 3: (50, 50)}   # (W, H)
    boxes = {1: [(10, 10, 30, 20), (20, 40, 120, 30), (50, 5, 30, 75.4), (-15, 20, 25, 10), (99.6, 50, 10, 10),
                 (100, 10, 20, 20), (30, 90, 10, 10), (5, 60, 0.5, 10)], 2: [(-10, -10, 200, 200), (70, 0, 10, 10)],
             3: [(50, 0, 5, 5)]}
    annotations = [rectangle(*box, image_id=i) for i, image_boxes in boxes.items() for box in image_boxes]
    annotations.append(rectangle(10, 10, 50, 50, image_id=1, iscrowd=1))
    coco = dict(images=[dict(id=i, file_name=f"{i:06d}.jpg", width=w, height=h) for i, (w, h) in sizes.items()],
                annotations=[dict(a, id=k + 1) for k, a in enumerate(annotations)],
                categories=[dict(id=1, name="car")])
    for split in ("train2017", "val2017"):
        os.makedirs(tmp_path / split)
        for i, (w, h) in sizes.items():
            Image.new("RGB", (w, h), (100, 120, 140)).save(tmp_path / split / f"{i:06d}.jpg")
    os.makedirs(tmp_path / "annotations")
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))

    trainer = dense_trainer("maskrcnn", ["--task", "maskrcnn", "--data", str(tmp_path), "--output-dir",
                                         str(tmp_path / "out"), "--batch-size", "2", "--model", "glnet_mini",
                                         *SMALL_DETECTOR])
    clipped = {1: [[10, 10, 40, 30], [20, 40, 100, 70], [50, 5, 80, 80], [0, 20, 10, 30], [99.6, 50, 100, 60]],
               2: [[0, 0, 60, 90]]}
    train_set = trainer.task.train_set
    assert len(train_set) == 2
    for image, target in (train_set[i] for i in range(len(train_set))):
        width, expected = image.shape[-1], torch.tensor(clipped[target["image_id"]], dtype=torch.float32)
        flipped = torch.stack([width - expected[:, 2], expected[:, 1], width - expected[:, 0], expected[:, 3]], 1)
        assert any(torch.allclose(target["boxes"].float(), e, atol=1e-4) for e in (expected, flipped)), target["boxes"]
        assert len(target["masks"]) == len(target["labels"]) == len(expected)
        assert target["masks"][:4].flatten(1).any(1).all()   # the objects' pixels, as the polygons give them
    loss = trainer.task.loss(trainer.model.train(), trainer.task.collate_fn([train_set[0], train_set[1]]))
    assert torch.isfinite(loss)   # a box 0.4 px wide trains too


@pytest.fixture(scope="module")
def coco_categories(tmp_path_factory, scenes):
    """(COCO folder, categories): the scenes on COCO's 80 categories (ids 1-90 with gaps), their shapes as person (1),
    car (3) and toothbrush (90)."""
    coco_names = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]   # index = COCO id, "N/A" = no category
    categories = [dict(id=i, name=name) for i, name in enumerate(coco_names) if name not in ("__background__", "N/A")]
    ids, folder = {1: 1, 2: 3, 3: 90}, tmp_path_factory.mktemp("coco")   # the scenes' square, circle, triangle
    os.makedirs(folder / "annotations")
    for split in ("train", "val"):
        with open(os.path.join(scenes, "annotations", f"instances_{split}2017.json")) as f:
            data = json.load(f)
        data.update(categories=categories, annotations=[dict(a, category_id=ids[a["category_id"]])
                                                        for a in data["annotations"]])
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
        os.symlink(os.path.join(scenes, f"{split}2017"), folder / f"{split}2017")
    return str(folder), categories


def record_coco_results(monkeypatch):
    """The COCO results that evaluation hands pycocotools, as they are scored."""
    records = []

    class RecordingCOCOeval(COCOeval):
        def __init__(self, ground_truth, detections, iou_type):
            records.extend(detections.dataset["annotations"])
            super().__init__(ground_truth, detections, iou_type)

    monkeypatch.setattr(detect_seg, "COCOeval", RecordingCOCOeval)
    return records


def test_detectors_predict_only_the_datasets_categories(tmp_path, scenes, coco_categories, capsys, monkeypatch):
    """On COCO's 80 categories (ids 1-90 with gaps), the scenes' shapes as person (1), car (3) and toothbrush (90):
    the heads have a class per category (and Mask R-CNN's background), as the paper's parameter counts assume; the
    targets carry contiguous labels; evaluation records, --predict and the checkpoint's class names carry the ids."""
    folder, categories = coco_categories
    records = record_coco_results(monkeypatch)
    coco_ids, trainers = {c["id"] for c in categories}, {}
    for task, first_label in (("maskrcnn", 1), ("retinanet", 0)):
        trainer = trainers[task] = dense_trainer(task, ["--task", task, "--data", folder,
                                                        "--output-dir", str(tmp_path), *SMALL_DETECTOR])
        model, train_set = trainer.model, trainer.task.train_set
        assert trainer.task.num_classes == detect_seg.TASKS[task].report_classes == 80 + first_label
        assert set(trainer.task.classes) == coco_ids
        heads = (model.roi_heads.box_predictor.cls_score.out_features,
                 model.roi_heads.mask_predictor.mask_fcn_logits.out_channels) if task == "maskrcnn" else (
                     model.head.classification_head.num_classes,)
        assert set(heads) == {80 + first_label}
        seen = []
        batch = trainer.task.collate_fn([train_set[i] for i in range(len(train_set))])
        trainer.task.loss(lambda images, targets: seen.extend(targets) or {"loss": torch.zeros(())}, batch)
        label = {1: first_label, 3: first_label + 2, 90: first_label + 79}   # the ids' ranks among COCO's 80
        for target, labelled in zip(batch[1], seen):
            assert labelled["labels"].tolist() == [label[c] for c in target["labels"].tolist()]
        assert {c for t in batch[1] for c in t["labels"].tolist()} == {1, 3, 90}
        records.clear()
        setattr(model.roi_heads if task == "maskrcnn" else model, "score_thresh", 0.0)   # every label is scored
        trainer.task.evaluate(model)
        assert len(records) > 100 and {r["category_id"] for r in records} <= coco_ids

    classifier = trainers["maskrcnn"].model.roi_heads.box_predictor.cls_score
    with torch.no_grad():   # whatever a proposal is, the box head finds a toothbrush, the last label
        classifier.weight.zero_()
        classifier.bias.copy_(20.0 * (torch.arange(81) == 80))
    trainers["maskrcnn"].save()
    assert torch.load(tmp_path / "maskrcnn" / "last.pth")["classes"] == {c["id"]: c["name"] for c in categories}
    image = os.path.join(scenes, "val2017", sorted(os.listdir(os.path.join(scenes, "val2017")))[0])
    capsys.readouterr()
    detect_seg.main(["--predict", image, "--checkpoint", str(tmp_path / "maskrcnn" / "last.pth"),
                     "--predict-output", str(tmp_path / "drawn.png")])
    captions = capsys.readouterr().out.split(": ")[2].split("; drawn")[0].split(", ")
    assert len(captions) > 10 and set(captions) == {"toothbrush 1.00"}


@pytest.mark.parametrize("task", ["maskrcnn", "retinanet"])
def test_detectors_with_a_class_per_coco_id_load_with_their_categories_rows(task, scenes, coco_categories, tmp_path,
                                                                           capsys, monkeypatch):
    """A detector saved while its heads had a class per id up to the largest (COCO: 91, row 0 the background) loads
    for --predict and --eval with its categories' rows, as the heads have them now: the same boxes, scores and masks,
    each labelled with its category."""
    folder, categories = coco_categories
    settings = dataclasses.asdict(detect_seg.make_settings(task, detect_seg.parse_args(SMALL_DETECTOR)[1]))
    torch.manual_seed(0)
    old = detect_seg.build_model(settings, 91).eval()
    classifier = old.roi_heads.box_predictor.cls_score if task == "maskrcnn" else old.head.classification_head.cls_logits
    with torch.no_grad():   # whatever a box is, it is a toothbrush (row 90, after RetinaNet's every anchor)
        classifier.weight.zero_()
        classifier.bias.copy_(torch.where(torch.arange(len(classifier.bias)) % 91 == 90, 8.0, -100.0))
    path, ema = tmp_path / "old.pth", torch.optim.swa_utils.AveragedModel(old).state_dict()   # loaded, as preferred
    torch.save({"model": old.state_dict(), "model_ema": ema, "task": task, "args": settings, "num_classes": 91,
                "classes": {c["id"]: c["name"] for c in categories}}, path)
    image = os.path.join(scenes, "val2017", sorted(os.listdir(os.path.join(scenes, "val2017")))[0])
    detect_seg.main(["--predict", image, "--checkpoint", str(path), "--predict-output", str(tmp_path / "drawn.png")])
    assert set(capsys.readouterr().out.split(": ")[2].split("; drawn")[0].split(", ")) == {"toothbrush 1.00"}
    records = record_coco_results(monkeypatch)
    detect_seg.main(["--eval", "--checkpoint", str(path), "--data", folder])
    assert records and {r["category_id"] for r in records} == {90}

    x = v2.functional.pil_to_tensor(Image.open(image).convert("RGB")).float() / 255
    model, checkpoint = train.load_trained(str(path), detect_seg.build_model, detect_seg.read_checkpoint)
    with torch.no_grad():
        expected, found = old([x])[0], model([x])[0]
    assert expected["labels"].eq(90).all() and len(found["labels"]) > 10
    assert detect_seg.label_categories(task, checkpoint["classes"])[found["labels"]].eq(90).all()
    for key in expected.keys() - {"labels"}:   # boxes, scores and Mask R-CNN's masks
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0)


# --- models ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["maskrcnn", "retinanet"])
def test_detector_forward_backward(scenes, cache_dir, tmp_path, task):
    trainer = dense_trainer(task, ["--cache-dir", str(cache_dir), "--output-dir", str(tmp_path), "--batch-size", "2",
                                   *SMALL_DETECTOR])
    images, targets = next(iter(trainer.train_loader))
    model, categories = trainer.model.train(), detect_seg.label_categories(task, trainer.task.classes)
    losses = model(list(images), [{k: v for k, v in t.items() if k != "image_id"} | {
        "labels": torch.searchsorted(categories, t["labels"])} for t in targets])   # category ids -> labels
    expected = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} \
        if task == "maskrcnn" else {"classification", "bbox_regression"}
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem = model.backbone.body.downsample_layers[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0

    model.eval()
    odd = [torch.rand(3, 97, 131), torch.rand(3, 120, 88)]
    with torch.no_grad():
        outputs = model(odd)
    for image, output in zip(odd, outputs):
        assert output["boxes"].shape[1] == 4 and len(output["boxes"]) == len(output["scores"]) == len(output["labels"])
        if task == "maskrcnn":
            assert output["masks"].shape[1:] == (1, *image.shape[1:])


def small_model(task, num_classes, **settings):
    """The model of the synthetic recipe of `task`, as build_model makes it from a run's settings."""
    args, given, _ = detect_seg.parse_args(QUIET)
    return detect_seg.build_model(dataclasses.asdict(detect_seg.make_settings(task, given)) | settings, num_classes)


def test_grad_checkpointing_flag_of_the_dense_tasks(cache_dir, tmp_path, checkpointed_blocks):
    detect_seg.main([*SEGMENTATION, "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path), "--batch-size", "4",
                     "--iters", "1", "--grad-checkpointing"])
    assert checkpointed_blocks.count(True) == 6  # glnet_mini's 6 blocks in the one training step
    assert glnet.read_checkpoint(str(tmp_path / "semfpn" / "last.pth"))["args"]["grad_checkpointing"] is True


def test_semantic_fpn_forward_backward():
    torch.manual_seed(0)
    model = small_model("semfpn", 5)
    images = torch.rand(2, 3, 65, 97)  # not a multiple of 32
    logits = model(images)
    assert logits.shape == (2, 5, 65, 97)
    labels = torch.randint(0, 5, (2, 65, 97))
    labels[:, :10] = detect_seg.IGNORE_INDEX
    torch.nn.functional.cross_entropy(logits, labels, ignore_index=detect_seg.IGNORE_INDEX).backward()
    for module in (model.backbone.body.stages[0], model.scale_heads[3], model.classifier):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_upernet_returns_the_auxiliary_logits_and_loss_in_training_only(cache_dir, tmp_path):
    trainer = dense_trainer("upernet", ["--cache-dir", str(cache_dir), "--output-dir", str(tmp_path),
                                        "--fpn-channels", "32", *QUIET])
    model, loss_of = trainer.model, trainer.task.loss
    images, labels = torch.rand(2, 3, 65, 97), torch.randint(0, 4, (2, 65, 97))
    labels[:, :10] = detect_seg.IGNORE_INDEX
    cross_entropy = lambda logits: torch.nn.functional.cross_entropy(  # noqa: E731
        logits, labels, ignore_index=detect_seg.IGNORE_INDEX)

    torch.manual_seed(1)  # the same dropout masks in both forward passes
    loss = loss_of(model.train(), (images, labels))
    torch.manual_seed(1)
    logits, auxiliary = model(images)
    assert logits.shape == auxiliary.shape == (2, 4, 65, 97)
    torch.testing.assert_close(loss, cross_entropy(logits) + 0.4 * cross_entropy(auxiliary))
    loss.backward()
    for module in (model.backbone.stages[0], model.psp_modules[0], model.lateral_convs[0], model.auxiliary_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    with torch.no_grad():
        logits = model.eval()(images)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4, 65, 97)
        assert loss_of(model, (images, labels)) == cross_entropy(logits)


def test_retinanet_p6_comes_from_c5():
    """As in MMDetection's RetinaNet: P6 is a strided conv on C5, also when C5 is as wide as the FPN
    (glnet_mini's C5 has 256 channels), where torchvision's LastLevelP6P7 would take P5."""
    fpn = small_model("retinanet", 4, fpn_channels=256).backbone.eval()
    inputs = []
    fpn.fpn.extra_blocks.p6.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        levels = fpn(x)
        c5 = fpn.body.forward_features(x)[3]
    assert list(levels) == ["0", "1", "2", "p6", "p7"] and torch.equal(inputs[0], c5)


def test_fpn_levels_and_strides():
    fpn = small_model("maskrcnn", 4, fpn_channels=32).backbone
    features = fpn(torch.rand(1, 3, 100, 132))
    assert [tuple(f.shape) for f in features.values()] == [(1, 32, 25, 33), (1, 32, 13, 17), (1, 32, 7, 9),
                                                           (1, 32, 4, 5), (1, 32, 2, 3)]


def test_pretrained_backbone_is_loaded_and_the_detectors_freeze_its_batchnorms(cache_dir, tmp_path):
    """--pretrained loads any ImageNet GLNet checkpoint (here an EMA one) into the backbone; the detectors
    freeze its BatchNorms at the checkpoint's statistics and affine: with all of them random, the frozen
    backbone computes what the checkpoint's model computes in eval mode, in training mode too."""
    torch.manual_seed(0)
    classifier = glnet.create_model("glnet_mini", num_classes=10)
    norms = [m for m in classifier.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.normal_()
            norm.bias.normal_()
    torch.save({"model_ema": classifier.state_dict()}, tmp_path / "imagenet.pth")
    args = ["--cache-dir", str(cache_dir), "--output-dir", str(tmp_path), "--pretrained",
            str(tmp_path / "imagenet.pth")]
    body = dense_trainer("maskrcnn", args + SMALL_DETECTOR).model.backbone.body
    assert torch.equal(body.stages[2].blocks[0].slot_mhsa.in_proj_weight,
                       classifier.stages[2].blocks[0].slot_mhsa.in_proj_weight)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == len(norms) - 1  # all but the head's
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.eval().forward_features(x)
        for mode in (False, True):
            for actual, wanted in zip(body.train(mode).forward_features(x), expected):
                torch.testing.assert_close(actual, wanted)
    segmentation = dense_trainer("semfpn", args + SEGMENTATION[2:]).model.backbone.body
    assert sum(isinstance(m, nn.BatchNorm2d) for m in segmentation.modules()) == len(norms) - 1  # they train

    with pytest.raises(glnet.InputError, match="nothere.pth"):
        dense_trainer("maskrcnn", [*args[:-1], str(tmp_path / "nothere.pth"), *SMALL_DETECTOR])
    with pytest.raises(glnet.InputError, match="missing"):
        dense_trainer("maskrcnn", [*args, *SMALL_DETECTOR, "--model", "glnet_4g"])


# Parameters (M) with COCO's 80 classes and ADE20K's 150: the paper's Tables 4 and 5 (RetinaNet: the
# paper prints 37 / 70; 36.7 / 70.2 is MMDetection's RetinaNet, P6 on C5), UperNet with its auxiliary head.
DENSE_PARAMS = {("retinanet", "glnet_4g"): 36.7, ("retinanet", "glnet_9g"): 70.2, ("maskrcnn", "glnet_4g"): 46.6,
                ("maskrcnn", "glnet_9g"): 79.5, ("semfpn", "glnet_4g"): 30.7, ("semfpn", "glnet_9g"): 63.6,
                ("upernet", "glnet_4g"): 56.8, ("upernet", "glnet_9g"): 91.7}
# GFLOPs (Tables 4 and 5), which the paper prints as integers.
DENSE_GFLOPS = {("retinanet", "glnet_4g"): 214, ("retinanet", "glnet_9g"): 292, ("maskrcnn", "glnet_4g"): 233,
                ("maskrcnn", "glnet_9g"): 311, ("semfpn", "glnet_4g"): 150, ("semfpn", "glnet_9g"): 230,
                ("upernet", "glnet_4g"): 907, ("upernet", "glnet_9g"): 988}


@pytest.mark.parametrize("task, backbone", list(DENSE_PARAMS))
def test_dense_models_have_the_papers_parameters_and_flops(task, backbone):
    """On the meta device (shapes only): the paper's parameter counts, and, as MMCV's counter (the paper's tools)
    counts them, its GFLOPs, all within rounding but UperNet with glnet_9g (988.5 for 988)."""
    settings = dataclasses.asdict(detect_seg.DenseSettings()) | detect_seg.TASKS[task].paper | dict(
        task=task, model=backbone)
    classes = 81 if task == "maskrcnn" else 80 if task == "retinanet" else 150
    size = (800, 1280) if task in ("maskrcnn", "retinanet") else (512, 2048)
    with torch.device("meta"):
        model = detect_seg.CountedForward(task, detect_seg.build_model(settings, classes))
        gflops = detect_seg.mmcv_flops(model, torch.zeros(1, 3, *size)) / 1e9
    assert glnet.count_params(model) / 1e6 == pytest.approx(DENSE_PARAMS[task, backbone], abs=0.05)
    if task == "upernet":
        assert sum(p.numel() for p in model.model.auxiliary_head.parameters()) > 0.5e6
    assert gflops == pytest.approx(DENSE_GFLOPS[task, backbone], abs=0.6 if (task, backbone) == ("upernet", "glnet_9g")
                                   else 0.5)


def test_mmcv_flops_count_layers_not_functions():
    """A conv with bias, BatchNorm, ReLU, pooling counted by MMCV's rules; GLNet's attention, block norms
    and FFN depth-wise conv left out, as MMCV saw them in the released code."""
    layers = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    assert detect_seg.mmcv_flops(layers, torch.zeros(1, 3, 10, 10)) == 100 * 8 * 27 + 800 + 2 * 800 + 800 + 800
    block = glnet.GLMixBlock(64, mlp_ratio=3, conv_pos=True, conv_ffn=True)
    hidden = block.mlp[0].out_channels
    convs = 64 * 9 + 2 * 64 * 64 + 64 * 25 + 2 * 64 * hidden  # pos_conv, local branch, FFN 1x1s
    biases = 64 * 4 + hidden + 64
    assert detect_seg.mmcv_flops(block, torch.zeros(1, 64, 16, 16)) == 16 * 16 * (convs + biases)


def test_report_prints_the_papers_columns(monkeypatch, capsys):
    """A row per model: its parameters and both FLOP counts beside the paper's ('-' where the paper has none)."""
    semfpn = dataclasses.replace(detect_seg.TASKS["semfpn"], report_size=(64, 128))  # the fvcore count runs it
    monkeypatch.setitem(detect_seg.TASKS, "semfpn", semfpn)
    for backbone, paper in (("glnet_4g", ["30.7", "150"]), ("glnet_mini", ["-", "-"])):
        argv = ["--report", "--task", "semfpn", "--model", backbone]
        [(task, model, params, everything, mmcv)] = detect_seg.main(argv)
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].split() == [task, backbone, f"{params / 1e6:.2f}", paper[0], f"{everything / 1e9:.1f}",
                                    f"{mmcv / 1e9:.1f}", paper[1], "64x128"]
        assert (task, model) == ("semfpn", backbone) and everything > mmcv > 0  # fvcore counts the attention too
    assert "box head on 1000\nRoIs, mask head on 100" in "\n".join(lines)


# --- the paper's recipes (README.md, "Detection and segmentation"), value by value ----------------

DENSE_RECIPES = {
    "maskrcnn": dict(batch=2, global_batch=16, lr=1e-4, weight_decay=0.05, drop_path=0.0, eval_interval=1,
                     lr_at={0: 1e-7, 250: 1e-4 * (1e-3 + 0.999 / 2), 500: 1e-4, 799: 1e-4, 800: 1e-5, 1099: 1e-5,
                            1100: 1e-6, 1199: 1e-6}),  # 100 steps per epoch: steps at epochs 8 and 11 of 12
    "retinanet": dict(batch=2, global_batch=16, lr=1e-4, weight_decay=1e-3, drop_path=0.0, eval_interval=1,
                      lr_at={0: 1e-7, 250: 1e-4 * (1e-3 + 0.999 / 2), 500: 1e-4, 799: 1e-4, 800: 1e-5, 1099: 1e-5,
                             1100: 1e-6, 1199: 1e-6}),
    "semfpn": dict(batch=4, global_batch=32, lr=2e-4, weight_decay=1e-4, drop_path=0.0, eval_interval=10,
                   lr_at={0: 2e-7, 500: 2e-4 * (1e-3 + 0.999 / 2), 1000: 2e-4, 40500: 1e-4,  # cosine
                          60250: 1e-4 * (1 + math.cos(3 * math.pi / 4)), 80000: 0.0}),
    "upernet": dict(batch=2, global_batch=16, lr=6e-5, weight_decay=0.01, drop_path=0.3, eval_interval=13,
                    lr_at={0: 6e-11, 750: 6e-5 * (1e-6 + (1 - 1e-6) / 2), 1500: 6e-5, 80750: 3e-5,  # poly, power 1
                           120375: 1.5e-5, 160000: 0.0}),
}
DENSE_STEPS = {"maskrcnn": 1200, "retinanet": 1200, "semfpn": 80000, "upernet": 160000}


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """Folders in COCO's and ADE20K's layouts where the paper's recipes fit: 1600 COCO training entries (100 steps
    of 16 per epoch; no file is read) and 32 ADE20K training images, a 480x640 one to validate on; and an ImageNet
    checkpoint of glnet_4g, every tensor a zero-strided view of one zero so that the file is small."""
    root = tmp_path_factory.mktemp("paper")
    coco = root / "coco"
    for folder in ("train2017", "val2017", "annotations"):
        os.makedirs(coco / folder)
    for split, count in (("train", 1600), ("val", 1)):
        images = [dict(id=i, file_name=f"{i:06d}.jpg", height=480, width=640) for i in range(1, count + 1)]
        annotations = [dict(id=i, image_id=i, category_id=1 + i % 80, bbox=[10, 10, 50, 40], area=2000, iscrowd=0,
                            segmentation=[[10, 10, 60, 10, 60, 50, 10, 50]]) for i in range(1, count + 1)]
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dict(
            images=images, annotations=annotations, categories=[dict(id=c, name=f"class{c}") for c in range(1, 81)])))
    ade = ade20k_folder(root / "ade", [(6, 8)] * 32, [(480, 640)])
    with torch.device("meta"):
        shapes = glnet.create_model("glnet_4g").state_dict()
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in shapes.items()}, root / "glnet_4g.pth")
    return {"coco": str(coco), "ade": ade, "pretrained": str(root / "glnet_4g.pth")}


@pytest.fixture
def paper_trainer(paper_data, tmp_path):
    """The Trainer of the paper's recipe on one process, --accum-steps 8 standing for 8 GPUs, on the meta device."""
    def build(task, *flags):
        data = paper_data["ade" if detect_seg.TASKS[task].segmentation else "coco"]
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "for .*: copying from a non-meta parameter")  # the loaded weights
            return dense_trainer(task, ["--task", task, "--data", data, "--pretrained", paper_data["pretrained"],
                                        "--accum-steps", "8", "--output-dir", str(tmp_path), *QUIET, *flags])
    return build


@pytest.mark.parametrize("task", list(DENSE_RECIPES))
def test_the_dense_recipes_as_training_applies_them(task, paper_trainer):
    """The backbone, the optimizer and its groups, the batch, the schedule (the lr at chosen iterations against
    the formula), drop path and the evaluation interval of each paper recipe, on the objects a run trains with."""
    expected, trainer = DENSE_RECIPES[task], paper_trainer(task)
    model = trainer.model
    body = model.backbone if task == "upernet" else model.backbone.body
    with torch.device("meta"):
        reference = glnet.create_model("glnet_4g", num_classes=0)
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items() if "num_batches" not in k}  # noqa: E731
    assert shapes(body) == {k: v for k, v in shapes(reference).items() if not k.startswith("norm.")}
    assert max(m.p for m in model.modules() if isinstance(m, glnet.StochasticDepth)) == expected["drop_path"]

    assert trainer.train_loader.batch_size == expected["batch"] and trainer.global_batch == expected["global_batch"]
    assert trainer.task.reference_batch == expected["global_batch"] and trainer.lr == pytest.approx(expected["lr"])
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert {g["betas"] for g in trainer.optimizer.param_groups} == {(0.9, 0.999)}
    names = assert_optimizer_decays(trainer, expected["weight_decay"])
    assert any(name.endswith(".tau") for name in names) and any(name.endswith(".bias") for name in names)
    assert trainer.total_steps == DENSE_STEPS[task] and trainer.settings.eval_interval == expected["eval_interval"]
    for step, lr in expected["lr_at"].items():
        assert trainer.lr * trainer.scheduler.lr_lambdas[0](step) == pytest.approx(lr, rel=1e-9, abs=1e-15), step


@pytest.mark.parametrize("task", ["maskrcnn", "retinanet"])
def test_the_detection_recipes_models_and_images(task, paper_trainer):
    """FPN on C2-C5 plus a max-pooled P6 (Mask R-CNN) or on C3-C5 plus P6 from C5 and P7 (RetinaNet), 256 wide;
    Mask R-CNN's 1024-wide box head, 4-conv 256-wide mask head, 512 RoIs per image; RetinaNet's heads without
    GroupNorm; images resized to a shorter side of 800 and a longer one of at most 1333; GLNet's BatchNorms frozen
    from the checkpoint (training from scratch keeps them); --schedule 3x."""
    model = paper_trainer(task).model
    fpn, channels = model.backbone.fpn, model.backbone.body.stage_channels
    first = 0 if task == "maskrcnn" else 1
    assert [block[0].in_channels for block in fpn.inner_blocks] == list(channels[first:])
    assert {block[0].out_channels for block in [*fpn.inner_blocks, *fpn.layer_blocks]} == {model.backbone.out_channels}
    assert model.backbone.out_channels == 256 and len((model.rpn if first == 0 else model).anchor_generator.sizes) == 5
    if task == "maskrcnn":
        assert isinstance(fpn.extra_blocks, LastLevelMaxPool) and model.roi_heads.box_head.fc7.out_features == 1024
        assert [m.out_channels for m in model.roi_heads.mask_head.modules() if type(m) is nn.Conv2d] == [256] * 4
        assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    else:
        assert (fpn.extra_blocks.p6.in_channels, fpn.extra_blocks.use_P5) == (channels[3], False)
        assert not any(isinstance(m, nn.GroupNorm) for m in model.head.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules()) == 5

    resized = model.transform([torch.zeros(3, 48, 64), torch.zeros(3, 48, 200)])[0].image_sizes
    assert resized[0] == (800, 1066) and resized[1][0] < 800 and 1330 <= resized[1][1] <= 1333
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    trainer = paper_trainer(task, "--schedule", "3x")
    assert trainer.model.transform.min_size == tuple(range(480, 801, 32)) and trainer.total_steps == 3600
    lr_at = lambda step: trainer.lr * trainer.scheduler.lr_lambdas[0](step)  # noqa: E731
    assert (lr_at(2699), lr_at(2700), lr_at(3299), lr_at(3300)) == pytest.approx((1e-4, 1e-5, 1e-5, 1e-6))
    with torch.device("meta"):
        scratch = dense_trainer(task, ["--task", task, "--data", trainer.settings.data, *QUIET])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in scratch.model.backbone.body.modules()) == 5


class Recorder(nn.Module):
    """A segmentation 'model' that records its inputs' sizes and predicts class 0 everywhere."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.sizes = num_classes, []

    def forward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return torch.zeros(len(images), self.num_classes, *images.shape[-2:])


def training_scales(transforms, height, width, seeds):
    """The resize factor of each seed's training crop, read off a label that numbers the image's columns."""
    scales = []
    for seed in seeds:
        torch.manual_seed(seed)
        columns = torch.arange(1000, 1000 + width).expand(height, width)   # all above the ignore label
        _, label = transforms(tv_tensors.Image(torch.zeros(3, height, width)), tv_tensors.Mask(columns))
        row = label[label.shape[0] // 2]
        row = row[row != detect_seg.IGNORE_INDEX].float()
        scales.append((len(row) - 1) / (row.max() - row.min()).item())
    return scales


@pytest.mark.parametrize("task", ["semfpn", "upernet"])
def test_the_segmentation_recipes_models_and_images(task, paper_trainer):
    """Semantic FPN: an FPN on C2-C5, 256 wide, heads 128 wide with GroupNorm. UperNet: pyramid pooling to 1, 2, 3
    and 6 cells on C5, every conv 512 wide with BatchNorm, an auxiliary head on C4 (one 256-wide conv) whose loss
    counts 0.4 in training. 512x512 crops of images whose shorter side is 512 x U(0.5, 2) in either orientation;
    evaluated fit into 2048x512. GLNet's BatchNorms train (from the checkpoint too)."""
    trainer = paper_trainer(task)
    model, classes = trainer.model, trainer.task.num_classes
    body = model.backbone if task == "upernet" else model.backbone.body
    assert classes == 150 and sum(isinstance(m, nn.BatchNorm2d) for m in body.modules()) == 5
    in_body = set(body.modules())
    heads = [m for m in model.modules() if m not in in_body]
    if task == "semfpn":
        assert [b[0].in_channels for b in model.backbone.fpn.inner_blocks] == list(body.stage_channels)
        assert model.backbone.out_channels == 256
        assert {m.out_channels for m in model.scale_heads.modules() if isinstance(m, nn.Conv2d)} == {128}
        assert [sum(isinstance(m, nn.Conv2d) for m in head.modules()) for head in model.scale_heads] == [1, 1, 2, 3]
        assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {32}
    else:
        pooled = []
        for m in model.modules():
            if isinstance(m, nn.AdaptiveAvgPool2d):
                m.register_forward_hook(lambda module, args, output: pooled.append(tuple(output.shape[-2:])))
        with torch.device("meta"):
            logits, auxiliary = model.train()(torch.zeros(2, 3, 512, 512))
        assert pooled == [(1, 1), (2, 2), (3, 3), (6, 6)] and logits.shape == auxiliary.shape == (2, 150, 512, 512)
        convs = [m for m in heads if isinstance(m, nn.Conv2d) and m.out_channels != 150]  # but the classifiers
        assert {m.out_channels for m in convs} == {512, 256} and sum(isinstance(m, nn.BatchNorm2d) for m in heads) == 13
        assert all(m.bias is None for m in convs)  # each followed by its BatchNorm
        aux = model.auxiliary_head[0][0]
        assert (aux.in_channels, aux.out_channels, aux.kernel_size) == (body.stage_channels[2], 256, (3, 3))

        class Outputs(nn.Module):
            def forward(self, images):
                return outputs
        outputs = torch.randn(1, 150, 8, 8), torch.randn(1, 150, 8, 8)
        labels = torch.randint(0, 150, (1, 8, 8))
        loss = trainer.task.loss(Outputs(), (torch.zeros(1, 3, 8, 8), labels))
        ce = [torch.nn.functional.cross_entropy(o, labels) for o in outputs]
        torch.testing.assert_close(loss, ce[0] + 0.4 * ce[1])
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout2d)} == {0.1}

    transforms = trainer.task.train_set.transforms
    torch.manual_seed(0)
    image, label = transforms(tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8)),
                              tv_tensors.Mask(torch.ones(480, 640, dtype=torch.long)))
    assert image.shape == (3, 512, 512) and label.shape == (512, 512) and image.dtype == torch.float32
    landscape, portrait = (training_scales(transforms, *size, range(12)) for size in ((480, 640), (640, 480)))
    assert landscape == pytest.approx(portrait, rel=0.01)
    shorter = [480 * scale for scale in landscape]
    assert all(250 <= side <= 1030 for side in shorter) and min(shorter) < 400 and max(shorter) > 700
    recorder = Recorder(classes)
    trainer.task.evaluate(recorder)
    assert recorder.sizes == [(512, 683)]


# --- evaluation as the toolboxes run it: pycocotools the standard way, one image per forward --------

def write_coco(root, size, annotations):
    """A COCO 2017 folder with one grey val image (id 1) of `size` (H, W) and `annotations`, whose
    masks (H, W arrays) become RLE segmentations with their own area and box."""
    os.makedirs(root / "val2017")
    os.makedirs(root / "annotations")
    Image.new("RGB", size[::-1], (128, 128, 128)).save(root / "val2017" / "000001.png")
    records = []
    for i, (category, mask) in enumerate(annotations):
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        records.append(dict(id=i + 1, image_id=1, category_id=category, segmentation=rle, area=float(mask.sum()),
                            bbox=[float(v) for v in mask_util.toBbox(rle)], iscrowd=0))
    coco = dict(images=[dict(id=1, file_name="000001.png", height=size[0], width=size[1])], annotations=records,
                categories=[dict(id=1, name="square")])
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    return str(root)


def square_mask(size, x0, y0, x1, y1):
    mask = np.zeros(size, np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


class FixedDetections(torch.nn.Module):
    """A 'detector' returning the same torchvision-style detections for every image."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, images):
        return [self.output for _ in images]


def evaluate_fixed(root, output, with_masks=True):
    """detect_seg's COCO evaluation of the validation set of `root` for a detector that outputs `output`."""
    dataset = detect_seg.coco_dataset(root, "val", False, with_masks)
    categories = detect_seg.label_categories("maskrcnn", dataset.coco.cats)   # label = category id for ids 1..K
    return detect_seg.evaluate_detection(FixedDetections(output), dataset, CPU, categories)


def standard_coco_metrics(ann_file, detections):
    """pycocotools run the standard way on {image id: torchvision detections}, prepared as
    torchvision's CocoEvaluator prepares them: box records with full-precision XYWH boxes, mask
    records (masks > 0.5, RLE) without a box, each list loaded by its own loadRes."""
    records = {"bbox": [], "segm": []}
    for image_id, output in detections.items():
        boxes = output["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        common = [dict(image_id=image_id, category_id=label, score=score)
                  for label, score in zip(output["labels"].tolist(), output["scores"].tolist())]
        records["bbox"] += [dict(record, bbox=box) for record, box in zip(common, boxes.tolist())]
        if "masks" in output:
            for record, mask in zip(common, output["masks"] > 0.5):
                rle = mask_util.encode(np.array(mask[0, :, :, np.newaxis].numpy(), dtype=np.uint8, order="F"))[0]
                rle["counts"] = rle["counts"].decode("utf-8")
                records["segm"].append(dict(record, segmentation=rle))
    metrics = {}
    for iou_type, results in records.items():
        if results:
            coco = COCO(ann_file)
            evaluation = COCOeval(coco, coco.loadRes(results), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            metrics.update({f"{iou_type}_{name}": float(value) for name, value in
                            zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluation.stats[:6])})
    return metrics


def test_coco_ap_of_hand_made_detections(tmp_path):
    """Four 10x10 squares of one class: perfect detections give AP 1.0; moving the least confident
    one off its square leaves recall 3/4 at precision 1, so COCO's 101-point AP is 76/101."""
    size, squares = (100, 100), [(0, 0), (20, 0), (40, 0), (60, 0)]
    root = write_coco(tmp_path / "coco", size, [(1, square_mask(size, x, y, x + 10, y + 10)) for x, y in squares])
    boxes = torch.tensor([[x, y, x + 10, y + 10] for x, y in squares], dtype=torch.float32)
    detections = dict(boxes=boxes, labels=torch.ones(4, dtype=torch.long), scores=torch.tensor([0.9, 0.8, 0.7, 0.6]))
    assert evaluate_fixed(root, detections, with_masks=False)["bbox_AP"] == 1.0
    detections["boxes"][3] += torch.tensor([0.0, 50.0, 0.0, 50.0])  # no overlap with any square
    metrics = evaluate_fixed(root, detections, with_masks=False)
    assert metrics["bbox_AP"] == metrics["bbox_AP50"] == metrics["bbox_AP75"] == pytest.approx(76 / 101, abs=1e-9)
    detections.update(scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4))
    assert evaluate_fixed(root, detections, with_masks=False)["bbox_AP"] == 0.0


def test_mask_ap_of_soft_masks_thresholds_them_at_one_half(tmp_path):
    """Two squares, found by exact boxes with soft masks of 0.51 and 0.49. Above 0.5, the first mask is its square
    exactly (the 0.49 frame around it falls away: with it, IoU 1/4) and the second covers 10 of its 16 rows (IoU
    0.625, the 0.49 rows fall away): a match at IoU thresholds 0.5, 0.55, 0.6, a false positive after a true one at
    the 7 others (AP 51/101). Any other threshold gives other masks: 0.49 two misses' worth, 0.52 empty masks."""
    size = (100, 100)
    first, second = square_mask(size, 10, 10, 30, 30), square_mask(size, 50, 50, 70, 66)
    root = write_coco(tmp_path / "coco", size, [(1, first), (1, second)])
    frame = square_mask(size, 0, 0, 40, 40) - first
    ten_rows, six_rows = square_mask(size, 50, 50, 70, 60), square_mask(size, 50, 60, 70, 66)
    soft = torch.from_numpy(np.stack([0.51 * first + 0.49 * frame, 0.51 * ten_rows + 0.49 * six_rows]))
    output = dict(boxes=torch.tensor([[10.0, 10, 30, 30], [50, 50, 70, 66]]), labels=torch.tensor([1, 1]),
                  scores=torch.tensor([0.9, 0.8]), masks=soft.float()[:, None])
    metrics = evaluate_fixed(root, output)
    assert metrics["segm_AP"] == pytest.approx((3 * 1 + 7 * 51 / 101) / 10, abs=1e-12)
    assert metrics["segm_AP50"] == 1.0 and metrics["segm_AP75"] == pytest.approx(51 / 101, abs=1e-12)
    assert metrics["bbox_AP"] == 1.0  # the boxes are exact


def test_mask_ap_by_size_uses_the_mask_area(tmp_path):
    """A false positive whose mask is a 1-pixel frame: mask area 156 (COCO 'small'), box 40x40 =
    1600 ('medium'). Scored the standard way it counts for mask APs, so the small square's mask
    APs is 1/2 (one TP after one FP) while the box APs is 1 (the frame's box is not small)."""
    size = (100, 100)
    square = square_mask(size, 5, 5, 25, 5 + 20)
    frame = square_mask(size, 50, 50, 90, 90) - square_mask(size, 51, 51, 89, 89)
    root = write_coco(tmp_path / "coco", size, [(1, square)])
    output = dict(boxes=torch.tensor([[50.0, 50.0, 90.0, 90.0], [5.0, 5.0, 25.0, 25.0]]), labels=torch.tensor([1, 1]),
                  scores=torch.tensor([0.9, 0.8]), masks=torch.from_numpy(np.stack([frame, square])).float()[:, None])
    metrics = evaluate_fixed(root, output)
    expected = standard_coco_metrics(os.path.join(root, "annotations", "instances_val2017.json"), {1: output})
    assert expected["segm_APs"] == pytest.approx(0.5) and expected["bbox_APs"] == pytest.approx(1.0)
    assert metrics == pytest.approx(expected, abs=1e-12)


def test_mask_ap_uses_the_mask_iou_not_the_box_iou(tmp_path):
    """A ring (20x20, a 12x12 hole: 256 pixels) found by the filled 20x20 square, and an L (a 20x20 square less a
    10x10 corner) found exactly. Their boxes are the ground truth's (box IoU 1, box AP 1), but the square's mask
    IoU with the ring is 256/400 = 0.64: a match at IoU thresholds 0.5, 0.55, 0.6 (AP 1), a false positive before
    the L's true positive at the 7 others (precision 1/2 up to recall 1/2: AP 51/2/101)."""
    size = (100, 100)
    filled = square_mask(size, 10, 10, 30, 30)
    ring = filled - square_mask(size, 14, 14, 26, 26)
    ell = square_mask(size, 50, 50, 70, 70) - square_mask(size, 60, 50, 70, 60)   # less its top-right corner
    root = write_coco(tmp_path / "coco", size, [(1, ring), (1, ell)])
    output = dict(boxes=torch.tensor([[10.0, 10, 30, 30], [50, 50, 70, 70]]), labels=torch.tensor([1, 1]),
                  scores=torch.tensor([0.9, 0.8]), masks=torch.from_numpy(np.stack([filled, ell])).float()[:, None])
    metrics = evaluate_fixed(root, output)
    assert metrics["bbox_AP"] == 1.0
    assert metrics["segm_AP50"] == 1.0 and metrics["segm_AP75"] == pytest.approx(51 / 2 / 101, abs=1e-12)
    assert metrics["segm_AP"] == pytest.approx((3 * 1 + 7 * 51 / 2 / 101) / 10, abs=1e-12)


def test_boxes_are_scored_at_full_precision(tmp_path):
    """Two 10x10 squares, one found exactly, the other by a box 4.996 wide: IoU 0.4996, a miss at
    every threshold (AP50 = 51/101: recall 1/2 at precision 1). Rounded to 2 decimals, the box
    would be 5 wide, IoU 0.5, a match at 0.5. Without masks, only box AP is reported."""
    size = (60, 60)
    root = write_coco(tmp_path / "coco", size, [(1, square_mask(size, 10, 10, 20, 20)),
                                                 (1, square_mask(size, 40, 10, 50, 20))])
    output = dict(boxes=torch.tensor([[40.0, 10.0, 50.0, 20.0], [10.0, 10.0, 14.996, 20.0]]),
                  labels=torch.tensor([1, 1]), scores=torch.tensor([0.9, 0.8]))
    metrics = evaluate_fixed(root, output, with_masks=False)
    expected = standard_coco_metrics(os.path.join(root, "annotations", "instances_val2017.json"), {1: output})
    assert expected["bbox_AP50"] == pytest.approx(51 / 101)
    assert metrics == pytest.approx(expected, abs=1e-12)


EVALUATE_AND_PRINT = """
import json, os, sys, detect_seg
metrics = detect_seg.main(sys.argv[1:])["maskrcnn"]
if os.environ["RANK"] == "0":
    print(json.dumps(metrics))
"""


def test_detector_ap_is_the_same_on_one_and_two_processes_and_image_by_image(cache_dir, scenes, tmp_path):
    """A briefly trained Mask R-CNN evaluated by `detect_seg.py --eval` on 1 process and on 2 (whose
    ranks would pair other images of other sizes in a batch of 2) gives the twelve COCO numbers of
    pycocotools run the standard way on the model's outputs image by image."""
    sizes = {Image.open(os.path.join(scenes, "val2017", f)).size for f in os.listdir(os.path.join(scenes, "val2017"))}
    assert len(sizes) == 4  # 4 validation images of different sizes: a batch of 2 pads one of them
    train_args = ["--task", "maskrcnn", "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path), "--iters", "30",
                  "--batch-size", "4", "--lr", "1.6e-2", "--warmup-iters", "1", *SMALL_DETECTOR]
    detect_seg.main(train_args)
    checkpoint = str(tmp_path / "maskrcnn" / "last.pth")
    eval_args = ["--eval", "--checkpoint", checkpoint, "--cache-dir", str(cache_dir), *QUIET]
    one_process = detect_seg.main(eval_args)["maskrcnn"]
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE_AND_PRINT)
    two_processes = json.loads(run_detect_seg(eval_args, torchrun(2), str(script)).strip().splitlines()[-1])

    model, _ = train.load_trained(checkpoint, detect_seg.build_model)
    dataset = detect_seg.coco_dataset(scenes, "val", False, True)
    with torch.no_grad():
        detections = {int(target["image_id"]): model([image])[0] for image, target in dataset}
    image_by_image = standard_coco_metrics(os.path.join(scenes, "annotations", "instances_val2017.json"), detections)
    assert image_by_image["bbox_AP"] > 0.02 and image_by_image["segm_AP"] > 0.02  # a detector that finds shapes
    assert one_process == pytest.approx(image_by_image, abs=1e-6)
    assert two_processes == pytest.approx(image_by_image, abs=1e-6)


class FixedSegmentation(torch.nn.Module):
    """A segmentation 'model' predicting `prediction` (H, W) of its input's size."""

    def __init__(self, prediction, num_classes=150):
        super().__init__()
        self.prediction, self.num_classes = prediction, num_classes

    def forward(self, images):
        assert images.shape[-2:] == self.prediction.shape
        return torch.nn.functional.one_hot(self.prediction, self.num_classes).permute(2, 0, 1)[None].float()


def evaluate_segmentation_of(tmp_path, label, prediction):
    """detect_seg's ADE20K evaluation (single scale 32, so a 32x32 image is not resized) of one label PNG."""
    ade = ade20k_folder(tmp_path / "ade", [(32, 32)], [(32, 32)], label)
    _, given, _ = detect_seg.parse_args(["--task", "semfpn", "--data", ade, "--scale", "32", *QUIET])
    task = detect_seg.dense_task(detect_seg.make_settings("semfpn", given), 0, 1, CPU)
    return task.evaluate(FixedSegmentation(prediction)), task


def test_label_255_is_ignored_like_label_0(tmp_path):
    """MMSegmentation's reduce_zero_label: 0 and 255 are ignored, 1..K are classes 0..K-1. A model
    predicting class 0 everywhere on a label of 3/8 of 1, 1/8 of 2, 1/4 of 0 and 1/4 of 255 has
    IoU 3/4 for class 0 (its 384 pixels of the 512 predicted), 0 for class 1, pixel accuracy 3/4."""
    label = np.zeros((32, 32), np.uint8)
    label[:12], label[12:16], label[16:24] = 1, 2, 255
    metrics, task = evaluate_segmentation_of(tmp_path, label, torch.zeros(32, 32, dtype=torch.long))
    assert metrics["mIoU"] == pytest.approx((3 / 4 + 0) / 2, abs=1e-12)
    assert metrics["aAcc"] == pytest.approx(3 / 4, abs=1e-12)
    read = task.evaluate.keywords["dataset"][0][1]
    assert (read == detect_seg.IGNORE_INDEX).tolist() == ((label == 0) | (label == 255)).tolist()


def test_miou_leaves_out_a_class_absent_from_truth_and_prediction(tmp_path):
    """Of ADE20K's 150 classes, the label has classes 0-2 (PNG values 1-3) and the prediction 0, 1 and 5; the
    other 146 are in neither and count for nothing. By hand: class 0 predicted on its 256 pixels and 128 of class
    1's, class 1 on 128 of its 256, class 2's 256 pixels predicted as class 5: IoU 256/384, 128/256, 0 and 0 (class
    5: no true pixel), mIoU their mean over 4 classes, pixel accuracy 384/768."""
    label = np.zeros((32, 32), np.uint8)
    label[:8], label[8:16], label[16:24] = 1, 2, 3
    prediction = torch.zeros(32, 32, dtype=torch.long)
    prediction[12:16], prediction[16:24] = 1, 5
    metrics, _ = evaluate_segmentation_of(tmp_path, label, prediction)
    assert metrics["mIoU"] == pytest.approx((256 / 384 + 128 / 256 + 0 + 0) / 4, abs=1e-12)
    assert metrics["aAcc"] == pytest.approx(384 / 768, abs=1e-12)
    assert sum(not math.isnan(v) for v in metrics["IoU"]) == 4


def mmseg_test_size(height, width, scale):
    """MMSegmentation's test-time resize (mmcv's rescale_size into (4 x scale, scale)): the largest ratio that fits
    the longer side into 4 x scale and the shorter into scale, each side rounded half up."""
    ratio = min(4 * scale / max(height, width), scale / min(height, width))
    return int(height * ratio + 0.5), int(width * ratio + 0.5)


class InputSizes(torch.nn.Module):
    """A segmentation 'model' recording the size of each input; its logits are zeros."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return images.new_zeros(len(images), 2, *images.shape[-2:])


@pytest.mark.parametrize("size, forwarded", [
    ((100, 1000), (205, 2048)),   # wide: ratio min(2048 / 1000, 512 / 100) = 2.048, 204.8 rounds to 205
    ((1000, 100), (2048, 205)),   # tall
    ((4096, 333), (2048, 167)),   # ratio 0.5: 166.5 rounds half up
    ((480, 640), (512, 683)),     # below the cap: the shorter side to 512
], ids=["wide", "tall", "half-pixel", "uncapped"])
def test_segmentation_test_resize_caps_the_longer_side(size, forwarded):
    """At --scale 512 an image is forwarded fit into (2048, 512) as MMSegmentation's test resize fits it, and its
    logits come back at its own size."""
    assert mmseg_test_size(*size, 512) == forwarded
    model = InputSizes()
    logits = detect_seg.segment(model, torch.rand(1, 3, *size), 512)
    assert model.sizes == [forwarded] and logits.shape == (1, 2, *size)


def coco_folder(root, sizes):
    """COCO 2017's layout, train and val alike, with the scenes' categories: grey images of the given (H, W) sizes,
    a 16x16 square of category 1 in each."""
    os.makedirs(root / "annotations")
    images = [dict(id=i + 1, file_name=f"{i + 1:06d}.png", height=h, width=w) for i, (h, w) in enumerate(sizes)]
    squares = [dict(id=i + 1, image_id=i + 1, category_id=1, bbox=[0.0, 0.0, 16.0, 16.0], area=256.0, iscrowd=0,
                    segmentation=[[0, 0, 16, 0, 16, 16, 0, 16]]) for i in range(len(sizes))]
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(detect_seg.SCENE_CLASSES)]
    for split in ("train", "val"):
        os.makedirs(root / f"{split}2017")
        for image in images:
            Image.new("RGB", (image["width"], image["height"]), (128, 128, 128)).save(
                root / f"{split}2017" / image["file_name"])
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(dict(images=images, annotations=squares, categories=categories)))
    return str(root)


def detector_input_size(height, width, min_size, max_size):
    """torchvision's detection resize, the shorter side to min_size unless the longer would pass max_size,
    floored, padded to a multiple of 32."""
    ratio = min(min_size / min(height, width), max_size / max(height, width))
    return tuple(32 * math.ceil(int(side * ratio) / 32) for side in (height, width))


def test_eval_flags_override_the_checkpoints_sizes(cache_dir, scenes, tmp_path, monkeypatch):
    """Checkpoints trained with --scale 80 (Semantic FPN) and --min-size 96 --max-size 160 (Mask R-CNN), evaluated
    with --scale 48 and --min-size 64 --max-size 128, feed GLNet at the command line's sizes: each scene fit into
    (4 x 48, 48); a square image's shorter side to 64 (96 with the checkpoint's --min-size), a 1:4 image's longer
    side to 128 (160 with the checkpoint's --max-size)."""
    for task, argv in (("semfpn", SEGMENTATION), ("maskrcnn", SMALL_DETECTOR)):
        dense_trainer(task, [*argv, "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path)]).save()
    segmenter, detector = (torch.load(tmp_path / task / "last.pth")["args"] for task in ("semfpn", "maskrcnn"))
    assert (segmenter["scale"], detector["min_size"], detector["max_size"]) == (80, 96, 160)
    sizes = [(100, 100), (50, 200)]
    given, trained_min, trained_max = ([detector_input_size(*size, *flags) for size in sizes]
                                       for flags in ((64, 128), (96, 128), (64, 160)))
    assert given != trained_min and given != trained_max   # either flag lost would show

    inputs = glnet_inputs(monkeypatch)
    detect_seg.main(["--eval", "--checkpoint", str(tmp_path / "semfpn" / "last.pth"), "--scale", "48", *QUIET])
    scene_sizes = [Image.open(os.path.join(scenes, "val2017", name)).size[::-1]
                   for name in sorted(os.listdir(os.path.join(scenes, "val2017")))]
    assert [tuple(x.shape[-2:]) for x in inputs] == [mmseg_test_size(*size, 48) for size in scene_sizes]
    inputs.clear()
    detect_seg.main(["--eval", "--checkpoint", str(tmp_path / "maskrcnn" / "last.pth"), "--data",
                     coco_folder(tmp_path / "coco", sizes), "--min-size", "64", "--max-size", "128", *QUIET])
    assert [tuple(x.shape[-2:]) for x in inputs] == given


# --- training runs ---------------------------------------------------------------------------------

def test_semantic_fpn_training_lowers_the_loss_and_resumes(cache_dir, tmp_path, capsys):
    args = [*SEGMENTATION, "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path), "--batch-size", "4",
            "--lr", "1.6e-2", "--warmup-iters", "3"]  # 2e-3 at the global batch of 4
    detect_seg.main(args + ["--iters", "12"])  # 12 training images: 3 steps per epoch, 4 epochs
    records = read_metrics(tmp_path / "semfpn")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    assert 0 <= records[-1]["val_mIoU"] <= 1 and 0 <= records[-1]["val_aAcc"] <= 1
    out = capsys.readouterr().out
    assert "epoch 1/4  step 1/3  loss " in out and "peak lr 2.00e-03 (1.60e-02 per 32)" in out

    results = detect_seg.main(args + ["--iters", "15"])  # the same command, longer: resumes at epoch 5
    assert f"resuming from {tmp_path}/semfpn/last.pth: epoch 5, step 0" in capsys.readouterr().out
    assert [r["epoch"] for r in read_metrics(tmp_path / "semfpn")] == [1, 2, 3, 4, 5]
    assert results["semfpn"]["mIoU"] == read_metrics(tmp_path / "semfpn")[-1]["val_mIoU"]
    assert os.path.isfile(tmp_path / "semfpn" / "best.pth")

    before = {name: file_bytes(tmp_path / "semfpn" / name) for name in os.listdir(tmp_path / "semfpn")}
    with pytest.raises(glnet.InputError, match="is a semfpn checkpoint of glnet_mini with 4 classes, but this run trains "
                                         "semfpn with glnet_4g and 4 classes"):
        detect_seg.main(args + ["--iters", "18", "--model", "glnet_4g"])
    assert {name: file_bytes(tmp_path / "semfpn" / name) for name in os.listdir(tmp_path / "semfpn")} == before


KILLED_AFTER_A_CHECKPOINT = """
import os, signal, sys, detect_seg, train
save = train.save_checkpoint


def save_and_die(state, path):
    save(state, path)
    if (state["epoch"], state["step"]) == (0, 2):
        os.kill(os.getpid(), signal.SIGKILL)


train.save_checkpoint = save_and_die
detect_seg.main(sys.argv[1:])
"""


def test_segmentation_resume_after_sigkill_gives_the_same_weights(cache_dir, tmp_path):
    """A Semantic FPN run killed by SIGKILL right after its checkpoint at step 2 of epoch 1, rerun with the same
    command, continues from that step and ends with the weights of an uninterrupted run (drop path included)."""
    args = [*SEGMENTATION, "--cache-dir", str(cache_dir), "--batch-size", "2", "--iters", "8",
            "--checkpoint-every", "1", "--drop-path", "0.1"]  # 6 steps per epoch
    run_detect_seg([*args, "--output-dir", str(tmp_path / "straight")])

    interrupted, last = tmp_path / "interrupted", tmp_path / "interrupted" / "semfpn" / "last.pth"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_A_CHECKPOINT)
    killed = subprocess.run([sys.executable, str(script), *args, "--output-dir", str(interrupted)], cwd=HERE,
                            capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE})
    assert killed.returncode == -signal.SIGKILL and (torch.load(last)["epoch"], torch.load(last)["step"]) == (0, 2)
    resumed = run_detect_seg([*args, "--output-dir", str(interrupted)])
    assert f"resuming from {last}: epoch 1, step 2" in resumed

    straight, final = torch.load(tmp_path / "straight" / "semfpn" / "last.pth"), torch.load(last)
    assert (final["epoch"], final["step"]) == (2, 0)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, final["model"][name]), f"{name} differs"


def test_accumulation_gives_the_same_update_as_the_full_batch(cache_dir, tmp_path):
    """--accum-steps 2 with half the batch: the same gradient at the optimizer step and the same weights after it
    as one full batch. The model is in eval mode (BatchNorm statistics and dropout off: nothing else depends on how
    the batch is split) and the crops are never padded (so each micro-batch's mean is over as many pixels)."""
    updates = []
    for batch_size, accum in ((4, 1), (2, 2)):
        trainer = dense_trainer("semfpn", [*SEGMENTATION, "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path),
                                           "--batch-size", str(batch_size), "--accum-steps", str(accum),
                                           "--scale", "128"])
        assert trainer.global_batch == 4
        gradients = {}
        trainer.optimizer.register_step_pre_hook(lambda *_, trainer=trainer: gradients.update(
            {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}))
        trainer.model.eval()
        torch.manual_seed(1)  # the same crops and flips in both runs
        trainer.train_step(list(itertools.islice(iter(trainer.train_loader), accum)))
        updates.append((gradients, trainer.model.state_dict()))
    (full_gradients, full_weights), (accumulated_gradients, accumulated_weights) = updates
    assert full_gradients.keys() == accumulated_gradients.keys() and len(full_gradients) > 50
    for name, gradient in full_gradients.items():
        error = (accumulated_gradients[name] - gradient).abs().max()
        assert error <= 1e-4 * gradient.abs().max(), f"{name}: max |difference| {error}"
    for name, weight in full_weights.items():
        torch.testing.assert_close(accumulated_weights[name], weight, rtol=1e-5, atol=1e-6)


def test_mask_rcnn_run_evaluates_and_predict_draws(cache_dir, scenes, tmp_path, capsys):
    args = ["--task", "maskrcnn", "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path), "--epochs", "1",
            "--lr-steps", "1", "--batch-size", "4", *SMALL_DETECTOR]
    results = detect_seg.main(args)["maskrcnn"]
    for iou_type in ("bbox", "segm"):
        assert all(0 <= results[f"{iou_type}_{key}"] <= 1 for key in ("AP", "AP50", "AP75", "APm"))
    assert {"last.pth", "best.pth", "metrics.jsonl"} <= set(os.listdir(tmp_path / "maskrcnn"))
    evaluated = detect_seg.main(["--task", "maskrcnn", "--eval", "--cache-dir", str(cache_dir),
                                 "--output-dir", str(tmp_path), *QUIET])["maskrcnn"]
    assert evaluated["bbox_AP"] == pytest.approx(results["bbox_AP"], abs=1e-6)
    with pytest.raises(glnet.InputError, match="best.pth is a maskrcnn checkpoint, not semfpn: pass --task maskrcnn"):
        detect_seg.main(["--task", "semfpn", "--eval", "--checkpoint", str(tmp_path / "maskrcnn" / "best.pth")])

    image = os.path.join(scenes, "val2017", sorted(os.listdir(os.path.join(scenes, "val2017")))[0])
    detect_seg.main(["--output-dir", str(tmp_path), "--predict", image, "--score-threshold", "0.0", *QUIET])
    assert drawn_differs(image, tmp_path / f"{os.path.basename(image)[:-4]}_maskrcnn.png")
    assert " detection(s) with score >= 0.0: " in capsys.readouterr().out
    with pytest.raises(glnet.InputError, match="nothere.png"):
        detect_seg.main(["--output-dir", str(tmp_path), "--predict", str(tmp_path / "nothere.png")])


def test_upernet_trains_on_the_scenes_and_predict_draws_its_masks(cache_dir, scenes, tmp_path, capsys):
    args = ["--task", "upernet", *SEGMENTATION[2:], "--cache-dir", str(cache_dir), "--output-dir", str(tmp_path),
            "--batch-size", "4", "--lr", "8e-3", "--warmup-iters", "3", "--iters", "9"]  # 2e-3 at the global batch of 4
    results = detect_seg.main(args)["upernet"]
    records = read_metrics(tmp_path / "upernet")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["train_loss"] < records[0]["train_loss"]
    assert 0 <= results["mIoU"] <= 1 and results["mIoU"] == records[-1]["val_mIoU"]
    assert "peak lr 2.00e-03 (8.00e-03 per 16)" in capsys.readouterr().out

    image = os.path.join(scenes, "val2017", sorted(os.listdir(os.path.join(scenes, "val2017")))[0])
    output = str(tmp_path / "drawn.png")
    detect_seg.main(["--task", "upernet", "--output-dir", str(tmp_path), "--predict", image, "--predict-output", output,
                     *QUIET])
    assert drawn_differs(image, output) and ": classes " in capsys.readouterr().out


def test_torchrun_two_processes_from_an_empty_cache(tmp_path):
    """Real DDP on CPU (gloo), as a new user starts it: the scenes are generated once (rank 0, the
    other waits), two processes train Semantic FPN, and their evaluation counts every validation
    pixel once: the 2-process mIoU equals a 1-process evaluation of the same weights."""
    cache = tmp_path / "empty-cache"
    out = tmp_path / "out"
    args = [*SEGMENTATION, "--cache-dir", str(cache), "--iters", "2", "--batch-size", "2", "--scale", "64"]
    log = run_detect_seg([*args, "--output-dir", str(out)], launcher=torchrun(2))
    assert sorted(os.listdir(cache)) == [detect_seg.SCENES_VERSION]  # complete, no temporary folder left
    assert "global batch 4 = 2 per process x 2 processes x 1 accumulation steps" in log
    assert log.count("semfpn result:") == 1  # rank 0 only
    records = read_metrics(out / "semfpn")
    assert len(records) == 1
    one_process = detect_seg.main([*args, "--output-dir", str(out), "--eval", "--checkpoint",
                                   str(out / "semfpn" / "last.pth")])["semfpn"]
    assert one_process["mIoU"] == records[-1]["val_mIoU"] and one_process["aAcc"] == records[-1]["val_aAcc"]
