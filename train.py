"""Train GLNet on ImageNet with the paper's recipe, or on a built-in dataset to see it work first.

    python train.py                                          # built-in shapes dataset, CPU, minutes
    torchrun --nproc_per_node 2 train.py                     # the same with 2 processes (gloo on CPU)
    torchrun --nproc_per_node 16 train.py --model glnet_4g --data /path/to/imagenet
    python train.py --eval --checkpoint runs/glnet_mini-builtin/best.pth
    python train.py --bench                                  # speed against swin_t and convnext_tiny

The recipe is Table 8 of the paper: AdamW (lr 2e-3 per 2048 images, betas 0.9/0.999, weight decay
0.05), cosine schedule with 5 warm-up epochs, 300 epochs, RandAugment(9, 0.5), label smoothing 0.1,
mixup 0.8, cutmix 1.0, gradient clipping 5.0, drop path per variant, EMA of the weights.

This file is the one home of the training loop. `Trainer` runs every task of the project; a `Task`
says what differs: the data, the loss of a batch and the evaluation. train.py plugs in image
classification, detect_seg.py detection and segmentation, as torchvision's references share one
engine. A run never loses its work: a checkpoint (model, EMA, optimizer, scheduler, grad scaler,
position in the epoch, RNG states, args) is written atomically every epoch (and every
--checkpoint-every steps), and restarting the same command resumes from it where it stopped: bit
for bit with --workers 0; with loader workers the images come in the same order, but their random
augmentations differ after a mid-epoch resume (at epoch boundaries the workers' seeds are the same).

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
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets
from torchvision.transforms import v2

import glnet

# ---------------------------------------------------------------------------------------------
# Config: the paper's ImageNet recipe (Table 8), and the out-of-the-box run on the built-in data.
# Every flag left unset takes its value from the recipe that matches the data.
# ---------------------------------------------------------------------------------------------

IMAGENET_RECIPE = dict(
    model="glnet_4g", epochs=300, batch_size=128, image_size=224,
    lr=2e-3,                 # peak learning rate per 2048 images, scaled linearly to the global batch
    warmup_epochs=5, min_lr=1e-5, weight_decay=0.05, clip_grad=5.0,
    randaugment=True, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
    ema_decay=0.9998, print_freq=50, workers=8, threads=0,
)
# A CPU-sized run of the same code: glnet_mini at 64x64 for 5 epochs of 3000 images, too short for
# RandAugment, mixup and cutmix to pay off, so they are off.
BUILTIN_RECIPE = dict(
    model="glnet_mini", epochs=5, batch_size=32, image_size=64,
    lr=6.4e-2,               # per 2048 images: 1e-3 at the default global batch of 32
    warmup_epochs=1, min_lr=1e-5, weight_decay=0.05, clip_grad=5.0,
    randaugment=False, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
    ema_decay=0.99, print_freq=20, workers=1,
    threads=1,               # per process: two OpenMP threads on a busy 2-core CPU can run 10x slower
)
# What the classification recipes share with the schedule of train.Trainer.
CLASSIFICATION_SCHEDULE = dict(lr_schedule="cosine", warmup_factor=1e-3, eval_interval=1)
DROP_PATH = {"glnet_stl": 0.1, "glnet_stl_paramslot": 0.1, "glnet_4g": 0.15, "glnet_9g": 0.3,
             "glnet_16g": 0.4, "glnet_4g_tklb": 0.1, "glnet_9g_tklb": 0.1, "glnet_mini": 0.0}
REFERENCE_BATCH = 2048       # the global batch the paper's learning rate is given for
BETAS = (0.9, 0.999)
RANDAUGMENT = dict(num_ops=2, magnitude=9)  # timm's rand-m9-mstd0.5 without the magnitude noise
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


def train_transform(image_size, randaugment=True):
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        *([v2.RandAugment(**RANDAUGMENT)] if randaugment else []),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(image_size):
    """Resize to image_size / 0.875 (256 for 224), center crop image_size."""
    return v2.Compose([
        v2.Resize(round(image_size / EVAL_CROP_RATIO), antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def build_datasets(data_dir, image_size, randaugment=True):
    """(train, val) ImageFolder datasets after checking the layout and that the classes match."""
    check_layout(data_dir)
    return (image_folder(data_dir, "train", train_transform(image_size, randaugment)),
            image_folder(data_dir, "val", eval_transform(image_size)))


def build_val_dataset(data_dir, image_size):
    check_layout(data_dir, splits=("val",))
    return image_folder(data_dir, "val", eval_transform(image_size))


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start `start` samples into its epoch's permutation, so a run
    resumed mid-epoch sees exactly the images it had not seen yet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

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
                                                   drop_last=True)
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
        """Continue from output_dir/last.pth if there is one. A checkpoint of another task, model
        or class count cannot continue this run: say so before anything is written."""
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


def classification_task(args, train_set, val_set, rank, world_size, device):
    num_classes = len(train_set.classes)
    val_loader = eval_loader(val_set, args.batch_size, args.workers, rank, world_size)
    loss = functools.partial(classification_loss, device=device,
                             criterion=nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
                             mixup=mixup_cutmix(num_classes, args.mixup, args.cutmix))
    return Task("classification", train_set, loss, functools.partial(evaluate, loader=val_loader, device=device),
                main_metric="top1", reference_batch=REFERENCE_BATCH, num_classes=num_classes,
                classes=train_set.classes)


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
    one run; glnet_stl's latency across sizes; the peak memory of its forward."""
    import torchvision
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed, rank)
    builders = {name: functools.partial(glnet.create_model, name) for name in args.models}
    builders.update({name: getattr(torchvision.models, name) for name in BENCH_BASELINES})
    fake = datasets.FakeData(size=args.batch_size * world_size * args.accum_steps, num_classes=1000)
    task = Task("classification", fake, functools.partial(classification_loss, device=device,
                                                          criterion=nn.CrossEntropyLoss()),
                None, "top1", REFERENCE_BATCH, num_classes=1000)
    trainers = {name: Trainer(args, build(num_classes=1000), task, rank, world_size, device)
                for name, build in builders.items()}
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
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {world_size} x {device.type}; autocast "
        f"{amp_dtype}, {'channels_last' if device.type == 'cuda' else 'NCHW'} input, "
        f"{'compiled' if args.compile else 'eager'}; medians of {args.rounds} interleaved rounds")
    for title, train_mode in (("inference (eval mode)", False), ("training step (forward, backward, clipping, "
                                                                  "AdamW, EMA)", True)):
        calls = {}
        for name, trainer in trainers.items():
            trainer.model.train(train_mode)
            calls[name] = (lambda t=trainer: t.train_step([batch] * args.accum_steps)) if train_mode \
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

