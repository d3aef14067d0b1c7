"""Train GLNet on ImageNet with the paper's recipe, or on a built-in dataset to see it work first.

    python train.py                                          # built-in shapes dataset, CPU, minutes
    torchrun --nproc_per_node 2 train.py                     # the same with 2 processes (gloo on CPU)
    torchrun --nproc_per_node 16 train.py --model glnet_4g --data /path/to/imagenet
    python train.py --eval --checkpoint runs/glnet_mini-builtin/best.pth

The recipe is Table 8 of the paper: AdamW (lr 2e-3 per 2048 images, betas 0.9/0.999, weight decay
0.05), cosine schedule with 5 warm-up epochs, 300 epochs, RandAugment(9, 0.5), label smoothing 0.1,
mixup 0.8, cutmix 1.0, gradient clipping 5.0, drop path per variant, EMA of the weights.

A run never loses its work: a checkpoint (model, EMA, optimizer, scheduler, grad scaler, position in
the epoch, RNG states, args) is written atomically every epoch (and every --checkpoint-every steps),
and restarting the same command resumes from it where it stopped: bit for bit with --workers 0; with
loader workers the images come in the same order, but their random augmentations differ after a
mid-epoch resume (at epoch boundaries the workers' seeds are the same).

This file is also the one place for the helpers detect_seg.py and analyze.py share: distributed
setup, atomic checkpoints, metrics logging, AdamW parameter groups, seeding, the finite-loss check,
the ETA format, and the datasets and exactly-once distributed evaluation.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
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
    warmup_epochs=5, randaugment=True, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
    ema_decay=0.9998, print_freq=50, workers=8, threads=0,
)
# A CPU-sized run of the same code: glnet_mini at 64x64 for 5 epochs of 3000 images, too short for
# RandAugment, mixup and cutmix to pay off, so they are off.
BUILTIN_RECIPE = dict(
    model="glnet_mini", epochs=5, batch_size=32, image_size=64,
    lr=6.4e-2,               # per 2048 images: 1e-3 at the default global batch of 32
    warmup_epochs=1, randaugment=False, mixup=0.0, cutmix=0.0, label_smoothing=0.1,
    ema_decay=0.99, print_freq=20, workers=1,
    threads=1,               # per process: two OpenMP threads on a busy 2-core CPU can run 10x slower
)
DROP_PATH = {"glnet_stl": 0.1, "glnet_stl_paramslot": 0.1, "glnet_4g": 0.15, "glnet_9g": 0.3,
             "glnet_16g": 0.4, "glnet_mini": 0.0}
REFERENCE_BATCH = 2048       # the global batch the paper's learning rate is given for
BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.05
GRAD_CLIP = 5.0
RANDAUGMENT = dict(num_ops=2, magnitude=9)  # timm's rand-m9-mstd0.5 without the magnitude noise
EVAL_CROP_RATIO = 0.875      # resize 256, center crop 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "glnet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
# The built-in dataset: procedurally generated shapes and textures, written once as image files
# ---------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("checkerboard", "circle", "cross", "diagonal_stripes", "dots",
                     "horizontal_stripes", "ring", "square", "triangle", "vertical_stripes")


def draw_synthetic(name, size, g):
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


def make_synthetic_dataset(root, train_per_class=300, val_per_class=50, image_size=64, seed=0,
                           classes=SYNTHETIC_CLASSES):
    """Write root/train/<class>/*.png and root/val/<class>/*.png, the ImageFolder layout.
    The tree is built in a temporary folder and renamed into place, so it is complete or absent."""
    if os.path.isdir(root):
        return root
    tmp = f"{root}.tmp{os.getpid()}"
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            os.makedirs(os.path.join(tmp, split, name))
            for i in range(count):
                image = v2.functional.to_pil_image(draw_synthetic(name, image_size, g))
                image.save(os.path.join(tmp, split, name, f"{i:05d}.png"))
    os.replace(tmp, root)
    return root


def builtin_dataset(cache_dir=DEFAULT_CACHE):
    """The built-in dataset's folder, generated on rank 0 on first use while the others wait."""
    root = os.path.join(cache_dir, "synthetic-v1")
    if is_main_process() and not os.path.isdir(root):
        log(f"writing the built-in dataset (10 shape/texture classes, PNG files) to {root} ...")
        make_synthetic_dataset(root)
    if dist.is_initialized():
        dist.barrier()
    return root


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
def evaluate(model, loader, device, amp_dtype=None):
    """Top-1, top-5 (%) and loss over the whole dataset, summed across ranks: each image once."""
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
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
# Training
# ---------------------------------------------------------------------------------------------

def mixup_cutmix(num_classes, mixup, cutmix):
    """Batch-level MixUp or CutMix (one chosen per batch), or None when both are off."""
    transforms = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
                 ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    return v2.RandomChoice(transforms) if transforms else None


def lr_schedule(optimizer, warmup_steps, total_steps, min_lr):
    """Linear warm-up, then cosine decay to min_lr, stepped after every optimizer step."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1),
                                                        eta_min=min_lr)
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def amp_settings(amp, device):
    """(autocast dtype or None, GradScaler): fp16 needs loss scaling, bf16 and fp32 do not."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    return dtype, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


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


class Trainer:
    """The state of one run (model, EMA, optimizer, schedule, position) and the loop over it."""

    def __init__(self, args, model, num_classes, train_set, val_set, rank, world_size, device):
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.num_classes = num_classes
        self.model = model.to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = wrap_ddp(self.model, device)
        self.forward = torch.compile(self.ddp) if args.compile else self.ddp
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True) \
            if args.ema_decay > 0 else None

        self.sampler = ResumableDistributedSampler(train_set, world_size, rank, shuffle=True, seed=args.seed,
                                                   drop_last=True)
        self.train_loader = DataLoader(train_set, args.batch_size, sampler=self.sampler, drop_last=True,
                                       num_workers=args.workers, pin_memory=device.type == "cuda")
        self.val_loader = eval_loader(val_set, args.batch_size, args.workers, rank, world_size)
        self.steps_per_epoch = len(self.sampler) // (args.batch_size * args.accum_steps)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training images are fewer than one global batch of "
                             f"{args.batch_size * world_size * args.accum_steps}: lower --batch-size or --accum-steps")
        self.global_batch = args.batch_size * world_size * args.accum_steps
        self.lr = args.lr * self.global_batch / REFERENCE_BATCH
        self.optimizer = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=self.lr, betas=BETAS)
        total_steps = args.epochs * self.steps_per_epoch
        self.scheduler = lr_schedule(self.optimizer, round(args.warmup_epochs * self.steps_per_epoch), total_steps,
                                     args.min_lr)
        self.amp_dtype, self.scaler = amp_settings(args.amp, device)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.mixup = mixup_cutmix(self.num_classes, args.mixup, args.cutmix)
        self.epoch, self.step, self.best_top1, self.rng_states = 0, 0, 0.0, None

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self):
        return {
            "model": self.model.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best_top1": self.best_top1,
            "rng": all_rng_states(),
            "args": vars(self.args), "num_classes": self.num_classes,
        }

    def load_state_dict(self, checkpoint):
        glnet.load_checkpoint(self.model, checkpoint, key="model")
        if self.ema and checkpoint["model_ema"] is not None:
            self.ema.load_state_dict(checkpoint["model_ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch, self.step, self.best_top1 = checkpoint["epoch"], checkpoint["step"], checkpoint["best_top1"]
        if len(checkpoint["rng"]) == self.world_size:  # another world size cannot continue the same streams
            self.rng_states = checkpoint["rng"][self.rank]

    def save(self, record=None, improved=False):
        """last.pth; with `improved`, also best.pth (weights and metrics only). Every rank joins
        the RNG gather; rank 0 writes."""
        state = self.state_dict()
        if not is_main_process():
            return
        save_checkpoint(state, os.path.join(self.args.output_dir, "last.pth"))
        if improved:
            best = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
            if self.ema and record["val_top1"] > record["ema_top1"]:
                best.pop("model_ema")  # so that --eval picks the better weights
            save_checkpoint(best | {"metrics": record}, os.path.join(self.args.output_dir, "best.pth"))

    # -- the loop --------------------------------------------------------------------------------

    def train_step(self, micro_batches):
        """One optimizer step over `accum_steps` micro-batches; returns the mean loss."""
        total = 0.0
        for i, (images, targets) in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            last = i == len(micro_batches) - 1
            no_sync = self.ddp.no_sync if isinstance(self.ddp, DistributedDataParallel) and not last \
                else contextlib.nullcontext
            with no_sync():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.criterion(self.forward(images), targets)
                check_finite(loss, f"epoch {self.epoch + 1} step {self.step + 1}")
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.item()
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
        """Train from (self.epoch, self.step) to the end of the epoch; returns the mean loss and
        the number of steps taken."""
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
        losses, window_start, window_loss = [], time.perf_counter(), 0.0
        while self.step < self.steps_per_epoch:
            loss = self.train_step(list(itertools.islice(batches, args.accum_steps)))
            self.step += 1
            losses.append(loss)
            window_loss += loss
            if self.step % args.print_freq == 0 or self.step == self.steps_per_epoch:
                window = (self.step - 1) % args.print_freq + 1
                seconds = time.perf_counter() - window_start
                steps_left = (args.epochs - self.epoch) * self.steps_per_epoch - self.step
                mem = f"  mem {torch.cuda.max_memory_allocated() / 2 ** 30:.1f}G" if self.device.type == "cuda" else ""
                log(f"epoch {self.epoch + 1}/{args.epochs}  step {self.step}/{self.steps_per_epoch}  "
                    f"loss {window_loss / window:.4f}  lr {self.optimizer.param_groups[0]['lr']:.2e}  "
                    f"img/s {window * self.global_batch / seconds:.1f}  "
                    f"eta {format_eta(steps_left * seconds / window)}{mem}")
                window_start, window_loss = time.perf_counter(), 0.0
            if args.checkpoint_every and self.step % args.checkpoint_every == 0 and self.step < self.steps_per_epoch:
                self.save()
        return sum(losses) / max(len(losses), 1), len(losses)

    def fit(self):
        args = self.args
        while self.epoch < args.epochs:
            start = time.perf_counter()
            train_loss, steps = self.train_epoch()
            train_seconds = time.perf_counter() - start
            metrics = evaluate(self.model, self.val_loader, self.device, self.amp_dtype)
            record = {"epoch": self.epoch + 1, "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                      "val_top1": metrics["top1"], "val_top5": metrics["top5"], "val_loss": metrics["loss"]}
            if self.ema:
                ema_metrics = evaluate(self.ema.module, self.val_loader, self.device, self.amp_dtype)
                record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
            top1 = max(record["val_top1"], record.get("ema_top1", 0.0))
            improved = top1 > self.best_top1
            self.best_top1 = max(top1, self.best_top1)
            record.update(best_top1=self.best_top1, epoch_seconds=time.perf_counter() - start,
                          train_images_per_second=steps * self.global_batch / train_seconds)
            ema_text = f"  ema top-1 {record['ema_top1']:.2f} top-5 {record['ema_top5']:.2f}" if self.ema else ""
            log(f"epoch {self.epoch + 1}/{args.epochs} done  train loss {train_loss:.4f}  "
                f"val top-1 {record['val_top1']:.2f} top-5 {record['val_top5']:.2f}{ema_text}  "
                f"best {self.best_top1:.2f}  time {format_eta(record['epoch_seconds'])}")
            self.epoch, self.step = self.epoch + 1, 0
            self.save(record, improved)
            if is_main_process():
                append_metrics(args.output_dir, record)


# ---------------------------------------------------------------------------------------------
# Entry points: train, --eval, --benchmark
# ---------------------------------------------------------------------------------------------

def check_resumable(checkpoint, path, args, num_classes):
    """A checkpoint of another model or class count cannot continue this run: say so, touch nothing."""
    old_model, old_classes = checkpoint.get("args", {}).get("model"), checkpoint.get("num_classes")
    if old_model != args.model or old_classes != num_classes:
        raise ValueError(f"{path} is a checkpoint of {old_model} with {old_classes} classes, but this run "
                         f"trains {args.model} with {num_classes} classes; use another --output-dir "
                         f"(or the same --model and data) to resume")


def train(args):
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed, rank)
    data_dir = args.data or builtin_dataset(args.cache_dir)
    train_set, val_set = build_datasets(data_dir, args.image_size, args.randaugment)
    num_classes = len(train_set.classes)
    model = glnet.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)

    last = find_last_checkpoint(args.output_dir)
    checkpoint = torch.load(last, map_location="cpu", weights_only=True) if last else None
    if checkpoint:
        check_resumable(checkpoint, last, args, num_classes)
    trainer = Trainer(args, model, num_classes, train_set, val_set, rank, world_size, device)
    if checkpoint:
        trainer.load_state_dict(checkpoint)
        log(f"resuming from {last}: epoch {trainer.epoch + 1}, step {trainer.step}")

    log(f"{args.model} ({glnet.count_params(model) / 1e6:.2f} M params), {num_classes} classes, "
        f"{len(train_set)} train / {len(val_set)} val images from {data_dir}, {args.image_size}x{args.image_size}")
    log(f"global batch {trainer.global_batch} = {args.batch_size} per device x {world_size} devices x "
        f"{args.accum_steps} accumulation steps; peak lr {trainer.lr:.2e} ({args.lr:.2e} per {REFERENCE_BATCH}); "
        f"{trainer.steps_per_epoch} steps per epoch on {device}")
    start = time.perf_counter()
    trainer.fit()
    log(f"done in {format_eta(time.perf_counter() - start)}: best val top-1 {trainer.best_top1:.2f}\n"
        f"checkpoints: {os.path.join(args.output_dir, 'last.pth')} and {os.path.join(args.output_dir, 'best.pth')}, "
        f"metrics: {os.path.join(args.output_dir, 'metrics.jsonl')}\n"
        f"evaluate:    python train.py --eval --checkpoint {os.path.join(args.output_dir, 'best.pth')}")
    return {"best_top1": trainer.best_top1}


def evaluate_checkpoint(args):
    """--eval: a checkpoint of this script (its model, data and size are read from it) or a released
    one (give --model and --data)."""
    rank, world_size, device = setup_distributed()
    if not args.checkpoint:
        raise ValueError("--eval needs --checkpoint FILE")
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint file not found: {args.checkpoint}")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    trained = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
    model_name = args.model_given or trained.get("model")
    if model_name is None or not (args.data or trained):
        raise ValueError(f"{args.checkpoint} was not written by train.py, so it does not say which model and data "
                         f"it is for: pass --model ({', '.join(glnet.MODELS)}) and --data (the ImageNet folder)")
    data_dir = args.data or trained.get("data") or builtin_dataset(trained.get("cache_dir", args.cache_dir))
    image_size = args.image_size_given or trained.get("image_size") or IMAGENET_RECIPE["image_size"]
    val_set = build_val_dataset(data_dir, image_size)
    model = glnet.create_model(model_name, num_classes=len(val_set.classes))
    glnet.load_checkpoint(model, checkpoint, key=args.checkpoint_key)
    model.to(device)
    amp_dtype, _ = amp_settings(args.amp, device)
    metrics = evaluate(model, eval_loader(val_set, args.batch_size, args.workers, rank, world_size), device, amp_dtype)
    log(f"{args.checkpoint} ({model_name}, {image_size}x{image_size}) on {metrics['images']} images of "
        f"{os.path.join(data_dir, 'val')}: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  "
        f"loss {metrics['loss']:.4f}")
    return metrics


def benchmark(args):
    """--benchmark N: training images/s of the full step (forward, backward, clipping, AdamW, EMA)
    on random images, after 2 warm-up steps. Reads no data, writes nothing."""
    rank, world_size, device = setup_distributed()
    seed_everything(args.seed, rank)
    num_classes = 1000
    fake = datasets.FakeData(size=args.batch_size * world_size * args.accum_steps, image_size=(3, 32, 32),
                             num_classes=num_classes)
    model = glnet.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    trainer = Trainer(args, model, num_classes, fake, fake, rank, world_size, device)
    batch = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size),
              torch.randint(num_classes, (args.batch_size,)))] * args.accum_steps
    trainer.model.train()
    for _ in range(2):
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.benchmark):
        trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    speed = args.benchmark * trainer.global_batch / (time.perf_counter() - start)
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device.type == "cuda" else ""
    log(f"{args.model} training at {args.image_size}x{args.image_size}, global batch {trainer.global_batch} "
        f"on {world_size} x {device.type}, autocast {trainer.amp_dtype}: {speed:.1f} images/s{mem}")
    return speed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def recipe(key):
        return f"default {IMAGENET_RECIPE[key]} with --data (the paper's recipe), {BUILTIN_RECIPE[key]} without"

    parser.add_argument("--data", help="ImageNet-layout folder (train/<class>/*, val/<class>/*); "
                                       "default: the built-in shapes dataset")
    parser.add_argument("--model", choices=list(glnet.MODELS), help=recipe("model"))
    parser.add_argument("--output-dir", help="checkpoints and metrics.jsonl; default: runs/<model>-<data name>")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the built-in dataset is written once (default %(default)s)")
    parser.add_argument("--epochs", type=int, help=recipe("epochs"))
    parser.add_argument("--batch-size", type=int, help=f"per device; {recipe('batch_size')}")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="gradient accumulation: global batch = batch size x world size x accum steps (default 1)")
    parser.add_argument("--image-size", type=int, help=recipe("image_size"))
    parser.add_argument("--lr", type=float, help=f"peak lr at a global batch of {REFERENCE_BATCH}, scaled "
                                                 f"linearly to the actual one; {recipe('lr')}")
    parser.add_argument("--min-lr", type=float, default=1e-5, help="the end of the cosine (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW's (default %(default)s), "
                        "none on norms, biases, tau, layer-scale gammas and learned slots")
    parser.add_argument("--warmup-epochs", type=float, help=recipe("warmup_epochs"))
    parser.add_argument("--clip-grad", type=float, default=GRAD_CLIP, help="max gradient norm (default %(default)s)")
    parser.add_argument("--drop-path", type=float, help=f"default per model: {DROP_PATH}")
    parser.add_argument("--randaugment", action=argparse.BooleanOptionalAction, help=f"RandAugment(9, 0.5); {recipe('randaugment')}")
    parser.add_argument("--mixup", type=float, help=f"MixUp alpha, 0 = off; {recipe('mixup')}")
    parser.add_argument("--cutmix", type=float, help=f"CutMix alpha, 0 = off; {recipe('cutmix')}")
    parser.add_argument("--label-smoothing", type=float, help=recipe("label_smoothing"))
    parser.add_argument("--ema-decay", type=float, help=f"EMA of the weights, 0 = off; {recipe('ema_decay')}")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                        help="mixed precision; auto = bf16 on GPU, none on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, help=f"data loading processes per device; {recipe('workers')}")
    parser.add_argument("--threads", type=int, help=f"CPU threads per process, 0 = torch's default; {recipe('threads')}")
    parser.add_argument("--print-freq", type=int, help=f"a progress line every N steps; {recipe('print_freq')}")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also write last.pth every N steps within an epoch (0: at epoch ends only)")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument("--eval", action="store_true", help="evaluate --checkpoint on the validation set")
    parser.add_argument("--checkpoint", help="the checkpoint --eval evaluates")
    parser.add_argument("--checkpoint-key", help="with --eval: 'model' or 'model_ema' (default: EMA if present)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                        help="measure training images/s over STEPS steps on random images, then exit")
    args = parser.parse_args(argv)

    args.model_given, args.image_size_given = args.model, args.image_size
    recipe_values = IMAGENET_RECIPE if args.data or args.benchmark else BUILTIN_RECIPE
    for key, value in recipe_values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_path is None:
        args.drop_path = DROP_PATH[args.model]
    if args.data is not None:
        args.data = os.path.abspath(args.data)
    if args.output_dir is None:
        data_name = os.path.basename(args.data.rstrip("/")) if args.data else "builtin"
        args.output_dir = os.path.join("runs", f"{args.model}-{data_name}")
    require_positive(parser, args, ("epochs", "batch_size", "accum_steps", "image_size", "print_freq"))
    require_image_size(parser, args)
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    return args


def main(argv=None):
    """Train, --eval or --benchmark; returns the best top-1, the metrics or the images per second."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.eval:
            return evaluate_checkpoint(args)
        if args.benchmark:
            return benchmark(args)
        return train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
