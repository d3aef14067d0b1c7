"""GLNet: convolutions on the pixel grid, self-attention on 64 semantic slots.

Reference implementation of "Revisiting the Integration of Convolution and Attention for Vision
Backbone" (Zhu, Wang, Zhang, Lau; NeurIPS 2024). Every GLMix block represents the image twice:
as the fine-grained grid of pixels, where a light-weight local branch of convolutions extracts
local features, and as a coarse set of 64 semantic slots, where multi-head self-attention (MHSA)
models global relations. A soft clustering module (grid -> slots) and its conjugate dispatching
module (slots -> grid) bridge the two (paper Sec. 3.2, Figure 4, Eq. 1-4).

Read in order: building blocks, the GLMix block, full-attention blocks, the network (Sec. 3.3), the
released variants, checkpoints, and the parameters/FLOPs report of `python glnet.py`.
"""

import argparse
import base64
import math
import os
import pickle
import re
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.ops import StochasticDepth

torch.fx.wrap("rearrange")     # einops cannot see fx Proxies: symbolic tracing keeps it as one call

SLOT_GRID = 8                  # slots are initialised by pooling the grid to 8x8 ...
NUM_SLOTS = SLOT_GRID ** 2     # ... so M = 64 semantic slots, at every input resolution
HEAD_DIM = 32                  # attention heads = channels / 32
LOCAL_KERNEL = 5               # depth-wise kernel of the local branch
MIN_INPUT_SIZE = 32            # the total stride: stage 4 needs at least one pixel
TOKEN_LOGITS_WEIGHT = 0.5      # eval output with a token head: class logits + 0.5 x max token logits


class InputError(ValueError):
    """Input a user can correct (a file, a flag, a name): the scripts end with it as one line, exit status 2."""


# --- Building blocks -----------------------------------------------------------------------------

class MHSA(nn.Module):
    """Multi-head self-attention with torch.nn.MultiheadAttention's parameters (one packed q/k/v
    projection), so the released weights load, computed by F.scaled_dot_product_attention."""

    def __init__(self, dim):
        super().__init__()
        self.num_heads = dim // HEAD_DIM
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention

    def forward(self, x):                                                  # (B, N, C)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)          # (B, N, 3C)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)                        # (B, heads, N, 32)
        return self.out_proj(rearrange(x, "b h n d -> b n (h d)"))


class ResidualDWConv(nn.Conv2d):
    """z + DWConv3x3(z): the conv position encoding and the conv FFN of GLNet-4G/9G/16G, as one
    depth-wise convolution whose kernel has 1 added at its centre (no separate pass for the sum)."""

    def __init__(self, dim):
        super().__init__(dim, dim, 3, padding=1, groups=dim)
        identity = torch.zeros(dim, 1, 3, 3)
        identity[:, :, 1, 1] = 1
        self.register_buffer("identity", identity, persistent=False)

    def forward(self, x):
        return self._conv_forward(x, self.weight + self.identity, self.bias)


class LayerScale(nn.Module):
    """A learnable per-channel scale on a residual branch (GLNet-16G, initialised to 1e-4)."""

    def __init__(self, shape, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full(shape, init_value))

    def forward(self, x):
        return x * self.gamma


