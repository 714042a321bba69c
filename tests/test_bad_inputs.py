"""Every refused input in one table: the call, what is wrong with it, the error it gets and a
fragment of the one-line message (which names the bad value and what is allowed).

API rows are Python expressions evaluated against the small objects built in ``namespace`` below
(``vit``: a 6-block random-init ViT for 32×32 images; ``patched``: the same, patched with ATM,
``checkpointed`` also with gradient checkpointing; ``resnet``, ``swin``, ``eva``, ``map_vit``:
models atmerge does not patch; ``images``: two images that fit ``vit``; ``nan``; files and
folders named for what they hold).  CLI rows are ``atmerge`` command lines (``$tiny`` = a
2-block random-init timm ViT and its --model-kwargs); the command returns 2 and prints the
error on stderr without a traceback.

What is *accepted* that a reader might expect to be refused is at the end: an empty batch
[0, C, H, W] gives an empty result.
"""

from __future__ import annotations

import json
import shlex
import string

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import atmerge
from atmerge import checkpoints, data
from atmerge.cli import main
from conftest import blocky_images, small_vit

UNSUPPORTED = atmerge.UnsupportedModelError
NOT_A_VIT = "atmerge patches timm VisionTransformer models"

# (call, refused input, error, message fragment)
API_ROWS = [
    # --- method constructors: out of range, NaN, wrong type
    ("ATM(alpha=1.5)", "out of range", ValueError, "alpha=1.5 is out of range; allowed [0.0, 1.0]"),
    ("ATM(beta=-0.01)", "out of range", ValueError, "beta=-0.01 is out of range; allowed [0.0, 1.0]"),
    ("ATM(theta_min=nan)", "NaN", ValueError, "theta_min must be a finite number, got nan"),
    ("ATM(alpha='0.9')", "wrong type", ValueError, "alpha must be a finite number, got '0.9'"),
    ("ATM(split_layer=-1)", "out of range", ValueError, "split_layer must be None or an integer >= 0, got -1"),
    ("ATM(split_layer=2.5)", "wrong type", ValueError, "split_layer must be None or an integer >= 0, got 2.5"),
    ("ATM(similarity='dot')", "unknown choice", ValueError, "similarity='dot' is not supported; choose one of"),
    ("ATM(batch_adaptive='yes')", "wrong type", ValueError, "batch_adaptive must be True or False, got 'yes'"),
    ("ToMe(r=-1)", "out of range", ValueError, "r must be an integer >= 0, got -1"),
    ("ToMe(r=2.5)", "wrong type", ValueError, "r must be an integer >= 0, got 2.5"),
    ("ToMe(r=nan)", "NaN", ValueError, "r must be an integer >= 0, got nan"),
    ("ToMe(r='8')", "wrong type", ValueError, "r must be an integer >= 0, got '8'"),
    ("ToMe(r=[4, -1])", "out of range", ValueError, "r must be a list of integers >= 0, got [4, -1]"),
    ("ToMe(r=(8, 0.5, 1))", "wrong shape", ValueError, "r as a tuple must be (r, inflection)"),
    (
        "ToMe(r=(8, 2.0))",
        "out of range",
        ValueError,
        "the inflection of r=(r, inflection) must be a number in [-1, 1], got 2.0",
    ),
    ("ToMe(r=(8, nan))", "NaN", ValueError, "the inflection of r=(r, inflection) must be a number in [-1, 1], got nan"),
    (
        "TopR(schedule='linear')",
        "unknown choice",
        ValueError,
        "schedule='linear'; choose 'constant', 'increasing' or 'decreasing'",
    ),
    ("TopR(r=-2)", "out of range", ValueError, "r must be an integer >= 0, got -2"),
    ("ConstantThreshold(theta=2)", "out of range", ValueError, "theta=2 is out of range; allowed [0.0, 1.0]"),
    ("ConstantThreshold(theta=nan)", "NaN", ValueError, "theta must be a finite number, got nan"),
    (
        "ConstantThreshold(blocks=(0, 3))",
        "out of range",
        ValueError,
        "blocks must be block numbers counted from 1, got (0, 3)",
    ),
    ("EViT(keep_rate=0.0)", "out of range", ValueError, "keep_rate=0.0 is out of range; allowed (0.0, 1.0]"),
    ("EViT(keep_rate=nan)", "NaN", ValueError, "keep_rate must be a finite number, got nan"),
    ("EViT(locations=())", "empty", ValueError, "locations must be block numbers counted from 1, got ()"),
    ("EViT(locations=4)", "wrong type", ValueError, "locations must be block numbers counted from 1, got 4"),
    ("EViT(locations=(2.5,))", "wrong type", ValueError, "locations must be block numbers counted from 1, got (2.5,)"),
    ("MCTF(r=1.5)", "out of range", ValueError, "r must be an integer >= 0 or a share in (0, 1), got 1.5"),
    ("MCTF(r=nan)", "NaN", ValueError, "r must be an integer >= 0 or a share in (0, 1), got nan"),
    ("MCTF(tau_info=-1)", "out of range", ValueError, "tau_info=-1 is out of range"),
    ("MCTF(tau_sim=nan)", "NaN", ValueError, "tau_sim must be a finite number, got nan"),
    ("MCTF(blocks=3)", "wrong type", ValueError, "blocks must be block numbers counted from 1, got 3"),
    ("ZeroTP(r=-1)", "out of range", ValueError, "r must be an integer >= 0, got -1"),
    (
        "ZeroTP(importance_share=2)",
        "out of range",
        ValueError,
        "importance_share=2 is out of range; allowed [0.0, 1.0]",
    ),
    ("ZeroTP(importance_share=nan)", "NaN", ValueError, "importance_share must be a finite number, got nan"),
    ("ZeroTP(iterations=0)", "out of range", ValueError, "iterations must be an integer >= 1, got 0"),
    # --- patch: unsupported models
    (
        "patch(resnet, ATM())",
        "a ResNet",
        UNSUPPORTED,
        f"{NOT_A_VIT} (DeiT, ViT, DINOv2, MAE-style; atmerge's LV-ViT, T2T-ViT)",
    ),
    ("patch(swin, ATM())", "a Swin", UNSUPPORTED, "got SwinTransformer"),
    ("patch(eva, ATM())", "an EVA", UNSUPPORTED, "got Eva"),
    (
        "patch(map_vit, ATM())",
        "attention pooling with a position embedding",
        UNSUPPORTED,
        "global_pool='map' with a AttentionPoolLatent with a position embedding is not supported; supported: 'token', 'avg', 'map'",
    ),
    ("patch(nn.Linear(2, 2), ATM())", "not a model", UNSUPPORTED, "got Linear"),
    # --- patch: methods and options
    (
        "patch(vit, {'alpha': 0.9})",
        "not a method",
        TypeError,
        "method must be an atmerge method such as atmerge.ATM(...), got dict",
    ),
    ("patch(vit, missing)", "missing config", FileNotFoundError, "not found"),
    (
        "patch(vit, ATM(), prop_attn='yes')",
        "wrong type",
        ValueError,
        "prop_attn must be True, False or None (the default), got 'yes'",
    ),
    (
        "patch(vit, ATM(), prune_last_block=1)",
        "wrong type",
        ValueError,
        "prune_last_block must be True, False or None (the default), got 1",
    ),
    (
        "patch(vit, ATM(), trace_source='yes')",
        "wrong type",
        ValueError,
        "trace_source must be True or False, got 'yes'",
    ),
    (
        "patch(avg_vit, ATM(), prune_last_block=True)",
        "option that changes outputs",
        ValueError,
        "which changes the output of a model that does not pool with CLS",
    ),
    (
        "patch(vit, ATM(split_layer=7))",
        "beyond the depth",
        ValueError,
        "split_layer=7 is beyond the model's depth; allowed 0..6",
    ),
    (
        "patch(vit, EViT(locations=(4, 7)))",
        "beyond the depth",
        ValueError,
        "locations (4, 7) go beyond the model's depth; allowed 1..6",
    ),
    (
        "patch(vit, MCTF(blocks=(9,)))",
        "beyond the depth",
        ValueError,
        "blocks (9,) go beyond the model's depth; allowed 1..6",
    ),
    ("patch(vit, ToMe(r=[1] * 7))", "beyond the depth", ValueError, "r has 7 entries for a model of 6 blocks"),
    (
        "patch(avg_vit, EViT(locations=(2, 4)))",
        "no CLS token",
        ValueError,
        "EViT ranks tokens by the CLS token's attention and this model has no CLS token",
    ),
    # --- a patched model's forward: images
    (
        "patched(torch.randn(2, 3, 64, 64))",
        "wrong image size",
        ValueError,
        "images of shape [2, 3, 64, 64] given; this model takes [B, 3, 32, 32]",
    ),
    (
        "patched(torch.randn(2, 1, 32, 32))",
        "wrong channel count",
        ValueError,
        "images of shape [2, 1, 32, 32] given; this model takes [B, 3, 32, 32]",
    ),
    (
        "patched(torch.randn(3, 32, 32))",
        "no batch dimension",
        ValueError,
        "images of shape [3, 32, 32] given; this model takes [B, 3, 32, 32]",
    ),
    (
        "patched(images.to(torch.uint8))",
        "integer pixels",
        TypeError,
        "images must be a floating-point tensor [B, C, H, W] (normalised pixels), got a torch.uint8 tensor",
    ),
    (
        "patched(images.tolist())",
        "not a tensor",
        TypeError,
        "images must be a floating-point tensor [B, C, H, W] (normalised pixels), got a list",
    ),
    (
        "patched.forward_intermediates(images, output_fmt='NHWC')",
        "unknown format",
        ValueError,
        "output_fmt='NHWC' is not supported; choose 'NCHW' or 'NLC'",
    ),
    (
        "checkpointed.forward_intermediates(images)",
        "dense outputs with gradient checkpointing",
        ValueError,
        "call model.set_grad_checkpointing(False) or run it under torch.no_grad()",
    ),
    # --- unpatch, last_stats, merge_source, dense_tokens
    ("unpatch('model')", "not a model", TypeError, "unpatch takes a model (torch.nn.Module), got str"),
    (
        "last_stats(vit)",
        "unpatched model",
        ValueError,
        "this model is not patched; call atmerge.patch(model, method) first",
    ),
    (
        "last_stats(patched)",
        "no forward yet",
        RuntimeError,
        "no complete forward pass of the patched model has run yet",
    ),
    ("merge_source(vit)", "unpatched model", ValueError, "this model is not patched"),
    (
        "dense_tokens(patched, torch.zeros(2, 65, 48))",
        "no source tracking",
        ValueError,
        "dense_tokens needs the model patched with trace_source=True",
    ),
    # --- gflops
    ("gflops(resnet)", "a ResNet", UNSUPPORTED, "got ResNet"),
    (
        "gflops(map_vit, (3, 32, 32))",
        "attention pooling with a position embedding",
        UNSUPPORTED,
        "with a position embedding is not supported",
    ),
    (
        "gflops(vit)",
        "wrong image size (default 224)",
        ValueError,
        "images of shape [1, 3, 224, 224] given; this model takes [B, 3, 32, 32]",
    ),
    ("gflops(vit, (1, 32, 32))", "wrong channel count", ValueError, "images of shape [1, 1, 32, 32] given"),
    (
        "gflops(vit, (3, 32))",
        "wrong shape",
        ValueError,
        "input_size must be (C, H, W), three positive integers, got (3, 32)",
    ),
    (
        "gflops(vit, '3x32x32')",
        "wrong type",
        ValueError,
        "input_size must be (C, H, W), three positive integers, got '3x32x32'",
    ),
    ("gflops(patched, (3, 32, 32))", "patched model", ValueError, "a patched model's cost depends on the images"),
    # --- evaluate
    ("evaluate(vit, [])", "no batches", ValueError, "no images to evaluate"),
    ("evaluate(vit, [torch.zeros(0, 3, 32, 32)])", "only empty batches", ValueError, "no images to evaluate"),
    ("evaluate(resnet, [images])", "a ResNet", UNSUPPORTED, "got ResNet"),
    ("evaluate(swin, [images])", "a Swin", UNSUPPORTED, "got SwinTransformer"),
    (
        "evaluate(vit, [torch.randn(2, 3, 64, 64)])",
        "wrong image size",
        ValueError,
        "images of shape [2, 3, 64, 64] given; this model takes [B, 3, 32, 32]",
    ),
    (
        "evaluate(vit, [torch.randn(2, 1, 32, 32)])",
        "wrong channel count",
        ValueError,
        "images of shape [2, 1, 32, 32] given",
    ),
    ("evaluate(vit, [images.to(torch.uint8)])", "integer pixels", TypeError, "got a torch.uint8 tensor"),
    (
        "evaluate(vit, [images], reference=[])",
        "reference of other batches",
        ValueError,
        "reference does not match batch 0 (2 images)",
    ),
    # --- calibrate (bad goals and options fail before any image is read)
    (
        "calibrate(vit, images)",
        "no goal",
        ValueError,
        "give exactly one goal of budget, budget_gflops, min_agreement, min_cosine; got none",
    ),
    ("calibrate(vit, images, budget=0.5, min_agreement=0.9)", "two goals", ValueError, "give exactly one goal"),
    (
        "calibrate(vit, images, budget=1.5)",
        "out of range",
        ValueError,
        "budget=1.5 is a share of the unpatched GFLOPs; allowed (0, 1)",
    ),
    (
        "calibrate(vit, images, budget=nan)",
        "NaN",
        ValueError,
        "budget=nan is a share of the unpatched GFLOPs; allowed (0, 1)",
    ),
    (
        "calibrate(vit, images, budget_gflops=-1)",
        "out of range",
        ValueError,
        "budget_gflops=-1 must be a positive number of GFLOPs per image",
    ),
    (
        "calibrate(vit, images, min_agreement=0)",
        "out of range",
        ValueError,
        "min_agreement=0 is out of range; allowed (0, 1]",
    ),
    ("calibrate(vit, images, budget=0.5, trials=0)", "out of range", ValueError, "trials=0 must be an integer >= 1"),
    (
        "calibrate(vit, images, budget=0.5, method='nope')",
        "unknown method",
        ValueError,
        "unknown method 'nope'; choose one of",
    ),
    (
        "calibrate(features_vit, images, min_agreement=0.9)",
        "agreement of a feature model",
        ValueError,
        "fidelity='agreement' needs a classifier",
    ),
    (
        "calibrate(vit, torch.zeros(0, 3, 32, 32), budget=0.5)",
        "empty batch",
        ValueError,
        "images must be a non-empty [N, C, H, W] tensor, got shape [0, 3, 32, 32]",
    ),
    (
        "calibrate(vit, 42, budget=0.5)",
        "wrong type",
        TypeError,
        "images must be a folder path, a tensor or a loader of batches, got int",
    ),
    ("calibrate(vit, missing, budget=0.5)", "missing folder", FileNotFoundError, "does not exist"),
    ("calibrate(vit, text_folder, budget=0.5)", "non-image files", ValueError, "holds no images"),
    ("calibrate(vit, broken_flat_folder, budget=0.5)", "unreadable images", ValueError, "none of the images under"),
    (
        "calibrate(vit, torch.randn(2, 3, 64, 64), budget=0.5)",
        "wrong image size",
        ValueError,
        "images of shape [2, 3, 64, 64] given; this model takes [B, 3, 32, 32]",
    ),
    ("calibrate(resnet, images, budget=0.5)", "a ResNet", UNSUPPORTED, "got ResNet"),
    ("calibrate(eva, images, budget=0.5)", "an EVA", UNSUPPORTED, "got Eva"),
    (
        "calibrate_goals(vit, images, [{'budget': 0.5}, {'budget': 2}])",
        "one goal out of range",
        ValueError,
        "budget=2 is a share of the unpatched GFLOPs; allowed (0, 1)",
    ),
    (
        "save_config(missing, vit, 'a calibration')",
        "not a calibration",
        TypeError,
        "calibration must be what atmerge.calibrate returns, got str",
    ),
    # --- match_gflops
    (
        "match_gflops(vit, lambda t: ToMe(r=round(8 * t)), 0, [images])",
        "out of range",
        ValueError,
        "target_gflops must be positive, got 0",
    ),
    (
        "match_gflops(vit, lambda t: ToMe(r=round(8 * t)), nan, [images])",
        "NaN",
        ValueError,
        "target_gflops must be positive, got nan",
    ),
    (
        "match_gflops(vit, lambda t: ToMe(r=round(8 * t)), 0.01, [])",
        "no batches",
        ValueError,
        "no images to measure GFLOPs on",
    ),
    # --- load_method: configs
    ("load_method(missing)", "missing file", FileNotFoundError, "not found"),
    ("load_method(text_file)", "not JSON", ValueError, "is not JSON"),
    ("load_method(config_other_format)", "wrong format", ValueError, "field 'format' must be 'atmerge-config/1'"),
    ("load_method(config_no_method)", "field missing", ValueError, "field 'method' is missing"),
    ("load_method(config_unknown_method)", "unknown method", ValueError, "unknown method 'nope'; choose one of"),
    ("load_method(config_unknown_setting)", "unknown setting", ValueError, "gamma does not apply to atm"),
    ("load_method(config_bad_setting)", "out of range", ValueError, "alpha=2 is out of range"),
    # --- checkpoints
    ("checkpoints.load_checkpoint('vit_tiny_patch16_224', missing)", "missing file", FileNotFoundError, "not found"),
    (
        "checkpoints.load_checkpoint('vit_tiny_patch16_224', a_folder)",
        "a folder",
        ValueError,
        "is not a file; pass a .safetensors file",
    ),
    (
        "checkpoints.load_checkpoint('vit_tiny_patch16_224', text_file)",
        "another format",
        ValueError,
        "is not a safetensors file",
    ),
    (
        "checkpoints.load_checkpoint('vit_tiny_patch16_224', truncated_checkpoint)",
        "unreadable (truncated)",
        ValueError,
        "is not a safetensors file",
    ),
    (
        "checkpoints.load_checkpoint('vit_tiny_patch16_224', tiny_checkpoint, **{**TINY, 'embed_dim': 32})",
        "weights of other settings",
        ValueError,
        "does not fit vit_tiny_patch16_224",
    ),
    (
        "checkpoints.load_checkpoint('not_a_model', tiny_checkpoint)",
        "unknown model",
        ValueError,
        "unknown timm model 'not_a_model'",
    ),
    # --- finetune: settings, data, resume files (tests/test_finetune.py has more)
    ("FinetuneConfig(epochs=0)", "out of range", ValueError, "epochs must be an integer >= 1, got 0"),
    ("FinetuneConfig(lr=0.0)", "out of range", ValueError, "lr=0.0 is out of range; allowed (0.0, inf]"),
    ("FinetuneConfig(lr=nan)", "NaN", ValueError, "lr must be a finite number, got nan"),
    (
        "FinetuneConfig(amp='fp8')",
        "unknown choice",
        ValueError,
        "amp='fp8' is not supported; choose one of none, bf16, fp16",
    ),
    ("FinetuneConfig(batch_size=0)", "out of range", ValueError, "batch_size must be an integer >= 1, got 0"),
    (
        "finetune(vit, ATM(), missing, good_folder)",
        "missing folder",
        FileNotFoundError,
        "does not exist; pass a folder of class folders",
    ),
    (
        "finetune(features_vit, ATM(), good_folder, good_folder)",
        "a feature model",
        ValueError,
        "this model has num_classes=0",
    ),
    (
        "finetune(vit, ATM(), good_folder, good_folder, FinetuneConfig(resume=missing))",
        "missing checkpoint",
        FileNotFoundError,
        "resume checkpoint",
    ),
    (
        "finetune(vit, ATM(), good_folder, good_folder, FinetuneConfig(resume=text_file))",
        "not a checkpoint",
        ValueError,
        "is not a fine-tuning checkpoint",
    ),
    (
        "finetune(vit, ATM(), good_folder, good_folder)",
        "fewer images than a batch",
        ValueError,
        "3 training images make no full batch of batch_size=256",
    ),
    # --- data folders
    (
        "data.image_folder(missing, None)",
        "missing folder",
        FileNotFoundError,
        "does not exist; pass a folder of class folders",
    ),
    (
        "data.image_folder(text_folder, None)",
        "non-image files",
        FileNotFoundError,
        "Found no valid file for the classes",
    ),
    (
        "data.image_folder(broken_class_folder, None)[0]",
        "a file that is not an image",
        ValueError,
        "is not a readable image",
    ),
    # --- model families: Hugging Face classes and attention implementations, atmerge's timm definitions
    (
        "patch(hf_masked_image_modeling, ToMe(r=2))",
        "an HF class atmerge does not patch",
        UNSUPPORTED,
        "atmerge patches these Hugging Face models: ViTModel",
    ),
    (
        "patch(hf_flash_attention, ToMe(r=2))",
        "an HF attention implementation without additive masks",
        UNSUPPORTED,
        "attn_implementation='flash_attention_2' is not supported; supported: 'eager', 'sdpa'",
    ),
    (
        "timm.create_model('lvvit_s', pretrained=True)",
        "hub weights atmerge's definitions do not have",
        ValueError,
        "lvvit_s has no hub weights in atmerge; load the official checkpoint",
    ),
]