def train(args):
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed, rank)
    data_dir = args.data or shapes_dataset(args.cache_dir)
    train_set, val_set = build_datasets(data_dir, args.image_size, args.randaugment)
    task = classification_task(args, train_set, val_set, rank, world_size, device)
    model = glnet.create_model(args.model, num_classes=task.num_classes, drop_path_rate=args.drop_path)
    trainer = Trainer(args, model, task, rank, world_size, device)
    trainer.resume()
    log(f"{args.model} ({glnet.count_params(model) / 1e6:.2f} M params), {task.num_classes} classes, "
        f"{len(train_set)} train / {len(val_set)} val images from {data_dir}, {args.image_size}x{args.image_size}")
    start = time.perf_counter()
    trainer.fit()
    log(f"done in {format_eta(time.perf_counter() - start)}: best val top-1 {trainer.best:.2f}\n"
        f"checkpoints: {os.path.join(args.output_dir, 'last.pth')} and {os.path.join(args.output_dir, 'best.pth')}, "
        f"metrics: {os.path.join(args.output_dir, 'metrics.jsonl')}\n"
        f"evaluate:    python train.py --eval --checkpoint {os.path.join(args.output_dir, 'best.pth')}")
    return {"best_top1": trainer.best}


def evaluate_checkpoint(args):
    """--eval: a checkpoint of this script (its model, data and size are read from it) or a released
    one (give --model and --data)."""
    rank, world_size, device = setup_distributed()
    if not args.checkpoint:
        raise ValueError("--eval needs --checkpoint FILE")
    checkpoint = glnet.read_checkpoint(args.checkpoint)
    trained = checkpoint.get("args", {})
    model_name = args.model_given or trained.get("model")
    if model_name is None or not (args.data or trained):
        raise ValueError(f"{args.checkpoint} was not written by train.py, so it does not say which model and data "
                         f"it is for: pass --model ({', '.join(glnet.MODELS)}) and --data (the ImageNet folder)")
    data_dir = args.data or trained.get("data") or shapes_dataset(trained.get("cache_dir", args.cache_dir))
    image_size = args.image_size_given or trained.get("image_size") or IMAGENET_RECIPE["image_size"]
    val_set = build_val_dataset(data_dir, image_size)
    model = glnet.create_model(model_name, num_classes=len(val_set.classes), checkpoint=checkpoint,
                               checkpoint_key=args.checkpoint_key)
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def default(key):
        if key == "data":
            return "ImageNet-layout folder (train/<class>/*, val/<class>/*); default: the built-in shapes dataset"
        if key == "output_dir":
            return "checkpoints and metrics.jsonl; default: runs/<model>-<data name>"
        if key == "drop_path":
            return f"default per model: {DROP_PATH}"
        if key in IMAGENET_RECIPE:
            return f"default {IMAGENET_RECIPE[key]} with --data (the paper's recipe), {BUILTIN_RECIPE[key]} without"
        return "default: none"

    add_training_arguments(parser, default)
    parser.add_argument("--image-size", type=int, help=default("image_size"))
    parser.add_argument("--randaugment", action=argparse.BooleanOptionalAction, help=f"RandAugment(9, 0.5); {default('randaugment')}")
    parser.add_argument("--mixup", type=float, help=f"MixUp alpha, 0 = off; {default('mixup')}")
    parser.add_argument("--cutmix", type=float, help=f"CutMix alpha, 0 = off; {default('cutmix')}")
    parser.add_argument("--label-smoothing", type=float, help=default("label_smoothing"))
    parser.add_argument("--checkpoint-key", help="with --eval: 'model' or 'model_ema' (default: EMA if present)")
    bench = parser.add_argument_group("--bench: GLNet against torchvision's " + " and ".join(BENCH_BASELINES))
    bench.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(glnet.MODELS),
                       help=f"the GLNet variants to time (default: {' '.join(BENCH_MODELS)})")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default %(default)s)")
    bench.add_argument("--latency-sizes", type=int, nargs="+", default=[224, 448, 896, 1344])
    bench.add_argument("--memory-sizes", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args(argv)

    args.model_given, args.image_size_given = args.model, args.image_size
    if args.bench:  # one batch of 224x224 images: 8 on a CPU, 128 on a GPU
        apply_recipe(args, dict(batch_size=128 if torch.cuda.is_available() else 8, image_size=224, workers=0))
    apply_recipe(args, IMAGENET_RECIPE if args.data or args.bench else BUILTIN_RECIPE)
    apply_recipe(args, CLASSIFICATION_SCHEDULE)
    if args.drop_path is None:
        args.drop_path = DROP_PATH[args.model]
    if args.data is not None:
        args.data = os.path.abspath(args.data)
    if args.output_dir is None:
        data_name = os.path.basename(args.data.rstrip("/")) if args.data else "builtin"
        args.output_dir = os.path.join("runs", f"{args.model}-{data_name}")
    check_training_arguments(parser, args)
    require_positive(parser, args, ("image_size", "rounds"))
    require_image_size(parser, args)
    return args


def main(argv=None):
    """Train, --eval or --bench; returns the best top-1, the metrics or the timings."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.eval:
            return evaluate_checkpoint(args)
        if args.bench:
            return bench(args)
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
