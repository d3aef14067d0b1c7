"""GLNet as a dense-prediction backbone: Mask R-CNN and RetinaNet on COCO, Semantic FPN and UperNet on ADE20K.

The paper (Sec. 4.2-4.3, Appendix B) trains these with MMDetection / MMSegmentation; the released
code has no detection or segmentation code. Here the detectors are torchvision's own
(torchvision.models.detection.MaskRCNN / RetinaNet) on a GLNet + FeaturePyramidNetwork backbone,
Semantic FPN and UperNet are written out below, and COCO AP comes from pycocotools. Training is
train.py's loop (train.Trainer): this file brings only the models, the data, the loss of a batch
and the evaluation, so checkpoints, exact resume, progress lines and the flags are the same as
there. `--report` counts the parameters and FLOPs of the paper's dense models.

    python detect_seg.py                                   # synthetic scenes, CPU, a few minutes
    python detect_seg.py --predict scene.png               # draw what the trained Mask R-CNN finds
    torchrun --nproc_per_node 8 detect_seg.py --task maskrcnn --data /data/coco \\
        --model glnet_4g --pretrained glnet_4g.pth --output-dir runs/maskrcnn_4g_1x
    torchrun --nproc_per_node 8 detect_seg.py --task semfpn --data /data/ADEChallengeData2016 \\
        --model glnet_4g --pretrained glnet_4g.pth --output-dir runs/semfpn_4g
    python detect_seg.py --report                          # params and FLOPs of the paper's dense models

--batch-size is per process, as in train.py: the defaults (2 images per GPU for COCO and UperNet,
4 for Semantic FPN) reach the paper's total batch of 16 / 16 / 32 on 8 GPUs; on fewer GPUs,
--accum-steps reaches it. The learning rate is given for the paper's total batch and scales
linearly with the actual one.

Without --data, a synthetic scene dataset (coloured squares, circles and triangles with instance
masks, in COCO format, plus semantic label PNGs in ADE20K's convention) is generated once into a
cache folder, so the same CocoDetection / folder-of-PNGs code paths run out of the box.

BatchNorm: GLNet's only BatchNorms are in its stem and downsampling layers. Starting from an
ImageNet checkpoint, the detectors freeze them (torchvision.ops.FrozenBatchNorm2d: the ImageNet
statistics and affine kept), as torchvision's detection references do, because 2 images per GPU
give useless batch statistics; from scratch (the synthetic runs) there are no statistics to keep,
so they train. The segmentation models train on 512x512 crops, so their BatchNorms (GLNet's and
UperNet's) keep training (SyncBatchNorm across GPUs).
"""

import argparse
import functools
import json
import math
import os
import resource
import warnings
from collections import OrderedDict

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

TASKS = ("maskrcnn", "retinanet", "semfpn", "upernet")
SEGMENTATION_TASKS = ("semfpn", "upernet")
FPN_CHANNELS = 256
IGNORE_INDEX = 255  # semantic label of unlabelled pixels (ADE20K's 0 after the shift)
MULTISCALE_SIZES = tuple(range(480, 801, 32))  # shorter sides of 3x multi-scale training
PPM_SCALES = (1, 2, 3, 6)  # UperNet's pyramid pooling module: the last stage pooled to 1x1 ... 6x6
AUXILIARY_WEIGHT = 0.4  # UperNet's auxiliary FCN head on stage 3: its loss weight (training only)
MAIN_METRIC = {"maskrcnn": "bbox_AP", "retinanet": "bbox_AP", "semfpn": "mIoU", "upernet": "mIoU"}
# The paper's total batch (Appendix B; UperNet: Swin's schedule): --lr is given for it and scales
# linearly with the actual one.
REFERENCE_BATCH = {"maskrcnn": 16, "retinanet": 16, "semfpn": 32, "upernet": 16}

# The paper's recipes (Appendix B); every entry is a command-line flag that overrides it. Batch sizes
# are per process: 8 GPUs reach the paper's totals (16 for COCO and UperNet, 32 for Semantic FPN).
# UperNet follows Swin's ADE20K schedule, as Sec. 4.3 says: AdamW lr 6e-5 at batch 16, weight decay
# 0.01, 1500 linear warm-up iterations from 1e-6 x the lr, then poly (power 1) decay to 0 at 160k
# iterations, drop path 0.3, evaluation every 16k iterations (13 epochs of ADE20K's 20210 images).
COMMON = dict(min_lr=0.0, warmup_epochs=None, warmup_factor=1e-3, clip_grad=0.0, ema_decay=0.0, drop_path=0.0,
              workers=2, threads=0, print_freq=20, lr_steps=None, min_size=None, max_size=None, epochs=None,
              iters=None, crop_size=None, scale=None, multiscale=False, rois_per_image=512)
RECIPES = {
    "maskrcnn": dict(model="glnet_4g", epochs=12, lr_schedule="step", lr_steps=(8, 11), batch_size=2, lr=1e-4,
                     weight_decay=0.05, warmup_iters=500, min_size=800, max_size=1333, fpn_channels=256,
                     rois_per_image=512, eval_interval=1),
    "retinanet": dict(model="glnet_4g", epochs=12, lr_schedule="step", lr_steps=(8, 11), batch_size=2, lr=1e-4,
                      weight_decay=1e-3, warmup_iters=500, min_size=800, max_size=1333, fpn_channels=256,
                      eval_interval=1),
    "semfpn": dict(model="glnet_4g", iters=80000, lr_schedule="cosine", batch_size=4, lr=2e-4, weight_decay=1e-4,
                   warmup_iters=1000, crop_size=512, scale=512, fpn_channels=256, eval_interval=10),
    "upernet": dict(model="glnet_4g", iters=160000, lr_schedule="poly", batch_size=2, lr=6e-5, weight_decay=0.01,
                    warmup_iters=1500, warmup_factor=1e-6, drop_path=0.3, crop_size=512, scale=512, fpn_channels=512,
                    eval_interval=13),
}
# The 3x schedule: 36 epochs, lr steps at 27 and 33, multi-scale training.
SCHEDULE_3X = dict(epochs=36, lr_steps=(27, 33), multiscale=True)
# Out of the box: glnet_mini from scratch on small synthetic scenes, sized for a CPU. Learning rates are
# per reference batch as above (3e-4 and 1e-3 at the default batches of 4 and 8 on one process).
# UperNet's width (--fpn-channels) is 512 in the paper, 64 here.
SYNTHETIC_RECIPES = {
    "maskrcnn": dict(model="glnet_mini", epochs=3, lr_schedule="step", lr_steps=(2,), batch_size=4, lr=1.2e-3,
                     weight_decay=0.05, warmup_iters=50, min_size=128, max_size=208, fpn_channels=64,
                     rois_per_image=64, eval_interval=100),
    "retinanet": dict(model="glnet_mini", epochs=3, lr_schedule="step", lr_steps=(2,), batch_size=4, lr=1.2e-3,
                      weight_decay=1e-3, warmup_iters=50, min_size=128, max_size=208, fpn_channels=64,
                      eval_interval=100),
    "semfpn": dict(model="glnet_mini", iters=150, lr_schedule="cosine", batch_size=8, lr=4e-3, weight_decay=1e-4,
                   warmup_iters=50, crop_size=128, scale=160, fpn_channels=64, eval_interval=100),
    "upernet": dict(model="glnet_mini", iters=150, lr_schedule="poly", batch_size=8, lr=2e-3, weight_decay=0.01,
                    warmup_iters=50, crop_size=128, scale=160, fpn_channels=64, eval_interval=100),
}

