"""Look inside a trained GLNet: its semantic slots, and its redundant blocks.

    python analyze.py slots --checkpoint runs/glnet_mini-builtin/best.pth --image a.jpg b.jpg --block 2.1 3.1
    python analyze.py redundancy --checkpoint runs/glnet_mini-builtin/best.pth
    python analyze.py approximate --checkpoint runs/glnet_mini-builtin/best.pth --blocks 3:1-3 --translator mlp resmlp
    python analyze.py approximate --checkpoint runs/glnet_mini-builtin/best.pth --search 9
    python analyze.py evaluate --checkpoint analysis/approximated.pth

`slots` draws Figure 5 of the GLNet paper (Figure 6 with several blocks): the soft clustering
weights softmax(A) (Eq. 3) of GLMix blocks, a map per semantic slot, 4 representative slots by k-medoids.

`redundancy` and `approximate` follow "Detecting and Approximating Redundant Computational Blocks in
Neural Networks". Stages and blocks are numbered from 1; h_0 is a stage's input, h_i the output of
its block i. Block Redundancy (Eq. 1): BR(i, j) = -E_{x, p} ||h_i(x)_p - h_j(x)_p||^2 over calibration
images x and positions p. Redundant Blocks Approximation (RBA) replaces blocks i+1..j by a linear map
T, h_j ~ T(h_i), fitted in closed form. BR is small wherever the features are small, so `--search`
ranks runs by the relative residual of that fit unless `--rank-by br`.
"""

import argparse
import copy
import json
import math
import os
import re
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Subset
from torchvision.utils import make_grid

import glnet
import train
from glnet import InputError

# --- Config ----------------------------------------------------------------------------------------

CALIBRATION_IMAGES = 3000      # the BR paper's calibration subset of the training set
BATCH_SIZE, LATENCY_ROUNDS = 64, 20
PRINT_FREQ = 10                # a progress line every N calibration batches
OUTPUT_DIR = "analysis"
SLOT_BLOCK = "3.1"             # Figure 5: the first block of stage 3
REPRESENTATIVE_SLOTS = 4
PANEL_INCHES, CELL_INCHES, DPI = 2.4, 0.5, 120        # a panel of the slot figure, a cell of a heatmap
METRICS = ("BR", "linear CKA", "cosine")
SCORES = {"residual": "fit residual", "br": "-BR"}    # --rank-by: lower = more redundant
TRANSLATORS = ("linear", "mlp", "resmlp")
TRANSLATOR_STEPS, TRANSLATOR_LR = 300, 1e-3           # the BR paper's Table 4: Adam, 300 steps, lr 1e-3
TRANSLATOR_BATCH = 1024        # calibration positions per step
TRANSLATOR_POSITIONS = 32768   # calibration positions kept, at random, for the MLP translators


# --- Models: train.py's checkpoints, released ones, approximated ones -------------------------------

def replace_blocks(model, run, replacement=None):
    """Blocks i+1..j of the run's stage become `replacement` (T) and identities, or identities only
    (skipped). The block count stays, so every other parameter keeps its name."""
    stage, i, j = run
    blocks = model.stages[stage - 1].blocks
    for k in range(i, j):
        blocks[k] = replacement if k == i and replacement is not None else nn.Identity()
    return model


def build(settings, num_classes):
    """train.load_trained's builder: a classification GLNet, with the runs an approximated
    checkpoint replaced rebuilt, so that its weights load strictly."""
    model = train.build_classifier(settings, num_classes)
    for run in settings.get("approximated", []):
        channels = model.stage_channels[run[0] - 1]
        replace_blocks(model, run, nn.Conv2d(channels, channels, 1))
    return model


