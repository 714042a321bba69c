"""Fine-tuning with merging in the loop (the paper's Table 4 / A3): a patched model trained with
its merges in the forward pass.  Gradients flow through the size-weighted merges and
proportional attention; which tokens merge is decided without gradients.

    result = atmerge.finetune(model, atmerge.ATM(0.99, 0.04, 0.88), "train/", "val/",
                              atmerge.FinetuneConfig(epochs=30, batch_size=256))

The defaults are the paper's recipe (Appendix A: 30 epochs, cosine decay 2e-5 → 3e-6, no
warm-up) with everything else as DeiT trains (AdamW, weight decay 0.05, label smoothing 0.1,
Mixup 0.8 / CutMix 1.0, RandAugment m9, random erasing 0.25), each built from timm's parts.
Under ``torchrun`` every process trains a shard of each batch (DistributedDataParallel);
``batch_size`` is the global batch of one optimiser step, so the result does not depend on the
number of processes (see :func:`finetune` for the exceptions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from atmerge import data, distributed, resume
from atmerge.api import is_patched, last_stats, patch
from atmerge.api import gflops as dense_gflops
from atmerge.evaluate import EvalResult, evaluate
from atmerge.results_io import write_csv, write_json
from atmerge.methods.base import Method, check_number
from atmerge.methods.registry import method_settings
from atmerge.models.adapter import check_supported
from atmerge.models.patching import merge_state
from atmerge.recipe import criterion, mixer, optimizer_and_schedule, train_transform

SCHEDULES = ("cosine", "tanh", "poly", "constant")
PRECISIONS = ("none", "bf16", "fp16")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class FinetuneConfig:
    """Every choice of a fine-tuning run; each field is also an ``atmerge finetune`` flag
    (``--min-lr``, ``--no-model-ema``, …).  Learning rates are per optimiser step of
    ``batch_size`` images (not scaled by the batch)."""

    epochs: int = field(default=30, metadata=_help("epochs to train (paper: 30)"))
    lr: float = field(default=2e-5, metadata=_help("initial learning rate (paper: 2e-5)"))
    min_lr: float = field(default=3e-6, metadata=_help("final learning rate of the decay (paper: 3e-6)"))
    sched: str = field(default="cosine", metadata=_help(f"learning-rate schedule, timm: {', '.join(SCHEDULES)}"))
    sched_on_updates: bool = field(default=False, metadata=_help("step the schedule every update, not every epoch"))
    warmup_epochs: int = field(default=0, metadata=_help("linear warm-up epochs (paper: 0)"))
    warmup_lr: float = field(default=1e-6, metadata=_help("learning rate the warm-up starts from"))
    opt: str = field(default="adamw", metadata=_help("optimiser, any name of timm.optim.list_optimizers()"))
    weight_decay: float = field(default=0.05, metadata=_help("decoupled weight decay (DeiT: 0.05)"))
    clip_grad: float | None = field(default=None, metadata=_help("clip the gradient norm to this (none: off)"))
    batch_size: int = field(default=256, metadata=_help("images per optimiser step, over all processes"))
    accum_steps: int = field(default=1, metadata=_help("micro-batches accumulated into one step"))
    smoothing: float = field(default=0.1, metadata=_help("label smoothing (DeiT: 0.1)"))
    mixup: float = field(default=0.8, metadata=_help("Mixup alpha, 0 = off (DeiT: 0.8)"))
    cutmix: float = field(default=1.0, metadata=_help("CutMix alpha, 0 = off (DeiT: 1.0)"))
    mixup_prob: float = field(default=1.0, metadata=_help("probability that a batch is mixed"))
    mixup_switch_prob: float = field(default=0.5, metadata=_help("probability of CutMix rather than Mixup"))
    aa: str | None = field(default="rand-m9-mstd0.5-inc1", metadata=_help("timm auto-augment policy (none: off)"))
    color_jitter: float = field(default=0.3, metadata=_help("colour jitter (timm ignores it under RandAugment)"))
    reprob: float = field(default=0.25, metadata=_help("random-erasing probability (DeiT: 0.25)"))
    remode: str = field(default="pixel", metadata=_help("random-erasing fill: const, rand or pixel"))
    crop_scale_min: float = field(default=0.08, metadata=_help("smallest area share of the random resized crop"))
    hflip: float = field(default=0.5, metadata=_help("horizontal-flip probability"))
    train_interpolation: str = field(default="bicubic", metadata=_help("resize interpolation of training images"))
    model_ema: bool = field(
        default=False,
        metadata=_help("keep an EMA of the weights (timm ModelEmaV3); then validation and saved weights are the EMA's"),
    )
    model_ema_decay: float = field(default=0.99996, metadata=_help("EMA decay per update (DeiT: 0.99996)"))
    amp: str = field(
        default="none", metadata=_help("mixed precision: none, bf16 (CPU or GPU) or fp16 (GPU, with a gradient scaler)")
    )
    device: str = field(default="cpu", metadata=_help("cpu or cuda (under torchrun: each process its LOCAL_RANK GPU)"))
    workers: int = field(default=0, metadata=_help("data-loading worker processes per training process"))
    seed: int = field(default=0, metadata=_help("seed of shuffling, augmentation and mixing"))
    train_limit: int | None = field(default=None, metadata=_help("train on a seeded subset of N images"))
    val_limit: int | None = field(default=None, metadata=_help("validate on a seeded subset of N images"))
    val_batch_size: int = field(default=64, metadata=_help("validation batch (batch-adaptive merging depends on it)"))
    out: str = field(default="results/finetune", metadata=_help("folder for weights, checkpoint and logs"))
    resume: str | None = field(default=None, metadata=_help("checkpoint.pt of an earlier run to continue exactly"))
    stop_at_epoch: int | None = field(
        default=None, metadata=_help("end this run once N epochs are done (a time-boxed job); --resume continues it")
    )
    progress: bool = field(default=True, metadata=_help("a progress bar per epoch"))

    def __post_init__(self) -> None:
        for name, low in (
            ("epochs", 1),
            ("batch_size", 1),
            ("accum_steps", 1),
            ("val_batch_size", 1),
            ("warmup_epochs", 0),
            ("workers", 0),
            ("seed", 0),
        ):
            _check_int(name, getattr(self, name), low)
        for name in ("train_limit", "val_limit", "stop_at_epoch"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0.0, math.inf, low_open=True)
        if self.clip_grad is not None:
            check_number("clip_grad", self.clip_grad, 0.0, math.inf, low_open=True)
        for name in ("min_lr", "warmup_lr", "weight_decay", "mixup", "cutmix"):
            check_number(name, getattr(self, name), 0.0, math.inf)
        for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip", "color_jitter", "smoothing"):
            check_number(name, getattr(self, name), 0.0, 1.0)
        for name in ("crop_scale_min", "model_ema_decay"):
            check_number(name, getattr(self, name), 0.0, 1.0, low_open=True)
        for name, low in (("smoothing", "[0.0"), ("model_ema_decay", "(0.0")):
            if getattr(self, name) == 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; allowed {low}, 1.0)")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} is above lr={self.lr}; the schedule decays from lr to min_lr")
        if self.stop_at_epoch is not None and self.stop_at_epoch > self.epochs:
            raise ValueError(f"stop_at_epoch={self.stop_at_epoch} is beyond epochs={self.epochs}")
        _check_choice("sched", self.sched, SCHEDULES)
        _check_choice("amp", self.amp, PRECISIONS)
        _check_choice("remode", self.remode, ("const", "rand", "pixel"))
        import timm.optim

        _check_choice("opt", self.opt.lower(), timm.optim.list_optimizers())

    @property
    def mixing(self) -> bool:
        """Whether Mixup or CutMix is on."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value: object, allowed) -> None:
    if value not in allowed:
        shown = ", ".join(allowed) if len(allowed) <= 12 else "the names of timm.optim.list_optimizers()"
        raise ValueError(f"{name}={value!r} is not supported; choose one of {shown}")