# The synthetic scenes: one class per shape, each drawn in its own colour family.
SCENE_CLASSES = ("square", "circle", "triangle")
SCENE_COLORS = ((220, 60, 50), (60, 190, 70), (60, 90, 220))
SCENE_SPLITS = {"train": 300, "val": 60}
SCENES_VERSION = "scenes-v1"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def freeze_batchnorm(module):
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its statistics and affine."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def create_backbone(name, pretrained=None, frozen_bn=False, drop_path_rate=0.0):
    """A GLNet without its classifier, from an ImageNet checkpoint (any format glnet.load_checkpoint
    takes, released ones included) or random. Only forward_features is used downstream."""
    model = glnet.create_model(name, num_classes=0, drop_path_rate=drop_path_rate, checkpoint=pretrained)
    model.norm = nn.Identity()  # the classifier's BatchNorm: unused by forward_features
    if frozen_bn:
        freeze_batchnorm(model)
    return model


class GLNetFPN(nn.Module):
    """GLNet stage outputs -> torchvision's FeaturePyramidNetwork. `levels` picks the stages
    (0-3 = strides 4-32); `extra_blocks` adds P6 (max-pool, Mask R-CNN) or P6-P7 (RetinaNet).
    `out_channels` is what torchvision's detectors read."""

    def __init__(self, body, levels=(0, 1, 2, 3), extra_blocks=None, out_channels=FPN_CHANNELS):
        super().__init__()
        self.body = body
        self.levels = levels
        self.fpn = FeaturePyramidNetwork([body.stage_channels[i] for i in levels], out_channels, extra_blocks)
        self.out_channels = out_channels

    def forward(self, x):
        features = self.body.forward_features(x)
        return self.fpn(OrderedDict((str(i), features[level]) for i, level in enumerate(self.levels)))


def create_detector(task, backbone, num_classes, pretrained=None, min_size=800, max_size=1333, fpn_channels=FPN_CHANNELS,
                    rois_per_image=512, drop_path_rate=0.0):
    """Mask R-CNN on P2-P6 or RetinaNet on P3-P7, torchvision's heads, anchors and losses. RetinaNet's
    P6 is a strided conv on the last stage C5, not on P5, and P7 one on P6, as in MMDetection's
    RetinaNet that the paper used; its heads have no GroupNorm, as there. The mask head is as wide
    as the FPN (256 in the paper, as MMDetection's).
    Takes a list of (3, H, W) images in [0, 1]; it resizes them (shorter side `min_size`, a tuple
    for multi-scale training, longer side at most `max_size`) and normalises them."""
    body = create_backbone(backbone, pretrained, frozen_bn=pretrained is not None, drop_path_rate=drop_path_rate)
    common = dict(min_size=min_size, max_size=max_size, image_mean=train.MEAN, image_std=train.STD)
    if task == "maskrcnn":
        return MaskRCNN(GLNetFPN(body, (0, 1, 2, 3), LastLevelMaxPool(), fpn_channels), None,
                        box_predictor=FastRCNNPredictor(1024, num_classes),  # torchvision's box head width
                        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, dilation=1),
                        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes),
                        box_batch_size_per_image=rois_per_image, **common)
    if task == "retinanet":
        p6_p7 = LastLevelP6P7(body.stage_channels[3], fpn_channels)
        p6_p7.use_P5 = False  # torchvision takes P5 when C5 is as wide as the FPN: always C5 here
        return RetinaNet(GLNetFPN(body, (1, 2, 3), p6_p7, fpn_channels), num_classes, **common)
    raise ValueError(f"unknown detection task {task!r}; expected 'maskrcnn' or 'retinanet'")


def normalize(images):
    """(B, 3, H, W) images in [0, 1] -> normalised with the ImageNet statistics GLNet was trained on."""
    return v2.functional.normalize(images, train.MEAN, train.STD)


resize = functools.partial(F.interpolate, mode="bilinear", align_corners=False)


def scale_head(in_channels, channels, stride_log2):
    """Semantic FPN's per-level head: as many (Conv3x3-GN-ReLU, 2x upsample) steps as it takes to
    reach stride 4 (one conv without upsampling at stride 4)."""
    layers = []
    for i in range(max(stride_log2, 1)):
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                   nn.GroupNorm(math.gcd(32, channels), channels), nn.ReLU(inplace=True)]
        if stride_log2 > 0:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al. 2019): FPN on the four stages, per-level heads summed at 1/4
    resolution, dropout, a 1x1 classifier, bilinear upsampling to the input size.
    Takes (B, 3, H, W) images in [0, 1], returns (B, num_classes, H, W) logits."""

    def __init__(self, backbone, num_classes, pretrained=None, fpn_channels=FPN_CHANNELS, drop_path_rate=0.0):
        super().__init__()
        head_channels = fpn_channels // 2  # 128 with the paper's 256, as in MMSegmentation
        body = create_backbone(backbone, pretrained, drop_path_rate=drop_path_rate)
        self.backbone = GLNetFPN(body, out_channels=fpn_channels)
        self.scale_heads = nn.ModuleList(scale_head(fpn_channels, head_channels, i) for i in range(4))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(head_channels, num_classes, 1))

    def forward(self, images):
        features = list(self.backbone(normalize(images)).values())
        size = features[0].shape[-2:]  # stride 4; odd input sizes make 2x upsampling miss by one
        x = sum(resize(head(f), size=size) for head, f in zip(self.scale_heads, features))
        return resize(self.classifier(x), size=images.shape[-2:])


def conv_bn_relu(in_channels, out_channels, kernel_size):
    """MMCV's ConvModule with BatchNorm: a convolution without bias, BatchNorm, ReLU."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size)