def norm_pixels(norm, x):
    """LayerNorm over the channels of each pixel of a (B, C, H, W) grid."""
    return rearrange(norm(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


def pooling_matrix(size, x):  # (8, size): F.adaptive_avg_pool2d's windows as averaging weights
    i, j = torch.arange(SLOT_GRID, device=x.device).unsqueeze(1), torch.arange(size, device=x.device)
    window = (i * size < SLOT_GRID * (j + 1)) & ((i + 1) * size > SLOT_GRID * j)  # i*size/8 - 1 < j < (i+1)*size/8
    return (window / window.sum(dim=1, keepdim=True)).to(x.dtype)


class ConvFFN(nn.Sequential):
    """The per-pixel FFN on the grid: Conv1x1 -> [z + DWConv3x3(z)] -> GELU -> Conv1x1."""

    def __init__(self, dim, mlp_ratio, conv_ffn):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Conv2d(dim, hidden, 1), ResidualDWConv(hidden) if conv_ffn else nn.Identity(), nn.GELU(),
                         nn.Conv2d(hidden, dim, 1))


# --- The GLMix block (Sec. 3.2, Figure 4) --------------------------------------------------------

class GLMixBlock(nn.Module):
    """Global branch (clustering -> MHSA over the slots -> dispatching) and local branch
    (Conv1x1 -> DWConv5x5 -> Conv1x1) in parallel on the same normalised grid, fused by addition;
    then the FFN. Attention costs O(64^2) and clustering O(64 x HW): linear in the pixel count."""

    def __init__(self, dim, mlp_ratio, drop_path=0.0, learned_slots=False, conv_pos=False,
                 conv_ffn=False, layer_scale=None):
        super().__init__()
        self.init_slots = nn.Parameter(0.02 * torch.randn(1, NUM_SLOTS, dim)) if learned_slots else None
        self.pos_conv = ResidualDWConv(dim) if conv_pos else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.tau = nn.Parameter(torch.tensor(dim ** -0.5))  # the learnable scale of Eq. 2
        self.clustering = nn.Softmax(dim=-1)   # Eq. 3: each slot's weights over the pixels
        self.slot_mhsa = MHSA(dim)
        self.dispatching = nn.Softmax(dim=1)   # Eq. 4: each pixel's weights over the slots
        self.local_branch = nn.Sequential(                 # Conv1x1 -> DWConv5x5 -> Conv1x1
            nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, LOCAL_KERNEL, padding=LOCAL_KERNEL // 2, groups=dim),
            nn.Conv2d(dim, dim, 1))
        self.ls1 = LayerScale((1, dim, 1, 1), layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, mlp_ratio, conv_ffn)
        self.ls2 = LayerScale((1, dim, 1, 1), layer_scale) if layer_scale else nn.Identity()
        self.drop_path = StochasticDepth(drop_path, "row")

    def initial_slots(self, x):
        """Eq. 1: S_init = Flatten(AvgPool(X)), or learned slots shared by all images. Exported graphs (ONNX) pool
        by products with matrices computed from the size: adaptive_avg_pool2d's ONNX form keeps the example's size."""
        if self.init_slots is not None:
            return self.init_slots.expand(x.shape[0], -1, -1)
        if not torch.compiler.is_exporting():
            return rearrange(F.adaptive_avg_pool2d(x, SLOT_GRID), "b c h w -> b (h w) c")
        B, C, H, W = x.shape  # pooled over H, then over W; reshaped through 1-D, which torch.export does at any W
        rows = (pooling_matrix(H, x) @ rearrange(x, "b c h w -> b h (w c)")).flatten().view(-1, C)  # (B * 8 * W, C)
        return (pooling_matrix(W, x) @ rows.view(B * SLOT_GRID, W, C)).view(B, NUM_SLOTS, C)

    def correspondence_logits(self, slots_init, pixels):
        """Eq. 2: A = tau * CosineSimilarity(S_init, X), shape (B, 64, HW). The pixel norms divide
        the (64, HW) products instead of normalising all (HW, C) pixel features first."""
        slots_init = self.tau * F.normalize(slots_init, dim=-1)                 # (B, 64, C)
        pixel_norms = pixels.norm(dim=-1).clamp_min(1e-12).unsqueeze(1)        # (B, 1, HW)
        return (slots_init @ pixels.transpose(1, 2)) / pixel_norms

    def forward(self, x):                                              # (B, C, H, W)
        H = x.shape[2]
        slots_init = self.initial_slots(x)                             # (B, 64, C)
        x = self.pos_conv(x)
        shortcut = x
        y = self.norm1(rearrange(x, "b c h w -> b h w c"))             # (B, H, W, C)
        pixels = y.flatten(1, 2)                                       # X: (B, HW, C)

        # Global branch: soft clustering (Eq. 2-3), MHSA over the slots, dispatching (Eq. 4).
        logits = self.correspondence_logits(slots_init, pixels)        # A: (B, 64, HW)
        slots = self.clustering(logits) @ pixels                       # S: (B, 64, C)
        slots = self.slot_mhsa(slots)                                  # S'
        dispatched = self.dispatching(logits).transpose(1, 2) @ slots  # G: (B, HW, C)
        global_features = rearrange(dispatched, "b (h w) c -> b c h w", h=H)

        local_features = self.local_branch(rearrange(y, "b h w c -> b c h w"))
        x = shortcut + self.drop_path(self.ls1(global_features + local_features))
        return x + self.drop_path(self.ls2(self.mlp(norm_pixels(self.norm2, x))))


# --- Full-attention blocks (stage 3 odd blocks and stage 4) --------------------------------------

class MHSABlock(nn.Module):
    """MHSA over all pixels, grid layout: conv position encoding, attention on the tokens, then
    the same conv FFN as the GLMix block (stage 3 odd blocks and stage 4 of GLNet-4G/9G/16G)."""

    def __init__(self, dim, mlp_ratio, drop_path=0.0, conv_pos=False, conv_ffn=False, layer_scale=None):
        super().__init__()
        self.pos_conv = ResidualDWConv(dim) if conv_pos else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mhsa = MHSA(dim)
        self.ls1 = LayerScale((dim,), layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, mlp_ratio, conv_ffn)
        self.ls2 = LayerScale((1, dim, 1, 1), layer_scale) if layer_scale else nn.Identity()
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x):                                              # (B, C, H, W)
        H = x.shape[2]
        x = self.pos_conv(x)
        tokens = rearrange(x, "b c h w -> b (h w) c")                  # (B, HW, C)
        tokens = tokens + self.drop_path(self.ls1(self.mhsa(self.norm1(tokens))))
        x = rearrange(tokens, "b (h w) c -> b c h w", h=H)
        return x + self.drop_path(self.ls2(self.mlp(norm_pixels(self.norm2, x))))


