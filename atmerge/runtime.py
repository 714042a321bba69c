"""Per-forward merging state shared by the patched blocks of one model, independent of the model
family: it asks the method for a decision, applies it to tokens, sizes and sources, and records
what happened."""

from __future__ import annotations

import dataclasses
import math

import torch

from atmerge.core.merging import merge_attention, merge_source, merge_weighted_average
from atmerge.core.packing import Packing, packing, real_lengths
from atmerge.flops import ModelCost
from atmerge.methods.base import BlockContext, Decision, Method
from atmerge.stats import BlockRecord, MergeStats


# what a block's reduction reports: (tokens removed, θ, matching multiply-adds, requested count)
Outcome = tuple[int, float, float, int | None]


def _per_image_variant(method: Method) -> Method:
    """``method`` merging every image's own count: itself if it already does, the same settings with
    ``batch_adaptive=False`` if it has that option (ATM, ConstantThreshold), else itself."""
    fields = {f.name for f in dataclasses.fields(method)} if dataclasses.is_dataclass(method) else set()
    if method.batch_adaptive and "batch_adaptive" in fields:
        return dataclasses.replace(method, batch_adaptive=False)
    return method


class MergeState:
    """Tokens' merge sizes [B, N], optional sources [B, N, N0], and the records of a forward.

    prune_last: in the last block keep only the protected tokens before the MLP.
    features_only: set by the model's forward when no head follows (e.g. timm's
    ``forward_features`` on its own), so that the statistics leave the head's cost out.

    A key-padding mask given to :meth:`begin` makes the hidden tokens padding (size 0) for every
    method: a method that merges per image on a padded batch (``batch_adaptive=False``) decides on
    it directly; a batch-adaptive one with that option (ATM, ConstantThreshold) merges every
    image's own count in a padded batch; any other method (ToMe, top-r, MCTF, EViT, Zero-TP,
    frozen) decides on the real tokens of the images of one length at a time, as it would on
    those images alone (:meth:`_reduce_by_length`), and the results are padded again.
    """

    def __init__(
        self,
        method: Method,
        cost: ModelCost,
        *,
        num_protected: int,
        prop_attn: bool,
        trace_source: bool,
        prune_last: bool,
    ) -> None:
        self.method = method
        self.cost = cost
        self.depth = cost.depth
        self.num_protected = num_protected
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.prune_last = prune_last
        self.size: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.records: list[BlockRecord] = []
        self.per_image_counts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.packed_blocks: list[int] = []  # blocks whose attention projected the real tokens only
        self.merged_any = False
        self.pruned_last = False
        self.padded = False
        self.features_only = False
        self._before: tuple[int, Outcome, torch.Tensor | None] | None = None  # (tokens in, outcome, real tokens in)
        self._packing: tuple[torch.Tensor, Packing] | None = None  # (the sizes it packs, its packing)
        self._real_tokens: tuple[torch.Tensor, int] | None = None  # (sizes, their real tokens), from a merge
        # (the padded tokens a packed block returned, their version, the same tokens packed [T, C]),
        # so that the next block takes the packed rows without gathering them again
        self.carried: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._padded_method = _per_image_variant(method)

    @property
    def per_image(self) -> bool:
        """Whether every image merges its own count (the batch is then padded; see
        :mod:`atmerge.core.padding`): a per-image method, or any method on a padded input."""
        return not self.method.batch_adaptive or self.padded

    @property
    def deciding(self) -> Method:
        """The method that decides this forward's merges (its per-image variant on a padded input)."""
        return self._padded_method if self.padded else self.method

    def begin(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Start a forward pass with tokens x [B, N, C]: every token has size 1, or — given a
        key-padding mask ``valid`` [B, N] (True for real tokens, padding trailing in every image,
        the protected tokens real) — size 0 for padding, which then never matches, merges,
        is attended to or pooled (per-image merging, :mod:`atmerge.core.padding`)."""
        batch, num_tokens, _ = x.shape
        self.size = torch.ones(batch, num_tokens, device=x.device, dtype=torch.float32)
        self.padded = False
        if valid is not None:
            self._check_padding(valid, batch, num_tokens)
            if not bool(valid.all()):  # a mask that hides nothing is no padding
                self.size = valid.to(device=x.device, dtype=torch.float32).expand(batch, num_tokens).contiguous()
                self.padded = True
        self.source = None
        if self.trace_source:
            eye = torch.eye(num_tokens, device=x.device, dtype=x.dtype)
            self.source = eye.unsqueeze(0).expand(batch, -1, -1)
        self.records = []
        self.per_image_counts = []
        self.packed_blocks = []
        self.merged_any = False
        self.pruned_last = False
        self._before = None
        self._packing = self._real_tokens = self.carried = None

    def _check_padding(self, valid: torch.Tensor, batch: int, num_tokens: int) -> None:
        """Raise ValueError unless ``valid`` [B, N] is a padding mask this state can follow."""
        if (
            valid.dtype != torch.bool
            or valid.dim() != 2
            or valid.shape[1] != num_tokens
            or valid.shape[0] not in (1, batch)
        ):
            raise ValueError(
                f"a key-padding mask must be a bool tensor [{batch}, {num_tokens}], got "
                f"{valid.dtype} {list(valid.shape)}"
            )
        if not bool(valid[:, : self.num_protected].all()):
            raise ValueError(
                f"the attention mask hides a protected token (the first {self.num_protected}: CLS, "
                "distillation token, registers); only patch tokens may be padding"
            )
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            raise ValueError(
                "the attention mask hides a token before a token it keeps; padding must be "
                "trailing (the last tokens of each image), as atmerge's per-image batches lay it out"
            )

    _PER_FORWARD = (
        "size",
        "source",
        "records",
        "per_image_counts",
        "packed_blocks",
        "merged_any",
        "pruned_last",
        "padded",
        "_before",
        "_packing",
        "_real_tokens",
    )

    _LISTS = ("records", "per_image_counts", "packed_blocks")

    def snapshot(self) -> dict:
        """The state of the forward pass so far (tensors by reference), for :meth:`restore`."""
        saved = {name: getattr(self, name) for name in self._PER_FORWARD}
        for name in self._LISTS:
            saved[name] = list(saved[name])
        return saved

    def restore(self, saved: dict) -> None:
        """Put back a :meth:`snapshot`."""
        for name, value in saved.items():
            setattr(self, name, list(value) if name in self._LISTS else value)

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """log(size) as an additive attention bias [B, 1, 1, N] (−inf for padding, whose size is
        0), a 0 / −inf key-padding mask when proportional attention is off in a padded batch, or
        None when it would be zero (proportional attention off, or nothing merged yet)."""
        if not (self.merged_any or self.padded):
            return None
        if self.prop_attn:
            return self.size.to(dtype).log()[:, None, None, :]
        if self.per_image:
            zero = torch.zeros((), dtype=dtype, device=self.size.device)
            return torch.where(self.size > 0, zero, float("-inf"))[:, None, None, :]
        return None

    def padding_mask(self) -> torch.Tensor | None:
        """[B, N] True for real tokens when the batch may hold padding (per-image counts after a
        merge), so that per-token work can skip it; None otherwise."""
        return self.size > 0 if self.per_image and (self.merged_any or self.padded) else None

    def attention_packing(self, block: int) -> Packing | None:
        """:meth:`packing` for ``block``'s attention, recorded so that the executed GFLOPs count its
        projections on the real tokens only."""
        packed = self.packing()
        if packed is not None:
            self.packed_blocks.append(block)
        return packed

    def packing(self) -> Packing | None:
        """Where the real tokens of the current padded batch lie (:mod:`atmerge.core.packing`), when
        the batch may hold padding (as :meth:`padding_mask`); None otherwise.  Made once per token
        layout; after a per-image merge it reads nothing back from the device (the merge already
        counted the real tokens), otherwise it reads their total once.  None too once the last
        block kept only the protected tokens (all real)."""
        if not (self.per_image and (self.merged_any or self.padded)) or self.pruned_last:
            return None
        if self._packing is None or self._packing[0] is not self.size:
            known = self._real_tokens
            total = known[1] if known is not None and known[0] is self.size else None
            self._packing = (self.size, packing(real_lengths(self.size), self.size.shape[1], total))
        return self._packing[1]

    def _apply(self, decision: Decision, x: torch.Tensor) -> torch.Tensor:
        """Apply a decision to x [B, N, C], the sizes and the sources."""
        merge = decision.merge
        padded = getattr(merge, "padded", False)  # the longest image may merge nothing, others do
        if merge.r > 0 or getattr(merge, "value_weight", None) is not None or padded:
            average = getattr(merge, "weighted_average", None)  # a padded merge's own (core/padding.py)
            x, self.size = average(x, self.size) if average is not None else merge_weighted_average(merge, x, self.size)
            real_tokens = getattr(merge, "real_tokens", None)
            self._real_tokens = None if real_tokens is None else (self.size, real_tokens)
            if self.source is not None:
                self.source = merge_source(merge, self.source)
            self.merged_any = self.merged_any or merge.r > 0 or padded
        return x

    @staticmethod
    def _outcome(decision: Decision) -> Outcome:
        return decision.merge.r, decision.threshold, decision.matching_macs, decision.requested

    @property
    def _by_length(self) -> bool:
        """A padded batch and a method that cannot decide on padding: it decides per length."""
        return self.padded and self.deciding.batch_adaptive

    def _reduce_by_length(
        self,
        block: int,
        x: torch.Tensor,
        metric: torch.Tensor | None,
        attention: torch.Tensor | None,
        carry_attention: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Outcome]:
        """A padded batch reduced by a method that decides one count per batch (ToMe, top-r, MCTF,
        EViT, Zero-TP, frozen): the images whose real tokens (the first n, padding after them)
        number the same are given to the method alone, without their padding, as that batch would
        be; each group's decision is applied to its own tokens, sizes and sources, and the results
        are padded again to the longest image (size 0).  So padding never matches, merges, is
        attended to or pooled, and every image merges as it would unpadded.

        x [B, N, C], metric [B, N, C_h] (or None), attention [B, H, N, N] (or None).  Returns (x
        [B, N', C], the attention map carried over the merge [B, H, N', N'] when
        ``carry_attention`` and something merged (else None), the block's outcome)."""
        batch, num_tokens, channels = x.shape
        p, lengths = self.num_protected, (self.size > 0).sum(1)
        groups = []
        for n in sorted(set(lengths.tolist())):
            rows = (lengths == n).nonzero()[:, 0]
            size = self.size[rows, :n]
            ctx = BlockContext(
                block,
                self.depth,
                None if metric is None else metric[rows, :n],
                size,
                p,
                x[rows, :n],
                None if attention is None else attention[rows][..., :n, :n],
            )
            decision = self.deciding.decide(ctx)
            merge, weight = decision.merge, getattr(decision.merge, "value_weight", None)
            changed = merge.r > 0 or weight is not None
            tokens, new_size = merge_weighted_average(merge, x[rows, :n], size) if changed else (x[rows, :n], size)
            source = self.source[rows, :n] if self.source is not None else None
            if changed and source is not None:
                source = merge_source(merge, source)
            carried = None
            if carry_attention:
                carried = attention[rows][..., :n, :n]
                if changed:
                    carried = merge_attention(merge, carried, size if weight is None else weight)
            groups.append((rows, decision, changed, tokens, new_size, source, carried))
        decisions = [g[1] for g in groups]
        images = [g[0].numel() for g in groups]
        requested = [d.requested for d in decisions if d.requested is not None]
        macs = sum(d.matching_macs * k for d, k in zip(decisions, images)) / max(batch, 1)
        width = max((g[3].shape[1] for g in groups), default=num_tokens)
        outcome = (
            num_tokens - width,
            decisions[0].threshold if decisions else math.nan,
            macs,
            max(requested, default=None),
        )
        if not any(g[2] for g in groups):
            return x, None, outcome
        out = x.new_zeros(batch, width, channels)
        size = self.size.new_zeros(batch, width)
        source = None if self.source is None else self.source.new_zeros(batch, width, self.source.shape[-1])
        carried = None if not carry_attention else attention.new_zeros(batch, attention.shape[1], width, width)
        for rows, _, _, tokens, new_size, new_source, new_carried in groups:
            m = tokens.shape[1]
            out[rows, :m], size[rows, :m] = tokens, new_size
            if source is not None:
                source[rows, :m] = new_source
            if carried is not None:
                carried[rows, :, :m, :m] = new_carried
        self.size, self.source, self.merged_any = size, source, True
        return out, carried, outcome

    def reduce_before(
        self, block: int, x: torch.Tensor, metric: torch.Tensor, attention: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For a method whose stage is 'before_attention': reduce the tokens x [B, N, C] that enter
        ``block`` from its attention map [B, H, N, N] computed on them; metric [B, N, C_h].

        Returns (the reduced tokens, the attention map carried over the merge [B, H, N', N'] —
        or None when nothing merged, so the block keeps its map as it is)."""
        valid_in = (self.size > 0).sum(1) if self.per_image else None
        if self._by_length:
            n_in = x.shape[1]
            x, carried, outcome = self._reduce_by_length(block, x, metric, attention, carry_attention=True)
            self._before = (n_in, outcome, valid_in)
            return x, carried
        ctx = BlockContext(block, self.depth, metric, self.size, self.num_protected, x, attention)
        decision = self.deciding.decide(ctx)
        self._before = (x.shape[1], self._outcome(decision), valid_in)
        merge = decision.merge
        if merge.r == 0 and not getattr(merge, "padded", False):
            return x, None
        weight = getattr(merge, "value_weight", None)
        merged_attention = merge_attention(merge, attention, self.size if weight is None else weight)
        return self._apply(decision, x), merged_attention

    def reduce(
        self,
        block: int,
        x: torch.Tensor,
        metric: torch.Tensor | None,
        attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """After attention: apply the method's decision for ``block`` to x [B, N, C] (metric
        [B, N, C_h]; attention [B, H, N, N] when the method reads it), or keep only the protected
        tokens in the last block (``prune_last``); record the block."""
        n_attended, p = x.shape[1], self.num_protected
        valid_in = (self.size > 0).sum(1) if self.per_image else None
        n_in, before, valid_before = self._before if self._before is not None else (n_attended, None, None)
        self._before = None
        valid_in = valid_before if valid_before is not None else valid_in  # real tokens entering the block
        merged, threshold, macs, requested = before if before is not None else (0, math.nan, 0.0, None)
        if block == self.depth - 1 and self.prune_last:
            self.size = self.size[:, :p]
            x = x[:, :p]
            self.pruned_last = True
        elif self.method.stage == "after_attention":
            if self._by_length:
                x, _, (merged, threshold, macs, requested) = self._reduce_by_length(block, x, metric, attention)
            else:
                decision = self.deciding.decide(BlockContext(block, self.depth, metric, self.size, p, x, attention))
                x = self._apply(decision, x)
                merged, threshold, macs, requested = self._outcome(decision)
        if valid_in is not None:  # a padded batch: every image's own counts
            valid_out = (self.size > 0).sum(1)
            merged_here = (
                torch.zeros_like(valid_in) if block == self.depth - 1 and self.pruned_last else valid_in - valid_out
            )
            self.per_image_counts.append((valid_in, valid_out, merged_here))
        self.records.append(BlockRecord(n_in, x.shape[1], merged, threshold, macs, requested, n_attended))
        return x

    def _gflops(
        self, num_patches: float, tokens_in: list[float], tokens_mlp: list[float], attended: list[float] | None = None
    ) -> float:
        """GFLOPs of one image as :meth:`ModelCost.gflops`, without the head and pooling when the
        last forward ran no head (:attr:`features_only`)."""
        total = self.cost.gflops(num_patches, tokens_in, tokens_mlp, tokens_attended=attended)
        if self.features_only:
            out = tokens_mlp[-1]
            total -= (self.cost.head + max(out - self.cost.pool_skips, 0) * self.cost.pool_per_token) / 1e9
        return total

    def _executed_gflops(
        self, widths: list[float], attended: list[float], mean_in: list[float], mean_mlp: list[float]
    ) -> float:
        """GFLOPs per image of what a padded batch ran: the MLP on the real tokens (``mean_mlp`` per
        image), attention's matmuls on the padded widths, its projections and norms on the real
        tokens (``mean_in``) in the blocks that ran packed (:attr:`packed_blocks`), else on the
        padded widths too."""
        packed = set(self.packed_blocks)
        linear = [mean_in[i] if i in packed else widths[i] for i in range(self.depth)]
        linear_attended = [mean_in[i] if i in packed else attended[i] for i in range(self.depth)]
        total = self._gflops(widths[0] - self.num_protected, linear, mean_mlp, linear_attended)
        for i in packed:  # the matmuls ran on the padded width, not on the mean count
            total += 2.0 * self.cost.blocks[i].attn_dim * (widths[i] ** 2 - mean_in[i] ** 2) / 1e9
        return total

    def stats(self) -> MergeStats:
        """Statistics of the last forward pass (token counts and GFLOPs: means over the images)."""
        if len(self.records) != self.depth:
            raise RuntimeError("no complete forward pass of the patched model has run yet")
        p = self.num_protected
        tokens_in = [float(r.tokens_in) for r in self.records]
        tokens_mlp = [float(r.tokens_mlp) for r in self.records]
        attended = [float(r.tokens_attended) for r in self.records]
        merged = [float(r.merged) for r in self.records]
        gflops_of = self._gflops
        executed = gflops_of(tokens_in[0] - p, tokens_in, tokens_mlp, attended)
        gflops = executed
        if self.per_image_counts and self.size.shape[0] > 0:
            counts_in, counts_mlp, counts_merged = (torch.stack(c).double().cpu() for c in zip(*self.per_image_counts))
            images = counts_in.shape[1]
            gflops = (
                sum(
                    gflops_of(tokens_in[0] - p, counts_in[:, b].tolist(), counts_mlp[:, b].tolist())
                    for b in range(images)
                )
                / images
            )
            executed = self._executed_gflops(
                tokens_in, attended, counts_in.mean(1).tolist(), counts_mlp.mean(1).tolist()
            )
            tokens_in, tokens_mlp = counts_in.mean(1).tolist(), counts_mlp.mean(1).tolist()
            attended, merged = tokens_in, counts_merged.mean(1).tolist()
        return MergeStats(
            tokens_per_block=tokens_in,
            merged_per_block=merged,
            tokens_mlp_per_block=tokens_mlp,
            tokens_attended_per_block=attended,
            thresholds=[r.threshold for r in self.records],
            gflops=gflops,
            matching_gflops=sum(r.matching_macs for r in self.records) / 1e9,
            batch_size=int(self.size.shape[0]),
            requested_per_block=[r.requested for r in self.records],
            prune_last_block=self.pruned_last,
            prop_attn=self.prop_attn,
            executed_gflops=executed,
        )