class UperNet(nn.Module):
    """UperNet (Xiao et al. 2018) as MMSegmentation's UPerHead in Swin's ADE20K configuration, which
    the paper used: a pyramid pooling module on the last stage (PPM_SCALES), an FPN over the four
    stages (1x1 lateral convs, top-down sums, 3x3 convs), the four levels upsampled to stride 4,
    concatenated and fused by a 3x3 conv, dropout 0.1 and a 1x1 classifier; every conv but the
    classifier is conv_bn_relu, `channels` wide (512 in the paper). The auxiliary FCN head on stage 3
    (one 3x3 conv, channels / 2 wide, dropout, classifier) regularises training only.

    Takes (B, 3, H, W) images in [0, 1]; returns (B, num_classes, H, W) logits, and in training mode
    the pair (logits, auxiliary logits) of that shape."""

    def __init__(self, backbone, num_classes, pretrained=None, channels=512, drop_path_rate=0.0):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, drop_path_rate=drop_path_rate)
        c1, c2, c3, c4 = self.backbone.stage_channels
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(c4, channels, 1))
                                         for scale in PPM_SCALES)
        self.bottleneck = conv_bn_relu(c4 + len(PPM_SCALES) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in (c1, c2, c3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.auxiliary_head = nn.Sequential(conv_bn_relu(c3, channels // 2, 3), nn.Dropout2d(0.1),
                                            nn.Conv2d(channels // 2, num_classes, 1))

    def pyramid_pooling(self, c4):
        """PPM: C5 and its poolings to 1x1, 2x2, 3x3, 6x6 (each projected, upsampled back), fused."""
        pooled = [resize(ppm(c4), size=c4.shape[-2:]) for ppm in self.psp_modules]
        return self.bottleneck(torch.cat([c4, *pooled], dim=1))

    def forward(self, images):
        c1, c2, c3, c4 = self.backbone.forward_features(normalize(images))     # strides 4, 8, 16, 32
        laterals = [conv(c) for conv, c in zip(self.lateral_convs, (c1, c2, c3))] + [self.pyramid_pooling(c4)]
        for i in range(3, 0, -1):  # top-down: each level plus the upsampled level above it
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], size=laterals[i - 1].shape[-2:])
        levels = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = levels[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([levels[0], *(resize(x, size=size) for x in levels[1:])], dim=1))
        logits = resize(self.classifier(fused), size=images.shape[-2:])           # (B, K, H, W)
        if not self.training:
            return logits
        return logits, resize(self.auxiliary_head(c3), size=images.shape[-2:])


def create_model(task, backbone, num_classes, pretrained=None, **kwargs):
    """The model of one task: a GLNet backbone (from an ImageNet checkpoint when `pretrained`) with
    the task's neck and heads."""
    if task == "semfpn":
        kwargs = {k: v for k, v in kwargs.items() if k in ("fpn_channels", "drop_path_rate")}
        return SemanticFPN(backbone, num_classes, pretrained, **kwargs)
    if task == "upernet":
        return UperNet(backbone, num_classes, pretrained, channels=kwargs.get("fpn_channels", 512),
                       drop_path_rate=kwargs.get("drop_path_rate", 0.0))
    return create_detector(task, backbone, num_classes, pretrained, **kwargs)


# ---------------------------------------------------------------------------------------------
# COCO detection data
# ---------------------------------------------------------------------------------------------

def coco_paths(root, split):
    """COCO 2017's layout: <root>/<split>2017/ and <root>/annotations/instances_<split>2017.json."""
    image_dir = os.path.join(root, f"{split}2017")
    ann_file = os.path.join(root, "annotations", f"instances_{split}2017.json")
    layout = "expected the COCO 2017 layout: train2017/, val2017/ and annotations/instances_{train,val}2017.json"
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file} ({layout})")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"COCO image folder not found: {image_dir} ({layout})")
    return image_dir, ann_file


def load_coco(image_dir, ann_file, transforms):
    """torchvision's CocoDetection, with an error naming the file when the JSON is truncated or is
    not a COCO instances file."""
    try:
        dataset = CocoDetection(image_dir, ann_file, transforms=transforms)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{ann_file} is not valid JSON ({e}); expected a COCO instances file") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset.coco.dataset]
    if missing:
        raise ValueError(f"{ann_file} has no {', '.join(repr(k) for k in missing)} entry; expected a COCO instances "
                         f"file with 'images', 'annotations' and 'categories'")
    return dataset


def drop_degenerate_boxes(coco, ann_file):
    """Zero-width or zero-height boxes crash the detectors' losses: drop them, loudly."""
    annotations = coco.dataset["annotations"]
    bad = [a for a in annotations if a["bbox"][2] <= 0 or a["bbox"][3] <= 0]
    if bad:
        warnings.warn(f"{ann_file}: dropped {len(bad)} annotation(s) with a degenerate box (zero width "
                      f"or height), e.g. annotation {bad[0]['id']} of image {bad[0]['image_id']}")
        coco.dataset["annotations"] = [a for a in annotations if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        coco.createIndex()


def coco_dataset(root, split, train, with_masks):
    """torchvision's CocoDetection wrapped for transforms v2: targets with `boxes` (XYXY),
    `labels` (COCO category ids) and `masks`. For training, crowd regions are dropped and images
    left without annotations are skipped, as torchvision's detection reference does."""
    image_dir, ann_file = coco_paths(root, split)
    if train:
        transforms = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                                 v2.SanitizeBoundingBoxes()])
    else:
        transforms = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    dataset = load_coco(image_dir, ann_file, transforms)
    drop_degenerate_boxes(dataset.coco, ann_file)
    if train:
        crowd = [a for a in dataset.coco.dataset["annotations"] if a.get("iscrowd", 0)]
        if crowd:
            dataset.coco.dataset["annotations"] = [a for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd", 0)]
            dataset.coco.createIndex()
        dataset.ids = [i for i in dataset.ids if dataset.coco.imgToAnns[i]]
        if not dataset.ids:
            raise ValueError(f"{ann_file}: no image has a usable annotation")
    keys = ("image_id", "boxes", "labels", "masks") if with_masks else ("image_id", "boxes", "labels")
    return wrap_dataset_for_transforms_v2(dataset, target_keys=keys if train else ("image_id",))


def category_names(coco):
    """{category id: name}; the detectors predict the ids themselves (num_classes = max id + 1)."""
    return {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}


def detection_collate(batch):
    return tuple(zip(*batch))


# ---------------------------------------------------------------------------------------------
# Semantic segmentation data (ADE20K's layout and label convention)
# ---------------------------------------------------------------------------------------------

class SegmentationFolder(torch.utils.data.Dataset):
    """Images and label PNGs matched by file name stem. Labels follow ADE20K: 0 = unlabelled
    (ignored), 1..K = the classes; they come out as 0..K-1 with IGNORE_INDEX for unlabelled and for
    255 (other datasets' ignore value), as MMSegmentation's reduce_zero_label does."""

    def __init__(self, image_dir, label_dir, transforms):
        for path, what in ((image_dir, "image folder"), (label_dir, "label folder")):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"segmentation {what} not found: {path}")
        stems = lambda folder, exts: {os.path.splitext(f)[0]: os.path.join(folder, f)
                                      for f in os.listdir(folder) if f.lower().endswith(exts)}
        images = stems(image_dir, (".jpg", ".jpeg", ".png"))
        labels = stems(label_dir, (".png",))
        if not images:
            raise ValueError(f"no .jpg/.png images in {image_dir}")
        missing = sorted(set(images) - set(labels))
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {image_dir} have no label PNG in "
                                    f"{label_dir}, e.g. {missing[0]}.png")
        self.samples = [(images[s], labels[s]) for s in sorted(images)]
        for image_path, label_path in self.samples:  # image headers only: quick, and before training starts
            (width, height), label_size = Image.open(image_path).size, Image.open(label_path).size
            if label_size != (width, height):
                raise ValueError(f"label {label_path} is {label_size[0]}x{label_size[1]} but its image {image_path} "
                                 f"is {width}x{height}; expected a label PNG of its image's size")
        self.transforms = transforms

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_path, label_path = self.samples[index]
        image = v2.functional.pil_to_tensor(train.load_image(image_path))
        label = torch.from_numpy(np.array(Image.open(label_path), dtype=np.int64))
        label = tv_tensors.Mask(torch.where((label == 0) | (label == 255), IGNORE_INDEX, label - 1))
        image = tv_tensors.Image(image)
        return self.transforms(image, label)