class TransformerBlock(nn.Module):
    """A standard pre-norm transformer block on the tokens (stage 4 of GLNet-STL)."""

    def __init__(self, dim, mlp_ratio, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mhsa = MHSA(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x):                                              # (B, C, H, W)
        H = x.shape[2]
        tokens = rearrange(x, "b c h w -> b (h w) c")                  # (B, HW, C)
        tokens = tokens + self.drop_path(self.mhsa(self.norm1(tokens)))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return rearrange(tokens, "b (h w) c -> b c h w", h=H)


# --- The network (Sec. 3.3) ----------------------------------------------------------------------

class PatchConv(nn.Conv2d):
    """Non-overlapped patch convolution (kernel = stride) that pads the bottom and right edges by
    stride - 1, so that sizes not divisible by 32 lose no pixels. A constant padding, read by no
    window when the size is divisible, keeps traced and exported graphs right at every size."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, self.stride[1] - 1, 0, self.stride[0] - 1)))


def stem(in_chans, dim, overlapped):
    """Downsampling layer 0 (stride 4)."""
    if overlapped:  # Conv3x3 s2 -> BN -> GELU -> Conv3x3 s2 -> BN
        return nn.Sequential(nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                             nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
    return nn.Sequential(PatchConv(in_chans, dim, 4, stride=4), nn.BatchNorm2d(dim))


def downsample(in_dim, out_dim, overlapped):
    """Downsampling layers 1-3 (stride 2): overlapped conv then norm, or norm then patch conv."""
    if overlapped:
        return nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1), nn.BatchNorm2d(out_dim))
    return nn.Sequential(nn.BatchNorm2d(in_dim), PatchConv(in_dim, out_dim, 2, stride=2))


class Stage(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.checkpointing = False  # GLNet.set_grad_checkpointing

    def forward(self, x):
        for block in self.blocks:  # checkpointing: its activations are recomputed in the backward pass
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


@torch.fx.wrap
def check_input(x, in_chans):
    """Fail early, saying what was expected, instead of deep inside a convolution. Wrapped for
    torch.fx: a traced model keeps the check as one call and runs it on real tensors."""
    expected = f"a float image batch of shape (B, {in_chans}, H, W) with H, W >= {MIN_INPUT_SIZE}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"GLNet expects {expected}, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"GLNet expects {expected}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"GLNet expects {expected}, got dtype {x.dtype} "
                        f"(convert images with x.float() / 255 and normalise them)")
    if min(x.shape[2:]) < MIN_INPUT_SIZE:
        raise ValueError(f"GLNet expects {expected}, got {x.shape[2]}x{x.shape[3]}")


class GLNet(nn.Module):
    """Four stages at strides 4, 8, 16, 32: GLMix blocks in stages 1-3 (stage 3 optionally alternating
    with full MHSA: the 'hybrid stage 3'), full MHSA in stage 4 where the grid is small, then BatchNorm,
    average pooling and a linear classifier. The advanced designs of GLNet-4G/9G/16G (Sec. 3.3) are
    switches: `overlapped` downsampling, `stage3="hybrid"`, `conv_pos`, `conv_ffn`, the deeper layout.
    `token_head` adds token labeling's second classifier on every last-stage token (GLNet-4G*/9G*)."""

    def __init__(self, depths, dims, mlp_ratio, stage3="glmix", stage4="token", learned_slots=False,
                 overlapped=False, conv_pos=False, conv_ffn=False, layer_scale=None,
                 num_classes=1000, drop_path_rate=0.0, in_chans=3, token_head=False):
        super().__init__()
        self.in_chans = in_chans
        self.stage_channels = tuple(dims)   # channels of the four stage outputs
        self.stage_strides = (4, 8, 16, 32)
        self.num_features = dims[-1]

        self.downsample_layers = nn.ModuleList([stem(in_chans, dims[0], overlapped)] +
                                               [downsample(dims[i], dims[i + 1], overlapped) for i in range(3)])
        num_blocks = sum(depths)
        drop_rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]  # grows with depth
        grid_block_args = dict(conv_pos=conv_pos, conv_ffn=conv_ffn, layer_scale=layer_scale)
        stages = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            blocks = []
            for j in range(depth):
                drop_path = drop_rates[sum(depths[:i]) + j]
                if i == 3 and stage4 == "token":
                    blocks.append(TransformerBlock(dim, mlp_ratio, drop_path))
                elif i == 3 or (i == 2 and stage3 == "hybrid" and j % 2 == 1):
                    blocks.append(MHSABlock(dim, mlp_ratio, drop_path, **grid_block_args))
                else:
                    blocks.append(GLMixBlock(dim, mlp_ratio, drop_path, learned_slots, **grid_block_args))
            stages.append(Stage(blocks))
        self.stages = nn.ModuleList(stages)

        self.norm = nn.BatchNorm2d(dims[-1])
        self.reset_classifier(num_classes, token_head)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """The released training's initialisation: convolutions keep PyTorch's default."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, token_head=None):
        """Fine-tuning: new classifiers as timm's (0: none, pooled features); token_head: one too (None: as now)."""
        self.num_classes, self.has_token_head = num_classes, self.has_token_head if token_head is None else token_head
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.token_head = nn.Linear(self.num_features, num_classes) if self.has_token_head and num_classes > 0 else None

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in the backward pass (torch.utils.checkpoint): less memory, more time."""
        for stage in self.stages:
            stage.checkpointing = enable

    def forward_features(self, x):
        """The four stage outputs at strides 4, 8, 16, 32: (B, C_i, ceil(H / s_i), ceil(W / s_i)).
        Works at any size >= 32: the dense-prediction interface."""
        check_input(x, self.in_chans)
        x = x.contiguous(memory_format=torch.channels_last)  # per-pixel LayerNorms become views, convs run NHWC
        features = []
        for downsample_layer, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample_layer(x))
            features.append(x)
        return features

    def forward_head(self, x, return_tokens=False):                    # (B, C4, h, w): the last stage
        """Class logits (B, K) of the pooled features (num_classes=0: the features). With a token head,
        training mode (or return_tokens=True) gives (class logits, token logits (B, h*w, K), row-major)
        for token labeling; eval mode the released rule: class logits + 0.5 x each class's max token logit."""
        if return_tokens and self.token_head is None:
            raise ValueError("return_tokens=True needs a model with a token head (token_head=True, num_classes > 0)")
        x = self.norm(x)
        class_logits = self.head(x.mean(dim=(2, 3)))
        if self.token_head is None:
            return class_logits
        token_logits = self.token_head(rearrange(x, "b c h w -> b (h w) c"))
        if self.training or return_tokens:
            return class_logits, token_logits
        return class_logits + TOKEN_LOGITS_WEIGHT * token_logits.amax(dim=1)

    def forward(self, x):
        """Class logits (B, K) of the last stage; with a token head in training mode the pair
        (class logits, token logits (B, h*w, K)), see forward_head."""
        return self.forward_head(self.forward_features(x)[-1])

    @torch.no_grad()
    def clustering_weights(self, x):
        """Eq. 3's softmax(A) of every GLMix block (Figure 5): {block name: (B, 64, H_i, W_i)}, each map
        summing to 1; computed in eval mode, the model left as it was (mode, buffers, no hooks)."""
        weights = {}
        hooks = [block.clustering.register_forward_hook(lambda _, __, w, name=name: weights.update({name: w}))
                 for name, block in self.named_modules() if isinstance(block, GLMixBlock)]
        was_training = self.training
        try:
            features = self.eval().forward_features(x)
        finally:
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        # a block of stages.i keeps stage i's grid
        return {name: w.unflatten(2, features[int(name.split(".")[1])].shape[2:]) for name, w in weights.items()}