@dataclass
class FinetuneResult:
    """A finished run.  epochs: one dict per epoch (the rows of finetune.csv); train_seconds: time
    in training steps over all epochs (the paper's Table 4 column, resumed runs included);
    total_seconds: training plus validation; files: paths of the weights, checkpoint and logs."""

    epochs: list[dict]
    best_epoch: int | None
    best_val_top1: float | None
    train_seconds: float
    total_seconds: float
    files: dict[str, str]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dataset(source, transform, limit: int | None, seed: int, role: str):
    """A folder (ImageFolder with ``transform``) or a Dataset of (image, label) as it is; a seeded
    subset of ``limit`` items."""
    if isinstance(source, (str, Path)):
        dataset = data.image_folder(source, transform)
    elif isinstance(source, torch.utils.data.Dataset):
        dataset = source
    else:
        raise TypeError(
            f"{role} must be a folder of class folders or a torch Dataset of (image, label), "
            f"got {type(source).__name__}"
        )
    return data.subset(dataset, limit, seed)


def _autocast(config: FinetuneConfig, device: torch.device):
    if config.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _micro_batch(config: FinetuneConfig, processes: int) -> int:
    """Images per forward pass of one process."""
    parts = processes * config.accum_steps
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by processes ({processes}) × "
            f"accum_steps ({config.accum_steps}) = {parts}"
        )
    micro = config.batch_size // parts
    if config.mixing and micro % 2:
        raise ValueError(
            f"Mixup/CutMix mix pairs of images and needs an even micro-batch, got {micro} "
            f"(batch_size / processes / accum_steps); change batch_size or turn mixing off"
        )
    return micro