def load(args):
    """(model on --device, settings): those the checkpoint was written with, then the command line's."""
    given = {k: v for k, v in vars(args).items() if k in ("model", "data", "image_size")}  # only the flags given
    model, checkpoint = train.load_trained(args.checkpoint, build, **given)
    defaults = dict(image_size=224, interpolation="bicubic", crop_pct=0.875, cache_dir=train.DEFAULT_CACHE,
                    approximated=[])
    return model.to(args.device), defaults | checkpoint.get("args", {}) | given  # defaults: for released ones


def eval_transform(settings):  # as train.py evaluates the checkpoint
    return train.eval_transform(settings["image_size"], settings["interpolation"], settings["crop_pct"])


def dataset(settings, split):
    """A split of the checkpoint's data (None: the built-in shapes), transformed as for evaluation."""
    if "data" not in settings:
        raise InputError("the checkpoint was not written by this project, so it does not say which data it is "
                         "for: pass --data")
    folder = settings["data"] or train.builtin_dataset(settings["cache_dir"], train.SHAPES_VERSION,
                                                       train.make_shapes_dataset)
    return train.image_folder(folder, split, eval_transform(settings))


# --- Semantic slots (GLNet paper, Sec. 4.4, Figures 5 and 6) ----------------------------------------

def k_medoids(points, k, iterations=50):
    """Indices of k medoids of the rows of `points` under cosine distance: farthest-point initialisation
    from the most central point, then alternate assignment and medoid update."""
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
    is stretched to its own range, as a briefly trained model's are near uniform."""
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
    model, settings = load(args)
    blocks = {f"{int(name.split('.')[1]) + 1}.{int(name.split('.')[3]) + 1}": name  # '3.1': 'stages.2.blocks.0'
              for name, m in model.named_modules() if isinstance(m, glnet.GLMixBlock)}
    if set(args.block) - set(blocks):
        raise InputError(f"--block {' '.join(sorted(set(args.block) - set(blocks)))}: not a GLMix block of "
                         f"{settings['model']}; its GLMix blocks (STAGE.BLOCK): {', '.join(blocks)}")
    transform = eval_transform(settings)
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
    """Running float64 sums over all positions of a stage's h_0..h_n, from which every similarity and fit
    follows, so no image stays in memory; with `keep`, that many random positions a batch for the MLPs."""

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

    def pairs(self):
        """The Gram matrix as (n, C, n, C): [a, :, b, :] = the sum over positions of h_a h_b^T."""
        return self.gram.view(self.n, self.channels, self.n, self.channels)

    def block_redundancy(self):
        """Eq. 1: BR(a, b) = -E ||h_a - h_b||^2 = -(E|h_a|^2 + E|h_b|^2 - 2 E h_a.h_b)."""
        inner = self.pairs().diagonal(dim1=1, dim2=3).sum(-1) / self.count  # E h_a.h_b
        squares = inner.diagonal()
        return (2 * inner - squares[:, None] - squares[None, :]).clamp_max(0).cpu()

    def linear_cka(self):
        """Kornblith et al. 2019, positions as examples: ||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F) with
        C_ab the cross-covariance of h_a and h_b."""
        mean = self.sums.view(self.n, self.channels) / self.count
        cross = ((self.pairs() / self.count - torch.einsum("ac,bd->acbd", mean, mean)) ** 2).sum((1, 3))
        norms = cross.diagonal().sqrt()
        return (cross / (norms[:, None] * norms[None, :]).clamp_min(1e-30)).cpu()

    def cosine(self):
        """The mean over positions of the cosine similarity of the two channel vectors."""
        return (self.cosine_sums / self.count).cpu()

    def least_squares(self, i, j):
        """RBA's closed form h_j ~ W h_i + b by the normal equations [X 1]^T [X 1] S = [X 1]^T Y: (S = [W^T;
        b^T], the relative residual ||Y - [X 1] S||^2 / ||Y||^2), in float64 on the CPU."""
        c, sums = self.channels, self.sums.view(self.n, self.channels)
        xtx = torch.zeros(c + 1, c + 1, dtype=torch.float64, device=self.gram.device)
        xtx[:c, :c], xtx[:c, c], xtx[c, :c], xtx[c, c] = self.pairs()[i, :, i], sums[i], sums[i], self.count
        xty = torch.cat([self.pairs()[i, :, j], sums[j][None]])
        xtx, xty, yty = xtx.cpu(), xty.cpu(), self.pairs()[j, :, j].trace().cpu()
        solution = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution  # safe when rank-deficient
        residual = yty - 2 * (solution * xty).sum() + (solution * (xtx @ solution)).sum()
        return solution, (residual / yty.clamp_min(1e-30)).clamp_min(0)

    def fit_residual(self):
        """(n, n): the relative residual of the fit h_j ~ T(h_i) for i < j, NaN elsewhere."""
        residual = torch.full((self.n, self.n), float("nan"), dtype=torch.float64)
        for i in range(self.n):
            for j in range(i + 1, self.n):
                residual[i, j] = self.least_squares(i, j)[1]
        return residual

    def fit(self, i, j):
        """RBA's T, the least-squares fit h_j ~ T(h_i): a linear map with a bias shared by all positions."""
        solution = self.least_squares(i, j)[0].float()
        conv = nn.Conv2d(self.channels, self.channels, 1)
        with torch.no_grad():
            conv.weight.copy_(solution[:self.channels].T[:, :, None, None])
            conv.bias.copy_(solution[self.channels])
        return conv


