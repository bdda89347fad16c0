"""MoCo-v3's changes to a timm ViT: fixed 2-D sin-cos position embedding, its initialisation,
and the optional stop-gradient after the patch embedding (a frozen random patch projection).

They change values and ``requires_grad`` flags only, never parameter names, so the weights still
load into the plain timm model of the same name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # timm is imported where a model is built (opera.backbones.factory)
    from timm.models.vision_transformer import VisionTransformer


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(grid_h*grid_w, dim) fixed 2-D sin-cos embedding; a quarter of the channels per sin/cos of h/w.

    Channel order as MoCo-v3's ``build_2d_sincos_position_embedding``: [sin, cos] of the row, then
    [sin, cos] of the column of each row-major token (its ``meshgrid(w, h)`` with 'ij' indexing makes
    its ``grid_w`` the row index), so for square grids the tensor is MoCo-v3's exactly.
    """
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be a multiple of 4 for the 2-D sin-cos embedding")
    gh, gw = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = gw.flatten()[:, None] * omega[None]
    out_h = gh.flatten()[:, None] * omega[None]
    return torch.cat([out_h.sin(), out_h.cos(), out_w.sin(), out_w.cos()], dim=1)


@torch.no_grad()
def mocov3_vit_init(model: VisionTransformer, stop_grad_patch_embed: bool = False) -> None:
    """Initialise ``model`` as MoCo-v3 does (sin-cos position embedding, xavier init with the
    qkv projection treated as three matrices, uniform patch projection, tiny class token)."""
    gh, gw = model.patch_embed.grid_size
    pe = sincos_2d_position_embedding(gh, gw, model.embed_dim)
    if model.num_prefix_tokens and not getattr(model, "no_embed_class", False):
        pe = torch.cat([torch.zeros(model.num_prefix_tokens, model.embed_dim), pe], dim=0)
    model.pos_embed.copy_(pe[None])
    model.pos_embed.requires_grad = False
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    ph, pw = model.patch_embed.patch_size
    bound = math.sqrt(6.0 / float(3 * ph * pw + model.embed_dim))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    if stop_grad_patch_embed:
        proj.weight.requires_grad = False
        proj.bias.requires_grad = False
