"""The masked-image-modeling space ``mask`` at the base of the hierarchy (Appendix E, Eq. 35-36).

Y^mask = Y (Eq. 35): the backbone's own token representation. A fraction ``ratio`` of the patches
of each online view is replaced by a learnable ``mask_token`` before the transformer blocks, and a
light ``decoder`` (one linear layer per token) reconstructs the normalised pixels of the masked
patches; J^mask is the mean squared error on the masked patches only (Eq. 36).

Why SimMIM-style (mask tokens in the encoder, linear decoder) rather than MAE-style (drop the
masked tokens, deep decoder): the same forward pass must also give the class token that the
``self`` and ``full`` spaces stack on, and the encoder should see every position as at test time.
The targets are MAE's per-patch normalised pixels (``norm_pix``), which MAE found to help. The
momentum encoder of ``self`` sees the unmasked views, so the instance space asks the masked view
to agree with its full view (as in iBOT/MSN).

CNN backbones have no tokens to mask; ``mask`` on one is a one-line error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from opera.errors import OperaError
from opera.fields import option
from opera.supervisions.base import SPACES, BuildContext, Encoder, SpaceOutput, Stage, TaskSpace
from opera.supervisions.losses import masked_patch_loss


@dataclass
class MaskOptions:
    ratio: float = option(0.5, help="fraction of patches masked in each online view", min=0, max=1,
                          min_exclusive=True, max_exclusive=True)
    weight: float = option(1.0, help="loss weight", min=0)
    norm_pix: bool = option(True, help="per-patch normalised pixel targets (MAE)")


def random_patch_mask(batch: int, num_patches: int, ratio: float, device: torch.device) -> torch.Tensor:
    """(batch, num_patches) bool, exactly ``round(ratio * num_patches)`` True per row."""
    n_mask = int(round(ratio * num_patches))
    order = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    return order < n_mask


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch*patch*C) in row-major patch order (as the ViT's tokens)."""
    return rearrange(images, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)


@SPACES.register("mask")
class MaskedImageSpace(TaskSpace):
    """Masked image modeling on the patch tokens of a ViT backbone."""

    name = "mask"
    level = 0
    Options = MaskOptions
    token_only = True

    def __init__(self, backbone: nn.Module, options: MaskOptions):
        super().__init__()
        if not 0.0 < options.ratio < 1.0:
            raise OperaError(f"mask.ratio must be in (0, 1), got {options.ratio}")
        self.options = options
        self.patch = backbone.patch_embed.patch_size[0]
        self.num_prefix_tokens = backbone.num_prefix_tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        in_chans = backbone.patch_embed.proj.in_channels
        self.decoder = nn.Linear(backbone.embed_dim, self.patch * self.patch * in_chans)

    @classmethod
    def build(cls, ctx: BuildContext, options: MaskOptions) -> "MaskedImageSpace":
        if not ctx.token_backbone:
            name = getattr(getattr(ctx.backbone, "opera_spec", None), "name", type(ctx.backbone).__name__)
            raise OperaError(
                f"'mask' needs a token (ViT) backbone but {name!r} is a CNN; "
                "use --backbone vit_tiny / deit_small / deit_base, or drop 'mask' from the hierarchy"
            )
        return cls(ctx.backbone, options)

    def wrap_encoder(self, encode: Encoder, stage: Stage, backbone: nn.Module) -> Encoder:
        """Mask each online view's patch embeddings with ``mask_token`` before the blocks."""
        masks: dict[int, torch.Tensor] = stage.extras.setdefault(self.key("masks"), {})  # view id -> mask, once per step

        def masked_encode(x: torch.Tensor, view_ids: list[int]) -> torch.Tensor:
            tokens = backbone.patch_embed(x)
            m = random_patch_mask(tokens.shape[0], tokens.shape[1], self.options.ratio, x.device)
            masks.update(zip(view_ids, m.chunk(len(view_ids), dim=0)))
            w = m.unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
            tokens = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(tokens)))
            return backbone.norm(backbone.blocks(tokens))

        return masked_encode

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        """Terms of views ``ids``: ``weight * L_mask(view_i) / n`` each, so all n views give
        ``weight`` times the mean over views of Eq. 36's masked-patch loss."""
        masks = stage.extras[self.key("masks")]
        losses = []
        for i in ids:
            patch_tokens = stage.reps[i]["tokens"][:, self.num_prefix_tokens:]
            pred = self.decoder(patch_tokens)
            target = patchify(stage.views[i], self.patch)
            if self.options.norm_pix:
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                target = (target - mean) / (var + 1e-6).sqrt()
            losses.append(masked_patch_loss(pred, target, masks[i]))
        mim = torch.stack(losses).sum() / len(stage.views)
        return SpaceOutput(self.options.weight * mim, {self.key("mse"): mim.detach()})