@torch.no_grad()
def calibrate(args, model, settings, stages, positions=0):
    """({stage: StageStatistics}, image count) of the first --calibration-images of a fixed shuffle of the
    training set; h_0 is the downsampling layer's output. About `positions` positions are kept per stage."""
    images = dataset(settings, "train")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.calibration_images]
    loader = train.eval_loader(Subset(images, order.tolist()), args.batch_size, args.workers)
    print(f"{settings['model']} at {settings['image_size']}x{settings['image_size']}: calibration on "
          f"{len(order)} training images of {images.root}")
    outputs = {s: [] for s in stages}
    hooks = [m.register_forward_hook(lambda module, inputs, output, s=s: outputs[s].append(output))
             for s in stages for m in (model.downsample_layers[s - 1], *model.stages[s - 1].blocks)]
    statistics = {s: StageStatistics(len(model.stages[s - 1].blocks) + 1, model.stage_channels[s - 1], args.device,
                                     math.ceil(positions / len(loader))) for s in stages}
    try:
        for step, (x, _) in enumerate(loader, 1):
            model.forward_features(x.to(args.device))
            for s, representations in outputs.items():
                statistics[s].update(representations)
                representations.clear()
            if step % PRINT_FREQ == 0 or step == len(loader):
                print(f"calibration  batch {step}/{len(loader)}", flush=True)
    finally:
        for hook in hooks:
            hook.remove()
    return statistics, len(order)


# --- Block Redundancy matrices -------------------------------------------------------------------

def format_matrix(matrix):
    header = "      " + "".join(f"{f'h{b}':>10}" for b in range(len(matrix)))
    rows = [f"{f'h{a}':>6}" + "".join(f"{v:>10.4g}" for v in row.tolist()) for a, row in enumerate(matrix)]
    return "\n".join([header, *rows])


