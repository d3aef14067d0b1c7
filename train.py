"""Train GLNet on ImageNet with the paper's recipes, or on a built-in dataset to see it work first.

    python train.py --recipe builtin                         # built-in shapes dataset, CPU, minutes
    torchrun --nproc_per_node 2 train.py --recipe builtin    # the same with 2 processes (gloo on CPU)
    torchrun --nproc_per_node 16 train.py --recipe imagenet --model glnet_4g --data /path/to/imagenet
    torchrun --nproc_per_node 16 train.py --recipe imagenet-tklb --data /path/to/imagenet --token-labels LABELS
    python train.py --eval --checkpoint runs/glnet_mini-builtin/best.pth
    python train.py --make-token-labels runs/labels --teacher runs/glnet_mini-builtin/best.pth
    python train.py --bench                                  # speed against swin_t and convnext_tiny

Three recipes (--recipe; every flag overrides a value, and the run prints them all first):
`imagenet` is Table 8 of the paper: AdamW (lr 2e-3 per 2048 images, betas 0.9/0.999, weight decay
0.05), cosine schedule with 5 warm-up epochs, 300 epochs, RandAugment(9, 0.5), label smoothing 0.1,
mixup 0.8, cutmix 1.0, gradient clipping 5.0, drop path per variant; where the table is silent, the
configuration the released checkpoints were trained with (repeated augmentation, random erasing,
bicubic resizing, EMA 0.9999, warm-up from 1e-6, minimum lr 1e-5). `imagenet-tklb` is Table 9,
GLNet-4G*/9G*: LV-ViT's token labeling ("All Tokens Matter"), where a teacher's dense score maps
supervise every token of the last stage, with MixToken instead of mixup and cutmix, 310 epochs,
drop path 0.1. `builtin` is a CPU-sized run of the same code.

This file is the one home of the training loop. `Trainer` runs every task of the project; a `Task`
says what differs: the data, the loss of a batch and the evaluation. train.py plugs in image
classification (with or without token labels), detect_seg.py detection and segmentation, as
torchvision's references share one engine. A run never loses its work: a checkpoint (model, EMA,
optimizer, scheduler, grad scaler, position in the epoch, RNG states, args) is written atomically
every epoch (and every --checkpoint-every steps), and restarting the same command resumes from it
where it stopped: bit for bit with --workers 0; with loader workers the images come in the same
order, but their random augmentations differ after a mid-epoch resume (at epoch boundaries the
workers' seeds are the same).

It also keeps the helpers detect_seg.py and analyze.py share: distributed setup, atomic
checkpoints, metrics logging, AdamW parameter groups, the built-in datasets' cache, the datasets
and exactly-once distributed evaluation, the command-line flags of training, and timing.
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from einops import rearrange
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets
from torchvision.ops import roi_align
from torchvision.transforms import v2

import glnet

# ---------------------------------------------------------------------------------------------
# Config: the recipes. --recipe picks one (default: imagenet with --data, builtin without); every
# flag left unset takes its value from it. Sources: README.md, "Recipes".
# ---------------------------------------------------------------------------------------------

# Table 8, and where it is silent the configuration the released checkpoints were trained with.
IMAGENET_RECIPE = dict(
    model="glnet_4g", epochs=300, batch_size=128, image_size=224,
    lr=2e-3,                 # peak learning rate per 2048 images, scaled linearly to the global batch
    warmup_epochs=5,
    warmup_factor=5e-4,      # the warm-up starts at 5e-4 x the peak lr: 1e-6 at the paper's batch of 2048
    min_lr=1e-5, weight_decay=0.05, clip_grad=5.0,
    randaugment=True, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
    repeated_aug=3,          # every image 3 times per epoch (DeiT's sampler), the epoch as long as without
    random_erasing=0.25,     # probability, per-pixel random values (after normalisation)
    interpolation="bicubic",  # training crop, RandAugment and evaluation resize
    ema_decay=0.9999, print_freq=50, workers=8, threads=0,
)
# Table 9, GLNet-4G*/9G*: token labeling. MixToken replaces mixup and cutmix.
TOKEN_LABELING_RECIPE = IMAGENET_RECIPE | dict(model="glnet_4g_tklb", epochs=310, drop_path=0.1, mixup=0.0, cutmix=0.0)
# A CPU-sized run of the same code: glnet_mini at 64x64 for 5 epochs of 3000 images, too short for
# RandAugment, mixup, cutmix, random erasing and repeated augmentation to pay off, so they are off.
BUILTIN_RECIPE = dict(
    model="glnet_mini", epochs=5, batch_size=32, image_size=64,
    lr=6.4e-2,               # per 2048 images: 1e-3 at the default global batch of 32
    warmup_epochs=1, warmup_factor=1e-3, min_lr=1e-5, weight_decay=0.05, clip_grad=5.0,
    randaugment=False, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
    repeated_aug=1, random_erasing=0.0, interpolation="bilinear",
    ema_decay=0.99, print_freq=20, workers=1,
    threads=1,               # per process: two OpenMP threads on a busy 2-core CPU can run 10x slower
)
RECIPES = {"builtin": BUILTIN_RECIPE, "imagenet": IMAGENET_RECIPE, "imagenet-tklb": TOKEN_LABELING_RECIPE}
# What the classification recipes share with the schedule of train.Trainer.
CLASSIFICATION_SCHEDULE = dict(lr_schedule="cosine", eval_interval=1)
DROP_PATH = {"glnet_stl": 0.1, "glnet_stl_paramslot": 0.1, "glnet_4g": 0.15, "glnet_9g": 0.3,
             "glnet_16g": 0.4, "glnet_4g_tklb": 0.1, "glnet_9g_tklb": 0.1, "glnet_mini": 0.0}
REFERENCE_BATCH = 2048       # the global batch the paper's learning rate is given for
BETAS = (0.9, 0.999)
RANDAUGMENT = dict(num_ops=2, magnitude=9, magnitude_std=0.5)  # timm's rand-m9-mstd0.5: magnitudes out of 10
TOKEN_STRIDE = 32            # the last stage's stride: a 224 image has 7 x 7 tokens
TOKEN_LOSS_WEIGHT = 0.5      # LV-ViT: class loss + 0.5 x the mean token loss
TOP_K = 5                    # label maps hold the teacher's top-5 logits and classes at every position
EVAL_CROP_RATIO = 0.875      # resize 256, center crop 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "glnet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BENCH_BASELINES = ("swin_t", "convnext_tiny")  # torchvision's models of GLNet-STL's size
BENCH_MODELS = ("glnet_stl", "glnet_stl_paramslot", "glnet_4g", "glnet_9g", "glnet_16g")


# ---------------------------------------------------------------------------------------------
# Shared helpers (imported by detect_seg.py and analyze.py): keep these signatures stable.
# ---------------------------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun, joins the process group (nccl on CUDA, gloo on
    CPU) on cuda:LOCAL_RANK; run directly, it is a single process on cuda:0 or the CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank, world_size, device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(state: dict, path) -> None:
    """Write to `path + '.tmp'`, fsync, then rename over `path`: a job killed at any moment leaves
    either the previous good file or the new one, never a truncated one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def find_last_checkpoint(output_dir) -> str | None:
    path = os.path.join(output_dir, "last.pth")
    return path if os.path.isfile(path) else None


def append_metrics(output_dir, record: dict) -> None:
    """One JSON line per record in output_dir/metrics.jsonl (call it on rank 0)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def no_weight_decay(name, param):
    """Norms and biases (1-D), the slot temperature tau (0-D), layer-scale gammas (some 4-D)
    and the learned slots are not decayed."""
    return param.ndim <= 1 or name.endswith((".gamma", ".tau", ".init_slots"))


def param_groups(model, weight_decay) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int, rank: int = 0) -> None:
    """Each rank gets its own stream (drop path, augmentation), all reproducible from `seed`."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def check_finite(loss, where: str) -> None:
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss {loss.detach().float().cpu().tolist()} at {where}; "
                                 f"the last good checkpoint is kept")


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def require_positive(parser, args, keys):
    """A usage error for any of these arguments (those the command has) below 1."""
    for key in keys:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {value}")


