"""Fine-tuning with merging in the loop: learning, gradients, exact resume, saved weights that a
plain timm model loads, data parallelism under torchrun, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import atmerge
import ddp_finetune_worker as worker
from atmerge.cli import main
from atmerge.finetune import FinetuneConfig, finetune
from atmerge.recipe import criterion, train_transform
from conftest import blocky_images, small_vit

ATM_MERGING = atmerge.ATM(alpha=0.97, beta=0.05, theta_min=0.6)  # merges plenty on blocky images
TIMING = ("train_seconds", "train_images_per_s", "val_seconds", "epoch_seconds")


def _quiet(out: Path, **settings) -> FinetuneConfig:
    """A tiny run: no augmentation randomness unless asked, no progress bar."""
    return FinetuneConfig(
        **{
            "epochs": 1,
            "batch_size": 8,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "mixup": 0,
            "cutmix": 0,
            "progress": False,
            "out": str(out),
            **settings,
        }
    )


def _tensor_data(count: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(blocky_images(count, seed=seed), torch.arange(count) % 10)


def _image_folder(root: Path, per_class: int = 8, classes: int = 2) -> Path:
    """``classes`` class folders of blocky 32×32 PNGs (seeded)."""
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        pixels = blocky_images(per_class, seed=10 + c).clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1)
        for i, image in enumerate(pixels):
            Image.fromarray(image.numpy()).save(root / f"class{c}" / f"{i}.png")
    return root


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_loss_decreases_on_a_fixed_batch_with_merging_in_the_loop(tmp_path):
    data = _tensor_data(8)  # one batch, so every epoch is one step on the same images
    config = _quiet(tmp_path, epochs=6, sched="constant", smoothing=0.0)
    result = finetune(small_vit(), ATM_MERGING, data, data, config)
    losses = [row["train_loss"] for row in result.epochs]  # each the loss before that epoch's step
    assert losses[0] == pytest.approx(2.303, abs=0.01)  # ln 10: a fresh model guesses uniformly
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.15
    dense = atmerge.gflops(small_vit(), (3, 32, 32))
    assert all(row["train_gflops"] < 0.6 * dense and row["val_gflops"] < 0.6 * dense for row in result.epochs)


@pytest.mark.parametrize(
    "variant, method",
    [
        (dict(), ATM_MERGING),
        (dict(), atmerge.MCTF(r=6)),
        (dict(), atmerge.EViT(0.6, (2, 4))),
        (dict(class_token=False, global_pool="avg"), atmerge.ToMe(r=6)),
        (dict(reg_tokens=2, global_pool="avg", fc_norm=True), ATM_MERGING),
    ],
    ids=["ATM-cls-pruned-last-block", "MCTF", "EViT", "ToMe-avg-pool", "ATM-registers"],
)
def test_gradients_reach_every_weight_that_the_unmerged_models_reach(variant, method):
    # Nothing is excluded: with the CLS-only last block every token still feeds the last block's
    # attention (keys, values), and the CLS token carries the rest through its MLP and the head.
    x, y = blocky_images(4), torch.arange(4)
    loss = criterion(FinetuneConfig(mixup=0, cutmix=0))

    def reached(model: torch.nn.Module) -> set[str]:
        model.train()
        loss(model(x), y).backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    plain = small_vit(**variant)
    merged = atmerge.patch(copy.deepcopy(plain), method)
    expected = reached(plain)
    assert expected == {n for n, _ in plain.named_parameters()}
    assert reached(merged) == expected
    assert sum(atmerge.last_stats(merged).merged_per_block) > 0


def test_resume_after_epoch_one_equals_an_uninterrupted_run(tmp_path):
    # augmentation (RandAugment, random erasing), Mixup/CutMix and EMA all draw random numbers:
    # the checkpoint's random states make the resumed epoch draw the same ones
    images = _image_folder(tmp_path / "images")
    settings = dict(epochs=2, mixup=0.8, cutmix=1.0, model_ema=True, model_ema_decay=0.9)
    start = small_vit(num_classes=2)
    whole, first, rest = (copy.deepcopy(start) for _ in range(3))
    uninterrupted = finetune(whole, ATM_MERGING, images, images, _quiet(tmp_path / "a", **settings))
    finetune(first, ATM_MERGING, images, images, _quiet(tmp_path / "b", stop_at_epoch=1, **settings))
    resumed = finetune(
        rest,
        ATM_MERGING,
        images,
        images,
        _quiet(tmp_path / "c", resume=str(tmp_path / "b" / "checkpoint.pt"), **settings),
    )
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), rest.state_dict().values()))
    ema_a, ema_c = (load_file(tmp_path / d / "last.safetensors") for d in ("a", "c"))
    assert all(torch.equal(ema_a[k], ema_c[k]) for k in ema_a)
    assert _without_timing(resumed.epochs) == _without_timing(uninterrupted.epochs)
    assert not torch.equal(whole.state_dict()["head.weight"], start.state_dict()["head.weight"])


def test_saved_weights_load_into_plain_timm_and_atmerge_eval_reproduces_the_logged_top1(tmp_path):
    images = _image_folder(tmp_path / "images")
    tiny = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(worker.SMALL)]
    merging = ["--method", "atm", "--alpha", "0.97", "--beta", "0.05", "--theta-min", "0.6"]
    run = [
        "finetune",
        *tiny,
        *merging,
        "--data",
        str(images),
        "--val-data",
        str(images),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--val-batch-size",
        "16",
        "--no-progress",
        "--out",
        str(tmp_path / "ft"),
    ]
    assert main(run) == 0
    log = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    best = log["epochs"][log["best_epoch"] - 1]
    plain = timm.create_model("vit_tiny_patch16_224", **worker.SMALL)
    plain.load_state_dict(load_file(tmp_path / "ft" / "best.safetensors"))  # strict: every weight, nothing else
    # finetune took the two folders in sorted order as classes 0 and 1; eval is told so (the model has 10)
    (tmp_path / "classes.json").write_text(json.dumps({"class0": 0, "class1": 1}))
    evaluate = [
        "eval",
        *tiny,
        *merging,
        "--checkpoint",
        str(tmp_path / "ft" / "best.safetensors"),
        "--data",
        str(images),
        "--class-map",
        str(tmp_path / "classes.json"),
        "--batch-size",
        "16",
        "--no-progress",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert main(evaluate) == 0
    merged = json.loads((tmp_path / "eval" / "eval.json").read_text())["merged"]
    assert merged["top1"] == best["val_top1"] and merged["gflops"] == pytest.approx(best["val_gflops"], rel=1e-12)
    assert log["method"]["method"] == "atm" and log["train_seconds"] > 0 and len(log["epochs"]) == 2


def test_accumulated_micro_batches_equal_one_batch_and_bf16_trains(tmp_path):
    data = _tensor_data(16)
    method = atmerge.ToMe(r=4)  # decides image by image, so micro-batches merge as the whole batch does
    sgd = dict(opt="sgd", lr=0.1, min_lr=0.01)  # see ddp_finetune_worker.config: SGD keeps float noise small
    start = small_vit()
    runs = [
        finetune(copy.deepcopy(start), method, data, data, _quiet(tmp_path / f"a{k}", accum_steps=k, **sgd))
        for k in (1, 2)
    ]
    one, two = (load_file(tmp_path / f"a{k}" / "last.safetensors") for k in (1, 2))
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-6) for k in one)  # they differ by ~1e-7
    assert not torch.allclose(one["head.weight"], start.state_dict()["head.weight"], atol=1e-2)
    assert runs[0].epochs[0]["train_loss"] == pytest.approx(runs[1].epochs[0]["train_loss"], abs=1e-6)
    bf16 = finetune(small_vit(), ATM_MERGING, data, data, _quiet(tmp_path / "bf16", amp="bf16"))
    assert torch.isfinite(torch.tensor(bf16.epochs[0]["train_loss"]))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_under_torchrun_equal_one_process(tmp_path):
    _image_folder(tmp_path / "images", per_class=2, classes=10)  # as many folders as the model's classes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(worker.__file__)),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # identical weights after the steps
    # the same global batch of 8 in one process: equal up to float summation order (the all-reduce
    # of the gradients).  Three SGD steps move weights by up to 0.144; the two runs differ by at
    # most one float32 step of the weight (measured: 5.96e-8 = 2⁻²⁴ on a weight just below 1 on an
    # Intel Xeon, 1.19e-7 = 2⁻²³ on one just above 1 on an AMD EPYC), so the bound is 1e-7 plus
    # two steps of the weight (2⁻²² relative), as docs/usage.md says
    single = worker.fresh_model()
    result = finetune(single, worker.METHOD, worker.dataset(), worker.dataset(), worker.config(tmp_path / "one"))
    start = worker.fresh_model().state_dict()
    assert max(float((value - start[name]).abs().max()) for name, value in single.state_dict().items()) > 0.1
    for name, value in single.state_dict().items():
        assert torch.allclose(value, ranks[0][name], rtol=2**-22, atol=1e-7), name
    ddp_log = json.loads((tmp_path / "ddp" / "finetune.json").read_text())
    assert ddp_log["processes"] == 2 and ddp_log["epochs"][0]["train_images"] == 24
    for key in ("train_loss", "val_top1", "val_gflops"):  # measured: equal
        assert ddp_log["epochs"][0][key] == pytest.approx(result.epochs[0][key], rel=0, abs=1e-7), key
    # `atmerge eval` under torchrun: each process a shard of the batches, reduced to the single-process numbers
    assert main(worker.eval_args(tmp_path / "ddp" / "last.safetensors", tmp_path / "images", tmp_path / "eval")) == 0
    sharded, whole = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("eval_ddp", "eval"))
    assert sharded["processes"] == 2 and sharded["images"] == whole["images"] == 20
    for run in ("baseline", "merged"):
        a, b = sharded[run], whole[run]
        assert a["top1"] == b["top1"] and a["top5"] == b["top5"] and a["images"] == b["images"]
        assert a["gflops"] == pytest.approx(b["gflops"], rel=1e-12)
        assert a["tokens_per_block"] == pytest.approx(b["tokens_per_block"], rel=1e-12)
    assert sharded["merged"]["output_cosine"] == pytest.approx(whole["merged"]["output_cosine"], abs=1e-6)
    assert whole["merged"]["gflops"] < whole["baseline"]["gflops"]


def test_deits_randaugment_runs_at_full_magnitude():
    # timm's increasing posterize keeps 0 bits at magnitude 10 (DeiT's 'inc1' policy draws it when
    # m9 + noise clips at 10); Pillow 13 refuses 0 bits, atmerge keeps Pillow's old answer (black)
    from PIL import Image

    transform = train_transform(small_vit(), FinetuneConfig(aa="rand-m10-inc1-n10-p1.0", reprob=0.0))
    ops = next(step.ops for step in transform.transforms if hasattr(step, "ops"))
    poster = next(op for op in ops if op.name == "PosterizeIncreasing")
    image = Image.fromarray((blocky_images(1)[0].clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy())
    assert poster(image).getextrema() == ((0, 0),) * 3
    assert all(transform(image).shape == (3, 32, 32) for _ in range(20))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (dict(epochs=2.5), "epochs must be an integer >= 1, got 2.5"),
        (dict(lr=0.0), "lr=0.0 is out of range; allowed (0.0, inf]"),
        (dict(lr=-1e-3), "lr=-0.001 is out of range; allowed (0.0, inf]"),
        (dict(lr=float("nan")), "lr must be a finite number, got nan"),
        (dict(min_lr=1e-3), "min_lr=0.001 is above lr=2e-05"),
        (dict(smoothing=1.0), "smoothing=1.0 is out of range; allowed [0.0, 1.0)"),
        (dict(amp="fp8"), "amp='fp8' is not supported; choose one of none, bf16, fp16"),
        (dict(opt="nope"), "opt='nope' is not supported"),
        (dict(stop_at_epoch=31), "stop_at_epoch=31 is beyond epochs=30"),
    ],
)
def test_bad_settings_give_one_line_errors(settings, message):
    with pytest.raises(ValueError) as raised:
        FinetuneConfig(**settings)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_bad_runs_give_one_line_errors(tmp_path):
    data = _tensor_data(8)
    cases = [
        (
            lambda: finetune(small_vit(), ATM_MERGING, tmp_path / "missing", data, _quiet(tmp_path)),
            FileNotFoundError,
            f"data folder {tmp_path / 'missing'} does not exist",
        ),
        (
            lambda: finetune(small_vit(), ATM_MERGING, data, data, _quiet(tmp_path, resume=str(tmp_path / "none.pt"))),
            FileNotFoundError,
            f"resume checkpoint {tmp_path / 'none.pt'} not found",
        ),
        (
            lambda: finetune(small_vit(), ATM_MERGING, data, data, _quiet(tmp_path, batch_size=16)),
            ValueError,
            "8 training images make no full batch of batch_size=16",
        ),
        (
            lambda: finetune(
                small_vit(), ATM_MERGING, data, data, _quiet(tmp_path, batch_size=6, mixup=0.8, accum_steps=2)
            ),
            ValueError,
            "needs an even micro-batch, got 3",
        ),
        (
            lambda: finetune(small_vit(), ATM_MERGING, data, data, _quiet(tmp_path, amp="fp16")),
            ValueError,
            "amp='fp16' needs a CUDA device",
        ),
        (
            lambda: finetune(small_vit(), ATM_MERGING, [1, 2], data, _quiet(tmp_path)),
            TypeError,
            "train_data must be a folder of class folders or a torch Dataset",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as raised:
            call()
        assert message in str(raised.value) and "\n" not in str(raised.value)
    finetune(small_vit(), None, data, data, _quiet(tmp_path / "other"))
    done = str(tmp_path / "other" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt is at epoch 1 of epochs=1; raise epochs to train longer"):
        finetune(small_vit(), None, data, data, _quiet(tmp_path, resume=done))
    with pytest.warns(UserWarning, match="other settings than the checkpoint's .*epochs: 1 -> 2"):
        longer = finetune(small_vit(), None, data, data, _quiet(tmp_path / "longer", epochs=2, resume=done))
    assert [row["epoch"] for row in longer.epochs] == [1, 2]
    with pytest.raises(
        ValueError,
        match=r"was saved from another model: weight 'blocks.2.attn.proj.bias' has "
        r"shape \[48\] there and none here",
    ):
        finetune(small_vit(depth=2), None, data, data, _quiet(tmp_path, resume=done))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a fine-tuning checkpoint"):
        finetune(small_vit(), None, data, data, _quiet(tmp_path, resume=str(tmp_path / "text.pt")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--lr", "0"], "lr=0.0 is out of range"),
        (["--data", "/nonexistent/train"], "data folder /nonexistent/train does not exist"),
        (["--resume", "/nonexistent.pt"], "resume checkpoint /nonexistent.pt not found"),
    ],
)
def test_cli_bad_input_returns_2_with_one_line(args, message, tmp_path, capsys):
    images = _image_folder(tmp_path / "images", per_class=4)
    base = [
        "finetune",
        "--model",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        json.dumps(worker.SMALL),
        "--data",
        str(images),
        "--val-data",
        str(images),
        "--batch-size",
        "8",
        "--no-progress",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
