"""GLNet as a dense-prediction backbone: Mask R-CNN and RetinaNet on COCO, Semantic FPN and UperNet on ADE20K.

The paper trains these with MMDetection and MMSegmentation (Sec. 4.2-4.3, Appendix B). Here the detectors are
torchvision's on a GLNet + FeaturePyramidNetwork backbone, Semantic FPN and UperNet are written out below, and COCO AP
comes from pycocotools. Training is train.py's loop (train.Trainer): this file adds the models, the data, the loss of
a batch and the evaluation, so checkpoints, exact resume and the flags are the same as there.

    python detect_seg.py                          # synthetic scenes on a CPU: Mask R-CNN, then Semantic FPN
    python detect_seg.py --predict scene.png      # draw what the trained Mask R-CNN finds
    torchrun --nproc_per_node 8 detect_seg.py --task maskrcnn --data /data/coco \\
        --model glnet_4g --pretrained glnet_4g.pth --output-dir runs/det
    python detect_seg.py --report                 # parameters and FLOPs against the paper's Tables 4 and 5
"""

import argparse
import dataclasses
import functools
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork, FrozenBatchNorm2d, box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

import glnet
import train
from glnet import InputError

# --- The four tasks: recipes, metrics, the paper's numbers ----------------------------------------

@dataclasses.dataclass(frozen=True)
class DenseTask:
    segmentation: bool
    metric: str             # what best.pth is chosen by
    reference_batch: int    # the paper's global batch: --lr is given for it and scales linearly
    paper: dict             # the paper's recipe (README.md gives the source of each value)
    synthetic: dict         # out of the box: glnet_mini from scratch on the synthetic scenes, on a CPU
    report_size: tuple      # (H, W) of the paper's FLOPs
    report_classes: int     # COCO's 80 (and the background in Mask R-CNN's box classifier) or ADE20K's 150
    paper_costs: dict       # {backbone: (parameters in M, GFLOPs)}: Table 4 (COCO) or Table 5 (ADE20K)


# Batch sizes are per process: on 8 GPUs they reach the reference batches, on fewer --accum-steps does. Both
# detectors share the 1x schedule, the paper's on COCO and its counterpart on the scenes.
COCO_1X = dict(model="glnet_4g", epochs=12, lr_schedule="step", lr_steps=(8, 11), batch_size=2, lr=1e-4,
               warmup_iters=500, min_size=800, max_size=1333, fpn_channels=256)
SCENES_1X = dict(model="glnet_mini", epochs=3, lr_schedule="step", lr_steps=(2,), batch_size=4, lr=1.2e-3,
                 warmup_iters=50, min_size=128, max_size=208, fpn_channels=64, eval_interval=100)
TASKS = {
    "maskrcnn": DenseTask(
        segmentation=False, metric="bbox_AP", reference_batch=16,
        paper=COCO_1X | dict(weight_decay=0.05, rois_per_image=512),
        synthetic=SCENES_1X | dict(weight_decay=0.05, rois_per_image=64),
        report_size=(800, 1280), report_classes=81, paper_costs={"glnet_4g": (46.6, 233), "glnet_9g": (79.5, 311)}),
    "retinanet": DenseTask(
        segmentation=False, metric="bbox_AP", reference_batch=16,
        paper=COCO_1X | dict(weight_decay=1e-3), synthetic=SCENES_1X | dict(weight_decay=1e-3),
        report_size=(800, 1280), report_classes=80, paper_costs={"glnet_4g": (37, 214), "glnet_9g": (70, 292)}),
    # PVT's 80k iterations, evaluated every 10 epochs of ADE20K (about 6k iterations)
    "semfpn": DenseTask(
        segmentation=True, metric="mIoU", reference_batch=32,
        paper=dict(model="glnet_4g", iters=80000, lr_schedule="cosine", batch_size=4, lr=2e-4, weight_decay=1e-4,
                   warmup_iters=1000, crop_size=512, scale=512, fpn_channels=256, eval_interval=10),
        synthetic=dict(model="glnet_mini", iters=150, lr_schedule="cosine", batch_size=8, lr=4e-3, weight_decay=1e-4,
                       warmup_iters=50, crop_size=128, scale=160, fpn_channels=64, eval_interval=100),
        report_size=(512, 2048), report_classes=150, paper_costs={"glnet_4g": (30.7, 150), "glnet_9g": (63.6, 230)}),
    # Swin's ADE20K schedule, which Sec. 4.3 says the paper follows: 13 epochs of ADE20K, its 16k-iteration interval
    "upernet": DenseTask(
        segmentation=True, metric="mIoU", reference_batch=16,
        paper=dict(model="glnet_4g", iters=160000, lr_schedule="poly", batch_size=2, lr=6e-5, weight_decay=0.01,
                   warmup_iters=1500, warmup_factor=1e-6, drop_path=0.3, crop_size=512, scale=512, fpn_channels=512,
                   eval_interval=13),
        synthetic=dict(model="glnet_mini", iters=150, lr_schedule="poly", batch_size=8, lr=2e-3, weight_decay=0.01,
                       warmup_iters=50, crop_size=128, scale=160, fpn_channels=64, eval_interval=100),
        report_size=(512, 2048), report_classes=150, paper_costs={"glnet_4g": (56.8, 907), "glnet_9g": (91.7, 988)}),
}
SCHEDULE_3X = dict(epochs=36, lr_steps=(27, 33), multiscale=True)   # MMDetection's 3x, for both detectors
MULTISCALE_SIZES = tuple(range(480, 801, 32))    # the shorter sides of multi-scale training
PPM_SCALES = (1, 2, 3, 6)   # UperNet's pyramid pooling: the last stage pooled to 1x1 ... 6x6
AUXILIARY_WEIGHT = 0.4      # of the loss of UperNet's auxiliary head on stage 3 (training only)
IGNORE_INDEX = 255          # the label of unlabelled pixels
OUTPUT_DIR, DEFAULT_TASKS = os.path.join("runs", "detect_seg"), ["maskrcnn", "semfpn"]
SCENE_CLASSES = ("square", "circle", "triangle")   # the synthetic scenes' classes, each in a colour family
SCENE_COLORS = ((220, 60, 50), (60, 190, 70), (60, 90, 220))
SCENE_SPLITS, SCENES_VERSION = {"train": 300, "val": 60}, "scenes-v1"