# --- The released variants (paper Table 2; ../shared/reference/ARCHITECTURE.md) ------------------

ADVANCED_DESIGNS = dict(depths=(4, 4, 18, 4), mlp_ratio=3, stage3="hybrid", stage4="grid",
                        overlapped=True, conv_pos=True, conv_ffn=True)


def glnet_stl(**kwargs):
    """GLNet-STL: the Swin-T layout with GLMix blocks in stages 1-3."""
    return GLNet(**{**dict(depths=(2, 2, 6, 2), dims=(96, 192, 384, 768), mlp_ratio=4), **kwargs})


def glnet_stl_paramslot(**kwargs):
    """GLNet-STL with learned instead of pooled slot initialisation (ablation, Table 6)."""
    return glnet_stl(**{"learned_slots": True, **kwargs})


def glnet_4g(**kwargs):
    return GLNet(**{**ADVANCED_DESIGNS, "dims": (64, 128, 256, 512), **kwargs})


def glnet_9g(**kwargs):
    return GLNet(**{**ADVANCED_DESIGNS, "dims": (96, 192, 384, 768), **kwargs})


def glnet_16g(**kwargs):
    return GLNet(**{**ADVANCED_DESIGNS, "dims": (128, 256, 512, 1024), "layer_scale": 1e-4, **kwargs})


