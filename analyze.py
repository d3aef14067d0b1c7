"""Look inside a trained GLNet: its semantic slots, and its redundant blocks.

    python analyze.py slots --checkpoint runs/glnet_mini-builtin/best.pth --image a.jpg b.jpg --block 2.1 3.1
    python analyze.py redundancy --checkpoint runs/glnet_mini-builtin/best.pth
    python analyze.py approximate --checkpoint runs/glnet_mini-builtin/best.pth --blocks 3:1-3 --translator mlp resmlp
    python analyze.py approximate --checkpoint runs/glnet_mini-builtin/best.pth --search 9
    python analyze.py evaluate --checkpoint analysis/approximated.pth

`slots` is Figure 5 of the GLNet paper (Figure 6 with several blocks): the soft clustering weights
softmax(A) (Eq. 3) of GLMix blocks, one map per semantic slot, and 4 representative slots chosen by
k-medoids.

`redundancy` and `approximate` follow "Detecting and Approximating Redundant Computational Blocks in
Neural Networks" (ICLR 2025 submission). Stages and blocks are numbered from 1 as in the papers; the
representations of a stage are h_0 (the stage input: the output of its downsampling layer) and h_i,
the output of its block i. Block Redundancy (Eq. 1) is the negative mean squared distance
BR(i, j) = -E_{x, p} ||h_i(x)_p - h_j(x)_p||^2 over the calibration images x and all positions p;
0 means identical representations. Redundant Blocks Approximation (RBA) replaces blocks i+1..j by one
linear map T with h_j ~ T(h_i), fitted in closed form on the calibration subset; on a feature grid,
a map shared by all positions is a 1x1 convolution. Linear CKA and cosine similarity are computed
beside BR, as in the paper's rebuttal (its Figure 7), and so are its Table 4 baselines for T (an MLP
and a residual MLP trained with Adam). BR depends on the features' scale, so `--search` ranks runs by
a scale-free score: the relative residual of the fit of T unless `--rank-by` says otherwise.

Checkpoints of train.py say which model, data and image size they are for; the approximated models
this script saves record their base model and replaced runs, so every command reads them too.
"""

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Subset

import glnet
import train

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

CALIBRATION_IMAGES = 3000      # the paper's calibration subset of the training set
BATCH_SIZE = 64
PRINT_FREQ = 10                # a progress line every N calibration batches
OUTPUT_DIR = "analysis"
SLOT_BLOCK = "3.1"             # Figure 5: the first block of stage 3
REPRESENTATIVE_SLOTS = 4
PANEL_INCHES = 2.4            # each panel of the slot figure
CELL_INCHES = 0.5             # each entry of a redundancy heatmap
DPI = 120
LATENCY_ROUNDS = 20
METRICS = ("BR", "linear CKA", "cosine")
# Scores of a run h_i -> h_j for --rank-by, lower = more redundant: raw BR (as -BR), and three that
# ignore the features' scale. The default correlated best with the approximated top-1 on the
# built-in model (Spearman's rho over its 9 runs: residual -0.83, relative-br -0.53, cka -0.48, br +0.17).
SCORES = {"br": "-BR", "relative-br": "-BR / norm", "cka": "1 - CKA", "residual": "fit residual"}
RANK_BY = "residual"
TRANSLATORS = ("linear", "mlp", "resmlp")
TRANSLATOR_STEPS = 300         # the BR paper's Table 4: Adam, 300 steps, lr 1e-3
TRANSLATOR_LR = 1e-3
TRANSLATOR_BATCH = 1024        # calibration positions per step
TRANSLATOR_POSITIONS = 32768   # calibration positions kept for the MLP translators (a fixed random subset)


# ---------------------------------------------------------------------------------------------
# Models: train.py checkpoints, released weights and approximated models
# ---------------------------------------------------------------------------------------------

def replace_blocks(model, stage, i, j, replacement=None):
    """Replace blocks i+1..j of `stage` (1-based) by `replacement` (the linear map T) followed by
    identities, or by identities only (skipping them). Keeping the block count keeps the names of
    all other parameters, so an approximated model's state_dict reads like its base model's."""
    blocks = model.stages[stage - 1].blocks
    blocks[i] = replacement if replacement is not None else nn.Identity()
    for k in range(i + 1, j):
        blocks[k] = nn.Identity()
    return model


def linear_map(channels):
    """T of RBA: one linear map with a bias shared by all positions of the grid."""
    return nn.Conv2d(channels, channels, 1)