@dataclasses.dataclass
class DenseSettings(train.Settings):
    task: str = train.option(None, "the models to train, one after the other", choices=list(TASKS), nargs="+")
    data: str | None = train.option(None, "the COCO 2017 (detection) or ADEChallengeData2016 (segmentation) root")
    cache_dir: str = train.option(train.DEFAULT_CACHE, "where the synthetic scenes are written once")
    pretrained: str | None = train.option(None, "an ImageNet GLNet checkpoint for the backbone (released ones too)")
    schedule: str = train.option("1x", "detection: 3x = 36 epochs, steps at 27, 33, multi-scale", choices=["1x", "3x"])
    min_size: int = train.option(800, "detection: the shorter image side", type=train.at_least(32))
    max_size: int = train.option(1333, "detection: the longer image side at most", type=train.at_least(32))
    multiscale: bool = train.option(False, f"detection: shorter sides {MULTISCALE_SIZES[0]}-{MULTISCALE_SIZES[-1]}")
    fpn_channels: int = train.option(256, "the FPN's and the mask head's width; UperNet's", type=train.at_least(8))
    rois_per_image: int = train.option(512, "Mask R-CNN: RoIs sampled per image for the losses", type=train.at_least(1))
    crop_size: int = train.option(512, "segmentation: the training crop", type=train.at_least(32))
    scale: int = train.option(512, "segmentation: images resized into (4 x scale, scale)", type=train.at_least(32))


# --- Models ---------------------------------------------------------------------------------------

def freeze_batchnorm(module):
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d with its statistics and affine."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.load_state_dict(child.state_dict())
            module.set_submodule(name, frozen)
    return module


class GLNetFPN(nn.Module):
    """GLNet's stage outputs (`levels`: 0-3 = strides 4-32) into torchvision's FeaturePyramidNetwork;
    `extra_blocks` adds P6 (Mask R-CNN) or P6-P7 (RetinaNet). torchvision's detectors read `out_channels`."""

    def __init__(self, body, levels, extra_blocks, out_channels):
        super().__init__()
        self.body, self.levels, self.out_channels = body, levels, out_channels
        self.fpn = FeaturePyramidNetwork([body.stage_channels[i] for i in levels], out_channels, extra_blocks)

    def forward(self, x):
        features = self.body.forward_features(x)
        return self.fpn({str(i): features[level] for i, level in enumerate(self.levels)})


resize = functools.partial(F.interpolate, mode="bilinear", align_corners=False)