def glnet_4g_tklb(**kwargs):
    """GLNet-4G*: GLNet-4G with a token head, trained with token labeling (Table 3, Table 9)."""
    return glnet_4g(**{"token_head": True, **kwargs})


def glnet_9g_tklb(**kwargs):
    """GLNet-9G*: GLNet-9G with a token head, trained with token labeling (Table 3, Table 9)."""
    return glnet_9g(**{"token_head": True, **kwargs})


def glnet_mini(**kwargs):
    """Not released: GLNet-4G's designs at a size that trains in minutes on a CPU (the out-of-the-box runs)."""
    return GLNet(**{**ADVANCED_DESIGNS, "depths": (1, 1, 3, 1), "dims": (32, 64, 128, 256), **kwargs})


MODELS = {f.__name__: f for f in (glnet_stl, glnet_stl_paramslot, glnet_4g, glnet_9g, glnet_16g, glnet_4g_tklb,
                                  glnet_9g_tklb, glnet_mini)}
RELEASED = tuple(MODELS)[:-1]  # all but glnet_mini

# The paper's model card: parameters (M), GFLOPs at 224x224, ImageNet-1k top-1 (%). The *_tklb
# rows are GLNet-4G*/9G* of Table 3, which prints 27M and 61M: here the count with the token head.
PAPER = {"glnet_stl": (30.3, 4.4, 82.5), "glnet_stl_paramslot": (30.5, 4.4, 82.1), "glnet_4g": (27.0, 4.5, 83.7),
         "glnet_9g": (60.0, 9.7, 84.5), "glnet_16g": (106.1, 16.7, 85.0), "glnet_4g_tklb": (27.5, 4.5, 84.4),
         "glnet_9g_tklb": (60.8, 9.7, 85.3)}
CHECKPOINT_LINKS = {name: "https://1drv.ms/u/s!AkBbczdRlZvC" + share for name, share in dict(  # the released code's
    glnet_stl="yBFaAILEMu_dtbbV?e=9Ghhi3", glnet_stl_paramslot="yG0eat5zCE9upcQR?e=vmbmo1",
    glnet_4g="yG9DjS_AMqnJQiX1?e=tOkhHP", glnet_9g="yEGFQ6kfWV-wVZei?e=wWwR8z", glnet_16g="yjaBxC3h-B8CHWMm?e=GfR0kg",
    glnet_4g_tklb="yAWcOdlTUa2J3vsX?e=wE4ch1", glnet_9g_tklb="ynPEcg-fC7ZDCMEt?e=bwufeR").items()}