def ade20k_folders(root, split):
    """ADEChallengeData2016/{images,annotations}/{training,validation}."""
    folder = {"train": "training", "val": "validation"}[split]
    for sub in ("images", "annotations"):
        if not os.path.isdir(os.path.join(root, sub, folder)):
            raise FileNotFoundError(f"{os.path.join(root, sub, folder)} not found; expected the ADEChallengeData2016 "
                                    f"layout: images/{{training,validation}}/*.jpg and "
                                    f"annotations/{{training,validation}}/*.png")
    return os.path.join(root, "images", folder), os.path.join(root, "annotations", folder)


def segmentation_dataset(image_dir, label_dir, train, crop_size, scale):
    """Training: MMSegmentation's resize of the image into (4*scale, scale) x [0.5, 2], a random
    crop (padded with the ignore label), a random flip. Evaluation: the full image (the model
    input is resized in `evaluate_segmentation`)."""
    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    if train:
        transforms = v2.Compose([
            v2.ScaleJitter((scale, 4 * scale), scale_range=(0.5, 2.0)),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(),
            to_float,
        ])
    else:
        transforms = to_float
    return SegmentationFolder(image_dir, label_dir, transforms)


# ---------------------------------------------------------------------------------------------
# The synthetic scenes (out of the box)
# ---------------------------------------------------------------------------------------------

def draw_shape(draw, shape, box, fill):
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def synthetic_scene(rng, image_id, first_ann_id):
    """One image of 1-4 non-overlapping shapes on a noisy background: the RGB image, the
    semantic label map (ADE20K convention: 1 = background, 2.. = shape classes) and the COCO
    annotations with exact RLE masks."""
    width, height = int(rng.integers(160, 225)), int(rng.integers(160, 225))  # odd sizes included
    background = rng.integers(90, 170, size=3)
    pixels = np.clip(background + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    semantic = np.ones((height, width), np.uint8)
    annotations, placed = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            size = int(rng.integers(28, 73))
            w, h = size, int(size * rng.uniform(0.8, 1.25))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if all(x + w + 4 < a or a + c + 4 < x or y + h + 4 < b or b + d + 4 < y for a, b, c, d in placed):
                break
        else:
            continue
        placed.append((x, y, w, h))
        category = int(rng.integers(len(SCENE_CLASSES)))
        color = tuple(int(c) for c in np.clip(np.array(SCENE_COLORS[category]) + rng.integers(-30, 31, 3), 0, 255))
        mask_image = Image.new("L", (width, height), 0)
        draw_shape(ImageDraw.Draw(mask_image), SCENE_CLASSES[category], (x, y, x + w - 1, y + h - 1), 1)
        mask = np.array(mask_image, dtype=np.uint8)
        image.paste(color, mask=mask_image.point(lambda v: 255 * v))
        semantic[mask > 0] = category + 2
        rle = mask_util.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(dict(id=first_ann_id + len(annotations), image_id=image_id, category_id=category + 1,
                                bbox=[float(v) for v in mask_util.toBbox(rle)], area=float(mask.sum()),
                                segmentation=rle, iscrowd=0))
    return image, semantic, annotations


def make_scenes_dataset(root, splits=SCENE_SPLITS, seed=0):
    """Write the scenes as COCO 2017 (<split>2017/*.png, annotations/instances_<split>2017.json)
    plus semantic label PNGs (semantic/<split>2017/*.png)."""
    rng = np.random.default_rng(seed)
    categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(SCENE_CLASSES)]
    image_id, ann_id = 1, 1
    for split, count in splits.items():
        for folder in (f"{split}2017", f"semantic/{split}2017", "annotations"):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            image, semantic, anns = synthetic_scene(rng, image_id, ann_id)
            file_name = f"{image_id:06d}.png"
            image.save(os.path.join(root, f"{split}2017", file_name))
            Image.fromarray(semantic).save(os.path.join(root, f"semantic/{split}2017", file_name))
            images.append(dict(id=image_id, file_name=file_name, width=image.width, height=image.height))
            annotations += anns
            image_id, ann_id = image_id + 1, ann_id + len(anns)
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


def scenes_dataset(cache_dir=train.DEFAULT_CACHE):
    """The built-in scenes: 300 training and 60 validation images, generated once (train.builtin_dataset)."""
    return train.builtin_dataset(cache_dir, SCENES_VERSION, make_scenes_dataset)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(output, image_id):
    """One image's torchvision detections as COCO results, prepared as torchvision's CocoEvaluator
    prepares them: {'bbox': records with full-precision XYWH boxes, 'segm' (with masks): records
    with RLE masks and no box, so that pycocotools takes their area (size range) from the mask}."""
    boxes = box_convert(output["boxes"].float().cpu(), "xyxy", "xywh").tolist()
    common = [dict(image_id=int(image_id), category_id=label, score=score)
              for label, score in zip(output["labels"].tolist(), output["scores"].tolist())]
    results = {"bbox": [dict(record, bbox=box) for record, box in zip(common, boxes)]}
    if "masks" in output:
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if common else []
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        results["segm"] = [dict(record, segmentation=rle) for record, rle in zip(common, rles)]
    return results