def scale_head(in_channels, channels, level):
    """Semantic FPN's head of a level: (3x3 conv, GroupNorm, ReLU, 2x upsampling) until stride 4, one conv at 4."""
    layers = []
    for step in range(max(level, 1)):
        layers += [nn.Conv2d(in_channels if step == 0 else channels, channels, 3, padding=1, bias=False),
                   nn.GroupNorm(math.gcd(32, channels), channels), nn.ReLU(inplace=True)]
        if level > 0:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al. 2019): an FPN on the four stages, a head per level up to stride 4, their sum,
    dropout, a 1x1 classifier. (B, 3, H, W) images in [0, 1] -> (B, classes, H, W) logits."""

    def __init__(self, body, num_classes, fpn_channels):
        super().__init__()
        width = fpn_channels // 2   # 128 for the paper's 256, as MMSegmentation's
        self.backbone = GLNetFPN(body, (0, 1, 2, 3), None, fpn_channels)
        self.scale_heads = nn.ModuleList(scale_head(fpn_channels, width, level) for level in range(4))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(width, num_classes, 1))

    def forward(self, images):
        features = list(self.backbone(v2.functional.normalize(images, train.MEAN, train.STD)).values())
        size = features[0].shape[-2:]   # odd sizes make 2x upsampling miss stride 4 by a pixel
        x = sum(resize(head(f), size=size) for head, f in zip(self.scale_heads, features))
        return resize(self.classifier(x), size=images.shape[-2:])


class UperNet(nn.Module):
    """UperNet (Xiao et al. 2018) as MMSegmentation's UPerHead in Swin's ADE20K configuration: a pyramid pooling
    module on the last stage, an FPN over the four stages (1x1 laterals, top-down sums, 3x3 convs), the levels
    upsampled to stride 4, concatenated, fused by a 3x3 conv; dropout, a 1x1 classifier. Every other conv is
    conv-BatchNorm-ReLU, `channels` wide. The auxiliary FCN head on stage 3 regularises training only.
    (B, 3, H, W) images in [0, 1] -> (B, classes, H, W) logits; in training, (logits, auxiliary logits)."""

    def __init__(self, body, num_classes, channels):
        super().__init__()
        self.backbone = body
        c1, c2, c3, c4 = body.stage_channels
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), Conv2dNormActivation(c4, channels, 1)) for scale in PPM_SCALES)
        self.bottleneck = Conv2dNormActivation(c4 + len(PPM_SCALES) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(Conv2dNormActivation(c, channels, 1) for c in (c1, c2, c3))
        self.fpn_convs = nn.ModuleList(Conv2dNormActivation(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = Conv2dNormActivation(4 * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.auxiliary_head = nn.Sequential(Conv2dNormActivation(c3, channels // 2, 3), nn.Dropout2d(0.1),
                                            nn.Conv2d(channels // 2, num_classes, 1))

    def forward(self, images):
        c1, c2, c3, c4 = self.backbone.forward_features(v2.functional.normalize(images, train.MEAN, train.STD))
        pooled = [resize(ppm(c4), size=c4.shape[-2:]) for ppm in self.psp_modules]
        laterals = [conv(c) for conv, c in zip(self.lateral_convs, (c1, c2, c3))]
        laterals.append(self.bottleneck(torch.cat([c4, *pooled], dim=1)))
        for i in range(3, 0, -1):   # top-down: each level plus the upsampled level above it
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], size=laterals[i - 1].shape[-2:])
        levels = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + laterals[3:]
        size = levels[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([levels[0], *(resize(x, size=size) for x in levels[1:])], dim=1))
        logits = resize(self.classifier(fused), size=images.shape[-2:])
        if not self.training:
            return logits
        return logits, resize(self.auxiliary_head(c3), size=images.shape[-2:])


def build_model(settings, num_classes, load_pretrained=False):
    """The model of a run's settings or of a checkpoint's args (train.load_trained's `build`): a GLNet without its
    classifier (with `load_pretrained`, the ImageNet weights of settings['pretrained']) under the task's neck and
    heads. The detectors are MMDetection's: RetinaNet's P6 comes from C5, not P5, and its heads have no GroupNorm;
    started from ImageNet weights they freeze GLNet's BatchNorms, since 2 images per GPU give useless statistics."""
    task, width = settings.get("task"), settings.get("fpn_channels")
    if task not in TASKS:
        raise InputError(f"the checkpoint names the task {task!r}, not one of {', '.join(TASKS)}: not detect_seg.py's")
    body = glnet.create_model(settings["model"], checkpoint=settings["pretrained"] if load_pretrained else None,
                              num_classes=0, drop_path_rate=settings["drop_path"] or 0.0)
    body.set_grad_checkpointing(settings.get("grad_checkpointing", False))
    body.norm = nn.Identity()   # the classifier's BatchNorm: unused, and DDP wants every parameter used
    if task == "semfpn":
        return SemanticFPN(body, num_classes, width)
    if task == "upernet":
        return UperNet(body, num_classes, width)
    if settings["pretrained"]:
        freeze_batchnorm(body)
    resizing = dict(min_size=MULTISCALE_SIZES if settings["multiscale"] else settings["min_size"],
                    max_size=settings["max_size"], image_mean=train.MEAN, image_std=train.STD)
    if task == "retinanet":
        p6_p7 = LastLevelP6P7(body.stage_channels[3], width)
        p6_p7.use_P5 = False   # torchvision takes P5 when C5 is as wide as the FPN
        return RetinaNet(GLNetFPN(body, (1, 2, 3), p6_p7, width), num_classes, **resizing)
    return MaskRCNN(GLNetFPN(body, (0, 1, 2, 3), LastLevelMaxPool(), width), None,
                    box_predictor=FastRCNNPredictor(1024, num_classes),   # 1024: torchvision's box head
                    mask_head=MaskRCNNHeads(width, [width] * 4, dilation=1),
                    mask_predictor=MaskRCNNPredictor(width, width, num_classes),
                    box_batch_size_per_image=settings["rois_per_image"], **resizing)


# --- Data: COCO, ADE20K-style folders, the synthetic scenes ---------------------------------------

def coco_dataset(root, split, training, with_masks):
    """COCO 2017's <root>/<split>2017/ and annotations/instances_<split>2017.json by torchvision's CocoDetection
    for transforms v2: targets with XYXY `boxes`, `labels` (the category ids) and `masks`. Training keeps the objects
    MMDetection's CocoDataset does, boxes clipped to the image (masks as they are), and the images left with any."""
    image_dir, ann_file = f"{root}/{split}2017", f"{root}/annotations/instances_{split}2017.json"
    for path, exists in ((ann_file, os.path.isfile), (image_dir, os.path.isdir)):
        if not exists(path):
            raise InputError(f"{path} not found: expected the COCO 2017 layout: train2017/, val2017/ and "
                             f"annotations/instances_{{train,val}}2017.json")
    clip_and_flip = [v2.ClampBoundingBoxes(), v2.RandomHorizontalFlip()] if training else []
    transforms = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *clip_and_flip])
    try:
        dataset = CocoDetection(image_dir, ann_file, transforms=transforms)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{ann_file} is not valid JSON ({e}); expected a COCO instances file") from None
    coco = dataset.coco
    missing = [key for key in ("images", "annotations", "categories") if key not in coco.dataset]
    if missing:
        raise InputError(f"{ann_file} has no {', '.join(map(repr, missing))} entry; expected a COCO instances file")
    if not training:
        return wrap_dataset_for_transforms_v2(dataset, target_keys=("image_id",))

    def trained_on(a):  # MMDetection's rule: no crowds, known categories, >= 1x1 px boxes that overlap the image
        (x, y, w, h), image = a["bbox"], coco.imgs[a["image_id"]]
        return not a.get("iscrowd", 0) and a["category_id"] in coco.cats and min(w, h) >= 1 and \
            min(x + w, image["width"]) > max(x, 0) and min(y + h, image["height"]) > max(y, 0)
    coco.dataset["annotations"] = list(filter(trained_on, coco.dataset["annotations"]))
    coco.createIndex()
    dataset.ids = [i for i in dataset.ids if coco.imgToAnns[i]]
    if not dataset.ids:
        raise InputError(f"{ann_file}: no image has an annotation to train on")
    return wrap_dataset_for_transforms_v2(dataset, target_keys=("image_id", "boxes", "labels", *["masks"] * with_masks))