def create_model(name, pretrained=False, checkpoint=None, checkpoint_key=None, **kwargs):
    """create_model("glnet_4g", num_classes=10, drop_path_rate=0.1); weights (pretrained=True: the released ImageNet
    ones; or a `checkpoint`, a path or a dict) load strictly, so num_classes (default 1000) must be theirs, or 0."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    if pretrained and (name not in CHECKPOINT_LINKS or checkpoint is not None):
        raise InputError(f"pretrained=True takes no checkpoint and one of {', '.join(CHECKPOINT_LINKS)}, got {name!r}")
    model = MODELS[name](**kwargs)
    if pretrained:  # as the released code: <torch hub dir>/checkpoints/<name>.pth; glnet_16g's weights are its EMA
        checkpoint, checkpoint_key = released_checkpoint(name), "model_ema" if name == "glnet_16g" else "model"
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, key=checkpoint_key)
    return model


# --- Checkpoints ---------------------------------------------------------------------------------

RELEASED_NAMES = [  # the released checkpoints name some modules otherwise: one renaming step converts them
    (r"\.slot_scale$", ".tau"), (r"\.relation_mha\.", ".slot_mhsa."), (r"\.feature_conv\.", ".local_branch."),
    (r"\.mha_op\.", ".mhsa."), (r"^tklb_aux_head\.", "token_head.")]
# The released overlapped stem has a parameter-free module first, so its layers sit one index later.
RELEASED_OVERLAPPED_STEM = (r"^downsample_layers\.0\.([1245])\.", lambda m: f"downsample_layers.0.{int(m[1]) - 1}.")


def unwrap_state_dict(checkpoint, key=None):
    """The weights inside the usual formats: {'model_ema': ...} (preferred), {'model': ...}, {'state_dict': ...}
    or bare, with DDP's `module.` or torch.compile's `_orig_mod.` prefix; released names renamed to this file's."""
    if key is None:
        key = next((k for k in ("model_ema", "model", "state_dict") if isinstance(checkpoint.get(k), dict)), None)
    elif key not in checkpoint:
        raise KeyError(f"checkpoint has no {key!r} entry; its entries: {sorted(checkpoint)[:10]}")
    state_dict = {k: v for k, v in (checkpoint[key] if key else checkpoint).items() if k != "n_averaged"}
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    rules = RELEASED_NAMES + [RELEASED_OVERLAPPED_STEM] * ("downsample_layers.0.5.weight" in state_dict)
    converted = {}
    for name, value in state_dict.items():
        for pattern, replacement in rules:  # this file's own names match none of the rules
            name = re.sub(pattern, replacement, name)
        converted[name] = value
    return converted


class Foreign:
    """An inert stand-in, never imported, for an object of the classes `names` matches, which training scripts save
    beside the weights: hydra's configs, argparse.Namespace, paths, numpy scalars. It keeps what the pickle gives."""

    names = re.compile(r"(omegaconf|pathlib|numpy|typing)\..+|argparse\.Namespace|collections\.defaultdict|"
                       r"builtins\.(dict|list|tuple|int|float|str|bytes|bool)")

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def read_checkpoint(path):
    """A checkpoint file on the CPU by torch's weights-only unpickler, which runs nothing a file names: its tensors
    and plain values, Foreign stand-ins for objects of the classes Foreign.names matches (left out where they are an
    entry). A file that names any other class or function (os.system, say) is refused; every script reads so."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path) if zipfile.is_zipfile(path) else []
        refused = sorted(name for name in names if not Foreign.names.fullmatch(name))
        # omegaconf's resolver cache, a defaultdict, is filled item by item, which the unpickler does to dicts only
        stand_ins = [((lambda *args: {}) if name == "collections.defaultdict" else Foreign, name) for name in names]
        if not refused:
            with torch.serialization.safe_globals(stand_ins):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise InputError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # torch's of a truncated or foreign file
        raise InputError(f"cannot read checkpoint {path}: truncated, or not a torch.save file of tensors and plain "
                         f"values ({str(e).split('. ')[0] or type(e).__name__})") from e
    if refused:
        raise InputError(f"refusing checkpoint {path}: it names {', '.join(refused[:4])}{', ...' * (len(refused) > 4)},"
                         f" which no file of weights and settings needs; nothing in it was run")
    if not isinstance(checkpoint, dict):
        raise InputError(f"{path} holds a {type(checkpoint).__name__}, expected a checkpoint dict or a state_dict")
    return {key: value for key, value in checkpoint.items() if not isinstance(value, Foreign)}


def released_checkpoint(name):
    """<torch hub dir>/checkpoints/<name>.pth, where the released code keeps it: downloaded there if missing, read."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", f"{name}.pth")
    share = base64.urlsafe_b64encode(CHECKPOINT_LINKS[name].encode()).decode().rstrip("=")
    try:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(f"https://api.onedrive.com/v1.0/shares/u!{share}/root/content", path)
        return read_checkpoint(path)
    except (OSError, InputError) as error:  # OneDrive no longer serves scripts: the file is put there by hand
        raise InputError(f"{name}'s released checkpoint could not be downloaded or read ({error}); download it from "
                         f"{CHECKPOINT_LINKS[name]} to {path}") from error


