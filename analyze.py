"""Look inside a vision backbone: GLNet's semantic slots, and the redundant blocks of any backbone.

    python analyze.py slots --checkpoint runs/glnet_mini-builtin/best.pth --image a.jpg b.jpg --block 2.1 3.1
    python analyze.py redundancy --checkpoint runs/glnet_mini-builtin/best.pth
    python analyze.py approximate --checkpoint runs/glnet_mini-builtin/best.pth --blocks 3:1-3 --translator mlp resmlp
    python analyze.py approximate --model vit_b_16 --weights DEFAULT --data cifar10 --search 5
    python analyze.py evaluate --checkpoint analysis/approximated.pth

`slots` draws the GLNet paper's Figures 5 and 6: the soft clustering weights softmax(A) (Eq. 3) of GLMix blocks.
`redundancy` and `approximate` follow "Detecting and Approximating Redundant Computational Blocks in Neural
Networks" on any backbone of stages of same-shaped blocks: h_0 is a stage's input, h_i its block i's output (from
1), BR(i, j) = -E ||h_i - h_j||^2 (Eq. 1), and RBA replaces blocks i+1..j by a linear map T, h_j ~ T(h_i).
"""

import argparse
import collections
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2
from torchvision.utils import make_grid

import glnet
import train
from glnet import InputError

# --- Config ----------------------------------------------------------------------------------------

CALIBRATION_IMAGES = 3000      # the BR paper's calibration subset of the training set
BATCH_SIZE, LATENCY_ROUNDS = 64, 20
PRINT_FREQ = 10                # a progress line every N batches
OUTPUT_DIR = "analysis"
DATA_DIR = os.path.join(train.DEFAULT_CACHE, "datasets")
SLOT_BLOCK = "3.1"             # Figure 5: the first block of stage 3
REPRESENTATIVE_SLOTS = 4
PANEL_INCHES, CELL_INCHES, DPI = 2.4, 0.5, 120        # a panel of the slot figure, a cell of a heatmap
METRICS = ("BR", "linear CKA", "cosine")
SCORES = {"residual": "fit residual", "br": "-BR"}    # --rank-by: lower = more redundant
TRANSLATORS = ("linear", "mlp", "resmlp")
TRANSLATOR_STEPS, TRANSLATOR_LR = 300, 1e-3           # the BR paper's Table 4: Adam, 300 steps, lr 1e-3
TRANSLATOR_BATCH = 1024        # calibration positions per step
TRANSLATOR_POSITIONS = 32768   # calibration positions kept, at random, for the MLP translators
# The BR paper's probes on frozen features, as its code trains them: Adam, batch 256, the last epoch's top-1
PROBES = {"linear": dict(lr=0.01, epochs=5, weight_decay=0.0), "mlp": dict(lr=1e-3, epochs=50, weight_decay=1e-5)}
PROBE_BATCH = 256
DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10,
            "cifar100": datasets.CIFAR100}


# --- Backbones: stages of same-shaped blocks, and a small adapter per family -----------------------

def children(model, name):  # the qualified names of a container's blocks
    return [f"{name}.{child}" for child, _ in model.get_submodule(name).named_children()]


def features_stages(model):  # torchvision's Swin and ConvNeXt: features = [stem, stage, downsampling, stage, ...]
    return [([f"features.{i - 1}"], children(model, f"features.{i}")) for i in range(1, len(model.features), 2)]


def resnet_stages(model):  # a layer's first block may downsample or widen: the blocks after it keep the shape
    layers = [children(model, f"layer{i}") for i in range(1, 5)]
    return [(names[:k], names[k:]) for names in layers
            for k in [sum(model.get_submodule(name).downsample is not None for name in names)]]


# stages(model): per stage, the modules before its blocks (stage 1: the model's own forward) and its blocks;
# features(model, h): what a probe reads of the last block's output h, and head: the classifier on them (or
# logits(model, h): GLNet's eval rule); the channel dimension of every h; cls: the representation is [CLS] alone.
Family = collections.namedtuple("Family", "stages features head logits channel_dim cls", defaults=(None, 1, False))


def vit_family(blocks, norm, head):  # [CLS] first, after the final norm
    return Family(lambda m: [([], children(m, blocks))], lambda m, h: m.get_submodule(norm)(h)[:, 0], head,
                  channel_dim=-1, cls=True)


FAMILIES = {
    glnet.GLNet: Family(lambda m: [([f"downsample_layers.{s}"], children(m, f"stages.{s}.blocks")) for s in range(4)],
                        lambda m, h: m.norm(h).mean((2, 3)), "head", lambda m, h: m.forward_head(h)),
    torchvision.models.VisionTransformer: vit_family("encoder.layers", "encoder.ln", "heads"),
    torchvision.models.SwinTransformer: Family(features_stages, lambda m, h: m.flatten(m.avgpool(m.permute(m.norm(h)))),
                                               "head", channel_dim=-1),
    torchvision.models.ConvNeXt: Family(features_stages, lambda m, h: m.classifier[:-1](m.avgpool(h)), "classifier.2"),
    torchvision.models.ResNet: Family(resnet_stages, lambda m, h: m.avgpool(h).flatten(1), "fc"),
    nn.Module: vit_family("blocks", "norm", "head"),  # timm's and DINOv2's ViTs: blocks, norm, cls_token, head
}