class SegmentationFolder(torch.utils.data.Dataset):
    """Images and label PNGs matched by file name, labels in ADE20K's convention: 0 unlabelled, 1..K the classes.
    They are read as 0..K-1, with IGNORE_INDEX for 0 and for 255, as MMSegmentation's reduce_zero_label does."""

    def __init__(self, image_dir, label_dir, transforms):
        stems = lambda folder, exts: {os.path.splitext(f)[0]: os.path.join(folder, f)  # noqa: E731
                                      for f in sorted(os.listdir(folder)) if f.lower().endswith(exts)}
        images, labels = stems(image_dir, (".jpg", ".jpeg", ".png")), stems(label_dir, (".png",))
        missing = [stem for stem in images if stem not in labels]
        if not images:
            raise InputError(f"no .jpg or .png images in {image_dir}")
        if missing:
            raise InputError(f"{len(missing)} image(s) in {image_dir} have no label PNG in {label_dir}, e.g. "
                             f"{missing[0]}.png")
        self.samples, self.transforms = [(images[stem], labels[stem]) for stem in images], transforms
        for image, label in self.samples:   # the files' headers only: before training starts
            sizes = ["x".join(map(str, Image.open(path).size)) for path in (label, image)]
            if sizes[0] != sizes[1]:
                raise InputError(f"label {label} is {sizes[0]} but its image {image} is {sizes[1]}; expected a label "
                                 f"PNG of its image's size")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_path, label_path = self.samples[index]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(train.load_image(image_path)))
        label = torch.from_numpy(np.array(Image.open(label_path), dtype=np.int64))
        label = torch.where((label == 0) | (label == 255), IGNORE_INDEX, label - 1)
        return self.transforms(image, tv_tensors.Mask(label))


