"""The ``mask`` space (Eq. 35-36): a masked patch is replaced by ``mask_token`` before the blocks,
so the encoder cannot see its pixels; the loss is on the masked patches only."""

from __future__ import annotations

import torch

from opera.backbones import create_backbone
from opera.supervisions.base import Stage
from opera.supervisions.masked import MaskedImageSpace, MaskOptions, patchify

IMG, PATCH = 16, 4  # 16 patches per image


def encode_with_mask(space, backbone, x: torch.Tensor, seed: int = 7):
    """The masked encoder's tokens for ``x`` (one view) and the mask drawn; the same ``seed``
    draws the same mask."""
    stage = Stage([x], None, [{}])
    encode = space.wrap_encoder(None, stage, backbone)
    torch.manual_seed(seed)
    with torch.no_grad():
        tokens = encode(x, [0])
    return tokens, stage.extras["mask/masks"][0]


def pixels_of_patch(x: torch.Tensor, row: int, patch: int) -> tuple[int, slice, slice]:
    per_row = IMG // PATCH
    r, c = divmod(patch, per_row)
    return row, slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)


def test_masked_patches_cannot_see_their_pixels():
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", img_size=IMG, patch_size=PATCH).eval()
    space = MaskedImageSpace(backbone, MaskOptions(ratio=0.5))
    x = torch.randn(2, 3, IMG, IMG)
    tokens, mask = encode_with_mask(space, backbone, x)
    assert mask.shape == (2, 16) and mask.sum(1).tolist() == [8, 8]

    masked, visible = mask[0].nonzero().flatten().tolist(), (~mask[0]).nonzero().flatten().tolist()
    changed = x.clone()
    for p in masked:  # new pixels in every masked patch of image 0
        b, rows, cols = pixels_of_patch(x, 0, p)
        changed[b, :, rows, cols] = torch.randn(3, PATCH, PATCH) * 5
    tokens2, mask2 = encode_with_mask(space, backbone, changed)
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(tokens2, tokens, rtol=0, atol=0)  # every position, every token

    # control: the same change on one visible patch does reach the encoder's output
    control = x.clone()
    b, rows, cols = pixels_of_patch(x, 0, visible[0])
    control[b, :, rows, cols] = torch.randn(3, PATCH, PATCH) * 5
    tokens3, _ = encode_with_mask(space, backbone, control)
    assert not torch.allclose(tokens3[0], tokens[0])
    torch.testing.assert_close(tokens3[1], tokens[1], rtol=0, atol=0)  # image 1 untouched


def test_masked_positions_hold_the_mask_token():
    """At the input of the blocks, a masked position is ``mask_token`` (+ its position embedding),
    whatever the image: the tokens of two different images agree exactly there."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", img_size=IMG, patch_size=PATCH).eval()
    space = MaskedImageSpace(backbone, MaskOptions(ratio=0.25))
    seen = []
    hook = backbone.blocks.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    a, b = torch.randn(1, 3, IMG, IMG), torch.randn(1, 3, IMG, IMG)
    _, mask_a = encode_with_mask(space, backbone, a)
    _, mask_b = encode_with_mask(space, backbone, b)
    hook.remove()
    assert torch.equal(mask_a, mask_b) and mask_a.sum() == 4
    prefix = backbone.num_prefix_tokens
    inputs_a, inputs_b = seen[0][0, prefix:], seen[1][0, prefix:]
    torch.testing.assert_close(inputs_a[mask_a[0]], inputs_b[mask_b[0]], rtol=0, atol=0)
    assert not torch.allclose(inputs_a[~mask_a[0]], inputs_b[~mask_b[0]])


def test_patchify_is_row_major_like_the_vit_tokens():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    torch.testing.assert_close(p[1, 1].reshape(4, 4, 3).permute(2, 0, 1), x[1, :, 0:4, 4:8])  # top right
    torch.testing.assert_close(p[0, 2].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 4:8, 0:4])  # bottom left


def test_mask_loss_is_eq36_on_the_masked_patches_of_each_view():
    """J^mask (Eq. 36) written out: the linear decoder's prediction of MAE's per-patch normalised
    pixels (mean 0, unbiased var 1 per patch), squared error averaged over the masked patches of
    each view, then the mean over the views, times the weight. The masks are the ones the
    encoder drew for each view (view 1's first half of the batch is view 1's)."""
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny", img_size=IMG, patch_size=PATCH).eval()
    space = MaskedImageSpace(backbone, MaskOptions(ratio=0.5, weight=0.7))
    assert space.options.norm_pix and abs(float(space.mask_token.detach().std()) - 0.02) < 0.005  # SimMIM/MAE init
    views = [torch.randn(3, 3, IMG, IMG), torch.randn(3, 3, IMG, IMG)]
    stage = Stage(views, None, [{}, {}])
    encode = space.wrap_encoder(None, stage, backbone)
    with torch.no_grad():
        tokens = encode(torch.cat(views), [0, 1])  # both views in one batch: masks split by view
        for i in range(2):
            stage.reps[i]["tokens"] = tokens[3 * i:3 * (i + 1)]
        loss = space(stage, [0, 1]).loss
    masks = stage.extras["mask/masks"]
    assert masks[0].shape == masks[1].shape == (3, 16) and not torch.equal(masks[0], masks[1])

    def view_loss(i):
        pred = space.decoder(stage.reps[i]["tokens"][:, backbone.num_prefix_tokens:])
        x = views[i]
        target = torch.stack([x[b, :, r:r + PATCH, c:c + PATCH].permute(1, 2, 0).reshape(-1)
                              for b in range(3) for r in range(0, IMG, PATCH) for c in range(0, IMG, PATCH)]).view(3, 16, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        err = ((pred - target) ** 2).mean(-1)
        return err[masks[i]].mean()

    with torch.no_grad():
        want = 0.7 * (view_loss(0) + view_loss(1)) / 2
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