class Reached(Exception):  # raised at the first block: the model's own forward has computed h_0 of stage 1
    @staticmethod
    def hook(block, inputs):
        raise Reached(inputs[0])


class Backbone:
    """A model as steps (transitions, blocks) after its embedding: a variant's replace blocks, and run from h_i."""

    def __init__(self, model, image_size):
        self.model, self.image_size = model.eval(), image_size
        self.family = next(f for kind, f in FAMILIES.items() if isinstance(model, kind))
        if self.family is FAMILIES[nn.Module] and not all(hasattr(model, a) for a in ("blocks", "norm", "cls_token")):
            raise InputError(f"{type(model).__name__}: not GLNet, torchvision's ViT, Swin, ResNet, ConvNeXt, or a ViT "
                             f"with blocks, norm, cls_token and head (timm's, DINOv2's)")
        self.steps, self.blocks, self.position = [], [], {}
        for s, (transition, blocks) in enumerate(self.family.stages(model), 1):
            self.steps += [model.get_submodule(name) for name in transition] * (s > 1)
            for i, name in enumerate([None, *blocks]):
                self.steps += [model.get_submodule(name)] if name else []
                self.position[s, i] = len(self.steps)
            self.blocks.append(blocks)
        with torch.no_grad():  # the channels of every stage, and the classifier's outputs
            h = self.trace(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
        self.channels = [h[self.position[s, 0]].shape[self.family.channel_dim] for s in range(1, len(self.blocks) + 1)]
        self.num_outputs = self.output(h[-1], "head").shape[-1]

    def embed(self, x):
        """h_0 of stage 1: the model's own forward up to its first block, whatever it does before."""
        hook = self.steps[0].register_forward_pre_hook(Reached.hook)
        try:
            self.model(x)
        except Reached as reached:
            return reached.args[0]
        finally:
            hook.remove()
        raise InputError(f"{type(self.model).__name__}'s forward never reached its first block")

    def trace(self, x):
        """Every h on the way: [embedding, after 1 step, after 2, ...]; h_{s,i} is trace[position[s, i]]."""
        h = [self.embed(x)]
        for step in self.steps:
            h.append(step(h[-1]))
        return h

    def output(self, h, probe, steps=()):  # after `steps`: the model's logits (probe "head"), or the features
        h, family = functools.reduce(lambda h, step: step(h), steps, h), self.family
        if probe == "head" and family.logits:
            return family.logits(self.model, h)
        features = family.features(self.model, h)
        return self.model.get_submodule(family.head)(features) if probe == "head" else features

    def names(self, run):  # the blocks a run (stage, i, j) replaces: i+1..j
        return self.blocks[run[0] - 1][run[1]:run[2]] if run and run[0] <= len(self.blocks) else []

    def variant(self, run=None, translator=None):
        """(start, steps): the steps with the run's blocks replaced by T (None: removed), the same before start."""
        start, end = (self.position[run[0], run[1]], self.position[run[0], run[2]]) if run else (len(self.steps),) * 2
        return start, self.steps[:start] + [translator] * (translator is not None) + self.steps[end:]

    def replaceable(self, run):  # the run's blocks exist, and are all still real blocks
        names = self.names(run)
        return len(names) == run[2] - run[1] and not any(isinstance(self.model.get_submodule(name), (
            nn.Identity, nn.Conv2d, nn.Linear, Translator)) for name in names)


def replace_blocks(model, names, translator=None):
    """Blocks become T and identities (skipped: identities only); every other parameter keeps its name."""
    for k, name in enumerate(names):
        model.set_submodule(name, translator if k == 0 and translator is not None else nn.Identity())
    return model


def linear_map(channels, channel_dim):  # T on the channels: a 1x1 convolution of a grid, a linear layer of tokens
    return nn.Conv2d(channels, channels, 1) if channel_dim == 1 else nn.Linear(channels, channels)


# --- Models and data: GLNet's checkpoints, torchvision's, timm's and torch.hub's backbones, datasets --

def create(name, weights=None, pretrained=False):
    """A torchvision classifier with its weights, timm's (timm:NAME) or a torch.hub entry (REPO:ENTRY)."""
    try:
        if name in torchvision.models.list_models(module=torchvision.models):
            return torchvision.models.get_model(name, weights=weights)
        source, entry = name.split(":", 1)
        if source == "timm":
            return __import__("timm").create_model(entry, pretrained=pretrained)
        return torch.hub.load(source, entry, source="local" if os.path.isdir(source) else "github",
                              trust_repo=True, pretrained=pretrained)
    except (OSError, RuntimeError) as e:  # offline: urllib's errors, torch.hub's
        where = weights and f"{weights.url} into {torch.hub.get_dir()}/checkpoints/"
        raise InputError(f"cannot download {name}'s {'weights' if where else 'code or weights'} ({e}); download "
                         f"{where or 'the repository and pass its folder as --model FOLDER:ENTRY'}") from e


def weights_of(model, name):  # torchvision's weights of `model` named `name` (DEFAULT, IMAGENET1K_V1, ...)
    if name and model not in torchvision.models.list_models(module=torchvision.models):
        raise InputError(f"--weights takes torchvision's weights; {model} loads its own, or --checkpoint's")
    members = torchvision.models.get_model_weights(model).__members__ if name else {None: None}
    if name not in members:
        raise InputError(f"--weights {name}: {model}'s weights are {', '.join(members)}")
    return members[name]


def build(settings, num_classes):
    """train.load_trained's builder of every backbone, an approximation's runs rebuilt so that it loads strictly."""
    model = (train.build_classifier(settings, num_classes) if settings["model"] in glnet.MODELS
             else create(settings["model"]))
    for run in settings.get("approximated", []):
        backbone = Backbone(model, settings["image_size"])
        channels = backbone.channels[run[0] - 1]
        replace_blocks(model, backbone.names(run), linear_map(channels, backbone.family.channel_dim))
    return model


def load(args):
    """(backbone, settings its approximations keep, eval transform, classes); a GLNet's settings as train.py's."""
    given = {k: v for k, v in vars(args).items() if k in ("model", "data", "image_size") and v is not None}
    if not args.checkpoint and given.get("model", "glnet_mini") in glnet.MODELS:
        raise InputError("pass --checkpoint (a GLNet's, or weights of --model), or --model of torchvision, timm or hub")
    model, checkpoint = train.load_trained(args.checkpoint, build, **given) if args.checkpoint else (
        create(args.model, weights_of(args.model, args.weights), pretrained=True), {})
    saved = checkpoint.get("args", {}) | given
    if isinstance(model, glnet.GLNet):
        s = train.make_settings(given, checkpoint)
        settings, transform = dataclasses.asdict(s), train.eval_transform(s.image_size, s.interpolation, s.crop_pct)
    else:
        weights = weights_of(saved["model"], args.weights or saved.get("weights"))
        size = weights.transforms().crop_size[0] if weights else saved.get("image_size", getattr(model, "image_size",
                                                                                                  224))
        transform = weights.transforms() if weights else train.eval_transform(size, "bicubic")
        settings = {"model": saved["model"], "weights": weights and weights.name, "image_size": size}
    settings |= {"data": saved.get("data"), "approximated": saved.get("approximated", [])}
    if "data" in args and not settings["data"]:  # a command that reads data; train.py's runs name theirs
        if not (isinstance(model, glnet.GLNet) and checkpoint.get("args")):
            raise InputError(f"{args.checkpoint or args.model} does not say which data it is for: pass --data")
        settings["data"] = train.builtin_dataset(s.cache_dir, train.SHAPES_VERSION, train.make_shapes_dataset)
    return Backbone(model.to(args.device), settings["image_size"]), settings, transform, checkpoint.get("classes")


def dataset(name, split, transform, data_dir):
    """A split of a named dataset in data_dir (downloaded when missing) or of an ImageNet-layout folder."""
    if name not in DATASETS:
        return train.image_folder(name, split, transform)
    kind = DATASETS[name]
    try:  # MNIST's grayscale images as 3 channels
        return kind(data_dir, train=split == "train", transform=v2.Compose([v2.RGB(), transform]), download=True)
    except (OSError, RuntimeError) as e:  # offline: urllib's errors, or MNIST's after its mirrors
        files = (f"{', '.join(file for file, _ in kind.resources)} into {os.path.join(data_dir, kind.__name__, 'raw')}"
                 if hasattr(kind, "resources") else f"{kind.filename} ({kind.url}) into {data_dir}")
        raise InputError(f"{name} is not in {data_dir} and cannot be downloaded ({' '.join(str(e).split())}); put "
                         f"{files}") from e


# --- Semantic slots (GLNet paper, Sec. 4.4, Figures 5 and 6) ----------------------------------------

def k_medoids(points, k, iterations=50):
    """k medoids of the rows under cosine distance: farthest points, then alternate assignment and update."""
    unit = F.normalize(points, dim=1)
    distance = 1 - unit @ unit.T
    medoids = [int(distance.sum(1).argmin())]
    while len(medoids) < k:
        medoids.append(int(distance[:, medoids].min(1).values.argmax()))
    for _ in range(iterations):
        assignment = distance[:, medoids].argmin(1)
        cost = torch.where(assignment[:, None] == assignment[None, :], distance, 0).sum(1)  # to its cluster
        updated = [int(torch.where(assignment == c, cost, float("inf")).argmin()) for c in range(k)]
        if updated == medoids:
            break
        medoids = updated
    return medoids


def slot_figure(images, weights, names, k=REPRESENTATIVE_SLOTS):
    """(figure, {(image, block): slots}) of images (N, 3, S, S) and weights {block: (N, 64, h, w)}; each map
    stretched to its own range, as a briefly trained model's are near uniform."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    figure = Figure(figsize=(PANEL_INCHES * (1 + 2 * len(weights)), PANEL_INCHES * len(images) + 0.3),
                    layout="constrained")
    axes = figure.subplots(len(images), 1 + 2 * len(weights), squeeze=False)
    representative = {}
    for n, (row, image, name) in enumerate(zip(axes, images, names)):
        row[0].imshow(image.permute(1, 2, 0).numpy())
        row[0].set_title(f"input: {name}", fontsize="small")
        for (label, block_weights), all_slots, chosen_slots in zip(weights.items(), row[1::2], row[2::2]):
            w = block_weights[n]
            low, high = w.flatten(1).aminmax(dim=1)
            maps = (w - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None]  # each in [0, 1]
            chosen = representative[n, label] = k_medoids(maps.flatten(1), k)

            grid = make_grid(maps[:, None], nrow=8, padding=2, pad_value=float("nan"))[0]  # NaN: white gaps
            all_slots.imshow(grid.numpy(), cmap="jet", vmin=0, vmax=1, interpolation="nearest")
            all_slots.set_title(f"block {label}: all {len(maps)} slots", fontsize="small")
            h, w = maps.shape[1:]
            for slot in chosen:
                all_slots.add_patch(Rectangle((slot % 8 * (w + 2) + 0.5, slot // 8 * (h + 2) + 0.5), w + 2, h + 2,
                                              fill=False, linewidth=2))

            upsampled = F.interpolate(maps[chosen][:, None], size=image.shape[1:], mode="bilinear")[:, 0]
            heat = torch.from_numpy(colormaps["jet"](upsampled.numpy())[..., :3]).permute(0, 3, 1, 2).float()
            overlaid = make_grid(0.5 * image + 0.5 * heat, nrow=2, padding=2, pad_value=1)
            chosen_slots.imshow(overlaid.permute(1, 2, 0).numpy())
            chosen_slots.set_title(f"block {label}: slots {', '.join(map(str, chosen))}", fontsize="small")
            size = image.shape[1] + 2
            for position, slot in enumerate(chosen):
                chosen_slots.text(position % 2 * size + 4, position // 2 * size + 4, str(slot), va="top",
                                  fontsize="small", bbox=dict(facecolor="white", edgecolor="none", pad=1))
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, representative


@torch.no_grad()
def slots(args):
    """Figures 5 and 6: the slots of GLMix blocks"""
    backbone, settings, transform, _ = load(args)
    if not isinstance(model := backbone.model, glnet.GLNet):
        raise InputError(f"slots are GLNet's; {settings['model']} has none")
    blocks = {f"{int(name.split('.')[1]) + 1}.{int(name.split('.')[3]) + 1}": name  # '3.1': 'stages.2.blocks.0'
              for name, m in model.named_modules() if isinstance(m, glnet.GLMixBlock)}
    if set(args.block) - set(blocks):
        raise InputError(f"--block {' '.join(sorted(set(args.block) - set(blocks)))}: not a GLMix block of "
                         f"{settings['model']}; its GLMix blocks (STAGE.BLOCK): {', '.join(blocks)}")
    x = torch.stack([transform(train.load_image(path)) for path in args.image])
    weights = model.clustering_weights(x.to(args.device))
    weights = {block: weights[blocks[block]].cpu() for block in args.block}
    shown = (x * torch.tensor(train.STD)[:, None, None] + torch.tensor(train.MEAN)[:, None, None]).clamp(0, 1)
    names = [os.path.join(*os.path.normpath(path).split(os.sep)[-2:]) for path in args.image]
    figure = slot_figure(shown, weights, names)[0]
    path = os.path.join(args.output_dir, f"slots-{os.path.splitext(os.path.basename(args.image[0]))[0]}.png")
    os.makedirs(args.output_dir, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    print(f"saved {path}: a row per image; input | per block: all 64 slots (8x8, row-major), the "
          f"{REPRESENTATIVE_SLOTS} representative ones (k-medoids) framed | those {REPRESENTATIVE_SLOTS} on the image")
    return path


# --- Calibration: in one pass, the statistics every similarity and every closed-form fit needs ------

class StageStatistics:
    """Running float64 sums over the positions of a stage's h_0..h_n: every similarity and fit without images."""

    def __init__(self, num_representations, channels, device, keep=0):
        self.n, self.channels, self.count, self.keep = num_representations, channels, 0, keep
        size = num_representations * channels
        self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)
        self.cosine_sums = torch.zeros(num_representations, num_representations, dtype=torch.float64, device=device)
        self.kept, self.generator = [], torch.Generator().manual_seed(0)

    def update(self, representations):  # h_0..h_n, each (N, C): the same N positions (tokens or pixels) of each
        h = torch.stack(representations).double()                              # (n, N, C)
        stacked = h.transpose(0, 1).flatten(1)                                 # (N, n C)
        self.gram += stacked.T @ stacked
        self.sums += stacked.sum(0)
        unit = F.normalize(h, dim=2)
        self.cosine_sums += torch.einsum("aNc,bNc->ab", unit, unit)
        self.count += h.shape[1]
        if self.keep:
            self.kept.append(stacked[torch.randperm(len(stacked), generator=self.generator)[:self.keep]].float())

    def pairs(self):  # the Gram matrix as (n, C, n, C): [a, :, b, :] = the sum over positions of h_a h_b^T
        return self.gram.view(self.n, self.channels, self.n, self.channels)

    def block_redundancy(self):
        """Eq. 1: BR(a, b) = -E ||h_a - h_b||^2 = -(E|h_a|^2 + E|h_b|^2 - 2 E h_a.h_b)."""
        inner = self.pairs().diagonal(dim1=1, dim2=3).sum(-1) / self.count  # E h_a.h_b
        squares = inner.diagonal()
        return (2 * inner - squares[:, None] - squares[None, :]).clamp_max(0).cpu()

    def linear_cka(self):
        """Kornblith et al. 2019, positions as examples: ||C_ab||^2 / (||C_aa|| ||C_bb||), C_ab h_a's and h_b's."""
        mean = self.sums.view(self.n, self.channels) / self.count
        cross = ((self.pairs() / self.count - torch.einsum("ac,bd->acbd", mean, mean)) ** 2).sum((1, 3))
        norms = cross.diagonal().sqrt()
        return (cross / (norms[:, None] * norms[None, :]).clamp_min(1e-30)).cpu()

    def cosine(self):  # the mean over positions of the cosine similarity of the two channel vectors
        return (self.cosine_sums / self.count).cpu()

    def least_squares(self, i, j):
        """RBA's h_j ~ W h_i + b by the normal equations [X 1]^T [X 1] S = [X 1]^T Y: (S, the relative residual)."""
        c, sums = self.channels, self.sums.view(self.n, self.channels)
        xtx = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=self.gram.device)
        xtx[:c, :c], xtx[:c, c], xtx[c, :c], xtx[c, c] = self.pairs()[i, :, i], sums[i], sums[i], self.count
        xty = torch.cat([self.pairs()[i, :, j], sums[j][None]])
        xtx, xty, yty = xtx.cpu(), xty.cpu(), self.pairs()[j, :, j].trace().cpu()
        solution = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution  # safe when rank-deficient
        residual = yty - 2 * (solution * xty).sum() + (solution * (xtx @ solution)).sum()
        return solution, (residual / yty.clamp_min(1e-30)).clamp_min(0)

    def fit_residual(self):  # (n, n): the relative residual of the fit h_j ~ T(h_i) for i < j, NaN elsewhere
        return torch.tensor([[float(self.least_squares(i, j)[1]) if i < j else float("nan") for j in range(self.n)]
                             for i in range(self.n)], dtype=torch.float64)

    def fit(self, i, j, channel_dim=1):
        """RBA's T, the least-squares fit h_j ~ T(h_i): a linear map with a bias shared by all positions."""
        solution = self.least_squares(i, j)[0].float()
        linear = linear_map(self.channels, channel_dim)
        with torch.no_grad():
            linear.weight.copy_(solution[:self.channels].T.reshape(linear.weight.shape))
            linear.bias.copy_(solution[self.channels])
        return linear


