"""Train GLNet on ImageNet with the paper's recipes, or on a built-in dataset to see it work first.

    python train.py                                 # built-in shapes, CPU, minutes (torchrun works too)
    torchrun --nproc_per_node 16 train.py --recipe imagenet --model glnet_4g --data /path/to/imagenet
    python train.py --eval --checkpoint runs/glnet_mini-builtin/best.pth

The one training loop: `Trainer` runs every task of the project, a `Task` says what differs (data, loss, evaluation).
Checkpoints are written atomically every epoch (and --checkpoint-every steps); rerunning resumes to the step.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from typing import Callable, get_args

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision.ops import roi_align
from torchvision.transforms import v2

import glnet
from glnet import InputError

# --- Config: the recipes (README.md, "Recipes", gives the source of every value) and the settings ---

# Table 8; where it is silent, the configuration the released checkpoints were trained with.
IMAGENET = dict(model="glnet_4g", epochs=300, batch_size=128, image_size=224, lr=2e-3,  # lr per 2048 images
                warmup_epochs=5, warmup_factor=0.0, min_lr=1e-5, weight_decay=0.05, clip_grad=5.0, randaugment=True,
                mixup=0.8, cutmix=1.0, label_smoothing=0.1, repeated_aug=3, random_erasing=0.25,
                interpolation="bicubic", ema_decay=0.9999, print_freq=50)
RECIPES = {"imagenet": IMAGENET,
           # Table 9, GLNet-4G*/9G*: token labeling, with MixToken instead of mixup and cutmix, as the released run
           "imagenet-tklb": IMAGENET | dict(model="glnet_4g_tklb", epochs=310, drop_path=0.1, mixup=0.0, cutmix=0.0,
                                            warmup_factor=5e-4, ema_decay=0.0, repeated_aug=1, crop_pct=0.96),
           # glnet_mini at 64x64, 5 epochs of 3000 images: too short for heavy augmentation (the rest: the defaults)
           "builtin": dict(model="glnet_mini", epochs=5, batch_size=32, image_size=64, lr=6.4e-2, warmup_epochs=1,
                           min_lr=1e-5, clip_grad=5.0, ema_decay=0.99)}
DROP_PATH = {"glnet_stl": 0.1, "glnet_stl_paramslot": 0.1, "glnet_4g": 0.15, "glnet_9g": 0.3, "glnet_16g": 0.4,
             "glnet_4g_tklb": 0.1, "glnet_9g_tklb": 0.1, "glnet_mini": 0.0}
REFERENCE_BATCH = 2048       # the global batch the paper's learning rate is given for
TOKEN_STRIDE = 32            # the last stage's stride: a 224 image has 7 x 7 tokens
TOKEN_LOSS_WEIGHT = 0.5      # LV-ViT: class loss + 0.5 x the mean token loss
TOP_K = 5                    # label maps hold the teacher's top-5 logits and classes at every position
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "glnet")
CORES = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) or 1  # per process
BENCH_BASELINES = ("swin_t", "convnext_tiny")  # torchvision's models of GLNet-STL's size


class Parser(argparse.ArgumentParser):  # argparse's, a usage error in one line: prog: error: ... (see prog --help)
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def in_range(low, high=math.inf, kind=float, above=False):  # an argparse type: low <= value <= high (> low if above)
    def parse(text):
        value = kind(text)
        if not (value > low if above else value >= low) or value > high:
            limits = f"{'greater than' if above else 'at least'} {low}" + f" and at most {high}" * (high < math.inf)
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's error for text that is no number: "invalid float value: 'x'"
    return parse


at_least = functools.partial(in_range, kind=int)  # an argparse type: an int of at least the given value


def option(default, help, **argparse_options):  # a settings field that is also a command-line flag
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_options))


@dataclasses.dataclass
class Settings:
    """What the Trainer reads, each field a flag (--batch-size); subclasses add a script's own fields."""
    model: str = option("glnet_mini", "the GLNet variant (the backbone in detect_seg.py)", choices=list(glnet.MODELS))
    output_dir: str = option(None, "where checkpoints and metrics.jsonl go")
    epochs: int = option(1, "training epochs", type=at_least(1))
    iters: int | None = option(None, "optimizer steps in all, instead of --epochs", type=at_least(1))
    batch_size: int = option(32, "images per process per step", type=at_least(1))
    accum_steps: int = option(1, "micro-batches per step: global batch = batch x processes x this", type=at_least(1))
    lr: float = option(1e-3, "peak lr at the reference global batch, scaled linearly", type=in_range(0, above=True))
    min_lr: float = option(0.0, "where the decay ends", type=in_range(0))
    weight_decay: float = option(0.05, "AdamW's; none on 1-D parameters, biases, layer-scale gammas", type=in_range(0))
    lr_schedule: str = option("cosine", "after the warm-up: decay to --min-lr", choices=["cosine", "poly", "step"])
    lr_steps: tuple = option((), "the epochs at which --lr-schedule step drops the lr 10x", type=at_least(1), nargs="+")
    warmup_epochs: float = option(0.0, "linear warm-up", type=in_range(0))
    warmup_iters: int | None = option(None, "instead of --warmup-epochs", type=at_least(0))
    warmup_factor: float = option(1e-3, "the warm-up starts at this fraction of the peak lr", type=in_range(0, 1))
    clip_grad: float = option(0.0, "max gradient norm, 0 = off", type=in_range(0))
    drop_path: float | None = option(None, "GLNet's stochastic depth rate", type=in_range(0, 1))
    grad_checkpointing: bool = option(False, "recompute each GLNet block in the backward pass: less memory, more time")
    ema_decay: float = option(0.0, "EMA of the weights, 0 = off", type=in_range(0, 1))
    amp: str = option("auto", "mixed precision: bf16 on GPU, none on CPU", choices=["auto", "bf16", "fp16", "none"])
    compile: bool = option(False, "torch.compile the model")
    workers: int = option(min(8, max(CORES - 1, 1)), "data loading processes per process", type=at_least(0))
    print_freq: int = option(20, "a progress line every N steps", type=at_least(1))
    checkpoint_every: int | None = option(None, "also write last.pth every N steps", type=at_least(1))
    eval_interval: int = option(1, "evaluate every N epochs and after the last", type=at_least(1))
    seed: int = option(0, "seed of every random stream", type=at_least(0))
    repeated_aug: int = option(1, "every image N times per epoch, over the ranks (DeiT's sampler)", type=at_least(1))