def build_model(checkpoint, model_name=None):
    """The model a loaded checkpoint is for, with its weights: train.py's (args.model), ours (with
    'approximated' runs rebuilt first), or a released one (give `model_name`)."""
    trained = checkpoint.get("args", {})
    name = model_name or checkpoint.get("base_model") or trained.get("model")
    if name is None:
        raise ValueError(f"the checkpoint does not say which model it is for: "
                         f"pass --model ({', '.join(glnet.MODELS)})")
    state_dict = glnet.unwrap_state_dict(checkpoint)
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    options = {"token_head": True} if "token_head.weight" in state_dict else {}  # train.py --token-labels
    if not checkpoint.get("approximated"):
        return glnet.create_model(name, num_classes=num_classes, checkpoint=state_dict, **options).eval(), name
    model = glnet.create_model(name, num_classes=num_classes, **options)  # rebuilt as approximated, then loaded
    for stage, i, j in checkpoint["approximated"]:
        replace_blocks(model, stage, i, j, linear_map(model.stage_channels[stage - 1]))
    glnet.load_checkpoint(model, state_dict)
    return model.eval(), name


def load_model(args):
    """(model, info): info has the base model name, image size and data folder to use, taken from
    the command line first, then from the checkpoint."""
    checkpoint = glnet.read_checkpoint(args.checkpoint)
    model, name = build_model(checkpoint, args.model)
    trained = checkpoint.get("args", {})
    image_size = args.image_size or trained.get("image_size") or train.IMAGENET_RECIPE["image_size"]
    info = dict(model=name, image_size=image_size,
                data=args.data or trained.get("data"), cache_dir=trained.get("cache_dir", train.DEFAULT_CACHE),
                approximated=checkpoint.get("approximated", []))
    return model, info


def save_approximated(model, info, runs, path):
    """Atomically, with what build_model needs to rebuild the structure before a strict load."""
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "base_model": info["model"],
             "approximated": [list(run) for run in info["approximated"] + runs],
             "args": {"model": info["model"], "image_size": info["image_size"], "data": info["data"],
                      "cache_dir": info["cache_dir"]}}
    train.save_checkpoint(state, path)


def data_dir(info):
    return info["data"] or train.shapes_dataset(info["cache_dir"])


# ---------------------------------------------------------------------------------------------
# Semantic slots (GLNet paper, Sec. 4.4 and Figure 5)
# ---------------------------------------------------------------------------------------------

def block_argument(text):
    """'3.1' -> '3.1', for argparse: a usage error unless it reads STAGE.BLOCK."""
    stage, dot, block = text.partition(".")
    if not (dot and stage.isdigit() and block.isdigit() and int(stage) >= 1 and int(block) >= 1):
        raise argparse.ArgumentTypeError(f"expected STAGE.BLOCK, numbered from 1 (e.g. 3.1), got {text!r}")
    return text


def parse_block(text, model):
    """'3.1' -> 'stages.2.blocks.0' (stage 3, block 1), checked against the model's GLMix blocks."""
    stage, block = (int(v) for v in block_argument(text).split("."))
    name = f"stages.{stage - 1}.blocks.{block - 1}"
    glmix = [n for n, m in model.named_modules() if isinstance(m, glnet.GLMixBlock)]
    if name not in glmix:
        known = ", ".join(f"{int(n.split('.')[1]) + 1}.{int(n.split('.')[3]) + 1}" for n in glmix)
        raise ValueError(f"--block {text} is not a GLMix block of this model; its GLMix blocks: {known}")
    return name


def k_medoids(points, k, iterations=50):
    """Indices of k medoids of the rows of `points` under cosine distance: farthest-point
    initialisation from the most central point, then alternate assignment and medoid update."""
    unit = F.normalize(points, dim=1)
    distance = 1 - unit @ unit.T
    medoids = [int(distance.sum(1).argmin())]
    while len(medoids) < k:
        medoids.append(int(distance[:, medoids].min(1).values.argmax()))
    medoids = torch.tensor(medoids)
    for _ in range(iterations):
        assignment = distance[:, medoids].argmin(1)
        updated = medoids.clone()
        for c in range(k):
            members = (assignment == c).nonzero().flatten()
            if len(members):  # empty only when medoids coincide (identical maps)
                updated[c] = members[distance[members][:, members].sum(1).argmin()]
        if torch.equal(updated, medoids):
            break
        medoids = updated
    return medoids.tolist()


def mosaic(tiles, columns, fill):
    """(N, C, h, w) tiles -> one (rows * (h + 2), columns * (w + 2), C) image, a 1-pixel border of
    `fill` around each tile."""
    return rearrange(F.pad(tiles, (1, 1, 1, 1), value=fill), "(r c) ch h w -> (r h) (c w) ch", c=columns)