@torch.no_grad()
def calibrate(args, backbone, images, stages, positions=0):
    """({stage: (similarity, fit statistics)}, images): similarities of the representation ([CLS] of a ViT), fits of
    every position, on the first --calibration-images of a fixed shuffle; `positions` kept for the MLPs."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.calibration_images]
    loader = train.eval_loader(Subset(images, order.tolist()), args.batch_size, args.workers)
    train.log(f"calibration on {len(order)} training images at {backbone.image_size}x{backbone.image_size}")
    statistics, keep = {}, math.ceil(positions / len(loader))
    for step, (x, _) in enumerate(loader, 1):
        if step % PRINT_FREQ == 0 or step == len(loader):
            train.log(f"calibration  batch {step}/{len(loader)}")
        h = backbone.trace(x.to(args.device))
        for s in stages:
            hs = [h[backbone.position[s, i]] for i in range(len(backbone.blocks[s - 1]) + 1)]   # h_0, ..., h_n
            if s not in statistics:
                fit = StageStatistics(len(hs), backbone.channels[s - 1], args.device, keep)
                statistics[s] = StageStatistics(len(hs), fit.channels, args.device) if backbone.family.cls else fit, fit
            statistics[s][1].update([h.movedim(backbone.family.channel_dim, -1).flatten(0, -2) for h in hs])
            if backbone.family.cls:
                statistics[s][0].update([h[:, 0] for h in hs])
    return statistics, len(order)


# --- Block Redundancy matrices -------------------------------------------------------------------

def redundancy_figure(matrices, title=""):
    """The BR paper's layout: a heatmap per metric (rows) and stage (columns), the values in the cells, a
    colour bar per metric shared by the stages, from 0 (or the lowest entry, when negative) to the highest."""
    from matplotlib.figure import Figure

    sizes = [len(m) for m in matrices[METRICS[0]].values()]
    figure = Figure(figsize=(CELL_INCHES * sum(sizes) + 1.2 * len(sizes) + 1,
                             (CELL_INCHES * max(sizes) + 0.8) * len(matrices)), layout="constrained")
    figure.suptitle(title, wrap=True)
    axes = figure.subplots(len(matrices), len(sizes), squeeze=False, gridspec_kw=dict(width_ratios=sizes))
    for row, (metric, per_stage) in zip(axes, matrices.items()):
        values = torch.cat([m.flatten() for m in per_stage.values()])
        low, high = min(float(values.min()), 0.0), float(values.max())
        for ax, (s, matrix) in zip(row, per_stage.items()):
            image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=low, vmax=high)
            ticks = [f"h{a}" for a in range(len(matrix))]
            ax.set(title=f"stage {s} - {metric}", xticks=range(len(ticks)), xticklabels=ticks,
                   yticks=range(len(ticks)), yticklabels=ticks)
            for a, values in enumerate(matrix.tolist()):
                for b, value in enumerate(values):
                    ax.text(b, a, f"{value:.3g}", ha="center", va="center", fontsize="small",
                            color="white" if image.norm(value) < 0.5 else "black")
        figure.colorbar(image, ax=row, label=metric)
    return figure


def redundancy(args):
    """BR, linear CKA and cosine matrices of every stage"""
    backbone, settings, transform, _ = load(args)
    statistics, images = calibrate(args, backbone, dataset(settings["data"], "train", transform, args.data_dir),
                                   range(1, len(backbone.blocks) + 1))
    matrices = {metric: {s: getattr(stats[0], method)() for s, stats in statistics.items()}
                for metric, method in zip(METRICS, ("block_redundancy", "linear_cka", "cosine"))}
    os.makedirs(args.output_dir, exist_ok=True)
    png, table = os.path.join(args.output_dir, "redundancy.png"), os.path.join(args.output_dir, "redundancy.json")
    title = (f"{settings['model']}: similarity of the representations of each stage on {images} calibration images "
             f"({'[CLS] tokens' if backbone.family.cls else 'every position'}; h0 = stage input, hi = block i's "
             f"output)")
    redundancy_figure(matrices, title).savefig(png, dpi=DPI)
    with open(table, "w") as f:
        json.dump({metric: {s: m.tolist() for s, m in per_stage.items()} for metric, per_stage in matrices.items()}, f)
    print(f"\nsaved {png} (rows: {', '.join(METRICS)}; columns: stages) and {table}")
    return matrices


# --- Redundant Blocks Approximation (the BR paper's Tables 2-4: original / skipped / approximated) ----

def run_argument(text):
    """An argparse type: '3:1-3' -> (3, 1, 3), replace blocks 2..3 of stage 3 by a map from h_1 to h_3."""
    match = re.fullmatch(r"(\d+):(\d+)-(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) >= int(match[3]):
        raise argparse.ArgumentTypeError(f"expected STAGE:I-J with I < J (replace blocks I+1..J of STAGE, numbered "
                                         f"from 1; I = 0 is the stage input), e.g. 3:1-3; got {text!r}")
    return tuple(int(v) for v in match.groups())


def label(run):
    return f"{run[0]}:{run[1]}-{run[2]}" if run else None


class Translator(nn.Module):
    """The BR paper's Table 4 T on the channels: Linear -> GELU -> Linear, or residual: h + MLP(LayerNorm(h))."""

    def __init__(self, channels, residual, channel_dim=-1):
        super().__init__()
        self.norm, self.channel_dim = nn.LayerNorm(channels) if residual else None, channel_dim
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))

    def forward(self, h):
        h = h.movedim(self.channel_dim, -1)
        return (self.mlp(h) if self.norm is None else h + self.mlp(self.norm(h))).movedim(-1, self.channel_dim)