def segmentation_dataset(s, root, split):
    """ADEChallengeData2016/{images,annotations}/{training,validation} (or the scenes' folders) with the transforms
    of MMSegmentation's: in training, the image resized into (4 x scale, scale) x U(0.5, 2), which sets the shorter
    side of an image less than 4 times as wide as high, a random crop padded with the ignore label, a random flip;
    in evaluation, the whole image (`segment` resizes it)."""
    ade20k = dict(train="training", val="validation")[split]
    folders = (f"{root}/images/{ade20k}", f"{root}/annotations/{ade20k}") if s.data else (
        f"{root}/{split}2017", f"{root}/semantic/{split}2017")
    for folder in folders:
        if not os.path.isdir(folder):
            raise InputError(f"{folder} not found; expected the ADEChallengeData2016 layout: "
                             "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png")
    transforms = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    if split == "train":
        crop = v2.RandomCrop(s.crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})
        transforms = v2.Compose([v2.RandomResize(s.scale // 2, 2 * s.scale + 1), crop, v2.RandomHorizontalFlip(),
                                 transforms])
    return SegmentationFolder(*folders, transforms)


def synthetic_scene(rng, image_id, first_ann_id):
    """1-4 shapes apart from each other on a noisy background: the image, the semantic labels (ADE20K's convention:
    1 = background, 2.. = the shapes) and the COCO annotations with exact RLE masks."""
    width, height = int(rng.integers(160, 225)), int(rng.integers(160, 225))   # odd sizes too
    pixels = rng.integers(90, 170, size=3) + rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    semantic, annotations, placed = np.ones((height, width), np.uint8), [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            w = int(rng.integers(28, 73))
            h = int(w * rng.uniform(0.8, 1.25))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if all(x + w + 4 < a or a + c + 4 < x or y + h + 4 < b or b + d + 4 < y for a, b, c, d in placed):
                break
        else:
            continue
        placed.append((x, y, w, h))
        category = int(rng.integers(len(SCENE_CLASSES)))
        color = tuple(int(c) for c in np.clip(np.array(SCENE_COLORS[category]) + rng.integers(-30, 31, 3), 0, 255))
        mask_image = Image.new("L", (width, height), 0)
        draw, x1, y1 = ImageDraw.Draw(mask_image), x + w - 1, y + h - 1
        shapes = dict(square=(draw.rectangle, (x, y, x1, y1)), circle=(draw.ellipse, (x, y, x1, y1)),
                      triangle=(draw.polygon, [((x + x1) / 2, y), (x1, y1), (x, y1)]))
        draw_shape, outline = shapes[SCENE_CLASSES[category]]
        draw_shape(outline, fill=1)
        mask = np.array(mask_image, dtype=np.uint8)
        image.paste(color, mask=mask_image.point(lambda v: 255 * v))
        semantic[mask > 0] = category + 2
        rle = mask_util.encode(np.asfortranarray(mask))
        annotations.append(dict(id=first_ann_id + len(annotations), image_id=image_id, category_id=category + 1,
                                bbox=[float(v) for v in mask_util.toBbox(rle)], area=float(mask.sum()),
                                segmentation=dict(rle, counts=rle["counts"].decode("ascii")), iscrowd=0))
    return image, semantic, annotations


def make_scenes_dataset(root, splits=SCENE_SPLITS, seed=0):
    """The scenes in COCO 2017's layout (<split>2017/*.png, annotations/instances_<split>2017.json), with semantic
    label PNGs in semantic/<split>2017/."""
    rng, image_id, ann_id = np.random.default_rng(seed), 1, 1
    categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(SCENE_CLASSES)]
    for split, count in splits.items():
        for folder in (f"{split}2017", f"semantic/{split}2017", "annotations"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            image, semantic, anns = synthetic_scene(rng, image_id, ann_id)
            name = f"{image_id:06d}.png"
            image.save(os.path.join(root, f"{split}2017", name))
            Image.fromarray(semantic).save(os.path.join(root, f"semantic/{split}2017", name))
            images.append(dict(id=image_id, file_name=name, width=image.width, height=image.height))
            annotations += anns
            image_id, ann_id = image_id + 1, ann_id + len(anns)
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


def datasets(s):
    """(training set, validation set, class names) of a run: --data, or the synthetic scenes (generated once)."""
    root = s.data or train.builtin_dataset(s.cache_dir, SCENES_VERSION, make_scenes_dataset)
    if TASKS[s.task].segmentation:
        names = [f"class{i}" for i in range(1, 151)] if s.data else ["background", *SCENE_CLASSES]
        return segmentation_dataset(s, root, "train"), segmentation_dataset(s, root, "val"), names
    train_set = coco_dataset(root, "train", True, s.task == "maskrcnn")
    return train_set, coco_dataset(root, "val", False, False), {i: c["name"] for i, c in train_set.coco.cats.items()}


# --- Evaluation as the toolboxes run it: one image per forward, every image once over the ranks ----

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def label_categories(task, classes):  # label -> category id; Mask R-CNN's label 0 is the background (-1 here)
    return torch.tensor([-1] * (task == "maskrcnn") + sorted(classes))


def read_checkpoint(path):
    """glnet.read_checkpoint; a detector of the heads that had a row per id (COCO: 91) gets its categories' rows."""
    checkpoint = glnet.read_checkpoint(path)
    task, classes, old = checkpoint.get("task"), checkpoint.get("classes"), checkpoint.get("num_classes")
    if task in ("maskrcnn", "retinanet") and old == max(classes) + 1 != len(label_categories(task, classes)):
        rows = label_categories(task, classes).clamp(min=0)   # the categories' ids; Mask R-CNN's background: 0
        # the class layers' rows per class (4 box deltas), RetinaNet's for every anchor in turn
        layers = {"roi_heads.box_predictor.cls_score": 1, "roi_heads.box_predictor.bbox_pred": 4,
                  "roi_heads.mask_predictor.mask_fcn_logits": 1, "head.classification_head.cls_logits": 1}
        for state_dict in (checkpoint["model"], checkpoint.get("model_ema") or {}):
            for name, value in state_dict.items():   # the EMA's names begin with `module.`
                if per_class := layers.get(name.removeprefix("module.").rsplit(".", 1)[0]):
                    state_dict[name] = value.unflatten(0, (-1, old, per_class))[:, rows].flatten(0, 2)
        checkpoint["num_classes"] = len(rows)
    return checkpoint


def detections_to_coco(output, image_id, categories):
    """One image's detections as COCO results, as torchvision's CocoEvaluator prepares them: box records with
    full-precision XYWH boxes; with masks, records of RLE masks (> 0.5) without a box, so that pycocotools takes
    their size range from the mask's area. Labels become category ids: `categories`[label]."""
    common = [dict(image_id=int(image_id), category_id=category, score=score)
              for category, score in zip(categories[output["labels"].cpu()].tolist(), output["scores"].tolist())]
    boxes = box_convert(output["boxes"].float().cpu(), "xyxy", "xywh").tolist()
    results = {"bbox": [dict(record, bbox=box) for record, box in zip(common, boxes)]}
    if "masks" in output:
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if common else []
        results["segm"] = [dict(record, segmentation=dict(rle, counts=rle["counts"].decode("ascii")))
                           for record, rle in zip(common, rles)]
    return results


@torch.no_grad()
def evaluate_detection(model, dataset, device, categories, rank=0, world_size=1, workers=0):
    """COCO box AP (and mask AP) by pycocotools: each image alone in its forward, as MMDetection tests (a batch
    would pad it with zeros that GLNet's slots and attention see); rank 0 scores all, every rank returns that."""
    model.eval()
    results = {}
    for image, target in train.eval_loader(dataset, 1, workers, rank, world_size):
        output = model([image[0].to(device)])[0]
        for iou_type, records in detections_to_coco(output, target["image_id"], categories).items():
            results.setdefault(iou_type, []).extend(records)
    gathered, metrics = [results] * world_size, [{}]
    if world_size > 1:
        dist.all_gather_object(gathered, results)
    for iou_type in sorted({key for part in gathered for key in part}) if rank == 0 else []:
        records, stats = [r for part in gathered for r in part.get(iou_type, [])], [0.0] * len(COCO_METRICS)
        if records:   # loadRes refuses none
            evaluation = COCOeval(dataset.coco, dataset.coco.loadRes(records), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            stats = evaluation.stats
        metrics[0].update({f"{iou_type}_{name}": float(value) for name, value in zip(COCO_METRICS, stats)})
    if world_size > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


def segment(model, image, scale):
    """MMSegmentation's single-scale test: logits at the image's size from a forward on the image fit into
    (4 x scale, scale), keeping its aspect; sides rounded half up, as mmcv's rescale_size."""
    h, w = image.shape[-2:]
    ratio = min(scale / min(h, w), 4 * scale / max(h, w))
    return resize(model(resize(image, size=(int(h * ratio + 0.5), int(w * ratio + 0.5)))).float(), size=(h, w))


@torch.no_grad()
def evaluate_segmentation(model, dataset, device, num_classes, scale, rank=0, world_size=1, workers=0):
    """mIoU (over the classes in the ground truth or the prediction) and pixel accuracy as MMSegmentation's, on
    every rank from the confusion matrix (rows = ground truth, ignored pixels left out) summed over the ranks."""
    model.eval()
    confusion = torch.zeros(num_classes ** 2, dtype=torch.long, device=device)
    for image, label in train.eval_loader(dataset, 1, workers, rank, world_size):
        label, prediction = label.to(device), segment(model, image.to(device), scale).argmax(1)
        valid = label != IGNORE_INDEX
        confusion += torch.bincount(label[valid] * num_classes + prediction[valid], minlength=num_classes ** 2)
    if world_size > 1:
        dist.all_reduce(confusion)
    confusion = confusion.view(num_classes, num_classes).double().cpu()
    intersection = confusion.diag()
    iou = intersection / (confusion.sum(0) + confusion.sum(1) - intersection)   # NaN: a class absent from both
    return dict(mIoU=float(iou.nanmean()), aAcc=float(intersection.sum() / confusion.sum()),
                IoU=[round(float(v), 4) for v in iou])


# --- Training: what the dense tasks plug into train.Trainer ---------------------------------------

def segmentation_loss(model, batch, device):
    """Per-pixel cross-entropy; in training, UperNet adds AUXILIARY_WEIGHT x its auxiliary head's."""
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    outputs = model(images)
    logits, *auxiliary = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = functools.partial(F.cross_entropy, target=labels, ignore_index=IGNORE_INDEX)
    return loss(logits.float()) + sum(AUXILIARY_WEIGHT * loss(a.float()) for a in auxiliary)


def detection_loss(model, batch, device, categories):
    """The sum of torchvision's detection losses (classification, boxes, RPN, masks), category ids made labels."""
    images, targets = batch
    targets = [{**{k: v.to(device, non_blocking=True) for k, v in t.items() if k != "image_id"},
                "labels": torch.searchsorted(categories, t["labels"]).to(device)} for t in targets]
    return sum(model([image.to(device, non_blocking=True) for image in images], targets).values())


def collate_detection(batch):
    return tuple(zip(*batch))


def dense_task(s, rank, world_size, device):
    """The data, the loss of a batch and the evaluation of one dense task."""
    train_set, val_set, classes = datasets(s)
    ranks = dict(rank=rank, world_size=world_size, workers=s.workers)
    if TASKS[s.task].segmentation:
        num_classes, collate = len(classes), None
        loss = functools.partial(segmentation_loss, device=device)
        evaluate = functools.partial(evaluate_segmentation, dataset=val_set, device=device, num_classes=num_classes,
                                     scale=s.scale, **ranks)
    else:
        categories = label_categories(s.task, classes)   # so that the heads have no output for an absent id
        num_classes, collate = len(categories), collate_detection
        loss = functools.partial(detection_loss, device=device, categories=categories)
        evaluate = functools.partial(evaluate_detection, dataset=val_set, device=device, categories=categories, **ranks)
    return train.Task(s.task, train_set, loss, evaluate, TASKS[s.task].metric, TASKS[s.task].reference_batch,
                      num_classes, classes, collate)


def make_trainer(s, rank, world_size, device):
    """The Trainer of one run, its model started from --pretrained."""
    torch.manual_seed(s.seed + rank)   # each rank its own streams (drop path, augmentation)
    task = dense_task(s, rank, world_size, device)
    model = build_model(dataclasses.asdict(s), task.num_classes, load_pretrained=True)
    if world_size > 1 and device.type == "cuda":   # the BatchNorms left see a few crops per GPU
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return train.Trainer(s, model, task, rank, world_size, device)


# --- --predict and --report -----------------------------------------------------------------------

@torch.no_grad()
def predict(image_path, checkpoint_path, output_path=None, output_dir=OUTPUT_DIR, score_threshold=0.5):
    """Draw the detections (boxes, classes, scores, masks) or the segmentation of one image into a PNG (by default
    output_dir/<image name>_<task>.png)."""
    image = v2.functional.pil_to_tensor(train.load_image(image_path))
    model, checkpoint = train.load_trained(checkpoint_path, build_model, read_checkpoint)
    names, x = checkpoint["classes"], image.float() / 255
    if TASKS[checkpoint["task"]].segmentation:
        labels = segment(model, x[None], checkpoint["args"]["scale"])[0].argmax(0)
        present = labels.unique()
        drawn = draw_segmentation_masks(image, labels == present[:, None, None], alpha=0.6)
        found = "classes " + ", ".join(names[c] for c in present.tolist())
    else:
        output, categories = model([x])[0], label_categories(checkpoint["task"], names)
        keep = output["scores"] >= score_threshold
        captions = [f"{names[c]} {score:.2f}"
                    for c, score in zip(categories[output["labels"][keep]].tolist(), output["scores"][keep].tolist())]
        masks = output["masks"][keep][:, 0] > 0.5 if "masks" in output else []
        drawn = draw_segmentation_masks(image, masks, alpha=0.5) if len(masks) else image
        drawn = draw_bounding_boxes(drawn, output["boxes"][keep], captions, colors="yellow", width=2)
        found = f"{len(captions)} detection(s) with score >= {score_threshold}: {', '.join(captions)}"
    stem = os.path.splitext(os.path.basename(image_path))[0]
    output_path = output_path or os.path.join(output_dir, f"{stem}_{checkpoint['task']}.png")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    v2.functional.to_pil_image(drawn).save(output_path)
    print(f"{image_path}: {found}; drawn into {output_path}")
    return output_path


class CountedForward(nn.Module):
    """What MMDetection's and MMSegmentation's get_flops run (forward_dummy) on one image: a segmentation model in
    eval mode (UperNet without its auxiliary head); a detector's backbone, FPN and dense heads, and Mask R-CNN's
    box head on 1000 RoIs and mask head on 100, fed zeros since neither counter counts RoIAlign."""

    def __init__(self, task, model):
        super().__init__()
        self.task, self.model = task, model.eval()

    def forward(self, image):
        if TASKS[self.task].segmentation:
            return self.model(image)
        levels = list(self.model.backbone(image).values())
        if self.task == "retinanet":
            return self.model.head.classification_head(levels), self.model.head.regression_head(levels)
        roi, channels = self.model.roi_heads, levels[0].shape[1]
        boxes = roi.box_predictor(roi.box_head(levels[0].new_zeros(1000, channels, *roi.box_roi_pool.output_size)))
        masks = roi.mask_predictor(roi.mask_head(levels[0].new_zeros(100, channels, *roi.mask_roi_pool.output_size)))
        return self.model.rpn.head(levels), boxes, masks


MMCV_COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.ReLU,
                nn.AdaptiveAvgPool2d)


@torch.no_grad()
def mmcv_flops(model, image):
    """Multiply-accumulates as MMCV's counter (the paper's get_flops tools) counts them: hooks on layers of exact
    known types, so what functions compute, attention among it, goes uncounted. What it saw of GLNet follows the
    released code's classes: attention is nn.MultiheadAttention (projections included), the blocks' norms a
    LayerNorm subclass but for the first of a full-attention block, the FFN's depth-wise conv a Conv2d subclass."""
    unseen, total = set(), 0
    for m in model.modules():
        if isinstance(m, glnet.MHSA):
            unseen.update(m.modules())
        elif isinstance(m, glnet.GLMixBlock):
            unseen.update((m.norm1, m.norm2))
        elif isinstance(m, glnet.MHSABlock):
            unseen.add(m.norm2)
        elif isinstance(m, glnet.ConvFFN):
            unseen.add(m[1])
        elif isinstance(m, UperNet):   # the paper's configuration gives its heads SyncBatchNorm, not a counted type
            unseen.update(n for name, head in m.named_children() if name != "backbone" for n in head.modules()
                          if isinstance(n, nn.BatchNorm2d))

    def count(layer, inputs, y):
        nonlocal total
        x = inputs[0]
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):   # per output (input, transposed) position, + bias
            grid = x if isinstance(layer, nn.ConvTranspose2d) else y
            per_position = layer.in_channels * layer.out_channels // layer.groups * math.prod(layer.kernel_size)
            total += grid.numel() // grid.shape[1] * per_position + (y.numel() if layer.bias is not None else 0)
        elif isinstance(layer, nn.Linear):
            total += x.numel() * y.shape[-1]
        elif isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            total += x.numel() * (2 if getattr(layer, "affine", getattr(layer, "elementwise_affine", False)) else 1)
        else:
            total += (y if isinstance(layer, nn.ReLU) else x).numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if m not in unseen and (type(m) in MMCV_COUNTED or isinstance(m, nn.Conv2d))]
    try:
        model(image)
    finally:
        for hook in hooks:
            hook.remove()
    return total