@dataclasses.dataclass
class ClassificationSettings(Settings):
    recipe: str = option("builtin", "other flags' defaults: imagenet with --data, else builtin", choices=list(RECIPES))
    data: str | None = option(None, "ImageNet-layout folder: train/<class>/*, val/<class>/*; default: built-in")
    cache_dir: str = option(DEFAULT_CACHE, "where the built-in dataset is written once")
    image_size: int = option(224, "training crop; evaluation: resize / --crop-pct, center crop", type=at_least(32))
    crop_pct: float = option(0.875, "eval: crop / resized side (0.875: 224 of 256)", type=in_range(0, 1, above=True))
    randaugment: bool = option(False, "RandAugment(9, 0.5), timm's rand-m9-mstd0.5-inc1")
    mixup: float = option(0.0, "MixUp alpha, 0 = off", type=in_range(0))
    cutmix: float = option(0.0, "CutMix alpha, 0 = off", type=in_range(0))
    label_smoothing: float = option(0.1, "of the targets (with token labels: of the teacher's)", type=in_range(0, 1))
    random_erasing: float = option(0.0, "chance a rectangle is erased to per-pixel random values", type=in_range(0, 1))
    interpolation: str = option("bilinear", "of every resize and RandAugment", choices=["bilinear", "bicubic"])
    token_labels: str | None = option(None, "token labeling on these label maps (<labels>/<class>/<image>.pt)")


def add_settings_flags(parser, settings_class, defaults):
    """A flag per field, absent from the parsed namespace when unset; `defaults(field)` for --help."""
    for field in dataclasses.fields(settings_class):
        options = {k: v for k, v in field.metadata.items() if k != "help"}
        kind = next(t for t in get_args(field.type) or (field.type,) if t is not type(None))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is not tuple:  # a tuple's field gives nargs and its items' type
            options.setdefault("type", kind)
        parser.add_argument("--" + field.name.replace("_", "-"), default=argparse.SUPPRESS,
                            help=f"{field.metadata['help']} (default: {defaults(field)})", **options)


def field_values(settings_class, values):  # the entries of `values` that are fields of `settings_class`
    return {f.name: values[f.name] for f in dataclasses.fields(settings_class) if f.name in values}


# --- Distributed runs, checkpoints, logs ---------------------------------------------------------

@contextlib.contextmanager
def distributed():
    """(rank, world_size, device) of a run; under torchrun its process group (nccl on CUDA, gloo on CPU) meanwhile."""
    if "RANK" not in os.environ:
        yield 0, 1, torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        return
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(message):  # on rank 0, flushed so that progress shows in job logs at once
    if is_main_process():
        print(message, flush=True)