def fit(module, data, loss, evaluate, metric, batch_size, **settings):
    """The last epoch's record of train.py's Trainer at a constant lr (AdamW without decay is Adam), no files."""
    batch_size, device = min(batch_size, len(data)), next(module.parameters()).device
    task = train.Task("analysis", data, lambda model, batch: loss(model, *(t.to(device) for t in batch)), evaluate,
                      metric, batch_size, 0, [])
    with tempfile.TemporaryDirectory() as tmp:
        settings = train.Settings(output_dir=tmp, batch_size=batch_size, workers=0, amp="none", lr_schedule="step",
                                  eval_interval=10 ** 9, print_freq=10 ** 9, **settings)
        return train.Trainer(settings, module, task, device=device).fit()


def train_translator(kind, x, y, channel_dim=-1, steps=TRANSLATOR_STEPS, lr=TRANSLATOR_LR, batch_size=TRANSLATOR_BATCH):
    """(translator, record): 'mlp' or 'resmlp' trained with Adam on the squared error from x = h_i to y = h_j."""
    torch.manual_seed(0)
    translator = Translator(x.shape[1], kind == "resmlp", channel_dim).to(x.device)
    evaluate = torch.no_grad()(lambda model: {"mse": F.mse_loss(model(x), y).item()})
    record = fit(translator, TensorDataset(x.cpu(), y.cpu()), lambda model, x, y: F.mse_loss(model(x), y), evaluate,
                 "mse", batch_size, model=f"{kind} translator", iters=steps, lr=lr, weight_decay=0.0)
    return translator.eval(), record