def report(tasks, backbones):
    """Parameters and GFLOPs of each dense model beside the paper's: fvcore's count of every operation, and
    MMCV's, which gives the paper's numbers and so shows that they leave GLNet's attention out."""
    print(f"{'model':<11}{'backbone':<12}{'params (M)':>11}{'paper':>7}{'GFLOPs all':>12}{'GFLOPs MMCV':>13}"
          f"{'paper':>7}  input")
    rows = []
    for task in tasks:
        for backbone in backbones:
            size = TASKS[task].report_size
            settings = {**dataclasses.asdict(DenseSettings()), **TASKS[task].paper, "task": task, "model": backbone}
            counted = lambda: CountedForward(task, build_model(settings, TASKS[task].report_classes))  # noqa: E731
            with torch.device("meta"):   # shapes only
                params, mmcv = glnet.count_params(counted()), mmcv_flops(counted(), torch.zeros(1, 3, *size))
            with torch.no_grad():
                everything = glnet.flop_analysis(counted(), (torch.zeros(1, 3, *size),)).total()
            paper = [f"{v:>7g}" for v in TASKS[task].paper_costs.get(backbone, ())] or [f"{'-':>7}"] * 2
            print(f"{task:<11}{backbone:<12}{params / 1e6:>11.2f}{paper[0]}{everything / 1e9:>12.1f}"
                  f"{mmcv / 1e9:>13.1f}{paper[1]}  {size[0]}x{size[1]}", flush=True)
            rows.append((task, backbone, params, everything, mmcv))
    print("GFLOPs: multiply-accumulates of one image. 'all': fvcore, every operation. 'MMCV': what the paper's\n"
          "tools count, layers but not GLNet's attention, clustering and dispatching. Mask R-CNN: box head on 1000\n"
          "RoIs, mask head on 100 (MMDetection's). Segmentation: without UperNet's auxiliary head (training only).")
    return rows


