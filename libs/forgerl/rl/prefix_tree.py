"""Prefix trees over a batch of token sequences, flattened into packed sequences (Forge prefix-tree merging).

Group members share their prompt and the turns of a multi-turn trajectory share their history, so most
tokens of an agentic batch are computed many times over. A trie stores each shared prefix once; each
pack flattens a forest of such tries in preorder, with

    position id  = the node's depth (its position in every sequence that passes through it)
    attention    = ancestors and itself only (the prefix of every sequence through it)

so a causal model computes for every node exactly what it computes for that position of each sequence
alone: zero approximation. A token's log-probability is read at its parent's position, which is the
previous token of its own sequence, so two sequences that branch at node p both read their next token
from p's logits.

Shape legend: B sequences, L their padded length, T nodes of one pack, S sequences of one pack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreePack:
    """A forest of prefix trees flattened into one sequence of T nodes, parents before children."""

    input_ids: Tensor  # [T] long: each node's token
    position_ids: Tensor  # [T] long: each node's depth
    parent: Tensor  # [T] long: packed index of each node's parent, -1 for a root
    origin_row: Tensor  # [T] long: a batch row whose token at `position_ids` this node is
    sequence_rows: Tensor  # [S] long: the batch rows (input sequences) this pack holds
    node_index: Tensor  # [S, L] long: packed index of each of their tokens (0 past a sequence's end)
    lengths: Tensor  # [S] long: their lengths

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> TreePack:
        return TreePack(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def ancestor_mask(self) -> Tensor:
        """bool [T, T]: True where node t may attend node s, i.e. s is t or one of t's ancestors.

        In preorder a subtree is the contiguous range [s, end_s), so s is an ancestor-or-self of t exactly
        when s <= t < end_s: one broadcast comparison, O(T^2) bytes and no per-node work.
        """
        nodes = torch.arange(self.num_tokens, device=self.input_ids.device)
        subtree_end = self.subtree_end()
        return (nodes[None, :] <= nodes[:, None]) & (nodes[:, None] < subtree_end[None, :])

    def subtree_end(self) -> Tensor:
        """[T] long: one past the last node of each node's subtree (preorder).

        The last node of a subtree is the last token of the last sequence (in sorted order) through its
        root: every later sequence that passes through the root without adding a node is a duplicate.
        """
        steps = torch.arange(self.node_index.shape[1], device=self.node_index.device)
        valid_SL = steps[None, :] < self.lengths[:, None]
        seq_SL = torch.arange(self.node_index.shape[0], device=valid_SL.device)[:, None].expand_as(valid_SL)
        last_seq_T = torch.full((self.num_tokens,), -1, dtype=torch.long, device=valid_SL.device)
        last_seq_T.scatter_reduce_(0, self.node_index[valid_SL], seq_SL[valid_SL], reduce="amax")
        last_node_S = self.node_index.gather(1, (self.lengths - 1)[:, None]).squeeze(1)
        return last_node_S[last_seq_T] + 1

    def without_top_levels(self, k: int) -> tuple[TreePack, Tensor] | None:
        """The pack of the nodes at depth >= k, each depth-k node a root, depths (positions) shifted by -k;
        and the kept nodes' indices in this pack [T_k]. None when no sequence is longer than k.

        This is the tree multi-token-prediction module k runs on: its position i of a sequence combines
        the state at i with token i+k, so it is the node of token i+k, and it attends to positions
        0..i, the ancestors down to depth k. Dropping nodes keeps preorder, and a subtree holds only
        deeper nodes, so every subtree stays one contiguous range (the `TreeMask` contract).
        """
        if k < 0:
            raise ValueError(f"without_top_levels({k}): k must be >= 0")
        keep_T = self.position_ids >= k
        seq_keep_S = self.lengths > k
        if not bool(seq_keep_S.any()):
            return None
        kept_N = keep_T.nonzero().squeeze(1)
        new_index_T = keep_T.cumsum(0) - 1  # kept node -> its index among the kept ones
        position_N = self.position_ids[kept_N] - k
        parent_N = torch.where(position_N == 0, -1, new_index_T[self.parent[kept_N].clamp(min=0)])
        lengths_S = self.lengths[seq_keep_S] - k
        old_SL = self.node_index[seq_keep_S, k:]
        steps = torch.arange(old_SL.shape[1], device=old_SL.device)
        node_index_SL = torch.where(steps[None, :] < lengths_S[:, None], new_index_T[old_SL], 0)
        pack = TreePack(
            input_ids=self.input_ids[kept_N],
            position_ids=position_N,
            parent=parent_N,
            origin_row=self.origin_row[kept_N],
            sequence_rows=self.sequence_rows[seq_keep_S],
            node_index=node_index_SL,
            lengths=lengths_S,
        )
        return pack, kept_N


@dataclass(frozen=True)
class PrefixForest:
    """A batch of B sequences merged into one or more `TreePack`s."""

    packs: tuple[TreePack, ...]
    lengths: Tensor  # [B] long

    @classmethod
    def build(
        cls, input_ids: Tensor, lengths: Tensor | None = None, *, max_tokens_per_pack: int | None = None
    ) -> PrefixForest:
        """Merges the rows of `input_ids` [B, L] (right-padded, row b of length lengths[b]).

        Sequences are sorted lexicographically, so sequences that share a prefix are neighbours and the
        trie's nodes come out in preorder. With `max_tokens_per_pack`, neighbours are packed greedily
        while a pack's node count stays within the bound; a prefix shared across two packs is computed
        in both (still exact). A single sequence longer than the bound is an error.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        batch, max_len = input_ids.shape
        if lengths is None:
            lengths = torch.full((batch,), max_len, dtype=torch.long)
        lengths = lengths.to(device="cpu", dtype=torch.long)
        if lengths.shape != (batch,) or bool((lengths < 1).any()) or bool((lengths > max_len).any()):
            raise ValueError(f"lengths must be [B] = [{batch}] with values in [1, {max_len}], got {lengths.tolist()}")
        ids = input_ids.detach().to("cpu", torch.long)
        order, lcp = _sorted_with_common_prefixes(ids, lengths)
        packs = [
            _build_pack(ids, lengths, rows, pack_lcp).to(input_ids.device)
            for rows, pack_lcp in _split_into_packs(order, lcp, lengths, max_tokens_per_pack)
        ]
        return cls(tuple(packs), lengths.to(input_ids.device))

    @property
    def num_input_tokens(self) -> int:
        """Tokens before merging: the sum of the sequences' lengths."""
        return int(self.lengths.sum())

    @property
    def num_packed_tokens(self) -> int:
        """Tokens after merging: the nodes of every pack (a prefix split over two packs counts twice)."""
        return sum(pack.num_tokens for pack in self.packs)

    def pack_per_token(self, values: Tensor) -> list[Tensor]:
        """Maps a per-token tensor [B, L, ...] (routing replay ids, say) into each pack's order: [T, ...].

        A node shared by several sequences takes its value from one of them; per-token values of a shared
        prefix (the rollout engine's routing of a cached prompt) are the same in each.
        """
        if values.shape[0] != self.lengths.shape[0] or values.shape[1] < int(self.lengths.max()):
            raise ValueError(
                f"values of shape {tuple(values.shape)} must be [B, L, ...] with B = {self.lengths.shape[0]} "
                f"and L >= the longest sequence ({int(self.lengths.max())})"
            )
        return [values[pack.origin_row, pack.position_ids] for pack in self.packs]