@torch.no_grad()
def encode(backbone, variants, loader, probe, device):
    """({variant: logits or features}, labels): per batch the original's pass once, each variant's from its h_i."""
    variants = {key: backbone.variant(*v) for key, v in variants.items()}
    outputs, labels = {key: [] for key in variants}, []
    for step, (x, y) in enumerate(loader, 1):
        if step % PRINT_FREQ == 0 or step == len(loader):
            train.log(f"encoding  batch {step}/{len(loader)}")
        h = backbone.trace(x.to(device))
        for key, (start, steps) in variants.items():
            outputs[key].append(backbone.output(h[start], probe, steps[start:]).float().cpu())
        labels.append(y)
    return {key: torch.cat(v) for key, v in outputs.items()}, torch.cat(labels)


def train_probe(kind, features, labels, test, classes, seed, device):
    """{top1, loss, images} on `test` of the BR paper's probe on frozen features; seeded, so reproducible."""
    torch.manual_seed(seed)
    c, k = features.shape[1], len(classes)
    probe = nn.Linear(c, k) if kind == "linear" else nn.Sequential(
        nn.Linear(c, c), nn.Dropout(0.5), nn.LayerNorm(c), nn.SiLU(), nn.Linear(c, k))
    evaluate = functools.partial(train.evaluate, loader=DataLoader(TensorDataset(*test), PROBE_BATCH), device=device)
    record = fit(probe.to(device), TensorDataset(features, labels), lambda model, x, y: F.cross_entropy(model(x), y),
                 evaluate, "top1", PROBE_BATCH, model=f"{kind} probe", seed=seed, **PROBES[kind])
    return {key: record[f"val_{key}"] for key in ("top1", "loss", "images")}