def slot_figure(images, weights, names, k=REPRESENTATIVE_SLOTS):
    """Figure 5 of the paper, one row per image, and, as in its Figure 6, a pair of panels per
    block: the input image, then for each block the assignment maps of all 64 slots (8x8, row-major,
    the representative ones framed in black) and the k representative slots (k-medoids) overlaid on the
    image. Each map is stretched to its own range: a briefly trained model's maps are close to
    uniform. `images` (N, 3, S, S) in [0, 1], `weights` {block label: (N, 64, h, w)}.
    Returns the matplotlib figure and {(image index, block label): representative slot indices}."""
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
            maps = (w - low[:, None, None]) / (high - low).clamp_min(1e-12)[:, None, None]   # each in [0, 1]
            chosen = representative[n, label] = k_medoids(maps.flatten(1), k)

            all_slots.imshow(mosaic(maps[:, None], 8, float("nan"))[..., 0].numpy(), cmap="jet", vmin=0, vmax=1,
                             interpolation="nearest")                 # NaN borders show the white background
            all_slots.set_title(f"block {label}: all {len(maps)} slots", fontsize="small")
            h, w = maps.shape[1:]
            for slot in chosen:
                all_slots.add_patch(Rectangle((slot % 8 * (w + 2) - 0.5, slot // 8 * (h + 2) - 0.5), w + 2, h + 2,
                                              fill=False, linewidth=2))

            upsampled = F.interpolate(maps[chosen][:, None], size=image.shape[1:], mode="bilinear")[:, 0]
            heat = torch.from_numpy(colormaps["jet"](upsampled.numpy())[..., :3]).permute(0, 3, 1, 2).float()
            chosen_slots.imshow(mosaic(0.5 * image + 0.5 * heat, 2, 1.0).numpy())
            chosen_slots.set_title(f"block {label}: slots {', '.join(map(str, chosen))}", fontsize="small")
            size = image.shape[1] + 2
            for position, slot in enumerate(chosen):
                chosen_slots.text(position % 2 * size + 2, position // 2 * size + 2, str(slot), va="top",
                                  fontsize="small", bbox=dict(facecolor="white", edgecolor="none", pad=1))
    for ax in axes.flat:
        ax.set_axis_off()
    return figure, representative


@torch.no_grad()
def slots(args):
    model, info = load_model(args)
    blocks = {text: parse_block(text, model) for text in args.block}
    transform = train.eval_transform(info["image_size"])
    x = torch.stack([transform(train.load_image(path)) for path in args.image])
    weights = model.to(args.device).clustering_weights(x.to(args.device))
    weights = {text: weights[name].cpu() for text, name in blocks.items()}
    shown = (x * torch.tensor(train.STD)[:, None, None] + torch.tensor(train.MEAN)[:, None, None]).clamp(0, 1)
    names = [os.path.join(*os.path.normpath(path).split(os.sep)[-2:]) for path in args.image]
    figure, representative = slot_figure(shown, weights, names)
    path = args.output or os.path.join(OUTPUT_DIR, f"slots-{os.path.splitext(os.path.basename(args.image[0]))[0]}.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=DPI)
    train.log(f"{info['model']} at {info['image_size']}x{info['image_size']}, 64 slots per GLMix block; "
              f"representative slots (k-medoids):")
    for (n, label), chosen in representative.items():
        w = weights[label][n]
        peak = float(w.flatten(1).amax(1).mean() * w[0].numel())
        train.log(f"  {names[n]}  block {label} ({w.shape[1]}x{w.shape[2]} maps, peaks on average {peak:.2f}x the "
                  f"uniform weight): {chosen}")
    train.log(f"saved {path}: one row per image; input | per block: all 64 slots (8x8, row-major) | "
              f"the {REPRESENTATIVE_SLOTS} representative slots")
    return path


# ---------------------------------------------------------------------------------------------
# Calibration: the statistics every similarity and every closed-form fit needs, in one pass
# ---------------------------------------------------------------------------------------------

def calibration_loader(info, num_images, batch_size, workers):
    """The first `num_images` of a fixed shuffle of the training set, without augmentation."""
    folder = data_dir(info)
    train.check_layout(folder, splits=("train",))
    dataset = train.image_folder(folder, "train", train.eval_transform(info["image_size"]))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    subset = Subset(dataset, order[:min(num_images, len(dataset))].tolist())
    return DataLoader(subset, batch_size, num_workers=workers)


class StageStatistics:
    """Running float64 sums over all calibration positions of the representations h_0..h_n of one
    stage, stacked along the channels: their Gram matrix P = H^T H (all pairs h_a^T h_b), their
    sums, and the summed per-position cosine of every pair. BR, linear CKA and every least-squares
    fit h_i -> h_j follow from these, so 3000 images never sit in memory. With `keep` > 0 it also
    keeps `keep` random positions of every batch: the MLP translators train on them."""

    def __init__(self, num_representations, channels, device, keep=0):
        self.n, self.channels, self.count, self.keep = num_representations, channels, 0, keep
        size = num_representations * channels
        self.gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.sums = torch.zeros(size, dtype=torch.float64, device=device)
        self.cosine_sums = torch.zeros(num_representations, num_representations, dtype=torch.float64, device=device)
        self.kept, self.generator = [], torch.Generator().manual_seed(0)

    def update(self, representations):
        h = torch.stack([rearrange(r, "b c h w -> (b h w) c") for r in representations]).double()  # (n, N, C)
        stacked = rearrange(h, "n N c -> N (n c)")
        self.gram += stacked.T @ stacked
        self.sums += stacked.sum(0)
        unit = F.normalize(h, dim=2)
        self.cosine_sums += torch.einsum("aNc,bNc->ab", unit, unit)
        self.count += h.shape[1]
        if self.keep:
            self.kept.append(stacked[torch.randperm(len(stacked), generator=self.generator)[:self.keep]].float())

    def block(self, matrix, a, b):
        c = self.channels
        return matrix[a * c:(a + 1) * c, b * c:(b + 1) * c]

    def mean(self, a):
        return self.sums[a * self.channels:(a + 1) * self.channels] / self.count

    def positions(self, a):
        """The kept positions of h_a: (N, C)."""
        return torch.cat(self.kept)[:, a * self.channels:(a + 1) * self.channels]

    def inner_products(self):
        """(n, n): E h_a.h_b over all positions."""
        return torch.stack([torch.stack([self.block(self.gram, a, b).trace() for b in range(self.n)])
                            for a in range(self.n)]) / self.count

    def block_redundancy(self):
        """Eq. 1: BR(a, b) = -E ||h_a - h_b||^2 = -(E|h_a|^2 + E|h_b|^2 - 2 E h_a.h_b)."""
        inner = self.inner_products()
        squares = inner.diagonal()
        return (2 * inner - squares[:, None] - squares[None, :]).clamp_max(0)

    def relative_distance(self):
        """-BR over the mean squared norm of the two representations: E||h_a - h_b||^2 /
        ((E|h_a|^2 + E|h_b|^2) / 2), in [0, 4] whatever the features' scale."""
        squares = self.inner_products().diagonal()
        return -self.block_redundancy() / ((squares[:, None] + squares[None, :]) / 2).clamp_min(1e-30)

    def linear_cka(self):
        """Kornblith et al. 2019, positions as examples: ||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F) with
        C_ab the cross-covariance of h_a and h_b."""
        cov = [[self.block(self.gram, a, b) / self.count - torch.outer(self.mean(a), self.mean(b))
                for b in range(self.n)] for a in range(self.n)]
        norms = torch.stack([cov[a][a].norm() for a in range(self.n)])
        cross = torch.stack([torch.stack([cov[a][b].norm() ** 2 for b in range(self.n)]) for a in range(self.n)])
        return cross / (norms[:, None] * norms[None, :]).clamp_min(1e-30)

    def cosine(self):
        """Mean over positions of the cosine similarity of the two channel vectors."""
        return self.cosine_sums / self.count

    def least_squares(self, i, j):
        """RBA's closed form: least squares h_j ~ W h_i + b over all positions, from the normal
        equations [X 1]^T [X 1] S = [X 1]^T Y with S = [W^T; b^T]. Returns S (C + 1, C) and the fit's
        relative residual ||Y - [X 1] S||^2 / ||Y||^2 (all in float64, on the CPU)."""
        c = self.channels
        xtx = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=self.gram.device)
        xtx[:c, :c] = self.block(self.gram, i, i)
        xtx[:c, c] = xtx[c, :c] = self.sums[i * c:(i + 1) * c]
        xtx[c, c] = self.count
        xty = torch.cat([self.block(self.gram, i, j), self.sums[j * c:(j + 1) * c][None]])
        xtx, xty, yty = xtx.cpu(), xty.cpu(), self.block(self.gram, j, j).trace().cpu()
        solution = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution  # rank-deficient safe
        residual = yty - 2 * (solution * xty).sum() + (solution * (xtx @ solution)).sum()
        return solution, (residual / yty.clamp_min(1e-30)).clamp_min(0)

    def fit_residual(self):
        """(n, n): the relative residual of the least-squares fit h_j ~ T(h_i) for i < j (NaN elsewhere)."""
        residual = torch.full((self.n, self.n), float("nan"), dtype=torch.float64)
        for i in range(self.n):
            for j in range(i + 1, self.n):
                residual[i, j] = self.least_squares(i, j)[1]
        return residual

    def fit(self, i, j):
        """T = (W (C, C), b (C,)) of the least-squares fit h_j ~ W h_i + b."""
        solution = self.least_squares(i, j)[0]
        return solution[:self.channels].T.float(), solution[self.channels].float()


def stage_representations(model, stage):
    """Forward hooks that collect h_0 (the downsampling layer's output) and h_1..h_n of a stage."""
    outputs = []
    modules = [model.downsample_layers[stage - 1], *model.stages[stage - 1].blocks]
    hooks = [m.register_forward_hook(lambda module, inputs, output: outputs.append(output)) for m in modules]
    return outputs, hooks


@torch.no_grad()
def calibrate(model, loader, device, stages=(1, 2, 3, 4), print_freq=PRINT_FREQ, positions=0):
    """One pass over the calibration subset: {stage: StageStatistics}, each keeping about
    `positions` random positions of its representations, spread evenly over the batches."""
    model.eval().to(device)
    collected = {s: stage_representations(model, s) for s in stages}
    keep = math.ceil(positions / len(loader))
    statistics = {s: StageStatistics(len(model.stages[s - 1].blocks) + 1, model.stage_channels[s - 1], device, keep)
                  for s in stages}
    start, total, done = time.perf_counter(), len(loader), 0
    try:
        for step, (images, _) in enumerate(loader, 1):
            model.forward_features(images.to(device))
            for s, (outputs, _) in collected.items():
                statistics[s].update(outputs)
                outputs.clear()
            done += len(images)
            if step % print_freq == 0 or step == total:
                seconds = time.perf_counter() - start
                train.log(f"calibration  batch {step}/{total}  {done} images  {done / seconds:.1f} img/s  "
                          f"eta {train.format_eta(seconds / step * (total - step))}")
    finally:
        for _, hooks in collected.values():
            for hook in hooks:
                hook.remove()
    return statistics


def fit_linear_map(statistics, i, j):
    weight, bias = statistics.fit(i, j)
    conv = linear_map(statistics.channels)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
    return conv


# ---------------------------------------------------------------------------------------------
# Block Redundancy matrices
# ---------------------------------------------------------------------------------------------

def similarity_matrices(statistics):
    """{metric: {stage: (n, n) matrix}} for BR, linear CKA and cosine."""
    return {metric: {s: getattr(stats, method)().cpu() for s, stats in statistics.items()}
            for metric, method in zip(METRICS, ("block_redundancy", "linear_cka", "cosine"))}


def format_matrix(matrix):
    header = "      " + "".join(f"{f'h{b}':>10}" for b in range(len(matrix)))
    rows = [f"{f'h{a}':>6}" + "".join(f"{v:>10.4g}" for v in row.tolist()) for a, row in enumerate(matrix)]
    return "\n".join([header, *rows])


def redundancy_figure(matrices, title=""):
    """The BR paper's layout: one heatmap per metric (rows) and stage (columns), ticks h0..hN, each
    cell's value printed in it, and one colour bar per metric whose scale the stages share: from 0
    (or the lowest entry, when negative) to the highest entry (BR: 0, CKA and cosine: 1, on the diagonal)."""
    from matplotlib.figure import Figure

    sizes = [len(m) for m in matrices[METRICS[0]].values()]
    figure = Figure(figsize=(CELL_INCHES * sum(sizes) + 1.2 * len(sizes) + 1,
                             (CELL_INCHES * max(sizes) + 0.8) * len(matrices)), layout="constrained")
    figure.suptitle(title)
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
    model, info = load_model(args)
    device = torch.device(args.device)
    loader = calibration_loader(info, args.calibration_images, args.batch_size, args.workers)
    train.log(f"{info['model']} at {info['image_size']}x{info['image_size']}: calibration on "
              f"{len(loader.dataset)} training images of {data_dir(info)}")
    matrices = similarity_matrices(calibrate(model, loader, device, print_freq=args.print_freq))
    for metric, per_stage in matrices.items():
        for s, matrix in per_stage.items():
            train.log(f"\n{metric}, stage {s} (h0 = stage input, hi = output of block i)\n{format_matrix(matrix)}")
    os.makedirs(args.output_dir, exist_ok=True)
    png, table = os.path.join(args.output_dir, "redundancy.png"), os.path.join(args.output_dir, "redundancy.json")
    title = (f"{info['model']}: similarity of the representations of each stage on {len(loader.dataset)} "
             f"calibration images (h0 = stage input, hi = output of block i)")
    redundancy_figure(matrices, title).savefig(png, dpi=DPI)
    with open(table, "w") as f:
        json.dump({metric: {str(s): m.tolist() for s, m in per_stage.items()}
                   for metric, per_stage in matrices.items()}, f)
    train.log(f"\nsaved {png} (rows: {', '.join(METRICS)}; columns: stages) and {table}")
    return matrices


# ---------------------------------------------------------------------------------------------
# Redundant Blocks Approximation (the paper's Table 2: original / approximate / skip)
# ---------------------------------------------------------------------------------------------

def parse_run(text, model):
    """'3:1-3' -> (3, 1, 3): replace blocks 2..3 of stage 3 by a map from h_1 to h_3."""
    try:
        stage, rest = text.split(":")
        i, j = rest.split("-")
        stage, i, j = int(stage), int(i), int(j)
    except ValueError:
        raise ValueError(f"--blocks must be STAGE:I-J (replace blocks I+1..J of STAGE, numbered from 1; "
                         f"I = 0 is the stage input), e.g. 3:1-3; got {text!r}") from None
    if not 1 <= stage <= len(model.stages):
        raise ValueError(f"--blocks {text}: stage must be 1..{len(model.stages)}")
    depth = len(model.stages[stage - 1].blocks)
    if not 0 <= i < j <= depth:
        raise ValueError(f"--blocks {text}: need 0 <= I < J <= {depth} (stage {stage} has {depth} blocks)")
    if any(is_replaced(b) for b in model.stages[stage - 1].blocks[i:j]):
        raise ValueError(f"--blocks {text}: some of these blocks were already replaced in this checkpoint")
    return stage, i, j


def is_replaced(block):
    return isinstance(block, (nn.Identity, nn.Conv2d, Translator))


class Translator(nn.Module):
    """The BR paper's Table 4 baselines for T, on the grid: an MLP, Conv1x1 -> GELU -> Conv1x1 with
    hidden width = channels, and a residual MLP, h + MLP(LayerNorm(h))."""

    def __init__(self, channels, residual):
        super().__init__()
        self.norm = nn.LayerNorm(channels) if residual else None
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1))

    def forward(self, h):                                                 # (B, C, H, W)
        if self.norm is None:
            return self.mlp(h)
        return h + self.mlp(glnet.norm_pixels(self.norm, h))