def save_checkpoint(state: dict, path) -> None:
    """Write `path + '.tmp'`, fsync, rename over `path`: a killed job leaves the old file or the new."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)


def format_metrics(metrics):  # 'top1 96.6  top5 100': an evaluation's numbers for progress lines
    return "  ".join(f"{name} {value:.4g}" for name, value in metrics.items() if isinstance(value, float))


def autocast(device, amp):  # mixed precision as --amp says: auto = bf16 on GPU, none on CPU
    amp = ("bf16" if device.type == "cuda" else "none") if amp == "auto" else amp
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def builtin_dataset(cache_dir, name, generate):
    """cache_dir/name, written once by `generate`: rank 0 renames it into place complete, the others wait."""
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


# --- The training loop, shared by every task -----------------------------------------------------

@dataclasses.dataclass
class Task:
    """What differs between the tasks that share the training loop."""
    name: str                   # "classification", "maskrcnn", ...: a checkpoint resumes only its own task
    train_set: Dataset
    loss: Callable              # loss(model, batch) -> the scalar loss of one micro-batch
    evaluate: Callable          # evaluate(model) -> {metric: value}, the same on every rank
    metric: str                 # what best.pth is chosen by (higher is better)
    reference_batch: int        # the global batch --lr is given for
    num_classes: int
    classes: list | dict        # their names, kept in checkpoints
    collate_fn: Callable | None = None


class ResumableDistributedSampler(DistributedSampler):
    """Starts `start` samples into its epoch, so that a resumed run sees the images it had not seen; with
    repeated_aug = n, DeiT's: each image n times in a row over the ranks, the epoch as long as without."""

    def __init__(self, *args, repeated_aug=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.repeated_aug, self.start = repeated_aug, 0

    def __iter__(self):  # with repeated_aug 1, DistributedSampler's own shuffled order
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        repeated = torch.randperm(len(self.dataset), generator=g).repeat_interleave(self.repeated_aug)
        return itertools.islice(repeated[self.rank::self.num_replicas][:self.num_samples].tolist(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


class Trainer:
    """One run's state (model, EMA, optimizer, schedule, position in the data) and its loop."""

    def __init__(self, settings: Settings, model, task: Task, rank=0, world_size=1, device=torch.device("cpu")):
        s = self.settings = settings
        self.task, self.rank, self.world_size, self.device = task, rank, world_size, device
        self.model = model.to(device, memory_format=torch.channels_last) if device.type == "cuda" else model
        if world_size > 1 and device.type == "cpu":  # CPU convolutions give gradients strided otherwise: DDP copies
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.ddp = self.model if world_size == 1 else DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        self.forward = torch.compile(self.ddp) if s.compile else self.ddp
        # ema = decay x ema + (1 - decay) x weights after each step, from the initial weights (timm's ModelEma)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True) \
            if s.ema_decay > 0 else None
        if self.ema:
            self.ema.n_averaged += 1
        self.sampler = ResumableDistributedSampler(task.train_set, world_size, rank, shuffle=True, seed=s.seed,
                                                   drop_last=True, repeated_aug=s.repeated_aug)
        self.train_loader = DataLoader(task.train_set, s.batch_size, sampler=self.sampler, num_workers=s.workers,
                                       drop_last=True, pin_memory=device.type == "cuda", collate_fn=task.collate_fn)
        self.global_batch = s.batch_size * world_size * s.accum_steps
        self.steps_per_epoch = len(self.sampler) // (s.batch_size * s.accum_steps)
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(task.train_set)} training images are fewer than one global batch of "
                             f"{self.global_batch} (--batch-size {s.batch_size} x {world_size} processes x "
                             f"--accum-steps {s.accum_steps}): lower --batch-size or --accum-steps")
        self.total_steps = s.iters or s.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.lr = s.lr * self.global_batch / task.reference_batch
        groups = [{"params": [], "weight_decay": s.weight_decay}, {"params": [], "weight_decay": 0.0}]
        for name, p in self.model.named_parameters():  # the released groups: tau and learned slots are decayed
            groups[p.ndim == 1 or name.endswith((".bias", ".gamma", ".beta"))]["params"].append(p)
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999))
        self.warmup = s.warmup_iters if s.warmup_iters is not None else round(s.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")  # fp16 needs loss scaling
        self.epoch, self.step, self.best = 0, 0, None

    def lr_factor(self, step):
        """The lr over the peak: warm-up from --warmup-factor, then cosine or poly to --min-lr, or steps."""
        s = self.settings
        if step < self.warmup:
            return s.warmup_factor + (1 - s.warmup_factor) * step / self.warmup
        if s.lr_schedule == "step":
            return 0.1 ** sum(step >= epoch * self.steps_per_epoch for epoch in s.lr_steps)
        progress = (step - self.warmup) / max(self.total_steps - self.warmup, 1)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if s.lr_schedule == "cosine" else 1 - progress
        return s.min_lr / self.lr + (1 - s.min_lr / self.lr) * decay

    def resume(self):
        """Continue from output_dir/last.pth; one of another task, model or class count is refused."""
        path = os.path.join(self.settings.output_dir, "last.pth")
        if not os.path.isfile(path):
            return
        checkpoint = glnet.read_checkpoint(path)
        old = (checkpoint["task"], checkpoint["args"]["model"], checkpoint["num_classes"])
        new = (self.task.name, self.settings.model, self.task.num_classes)
        differ = ", ".join(sorted(set(checkpoint["model"]) ^ set(self.model.state_dict()))[:4])
        if old != new or differ:
            differ = f" (the models differ in {differ})" if differ else ""
            raise InputError(f"{path} is a {old[0]} checkpoint of {old[1]} with {old[2]} classes, but this run trains "
                             f"{new[0]} with {new[1]} and {new[2]} classes{differ}; use another --output-dir")
        for name in ("model", "optimizer", "scheduler", "scaler"):
            getattr(self, name).load_state_dict(checkpoint[name])
        if self.ema and checkpoint["model_ema"] is not None:
            self.ema.load_state_dict(checkpoint["model_ema"])
        self.epoch, self.step, self.best = checkpoint["epoch"], checkpoint["step"], checkpoint["best"]
        if len(checkpoint["rng"]) == self.world_size:  # each rank continues its own streams (another world size cannot)
            state = checkpoint["rng"][self.rank]
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            if state["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])
        log(f"resuming from {path}: epoch {self.epoch + 1}, step {self.step}")

    def save(self, record=None, improved=False):
        """last.pth, and with `improved` best.pth; every rank joins the RNG gather, rank 0 writes."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        rngs = [rng] * self.world_size  # every rank's, in rank order: each rank resumes its own streams
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng)
        state = {"model": self.model.state_dict(), "model_ema": self.ema.state_dict() if self.ema else None,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step, "best": self.best,
                 "rng": rngs, "args": dataclasses.asdict(self.settings), "task": self.task.name,
                 "num_classes": self.task.num_classes, "classes": self.task.classes}
        if not is_main_process():
            return
        save_checkpoint(state, os.path.join(self.settings.output_dir, "last.pth"))
        if improved:
            best = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
            if self.ema and record[f"val_{self.task.metric}"] > record[f"ema_{self.task.metric}"]:
                best.pop("model_ema")  # loading best.pth picks the EMA when it is there
            save_checkpoint(best | {"metrics": record}, os.path.join(self.settings.output_dir, "best.pth"))

    def train_step(self, micro_batches):
        """One optimizer step over the micro-batches (DDP syncs on the last); returns the mean loss."""
        total = 0.0
        for i, batch in enumerate(micro_batches, 1):
            with contextlib.nullcontext() if i == len(micro_batches) or self.world_size == 1 else self.ddp.no_sync():
                with autocast(self.device, self.settings.amp):
                    loss = self.task.loss(self.forward, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {self.epoch + 1} step "
                                             f"{self.step + 1}; the last good checkpoint is kept")
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.item()
        if self.settings.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update_parameters(self.model)
        return total / len(micro_batches)

    def train_epoch(self):
        """Train from (epoch, step) to the end of the epoch (or of --iters); returns the mean loss."""
        s = self.settings
        self.model.train()
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.step * s.batch_size * s.accum_steps
        # the workers' seeds come from (seed, epoch), not from the global RNG stream
        self.train_loader.generator = torch.Generator().manual_seed(s.seed * 100_003 + self.epoch)
        batches = iter(self.train_loader)
        steps = min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)
        losses, window_start = [], time.perf_counter()
        while self.step < steps:
            losses.append(self.train_step(list(itertools.islice(batches, s.accum_steps))))
            self.step += 1
            if self.step % s.print_freq == 0 or self.step == steps:
                window = (self.step - 1) % s.print_freq + 1
                seconds = (time.perf_counter() - window_start) / window
                left = self.total_steps - self.epoch * self.steps_per_epoch - self.step
                mem = f"  mem {torch.cuda.max_memory_allocated() / 2 ** 30:.1f}G" if self.device.type == "cuda" else ""
                log(f"epoch {self.epoch + 1}/{self.epochs}  step {self.step}/{steps}  loss "
                    f"{sum(losses[-window:]) / window:.4f}  lr {self.optimizer.param_groups[0]['lr']:.2e}  img/s "
                    f"{self.global_batch / seconds:.1f}  eta {datetime.timedelta(seconds=round(left * seconds))}{mem}")
                window_start = time.perf_counter()
            if s.checkpoint_every and self.step % s.checkpoint_every == 0 and self.step < steps:
                self.save()
        return sum(losses) / max(len(losses), 1)

    def evaluate(self, model):
        """The task's evaluation with rank 0's BatchNorm statistics on every rank: all score what rank 0 saves."""
        if dist.is_initialized():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        with autocast(self.device, self.settings.amp):
            return self.task.evaluate(model)

    def fit(self):
        """Train to the end, evaluating every eval_interval epochs; returns the last epoch's record."""
        s, record = self.settings, {}
        log(f"global batch {self.global_batch} = {s.batch_size} per process x {self.world_size} processes x "
            f"{s.accum_steps} accumulation steps; peak lr {self.lr:.2e} ({s.lr:.2e} per {self.task.reference_batch}); "
            f"{self.steps_per_epoch} steps per epoch, {self.total_steps} in all, on {self.device}")
        while self.epoch < self.epochs:
            start = time.perf_counter()
            record = {"epoch": self.epoch + 1, "train_loss": self.train_epoch()}
            improved, summary = False, ""
            if (self.epoch + 1) % s.eval_interval == 0 or self.epoch + 1 == self.epochs:
                models = {"val": self.model} | ({"ema": self.ema.module} if self.ema else {})
                results = {prefix: self.evaluate(model) for prefix, model in models.items()}
                for prefix, metrics in results.items():
                    record |= {f"{prefix}_{k}": v for k, v in metrics.items()}
                score = max(metrics[self.task.metric] for metrics in results.values())
                improved = self.best is None or score > self.best
                self.best = score if improved else self.best
                summary = "".join(f"  {prefix} {format_metrics(metrics)}" for prefix, metrics in results.items()) + \
                    f"  best {self.task.metric} {self.best:.4g}"
            record |= {"lr": self.optimizer.param_groups[0]["lr"], "best": self.best}
            record["seconds"] = time.perf_counter() - start
            log(f"epoch {self.epoch + 1}/{self.epochs} done  train loss {record['train_loss']:.4f}{summary}  "
                f"time {datetime.timedelta(seconds=round(record['seconds']))}")
            self.epoch, self.step = self.epoch + 1, 0
            self.save(record, improved)
            if is_main_process():
                with open(os.path.join(s.output_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
        return record


def load_trained(path, build, read=glnet.read_checkpoint, **given):
    """(model in eval mode, checkpoint) of a checkpoint file of this project (its 'args' say what it holds, merged
    with `given`) or released (`given` names the model): `read(path)`, `build(settings, num_classes)`, a strict load."""
    checkpoint = read(path)
    settings = checkpoint.get("args", {}) | given
    if "model" not in settings:
        raise InputError(f"{path} was not written by this project, so it does not say which model it holds: pass "
                         f"--model ({', '.join(glnet.MODELS)})")
    state_dict = glnet.unwrap_state_dict(checkpoint)
    num_classes = checkpoint.get("num_classes", len(state_dict.get("head.weight", ())))  # a classifier's rows
    model = build(settings, num_classes)
    glnet.load_checkpoint(model, state_dict) if isinstance(model, glnet.GLNet) else model.load_state_dict(state_dict)
    return model.eval(), checkpoint


# --- Image classification: ImageFolder trees, the built-in shapes, transforms, evaluation --------

SHAPES_CLASSES = ("checkerboard", "circle", "cross", "diagonal_stripes", "dots",
                  "horizontal_stripes", "ring", "square", "triangle", "vertical_stripes")
SHAPES_VERSION = "shapes-v1"


def draw_shape_image(name, size, g):
    """(3, size, size) uint8: a shape or texture in two clearly different colours, at a random place."""
    uniform = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()  # noqa: E731
    y, x = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 2, indexing="ij")
    cx, cy, r = uniform(0.35, 0.65) * size, uniform(0.35, 0.65) * size, uniform(0.18, 0.3) * size
    dx, dy, period, phase = x - cx, y - cy, uniform(0.12, 0.25) * size, uniform(0, 2 * math.pi)
    wave = lambda t: torch.sin(2 * math.pi * t / period + phase) > 0  # noqa: E731
    masks = {
        "circle": lambda: dx ** 2 + dy ** 2 < r ** 2,
        "ring": lambda: ((dx ** 2 + dy ** 2).sqrt() - 0.7 * r).abs() < 0.2 * r,
        "square": lambda: torch.maximum(dx.abs(), dy.abs()) < 0.85 * r,
        "triangle": lambda: (dy < 0.8 * r) & (dx.abs() < (dy + r) * 0.6),
        "cross": lambda: ((dx.abs() < 0.25 * r) & (dy.abs() < r)) | ((dy.abs() < 0.25 * r) & (dx.abs() < r)),
        "horizontal_stripes": lambda: wave(y), "vertical_stripes": lambda: wave(x),
        "diagonal_stripes": lambda: wave((x + y) / math.sqrt(2) if uniform(0, 1) < 0.5 else (x - y) / math.sqrt(2)),
        "checkerboard": lambda: ((x // (period / 2) + y // (period / 2)) % 2) == 0,
        "dots": lambda: (torch.sin(2 * math.pi * x / period + phase) * torch.sin(2 * math.pi * y / period)) > 0.5,
    }
    background = torch.rand(3, 1, 1, generator=g)
    foreground = (background + 0.3 + 0.4 * torch.rand(3, 1, 1, generator=g)) % 1  # >= 0.3 apart per channel
    image = torch.where(masks[name](), foreground, background) + 0.08 * torch.randn(3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def make_shapes_dataset(root, train_per_class=300, val_per_class=50, image_size=64, seed=0, classes=SHAPES_CLASSES):
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                v2.functional.to_pil_image(draw_shape_image(name, image_size, g)).save(
                    os.path.join(root, split, name, f"{i:05d}.png"))
    return root


def load_image(path):  # ImageFolder's loader, with an error that names the file
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image as it is, not copied


def to_tensor(image):  # PILToTensor, ToDtype(float32, scale=True), Normalize: 2x faster into (3, H, W) memory order
    pixels = v2.functional.pil_to_tensor(image).to(torch.float32, memory_format=torch.contiguous_format)
    return v2.functional.normalize(pixels, [255 * m for m in MEAN], [255 * s for s in STD], inplace=True)


def image_folder(data_dir, split, transform):
    """ImageFolder of data_dir/split; a missing, empty or flat folder is named, with the layout expected."""
    root = os.path.join(data_dir, split)
    try:
        return datasets.ImageFolder(root, transform=transform, loader=load_image)
    except FileNotFoundError as e:
        flat = os.path.isdir(root) and not any(entry.is_dir() for entry in os.scandir(root))
        raise InputError(f"{str(e).rstrip('.')}; expected the ImageNet layout, {root}/<class>/<image>" + flat * (
            "; ImageNet's val tarball unpacks flat: sort it into a folder per synset (e.g. valprep.sh)")) from None


# timm's RandAugment operations "increasing" in strength with m = magnitude / 10 in [0, 1], of sign s = +-1
RANDAUGMENT_COLOUR = {
    "AutoContrast": lambda x, m, s: v2.functional.autocontrast(x),
    "Equalize": lambda x, m, s: v2.functional.equalize(x), "Invert": lambda x, m, s: v2.functional.invert(x),
    "PosterizeIncreasing": lambda x, m, s: x.point(lambda v: v & -(1 << (4 + int(m * 4)))),  # 4 - int(4 m) bits left
    "SolarizeIncreasing": lambda x, m, s: v2.functional.solarize(x, 256 - int(m * 256)),
    "SolarizeAdd": lambda x, m, s: x.point(lambda v: min(v + int(m * 110), 255) if v < 128 else v),
    "ColorIncreasing": lambda x, m, s: v2.functional.adjust_saturation(x, 1 + s * m * 0.9),
    "ContrastIncreasing": lambda x, m, s: v2.functional.adjust_contrast(x, 1 + s * m * 0.9),
    "BrightnessIncreasing": lambda x, m, s: v2.functional.adjust_brightness(x, 1 + s * m * 0.9),
    "SharpnessIncreasing": lambda x, m, s: v2.functional.adjust_sharpness(x, 1 + s * m * 0.9)}
RANDAUGMENT_GEOMETRIC = {  # (a, b, c, d, e, f): a w x h image's pixel (x, y) comes from (ax + by + c, dx + ey + f)
    "Rotate": lambda t, w, h: rotation(t * 30, w, h),
    "ShearX": lambda t, w, h: (1, t * 0.3, 0, 0, 1, 0), "ShearY": lambda t, w, h: (1, 0, 0, t * 0.3, 1, 0),
    "TranslateXRel": lambda t, w, h: (1, 0, t * 0.45 * w, 0, 1, 0),
    "TranslateYRel": lambda t, w, h: (1, 0, 0, 0, 1, t * 0.45 * h)}
RANDAUGMENT_OPS = list(RANDAUGMENT_COLOUR) + list(RANDAUGMENT_GEOMETRIC)


def rotation(degrees, w, h):  # PIL's Image.rotate: counter-clockwise about the centre (w / 2, h / 2)
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return cos, -sin, w / 2 * (1 - cos) + h / 2 * sin, sin, cos, h / 2 * (1 - cos) - w / 2 * sin


class RandAugment:
    """timm's rand-m9-mstd0.5-inc1 on PIL images: 2 of its 15 operations (drawn with replacement), each applied
    with probability 0.5 at its own magnitude ~ N(9, 0.5) clipped to [0, 10]; fill: the mean colour."""

    num_ops, magnitude, magnitude_std, fill = 2, 9.0, 0.5, tuple(round(255 * m) for m in MEAN)

    def __init__(self, interpolation="bicubic"):
        self.interpolation, self.resample = interpolation, getattr(Image.Resampling, interpolation.upper())

    def __call__(self, image, label_map=None):
        """The augmented image; given the label map (2, 5, h, w) of the image: (image, label map moved with it)."""
        draws = zip(*torch.rand(3, self.num_ops).tolist(), torch.randn(self.num_ops).tolist())
        for pick, negate, noise in ((p, n, z) for p, applied, n, z in draws if applied < 0.5):  # probability 0.5
            name, sign = RANDAUGMENT_OPS[int(pick * len(RANDAUGMENT_OPS))], -1 if negate < 0.5 else 1
            level = min(max(self.magnitude + self.magnitude_std * noise, 0), 10) / 10
            if name in RANDAUGMENT_COLOUR:
                image = RANDAUGMENT_COLOUR[name](image, level, sign)
            else:
                matrix = RANDAUGMENT_GEOMETRIC[name](sign * level, *image.size)
                image = image.transform(image.size, Image.Transform.AFFINE, matrix, self.resample, fillcolor=self.fill)
                label_map = None if label_map is None else warp_label_map(label_map, matrix, *image.size)
        return image if label_map is None else (image, label_map)


def warp_label_map(label_map, matrix, width, height):
    """A label map (2, 5, h, w) of an image moved by the image's affine `matrix`: nearest neighbour in the image's
    own coordinates (whatever shape its cells have); logits 0 (no class preferred) where nothing comes from."""
    to_unit = torch.tensor([[2 / width, 0, -1], [0, 2 / height, -1], [0, 0, 1]], dtype=torch.float64)  # [-1, 1]
    theta = to_unit @ torch.tensor([matrix[:3], matrix[3:], (0, 0, 1)], dtype=torch.float64) @ to_unit.inverse()
    grid = F.affine_grid(theta[None, :2].float(), [1, 1, *label_map.shape[2:]], align_corners=False)
    return F.grid_sample(label_map.flatten(0, 1)[None].float(), grid, "nearest", align_corners=False).view_as(label_map)


def augment_and_normalize(random_erasing=0.0):  # after crop, flip and RandAugment; timm's erasing
    erasing = [v2.RandomErasing(random_erasing, (0.02, 1 / 3), (0.3, 1 / 0.3), value="random", inplace=True)]
    return v2.Compose([to_tensor, *(erasing if random_erasing else [])])


def eval_transform(image_size, interpolation="bilinear", crop_pct=0.875):  # resize to size / crop_pct (as timm's)
    return v2.Compose([v2.Resize(int(image_size / crop_pct), interpolation=interpolation, antialias=True),
                       v2.CenterCrop(image_size), to_tensor])


def eval_loader(dataset, batch_size, workers, rank=0, world_size=1):
    """Rank r takes images r, r + W, ...: each image exactly once (DistributedSampler repeats some)."""
    return DataLoader(torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size)), batch_size,
                      num_workers=workers, pin_memory=torch.cuda.is_available())


@torch.no_grad()
def evaluate(model, loader, device):
    """Top-1, top-5 (%) and loss over the whole dataset, summed across ranks: each image once."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)   # top-1 hits, top-5 hits, loss, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        sums += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(),
                              F.cross_entropy(logits, targets, reduction="sum").item(), len(targets)], device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    top1, top5, loss, count = sums.tolist()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count, "images": int(count)}


def classification_loss(model, batch, device, criterion, mixup=None):
    images, targets = (t.to(device, non_blocking=True) for t in batch)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    if mixup is not None:
        images, targets = mixup(images, targets)
    return criterion(model(images), targets)


# --- Token labeling (LV-ViT, "All Tokens Matter"; Table 9) ---------------------------------------
# A teacher's score maps supervise every token: label maps -> the crop's targets (in the loader) ->
# MixToken (in the forward) -> the loss.

def label_map_path(labels_dir, split_dir, image_path):  # LV-ViT's <labels>/<class>/<image name>.pt
    return os.path.join(labels_dir, os.path.splitext(os.path.relpath(image_path, split_dir))[0] + ".pt")


def token_label_targets(label_map, box, image_size, grid, num_classes, smoothing=0.0):
    """(crop label (K,), token labels (h*w, K)) as LV-ViT: the dense map cut out by roi_align, softmaxed."""
    logits, classes = label_map.float()                                          # (5, H, W) each
    dense = torch.zeros(num_classes, *logits.shape[1:]).scatter_(0, classes.long(), logits)
    top, left, height, width = box["top"], box["left"], box["height"], box["width"]
    sy, sx = dense.shape[1] / image_size[0], dense.shape[2] / image_size[1]      # map cells per pixel
    roi = torch.tensor([[0, left * sx, top * sy, (left + width) * sx, (top + height) * sy]])  # (index, x1, y1, x2, y2)
    tokens = roi_align(dense[None], roi, output_size=grid, aligned=True)[0]      # (K, h, w)
    crop = roi_align(dense[None], roi, output_size=1, aligned=True)[0, :, 0, 0]  # (K,)
    smooth = lambda scores: (1 - smoothing) * scores.softmax(dim=0) + smoothing / num_classes  # noqa: E731
    return smooth(crop), rearrange(smooth(tokens), "k h w -> (h w) k")


class TokenLabeledImages(Dataset):
    """(image, class, crop label (K,), token labels (h*w, K)) in LV-ViT's order: the flip, RandAugment, the
    random-resized crop, then `augment`; the label map follows the flip, every geometric operation and the crop."""

    def __init__(self, data_dir, labels_dir, crop, augment, label_smoothing=0.1, randaugment=None):
        self.images, self.randaugment = image_folder(data_dir, "train", None), randaugment
        self.classes, self.labels_dir, self.crop, self.augment = self.images.classes, labels_dir, crop, augment
        self.smoothing, self.grid = label_smoothing, tuple(math.ceil(s / TOKEN_STRIDE) for s in crop.size)
        self.expected = (f"a tensor (2, {TOP_K}, H, W): the teacher's top-{TOP_K} logits and their class indices "
                         f"(0-{len(self.classes) - 1}) at every position of an H x W grid over the image")
        missing = []  # before training: a label map for every image (listed a class at a time)
        for label, samples in itertools.groupby(self.images.samples, key=lambda sample: sample[1]):  # class by class
            present = {os.path.join(folder, name) for folder, _, names in
                       os.walk(os.path.join(self.labels_dir, self.classes[label])) for name in names}
            missing += [path for path, _ in samples if self.path(path) not in present]
        if missing:
            raise InputError(f"{len(missing)} of {len(self.images)} training images have no label map, e.g. "
                             f"{missing[0]}: expected {self.path(missing[0])}, {self.expected}")

    def __len__(self):
        return len(self.images)

    def path(self, image_path):
        return label_map_path(self.labels_dir, self.images.root, image_path)

    def __getitem__(self, index):
        path, target = self.images.samples[index]
        image, label_map = load_image(path), torch.load(self.path(path), weights_only=True)
        if not isinstance(label_map, torch.Tensor) or label_map.ndim != 4 or label_map.shape[:2] != (2, TOP_K):
            found = f"shape {tuple(label_map.shape)}" if torch.is_tensor(label_map) else type(label_map).__name__
            raise InputError(f"the label map {self.path(path)} of {path} holds {found}; expected {self.expected}")
        if not 0 <= label_map[1].min() <= label_map[1].max() < len(self.classes):
            raise InputError(f"the label map {self.path(path)} of {path} holds class indices {label_map[1].min():.0f}-"
                             f"{label_map[1].max():.0f}; expected {self.expected}")
        if torch.rand(()) < 0.5:                                                # the horizontal flip
            image, label_map = v2.functional.horizontal_flip(image), label_map.flip(-1)
        image, label_map = self.randaugment(image, label_map) if self.randaugment else (image, label_map)
        box = self.crop.make_params([image])                                    # the random-resized crop
        crop_label, token_labels = token_label_targets(label_map, box, (image.height, image.width), self.grid,
                                                       len(self.classes), self.smoothing)
        return self.augment(self.crop.transform(image, box)), target, crop_label, token_labels


class MixToken:
    """LV-ViT's MixToken inside the model's forward (DDP syncs as for any forward): a stem hook swaps the
    features in a box on the token grid with the flipped batch's, so the token logits can be swapped back."""

    def __init__(self, model):
        self.box, self.scale = None, model.stage_strides[-1] // model.stage_strides[0]  # 8 stem pixels per token
        model.downsample_layers[0].register_forward_hook(self.swap)

    def swap(self, stem, inputs, features):                                    # (B, C, H/4, W/4)
        if self.box is None or not stem.training:
            return None
        box = self.box.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)
        return torch.where(box[:features.shape[2], :features.shape[3]], features.flip(0), features)

    @staticmethod
    def random_box(height, width):
        """CutMix's box as a mask: lam ~ Beta(1, 1), sides sqrt(1 - lam) x the grid's, clipped."""
        side = (1 - torch.rand(())).sqrt().item()
        box_h, box_w = int(height * side), int(width * side)
        top, left = torch.randint(height, ()).item() - box_h // 2, torch.randint(width, ()).item() - box_w // 2
        mask = torch.zeros(height, width, dtype=torch.bool)
        mask[max(top, 0):top + box_h, max(left, 0):left + box_w] = True
        return mask

    def __call__(self, model, images):
        """(class logits, token logits put back to their images, lam = the own image's share)."""
        self.box = self.random_box(*(math.ceil(size / TOKEN_STRIDE) for size in images.shape[2:])).to(images.device)
        try:
            class_logits, token_logits = model(images)
        finally:
            box, self.box = self.box, None
        in_box = box.flatten()[None, :, None]                                  # the tokens' row-major order
        return class_logits, torch.where(in_box, token_logits.flip(0), token_logits), 1 - box.float().mean()


def token_labeling_loss(model, batch, device, mix_token):
    """LV-ViT's: cross-entropy with the crop labels mixed by lam (no ground truth) + 0.5 x the token labels'."""
    images, _, crop_labels, token_labels = (t.to(device, non_blocking=True) for t in batch)  # GLNet makes it NHWC
    class_logits, token_logits, lam = mix_token(model, images)
    crop_labels = lam * crop_labels + (1 - lam) * crop_labels.flip(0)
    token_loss = F.cross_entropy(token_logits.flatten(0, 1), token_labels.flatten(0, 1))
    return F.cross_entropy(class_logits, crop_labels) + TOKEN_LOSS_WEIGHT * token_loss


def teacher_token_logits(teacher, images):
    """(B, K, h, w): every last-stage token's logits, by the token head or else the class head."""
    tokens = teacher.norm(teacher.forward_features(images)[-1]).permute(0, 2, 3, 1)    # (B, h, w, C)
    return (teacher.head if teacher.token_head is None else teacher.token_head)(tokens).permute(0, 3, 1, 2)


@torch.no_grad()
def make_token_labels(output, teacher_path, given, rank, world_size, device):
    """LV-ViT's label maps (2, 5, h, w) of every training image by a teacher, renamed into OUTPUT when complete."""
    output, tmp = os.path.abspath(output), os.path.abspath(output) + ".tmp"
    if os.path.isdir(output) and os.listdir(output):
        raise InputError(f"{output} is not empty: label maps go into a new folder (choose another or remove it)")
    teacher, s = from_checkpoint(teacher_path, given, device)
    images = image_folder(s.data, "train", v2.Compose([v2.Resize((s.image_size,) * 2, interpolation=s.interpolation,
                                                                 antialias=True), to_tensor]))
    if not TOP_K <= len(images.classes) <= 2048:  # class indices are exact in half precision up to 2048
        raise InputError(f"label maps hold the top-{TOP_K} of 5 to 2048 classes; {s.data} has {len(images.classes)}")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    loader = eval_loader(images, s.batch_size, s.workers, rank, world_size)
    paths = (images.samples[i][0] for i in loader.dataset.indices)
    for batch, _ in loader:
        with autocast(device, s.amp):
            top = teacher_token_logits(teacher, batch.to(device)).float().topk(TOP_K, dim=1)
        for label_map in torch.stack([top.values, top.indices.float()], dim=1).half().cpu():  # (2, 5, h, w) each
            path = label_map_path(tmp, images.root, next(paths))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(label_map.clone(), path)  # a copy: saving a view would store the whole batch
    if dist.is_initialized():
        dist.barrier()
    if is_main_process():
        if os.path.isdir(output):
            os.rmdir(output)
        os.replace(tmp, output)
    log(f"wrote {len(images)} label maps (2, {TOP_K}, h, w) to {output}\n"
        f"train with them: python train.py --token-labels {output} --data {s.data}")
    return output


# --- --bench: speed against torchvision's models of GLNet-STL's size -----------------------------

def interleaved_medians(calls, rounds, device):
    """Median seconds of each call, one of each per round: a shared machine's noise hits all alike."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in calls}
    for round in range(rounds + 1):       # round 0 warms up (and compiles)
        for name, call in calls.items():
            synchronize()
            start = time.perf_counter()
            call()
            synchronize()
            times[name] += [time.perf_counter() - start] if round else []
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bench(s: Settings, models, rounds, sizes, rank, world_size, device):
    """Images/s of inference and of the Trainer's own step against torchvision's models; glnet_stl's latency."""
    import torchvision
    loss = functools.partial(classification_loss, device=device, criterion=nn.CrossEntropyLoss())
    task = Task("classification", datasets.FakeData(s.batch_size * world_size * s.accum_steps), loss, None, "top1",
                REFERENCE_BATCH, 1000, [])
    builders = {name: functools.partial(glnet.create_model, name) for name in models}
    trainers = {name: Trainer(s, build(num_classes=1000), task, rank, world_size, device)
                for name, build in (builders | {b: getattr(torchvision.models, b) for b in BENCH_BASELINES}).items()}
    x = torch.randn(s.batch_size, 3, 224, 224, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
    batch = (x, torch.zeros(len(x), dtype=torch.long))
    inference = lambda model, x: torch.inference_mode()(autocast(device, s.amp)(functools.partial(model, x)))  # noqa
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {world_size} x {device.type}, amp {s.amp}, "
        f"{'compiled' if s.compile else 'eager'}; medians of {rounds} interleaved rounds")
    for title, train_mode in (("inference", False), ("training step", True)):
        for t in trainers.values():
            t.model.train(train_mode)
        calls = {name: functools.partial(t.train_step, [batch] * s.accum_steps) if train_mode
                 else inference(t.forward, batch[0]) for name, t in trainers.items()}
        seconds = interleaved_medians(calls, rounds, device)
        images = s.batch_size * (world_size * s.accum_steps if train_mode else 1)
        log(f"\n{title}, batch {images}, 224x224\n{'model':<22}{'images/s':>10}" + "".join(f"{'x ' + b:>18}" for b in
                                                                                        BENCH_BASELINES))
        for name, t in seconds.items():
            log(f"{name:<22}{images / t:>10.1f}" + "".join(f"{seconds[b] / t:>18.2f}" for b in BENCH_BASELINES))
    if device.type == "cuda":
        log(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    model = glnet.create_model("glnet_stl").to(device).eval()
    latency = interleaved_medians({size: inference(model, torch.randn(1, 3, size, size, device=device))
                                   for size in sizes}, rounds, device)
    log(f"\nglnet_stl latency, batch 1 (linear in the pixel count when 'x {sizes[0]}' <= 'pixels x {sizes[0]}')\n"
        f"{'size':>6}{'ms':>10}{f'x {sizes[0]}':>8}{f'pixels x {sizes[0]}':>14}")
    for size, t in latency.items():
        log(f"{size:>6}{1000 * t:>10.1f}{t / latency[sizes[0]]:>8.1f}{(size / sizes[0]) ** 2:>14.1f}")
    return {"seconds": seconds, "latency": latency}


# --- Command line: train, --eval, --make-token-labels, --bench -----------------------------------

def recipe_defaults(field):
    """A flag's default for --help: the recipes' values where they differ."""
    values = {recipe: values.get(field.name, field.default) for recipe, values in RECIPES.items()}
    special = {"drop_path": "per model", "output_dir": "runs/<model>-<data name>"}
    return special.get(field.name) or (", ".join(f"{recipe} {value}" for recipe, value in values.items())
                                       if len(set(map(repr, values.values()))) > 1 else values["builtin"])


def parse_args(argv=None):
    """(every flag, the settings flags given on the command line)."""
    parser = Parser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    add_settings_flags(parser, ClassificationSettings, recipe_defaults)
    parser.add_argument("--eval", action="store_true", help="evaluate --checkpoint (released: with --model, --data)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--make-token-labels", metavar="DIR", help="write label maps of every training image to DIR")
    parser.add_argument("--teacher", metavar="CHECKPOINT", help="with --make-token-labels: the GLNet that makes them")
    parser.add_argument("--bench", action="store_true", help="measure speed against torchvision's models, then exit")
    parser.add_argument("--models", nargs="+", default=glnet.RELEASED[:5], choices=glnet.RELEASED[:5] + ("glnet_mini",))
    parser.add_argument("--rounds", type=at_least(1), default=5, help="--bench: interleaved timing rounds")
    parser.add_argument("--latency-sizes", type=at_least(32), nargs="+", default=[224, 448, 896, 1344])
    args = parser.parse_args(argv)
    if ("make_token_labels" in args) != ("teacher" in args):
        parser.error("--make-token-labels DIR and --teacher CHECKPOINT go together")
    if "eval" in args and "checkpoint" not in args:
        parser.error("--eval needs --checkpoint FILE")
    return args, field_values(ClassificationSettings, vars(args))


def make_settings(given, checkpoint=None):
    """The one place where a recipe becomes settings: its, a checkpoint's (released: its recipe's), the flags'."""
    released = {"recipe": "imagenet-tklb" if given.get("model", "").endswith("_tklb") else "imagenet"}
    trained = {} if checkpoint is None else checkpoint.get("args", released)
    recipe = given.get("recipe") or trained.get("recipe") or (
        ("imagenet-tklb" if given.get("token_labels") else "imagenet") if given.get("data") else "builtin")
    values = field_values(ClassificationSettings, {**RECIPES[recipe], **trained, "recipe": recipe, **given})
    values.setdefault("drop_path", DROP_PATH[values["model"]])
    values |= {key: os.path.abspath(values[key]) for key in ("data", "token_labels") if values.get(key)}
    data_name = os.path.basename(values["data"].rstrip("/")) if values.get("data") else "builtin"
    values.setdefault("output_dir", f"runs/{values['model']}-{data_name}{'-tklb' * bool(values.get('token_labels'))}")
    s = ClassificationSettings(**values)
    if (s.recipe == "imagenet-tklb" or s.model.endswith("_tklb")) and not s.token_labels and not trained:
        raise InputError(f"--recipe {s.recipe} with --model {s.model} trains with token labels: pass --token-labels "
                         f"DIR (the NFNet-F6 maps, or make them with --make-token-labels DIR --teacher CHECKPOINT)")
    if s.token_labels and (s.mixup or s.cutmix):
        raise InputError(f"token labeling mixes with MixToken instead of mixup and cutmix: pass --mixup 0 --cutmix 0 "
                         f"(got {s.mixup}, {s.cutmix})")
    return s


def build_classifier(args, num_classes):
    """The GLNet a classification run trains (or a checkpoint holds): a token head with token labels."""
    model = glnet.create_model(args["model"], num_classes=num_classes, drop_path_rate=args.get("drop_path") or 0.0,
                               **({"token_head": True} if args.get("token_labels") else {}))
    model.set_grad_checkpointing(args.get("grad_checkpointing", False))
    return model


def build_trainer(s: ClassificationSettings, rank=0, world_size=1, device=torch.device("cpu"), model=None):
    """What a run trains with: the recipe's data, transforms, model (unless given), loss and evaluation."""
    data_dir = s.data or builtin_dataset(s.cache_dir, SHAPES_VERSION, make_shapes_dataset)
    crop = v2.RandomResizedCrop(s.image_size, interpolation=s.interpolation, antialias=True)
    randaugment, finish = [RandAugment(s.interpolation)] * s.randaugment, augment_and_normalize(s.random_erasing)
    if s.token_labels:
        train_set = TokenLabeledImages(data_dir, s.token_labels, crop, finish, s.label_smoothing, *randaugment)
    else:
        train_set = image_folder(data_dir, "train", v2.Compose([crop, v2.RandomHorizontalFlip(), *randaugment, finish]))
    val_set = image_folder(data_dir, "val", eval_transform(s.image_size, s.interpolation, s.crop_pct))
    if train_set.classes != val_set.classes:
        differ = sorted(set(train_set.classes) ^ set(val_set.classes))[:5]
        raise InputError(f"the class folders of {data_dir}/train and {data_dir}/val differ in {differ}")
    classes, num_classes = train_set.classes, len(train_set.classes)
    model = model or build_classifier(dataclasses.asdict(s), num_classes)
    if s.token_labels:
        loss = functools.partial(token_labeling_loss, device=device, mix_token=MixToken(model))
    else:
        mixing = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, s.mixup), (v2.CutMix, s.cutmix)) if a > 0]
        loss = functools.partial(classification_loss, device=device, mixup=v2.RandomChoice(mixing) if mixing else None,
                                 criterion=nn.CrossEntropyLoss(label_smoothing=s.label_smoothing))  # one mix per batch
    val_loader = eval_loader(val_set, s.batch_size, s.workers, rank, world_size)
    log(f"{s.model}{' with a token head' * bool(s.token_labels)} ({glnet.count_params(model) / 1e6:.2f} M params), "
        f"{num_classes} classes, {len(train_set)} train / {len(val_set)} val images from {data_dir}")
    task = Task("classification", train_set, loss, functools.partial(evaluate, loader=val_loader, device=device),
                "top1", REFERENCE_BATCH, num_classes, classes)
    return Trainer(s, model, task, rank, world_size, device)


def from_checkpoint(path, given, device):
    """(model, settings it was trained with and the command line's) of a checkpoint to evaluate or teach."""
    model, checkpoint = load_trained(path, build_classifier, **given)
    if "data" not in checkpoint.get("args", {}) and "data" not in given:
        raise InputError(f"{path} was not written by train.py, so it does not say which data it is for: pass --data")
    s = make_settings(given, checkpoint)
    data = s.data or builtin_dataset(s.cache_dir, SHAPES_VERSION, make_shapes_dataset)
    return model.to(device), dataclasses.replace(s, data=data)


def main(argv=None):
    """Train, --eval, --make-token-labels or --bench; returns the best top-1, metrics, label folder or timings."""
    args, given = parse_args(argv)
    with distributed() as (rank, world_size, device):
        if "eval" in args:
            model, s = from_checkpoint(args.checkpoint, given, device)
            val_set = image_folder(s.data, "val", eval_transform(s.image_size, s.interpolation, s.crop_pct))
            with autocast(device, s.amp):
                metrics = evaluate(model, eval_loader(val_set, s.batch_size, s.workers, rank, world_size), device)
            log(f"{args.checkpoint} ({s.model}, {s.image_size}x{s.image_size}) on {metrics['images']} images of "
                f"{val_set.root}: {format_metrics(metrics)}")
            return metrics
        if "make_token_labels" in args:
            return make_token_labels(args.make_token_labels, args.teacher, given, rank, world_size, device)
        if "bench" in args:
            s = make_settings({"batch_size": 128 if device.type == "cuda" else 8, "workers": 0, **given})
            return bench(s, args.models, args.rounds, args.latency_sizes, rank, world_size, device)
        s = make_settings(given)
        torch.manual_seed(s.seed + rank)   # each rank its own streams (drop path, augmentation)
        random.seed(s.seed + rank)
        log(f"recipe {s.recipe}: " + ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(s).items()))
        trainer = build_trainer(s, rank, world_size, device)
        trainer.resume()
        trainer.fit()
        log(f"done: best val top-1 {trainer.best:.2f}; python train.py --eval --checkpoint {s.output_dir}/best.pth")
        return {"best_top1": trainer.best}


def run(main):  # a script as a command: an InputError ends it as one line, exit status 2; others keep the traceback
    try:
        main()
    except InputError as e:
        Parser().exit(2, f"{os.path.basename(sys.argv[0])}: error: {e}\n")


if __name__ == "__main__":
    run(main)