def require_image_size(parser, args):
    """A usage error for an --image-size (when given) that stage 4 would have no pixel at."""
    if args.image_size is not None and args.image_size < glnet.MIN_INPUT_SIZE:
        parser.error(f"--image-size must be at least {glnet.MIN_INPUT_SIZE}, got {args.image_size}")


def log(message):
    """Print on rank 0 only, flushed so that progress shows up in job logs at once."""
    if is_main_process():
        print(message, flush=True)


def all_reduce_sum(values, device):
    """Sum a list of numbers over all ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------------------------------------
# The built-in datasets: generated once into the cache folder, for runs out of the box
# ---------------------------------------------------------------------------------------------

def builtin_dataset(cache_dir, name, generate):
    """The folder `cache_dir/name` of a built-in dataset, written by `generate(folder)` on first
    use. Rank 0 generates into a temporary folder and renames it into place while the other ranks
    wait, so the folder is complete or absent; a process that finds it complete reuses it."""
    root = os.path.join(cache_dir, name)
    if is_main_process() and not os.path.isdir(root):
        log(f"writing the built-in dataset {name} to {root} (once) ...")
        tmp = f"{root}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp)
        try:
            os.replace(tmp, root)
        except OSError:
            if not os.path.isdir(root):
                raise
            shutil.rmtree(tmp)  # another job wrote it first: use theirs
    if dist.is_initialized():
        dist.barrier()
    return root


SHAPES_CLASSES = ("checkerboard", "circle", "cross", "diagonal_stripes", "dots",
                  "horizontal_stripes", "ring", "square", "triangle", "vertical_stripes")
SHAPES_VERSION = "shapes-v1"


def draw_shape_image(name, size, g):
    """One (3, size, size) uint8 image of class `name`: a shape or a texture in two random,
    clearly different colours, at a random position, scale and phase, plus pixel noise."""
    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=g).item()

    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    cx, cy, r = uniform(0.35, 0.65) * size, uniform(0.35, 0.65) * size, uniform(0.18, 0.3) * size
    dx, dy = x - cx, y - cy
    period, phase = uniform(0.12, 0.25) * size, uniform(0, 2 * math.pi)
    wave = lambda t: torch.sin(2 * math.pi * t / period + phase) > 0  # noqa: E731
    masks = {
        "circle": lambda: dx ** 2 + dy ** 2 < r ** 2,
        "ring": lambda: ((dx ** 2 + dy ** 2).sqrt() - 0.7 * r).abs() < 0.2 * r,
        "square": lambda: torch.maximum(dx.abs(), dy.abs()) < 0.85 * r,
        "triangle": lambda: (dy < 0.8 * r) & (dx.abs() < (dy + r) * 0.6),
        "cross": lambda: ((dx.abs() < 0.25 * r) & (dy.abs() < r)) | ((dy.abs() < 0.25 * r) & (dx.abs() < r)),
        "horizontal_stripes": lambda: wave(y),
        "vertical_stripes": lambda: wave(x),
        "diagonal_stripes": lambda: wave((x + y) / math.sqrt(2) if uniform(0, 1) < 0.5 else (x - y) / math.sqrt(2)),
        "checkerboard": lambda: ((x // (period / 2) + y // (period / 2)) % 2) == 0,
        "dots": lambda: (torch.sin(2 * math.pi * x / period + phase) * torch.sin(2 * math.pi * y / period)) > 0.5,
    }
    background = torch.rand(3, 1, 1, generator=g)
    foreground = (background + 0.3 + 0.4 * torch.rand(3, 1, 1, generator=g)) % 1  # >= 0.3 apart per channel
    image = torch.where(masks[name](), foreground, background)
    image = image + 0.08 * torch.randn(3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def make_shapes_dataset(root, train_per_class=300, val_per_class=50, image_size=64, seed=0,
                        classes=SHAPES_CLASSES):
    """Write the shapes as root/train/<class>/*.png and root/val/<class>/*.png (ImageFolder)."""
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                image = v2.functional.to_pil_image(draw_shape_image(name, image_size, g))
                image.save(os.path.join(root, split, name, f"{i:05d}.png"))
    return root


def shapes_dataset(cache_dir=DEFAULT_CACHE):
    """The built-in classification dataset: 10 shape/texture classes, 3000 + 500 PNG files."""
    return builtin_dataset(cache_dir, SHAPES_VERSION, make_shapes_dataset)


# ---------------------------------------------------------------------------------------------
# Data: ImageFolder trees, transforms, samplers
# ---------------------------------------------------------------------------------------------

def load_image(path):
    """ImageFolder's loader, with an error that names the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def class_folders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def check_layout(data_dir, splits=("train", "val")):
    """Fail before anything starts, naming the path and the expected layout."""
    expected = (f"expected the ImageNet layout: {os.path.join(data_dir, 'train', '<class>', '<image>')} "
                f"and {os.path.join(data_dir, 'val', '<class>', '<image>')}, one sub-folder per class")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data {data_dir} does not exist; {expected}")
    classes = {}
    for split in splits:
        folder = os.path.join(data_dir, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is missing; {expected}")
        classes[split] = class_folders(folder)
        if not classes[split]:
            loose = any(e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(folder))
            hint = " (the images lie directly in it: sort them into class folders first)" if loose else ""
            raise FileNotFoundError(f"{folder} has no class sub-folders{hint}; {expected}")
    if len(classes) == 2 and classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise ValueError(f"train and val classes differ in {data_dir}: {len(classes['train'])} vs "
                         f"{len(classes['val'])} class folders; only in train: {only_train[:5]}, "
                         f"only in val: {only_val[:5]}")


def image_folder(data_dir, split, transform):
    folder = os.path.join(data_dir, split)
    try:
        return datasets.ImageFolder(folder, transform=transform, loader=load_image)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (in {folder}; expected <class>/<image> files)") from e


class RandAugment(v2.RandAugment):
    """timm's rand-m9-mstd0.5 on torchvision's RandAugment: magnitudes on timm's scale of 0-10
    (torchvision's default 31 bins would make magnitude 9 a third as strong), in steps of 0.1,
    drawn for every image from N(magnitude, magnitude_std) clipped to [0, 10] (timm draws one per
    operation); out-of-image pixels filled with the mean colour, as timm does."""

    MAX_MAGNITUDE, STEPS = 10, 10

    def __init__(self, num_ops, magnitude, magnitude_std, interpolation="bilinear"):
        super().__init__(num_ops, num_magnitude_bins=self.MAX_MAGNITUDE * self.STEPS + 1,
                         interpolation=interpolation, fill=[round(255 * m) for m in MEAN])
        self.mean, self.std = magnitude, magnitude_std

    def forward(self, *inputs):
        magnitude = self.mean + self.std * torch.randn(()).item()
        self.magnitude = round(min(max(magnitude, 0), self.MAX_MAGNITUDE) * self.STEPS)  # the bin
        return super().forward(*inputs)


def augment_and_normalize(randaugment=True, interpolation="bilinear", random_erasing=0.0):
    """What follows the random-resized crop and the flip in training."""
    return v2.Compose([
        *([RandAugment(**RANDAUGMENT, interpolation=interpolation)] if randaugment else []),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
        *([v2.RandomErasing(random_erasing, value="random")] if random_erasing else []),
    ])


def train_transform(image_size, randaugment=True, interpolation="bilinear", random_erasing=0.0):
    return v2.Compose([
        v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True),
        v2.RandomHorizontalFlip(),
        augment_and_normalize(randaugment, interpolation, random_erasing),
    ])


def eval_transform(image_size, interpolation="bilinear"):
    """Resize to image_size / 0.875 (256 for 224), center crop image_size."""
    return v2.Compose([
        v2.Resize(round(image_size / EVAL_CROP_RATIO), interpolation=interpolation, antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def build_datasets(data_dir, image_size, randaugment=True, interpolation="bilinear", random_erasing=0.0,
                   token_labels=None, label_smoothing=0.1):
    """(train, val) datasets after checking the layout and that the classes match; with
    `token_labels` (a folder of label maps) the training images come with their token labels."""
    check_layout(data_dir)
    augment = augment_and_normalize(randaugment, interpolation, random_erasing)
    if token_labels:
        train_set = TokenLabeledImages(data_dir, token_labels, image_size, augment, interpolation, label_smoothing)
    else:
        train_set = image_folder(data_dir, "train", train_transform(image_size, randaugment, interpolation,
                                                                    random_erasing))
    return train_set, build_val_dataset(data_dir, image_size, interpolation)


def build_val_dataset(data_dir, image_size, interpolation="bilinear"):
    check_layout(data_dir, splits=("val",))
    return image_folder(data_dir, "val", eval_transform(image_size, interpolation))


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start `start` samples into its epoch's permutation, so a run
    resumed mid-epoch sees exactly the images it had not seen yet.

    With `repeated_aug` = n > 1, repeated augmentation as DeiT's sampler: every image of the epoch's
    permutation comes n times in a row, dealt out over the ranks in turn (its copies get different
    augmentations, mostly on different ranks), and each rank keeps as many as without, so an epoch
    has the same length and shows the first 1/n of the permutation n times."""

    def __init__(self, *args, repeated_aug=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeated_aug, self.start = repeated_aug, 0

    def __iter__(self):
        if self.repeated_aug == 1:
            indices = super().__iter__()
        else:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            repeated = torch.randperm(len(self.dataset), generator=g).repeat_interleave(self.repeated_aug)
            indices = iter(repeated[self.rank::self.num_replicas][:self.num_samples].tolist())
        return itertools.islice(indices, self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Rank r takes images r, r + W, r + 2W, ...: every image exactly once, where
    DistributedSampler would repeat some to give every rank the same count."""

    def __init__(self, dataset, rank=0, world_size=1):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size, workers, rank=0, world_size=1):
    return DataLoader(dataset, batch_size, sampler=ShardSampler(dataset, rank, world_size),
                      num_workers=workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, loader, device):
    """Top-1, top-5 (%) and loss over the whole dataset, summed across ranks: each image once."""
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(targets)
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], device)
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count,
            "loss": loss_sum / count, "images": int(count)}


# ---------------------------------------------------------------------------------------------
# The training loop, shared by every task
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """What differs between the tasks that share the training loop."""
    name: str                   # "classification", "maskrcnn", "semfpn", ...: a checkpoint resumes only its own
    train_set: Dataset
    loss: Callable              # loss(model, batch) -> the scalar loss of one (micro-)batch
    evaluate: Callable | None   # evaluate(model) -> {metric: value}, the same on every rank
    main_metric: str            # the metric best.pth is chosen by (higher is better)
    reference_batch: int        # the global batch that --lr is given for; the lr scales linearly from it
    num_classes: int
    classes: list | dict = dataclasses.field(default_factory=list)  # names, kept in the checkpoint
    collate_fn: Callable | None = None
    repeated_aug: int = 1       # each training image this many times per epoch (ResumableDistributedSampler)


def lr_factor(step, warmup_steps, total_steps, schedule, warmup_factor=1e-3, min_factor=0.0, milestones=()):
    """The learning rate at `step`, relative to the peak: a linear warm-up from `warmup_factor`,
    then 'cosine' or 'poly' (power 1) decay to `min_factor`, or 'step': x0.1 at each milestone."""
    if step < warmup_steps:
        return warmup_factor + (1 - warmup_factor) * step / warmup_steps
    if schedule == "step":
        return 0.1 ** sum(step >= m for m in milestones)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_factor + (1 - min_factor) * decay


def amp_settings(amp, device):
    """(autocast dtype or None, GradScaler): fp16 needs loss scaling, bf16 and fp32 do not."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    return dtype, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def autocast(device, amp_dtype):
    """Mixed precision in amp_dtype (see amp_settings), or none."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states():
    """Every rank's RNG state (rank order), so that each rank resumes its own stream."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def wrap_ddp(model, device):
    """DistributedDataParallel under torchrun. Gradients as views into the all-reduce buckets:
    less memory, and no copy when convolutions produce channels-last gradients."""
    if not dist.is_initialized():
        return model
    if device.type == "cpu":  # CPU convolutions return gradients strided differently: DDP copies them
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def ema_model(model, decay):
    """The EMA of the weights and buffers: ema = decay * ema + (1 - decay) * weights after every
    step, starting from the initial weights as timm's ModelEma does (an AveragedModel on its own
    would start from the weights after the first step)."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.n_averaged += 1
    return ema


def format_metrics(metrics):
    """'top1 96.6  top5 100': the numbers of an evaluation, for progress lines."""
    return "  ".join(f"{name} {value:.4g}" for name, value in metrics.items() if isinstance(value, float))


class Trainer:
    """The state of one run (model, EMA, optimizer, schedule, position in the data) and the loop
    over it. The Task brings the data, the loss of a batch and the evaluation; `args` the recipe:
    batch_size (per process), accum_steps, epochs or iters, lr, min_lr, weight_decay, lr_schedule,
    warmup_epochs or warmup_iters, warmup_factor, lr_steps, clip_grad, ema_decay, amp, compile,
    workers, print_freq, checkpoint_every, eval_interval, seed, output_dir."""

    def __init__(self, args, model, task, rank, world_size, device):
        self.args, self.task, self.rank, self.world_size, self.device = args, task, rank, world_size, device
        self.model = model.to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = wrap_ddp(self.model, device)
        self.forward = torch.compile(self.ddp) if args.compile else self.ddp
        self.ema = ema_model(self.model, args.ema_decay) if args.ema_decay > 0 else None

        self.sampler = ResumableDistributedSampler(task.train_set, world_size, rank, shuffle=True, seed=args.seed,
                                                   drop_last=True, repeated_aug=task.repeated_aug)
        self.train_loader = DataLoader(task.train_set, args.batch_size, sampler=self.sampler, drop_last=True,
                                       num_workers=args.workers, pin_memory=device.type == "cuda",
                                       collate_fn=task.collate_fn)
        self.global_batch = args.batch_size * world_size * args.accum_steps
        self.steps_per_epoch = len(self.sampler) // (args.batch_size * args.accum_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(task.train_set)} training images are fewer than one global batch of "
                             f"{self.global_batch} (--batch-size {args.batch_size} x {world_size} processes x "
                             f"--accum-steps {args.accum_steps}): lower --batch-size or --accum-steps")
        self.total_steps = args.iters or args.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.lr = args.lr * self.global_batch / task.reference_batch
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=self.lr, betas=BETAS)
        warmup_steps = args.warmup_iters if args.warmup_iters is not None else \
            round(args.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, warmup_steps=warmup_steps, total_steps=self.total_steps, schedule=args.lr_schedule,
            warmup_factor=args.warmup_factor, min_factor=args.min_lr / self.lr,
            milestones=[epoch * self.steps_per_epoch for epoch in args.lr_steps or ()]))
        self.amp_dtype, self.scaler = amp_settings(args.amp, device)
        self.epoch, self.step, self.best, self.rng_states = 0, 0, None, None

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best": self.best,
            "rng": all_rng_states(),
            "args": vars(self.args), "task": self.task.name,
            "num_classes": self.task.num_classes, "classes": self.task.classes,
        }

    def resume(self):
        """Continue from output_dir/last.pth if there is one. A checkpoint of another task, model,
        class count or other model parts (a token head) cannot continue this run: say so before
        anything is written."""
        path = find_last_checkpoint(self.args.output_dir)
        if path is None:
            return
        checkpoint = glnet.read_checkpoint(path)
        old = (checkpoint.get("task"), checkpoint.get("args", {}).get("model"), checkpoint.get("num_classes"))
        new = (self.task.name, self.args.model, self.task.num_classes)
        if old != new:
            raise ValueError(f"{path} is a {old[0]} checkpoint of {old[1]} with {old[2]} classes, but this run "
                             f"trains {new[0]} with {new[1]} and {new[2]} classes; use another --output-dir "
                             f"(or the same task, --model and data) to resume")
        differ = sorted(set(checkpoint["model"]) ^ set(self.model.state_dict()))
        if differ:
            raise ValueError(f"{path} holds a {old[1]} with other parts than this run's (they differ in "
                             f"{', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}); use another "
                             f"--output-dir (or the same model, token head included) to resume")
        self.model.load_state_dict(checkpoint["model"])
        if self.ema and checkpoint["model_ema"] is not None:
            self.ema.load_state_dict(checkpoint["model_ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.step, self.best = checkpoint["epoch"], checkpoint["step"], checkpoint["best"]
        if len(checkpoint["rng"]) == self.world_size:  # another world size cannot continue the same streams
            self.rng_states = checkpoint["rng"][self.rank]
        log(f"resuming from {path}: epoch {self.epoch + 1}, step {self.step}")

    def save(self, record=None, improved=False):
        """last.pth; with `improved`, also best.pth (weights and metrics only). Every rank joins
        the RNG gather; rank 0 writes."""
        state = self.state_dict()
        if not is_main_process():
            return
        save_checkpoint(state, os.path.join(self.args.output_dir, "last.pth"))
        if improved:
            best = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
            metric = self.task.main_metric
            if self.ema and record[f"val_{metric}"] > record[f"ema_{metric}"]:
                best.pop("model_ema")  # so that loading best.pth picks the better weights
            save_checkpoint(best | {"metrics": record}, os.path.join(self.args.output_dir, "best.pth"))

    # -- the loop --------------------------------------------------------------------------------

    def train_step(self, micro_batches):
        """One optimizer step over `accum_steps` micro-batches; returns the mean loss."""
        total = 0.0
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            no_sync = self.ddp.no_sync if isinstance(self.ddp, DistributedDataParallel) and not last \
                else contextlib.nullcontext
            with no_sync():
                with autocast(self.device, self.amp_dtype):
                    loss = self.task.loss(self.forward, batch)
                check_finite(loss, f"epoch {self.epoch + 1} step {self.step + 1}")
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.item()
        if self.args.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.model)
        return total / len(micro_batches)

    def train_epoch(self):
        """Train from (self.epoch, self.step) to the end of the epoch (or of --iters); returns the
        mean loss and the number of steps taken."""
        args = self.args
        self.model.train()
        if self.rng_states is not None:
            set_rng_state(self.rng_states)
            self.rng_states = None
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.step * args.batch_size * args.accum_steps
        # The workers' seeds come from (seed, epoch), not from the global RNG stream.
        self.train_loader.generator = torch.Generator().manual_seed(args.seed * 100_003 + self.epoch)
        batches = iter(self.train_loader)
        steps = min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)
        losses, window_start, window_loss = [], time.perf_counter(), 0.0
        while self.step < steps:
            loss = self.train_step(list(itertools.islice(batches, args.accum_steps)))
            self.step += 1
            losses.append(loss)
            window_loss += loss
            if self.step % args.print_freq == 0 or self.step == steps:
                window = (self.step - 1) % args.print_freq + 1
                seconds = time.perf_counter() - window_start
                steps_left = self.total_steps - self.epoch * self.steps_per_epoch - self.step
                mem = f"  mem {torch.cuda.max_memory_allocated() / 2 ** 30:.1f}G" if self.device.type == "cuda" else ""
                log(f"epoch {self.epoch + 1}/{self.epochs}  step {self.step}/{steps}  "
                    f"loss {window_loss / window:.4f}  lr {self.optimizer.param_groups[0]['lr']:.2e}  "
                    f"img/s {window * self.global_batch / seconds:.1f}  "
                    f"eta {format_eta(steps_left * seconds / window)}{mem}")
                window_start, window_loss = time.perf_counter(), 0.0
            if args.checkpoint_every and self.step % args.checkpoint_every == 0 and self.step < steps:
                self.save()
        return sum(losses) / max(len(losses), 1), len(losses)

    def evaluate(self, model):
        """The task's evaluation of `model`. Its buffers (BatchNorm statistics) first become rank 0's
        on every rank: DDP syncs them before each training forward, so each rank's last batch left
        its own, and every rank must evaluate the weights that rank 0 saves."""
        if dist.is_initialized():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        with autocast(self.device, self.amp_dtype):
            return self.task.evaluate(model)

    def fit(self):
        """Train to the end of the recipe, evaluating every eval_interval epochs and after the
        last; returns the last epoch's record."""
        args = self.args
        log(f"global batch {self.global_batch} = {args.batch_size} per process x {self.world_size} processes x "
            f"{args.accum_steps} accumulation steps; peak lr {self.lr:.2e} ({args.lr:.2e} per "
            f"{self.task.reference_batch}); {self.steps_per_epoch} steps per epoch, {self.total_steps} in all, "
            f"on {self.device}")
        if self.epoch >= self.epochs:
            log(f"{os.path.join(args.output_dir, 'last.pth')} has finished all {self.epochs} epochs: nothing to "
                f"train (--eval evaluates it; a larger --epochs or --iters continues it)")
        record = {}
        while self.epoch < self.epochs:
            start = time.perf_counter()
            train_loss, steps = self.train_epoch()
            train_seconds = time.perf_counter() - start
            record = {"epoch": self.epoch + 1, "step": self.epoch * self.steps_per_epoch + self.step,
                      "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "train_images_per_second": steps * self.global_batch / train_seconds}
            improved, summary = False, ""
            if (self.epoch + 1) % args.eval_interval == 0 or self.epoch + 1 == self.epochs:
                metrics = {"val": self.evaluate(self.model)} | ({"ema": self.evaluate(self.ema.module)} if self.ema else {})
                for prefix, values in metrics.items():
                    record.update({f"{prefix}_{k}": v for k, v in values.items()})
                score = max(values[self.task.main_metric] for values in metrics.values())
                improved = self.best is None or score > self.best
                self.best = score if improved else self.best
                summary = "".join(f"  {prefix} {format_metrics(values)}" for prefix, values in metrics.items())
                summary += f"  best {self.task.main_metric} {self.best:.4g}"
            record.update(best=self.best, epoch_seconds=time.perf_counter() - start)
            log(f"epoch {self.epoch + 1}/{self.epochs} done  train loss {train_loss:.4f}{summary}  "
                f"time {format_eta(record['epoch_seconds'])}")
            self.epoch, self.step = self.epoch + 1, 0
            self.save(record, improved)
            if is_main_process():
                append_metrics(args.output_dir, record)
        return record


# ---------------------------------------------------------------------------------------------
# Image classification: the Task train.py plugs into the Trainer
# ---------------------------------------------------------------------------------------------

def mixup_cutmix(num_classes, mixup, cutmix):
    """Batch-level MixUp or CutMix (one chosen per batch), or None when both are off."""
    transforms = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
                 ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return v2.RandomChoice(transforms) if transforms else None


def classification_loss(model, batch, device, criterion, mixup=None):
    images, targets = (t.to(device, non_blocking=True) for t in batch)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    if mixup is not None:
        images, targets = mixup(images, targets)
    return criterion(model(images), targets)


def classification_task(args, train_set, val_set, rank, world_size, device, mix_token=None):
    """Classification of ImageFolder classes; with `mix_token` (a MixToken on the model) the training
    set is TokenLabeledImages and the loss is token labeling's."""
    num_classes = len(train_set.classes)
    val_loader = eval_loader(val_set, args.batch_size, args.workers, rank, world_size)
    if mix_token is not None:
        loss = functools.partial(token_labeling_loss, device=device, mix_token=mix_token)
    else:
        loss = functools.partial(classification_loss, device=device,
                                 criterion=nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                                 mixup=mixup_cutmix(num_classes, args.mixup, args.cutmix))
    return Task("classification", train_set, loss, functools.partial(evaluate, loader=val_loader, device=device),
                main_metric="top1", reference_batch=REFERENCE_BATCH, num_classes=num_classes,
                classes=train_set.classes, repeated_aug=args.repeated_aug)


# ---------------------------------------------------------------------------------------------
# Token labeling (LV-ViT, "All Tokens Matter"; Table 9): a teacher's dense score maps supervise
# every token of the last stage. Label maps on disk -> targets of the crop in the data loader ->
# MixToken inside the forward -> the loss. And --make-token-labels, which writes label maps.
# ---------------------------------------------------------------------------------------------

def label_map_path(labels_dir, split_dir, image_path):
    """LV-ViT's layout: <labels>/<class folder>/<image file name without extension>.pt."""
    return os.path.join(labels_dir, os.path.splitext(os.path.relpath(image_path, split_dir))[0] + ".pt")


def token_label_targets(label_map, box, image_size, grid, num_classes, smoothing=0.0):
    """The targets of a crop, as LV-ViT builds them from the label map (2, 5, H, W) of the whole
    image (`image_size` = (height, width) pixels): the top-5 logits are scattered into a dense
    (K, H, W) map (0 elsewhere), cut out with the crop's `box` (top, left, height, width in pixels)
    by roi_align to the token `grid` (h, w) and to 1 x 1, softmaxed over the classes and smoothed.
    Returns (crop label (K,), token labels (K, h, w))."""
    logits, classes = label_map.float()                                          # (5, H, W) each
    dense = torch.zeros(num_classes, *logits.shape[1:]).scatter_(0, classes.long(), logits)
    top, left, height, width = box
    sy, sx = dense.shape[1] / image_size[0], dense.shape[2] / image_size[1]      # map cells per pixel
    roi = torch.tensor([[0, left * sx, top * sy, (left + width) * sx, (top + height) * sy]])  # (index, x1, y1, x2, y2)
    tokens = roi_align(dense[None], roi, output_size=grid, aligned=True)[0]      # (K, h, w)
    crop = roi_align(dense[None], roi, output_size=1, aligned=True)[0, :, 0, 0]  # (K,)

    def smooth(scores):
        return (1 - smoothing) * scores.softmax(dim=0) + smoothing / num_classes

    return smooth(crop), smooth(tokens)


class TokenLabeledImages(Dataset):
    """The images of an ImageFolder split with their label maps in LV-ViT's format: one file per
    image, label_map_path(), holding a tensor (2, 5, H, W): the teacher's top-5 logits and their
    class indices (half precision) at every position of an H x W grid over the whole image.

    An item is (image, class index, crop label (K,), token labels (h*w, K), row-major as the model's
    token logits). The label map follows the image through the random-resized crop (the same box)
    and the horizontal flip. RandAugment's rotations, shears and translations move the pixels but
    leave the map as it is: torchvision's RandAugment does not say which operation it drew, and the
    labels of those images are off by up to the operation's shift (up to 40% of the crop for
    translations at magnitude 9, drawn for about one image in four)."""

    def __init__(self, data_dir, labels_dir, image_size, augment, interpolation="bilinear", label_smoothing=0.1):
        self.images = image_folder(data_dir, "train", None)
        self.classes, self.labels_dir = self.images.classes, labels_dir
        self.augment, self.smoothing = augment, label_smoothing
        self.crop = v2.RandomResizedCrop(image_size, interpolation=interpolation, antialias=True)
        self.grid = (math.ceil(image_size / TOKEN_STRIDE),) * 2
        self.check_labels_dir()

    def __len__(self):
        return len(self.images)

    def path(self, image_path):
        return label_map_path(self.labels_dir, self.images.root, image_path)

    def expected(self):
        return (f"a tensor (2, {TOP_K}, H, W): the teacher's top-{TOP_K} logits and their class indices "
                f"(0-{len(self.classes) - 1}) at every position of an H x W grid over the image")

    def check_labels_dir(self):
        """Before training starts: the data's class folders, and a label map for every image."""
        example = self.path(os.path.join(self.images.root, "<class>", "<image>.JPEG"))
        layout = f"expected one label map per training image: {example}"
        if not os.path.isdir(self.labels_dir):
            raise FileNotFoundError(f"--token-labels {self.labels_dir} does not exist; {layout}")
        classes = class_folders(self.labels_dir)
        if classes != self.classes:
            raise ValueError(f"the class folders of --token-labels {self.labels_dir} differ from those of "
                             f"{self.images.root}: {len(classes)} vs {len(self.classes)}; only in the labels: "
                             f"{sorted(set(classes) - set(self.classes))[:5]}, only in the data: "
                             f"{sorted(set(self.classes) - set(classes))[:5]}")
        missing = []
        for label, samples in itertools.groupby(self.images.samples, key=lambda sample: sample[1]):  # class by class
            present = {os.path.join(folder, name) for folder, _, names in
                       os.walk(os.path.join(self.labels_dir, self.classes[label])) for name in names}
            missing += [path for path, _ in samples if self.path(path) not in present]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.images)} training images have no label map, e.g. "
                                    f"{missing[0]}: expected {self.path(missing[0])}, {self.expected()}")

    def read_label_map(self, image_path):
        path = self.path(image_path)
        try:
            label_map = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no label map for {image_path}: expected {path}, {self.expected()}") from None
        if not isinstance(label_map, torch.Tensor) or label_map.ndim != 4 or label_map.shape[:2] != (2, TOP_K):
            found = f"shape {tuple(label_map.shape)}" if isinstance(label_map, torch.Tensor) else \
                f"a {type(label_map).__name__}"
        elif not 0 <= label_map[1].min() <= label_map[1].max() < len(self.classes):
            found = f"class indices {label_map[1].min():.0f}-{label_map[1].max():.0f}"
        else:
            return label_map
        raise ValueError(f"the label map {path} of {image_path} holds {found}; expected {self.expected()}")

    def __getitem__(self, index):
        path, target = self.images.samples[index]
        image, label_map = load_image(path), self.read_label_map(path)
        box = self.crop.make_params([image])                                    # the random-resized crop
        crop_label, token_labels = token_label_targets(
            label_map, (box["top"], box["left"], box["height"], box["width"]), (image.height, image.width),
            self.grid, len(self.classes), self.smoothing)
        image = self.crop.transform(image, box)
        if torch.rand(()) < 0.5:                                                # the horizontal flip
            image, token_labels = v2.functional.horizontal_flip(image), token_labels.flip(-1)
        return self.augment(image), target, crop_label, rearrange(token_labels, "k h w -> (h w) k")


def random_token_box(height, width):
    """CutMix's box on the height x width token grid, as a bool mask: lam ~ Beta(1, 1) (uniform), a
    box of sides sqrt(1 - lam) times the grid's around a random token, clipped at the edges."""
    side = (1 - torch.rand(())).sqrt().item()
    box_h, box_w = int(height * side), int(width * side)
    top = torch.randint(height, ()).item() - box_h // 2
    left = torch.randint(width, ()).item() - box_w // 2
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[max(top, 0):top + box_h, max(left, 0):left + box_w] = True
    return mask


class MixToken:
    """LV-ViT's MixToken, inside the model's own forward (so DDP synchronises the gradients as for
    any forward): a forward hook on the stem swaps the stride-4 features in a box with those of the
    batch flipped along its first axis. The box is chosen on the token grid (stride 32) and covers
    8 x 8 stem pixels per token, so the token logits of the box can be swapped back exactly. `mask`
    (the box on the token grid) is set for one forward; None, or eval mode, mixes nothing."""

    def __init__(self, model):
        self.mask = None
        self.scale = model.stage_strides[-1] // model.stage_strides[0]  # 8 stem pixels per token
        model.downsample_layers[0].register_forward_hook(self.mix)

    def mix(self, stem, inputs, features):                                     # (B, C, H/4, W/4)
        if self.mask is None or not stem.training:
            return None
        box = self.mask.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
        return torch.where(box[:features.shape[2], :features.shape[3]], features.flip(0), features)


def mix_token_forward(model, images, mix_token):
    """(class logits (B, K), token logits (B, h*w, K), lam) of a batch mixed by MixToken in a random
    box: each token's logits are put back to the image they came from, and the class logits saw a
    share lam (1 - the box's area) of their own image."""
    mask = random_token_box(*(math.ceil(size / TOKEN_STRIDE) for size in images.shape[2:])).to(images.device)
    mix_token.mask = mask
    try:
        class_logits, token_logits = model(images)
    finally:
        mix_token.mask = None
    in_box = mask.flatten()[None, :, None]                                     # the tokens' row-major order
    return class_logits, torch.where(in_box, token_logits.flip(0), token_logits), 1 - mask.float().mean()


def token_labeling_loss(model, batch, device, mix_token):
    """LV-ViT's loss with MixToken: soft-target cross-entropy of the class logits against the
    teacher's crop label, mixed by the box's area (the ground truth is not used, as in the released
    recipe), + 0.5 x the mean over all tokens of the soft-target cross-entropy of the token logits
    against their token labels."""
    images, _, crop_labels, token_labels = (t.to(device, non_blocking=True) for t in batch)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    class_logits, token_logits, lam = mix_token_forward(model, images, mix_token)
    crop_labels = lam * crop_labels + (1 - lam) * crop_labels.flip(0)
    token_loss = nn.functional.cross_entropy(token_logits.flatten(0, 1), token_labels.flatten(0, 1))
    return nn.functional.cross_entropy(class_logits, crop_labels) + TOKEN_LOSS_WEIGHT * token_loss


def teacher_token_logits(teacher, images):
    """(B, K, h, w): the logits of every token of the last stage, by the token head, or by the class
    head for a teacher without one (its class logits are their mean)."""
    last = teacher.forward_features(images)[-1]                                # (B, C, h, w)
    if teacher.token_head is not None:
        tokens = teacher.forward_head(last, return_tokens=True)[1]             # (B, h*w, K)
    else:
        tokens = teacher.head(rearrange(teacher.norm(last), "b c h w -> b (h w) c"))
    return rearrange(tokens, "b (h w) k -> b k h w", h=last.shape[2])


@torch.no_grad()
def make_token_labels(args):
    """--make-token-labels DIR --teacher CHECKPOINT: label maps in LV-ViT's format for every training
    image of --data (default: the teacher's data), from a GLNet checkpoint: the top-5 token logits
    of the whole image resized to the teacher's image size, and their classes, (2, 5, h, w) in half
    precision. Written to DIR.tmp and renamed to DIR when complete."""
    rank, world_size, device = setup_distributed()
    output = os.path.abspath(args.make_token_labels)
    if os.path.isdir(output) and os.listdir(output):
        raise FileExistsError(f"{output} is not empty: label maps go into a new folder (choose another or remove it)")
    checkpoint = glnet.read_checkpoint(args.teacher)
    trained = checkpoint.get("args", {})
    model_name = args.model if "model" in args.given else trained.get("model")
    if model_name is None:
        raise ValueError(f"{args.teacher} was not written by train.py, so it does not say which model it is: "
                         f"pass --model ({', '.join(glnet.MODELS)})")
    data = args.data or trained.get("data")  # None: the built-in data
    data_dir = data or shapes_dataset(trained.get("cache_dir", args.cache_dir))
    check_layout(data_dir, splits=("train",))
    image_size, interpolation = (checkpoint_setting(args, trained, key) for key in ("image_size", "interpolation"))
    images = image_folder(data_dir, "train", v2.Compose([
        v2.Resize((image_size, image_size), interpolation=interpolation, antialias=True),
        v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]))
    if not TOP_K <= len(images.classes) <= 2048:  # class indices are exact in half precision up to 2048
        raise ValueError(f"label maps hold the top-{TOP_K} of at most 2048 classes; {data_dir} has "
                         f"{len(images.classes)}")
    teacher = glnet.create_model(model_name, num_classes=len(images.classes), checkpoint=checkpoint,
                                 checkpoint_key=args.checkpoint_key, **model_options(trained)).to(device).eval()
    loader = eval_loader(images, args.batch_size, args.workers, rank, world_size)
    tmp = output + ".tmp"
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    start, indices = time.perf_counter(), iter(loader.sampler)
    for batch, _ in loader:
        with autocast(device, amp_settings(args.amp, device)[0]):
            top = teacher_token_logits(teacher, batch.to(device)).float().topk(TOP_K, dim=1)
        label_maps = torch.stack([top.values, top.indices.float()], dim=1).half().cpu()  # (B, 2, 5, h, w)
        for label_map in label_maps:
            path = label_map_path(tmp, images.root, images.samples[next(indices)][0])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(label_map.clone(), path)  # a copy: saving a view would store the whole batch
    if dist.is_initialized():
        dist.barrier()
    if is_main_process():
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(tmp, output)
    grid = math.ceil(image_size / TOKEN_STRIDE)
    log(f"wrote {len(images)} label maps (2, {TOP_K}, {grid}, {grid}) of {model_name} at {image_size}x{image_size} "
        f"to {output} in {format_eta(time.perf_counter() - start)}\n"
        f"train with them: python train.py --token-labels {output}"
        + (f" --data {data}" if data else ""))
    return output


# ---------------------------------------------------------------------------------------------
# Timing, shared by --bench here and in detect_seg.py and by analyze.py
# ---------------------------------------------------------------------------------------------

def time_call(fn, device):
    """Wall-clock seconds of one call, waiting for the GPU to finish."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def interleaved_medians(calls, rounds, device):
    """Median seconds of each call. One call of each per round, so that the noise of a shared
    machine hits every call alike and their ratios stay comparable."""
    for fn in calls.values():
        fn()  # warm-up (and compilation)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(time_call(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def peak_forward_memory_mib(name, image_size, device):
    """Memory one eval forward of a batch of one image needs beyond the model itself: the CUDA
    allocator's peak on GPU; on CPU the rise of the peak resident set of a fresh process (Linux)."""
    if device.type == "cuda":
        model = glnet.create_model(name).to(device).eval()
        x = torch.randn(1, 3, image_size, image_size, device=device)
        with torch.inference_mode():
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(x)
            return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_rss_rise_mib, (name, image_size))


def _peak_rss_rise_mib(name, image_size):
    def resident_kib(field):  # VmRSS: now; VmHWM: the peak since the last reset
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    model = glnet.create_model(name).eval()
    x = torch.randn(1, 3, image_size, image_size)
    with torch.inference_mode():
        model(x[:, :, :64, :64])  # load the kernels first
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = resident_kib("VmRSS")
        model(x)
    return (resident_kib("VmHWM") - before) / 1024


def bench(args):
    """--bench: inference and training steps (the Trainer's own: forward, backward, clipping,
    AdamW, EMA) of GLNet variants against torchvision's swin_t and convnext_tiny, interleaved in
    one run; glnet_stl's latency across sizes; the peak memory of its forward. A variant with a
    token head takes token labeling's step (MixToken, both losses) on random targets."""
    import torchvision
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed, rank)
    builders = {name: functools.partial(glnet.create_model, name) for name in args.models}
    builders.update({name: getattr(torchvision.models, name) for name in BENCH_BASELINES})
    fake = datasets.FakeData(size=args.batch_size * world_size * args.accum_steps, num_classes=1000)
    task = Task("classification", fake, functools.partial(classification_loss, device=device,
                                                          criterion=nn.CrossEntropyLoss()),
                None, "top1", REFERENCE_BATCH, num_classes=1000)
    amp_dtype, _ = amp_settings(args.amp, device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def images(size, batch):
        return torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)

    def inference(model, x):
        def call():
            with torch.inference_mode(), autocast(device, amp_dtype):
                model(x)
        return call

    batch = (images(args.image_size, args.batch_size), torch.zeros(args.batch_size, dtype=torch.long))
    tokens = math.ceil(args.image_size / TOKEN_STRIDE) ** 2
    token_batch = (*batch, torch.randn(args.batch_size, 1000, device=device).softmax(-1),
                   torch.randn(args.batch_size, tokens, 1000, device=device).softmax(-1))
    trainers, batches = {}, {}
    for name, build in builders.items():
        model, model_task, batches[name] = build(num_classes=1000), task, batch
        if getattr(model, "token_head", None) is not None:
            model_task = dataclasses.replace(task, loss=functools.partial(token_labeling_loss, device=device,
                                                                          mix_token=MixToken(model)))
            batches[name] = token_batch
        trainers[name] = Trainer(args, model, model_task, rank, world_size, device)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {world_size} x {device.type}; autocast "
        f"{amp_dtype}, {'channels_last' if device.type == 'cuda' else 'NCHW'} input, "
        f"{'compiled' if args.compile else 'eager'}; medians of {args.rounds} interleaved rounds")
    for title, train_mode in (("inference (eval mode)", False), ("training step (forward, backward, clipping, "
                                                                  "AdamW, EMA)", True)):
        calls = {}
        for name, trainer in trainers.items():
            trainer.model.train(train_mode)
            calls[name] = (lambda t=trainer, b=batches[name]: t.train_step([b] * args.accum_steps)) if train_mode \
                else inference(trainer.forward, batch[0])
        seconds = interleaved_medians(calls, args.rounds, device)
        images_per_call = args.batch_size * (world_size * args.accum_steps if train_mode else 1)
        log(f"\n{title}, batch {images_per_call}, {args.image_size}x{args.image_size}")
        log(f"{'model':<22}{'images/s':>10}" + "".join(f"{f'x {b}':>{len(b) + 4}}" for b in BENCH_BASELINES))
        for name, t in seconds.items():
            log(f"{name:<22}{images_per_call / t:>10.1f}"
                + "".join(f"{seconds[b] / t:>{len(b) + 4}.2f}" for b in BENCH_BASELINES))

    model = trainers["glnet_stl"].forward if "glnet_stl" in trainers else glnet.glnet_stl().to(device)
    model.eval()
    sizes = args.latency_sizes
    seconds = interleaved_medians({size: inference(model, images(size, 1)) for size in sizes}, args.rounds, device)
    log(f"\nglnet_stl latency, batch 1 (linear in the pixel count when 'x {sizes[0]}' <= 'pixels x {sizes[0]}')")
    log(f"{'size':>6}{'ms':>10}{f'x {sizes[0]}':>8}{f'pixels x {sizes[0]}':>14}")
    for size, t in seconds.items():
        log(f"{size:>6}{1000 * t:>10.1f}{t / seconds[sizes[0]]:>8.1f}{(size / sizes[0]) ** 2:>14.1f}")

    log("\npeak memory of one glnet_stl forward, batch 1, beyond the weights (fp32, eager)")
    memory = {size: peak_forward_memory_mib("glnet_stl", size, device) for size in args.memory_sizes}
    for size, mib in memory.items():
        log(f"{size:>6}x{size}: {mib:7.0f} MiB")
    return {"seconds": seconds, "memory_mib": memory}


# ---------------------------------------------------------------------------------------------
# Entry points: train, --eval, --bench
# ---------------------------------------------------------------------------------------------

def recipe_keys(args):
    return list(dict.fromkeys([*RECIPES[args.recipe], *CLASSIFICATION_SCHEDULE, "drop_path"]))


def describe_recipe(args):
    """The recipe's name and every value the run uses (* = set on the command line)."""
    labels = f", token labels {args.token_labels}" if args.token_labels else ""
    values = ", ".join(f"{key} {getattr(args, key)}{'*' if key in args.given else ''}" for key in recipe_keys(args))
    return f"recipe {args.recipe}{labels}: {values} (* = set on the command line)"


def model_options(trained):
    """What glnet.create_model needs beside the name to rebuild a model trained here (from the
    checkpoint's args): the token head of a --token-labels run."""
    return {"token_head": True} if trained.get("token_head") else {}


def checkpoint_setting(args, trained, key):
    """For --eval and --make-token-labels: the value given on the command line, else the one the
    checkpoint was trained with, else the ImageNet recipe's (a checkpoint from elsewhere)."""
    return getattr(args, key) if key in args.given else trained.get(key, IMAGENET_RECIPE[key])


def build_trainer(args, data_dir, rank, world_size, device):
    """What a run trains with, all from its args: the datasets, the model, the Task, the Trainer."""
    train_set, val_set = build_datasets(data_dir, args.image_size, args.randaugment, args.interpolation,
                                        args.random_erasing, args.token_labels, args.label_smoothing)
    model = glnet.create_model(args.model, num_classes=len(train_set.classes), drop_path_rate=args.drop_path,
                               **model_options(vars(args)))
    mix_token = MixToken(model) if args.token_labels else None
    task = classification_task(args, train_set, val_set, rank, world_size, device, mix_token)
    log(f"{args.model}{' with a token head' if args.token_head else ''} ({glnet.count_params(model) / 1e6:.2f} M "
        f"params), {task.num_classes} classes, {len(train_set)} train / {len(val_set)} val images from {data_dir}, "
        f"{args.image_size}x{args.image_size}")
    return Trainer(args, model, task, rank, world_size, device)


def train(args):
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed, rank)
    log(describe_recipe(args))
    data_dir = args.data or shapes_dataset(args.cache_dir)
    trainer = build_trainer(args, data_dir, rank, world_size, device)
    trainer.resume()
    start = time.perf_counter()
    trainer.fit()
    log(f"done in {format_eta(time.perf_counter() - start)}: best val top-1 {trainer.best:.2f}\n"
        f"checkpoints: {os.path.join(args.output_dir, 'last.pth')} and {os.path.join(args.output_dir, 'best.pth')}, "
        f"metrics: {os.path.join(args.output_dir, 'metrics.jsonl')}\n"
        f"evaluate:    python train.py --eval --checkpoint {os.path.join(args.output_dir, 'best.pth')}")
    return {"best_top1": trainer.best}


def evaluate_checkpoint(args):
    """--eval: a checkpoint of this script (its model, data, size and resizing are read from it) or a
    released one (give --model and --data; it is evaluated as the released models were: bicubic)."""
    rank, world_size, device = setup_distributed()
    if not args.checkpoint:
        raise ValueError("--eval needs --checkpoint FILE")
    checkpoint = glnet.read_checkpoint(args.checkpoint)
    trained = checkpoint.get("args", {})
    model_name = args.model if "model" in args.given else trained.get("model")
    if model_name is None or not (args.data or trained):
        raise ValueError(f"{args.checkpoint} was not written by train.py, so it does not say which model and data "
                         f"it is for: pass --model ({', '.join(glnet.MODELS)}) and --data (the ImageNet folder)")
    data_dir = args.data or trained.get("data") or shapes_dataset(trained.get("cache_dir", args.cache_dir))
    image_size, interpolation = (checkpoint_setting(args, trained, key) for key in ("image_size", "interpolation"))
    val_set = build_val_dataset(data_dir, image_size, interpolation)
    model = glnet.create_model(model_name, num_classes=len(val_set.classes), checkpoint=checkpoint,
                               checkpoint_key=args.checkpoint_key, **model_options(trained))
    model.to(device)
    with autocast(device, amp_settings(args.amp, device)[0]):
        metrics = evaluate(model, eval_loader(val_set, args.batch_size, args.workers, rank, world_size), device)
    log(f"{args.checkpoint} ({model_name}, {image_size}x{image_size}) on {metrics['images']} images of "
        f"{os.path.join(data_dir, 'val')}: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
        f"loss {metrics['loss']:.4f}")
    return metrics


# ---------------------------------------------------------------------------------------------
# Command line: the flags of the Trainer are shared with detect_seg.py
# ---------------------------------------------------------------------------------------------

def add_training_arguments(parser, default):
    """The flags every training script of the project has, with the same names and meanings.
    `default(key)` describes a flag's default (they come from the script's recipe: None here)."""
    parser.add_argument("--model", choices=list(glnet.MODELS), help=default("model"))
    parser.add_argument("--data", help=default("data"))
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help="where the built-in datasets are written once (default %(default)s)")
    parser.add_argument("--output-dir", help=default("output_dir"))
    parser.add_argument("--epochs", type=int, help=default("epochs"))
    parser.add_argument("--iters", type=int, help="optimizer steps in all, instead of --epochs; " + default("iters"))
    parser.add_argument("--batch-size", type=int, help="images per process per step; " + default("batch_size"))
    parser.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation: global batch = "
                        "batch size x processes x accum steps (default %(default)s)")
    parser.add_argument("--lr", type=float, help="peak learning rate at the recipe's reference global batch, "
                                                 "scaled linearly to the actual one; " + default("lr"))
    parser.add_argument("--min-lr", type=float, help="where the cosine ends; " + default("min_lr"))
    parser.add_argument("--weight-decay", type=float, help="AdamW's, none on norms, biases, tau, layer-scale "
                                                           "gammas and learned slots; " + default("weight_decay"))
    parser.add_argument("--lr-schedule", choices=["cosine", "poly", "step"], help="the lr after the warm-up: cosine or "
                        "linear (poly) decay to --min-lr, or x0.1 at each of --lr-steps; " + default("lr_schedule"))
    parser.add_argument("--lr-steps", type=int, nargs="+", help="--lr-schedule step: the epochs at which the lr drops "
                                                                "10x; " + default("lr_steps"))
    parser.add_argument("--warmup-epochs", type=float, help=default("warmup_epochs"))
    parser.add_argument("--warmup-iters", type=int, help="instead of --warmup-epochs; " + default("warmup_iters"))
    parser.add_argument("--warmup-factor", type=float, help="the warm-up starts at this fraction of the peak lr; "
                                                            + default("warmup_factor"))
    parser.add_argument("--clip-grad", type=float, help="max gradient norm, 0 = off; " + default("clip_grad"))
    parser.add_argument("--drop-path", type=float, help="GLNet's stochastic depth rate; " + default("drop_path"))
    parser.add_argument("--ema-decay", type=float, help="EMA of the weights, 0 = off; " + default("ema_decay"))
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                        help="mixed precision; auto = bf16 on GPU, none on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, help="data loading processes per process; " + default("workers"))
    parser.add_argument("--threads", type=int, help="CPU threads per process, 0 = torch's default; "
                                                    + default("threads"))
    parser.add_argument("--print-freq", type=int, help="a progress line every N steps; " + default("print_freq"))
    parser.add_argument("--checkpoint-every", type=int,
                        help="also write last.pth every N steps within an epoch (default: at epoch ends only)")
    parser.add_argument("--eval-interval", type=int, help="evaluate every N epochs and after the last; "
                                                          + default("eval_interval"))
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument("--eval", action="store_true", help="evaluate --checkpoint on the validation set, then exit")
    parser.add_argument("--checkpoint", help="the checkpoint --eval evaluates")
    parser.add_argument("--bench", action="store_true", help="measure speed (and memory), then exit")


def apply_recipe(args, recipe):
    """Every flag left unset takes the recipe's value."""
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def check_training_arguments(parser, args):
    """Usage errors for values the Trainer cannot run with."""
    require_positive(parser, args, ("epochs", "iters", "batch_size", "accum_steps", "print_freq",
                                    "checkpoint_every", "eval_interval"))
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be at least 0, got {args.workers}")
    if args.ema_decay is not None and not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")


def has_token_head(model_name):
    with torch.device("meta"):
        return glnet.create_model(model_name).token_head is not None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def default(key):
        if key == "data":
            return "ImageNet-layout folder (train/<class>/*, val/<class>/*); default: the built-in shapes dataset"
        if key == "output_dir":
            return "checkpoints and metrics.jsonl; default: runs/<model>-<data name>[-tklb]"
        values = "; ".join(f"{name} {recipe[key]}" for name, recipe in RECIPES.items() if key in recipe)
        if key == "drop_path":
            return f"default: {values}; otherwise per model: {DROP_PATH}"
        if key in CLASSIFICATION_SCHEDULE:
            return f"default {CLASSIFICATION_SCHEDULE[key]}"
        return f"default by --recipe: {values}" if values else "default: none"

    add_training_arguments(parser, default)
    parser.add_argument("--recipe", choices=list(RECIPES), help="the defaults of the training flags: the built-in "
                        "data's (CPU, minutes), the paper's Table 8 (imagenet) or Table 9 (imagenet-tklb, token "
                        "labeling); default: imagenet with --data (imagenet-tklb with --token-labels), builtin without")
    parser.add_argument("--image-size", type=int, help=default("image_size"))
    parser.add_argument("--randaugment", action=argparse.BooleanOptionalAction,
                        help=f"RandAugment(9, 0.5), timm's rand-m9-mstd0.5; {default('randaugment')}")
    parser.add_argument("--mixup", type=float, help=f"MixUp alpha, 0 = off; {default('mixup')}")
    parser.add_argument("--cutmix", type=float, help=f"CutMix alpha, 0 = off; {default('cutmix')}")
    parser.add_argument("--label-smoothing", type=float, help=default("label_smoothing"))
    parser.add_argument("--repeated-aug", type=int, help="every training image N times per epoch, spread over the "
                        f"ranks, the epoch as long as without (1 = off); {default('repeated_aug')}")
    parser.add_argument("--random-erasing", type=float, help="probability of erasing a random rectangle with "
                        f"per-pixel random values, 0 = off; {default('random_erasing')}")
    parser.add_argument("--interpolation", choices=["bilinear", "bicubic"], help="of the training crop, RandAugment "
                        f"and the evaluation resize; {default('interpolation')}")
    parser.add_argument("--checkpoint-key", help="with --eval: 'model' or 'model_ema' (default: EMA if present)")
    labels = parser.add_argument_group("token labeling (LV-ViT's label maps: <labels>/<class>/<image name>.pt, "
                                       "a tensor (2, 5, H, W) of top-5 logits and class indices)")
    labels.add_argument("--token-labels", metavar="DIR", help="train with token labeling on these label maps "
                        "(e.g. the NFNet-F6 ones of the paper); adds a token head to the model")
    labels.add_argument("--make-token-labels", metavar="DIR", help="write label maps of every training image of "
                        "--data to DIR with --teacher, then exit")
    labels.add_argument("--teacher", metavar="CHECKPOINT", help="with --make-token-labels: a GLNet checkpoint (of "
                        "train.py, or a released one with --model)")
    bench = parser.add_argument_group("--bench: GLNet against torchvision's " + " and ".join(BENCH_BASELINES))
    bench.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(glnet.MODELS),
                       help=f"the GLNet variants to time (default: {' '.join(BENCH_MODELS)})")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default %(default)s)")
    bench.add_argument("--latency-sizes", type=int, nargs="+", default=[224, 448, 896, 1344])
    bench.add_argument("--memory-sizes", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args(argv)

    if args.recipe is None:
        args.recipe = ("imagenet-tklb" if args.token_labels else "imagenet") if args.data or args.bench else "builtin"
    args.given = [key for key in recipe_keys(args) if getattr(args, key) is not None]
    if args.bench:  # one batch of 224x224 images: 8 on a CPU, 128 on a GPU
        apply_recipe(args, dict(batch_size=128 if torch.cuda.is_available() else 8, image_size=224, workers=0))
    apply_recipe(args, RECIPES[args.recipe] | CLASSIFICATION_SCHEDULE)
    if args.drop_path is None:
        args.drop_path = DROP_PATH[args.model]
    for key in ("data", "token_labels"):
        if getattr(args, key) is not None:
            setattr(args, key, os.path.abspath(getattr(args, key)))
    args.token_head = bool(args.token_labels)
    if args.output_dir is None:
        data_name = os.path.basename(args.data.rstrip("/")) if args.data else "builtin"
        args.output_dir = os.path.join("runs", f"{args.model}-{data_name}{'-tklb' if args.token_labels else ''}")
    check_training_arguments(parser, args)
    require_positive(parser, args, ("image_size", "rounds", "repeated_aug"))
    require_image_size(parser, args)
    if bool(args.make_token_labels) != bool(args.teacher):
        parser.error("--make-token-labels DIR and --teacher CHECKPOINT go together")
    if not (args.eval or args.bench or args.make_token_labels):
        how = "--token-labels DIR (the label maps, e.g. the NFNet-F6 ones, or make them with --make-token-labels " \
              "DIR --teacher CHECKPOINT)"
        if args.recipe == "imagenet-tklb" and not args.token_labels:
            parser.error(f"--recipe imagenet-tklb trains with token labels: pass {how}")
        if has_token_head(args.model) and not args.token_labels:
            parser.error(f"{args.model} has a token head, trained with token labels: pass {how}, or train "
                         f"{args.model.removesuffix('_tklb')} without them")
        if args.token_labels and (args.mixup or args.cutmix):
            parser.error(f"token labeling mixes with MixToken instead of mixup and cutmix, whose labels the token "
                         f"labels could not follow: pass --mixup 0 --cutmix 0 (got {args.mixup}, {args.cutmix})")
    return args


def main(argv=None):
    """Train, --eval, --make-token-labels or --bench; returns the best top-1, the metrics, the label
    folder or the timings."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.eval:
            return evaluate_checkpoint(args)
        if args.make_token_labels:
            return make_token_labels(args)
        if args.bench:
            return bench(args)
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