def coco_evaluate(coco_gt, results, iou_type):
    """pycocotools' COCOeval: {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} for 'bbox' or 'segm'."""
    if not results:
        return dict.fromkeys(COCO_METRICS, 0.0)
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return dict(zip(COCO_METRICS, (float(v) for v in coco_eval.stats[:6])))


@torch.no_grad()
def evaluate_detection(model, dataset, device, rank=0, world_size=1, workers=2):
    """COCO box AP (and mask AP for Mask R-CNN) of the validation set: each image once, on its
    rank, alone in its forward as MMDetection tests (a batch would pad it with zeros that GLNet's
    slots and global attention see); rank 0 scores them all and every rank returns the metrics."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=train.ShardSampler(dataset, rank, world_size),
                                         num_workers=workers, collate_fn=detection_collate)
    parts = []
    for images, targets in loader:
        parts.append(detections_to_coco(model([images[0].to(device)])[0], targets[0]["image_id"]))
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, parts)
        parts = [part for rank_parts in gathered for part in rank_parts]
    metrics = {}
    if rank == 0:
        for iou_type in ("bbox", "segm") if any("segm" in part for part in parts) else ("bbox",):
            results = [record for part in parts for record in part.get(iou_type, [])]
            scores = coco_evaluate(dataset._dataset.coco, results, iou_type)
            metrics.update({f"{iou_type}_{k}": v for k, v in scores.items()})
    if world_size > 1:
        shared = [metrics]
        dist.broadcast_object_list(shared, src=0)
        metrics = shared[0]
    return metrics


def confusion_matrix(prediction, label, num_classes):
    """(num_classes, num_classes) counts, rows = ground truth, ignoring IGNORE_INDEX pixels."""
    valid = label != IGNORE_INDEX
    index = label[valid] * num_classes + prediction[valid]
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion):
    """mIoU (mean over the classes that occur in the ground truth or the prediction) and pixel
    accuracy, as MMSegmentation reports them."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = intersection / union  # NaN for classes absent from both
    return dict(mIoU=float(iou.nanmean()), aAcc=float(intersection.sum() / confusion.sum()),
                IoU=[round(float(v), 4) for v in iou])


def resize_to_scale(image, scale):
    """MMSegmentation's single-scale test resize: fit into (4*scale, scale), keeping the aspect."""
    h, w = image.shape[-2:]
    ratio = min(scale / min(h, w), 4 * scale / max(h, w))
    return F.interpolate(image, size=(round(h * ratio), round(w * ratio)), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_segmentation(model, dataset, device, num_classes, scale, rank=0, world_size=1, workers=2):
    """Single-scale mIoU and pixel accuracy: predict at the test scale, upsample the logits to
    the original size, compare with the original labels. The confusion matrix is summed over the
    ranks, so every rank returns the metrics of the whole validation set."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=train.ShardSampler(dataset, rank, world_size),
                                         num_workers=workers)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for image, label in loader:
        image, label = image.to(device), label.to(device)
        logits = model(resize_to_scale(image, scale))
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), label, num_classes)
    if world_size > 1:
        dist.all_reduce(confusion)
    return segmentation_metrics(confusion.cpu())


# ---------------------------------------------------------------------------------------------
# The tasks: what detection and segmentation plug into train.Trainer
# ---------------------------------------------------------------------------------------------

def build_data(config):
    """(training set, validation set, class names, num_classes)."""
    if config.task in SEGMENTATION_TASKS:
        if config.synthetic:
            folders = {s: (os.path.join(config.data, f"{s}2017"), os.path.join(config.data, f"semantic/{s}2017"))
                       for s in ("train", "val")}
            names = ["background", *SCENE_CLASSES]
        else:
            folders = {s: ade20k_folders(config.data, s) for s in ("train", "val")}
            names = [f"class{i}" for i in range(1, 151)]
        train_set = segmentation_dataset(*folders["train"], True, config.crop_size, config.scale)
        val_set = segmentation_dataset(*folders["val"], False, config.crop_size, config.scale)
        return train_set, val_set, names, len(names)
    with_masks = config.task == "maskrcnn"
    train_set = coco_dataset(config.data, "train", True, with_masks)
    val_set = coco_dataset(config.data, "val", False, with_masks)
    names = category_names(train_set._dataset.coco)
    return train_set, val_set, names, max(names) + 1


def segmentation_loss(model, batch, device):
    """Per-pixel cross-entropy; with UperNet's auxiliary logits (training mode) plus AUXILIARY_WEIGHT x theirs."""
    images, labels = batch
    labels = labels.to(device, non_blocking=True)
    outputs = model(images.to(device, non_blocking=True))
    logits, auxiliary = outputs if isinstance(outputs, tuple) else (outputs, None)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    if auxiliary is not None:
        loss = loss + AUXILIARY_WEIGHT * F.cross_entropy(auxiliary.float(), labels, ignore_index=IGNORE_INDEX)
    return loss


def detection_loss(model, batch, device):
    """The sum of torchvision's detection losses (classification, box regression, RPN, masks)."""
    images, targets = batch
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items() if k != "image_id"} for t in targets]
    return sum(model(images, targets).values())


def build_task(config, rank, world_size, device):
    """The data, the loss of a batch and the evaluation of one dense task."""
    train_set, val_set, classes, num_classes = build_data(config)
    if config.task in SEGMENTATION_TASKS:
        loss, collate = segmentation_loss, None
        evaluate = functools.partial(evaluate_segmentation, dataset=val_set, device=device, num_classes=num_classes,
                                     scale=config.scale, rank=rank, world_size=world_size, workers=config.workers)
    else:
        loss, collate = detection_loss, detection_collate
        evaluate = functools.partial(evaluate_detection, dataset=val_set, device=device, rank=rank,
                                     world_size=world_size, workers=config.workers)
    return train.Task(config.task, train_set, functools.partial(loss, device=device), evaluate, MAIN_METRIC[config.task],
                      REFERENCE_BATCH[config.task], num_classes, classes, collate)


def model_from_config(config, num_classes, pretrained=None):
    """The model a run (or a checkpoint's args) describes."""
    min_size = MULTISCALE_SIZES if config["multiscale"] else config["min_size"]
    return create_model(config["task"], config["model"], num_classes, pretrained, min_size=min_size,
                        max_size=config["max_size"], fpn_channels=config["fpn_channels"],
                        rois_per_image=config["rois_per_image"], drop_path_rate=config["drop_path"])