def redundancy_figure(matrices, title=""):
    """The BR paper's layout: a heatmap per metric (rows) and stage (columns), the values in the cells, a
    colour bar per metric shared by the stages, from 0 (or the lowest entry, when negative) to the highest."""
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
    model, settings = load(args)
    statistics, images = calibrate(args, model, settings, stages=(1, 2, 3, 4))
    matrices = {metric: {s: getattr(stats, method)() for s, stats in statistics.items()}
                for metric, method in zip(METRICS, ("block_redundancy", "linear_cka", "cosine"))}
    for metric, per_stage in matrices.items():
        for s, matrix in per_stage.items():
            print(f"\n{metric}, stage {s} (h0 = stage input, hi = output of block i)\n{format_matrix(matrix)}")
    os.makedirs(args.output_dir, exist_ok=True)
    png, table = os.path.join(args.output_dir, "redundancy.png"), os.path.join(args.output_dir, "redundancy.json")
    title = (f"{settings['model']}: similarity of the representations of each stage on {images} calibration "
             f"images (h0 = stage input, hi = output of block i)")
    redundancy_figure(matrices, title).savefig(png, dpi=DPI)
    with open(table, "w") as f:
        json.dump({metric: {s: m.tolist() for s, m in per_stage.items()} for metric, per_stage in matrices.items()}, f)
    print(f"\nsaved {png} (rows: {', '.join(METRICS)}; columns: stages) and {table}")
    return matrices


# --- Redundant Blocks Approximation (the BR paper's Table 2: original / approximated / skipped) ----

def run_argument(text):
    """An argparse type: '3:1-3' -> (3, 1, 3), replace blocks 2..3 of stage 3 by a map from h_1 to h_3."""
    match = re.fullmatch(r"(\d+):(\d+)-(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) >= int(match[3]):
        raise argparse.ArgumentTypeError(f"expected STAGE:I-J with I < J (replace blocks I+1..J of STAGE, numbered "
                                         f"from 1; I = 0 is the stage input), e.g. 3:1-3; got {text!r}")
    return tuple(int(v) for v in match.groups())


def replaceable(model, run):
    """Whether the run's blocks exist and are all still real blocks."""
    stage, i, j = run
    blocks = model.stages[stage - 1].blocks if stage <= len(model.stages) else []
    return j <= len(blocks) and not any(isinstance(b, (nn.Identity, nn.Conv2d, Translator)) for b in blocks[i:j])


def label(run):
    return f"{run[0]}:{run[1]}-{run[2]}"


class Translator(nn.Module):
    """The BR paper's Table 4 baselines for T, on the grid: an MLP, Conv1x1 -> GELU -> Conv1x1 with
    hidden width = channels, and a residual MLP, h + MLP(LayerNorm(h))."""

    def __init__(self, channels, residual):
        super().__init__()
        self.norm = nn.LayerNorm(channels) if residual else None
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.GELU(), nn.Conv2d(channels, channels, 1))

    def forward(self, h):  # (B, C, H, W)
        return self.mlp(h) if self.norm is None else h + self.mlp(glnet.norm_pixels(self.norm, h))


