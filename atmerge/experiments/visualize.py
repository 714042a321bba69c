"""`atmerge visualize`: which patches merged (Figures 1, 7 and A1 of the ATM paper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from atmerge.api import last_stats, merge_source, patch, unpatch
from atmerge.methods.base import Method
from atmerge.models.adapter import adapter_for, check_model_images, model_depth


def chosen_images(data: list[str | Path], count: int, default: Path | None = None) -> tuple[list[Path], int]:
    """The images ``atmerge visualize`` draws: the first ``count`` of ``data``'s images in the
    order given (a file as it is, a folder as its images in name order, any layout), or of
    ``default``'s when ``data`` is empty.  Returns (the chosen files, how many there were), so
    that the caller can say what it left out."""
    from atmerge.data import image_files

    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    files: list[Path] = []
    for item in map(Path, data):
        if not item.exists():
            raise FileNotFoundError(f"image {item} not found")
        files += image_files(item) if item.is_dir() else [item]
    if not data and default is not None:
        files = image_files(default)
    return files[:count], len(files)


@torch.no_grad()
def sources_per_block(model: nn.Module, method: Method, images: torch.Tensor) -> list[torch.Tensor]:
    """Patch ``model`` with ``method`` and return, after every block, which original tokens each
    token holds: a list (one per block) of [B, N_l, N0] 0/1 tensors.  The model is unpatched after."""
    return _trace(model, method, images)[0]


@torch.no_grad()
def _trace(model: nn.Module, method: Method, images: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """:func:`sources_per_block` and the mean GFLOPs per image of that forward pass."""
    patch(model, method, trace_source=True)
    history: list[torch.Tensor] = []
    blocks = adapter_for(model).blocks(model)  # timm's model.blocks, a Hugging Face model's layers
    hooks = [blk.register_forward_hook(lambda *_: history.append(merge_source(model).clone())) for blk in blocks]
    try:
        model(images)
        gflops = last_stats(model).gflops
    finally:
        for h in hooks:
            h.remove()
        unpatch(model)
    return history, gflops


def group_image(
    image: np.ndarray, source: torch.Tensor, grid: tuple[int, int], num_prefix: int
) -> tuple[np.ndarray, int]:
    """Paint every merged group of patches with the group's mean colour and outline the groups.

    image [H, W, 3] in [0, 1]; source [N', N0] for one image.  Returns (picture, tokens left).
    """
    gh, gw = grid
    ph, pw = image.shape[0] // gh, image.shape[1] // gw
    patches = source[num_prefix:, num_prefix:] if source.shape[0] > num_prefix else source[:0, num_prefix:]
    groups = patches.argmax(dim=0).reshape(gh, gw).numpy()  # group id of every patch
    out = image.copy()
    for g in np.unique(groups):
        mask = np.kron(groups == g, np.ones((ph, pw), dtype=bool))
        out[mask] = image[mask].mean(axis=0)
    label = np.kron(groups, np.ones((ph, pw), dtype=int))
    edge = np.zeros(label.shape, dtype=bool)
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    out[edge] = 1.0
    return out, int(patches.shape[0]) + num_prefix


def denormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """[3, H, W] normalised → [H, W, 3] in [0, 1]."""
    img = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def draw(
    model: nn.Module,
    images: torch.Tensor,
    methods: dict[str, Method],
    out: str | Path,
    *,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    every_block: bool = False,
    per_image: bool = True,
    title: str | None = None,
) -> dict:
    """Draw merged groups for each method (rows) and image (columns) at the final block, or for
    every block (one figure row per method and image, Figure A1).  per_image: run every image
    alone (batch of 1), so an adaptive method merges each image by its own count, as in the
    paper's figures; False runs them as one batch.  The original images come first (a row, or
    with every_block a column); each panel names its tokens left and, for a single image, its
    GFLOPs; ``title`` heads the figure (e.g. the model and the methods' settings).  Writes a PNG;
    returns the tokens left (and the GFLOPs) per method and image at the last block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = check_model_images(model, images)  # patch grid of these images (timm or Hugging Face)
    p = adapter_for(model).num_protected(model)
    pictures = [denormalize(x, mean, std) for x in images]
    gflops: dict = {}
    if per_image:
        history = {}
        for name, m in methods.items():
            traced = [_trace(model, m, x[None]) for x in images]
            history[name] = [[s[0] for s in h] for h, _ in traced]
            gflops[name] = [g for _, g in traced]
    else:
        history = {}
        for name, m in methods.items():
            blocks_b, g = _trace(model, m, images)
            history[name] = [[s[i] for s in blocks_b] for i in range(len(images))]
            gflops[name] = [g] * len(images)  # a batch's mean: the images were merged together
    depth = model_depth(model)
    blocks = list(range(depth)) if every_block else [depth - 1]
    rows = [(name, i) for name in methods for i in range(len(images))] if every_block else list(methods)
    cols = len(blocks) if every_block else len(images)
    first = 1  # the original images: a first row, or (every_block) a first column
    shape = (len(rows), cols + first) if every_block else (len(rows) + first, cols)
    if title:
        import textwrap

        title = textwrap.fill(title, max(40, int(1.9 * shape[1] * 14)))
    lines = title.count("\n") + 1 if title else 0
    fig, axes = plt.subplots(*shape, figsize=(1.9 * shape[1], 2.1 * shape[0] + 0.2 * lines), squeeze=False)
    for k in range(len(rows) if every_block else cols):
        i = rows[k][1] if every_block else k
        ax = axes[k][0] if every_block else axes[0][k]
        ax.imshow(pictures[i])
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(f"{grid[0] * grid[1] + p} tokens", fontsize=8)
        if every_block and k == 0 or not every_block and k == 0:
            ax.set_ylabel("original", fontsize=9) if not every_block else ax.set_title("original", fontsize=8)
    tokens: dict = {name: [] for name in methods}
    for r, row in enumerate(rows):
        name, index = row if every_block else (row, None)
        for c in range(cols):
            block = blocks[c] if every_block else blocks[0]
            i = index if every_block else c
            pic, left = group_image(pictures[i], history[name][i][block], grid, p)
            ax = axes[r][c + first] if every_block else axes[r + first][c]
            ax.imshow(pic)
            ax.set_xticks([]), ax.set_yticks([])
            cost = f", {gflops[name][i]:.3g} GFLOPs" if not every_block or c == cols - 1 else ""
            ax.set_xlabel(f"{left} tokens{cost}", fontsize=8)
            if c == 0:
                (axes[r][0] if every_block else ax).set_ylabel(name if not every_block else f"{name} #{i}", fontsize=9)
            if every_block and r == 0:
                ax.set_title(f"block {block + 1}", fontsize=8)
            if not every_block or c == cols - 1:
                tokens[name].append(left)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"png": str(out), "tokens_left": tokens, "gflops": gflops}
