"""Probes packed into rows as prefix trees: each shared prefix is computed once.

Measuring M probes under a language model costs one forward per token. Probes written from
templates share their beginnings ("a kakti is", "a kakti has", "a kakti does not"), so
instead of one right-padded row per probe, the probes' token prefixes become the nodes of a
trie, laid out in rows of a fixed width. A node attends to itself and its ancestors only (a
4-D attention mask) at the position of its depth, which is exactly what it sees in its own
sequence, so every node's hidden state equals that token's hidden state in each probe that
contains it. A probe's log-probability is the sum, over the scored tokens on its path, of
log p(token | context node): one vocabulary projection per distinct context, however many
tokens it predicts. Nodes that nothing reads (a probe's last token predicts nothing and is
nobody's ancestor) are left out.

On the 64 knowledge-domain probes of `benchmarks/eif_lm_batched.py` (556 tokens) the rows
hold 384 positions, where right-padded rows hold 832; 351 contexts are projected for 407
scored (context, token) pairs. The benchmark prints these counts for its probe set.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datafluence.tasks import CausalLMTask, eval_mode


@dataclass(frozen=True)
class PackedProbes:
    """M probes as trie nodes in R rows of width L.

    `edge_node[e]` is the flat index (row * L + position) of the node whose output predicts
    token `edge_token[e]`; `edge_use[e, m]` is 1 when that token is a scored token of probe
    m, so the probes' log-probabilities are `log_p(edges) @ edge_use`.
    """

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L]
    allowed: Tensor  # [R, L, L] bool: node i may attend to node j
    edge_node: Tensor  # [E]
    edge_token: Tensor  # [E]
    edge_use: Tensor  # [E, M]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, lo: int, hi: int) -> PackedProbes:
        """Rows [lo, hi) and the edges predicted inside them (node indices rebased)."""
        keep = (self.edge_node >= lo * self.width) & (self.edge_node < hi * self.width)
        return PackedProbes(
            self.input_ids[lo:hi],
            self.position_ids[lo:hi],
            self.allowed[lo:hi],
            self.edge_node[keep] - lo * self.width,
            self.edge_token[keep],
            self.edge_use[keep],
        )


WIDTHS = (32, 48, 64, 96, 128)  # row widths tried by pack_probes
MAX_PACKED_LENGTH = 256  # longer probes are measured padded: [rows, 1, L, L] masks grow as L²
HEAD_ROWS = 512  # positions per tile of the vocabulary projection
HEAD_VOCAB = 1024  # vocabulary entries per tile: [512, 1024] logits stay in cache
CHECKED_PROBES = 4  # probes measured both ways by packing_matches, once per finetuner
ATTENTION_SCALE = 2048  # a row of width L costs about L * (1 + L / ATTENTION_SCALE) tokens


def pack_probes(
    tensors: Mapping[str, Tensor], pad_id: int, width: int | None = None
) -> PackedProbes:
    """Pack right-padded probes (`input_ids`, `attention_mask`, `target_mask`) into trie rows.

    Probes go in lexicographic order, so neighbours share the longest prefixes; a row takes
    probes while their new nodes fit in `width` (widened to the longest probe). Without a
    width, the one of `WIDTHS` that costs least: rows end with unused positions, and
    attention grows with the width.
    """
    ids, attention, target = (
        tensors[k].cpu() for k in ("input_ids", "attention_mask", "target_mask")
    )
    if bool(target[:, 0].any()):
        raise ValueError("a probe scores its first token, which no context predicts")
    lengths = attention.sum(1).tolist()
    scored = [[t for t in range(lengths[m]) if target[m, t]] for m in range(len(ids))]
    tokens = [ids[m, : lengths[m]].tolist() for m in range(len(ids))]
    # a node is needed only while something still reads it: the prefix before each scored
    # token (its output predicts that token) and those prefixes' ancestors (keys and values)
    seqs = [tuple(tokens[m][: max(scored[m], default=0)]) for m in range(len(ids))]
    longest = max([1, *map(len, seqs)])
    widths = {max(w, longest) for w in (WIDTHS if width is None else (width,))}
    packs = {w: _fill_rows(seqs, w) for w in widths}
    width = min(packs, key=lambda w: len(packs[w][0]) * w * (1 + w / ATTENTION_SCALE))
    rows, parents, node_of = packs[width]
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1)  # padding: self only
    for r, trie in enumerate(rows):
        for prefix, pos in trie.items():
            input_ids[r, pos] = prefix[-1]
            position_ids[r, pos] = len(prefix) - 1
            ancestor = pos
            while ancestor >= 0:
                allowed[r, pos, ancestor] = True
                ancestor = parents[r][ancestor]
    edges: dict[tuple[int, int], int] = {}  # (flat index of the context node, token) -> edge
    uses: list[tuple[int, int]] = []
    for m, (r, *path) in node_of:
        for t in scored[m]:
            e = edges.setdefault((r * width + path[t - 1], tokens[m][t]), len(edges))
            uses.append((e, m))
    edge_use = torch.zeros(len(edges), len(seqs))
    if uses:
        e_idx, m_idx = zip(*uses, strict=True)
        edge_use[list(e_idx), list(m_idx)] = 1.0
    node, token = (torch.tensor([k[i] for k in edges], dtype=torch.long) for i in (0, 1))
    return PackedProbes(input_ids, position_ids, allowed, node, token, edge_use)


def _fill_rows(
    seqs: list[tuple[int, ...]], width: int
) -> tuple[list[dict[tuple[int, ...], int]], list[list[int]], list[tuple[int, list[int]]]]:
    """Tries of at most `width` nodes: per row prefix -> position and each node's parent
    position (-1 for roots); per probe its row and the positions of its prefixes."""
    rows: list[dict[tuple[int, ...], int]] = []
    parents: list[list[int]] = []
    node_of: list[tuple[int, list[int]]] = []
    for m in sorted(range(len(seqs)), key=seqs.__getitem__):
        seq = seqs[m]
        shared = 0
        if rows:
            shared = next((k for k in range(len(seq), 0, -1) if seq[:k] in rows[-1]), 0)
        if not rows or len(rows[-1]) + len(seq) - shared > width:
            rows.append({})
            parents.append([])
        trie, parent = rows[-1], parents[-1]
        path: list[int] = []
        for k in range(1, len(seq) + 1):
            if seq[:k] not in trie:
                trie[seq[:k]] = len(trie)
                parent.append(path[-1] if path else -1)
            path.append(trie[seq[:k]])
        node_of.append((m, [len(rows) - 1, *path]))
    return rows, parents, node_of


@contextmanager
def head_inputs(model: nn.Module) -> Iterator[list[Tensor]]:
    """Capture what reaches the vocabulary projection, which then runs on zero positions.

    The caller projects only the positions it needs (`edge_log_probs`); the model's own
    [rows, width, vocabulary] logits are never formed.
    """
    head: nn.Module = cast(Any, model).get_output_embeddings()
    seen: list[Tensor] = []

    def pre_hook(_module: nn.Module, args: tuple) -> tuple:
        seen.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()


def edge_log_probs(
    head: nn.Module,
    hidden: Tensor,
    context: Tensor,
    tokens: Tensor,
    rows: int = HEAD_ROWS,
    vocab: int = HEAD_VOCAB,
) -> Tensor:
    """log softmax(head(hidden[context]))[tokens] for hidden [H, d]: each of the H positions
    is projected once however many edges leave it.

    The projection runs in tiles of `rows` positions x `vocab` vocabulary entries, and each
    tile's logsumexp is taken while it is in cache; the tiles' logsumexps are then combined.
    One [512, 49152] matmul streams the whole 113 MB embedding matrix well below this
    machine's peak rate, then the logsumexp reads its 100 MB of logits back; on SmolLM2's
    head the tiles are 1.6x faster (`benchmarks/vocab_projection.py`, 2 cores).
    """
    weight, bias = cast(Tensor, head.weight), cast(Tensor | None, head.bias)
    exact = torch.promote_types(weight.dtype, torch.float32)  # float64 stays float64
    out = hidden.new_empty(len(tokens), dtype=exact)
    for lo in range(0, len(hidden), rows):
        block = hidden[lo : lo + rows]
        inside = (context >= lo) & (context < lo + rows)
        local, wanted = context[inside] - lo, tokens[inside]
        picked = torch.empty(len(local), dtype=exact, device=hidden.device)
        parts = []
        for v in range(0, weight.shape[0], vocab):
            tile = F.linear(
                block, weight[v : v + vocab], None if bias is None else bias[v : v + vocab]
            ).to(exact)
            parts.append(torch.logsumexp(tile, dim=-1))
            here = (wanted >= v) & (wanted < v + vocab)
            picked[here] = tile[local[here], wanted[here] - v]
        out[inside] = picked - torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)[local]
    return out


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's vocabulary projection when it is a plain, unhooked nn.Linear, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


@torch.no_grad()
def measure_packed(
    model: nn.Module,
    task: CausalLMTask,
    tensors: Mapping[str, Tensor],
    copies: int = 1,
    probe_rows: int = 256,
) -> Tensor:
    """Measurements [copies, M] of the probes, each trie row repeated `copies` times
    copy-major (row block c is seen by whatever the caller attached for copy c, e.g. LoRA
    adapter c). About `probe_rows` (copy, probe) pairs go through each forward.

    Only for models whose vocabulary projection is a plain nn.Linear (`plain_head`) applied
    last; `packing_matches` checks a model once against the ordinary measurement.
    """
    head = plain_head(model)
    if head is None:
        raise ValueError("prefix packing needs a plain nn.Linear vocabulary projection")
    device = head.weight.device
    pack = pack_probes(tensors, int(task.tokenizer.pad_token_id))
    n_rows, width = pack.input_ids.shape
    per_forward = max(1, round(probe_rows / copies / (pack.edge_use.shape[1] / n_rows)))
    out = torch.zeros(copies, pack.edge_use.shape[1], device=device, dtype=torch.float64)
    blocked = torch.finfo(head.weight.dtype).min
    with eval_mode(model), head_inputs(model) as seen:
        for lo in range(0, n_rows, per_forward):
            part = pack.rows(lo, lo + per_forward)
            r = len(part.input_ids)
            mask = torch.zeros(r, 1, width, width, dtype=head.weight.dtype)
            mask.masked_fill_(~part.allowed[:, None], blocked)
            model(
                input_ids=part.input_ids.repeat(copies, 1).to(device),
                position_ids=part.position_ids.repeat(copies, 1).to(device),
                attention_mask=mask.to(device).repeat(copies, 1, 1, 1),
                use_cache=False,
            )
            # each context node is projected once for all the edges that leave it
            nodes, context = part.edge_node.to(device).unique(return_inverse=True)
            hidden = seen.pop().reshape(copies, r * width, -1)[:, nodes]
            shift = torch.arange(copies, device=device)[:, None] * len(nodes)
            logp = edge_log_probs(
                head,
                hidden.reshape(-1, hidden.shape[-1]),
                (context + shift).flatten(),
                part.edge_token.to(device).repeat(copies),
            )
            out += logp.view(copies, -1).double() @ part.edge_use.to(device, torch.float64)
    return out.exp() if task.measurement == "prob" else out


def packing_matches(model: nn.Module, task: CausalLMTask, tensors: Mapping[str, Tensor]) -> bool:
    """Whether packed and ordinary measurements agree on (up to 4 of) these probes: False for
    models that transform logits after the projection or ignore custom attention masks."""
    if plain_head(model) is None:
        return False
    few = {k: v[:CHECKED_PROBES] for k, v in tensors.items()}
    try:
        packed = measure_packed(model, task, few)[0]
    except (TypeError, ValueError, RuntimeError):  # the model rejects position_ids / 4-D masks
        return False
    with torch.no_grad(), eval_mode(model):
        plain = task.measure(model, few)
    return bool(torch.allclose(packed, plain.to(packed), rtol=1e-4, atol=1e-3))