# --- Command line: train.py's flags, and the dense tasks' own -------------------------------------

def describe_default(field):
    """A flag's default in --help: the recipes' values, with --data and on the scenes."""
    values = [f"{task}{where} {recipe[field.name]}" for task, t in TASKS.items()
              for where, recipe in (("", t.paper), (" scenes", t.synthetic)) if field.name in recipe]
    special = dict(task=f"{' '.join(DEFAULT_TASKS)}; all with --report; the checkpoint's with --eval, --predict",
                   output_dir=f"{OUTPUT_DIR}, a folder per task", data="the synthetic scenes")
    default = special.get(field.name, field.default)
    if len(values) < 2 * len(TASKS):
        values.append(f"else {default}" if values else str(default))
    return ", ".join(values)


def parse_args(argv=None):
    """(every flag, the settings flags given on the command line, the --task list or None)."""
    parser = train.Parser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    train.add_settings_flags(parser, DenseSettings, describe_default)
    parser.add_argument("--eval", action="store_true", help="evaluate --checkpoint on its validation set, then exit")
    parser.add_argument("--checkpoint", help="with --eval or --predict (default: <output-dir>/<task>/best.pth)")
    parser.add_argument("--predict", metavar="IMAGE", help="draw what --checkpoint finds in IMAGE into a PNG")
    parser.add_argument("--predict-output", help="default: <output-dir>/<image name>_<task>.png")
    parser.add_argument("--score-threshold", type=train.in_range(0, 1), default=0.5, help="--predict: what is drawn")
    parser.add_argument("--report", action="store_true", help="parameters and GFLOPs of the dense models (--task) "
                        "with glnet_4g and glnet_9g (or --model) against the paper's Tables 4 and 5, then exit")
    args = parser.parse_args(argv)
    given = train.field_values(DenseSettings, vars(args))
    tasks = given.pop("task", None)
    if "data" in given and tasks is None and "checkpoint" not in args and "predict" not in args:
        parser.error("--task is required with --data (maskrcnn or retinanet on COCO, semfpn or upernet on ADE20K)")
    return args, given, tasks