# (command line, refused input, message fragment); $tiny = a 2-block timm ViT for 32×32 images
CLI_ROWS = [
    ("eval --alpha 1.5", "out of range", "alpha=1.5 is out of range"),
    ("eval --alpha nan", "NaN", "alpha must be a finite number, got nan"),
    ("eval --method tome --r -1", "out of range", "r must be an integer >= 0, got -1"),
    ("eval --method tome --alpha 0.9", "setting of another method", "alpha does not apply to tome"),
    ("eval --method nope", "unknown method", "invalid choice: 'nope'"),
    ("eval --keep-rate abc", "wrong type", "invalid float value: 'abc'"),
    ("eval --model not_a_model", "unknown model", "unknown timm model 'not_a_model'"),
    ("eval --model vit_tiny_patch16_224 --model-kwargs {oops", "not JSON", "--model-kwargs must be a JSON object"),
    ("eval $tiny --data $missing", "missing folder", "does not exist"),
    (
        "eval $tiny --data $flat_folder --labels",
        "no class folders where --labels asks for them",
        "holds no class folders",
    ),
    ("eval $tiny --data $text_folder", "non-image files", "holds no images"),
    ("eval $tiny --data $broken_flat_folder", "only files that are not images", "none of the images under"),
    ("eval $tiny --data $good_folder --limit 0", "out of range", "limit must be a positive number of images, got 0"),
    ("eval $tiny --data $good_folder --batch-size 0", "out of range", "batch size must be >= 1, got 0"),
    (
        "eval $tiny --data $good_folder --prune-last-block --model-kwargs '$tiny_avg_json'",
        "option that changes outputs",
        "which changes the output of a model that does not pool with CLS",
    ),
    ("eval $tiny --data $good_folder --config $missing", "missing config", "not found"),
    ("eval --model vit_tiny_patch16_224 --checkpoint $missing --data $good_folder", "missing checkpoint", "not found"),
    ("eval --model vit_tiny_patch16_224 --checkpoint $a_folder --data $good_folder", "a folder", "is not a file"),
    (
        "eval --model vit_tiny_patch16_224 --checkpoint $truncated_checkpoint --data $good_folder",
        "unreadable checkpoint",
        "is not a safetensors file",
    ),
    (
        "eval --model not_a_model --checkpoint $tiny_checkpoint --data $good_folder",
        "unknown model",
        "unknown timm model 'not_a_model'",
    ),
    ("eval --model resnet18 --model-kwargs '{\"num_classes\": 3}' --data $good_folder", "a ResNet", "got ResNet"),
    (
        "calibrate $tiny --data $good_folder --budget 1.5",
        "out of range",
        "budget=1.5 is a share of the unpatched GFLOPs",
    ),
    ("calibrate $tiny --data $text_folder --budget 0.5", "non-image files", "holds no images"),
    (
        "search $tiny --data $good_folder --goal budget",
        "goal without its budget",
        "goal 'budget' needs a positive budget",
    ),
    (
        "analyze split-layer $tiny --data $good_folder --method tome",
        "method the study is not about",
        "split-layer studies ATM",
    ),
    ("visualize $tiny --images $missing --versus ''", "missing image", "not found"),
    ("visualize $tiny --images $text_file --versus ''", "a file that is not an image", "is not a readable image"),
    (
        "finetune $tiny --data $good_folder --val-data $good_folder --epochs 0",
        "out of range",
        "epochs must be an integer >= 1, got 0",
    ),
    ("finetune $tiny --data $good_folder --val-data $good_folder --lr -1", "out of range", "lr=-1.0 is out of range"),
    ("finetune $tiny --data $missing --val-data $good_folder", "missing folder", "does not exist"),
    (
        "finetune $tiny --data $good_folder --val-data $good_folder --resume $text_file",
        "not a checkpoint",
        "is not a fine-tuning checkpoint",
    ),
    ("probe --train-images 0", "out of range", "train-images must be a positive number of images, got 0"),
]

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=3)