def train_task(config, rank, world_size, device):
    """Train one model with one recipe; checkpoints, auto-resume, logs and evaluation in
    config.output_dir. Returns the final validation metrics."""
    train.seed_everything(config.seed, rank)
    task = build_task(config, rank, world_size, device)
    model = model_from_config(vars(config), task.num_classes, config.pretrained)
    if world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # only the segmentation models have BatchNorms left
    trainer = train.Trainer(config, model, task, rank, world_size, device)
    trainer.resume()
    record = trainer.fit()
    return {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}


def load_trained(checkpoint_path):
    """(model in eval mode, checkpoint) of a checkpoint written by train_task."""
    checkpoint = glnet.read_checkpoint(checkpoint_path)
    if checkpoint.get("task") not in TASKS:
        raise ValueError(f"{checkpoint_path} was not written by detect_seg.py (its task is {checkpoint.get('task')!r}, "
                         f"expected one of {', '.join(TASKS)})")
    model = model_from_config(checkpoint["args"], checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def evaluate_checkpoint(config, rank, world_size, device):
    """--eval: the validation metrics of a checkpoint of this task (default: its best.pth)."""
    path = config.checkpoint or os.path.join(config.output_dir, "best.pth")
    model, checkpoint = load_trained(path)
    if checkpoint["task"] != config.task:
        raise ValueError(f"{path} is a {checkpoint['task']} checkpoint, not {config.task}: pass --task {checkpoint['task']}")
    task = build_task(config, rank, world_size, device)
    with train.autocast(device, train.amp_settings(config.amp, device)[0]):
        return task.evaluate(model.to(device))


# ---------------------------------------------------------------------------------------------
# Prediction drawing and the memory/speed benchmark
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(image_path, checkpoint_path, output_path, score_threshold=0.5):
    """Draw the detections (boxes, labels, scores, masks) or the semantic segmentation of one
    image into a PNG."""
    if not os.path.isfile(image_path):
        raise FileNotFoundError(f"image not found: {image_path}")
    model, checkpoint = load_trained(checkpoint_path)
    class_names = checkpoint["classes"]
    image = v2.functional.pil_to_tensor(train.load_image(image_path))
    x = image.float() / 255
    if checkpoint["task"] in SEGMENTATION_TASKS:
        labels = model(x[None])[0].argmax(0)
        present = labels.unique().tolist()
        drawn = draw_segmentation_masks(image, torch.stack([labels == c for c in present]), alpha=0.6)
        print(f"{image_path}: classes {', '.join(class_names[c] for c in present)}")
    else:
        output = model([x])[0]
        keep = output["scores"] >= score_threshold
        boxes, labels, scores = output["boxes"][keep], output["labels"][keep], output["scores"][keep]
        drawn = image
        if "masks" in output and keep.any():
            drawn = draw_segmentation_masks(drawn, output["masks"][keep][:, 0] > 0.5, alpha=0.5)
        captions = [f"{class_names.get(int(c), int(c))} {s:.2f}" for c, s in zip(labels, scores)]
        drawn = draw_bounding_boxes(drawn, boxes, captions, colors="yellow", width=2)
        print(f"{image_path}: {len(boxes)} detection(s) with score >= {score_threshold}: {', '.join(captions)}")
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    v2.functional.to_pil_image(drawn).save(output_path)
    print(f"saved {output_path}")
    return output_path


def largest_module_outputs(module, x):
    """The element count of the largest tensor every submodule of `module` outputs for input x."""
    sizes = {}

    def record(name):
        def hook(_, __, output):
            tensors = output if isinstance(output, (list, tuple)) else [output]
            sizes[name] = max(t.numel() for t in tensors if torch.is_tensor(t))
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in module.named_modules() if n]
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
    return sizes


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@torch.no_grad()
def attention_peak_memory(tokens, heads, device):
    """How much one F.scaled_dot_product_attention call over `tokens` raises the peak memory, as
    MHSABlock calls it. Run first in a fresh process, so that the peak is not an earlier one."""
    q, k, v = (torch.randn(1, heads, tokens, glnet.HEAD_DIM, device=device) for _ in range(3))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory(device)
    F.scaled_dot_product_attention(q, k, v)
    return peak_memory(device) - before