def train_translator(kind, x, y, steps=TRANSLATOR_STEPS, lr=TRANSLATOR_LR, batch_size=TRANSLATOR_BATCH):
    """An MLP translator ('mlp' or 'resmlp') trained with Adam on the mean squared error of T(h_i)
    against h_j, on random batches of calibration positions x = h_i, y = h_j (N, C); a 1x1
    convolution sees each position alone, so positions are 1x1 grids. Returns it and its losses."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        translator = Translator(x.shape[1], residual=kind == "resmlp").to(x.device)
        order = torch.randint(len(x), (steps, batch_size))
    optimizer = torch.optim.Adam(translator.parameters(), lr=lr)
    losses = []
    with torch.enable_grad():
        for index in order:
            loss = F.mse_loss(translator(x[index, :, None, None]), y[index, :, None, None])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return translator.eval(), losses


def run_scores(statistics):
    """{score: {stage: (n, n) matrix}} of the --rank-by scores of every run h_i -> h_j, lower = more redundant."""
    methods = {"br": lambda s: -s.block_redundancy(), "relative-br": StageStatistics.relative_distance,
               "cka": lambda s: 1 - s.linear_cka(), "residual": StageStatistics.fit_residual}
    return {name: {s: method(stats).cpu() for s, stats in statistics.items()} for name, method in methods.items()}


def candidate_runs(model, scores):
    """Every run (stage, i, j) whose blocks are all still real blocks, most redundant (lowest score) first."""
    runs = []
    for s, matrix in scores.items():
        blocks = model.stages[s - 1].blocks
        for i in range(len(blocks)):
            for j in range(i + 1, len(blocks) + 1):
                if not any(is_replaced(b) for b in blocks[i:j]):
                    runs.append((float(matrix[i, j]), (s, i, j)))
    return [run for _, run in sorted(runs)]


def variants(model, statistics, run, translators=("linear",)):
    """{mode: (copy of `model` with the run's blocks replaced, seconds to fit the replacement)}, one
    mode per translator and 'skip'. The MLPs need the calibration positions (calibrate(positions=...))."""
    stage, i, j = run
    stats, copies = statistics[stage], {}
    for kind in translators:
        start = time.perf_counter()
        if kind == "linear":
            replacement = fit_linear_map(stats, i, j)
        else:
            replacement = train_translator(kind, stats.positions(i), stats.positions(j))[0]
        copies[kind] = replace_blocks(copy.deepcopy(model), stage, i, j, replacement), time.perf_counter() - start
    copies["skip"] = replace_blocks(copy.deepcopy(model), stage, i, j), 0.0
    return copies


def measure(models, val_loader, info, device, rounds):
    """{key: dict(top1, params, gflops, ms)}; latency: batch 1, medians of rounds that interleave
    all the models, so that the noise of a shared machine hits them alike."""
    flops = {key: glnet.count_flops(m.cpu(), info["image_size"]) for key, m in models.items()}
    models = {key: m.to(device).eval() for key, m in models.items()}
    x = torch.randn(1, 3, info["image_size"], info["image_size"], device=device)
    with torch.inference_mode():
        seconds = train.interleaved_medians({key: (lambda m=m: m(x)) for key, m in models.items()}, rounds, device)
    return {key: dict(top1=train.evaluate(m, val_loader, device)["top1"], params=glnet.count_params(m) / 1e6,
                      gflops=flops[key], ms=1000 * seconds[key]) for key, m in models.items()}


def label(run):
    return f"{run[0]}:{run[1]}-{run[2]}"


def print_table(results, scores, rank_by):
    """The paper's Table 2 layout, one line per (run, mode), with the run's score and the fitting time."""
    name = SCORES[rank_by]
    train.log(f"\n{'run':<8}{name:>13}{'mode':>9}{'top-1':>8}{'params (M)':>12}{'GFLOPs':>9}{'ms':>8}{'fit (s)':>9}")
    for (run, mode), r in results.items():
        score = f"{float(scores[rank_by][run[0]][run[1], run[2]]):.4g}" if run else "-"
        fit = f"{r['fit_s']:.3f}" if mode not in ("original", "skip") else "-"
        train.log(f"{label(run) if run else '-':<8}{score:>13}{mode:>9}{r['top1']:>8.2f}{r['params']:>12.3f}"
                  f"{r['gflops']:>9.4f}{r['ms']:>8.2f}{fit:>9}")


def spearman(x, y):
    """Spearman's rank correlation: Pearson's correlation of the ranks, ties sharing their average rank."""
    def ranks(values):
        v = torch.as_tensor(values, dtype=torch.float64)
        return (v[None, :] < v[:, None]).sum(1) + ((v[None, :] == v[:, None]).sum(1) + 1) / 2
    return float(torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1])


def correlations(results, scores):
    """{score: Spearman's rho between the score of each evaluated run and the top-1 of its linear approximation}."""
    runs = [run for run, mode in results if mode == "linear"]
    top1 = [results[run, "linear"]["top1"] for run in runs]
    return {name: spearman([float(per_stage[s][i, j]) for s, i, j in runs], top1) for name, per_stage in scores.items()}


def print_correlations(results, scores):
    runs = [run for run, mode in results if mode == "linear"]
    train.log("\nscores of the evaluated runs (lower = more redundant) and Spearman's rho with the top-1 of "
              "the linear approximation\n(a score that ranks well has rho near -1)")
    train.log(f"{'run':<8}" + "".join(f"{name:>14}" for name in SCORES.values()) + f"{'top-1':>9}")
    for s, i, j in runs:
        train.log(f"{label((s, i, j)):<8}" + "".join(f"{float(scores[name][s][i, j]):>14.4g}" for name in SCORES)
                  + f"{results[(s, i, j), 'linear']['top1']:>9.2f}")
    rho = correlations(results, scores)
    train.log(f"{'rho':<8}" + "".join(f"{rho[name]:>14.3f}" for name in SCORES))
    return rho


def approximate(args):
    model, info = load_model(args)
    device = torch.device(args.device)
    runs = [parse_run(args.blocks, model)] if args.blocks else None
    stages = sorted({run[0] for run in runs}) if runs else [1, 2, 3, 4]
    translators = list(dict.fromkeys(["linear", *args.translator]))
    loader = calibration_loader(info, args.calibration_images, args.batch_size, args.workers)
    train.log(f"{info['model']} at {info['image_size']}x{info['image_size']}: calibration on "
              f"{len(loader.dataset)} training images of {data_dir(info)}")
    positions = TRANSLATOR_POSITIONS if len(translators) > 1 else 0
    statistics = calibrate(model, loader, device, stages, args.print_freq, positions)
    scores = run_scores(statistics)
    if runs is None:
        runs = candidate_runs(model, scores[args.rank_by])[:args.search]
        train.log(f"the {len(runs)} most redundant runs by {SCORES[args.rank_by]}: {', '.join(map(label, runs))}")
    models, fit_seconds = {(None, "original"): model}, {}
    for run in runs:
        for mode, (variant, seconds) in variants(model, statistics, run, translators).items():
            models[run, mode], fit_seconds[run, mode] = variant, seconds
    if args.blocks:
        path = args.output or os.path.join(args.output_dir, "approximated.pth")
        save_approximated(models[runs[0], "linear"], info, runs, path)
        train.log(f"saved the linear approximation to {path}; evaluate it again with\n"
                  f"    python analyze.py evaluate --checkpoint {path}")
    val_loader = train.eval_loader(train.build_val_dataset(data_dir(info), info["image_size"]),
                                   args.batch_size, args.workers)
    results = measure(models, val_loader, info, device, args.latency_rounds)
    for key, seconds in fit_seconds.items():
        results[key]["fit_s"] = seconds
    print_table(results, scores, args.rank_by)
    train.log(f"top-1 on {len(val_loader.dataset)} validation images; GFLOPs of one {info['image_size']}x"
              f"{info['image_size']} image (fvcore); ms: one image on {device.type}, median of "
              f"{args.latency_rounds} interleaved rounds; fit: seconds to fit T after the shared calibration pass")
    if len(runs) >= 3:
        print_correlations(results, scores)
    return results


def evaluate(args):
    model, info = load_model(args)
    device = torch.device(args.device)
    val_set = train.build_val_dataset(data_dir(info), info["image_size"])
    metrics = train.evaluate(model.to(device), train.eval_loader(val_set, args.batch_size, args.workers), device)
    train.log(f"{args.checkpoint} ({info['model']}, approximated runs {info['approximated']}): top-1 "
              f"{metrics['top1']:.2f}  top-5 {metrics['top5']:.2f} on {metrics['images']} images; "
              f"{glnet.count_params(model) / 1e6:.3f} M params")
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="train.py's best.pth / last.pth, a released "
                                                            "checkpoint (with --model) or one saved by approximate")
    common.add_argument("--model", choices=list(glnet.MODELS), help="default: read from the checkpoint")
    common.add_argument("--data", help="ImageNet-layout folder; default: the checkpoint's (the built-in data)")
    common.add_argument("--image-size", type=int, help="default: the checkpoint's training size")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = torch's default")
    loading = argparse.ArgumentParser(add_help=False)
    loading.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    loading.add_argument("--workers", type=int, default=1, help="data loading processes")
    calibration = argparse.ArgumentParser(add_help=False)
    calibration.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES,
                             help="training images the statistics are computed on (all of them when fewer)")
    calibration.add_argument("--print-freq", type=int, default=PRINT_FREQ, help="a progress line every N batches")
    calibration.add_argument("--output-dir", default=OUTPUT_DIR)

    p = commands.add_parser("slots", parents=[common], help="Figures 5 and 6: the semantic slots of GLMix blocks")
    p.add_argument("--image", required=True, nargs="+", help="one row of the figure per image")
    p.add_argument("--block", default=[SLOT_BLOCK], nargs="+", type=block_argument,
                   help="STAGE.BLOCK, numbered from 1; several give several pairs of panels per row")
    p.add_argument("--output", help=f"PNG path; default: {OUTPUT_DIR}/slots-<first image name>.png")
    commands.add_parser("redundancy", parents=[common, loading, calibration],
                        help="BR, linear CKA and cosine matrices of every stage")
    p = commands.add_parser("approximate", parents=[common, loading, calibration],
                            help="replace redundant blocks by a linear map")
    p.add_argument("--blocks", help="STAGE:I-J: replace blocks I+1..J of STAGE by a map from h_I to h_J")
    p.add_argument("--search", type=int, default=0, metavar="K",
                   help="evaluate the K most redundant runs by --rank-by; with K >= 3, also print how well "
                        "each score ranked them (Spearman's rho with the approximated top-1)")
    p.add_argument("--rank-by", default=RANK_BY, choices=list(SCORES),
                   help="br: -BR; relative-br: -BR over the mean squared norm of h_I and h_J; cka: 1 - linear "
                        "CKA; residual: relative error of the least-squares fit of T")
    p.add_argument("--translator", nargs="+", default=["linear"], choices=TRANSLATORS,
                   help=f"fit these beside linear (the BR paper's Table 4): mlp, resmlp (1x1 convolutions, "
                        f"Adam, {TRANSLATOR_STEPS} steps, lr {TRANSLATOR_LR})")
    p.add_argument("--latency-rounds", type=int, default=LATENCY_ROUNDS)
    p.add_argument("--output", help="with --blocks: where to save the linear approximation; "
                                    "default: <output-dir>/approximated.pth")
    commands.add_parser("evaluate", parents=[common, loading],
                        help="top-1 of any checkpoint, approximated ones included")
    args = parser.parse_args(argv)
    if args.command == "approximate" and bool(args.blocks) == (args.search > 0):
        parser.error("approximate needs either --blocks STAGE:I-J or --search K (K >= 1)")
    train.require_positive(parser, args, ("batch_size", "calibration_images", "print_freq", "latency_rounds"))
    train.require_image_size(parser, args)
    missing = [path for path in getattr(args, "image", []) if not os.path.isfile(path)]
    if missing:
        parser.error(f"--image: no such file: {', '.join(missing)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = {"slots": slots, "redundancy": redundancy, "approximate": approximate, "evaluate": evaluate}
    return command[args.command](args)


if __name__ == "__main__":
    main()