def make_settings(task, given, trained=None):
    """The one place where a recipe becomes a run's settings: the task's recipe (the paper's with --data, the
    synthetic one without), then those the checkpoint was trained with (--eval), then the command line's."""
    values = {**(trained or {}), **given}
    recipe = TASKS[task].paper if values.get("data") else TASKS[task].synthetic
    if values.get("schedule") == "3x" and not TASKS[task].segmentation:
        recipe = recipe | SCHEDULE_3X
    values = {**recipe, **values, "task": task, "output_dir": os.path.join(given.get("output_dir", OUTPUT_DIR), task)}
    if values.get("data"):
        values["data"] = os.path.abspath(values["data"])
    return DenseSettings(**train.field_values(DenseSettings, values))


def main(argv=None):
    """Train each --task, or --eval, --predict, --report; returns {task: metrics}, the PNG's path or the report."""
    args, given, tasks = parse_args(argv)
    if "report" in args:
        return report(tasks or list(TASKS), [given["model"]] if "model" in given else ["glnet_4g", "glnet_9g"])
    output_dir = given.get("output_dir", OUTPUT_DIR)
    checkpoint = getattr(args, "checkpoint", os.path.join(output_dir, (tasks or DEFAULT_TASKS)[0], "best.pth"))
    if "predict" in args:
        return predict(args.predict, checkpoint, vars(args).get("predict_output"), output_dir, args.score_threshold)
    with train.distributed() as (rank, world_size, device):
        if "eval" in args:   # on the validation set the checkpoint was trained with, or on --data
            model, trained = train.load_trained(checkpoint, build_model, read_checkpoint, **given)
            task = trained["task"]
            if tasks and tasks[0] != task:
                raise InputError(f"{checkpoint} is a {task} checkpoint, not {tasks[0]}: pass --task {task}")
            s = make_settings(task, given, trained["args"])
            with train.autocast(device, s.amp):
                metrics = dense_task(s, rank, world_size, device).evaluate(model.to(device))
            train.log(f"{checkpoint}: {train.format_metrics(metrics)}")
            return {task: metrics}
        results = {}
        for task in tasks or DEFAULT_TASKS:
            s = make_settings(task, given)
            train.log(f"{task}: " + ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(s).items()))
            trainer = make_trainer(s, rank, world_size, device)
            trainer.resume()
            results[task] = {k[4:]: v for k, v in trainer.fit().items() if k.startswith("val_")}
            train.log(f"{task} result: {train.format_metrics(results[task])}; checkpoints in {s.output_dir}")
        return results


if __name__ == "__main__":
    train.run(main)
