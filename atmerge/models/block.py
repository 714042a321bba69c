"""The merging step of a transformer block, shared by every model family.

A family says how its block computes each part (:class:`BlockParts`: norms, attention with an
additive bias returning the keys' head-mean, the residual branches); :func:`merging_step` runs
them in the order every pre-norm ViT block has, asks the shared :class:`MergeState` for the
method's decision between attention and MLP, and runs the MLP only on what is left.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from atmerge.core.packing import Packing, PackedTokens, first_rows, packed_tokens
from atmerge.models.patching import INDEX, STATE, refuse_fx
from atmerge.runtime import MergeState

AttentionOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class BlockParts(ABC):
    """How one family's block computes its parts.  Stateless: every method takes the block."""

    @abstractmethod
    def norm1(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The norm before attention, x [B, N, C] → [B, N, C]."""

    @abstractmethod
    def attention(
        self,
        block: nn.Module,
        h: torch.Tensor,
        bias: torch.Tensor | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        need_probs: bool,
        **kwargs,
    ) -> AttentionOutput:
        """Attention on the normed tokens h [B, N, C] with an additive ``bias`` [B, 1, 1, N] (or
        None) and the caller's ``mask``; returns (output [B, N, C], keys' head-mean [B, N, C_h],
        probabilities [B, H, N, N] when ``need_probs``, else None or whatever was computed)."""

    @abstractmethod
    def attention_map(
        self, block: nn.Module, h: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities [B, H, N, N] and keys' head-mean [B, N, C_h] of h [B, N, C] (q, k only)."""

    @abstractmethod
    def attend(self, block: nn.Module, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The rest of attention given its probabilities [B, H, N, N]: values of h, AV, output
        projection → [B, N, C]."""

    def packed_attention(
        self, block: nn.Module, h: torch.Tensor, packing: Packing, bias: torch.Tensor | None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of a padded per-image batch given its real tokens only: h [T, C] the normed
        real tokens (:mod:`atmerge.core.packing`), ``bias`` [B, 1, 1, N] (−inf for padding).
        Returns (output of the real tokens [T, C], keys' head-mean [B, N, C_h] in the padded
        layout).  A family whose attention can project packed tokens overrides this, so that its
        linear layers skip the padding; by default h is spread over the padded layout again
        (:meth:`~atmerge.core.packing.Packing.spread`) and attention runs padded."""
        out, metric, _ = self.attention(block, packing.spread(h), bias, None, False, False, **kwargs)
        return packing.pack(out), metric

    @abstractmethod
    def attn_branch(self, block: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """What the attention output adds to the residual stream (layer scale, dropout / drop path)."""

    @abstractmethod
    def mlp(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """norm → MLP → layer scale on tokens x [..., C] (dropout / drop path follow in :meth:`mlp_drop`)."""

    @abstractmethod
    def mlp_drop(self, block: nn.Module, update: torch.Tensor) -> torch.Tensor:
        """Dropout / drop path on the MLP's update [B, N, C]."""


def merging_step(
    parts: BlockParts,
    block: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    key_padding: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """One patched block on tokens x [B, N, C] → [B, N', C]: attention with the log-size bias,
    the method's decision through the block's :class:`MergeState` (before attention for a
    method whose stage is 'before_attention'), the MLP on the remaining real tokens.  ``mask``
    (the caller's attention mask) is honoured until the first merge; ``key_padding`` [B, N]
    (True for real tokens; first block only) makes the other tokens padding, followed through
    every merge by the state; ``kwargs`` go to attention.

    A batch whose images merge their own counts (padded, :mod:`atmerge.core.padding`) runs its
    per-token work packed (:mod:`atmerge.core.packing`): the norms, the attention's projections
    (:meth:`BlockParts.packed_attention`) and the MLP see only the real tokens [T, C]; attention
    itself and the merge run on the padded layout, padding masked by its size 0."""
    refuse_fx(x)
    state: MergeState = getattr(block, STATE)
    index: int = getattr(block, INDEX)
    if index == 0:
        state.begin(x, key_padding)
    elif mask is not None and state.merged_any:
        raise ValueError("an attention mask is defined on the original tokens and cannot follow merged tokens")
    method = state.method
    bias = state.attention_bias(x.dtype)
    if method.stage == "before_attention":
        h = parts.norm1(block, x)
        if mask is not None or is_causal:
            raise ValueError(f"{type(method).__name__} reduces tokens before attention and takes no attention mask")
        probs, metric = parts.attention_map(block, h, bias)
        x, merged_probs = state.reduce_before(index, x, metric, probs)
        if merged_probs is not None:
            h, probs = parts.norm1(block, x), merged_probs
        out, metric, probs = parts.attend(block, h, probs), None, None
    else:
        need_probs = method.attention == "current"
        packing = None if need_probs or mask is not None or is_causal else state.attention_packing(index)
        packing = packing if packing is not None and packing.padded else None  # no padding: nothing to skip
        if packing is not None and not block.training and not _decides_by_length(state):
            return _packed_step(parts, block, state, index, x, packing, bias, **kwargs)
        if packing is not None:  # a padded batch: the projections run on the real tokens only
            out, metric = parts.packed_attention(block, parts.norm1(block, packing.pack(x)), packing, bias, **kwargs)
            probs = None
            if block.training:  # drop path drops whole images: on the padded layout
                out = packing.unpack(out)
            else:  # layer scale and (inactive) dropout act per token: on the real tokens
                x, out = packing.add(x, parts.attn_branch(block, out)), None
        else:
            h = parts.norm1(block, x)
            out, metric, probs = parts.attention(block, h, bias, mask, is_causal, need_probs, **kwargs)
            probs = probs if need_probs else None
    if out is not None:
        x = x + parts.attn_branch(block, out)
    x = state.reduce(index, x, metric, probs)
    packing = state.packing()
    if packing is None or not packing.padded:
        return x + parts.mlp_drop(block, parts.mlp(block, x))
    update = parts.mlp(block, packing.pack(x))  # the MLP on real tokens only (dtype: autocast's)
    if not block.training:  # mlp_drop is the identity
        # in place when nothing differentiates: x is this block's own (attention's residual sum or the merge's output)
        inplace = not torch.is_grad_enabled() and x.is_contiguous()
        return packing.add_(x, update) if inplace else packing.add(x, update)
    return x + parts.mlp_drop(block, packing.unpack(update))


def _decides_by_length(state: MergeState) -> bool:
    """A padded input given to a method that decides one count per batch: the state reduces the
    images of each length on their own (padded tokens needed), not by one padded merge."""
    return state.padded and state.deciding.batch_adaptive


def _packed_rows(state: MergeState, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The real tokens of x [B, N, C] packed [T, C]: those the previous block packed when x is the
    very tensor it returned, unchanged since; else one gather."""
    carried, state.carried = state.carried, None
    if carried is not None and carried[0] is x and carried[1] == x._version and carried[2].shape[0] == packing.total:
        return carried[2]
    return packing.pack(x)


def _packed_step(
    parts: BlockParts,
    block: nn.Module,
    state: MergeState,
    index: int,
    x: torch.Tensor,
    packing: Packing,
    bias: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor:
    """:func:`merging_step` of a padded per-image batch in inference, x [B, N, C] → [B, N', C]:
    the residual stream stays packed [T, C] through the whole block, attention's q, k, v alone
    are spread over the padded layout, the merge sums the packed rows straight into their packed
    output rows (:class:`~atmerge.core.packing.PackedTokens`); the output is padded once (zeros at
    the padding), and the next block takes its packed rows without gathering them again."""
    rows = _packed_rows(state, x, packing)
    out, metric = parts.packed_attention(block, parts.norm1(block, rows), packing, bias, **kwargs)
    rows = rows + parts.attn_branch(block, out)
    entry = state.snapshot()
    merged = state.reduce(index, packed_tokens(rows, packing.batch, packing.width, packing), metric, None)
    if state.pruned_last:  # the protected tokens alone, real in every image
        p = merged.shape[1]
        protected = first_rows(packing.lengths)[:, None] + torch.arange(p, device=rows.device)
        x = rows.index_select(0, protected.flatten()).view(packing.batch, p, rows.shape[-1])
        return x + parts.mlp(block, x)
    if not isinstance(merged, PackedTokens):  # a merge that needs the padded tokens: run it on them
        state.restore(entry)
        x = state.reduce(index, packing.unpack(rows), metric, None)
        layout = state.packing()
        rows = layout.pack(x)
    else:
        rows, layout = merged.rows, state.packing()
    update = parts.mlp(block, rows)  # mlp_drop is the identity in inference
    rows = rows.add_(update) if not torch.is_grad_enabled() else rows + update
    out = layout.unpack(rows) if layout.padded else rows.view(layout.batch, layout.width, rows.shape[-1])
    state.carried = (out, out._version, rows)
    return out


def checkpointed_step(
    state: MergeState,
    step: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    checkpoint_fn: Callable | None = None,
) -> torch.Tensor:
    """``step(x)`` (one patched block, tokens [B, N, C] → [B, N', C]) under activation
    checkpointing (``checkpoint_fn(function, x)``; default torch's non-reentrant checkpoint).  The
    backward pass recomputes the block from the merge state it saw in the forward pass (so it
    makes the same merges) and leaves the state as the forward pass left it (so ``last_stats``
    still describes the forward pass)."""
    entry = state.snapshot()
    runs = 0

    def run(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal runs
        runs += 1
        if runs == 1:
            return step(tokens)
        after = state.snapshot()
        state.restore(entry)
        try:
            return step(tokens)
        finally:
            state.restore(after)

    if checkpoint_fn is None:
        return checkpoint(run, x, use_reentrant=False)
    return checkpoint_fn(run, x)