def accuracy(args, backbone, settings, transform, classes, variants):
    """{variant: {top1, loss, images}} on --data's validation split: by the classifier, or a probe (--probe)."""
    test = dataset(settings["data"], "val", transform, args.data_dir)
    probe = args.probe or ("head" if backbone.num_outputs == len(test.classes) and classes in (None, test.classes)
                           else "linear")
    train.log(f"top-1 by {'the classifier' if probe == 'head' else f'a {probe} probe'} of each model")
    splits = [test] if probe == "head" else [test, dataset(settings["data"], "train", transform, args.data_dir)]
    (outputs, labels), *trained = [encode(backbone, variants, train.eval_loader(images, args.batch_size, args.workers),
                                          probe, args.device) for images in splits]
    if probe == "head":
        return {key: train.evaluate(nn.Identity(), DataLoader(TensorDataset(v, labels), args.batch_size), args.device)
                for key, v in outputs.items()}
    return {key: train_probe(probe, trained[0][0][key], trained[0][1], (v, labels), test.classes, args.seed,
                             args.device) for key, v in outputs.items()}


def measure(backbone, variants, rounds, device):
    """{variant: dict(params (M), gflops, ms)} of one image; interleaved timing: noise hits the variants alike."""
    x, costs, calls = torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=device), {}, {}
    for key, (run, translator) in variants.items():
        model = replace_blocks(copy.deepcopy(backbone.model), backbone.names(run), translator)
        costs[key] = dict(params=glnet.count_params(model) / 1e6, gflops=glnet.flop_analysis(model, x).total() / 1e9)
        steps = backbone.variant(run, translator)[1]
        calls[key] = lambda steps=steps: backbone.output(backbone.embed(x), "head", steps)
    with torch.inference_mode():
        seconds = train.interleaved_medians(calls, rounds, device)
    return {key: cost | {"ms": 1000 * seconds[key]} for key, cost in costs.items()}