@torch.no_grad()
def benchmark(backbone, device, height=800, width=1333):
    """Peak memory and time of one Mask R-CNN forward at height x width, and the check that no
    backbone tensor grows faster than the pixel count (full N x N attention would)."""
    model = create_detector("maskrcnn", backbone, num_classes=91, min_size=height, max_size=width).to(device).eval()
    tokens = math.ceil(height / 16) * math.ceil(width / 16)
    heads = model.backbone.body.stage_channels[2] // glnet.HEAD_DIM
    print(f"full attention at stride 16 ({tokens} tokens, {heads} heads): one call raised the peak memory by "
          f"{attention_peak_memory(tokens, heads, device) / 2 ** 20:.0f} MiB; a materialised {tokens}x{tokens} "
          f"attention matrix would take {tokens ** 2 * heads * 4 / 2 ** 20:.0f} MiB")
    image = torch.rand(3, height, width, device=device)
    model([image])  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = train.time_call(lambda: model([image]), device)
    memory = "peak GPU memory allocated" if device.type == "cuda" else "peak resident memory of the process (ru_maxrss)"
    memory = f"{memory} {peak_memory(device) / 2 ** 30:.2f} GiB"
    print(f"Mask R-CNN + {backbone}, one {height}x{width} image, batch 1, {device}: {seconds:.2f} s, {memory}")

    body = model.backbone.body
    small = largest_module_outputs(body, torch.rand(1, 3, height // 2, width // 2, device=device))
    large = largest_module_outputs(body, torch.rand(1, 3, height, width, device=device))
    name = max(large, key=large.get)
    pixel_ratio = (height * width) / ((height // 2) * (width // 2))
    growth = max(large[n] / small[n] for n in large)
    print(f"largest backbone tensor at {height}x{width}: {name} ({large[name] * 4 / 2 ** 20:.1f} MiB); "
          f"with {pixel_ratio:.2f}x the pixels the fastest-growing module output grows {growth:.2f}x "
          f"({'linear' if growth < 1.5 * pixel_ratio else 'SUPERLINEAR'})")
    return seconds


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs of the paper's dense models: --report
# ---------------------------------------------------------------------------------------------

# The paper's (parameters in M, GFLOPs): Table 4 (COCO; FLOPs at 800x1280) for RetinaNet and Mask R-CNN,
# Table 5 (ADE20K; FLOPs at 512x2048) for Semantic FPN (80k) and UperNet (160k).
PAPER = {
    "retinanet": {"glnet_4g": (37, 214), "glnet_9g": (70, 292)},
    "maskrcnn": {"glnet_4g": (46.6, 233), "glnet_9g": (79.5, 311)},
    "semfpn": {"glnet_4g": (30.7, 150), "glnet_9g": (63.6, 230)},
    "upernet": {"glnet_4g": (56.8, 907), "glnet_9g": (91.7, 988)},
}
REPORT_SIZES = {"retinanet": (800, 1280), "maskrcnn": (800, 1280), "semfpn": (512, 2048), "upernet": (512, 2048)}
# COCO's 80 classes (Mask R-CNN's box classifier adds the background, as MMDetection's does); ADE20K's 150.
REPORT_CLASSES = {"retinanet": 80, "maskrcnn": 81, "semfpn": 150, "upernet": 150}
REPORT_WIDTHS = {"retinanet": FPN_CHANNELS, "maskrcnn": FPN_CHANNELS, "semfpn": FPN_CHANNELS, "upernet": 512}
PROPOSALS, MASK_PROPOSALS = 1000, 100  # MMDetection's forward_dummy: RoI heads on 1000 proposals, masks on 100


class CountedForward(nn.Module):
    """The forward pass MMDetection's and MMSegmentation's get_flops tools count (forward_dummy), on
    (1, 3, H, W) images: a segmentation model in eval mode (so without UperNet's auxiliary head);
    a detector's backbone and FPN, its dense heads on every level and, for Mask R-CNN, the RoI box
    head on PROPOSALS RoIs and the mask head on MASK_PROPOSALS. Neither counter counts RoIAlign, so
    the RoI heads get zero features of its output size. No pre- or post-processing (resizing,
    anchors, box decoding, NMS)."""

    def __init__(self, task, model):
        super().__init__()
        self.task, self.model = task, model

    def forward(self, images):
        if self.task in SEGMENTATION_TASKS:
            return self.model(images)
        features = self.model.backbone(images)
        levels = list(features.values())
        if self.task == "retinanet":
            return self.model.head.classification_head(levels), self.model.head.regression_head(levels)
        objectness, box_deltas = self.model.rpn.head(levels)
        roi_heads, channels = self.model.roi_heads, levels[0].shape[1]
        box_features = levels[0].new_zeros(PROPOSALS, channels, *roi_heads.box_roi_pool.output_size)
        mask_features = levels[0].new_zeros(MASK_PROPOSALS, channels, *roi_heads.mask_roi_pool.output_size)
        boxes = roi_heads.box_predictor(roi_heads.box_head(box_features))
        masks = roi_heads.mask_predictor(roi_heads.mask_head(mask_features))
        return objectness, box_deltas, boxes, masks


def conv_flops(layer, x, y):
    """Multiply-accumulates of every output position (of every input position for a transposed
    conv), plus one addition per output for the bias."""
    per_position = layer.out_channels * layer.in_channels // layer.groups * math.prod(layer.kernel_size)
    positions = x if isinstance(layer, nn.ConvTranspose2d) else y
    return positions.numel() // positions.shape[1] * per_position + (y.numel() if layer.bias is not None else 0)


def norm_flops(layer, x, y):
    affine = getattr(layer, "affine", False) or getattr(layer, "elementwise_affine", False)
    return x.numel() * (2 if affine else 1)


# MMCV's get_model_complexity_info: the layer types it counts, and how. It matches exact types.
MMCV_RULES = {
    nn.Conv2d: conv_flops, nn.ConvTranspose2d: conv_flops,
    nn.BatchNorm2d: norm_flops, nn.GroupNorm: norm_flops, nn.LayerNorm: norm_flops,
    nn.Linear: lambda layer, x, y: x.numel() * y.shape[-1],
    nn.ReLU: lambda layer, x, y: y.numel(), nn.Upsample: lambda layer, x, y: y.numel(),
    nn.MaxPool2d: lambda layer, x, y: x.numel(), nn.AdaptiveAvgPool2d: lambda layer, x, y: x.numel(),
}


def mmcv_counted_layers(model):
    """{layer: its MMCV_RULES type} for the layers MMCV's counter would have seen. It matches exact
    types, so what it saw of GLNet depends on the classes the released code builds it from: attention
    is nn.MultiheadAttention, computed by a function (not counted at all, projections included); the
    norms of the blocks are timm's LayerNorm2d, a LayerNorm subclass (not counted), except the first
    norm of the full-attention blocks (nn.LayerNorm); the FFN's z + DWConv3x3(z) is a Conv2d subclass
    (not counted). The position-encoding conv and GLNet's other convolutions are plain nn.Conv2d."""
    unseen = set()
    for module in model.modules():
        if isinstance(module, glnet.MHSA):
            unseen.update(module.modules())
        elif isinstance(module, glnet.GLMixBlock):
            unseen.update((module.norm1, module.norm2))
        elif isinstance(module, glnet.MHSABlock):
            unseen.add(module.norm2)
        elif isinstance(module, glnet.ConvFFN):
            unseen.add(module[1])
    layers = {}
    for module in model.modules():
        kind = nn.Conv2d if isinstance(module, nn.Conv2d) else type(module)  # ResidualDWConv, PatchConv
        if kind in MMCV_RULES and module not in unseen:
            layers[module] = kind
    return layers


@torch.no_grad()
def mmcv_flops(module, inputs):
    """FLOPs (multiply-accumulates) as MMCV's counter, which MMDetection's and MMSegmentation's
    get_flops use, counts them: a forward hook on each layer of mmcv_counted_layers; matrix
    products and attention inside functions go uncounted. Needs only shapes: meta tensors will do."""
    total = 0

    def count(layer, args, output):
        nonlocal total
        total += MMCV_RULES[layers[layer]](layer, args[0], output)

    layers = mmcv_counted_layers(module)
    handles = [layer.register_forward_hook(count) for layer in layers]
    try:
        module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def report_model(task, backbone):
    """One dense model with the paper's class count and widths, as get_flops runs it (eval mode).
    UperNet's heads get SyncBatchNorm, as in the MMSegmentation configuration the paper used (the
    same layers in eval mode; MMCV's counter does not count SyncBatchNorm)."""
    model = create_model(task, backbone, REPORT_CLASSES[task], fpn_channels=REPORT_WIDTHS[task])
    if task == "upernet":
        for name, head in model.named_children():
            if name != "backbone":
                nn.SyncBatchNorm.convert_sync_batchnorm(head)
    return CountedForward(task, model).eval()


def dense_model_costs(task, backbone):
    """(parameters, fvcore FLOPs, MMCV FLOPs) of one dense model at REPORT_SIZES. Parameters and
    MMCV's count come from a model on the meta device (no arithmetic); fvcore traces a real forward
    of a CPU model on a zero image."""
    size = REPORT_SIZES[task]
    with torch.device("meta"):
        meta = report_model(task, backbone)
    params, mmcv = glnet.count_params(meta), mmcv_flops(meta, (torch.zeros(1, 3, *size, device="meta"),))
    with torch.no_grad():
        everything = glnet.flop_analysis(report_model(task, backbone), (torch.zeros(1, 3, *size),)).total()
    return params, everything, mmcv


def report(tasks=TASKS, backbones=("glnet_4g", "glnet_9g")):
    """Print parameters and GFLOPs of each dense model beside the paper's (Tables 4 and 5)."""
    print(f"{'model':<11}{'backbone':<12}{'params (M)':>11}{'paper':>7}{'GFLOPs all':>12}{'GFLOPs MMCV':>13}"
          f"{'paper':>7}  input")
    rows = []
    for task in tasks:
        for backbone in backbones:
            params, everything, mmcv = dense_model_costs(task, backbone)
            paper = PAPER[task].get(backbone)
            paper_params, paper_flops = (f"{paper[0]:>7g}", f"{paper[1]:>7g}") if paper else (f"{'-':>7}", f"{'-':>7}")
            height, width = REPORT_SIZES[task]
            print(f"{task:<11}{backbone:<12}{params / 1e6:>11.2f}{paper_params}{everything / 1e9:>12.1f}"
                  f"{mmcv / 1e9:>13.1f}{paper_flops}  {height}x{width}", flush=True)
            rows.append((task, backbone, params, everything, mmcv))
    print("GFLOPs: multiply-accumulates of one image. 'all': fvcore, every operation, attention included.\n"
          "'MMCV': what MMCV's counter (the paper's tools) sees: layers such as convolutions, norms and plain\n"
          "  linear layers; GLNet's attention (nn.MultiheadAttention in the released code) and its clustering\n"
          "  and dispatching matrix products are not counted.\n"
          f"Mask R-CNN: backbone, FPN, RPN head, box head on {PROPOSALS} RoIs, mask head on {MASK_PROPOSALS} "
          "(MMDetection's convention).\nSegmentation: without UperNet's auxiliary head (training only).")
    return rows


# ---------------------------------------------------------------------------------------------
# Command line: train.py's flags, plus the dense tasks' own
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def default(key):
        if key == "data":
            return ("COCO 2017 root (maskrcnn, retinanet) or ADEChallengeData2016 root (semfpn, upernet); "
                    "default: the synthetic scenes")
        if key == "output_dir":
            return "one subfolder per task (default runs/detect_seg)"
        values = {task: {**COMMON, **recipe}.get(key) for task, recipe in RECIPES.items()}
        synthetic = {task: {**COMMON, **recipe}.get(key) for task, recipe in SYNTHETIC_RECIPES.items()}
        return f"default per task {values} with --data, {synthetic} without"

    train.add_training_arguments(parser, default)
    parser.add_argument("--task", nargs="+", choices=TASKS, default=None,
                        help="models to train, one after the other (default: maskrcnn semfpn on the synthetic scenes); "
                             "with --report, the models to count (default: all four)")
    parser.add_argument("--pretrained", default=None, help="ImageNet GLNet checkpoint for the backbone (released ones included)")
    parser.add_argument("--schedule", choices=("1x", "3x"), default="1x", help="detection: 12 epochs, or 36 with multi-scale training")
    parser.add_argument("--min-size", type=int, default=None, help="detection: shorter image side")
    parser.add_argument("--max-size", type=int, default=None, help="detection: longest image side at most")
    parser.add_argument("--multiscale", action="store_true", default=None,
                        help=f"detection: shorter side drawn from {MULTISCALE_SIZES[0]}-{MULTISCALE_SIZES[-1]} (3x sets it)")
    parser.add_argument("--fpn-channels", type=int, default=None,
                        help="FPN (and mask head) width: 256 in the paper; UperNet's width: 512 in the paper")
    parser.add_argument("--rois-per-image", type=int, default=None, help="Mask R-CNN: RoIs sampled per image for the box/mask losses")
    parser.add_argument("--crop-size", type=int, default=None, help="segmentation training crop")
    parser.add_argument("--scale", type=int, default=None, help="segmentation: images resized into (4*scale, scale)")
    parser.add_argument("--predict", metavar="IMAGE", default=None, help="draw the predictions on IMAGE into a PNG")
    parser.add_argument("--predict-output", default=None, help="default: <output-dir>/<image name>_<task>.png")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--report", action="store_true",
                        help="print parameters and GFLOPs of the dense models (--task, default all four) with "
                             "glnet_4g and glnet_9g (or --model) against the paper's Tables 4 and 5, then exit")
    args = parser.parse_args(argv)
    if args.task is None and args.report:
        args.task = list(TASKS)
    if args.task is None:
        if args.data is not None and not (args.bench or args.predict):
            parser.error("--task is required with --data (maskrcnn or retinanet on COCO, semfpn or upernet on ADE20K)")
        args.task = ["maskrcnn", "semfpn"]
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", "detect_seg")
    train.check_training_arguments(parser, args)
    return args


def task_config(args, task):
    """The flags for one task: the paper's recipe (or the synthetic one), overridden by the command line."""
    synthetic = args.data is None
    recipe = {**COMMON, **(SYNTHETIC_RECIPES if synthetic else RECIPES)[task]}
    if task not in SEGMENTATION_TASKS and args.schedule == "3x":
        recipe.update(SCHEDULE_3X)
    config = argparse.Namespace(**{**vars(args), "task": task, "synthetic": synthetic})
    train.apply_recipe(config, recipe)
    config.data = scenes_dataset(args.cache_dir) if synthetic else os.path.abspath(args.data)
    config.output_dir = os.path.join(args.output_dir, task)
    return config


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world_size, device = train.setup_distributed()
    try:
        if args.bench:
            return benchmark(args.model or "glnet_4g", device)
        if args.report:
            return report(args.task, [args.model] if args.model else ["glnet_4g", "glnet_9g"])
        if args.predict:
            checkpoint = args.checkpoint or os.path.join(args.output_dir, args.task[0], "best.pth")
            stem = os.path.splitext(os.path.basename(args.predict))[0]
            output = args.predict_output or os.path.join(args.output_dir, f"{stem}_{args.task[0]}.png")
            return predict(args.predict, checkpoint, output, args.score_threshold)
        results = {}
        for task in args.task:
            config = task_config(args, task)
            train.log(f"{task}: {config.model} on {config.data} -> {config.output_dir}")
            run = evaluate_checkpoint if args.eval else train_task
            results[task] = run(config, rank, world_size, device)
            train.log(f"{task} result: {train.format_metrics(results[task])}")
        return results
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