def train_translator(kind, x, y, steps=TRANSLATOR_STEPS, lr=TRANSLATOR_LR, batch_size=TRANSLATOR_BATCH):
    """(translator, losses): 'mlp' or 'resmlp' trained with Adam on the squared error against y = h_j (N, C)
    on batches of positions x = h_i; a 1x1 convolution sees each position alone, so they are 1x1 grids."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        translator = Translator(x.shape[1], residual=kind == "resmlp").to(x.device)
        order = torch.randint(len(x), (steps, batch_size))
    optimizer = torch.optim.Adam(translator.parameters(), lr=lr)
    losses = []
    for index in order:
        loss = F.mse_loss(translator(x[index, :, None, None]), y[index, :, None, None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return translator.eval(), losses


def variants(model, statistics, run, translators):
    """{mode: (a copy of `model` with the run's blocks replaced, seconds to fit the replacement)}, a
    mode per translator, and 'skip' (nothing to fit: None)."""
    stats, copies = statistics[run[0]], {}
    for kind in translators:
        start = time.perf_counter()
        if kind == "linear":
            replacement = stats.fit(run[1], run[2])
        else:
            kept = torch.cat(stats.kept).view(-1, stats.n, stats.channels)  # the kept positions of every h
            replacement = train_translator(kind, kept[:, run[1]], kept[:, run[2]])[0]
        copies[kind] = replace_blocks(copy.deepcopy(model), run, replacement), time.perf_counter() - start
    copies["skip"] = replace_blocks(copy.deepcopy(model), run), None
    return copies


def measure(models, val_loader, image_size, device, rounds):
    """{key: dict(top1, params, gflops, ms)}; latency: one image, the median of rounds that
    interleave the models, so that a shared machine's noise hits them alike."""
    flops = {key: glnet.count_flops(m.cpu(), image_size) for key, m in models.items()}
    models = {key: m.to(device).eval() for key, m in models.items()}
    x = torch.randn(1, 3, image_size, image_size, device=device)
    with torch.inference_mode():
        seconds = train.interleaved_medians({key: (lambda m=m: m(x)) for key, m in models.items()}, rounds, device)
    return {key: dict(top1=train.evaluate(m, val_loader, device)["top1"], params=glnet.count_params(m) / 1e6,
                      gflops=flops[key], ms=1000 * seconds[key]) for key, m in models.items()}


def print_table(results, scores, rank_by):
    """The BR paper's Table 2, a line per (run, mode), with the run's score and the seconds to fit T."""
    print(f"\n{'run':<8}{SCORES[rank_by]:>13}{'mode':>9}{'top-1':>8}{'params (M)':>12}{'GFLOPs':>9}{'ms':>8}"
          f"{'fit (s)':>9}")
    for (run, mode), r in results.items():
        score = f"{float(scores[run[0]][run[1], run[2]]):.4g}" if run else "-"
        fit = "-" if r["fit_s"] is None else f"{r['fit_s']:.3f}"
        print(f"{label(run) if run else '-':<8}{score:>13}{mode:>9}{r['top1']:>8.2f}{r['params']:>12.3f}"
              f"{r['gflops']:>9.4f}{r['ms']:>8.2f}{fit:>9}")


def approximate(args):
    model, settings = load(args)
    if args.blocks and not replaceable(model, args.blocks):
        raise InputError(f"--blocks {label(args.blocks)}: this model has no such blocks, or some were already "
                         f"replaced (its stages have {', '.join(str(len(s.blocks)) for s in model.stages)} blocks)")
    translators = list(dict.fromkeys(["linear", *args.translator]))
    statistics = calibrate(args, model, settings, [args.blocks[0]] if args.blocks else [1, 2, 3, 4],
                           TRANSLATOR_POSITIONS if len(translators) > 1 else 0)[0]
    score = StageStatistics.fit_residual if args.rank_by == "residual" else lambda s: -s.block_redundancy()
    scores = {s: score(stats) for s, stats in statistics.items()}
    runs = [(s, i, j) for s, m in scores.items() for i in range(len(m)) for j in range(i + 1, len(m))]
    runs = [args.blocks] if args.blocks else sorted(  # the K most redundant runs of real blocks
        filter(lambda run: replaceable(model, run), runs), key=lambda run: float(scores[run[0]][run[1:]]))[:args.search]
    models, fit_seconds = {(None, "original"): model}, {}
    for run in runs:
        for mode, (variant, seconds) in variants(model, statistics, run, translators).items():
            models[run, mode], fit_seconds[run, mode] = variant, seconds
    if args.blocks:
        path = os.path.join(args.output_dir, "approximated.pth")
        saved = settings | {"approximated": [*settings["approximated"], args.blocks]}  # what `build` rebuilds
        train.save_checkpoint({"model": models[args.blocks, "linear"].state_dict(), "args": saved}, path)
        print(f"saved the linear approximation to {path}; evaluate it with\n"
              f"    python analyze.py evaluate --checkpoint {path}")
    val_loader = train.eval_loader(dataset(settings, "val"), args.batch_size, args.workers)
    results = measure(models, val_loader, settings["image_size"], torch.device(args.device), args.latency_rounds)
    for key, r in results.items():
        r["fit_s"] = fit_seconds.get(key)
    print_table(results, scores, args.rank_by)
    print(f"top-1 on {len(val_loader.dataset)} validation images; GFLOPs and ms (on {args.device}, median of "
          f"{args.latency_rounds} interleaved rounds) of one image; fit: seconds after the shared calibration pass")
    return results


def evaluate(args):
    model, settings = load(args)
    val_set = dataset(settings, "val")
    loader = train.eval_loader(val_set, args.batch_size, args.workers)
    metrics = train.evaluate(model, loader, torch.device(args.device))
    print(f"{args.checkpoint} ({settings['model']}, approximated runs: "
          f"{', '.join(map(label, settings['approximated'])) or 'none'}; {glnet.count_params(model) / 1e6:.3f} M "
          f"params) on {metrics['images']} images of {val_set.root}: {train.format_metrics(metrics)}")
    return metrics


# --- Command line --------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = train.Parser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = {name: commands.add_parser(name, help=text) for name, text in (
        ("slots", "Figures 5 and 6: the slots of GLMix blocks"),
        ("redundancy", "BR, linear CKA and cosine matrices of every stage"),
        ("approximate", "replace redundant blocks by a linear map (or an MLP)"),
        ("evaluate", "top-1 of any checkpoint, approximated ones too"))}
    unset = argparse.SUPPRESS  # --model, --data and --image-size override the checkpoint's only when given
    for name, command in p.items():
        command.add_argument("--checkpoint", required=True, help="of train.py, of approximate, or a released one "
                                                                 "(then --model, and --data to read data)")
        command.add_argument("--model", choices=list(glnet.MODELS), default=unset, help="default: the checkpoint's")
        command.add_argument("--image-size", type=train.at_least(32), default=unset,
                             help="default: the checkpoint's, 224 for a released one")
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                             help="default: %(default)s")
        if name != "slots":
            command.add_argument("--data", default=unset, help="ImageNet-layout folder; default: the checkpoint's")
            command.add_argument("--batch-size", type=train.at_least(1), default=BATCH_SIZE,
                                 help="default: %(default)s")
            command.add_argument("--workers", type=train.at_least(0), default=train.Settings.workers,
                                 help="data loading processes (default: %(default)s)")
        if name in ("redundancy", "approximate"):
            command.add_argument("--calibration-images", type=train.at_least(1), default=CALIBRATION_IMAGES,
                                 help="training images the statistics are computed on (default: %(default)s)")
        if name != "evaluate":
            command.add_argument("--output-dir", default=OUTPUT_DIR, help="default: %(default)s")
    p["slots"].add_argument("--image", required=True, nargs="+", help="one row of the figure per image")
    p["slots"].add_argument("--block", default=[SLOT_BLOCK], nargs="+", help="STAGE.BLOCK, numbered from 1; several "
                            f"give several pairs of panels per row (default: {SLOT_BLOCK})")
    runs = p["approximate"].add_mutually_exclusive_group(required=True)
    runs.add_argument("--blocks", type=run_argument, metavar="STAGE:I-J", help="replace blocks I+1..J of STAGE by "
                      "a map from h_I to h_J, saved to <output-dir>/approximated.pth")
    runs.add_argument("--search", type=train.at_least(1), metavar="K", help="evaluate the K most redundant runs")
    p["approximate"].add_argument("--rank-by", default="residual", choices=list(SCORES),
                                  help="residual (default): relative error of the least-squares fit of T; br: -BR")
    p["approximate"].add_argument("--translator", nargs="+", default=["linear"], choices=TRANSLATORS,
                                  help=f"fit these beside linear (the BR paper's Table 4; Adam, {TRANSLATOR_STEPS} "
                                       f"steps, lr {TRANSLATOR_LR})")
    p["approximate"].add_argument("--latency-rounds", type=train.at_least(1), default=LATENCY_ROUNDS,
                                  help="default: %(default)s")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    commands = {"slots": slots, "redundancy": redundancy, "approximate": approximate, "evaluate": evaluate}
    return commands[args.command](args)


if __name__ == "__main__":
    train.run(main)