def approximate(args):
    """replace redundant blocks by a linear map (or an MLP) and measure the result"""
    backbone, settings, transform, classes = load(args)
    if args.blocks and not backbone.replaceable(args.blocks):
        raise InputError(f"--blocks {label(args.blocks)}: this model has no such blocks, or some were already "
                         f"replaced (its stages have {', '.join(str(len(b)) for b in backbone.blocks)} blocks)")
    stages = [args.blocks[0]] if args.blocks else range(1, len(backbone.blocks) + 1)
    statistics = calibrate(args, backbone, dataset(args.fit_on or settings["data"], "train", transform, args.data_dir),
                           stages, TRANSLATOR_POSITIONS if set(args.translator) - {"linear"} else 0)[0]
    scores = {s: fit.fit_residual() if args.rank_by == "residual" else -similarity.block_redundancy()
              for s, (similarity, fit) in statistics.items()}
    runs = [args.blocks] if args.blocks else sorted(  # the K most redundant runs of real blocks
        filter(backbone.replaceable, [(s, i, j) for s, m in scores.items() for i in range(len(m))
                                      for j in range(i + 1, len(m))]), key=lambda run: float(scores[run[0]][run[1:]]))
    variants, records = {(None, "original"): (None, None)}, {(None, "original"): {"score": None, "fit_s": None}}
    for run, mode in itertools.product(runs[:args.search], [*dict.fromkeys(["linear", *args.translator]), "skip"]):
        start, stats, translator = time.perf_counter(), statistics[run[0]][1], None
        if mode == "linear":
            translator = stats.fit(run[1], run[2], backbone.family.channel_dim)
        elif mode != "skip":  # an MLP of Table 4, trained on the kept positions of h_i and h_j
            kept = torch.cat(stats.kept).view(-1, stats.n, stats.channels)
            translator = train_translator(mode, kept[:, run[1]], kept[:, run[2]], backbone.family.channel_dim)[0]
        variants[run, mode] = run, translator
        records[run, mode] = {"score": float(scores[run[0]][run[1:]]),
                              "fit_s": None if translator is None else time.perf_counter() - start}
    accuracies = accuracy(args, backbone, settings, transform, classes, variants)
    for key, cost in measure(backbone, variants, args.latency_rounds, args.device).items():
        records[key] |= {"top1": accuracies[key]["top1"], "loss": accuracies[key]["loss"], "delta": accuracies[key][
            "top1"] - accuracies[None, "original"]["top1"]} | cost
    print(f"\n{'run':<8}{SCORES[args.rank_by]:>13}{'mode':>9}{'top-1':>8}{'delta':>8}{'params (M)':>12}{'GFLOPs':>9}"
          f"{'ms':>8}{'fit (s)':>9}")
    for (run, mode), r in records.items():  # the BR paper's tables, a line per (run, mode)
        score, fit = ("-" if v is None else f"{v:{spec}}" for v, spec in ((r["score"], ".4g"), (r["fit_s"], ".3f")))
        print(f"{label(run) or '-':<8}{score:>13}{mode:>9}{r['top1']:>8.2f}{r['delta']:>+8.2f}{r['params']:>12.3f}"
              f"{r['gflops']:>9.4f}{r['ms']:>8.2f}{fit:>9}")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "approximate.json"), "w") as f:
        json.dump([{"run": label(run), "mode": mode} | r for (run, mode), r in records.items()], f, indent=1)
    if args.blocks:  # the linear approximation, as `build` rebuilds it
        path = os.path.join(args.output_dir, "approximated.pth")
        replace_blocks(backbone.model, backbone.names(args.blocks), variants[args.blocks, "linear"][1])
        train.save_checkpoint({"model": backbone.model.state_dict(), "classes": classes, "args": settings | {
            "approximated": [*settings["approximated"], list(args.blocks)]}}, path)
        print(f"saved the linear approximation: python analyze.py evaluate --checkpoint {path}")
    return records