def _png(path, seed: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)


def _config(path, document: dict) -> str:
    path.write_text(json.dumps(document))
    return str(path)


def map_pool_with_position_embedding():
    """Attention pooling whose keys carry a position embedding per token: merged tokens have no
    single position, so it is refused."""
    model = small_vit(global_pool="map")
    model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(65, 48))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Files and folders the rows refer to, named for what they hold."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    for sub in (
        "good_folder/a",
        "good_folder/b",
        "good_folder/c",
        "flat_folder",
        "text_folder/a",
        "broken_class_folder/a",
        "broken_flat_folder",
        "a_folder",
    ):
        (tmp / sub).mkdir(parents=True)
    for i, sub in enumerate(("good_folder/a", "good_folder/b", "good_folder/c", "flat_folder")):
        _png(tmp / sub / "0.png", i)
    for folder in ("text_folder/a", "."):
        (tmp / folder / "notes.txt").write_text("not an image")
    for folder in ("broken_class_folder/a", "broken_flat_folder"):
        (tmp / folder / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", **TINY).state_dict(), str(tmp / "tiny.safetensors"))
    (tmp / "truncated.safetensors").write_bytes((tmp / "tiny.safetensors").read_bytes()[:100])
    good_method = {"name": "atm", "settings": {"alpha": 0.99}}
    paths = {
        "missing": str(tmp / "missing"),
        "text_file": str(tmp / "notes.txt"),
        "tiny_checkpoint": str(tmp / "tiny.safetensors"),
        "truncated_checkpoint": str(tmp / "truncated.safetensors"),
        "config_other_format": _config(tmp / "f.json", {"format": "other/1", "method": good_method}),
        "config_no_method": _config(tmp / "m.json", {"format": "atmerge-config/1"}),
        "config_unknown_method": _config(tmp / "u.json", {"format": "atmerge-config/1", "method": {"name": "nope"}}),
        "config_unknown_setting": _config(
            tmp / "s.json", {"format": "atmerge-config/1", "method": {"name": "atm", "settings": {"gamma": 1}}}
        ),
        "config_bad_setting": _config(
            tmp / "b.json", {"format": "atmerge-config/1", "method": {"name": "atm", "settings": {"alpha": 2}}}
        ),
    }
    for sub in ("good_folder", "flat_folder", "text_folder", "broken_class_folder", "broken_flat_folder", "a_folder"):
        paths[sub] = str(tmp / sub)
    return paths


@pytest.fixture(scope="module")
def unsupported_models() -> dict[str, nn.Module]:
    """Tiny random-init models of the kinds atmerge refuses."""
    return {
        "resnet": timm.create_model("resnet18", pretrained=False, num_classes=3).eval(),
        "swin": timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            embed_dim=24,
            depths=(1, 1),
            num_heads=(1, 1),
            img_size=56,
            num_classes=3,
        ).eval(),
        "eva": timm.create_model(
            "eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28, num_classes=3
        ).eval(),
        "map_vit": map_pool_with_position_embedding(),
    }