def guess_variant(state_dict):
    """The released variant whose tensor names and shapes overlap most with `state_dict`."""
    num_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    given = {(k, tuple(v.shape)) for k, v in state_dict.items()}
    with torch.device("meta"):
        scores = {name: len(given & (shapes := {(k, tuple(v.shape)) for k, v in create_model(
            name, num_classes=num_classes).state_dict().items()})) / len(given | shapes) for name in RELEASED}
    best = max(scores, key=scores.get)
    exact = "exactly" if scores[best] == 1.0 else f"most closely ({scores[best]:.0%} of the tensors match)"
    return f"{best}(num_classes={num_classes}) {exact}"


def load_checkpoint(model, checkpoint, key=None):
    """Load a GLNet checkpoint (a path or a loaded dict, released or trained here) strictly; a mismatch raises
    an InputError that lists the first missing, unexpected and wrongly shaped tensors and names the variant it
    looks like. A backbone (num_classes=0) takes every tensor but the classifiers'."""
    state_dict = unwrap_state_dict(read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike))
                                   else checkpoint, key)
    if model.num_classes == 0:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "token_head."))}
    expected = model.state_dict()
    problems = {"missing": [k for k in expected if k not in state_dict],
                "unexpected": [k for k in state_dict if k not in expected],
                "wrongly shaped": [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
                                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]}
    if any(problems.values()):   # one line, as the scripts print their usage errors
        counts = ", ".join(f"{len(v)} {k}" for k, v in problems.items())
        listed = "".join(f"; {k}: {', '.join(v[:5])}{', ...' * (len(v) > 5)}" for k, v in problems.items() if v)
        raise InputError(f"checkpoint does not match {type(model).__name__}: {counts} tensors{listed}; the checkpoint "
                         f"looks like {guess_variant(state_dict)}")
    model.load_state_dict(state_dict)
    return model


# --- Parameters and FLOPs: `python glnet.py` -----------------------------------------------------

def count_params(model):
    return sum(p.numel() for p in model.parameters())


def sdpa_flop_handle(inputs, outputs):
    """fvcore lacks aten::scaled_dot_product_attention: Q K^T and A V in multiply-accumulates."""
    from fvcore.nn.jit_handles import get_shape
    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, n, d = q
    return math.prod(batch) * n * k[-2] * (d + v[-1])


def flop_analysis(module, inputs):
    """fvcore's FlopCountAnalysis, plus the attention handle fvcore lacks."""
    with warnings.catch_warnings():  # fvcore's import uses the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    flops = FlopCountAnalysis(module, inputs).set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    return flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


def count_flops(model, image_size=224):
    """GFLOPs of one image in eval mode (multiply-accumulates, as the paper counts them), by fvcore."""
    training = model.training
    flops = flop_analysis(model.eval(), torch.zeros(1, model.in_chans, image_size, image_size)).total() / 1e9
    model.train(training)
    return flops


def main():
    parser = argparse.ArgumentParser(description="Parameters and FLOPs of the GLNet variants against the paper.")
    parser.add_argument("--models", nargs="+", default=list(RELEASED), choices=list(MODELS))
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    print(f"{'model':<22}{'params (M)':>11}{'paper':>7}{'GFLOPs':>9}{'paper':>7}{'top-1':>7}"
          f"   (GFLOPs at {args.image_size}x{args.image_size}: multiply-accumulates, attention included)")
    for name in args.models:
        model = create_model(name)
        params, flops = count_params(model) / 1e6, count_flops(model, args.image_size)
        paper = "".join(f"{v:>7.1f}" for v in PAPER[name]) if name in PAPER else f"{'-':>7}" * 3
        print(f"{name:<22}{params:>11.2f}{paper[:7]}{flops:>9.2f}{paper[7:]}")


if __name__ == "__main__":
    main()