class _Run:
    """The objects of one run: model (and its DDP wrapper), data, optimiser, schedule, EMA."""

    def __init__(self, model: nn.Module, train_set, val_set, config: FinetuneConfig, world: distributed.World):
        self.config, self.world, self.module = config, world, model
        micro = _micro_batch(config, world.size)
        self.sampler = torch.utils.data.DistributedSampler(
            train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed, drop_last=True
        )
        self.loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=micro,
            sampler=self.sampler,
            num_workers=config.workers,
            drop_last=True,
            pin_memory=world.device.type == "cuda",
        )
        self.updates_per_epoch = len(self.loader) // config.accum_steps
        if self.updates_per_epoch == 0:
            raise ValueError(
                f"{len(train_set)} training images make no full batch of batch_size={config.batch_size}; "
                "pass more images or a smaller batch_size"
            )
        self.val_set = val_set
        self.net = model
        if world.size > 1:
            ids = [world.device.index] if world.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        import timm.utils

        self.optimizer, self.scheduler = optimizer_and_schedule(model, config, self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp == "fp16")
        self.ema = timm.utils.ModelEmaV3(model, decay=config.model_ema_decay) if config.model_ema else None
        self.criterion = criterion(config)
        self.mixer = mixer(config, model.num_classes)
        self.updates = 0

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved: the EMA's when on."""
        return self.module if self.ema is None else self.ema.module

    def train_epoch(self, epoch: int) -> dict:
        """One epoch; returns the global mean loss, images, seconds and train-mode GFLOPs per image."""
        config, world = self.config, self.world
        self.sampler.set_epoch(epoch)
        self.module.train()
        steps = self.updates_per_epoch * config.accum_steps
        lr = self.optimizer.param_groups[0]["lr"]
        bar = _bar(steps, f"epoch {epoch + 1}/{config.epochs}", config.progress and world.main)
        loss_sum = images = gflops_sum = 0.0
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.loader):
            if i >= steps:
                break
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            if self.mixer is not None:
                x, y = self.mixer(x, y)
            step_now = (i + 1) % config.accum_steps == 0
            sync = contextlib.nullcontext() if step_now or world.size == 1 else self.net.no_sync()
            with sync:
                with _autocast(config, world.device):
                    loss = self.criterion(self.net(x), y)
                self.scaler.scale(loss / config.accum_steps).backward()
            n = x.shape[0]
            loss_sum += loss.item() * n
            images += n
            gflops_sum += self._forward_gflops(x) * n
            if step_now:
                self._step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}")
        _sync(world.device)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        loss_sum, images, gflops_sum = distributed.sum_floats([loss_sum, images, gflops_sum])
        seconds = max(distributed.gather(seconds))
        return {
            "lr": lr,
            "train_loss": loss_sum / images,
            "train_images": int(images),
            "train_seconds": seconds,
            "train_images_per_s": images / seconds,
            "train_gflops": gflops_sum / images,
        }

    def _forward_gflops(self, x: torch.Tensor) -> float:
        if is_patched(self.module):
            return last_stats(self.module).gflops
        return dense_gflops(self.module, tuple(x.shape[1:]))

    def _step(self) -> None:
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.ema is not None:
            self.ema.update(self.module, step=self.updates)
        self.scheduler.step_update(num_updates=self.updates)

    def validate(self) -> EvalResult:
        """The merged model's top-1 and GFLOPs on the validation set, each process a shard of
        its batches, reduced exactly."""
        loader = distributed.shard_loader(self.val_set, self.config.val_batch_size, self.config.workers)
        result = None
        if len(loader):
            with _autocast(self.config, self.world.device):
                result, _ = evaluate(self.eval_model, loader, device=self.world.device)
        self.module.train()
        return distributed.reduce_eval(result)

    def state(self, epoch: int, log: list[dict], best: dict, seconds: dict) -> dict:
        """Everything an exact resume needs (the random states of every process included)."""
        return {
            "fingerprint": resume.fingerprint(self.module),
            "epoch": epoch,
            "updates": self.updates,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "rng": distributed.gather(resume.rng_state()),
            "log": log,
            "best": best,
            "seconds": seconds,
            "config": dataclasses.asdict(self.config),
        }

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.updates = state["updates"]
        if self.ema is not None:
            if state["ema"] is None:
                warnings.warn("the resumed run kept no EMA; the EMA starts from the resumed weights", stacklevel=3)
            else:
                self.ema.module.load_state_dict(state["ema"])
        if len(state["rng"]) == self.world.size:
            resume.set_rng_state(state["rng"][self.world.rank])
        else:
            warnings.warn(
                f"the checkpoint was written by {len(state['rng'])} processes and {self.world.size} resume "
                "it: shuffling continues, augmentation draws new random numbers",
                stacklevel=3,
            )
            resume.seed_everything(self.config.seed + 1000 * state["epoch"] + self.world.rank)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def finetune(
    model: nn.Module,
    method: Method | str | Path | None,
    train_data,
    val_data,
    config: FinetuneConfig | None = None,
    *,
    prop_attn: bool | None = None,
    prune_last_block: bool | None = None,
    notes: dict | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (a timm ViT classifier) with ``method``'s merges in its forward pass.

    method: an atmerge method or a calibration config, patched with ``prop_attn`` and
        ``prune_last_block`` (see :func:`atmerge.patch`); None trains the model as it is
        (patched or not: the unmerged control).
    train_data, val_data: folders of class folders (ImageFolder; training images get
        :func:`train_transform`, validation images the model's timm evaluation preprocessing) or
        Datasets of (image [3, H, W], label) used as they are.
    config: every choice; see :class:`FinetuneConfig`.  Writes into ``config.out``:
        ``checkpoint.pt`` (every epoch; ``config.resume`` continues it exactly), ``last.safetensors``
        and ``best.safetensors`` (by validation top-1; loadable by ``timm.create_model`` +
        ``load_state_dict``), ``finetune.json`` and ``finetune.csv`` (one row per epoch: loss, lr,
        validation top-1 and GFLOPs per image of the merged model, seconds, images/s).
    notes: JSON-ready facts stored in finetune.json (e.g. how the model was built).

    Under ``torchrun`` each process trains ``batch_size / processes`` images of every step and
    only rank 0 writes; losses, images/s and validation are reduced over all processes.  The
    result equals a single process's with the same ``batch_size`` up to float summation order,
    except where merges depend on the batch (batch-adaptive r: each process's micro-batch is its
    own batch, as with ``accum_steps``) and for random draws (augmentation, Mixup: each process
    draws its own).  The model is left in eval mode holding the last epoch's weights (not the
    EMA's).
    """
    config = FinetuneConfig() if config is None else config
    if not isinstance(config, FinetuneConfig):
        raise TypeError(f"config must be an atmerge.FinetuneConfig, got {type(config).__name__}")
    check_supported(model)
    if not getattr(model, "num_classes", 0):
        raise ValueError("finetune trains a classifier; this model has num_classes=0 (no head)")
    if config.amp == "fp16" and distributed.parse_device(config.device).type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (device={config.device!r}); use amp='bf16' on CPU")
    train_set = _dataset(train_data, train_transform(model, config), config.train_limit, config.seed, "train_data")
    val_set = _dataset(val_data, data.model_transform(model), config.val_limit, config.seed, "val_data")
    if method is not None:
        patch(model, method, prop_attn=prop_attn, prune_last_block=prune_last_block)
    state = resume.load_checkpoint(config.resume, model) if config.resume else None
    if state is not None and state["epoch"] >= config.epochs:
        raise ValueError(
            f"resume checkpoint {config.resume} is at epoch {state['epoch']} of epochs="
            f"{config.epochs}; raise epochs to train longer"
        )
    world = distributed.init(config.device)
    model.to(world.device)
    resume.seed_everything(config.seed + world.rank)
    run = _Run(model, train_set, val_set, config, world)
    log: list[dict] = []
    best: dict = {"epoch": None, "val_top1": None}
    seconds = {"train": 0.0, "total": 0.0}
    start_epoch = 0
    if state is not None:
        run.load(state)
        _warn_changed(state["config"], config)
        start_epoch, log, best, seconds = state["epoch"], state["log"], state["best"], state["seconds"]
    out = Path(config.out)
    files = {
        name: str(out / name)
        for name in ("checkpoint.pt", "last.safetensors", "best.safetensors", "finetune.json", "finetune.csv")
    }
    described = {
        "method": method_settings(merge_state(model).method) if is_patched(model) else None,
        "prop_attn": merge_state(model).prop_attn if is_patched(model) else None,
        "prune_last_block": merge_state(model).prune_last if is_patched(model) else None,
        "model": type(model).__name__,
        "processes": world.size,
        "device": str(world.device),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "notes": notes or {},
    }
    stop = config.stop_at_epoch or config.epochs
    for epoch in range(start_epoch, stop):
        began = time.perf_counter()
        row = {"epoch": epoch + 1, **run.train_epoch(epoch)}
        val = run.validate()
        row.update(
            val_top1=val.top1, val_top5=val.top5, val_gflops=val.gflops, val_images=val.images, val_seconds=val.seconds
        )
        run.scheduler.step(epoch + 1)
        row["epoch_seconds"] = max(distributed.gather(time.perf_counter() - began))
        seconds = {"train": seconds["train"] + row["train_seconds"], "total": seconds["total"] + row["epoch_seconds"]}
        improved = val.top1 is not None and (best["val_top1"] is None or val.top1 > best["val_top1"])
        if improved:
            best = {"epoch": epoch + 1, "val_top1": val.top1}
        row["best"] = improved
        log.append(row)
        state = run.state(epoch + 1, log, best, seconds)  # every process takes part (random states)
        if world.main:
            _write(run, state, described, files, improved, row)
    model.eval()
    result = FinetuneResult(log, best["epoch"], best["val_top1"], seconds["train"], seconds["total"], files)
    if world.main:
        write_json({**described, "config": dataclasses.asdict(config), **result.to_dict()}, files["finetune.json"])
        write_csv(log, files["finetune.csv"])
    distributed.barrier()  # the files exist for every process once finetune returns
    return result


RUN_ONLY = ("resume", "out", "stop_at_epoch", "progress", "workers", "device")


def _warn_changed(saved: dict, config: FinetuneConfig) -> None:
    """Warn when a resumed run is given other training choices than the saved run had (the saved
    optimiser and schedule states continue regardless)."""
    now = dataclasses.asdict(config)
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RUN_ONLY and saved.get(k) != now[k]]
    if changed:
        warnings.warn(
            "resuming with other settings than the checkpoint's (its optimiser and learning-rate "
            "schedule states continue): " + "; ".join(changed),
            stacklevel=3,
        )


def _write(run: _Run, state: dict, described: dict, files: dict, improved: bool, row: dict) -> None:
    """Rank 0's files after an epoch: weights (last, best), the checkpoint, the logs so far."""
    meta = {
        "epoch": row["epoch"],
        "val_top1": row["val_top1"],
        "val_gflops": row["val_gflops"],
        "method": described["method"],
    }
    resume.save_weights(Path(files["last.safetensors"]), run.eval_model, meta)
    if improved:
        resume.save_weights(Path(files["best.safetensors"]), run.eval_model, meta)
    resume.save_checkpoint(Path(files["checkpoint.pt"]), state)
    write_csv(state["log"], files["finetune.csv"])