def hf_refused() -> dict[str, nn.Module]:
    """Hugging Face models atmerge refuses (transformers comes with the dev extra)."""
    import transformers

    config = transformers.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=32,
        patch_size=4,
        intermediate_size=96,
        attn_implementation="sdpa",
    )
    masked_image_modeling = transformers.ViTForMaskedImageModeling(config).eval()
    flash = transformers.ViTModel(config).eval()
    flash.config._attn_implementation = "flash_attention_2"  # as if loaded with it (flash-attn is not installed here)
    return {"hf_masked_image_modeling": masked_image_modeling, "hf_flash_attention": flash}


@pytest.fixture
def namespace(files, unsupported_models) -> dict:
    names = {name: getattr(atmerge, name) for name in atmerge.__all__}
    checkpointed = atmerge.patch(small_vit(), atmerge.ATM())
    checkpointed.set_grad_checkpointing(True)
    return {
        **names,
        **files,
        **unsupported_models,
        **hf_refused(),
        "torch": torch,
        "nn": nn,
        "checkpoints": checkpoints,
        "data": data,
        "TINY": TINY,
        "timm": timm,
        "nan": float("nan"),
        "images": torch.randn(2, 3, 32, 32),
        "vit": small_vit(),
        "patched": atmerge.patch(small_vit(), atmerge.ATM()),
        "checkpointed": checkpointed,
        "avg_vit": small_vit(class_token=False, global_pool="avg"),
        "features_vit": small_vit(num_classes=0),
    }


