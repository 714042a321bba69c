"""The training recipe's parts, each built by timm from a :class:`~atmerge.finetune.FinetuneConfig`:
training transform, loss, Mixup/CutMix, optimiser and learning-rate schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from atmerge.finetune import FinetuneConfig


def train_transform(model: nn.Module, config: FinetuneConfig, normalization=None):
    """timm's training preprocessing for ``model`` with the config's augmentation (random resized
    crop, flip, RandAugment or colour jitter, random erasing) at the model's image size.
    normalization: (mean, std); default the model's timm data config."""
    import timm.data

    timm_config = timm.data.resolve_data_config({}, model=model)
    mean, std = normalization or (tuple(timm_config["mean"]), tuple(timm_config["std"]))
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or timm_config["input_size"][1:]
    transform = timm.data.create_transform(
        input_size=(3, *size),
        is_training=True,
        scale=(config.crop_scale_min, 1.0),
        hflip=config.hflip,
        color_jitter=config.color_jitter,
        auto_augment=config.aa,
        interpolation=config.train_interpolation,
        mean=mean,
        std=std,
        re_prob=config.reprob,
        re_mode=config.remode,
    )
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):  # timm's RandAugment / AutoAugment operations
            if getattr(op, "aug_fn", None) is timm.data.auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def posterize(img, bits_to_keep: int, **_):
    """timm's posterize, keeping 0 bits as Pillow used to (a black image): timm's increasing
    RandAugment ('inc1', DeiT's policy) asks for 0 bits at magnitude 10, which Pillow 13 refuses."""
    from PIL import Image
    from timm.data.auto_augment import posterize as timm_posterize

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return timm_posterize(img, bits_to_keep)


def criterion(config: FinetuneConfig) -> nn.Module:
    """The loss: soft-target cross-entropy under Mixup/CutMix (the mixed targets carry the label
    smoothing), else label-smoothing cross-entropy, else plain cross-entropy (timm's rule)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if config.mixing:
        return SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.smoothing)
    return nn.CrossEntropyLoss()


def mixer(config: FinetuneConfig, num_classes: int):
    """timm's Mixup/CutMix (targets become smoothed mixed one-hots [B, num_classes]); None when off."""
    from timm.data import Mixup

    if not config.mixing:
        return None
    return Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        prob=config.mixup_prob,
        switch_prob=config.mixup_switch_prob,
        label_smoothing=config.smoothing,
        num_classes=num_classes,
    )


def optimizer_and_schedule(model: nn.Module, config: FinetuneConfig, updates_per_epoch: int):
    """timm's optimiser (no weight decay on 1-D weights and the model's ``no_weight_decay()``
    names: norms, biases, position embedding, tokens) and its learning-rate schedule, stepped per
    epoch (``scheduler.step(epoch)``) or per update (``step_update``) as configured."""
    import timm.optim
    import timm.scheduler

    optimizer = timm.optim.create_optimizer_v2(model, opt=config.opt, lr=config.lr, weight_decay=config.weight_decay)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        min_lr=config.min_lr,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        step_on_epochs=not config.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler
