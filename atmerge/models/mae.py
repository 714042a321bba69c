"""The fine-tuned MAE ViT-B/16 (He et al., "Masked Autoencoders Are Scalable Vision Learners") as
``timm.create_model("mae_vit_base_ft")``: timm's ViT-B/16 with the fine-tuning head of the
official code (facebookresearch/mae) — global average pooling of the patch tokens with
``fc_norm``, no final norm — so that ``mae_finetuned_vit_base.pth`` (``{"model": ...}``) loads as
it is:

    model = timm.create_model("mae_vit_base_ft")
    atmerge.checkpoints.load_weights(model, "mae_finetuned_vit_base.pth")

Merging pools by merge size (every original patch counts once) and, as in the paper, runs
without proportional attention unless ``atmerge.patch(..., prop_attn=True)`` asks for it.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from atmerge.models.definitions import build


@register_model
def mae_vit_base_ft(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16, average pooling with fc_norm (17.6 GFLOPs)."""
    settings = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, global_pool="avg", fc_norm=True)
    model = build(VisionTransformer, "mae_vit_base_ft", pretrained, 0.875, "patch_embed.proj", **{**settings, **kwargs})
    model.atmerge_prop_attn = False  # the paper's MAE setting (read by the timm adapter)
    return model