@pytest.mark.parametrize("call, refused, error, message", API_ROWS, ids=[row[0] for row in API_ROWS])
def test_api_refuses(call, refused, error, message, namespace):
    with pytest.raises(error) as raised:
        eval(call, namespace)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def run_cli(command: str, files: dict[str, str], capsys) -> tuple[int, str]:
    """Run ``atmerge <command>`` ($names from ``files`` and $tiny filled in); return (code, stderr)."""
    tiny = f"--model vit_tiny_patch16_224 --model-kwargs '{json.dumps(TINY)}'"
    filled = string.Template(command).substitute(
        files, tiny=tiny, tiny_avg_json=json.dumps({**TINY, "global_pool": "avg"})
    )
    try:
        code = main(shlex.split(filled) + ["--out", files["a_folder"] + "/out"])
    except SystemExit as exit_:  # argparse's own errors: usage and one error line
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command, refused, message", CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_cli_refuses(command, refused, message, files, capsys):
    code, err = run_cli(command, files, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("usage:") or err.count("\n") == 1


def test_a_checkpoint_without_read_permission_is_named(files, monkeypatch):
    # chmod cannot take read permission from root, so the refusal of the file system is simulated
    def denied(path: str):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(checkpoints, "load_file", denied)
    with pytest.raises(ValueError, match=r"tiny.safetensors cannot be read \(permission denied\)"):
        checkpoints.load_checkpoint("vit_tiny_patch16_224", files["tiny_checkpoint"])


# ----------------------------------------------------------------------------- accepted: empty batches

METHODS = [
    atmerge.ATM(),
    atmerge.ATM(batch_adaptive=False),
    atmerge.ToMe(r=4),
    atmerge.TopR(),
    atmerge.ConstantThreshold(),
    atmerge.EViT(0.7, (2, 4)),
    atmerge.MCTF(r=4),
    atmerge.ZeroTP(r=4),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.label())
def test_an_empty_batch_gives_an_empty_result(method):
    model = atmerge.patch(small_vit(), method)
    with torch.no_grad():
        out = model(torch.zeros(0, 3, 32, 32))
        assert out.shape == (0, 10)
        assert model(blocky_images(2)).shape == (2, 10)  # and the model still works afterwards


def test_an_empty_batch_among_others_counts_for_nothing_in_evaluate():
    model = atmerge.patch(small_vit(), atmerge.ToMe(r=4))
    x = blocky_images(3)
    with_empty, _ = atmerge.evaluate(model, [x[:2], x[:0], x[2:]])
    without, _ = atmerge.evaluate(model, [x[:2], x[2:]])
    assert with_empty.images == 3 and with_empty.gflops == pytest.approx(without.gflops)
    assert with_empty.tokens_per_block == pytest.approx(without.tokens_per_block)


def test_an_empty_batch_gives_empty_dense_outputs():
    model = atmerge.patch(small_vit(global_pool="", num_classes=0), atmerge.ToMe(r=4), trace_source=True)
    empty = torch.zeros(0, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(empty)
        final, maps = model.forward_intermediates(empty, indices=2)
    assert tokens.shape == (0, 65 - 6 * 4, 48) and atmerge.dense_tokens(model, tokens).shape == (0, 65, 48)
    assert final.shape == (0, 65, 48) and [m.shape for m in maps] == [(0, 48, 8, 8)] * 2