def evaluate(args):
    """top-1 of any backbone, approximated ones too"""
    backbone, settings, transform, classes = load(args)
    metrics = accuracy(args, backbone, settings, transform, classes, {(None, "original"): (None, None)})
    metrics = metrics[None, "original"]
    print(f"{args.checkpoint or args.model} ({settings['model']}, approximated runs: "
          f"{', '.join(map(label, settings['approximated'])) or 'none'}; {glnet.count_params(backbone.model) / 1e6:.3f}"
          f" M params) on {metrics['images']} images of {settings['data']}: {train.format_metrics(metrics)}")
    return metrics


# --- Command line --------------------------------------------------------------------------------

def model_name(text):  # an argparse type: the backbones analyze.py can build
    if text in glnet.MODELS or text in torchvision.models.list_models(module=torchvision.models) or ":" in text:
        return text
    raise argparse.ArgumentTypeError(f"expected a GLNet, a torchvision classifier, timm:NAME or REPO:ENTRY; got "
                                     f"{text!r}")


def parse_args(argv=None):
    parser = train.Parser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = {run.__name__: commands.add_parser(run.__name__, help=run.__doc__) for run in COMMANDS}
    default = "(default: %(default)s)"
    for name, flag in ((name, command.add_argument) for name, command in p.items()):
        flag("--model", type=model_name, help="a GLNet (default: the checkpoint's), a torchvision classifier, "
             "timm:NAME, or torch.hub's REPO:ENTRY (REPO: owner/name, or a folder with a hubconf.py)")
        flag("--checkpoint", help="of train.py or approximate, a released GLNet's, or a state_dict of --model")
        flag("--weights", help="torchvision's weights of --model: DEFAULT, IMAGENET1K_V1, ...")
        flag("--image-size", type=train.at_least(32), help="default: the checkpoint's or weights', else 224")
        flag("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu", help=default)
        if name != "slots":
            flag("--data", help=f"{', '.join(DATASETS)} (in --data-dir), or an ImageNet-layout folder")
            flag("--data-dir", default=DATA_DIR, help=f"of the named datasets, downloaded when missing {default}")
            flag("--batch-size", type=train.at_least(1), default=BATCH_SIZE, help=default)
            flag("--workers", type=train.at_least(0), default=train.Settings.workers, help=f"loaders {default}")
        if name in ("approximate", "evaluate"):
            flag("--probe", choices=["head", "linear", "mlp"], help="top-1 by the model's classifier or the BR "
                 "paper's probe on frozen features (default: head if it has the data's classes, else linear)")
            flag("--seed", type=train.at_least(0), default=0, help=f"of the probe {default}")
        if name in ("redundancy", "approximate"):
            flag("--calibration-images", type=train.at_least(1), default=CALIBRATION_IMAGES, help=default)
        if name != "evaluate":
            flag("--output-dir", default=OUTPUT_DIR, help=default)
    p["slots"].add_argument("--image", required=True, nargs="+", help="one row of the figure per image")
    p["slots"].add_argument("--block", default=[SLOT_BLOCK], nargs="+", help=f"STAGE.BLOCK, from 1 {default}")
    runs, flag = p["approximate"].add_mutually_exclusive_group(required=True), p["approximate"].add_argument
    runs.add_argument("--blocks", type=run_argument, metavar="STAGE:I-J", help="replace blocks I+1..J of STAGE by "
                      "a map from h_I to h_J, saved to <output-dir>/approximated.pth")
    runs.add_argument("--search", type=train.at_least(1), metavar="K", help="evaluate the K most redundant runs")
    flag("--rank-by", default="residual", choices=list(SCORES), help=f"residual: the fit's error, br: -BR {default}")
    flag("--translator", nargs="+", default=["linear"], choices=TRANSLATORS, help=f"the paper's Table 4 {default}")
    flag("--fit-on", help="fit T on this dataset's training images (default: --data)")
    flag("--latency-rounds", type=train.at_least(1), default=LATENCY_ROUNDS, help=default)
    return parser.parse_args(argv)


COMMANDS = (slots, redundancy, approximate, evaluate)


def main(argv=None):
    args = parse_args(argv)
    return next(run for run in COMMANDS if run.__name__ == args.command)(args)


if __name__ == "__main__":
    train.run(main)