def _sorted_with_common_prefixes(ids: Tensor, lengths: Tensor) -> tuple[list[int], list[int]]:
    """Rows in lexicographic order, and each one's common-prefix length with the row before it (0 first)."""
    rows = [row[:length] for row, length in zip(ids.tolist(), lengths.tolist(), strict=True)]
    order = sorted(range(len(rows)), key=rows.__getitem__)
    sorted_ids, sorted_len = ids[order], lengths[order]
    if len(order) < 2:
        return order, [0] * len(order)
    # Common prefix of neighbours, vectorised: positions where both rows still have tokens and agree.
    both = torch.minimum(sorted_len[1:], sorted_len[:-1])
    valid = torch.arange(ids.shape[1])[None, :] < both[:, None]
    equal = (sorted_ids[1:] == sorted_ids[:-1]) & valid
    lcp = equal.to(torch.long).cumprod(dim=1).sum(dim=1)
    return order, [0, *lcp.tolist()]


def _split_into_packs(
    order: list[int], lcp: list[int], lengths: Tensor, max_tokens: int | None
) -> list[tuple[list[int], list[int]]]:
    """Greedy packing in sorted order; a pack's first row shares nothing (its common prefix resets to 0)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens_per_pack {max_tokens} must be >= 1 (or None for one pack)")
    packs: list[tuple[list[int], list[int]]] = []
    rows: list[int] = []
    shared: list[int] = []
    size = 0
    for row, common in zip(order, lcp, strict=True):
        length = int(lengths[row])
        if max_tokens is not None and length > max_tokens:
            raise ValueError(
                f"sequence {row} has {length} tokens, more than max_tokens_per_pack={max_tokens}: raise the bound "
                "(a sequence cannot be split without changing its attention)"
            )
        new_nodes = length - common if rows else length
        if rows and max_tokens is not None and size + new_nodes > max_tokens:
            packs.append((rows, shared))
            rows, shared, size, new_nodes = [], [], 0, length
        shared.append(common if rows else 0)
        rows.append(row)
        size += new_nodes
    if rows:
        packs.append((rows, shared))
    return packs


def _build_pack(ids: Tensor, lengths: Tensor, rows: list[int], shared: list[int]) -> TreePack:
    """Numbers the trie nodes of `rows` (sorted, with their common prefixes `shared`) in preorder."""
    max_len = int(lengths[rows].max())
    node_index = torch.zeros(len(rows), max_len, dtype=torch.long)
    tokens, depths, parents, origins = [], [], [], []
    next_node = 0
    for j, (row, common) in enumerate(zip(rows, shared, strict=True)):
        length = int(lengths[row])
        if common:
            node_index[j, :common] = node_index[j - 1, :common]
        new = length - common
        node_index[j, common:length] = torch.arange(next_node, next_node + new)
        next_node += new
        tokens.append(ids[row, common:length])
        depths.append(torch.arange(common, length))
        parent = node_index[j, max(common - 1, 0) : length - 1].clone()
        parents.append(torch.cat([torch.tensor([-1]), parent]) if common == 0 else parent)
        origins.append(torch.full((new,), row, dtype=torch.long))
    return TreePack(
        input_ids=torch.cat(tokens),
        position_ids=torch.cat(depths),
        parent=torch.cat(parents),
        origin_row=torch.cat(origins),
        sequence_rows=torch.tensor(rows, dtype=torch.long),
        node_index=node_index,
        lengths=lengths[rows].clone(),
    )
