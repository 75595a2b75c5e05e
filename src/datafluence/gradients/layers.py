"""Supported layers seen as one matrix each: y_t = M a_t for every token t of an example.

Linear, Conv2d (through unfolded patches), Embedding (one-hot inputs) and GPT-2's Conv1D all
compute an affine map per token, so a per-example gradient is Σ_t g_t a_tᵀ with a_t the
input (plus a constant 1 when the layer has a bias) and g_t the gradient at the output. Every
curvature strategy works in this [d_out, d_in (+1)] matrix form; the bias is the last column.
Embedding inputs stay token indices (a one-hot vector is never built); -1 marks tokens that
receive no gradient (padding_idx).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = "nn.Linear, nn.Conv2d, nn.Embedding and transformers' GPT-2 Conv1D"


def layer_kind(module: nn.Module) -> str | None:
    """'linear' | 'conv2d' | 'embedding' | 'conv1d', or None for unsupported modules."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    cls = type(module)
    # Checked by name so that transformers is never imported just to look at a model.
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "conv1d"
    return None


@dataclass(eq=False)
class Layer:
    """One selected module, with the conversions between its parameters and its matrix."""

    name: str
    module: nn.Module
    kind: str

    def __post_init__(self) -> None:
        m = self.module
        if self.kind == "conv2d" and m.groups != 1:
            raise ValueError(
                f"module {self.name!r} is a grouped Conv2d (groups={m.groups}); per-example "
                "gradients support groups=1 only; leave it out of `modules`"
            )
        if self.kind == "embedding" and (m.max_norm is not None or m.scale_grad_by_freq):
            raise ValueError(
                f"embedding {self.name!r} uses max_norm or scale_grad_by_freq, which change its "
                "gradient per batch; leave it out of `modules` or turn those options off"
            )

    @property
    def weight(self) -> nn.Parameter:
        return cast(nn.Parameter, self.module.weight)

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.module, "bias", None)

    @property
    def indexed(self) -> bool:
        """Inputs are token indices (embedding), not vectors."""
        return self.kind == "embedding"

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in + has_bias): the matrix form of the parameters."""
        w = self.weight
        extra = int(self.bias is not None)
        if self.kind == "linear":
            return w.shape[0], w.shape[1] + extra
        if self.kind == "conv1d":
            return w.shape[1], w.shape[0] + extra
        if self.kind == "conv2d":
            return w.shape[0], w[0].numel() + extra
        return w.shape[1], w.shape[0]  # embedding: [D, V]

    @property
    def numel(self) -> int:
        d_out, d_in = self.shape
        return d_out * d_in

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Parameter-shaped tensors (leading batch dims allowed) -> [..., d_out, d_in']."""
        lead = weight.shape[: weight.ndim - self.weight.ndim]
        if self.kind == "linear":
            m = weight
        elif self.kind == "conv1d" or self.kind == "embedding":
            m = weight.transpose(-1, -2)
        else:
            m = weight.reshape(*lead, self.weight.shape[0], -1)
        if bias is not None:
            m = torch.cat([m, bias.unsqueeze(-1)], dim=-1)
        return m

    def from_matrix(self, matrix: Tensor) -> list[Tensor]:
        """[..., d_out, d_in'] -> parameter-shaped tensors, in `parameters()` order."""
        lead = matrix.shape[:-2]
        w = matrix[..., :-1] if self.bias is not None else matrix
        if self.kind == "linear":
            weight = w
        elif self.kind == "conv1d" or self.kind == "embedding":
            weight = w.transpose(-1, -2)
        else:
            weight = w.reshape(*lead, *self.weight.shape)
        out = [weight.contiguous()]
        if self.bias is not None:
            out.append(matrix[..., -1].contiguous())
        return out

    def matrix(self) -> Tensor:
        """The current parameters in matrix form."""
        return self.to_matrix(
            self.weight.detach(), None if self.bias is None else self.bias.detach()
        )

    def inputs(self, x: Tensor, batch_size: int) -> Tensor:
        """Module input -> [B, T, d_in'] (or [B, T] indices for an embedding)."""
        self._check_batch(x, batch_size)
        m = self.module
        if self.kind == "embedding":
            emb = cast(nn.Embedding, m)
            idx = x.reshape(batch_size, -1).long()
            if emb.padding_idx is not None:
                idx = torch.where(idx == emb.padding_idx, torch.full_like(idx, -1), idx)
            return idx
        if self.kind == "conv2d":
            conv = cast(nn.Conv2d, m)
            if x.ndim != 4:
                raise ValueError(
                    f"Conv2d {self.name!r} received input of shape {tuple(x.shape)}; "
                    "per-example gradients need batched [B, C, H, W] inputs"
                )
            padding: str | int | tuple[int, ...] = conv.padding
            if isinstance(padding, str) or conv.padding_mode != "zeros":
                mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
                x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            a = F.unfold(
                x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride
            )
            a = a.transpose(1, 2)
        else:
            a = x.reshape(batch_size, -1, x.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def output_grads(self, g: Tensor, batch_size: int) -> Tensor:
        """Gradient at the module output -> [B, T, d_out]."""
        self._check_batch(g, batch_size)
        if self.kind == "conv2d":
            return g.reshape(batch_size, g.shape[1], -1).transpose(1, 2)
        return g.reshape(batch_size, -1, g.shape[-1])

    def _check_batch(self, t: Tensor, batch_size: int) -> None:
        if t.ndim == 0 or t.shape[0] != batch_size:
            raise ValueError(
                f"module {self.name!r} saw a tensor of shape {tuple(t.shape)} for a batch of "
                f"{batch_size} examples; per-example gradients need the batch as the first "
                "dimension of every selected module's input and output. A module shared "
                "across the batch (e.g. position embeddings fed [1, T] ids) or one the model "
                "reshapes the batch away for cannot be split per example: leave it out of "
                "`modules`"
            )

    # -- operations on captured factors a [B, T, d_in'] (or indices) and g [B, T, d_out] --

    def per_example(self, a: Tensor, g: Tensor) -> Tensor:
        """Per-example gradient matrices [B, d_out, d_in'] = Σ_t g_t a_tᵀ."""
        if not self.indexed:
            return torch.einsum("bto,bti->boi", g, a.to(g.dtype))
        b, t, d = g.shape
        vocab = self.shape[1]
        keep = a.reshape(-1) >= 0
        flat = (torch.arange(b, device=a.device)[:, None] * vocab + a.clamp(min=0)).reshape(-1)
        out = g.new_zeros(b * vocab, d)
        out.index_add_(0, flat[keep], g.reshape(-1, d)[keep])
        return out.reshape(b, vocab, d).transpose(1, 2)

    def input_second_moment(self, a: Tensor) -> tuple[Tensor, int]:
        """Σ over tokens of a aᵀ as float64 (a vector of counts for an embedding), and the
        number of tokens."""
        if self.indexed:
            idx = a.reshape(-1)
            counts = torch.bincount(idx[idx >= 0], minlength=self.shape[1]).double()
            return counts, idx.numel()
        flat = a.reshape(-1, a.shape[-1])
        return gram64(flat), flat.shape[0]

    def input_gram(self, a: Tensor, a2: Tensor) -> Tensor:
        """Token inner products [B, Q, T, S] between two sets of inputs."""
        if self.indexed:
            same = a[:, None, :, None] == a2[None, :, None, :]
            return (same & (a[:, None, :, None] >= 0)).float()
        return torch.einsum("bti,qsi->bqts", a, a2.to(a.dtype))

    def project_inputs(self, a: Tensor, v: Tensor) -> Tensor:
        """a_tᵀ V_q for V [Q, d_in', r] -> [B, T, Q, r]."""
        if self.indexed:
            picked = v[:, a.clamp(min=0), :]  # [Q, B, T, r]
            picked = picked * (a >= 0)[None, :, :, None].to(v.dtype)
            return picked.permute(1, 2, 0, 3)
        return torch.einsum("bti,qir->btqr", a.to(v.dtype), v)


def gram64(rows: Tensor, slice_rows: int = 8192) -> Tensor:
    """rowsᵀ rows as float64, the product run in the rows' own precision.

    float32 GEMMs are ~2x faster than float64 ones, and for convolutions this is the largest
    GEMM of a K-FAC fit; slices of at most `slice_rows` rows are each summed in float64, so
    rounding does not grow with the number of tokens.
    """
    total = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for part in rows.split(slice_rows):
        total += (part.T @ part).double()
    return total


Modules = str | type | Iterable[str | type] | None


def modules_setting(modules: Modules) -> Any:
    """A `modules` choice as JSON for a method's settings: names (and globs) as given, types
    by qualified name."""
    if modules is None:
        return None
    items = [modules] if isinstance(modules, str | type) else list(modules)
    return [m if isinstance(m, str) else f"{m.__module__}.{m.__qualname__}" for m in items]


def resolve_layers(model: nn.Module, modules: Modules = None) -> list[Layer]:
    """The supported modules chosen by name or type, in model order.

    None selects every Linear, Conv2d and Conv1D module that owns its weights. Embeddings
    are left out (their per-example gradients are vocabulary-sized, and position embeddings
    are shared across the batch), and so are tied weights (a language model's input embedding
    and output head) and layers used through their weights inside nn.MultiheadAttention;
    name them (or their type) to include them. A name picks that module, or every supported
    module inside it when it is a container; a glob ("model.layers.*.mlp.*") picks every
    supported module whose name matches; a type picks every module of that type.
    """
    named = dict(model.named_modules())
    tied = _tied(model)
    if modules is None:
        chosen = [
            n
            for n, m in named.items()
            if layer_kind(m) not in (None, "embedding")
            and n not in tied
            and not _used_by_functional_call(n, named)
        ]
        if not chosen:
            found = sorted({type(m).__name__ for m in named.values()})
            raise ValueError(
                f"the model has no Linear, Conv2d or Conv1D module with weights of its own "
                f"(it contains {found}); name supported modules ({SUPPORTED}) in `modules`, or "
                "use a model with at least one such layer"
            )
        return [Layer(n, named[n], layer_kind(named[n]) or "") for n in chosen]
    specs: Sequence[str | type] = (
        [modules] if isinstance(modules, str | type) else list(modules)  # type: ignore[arg-type]
    )
    if not specs:
        raise ValueError("`modules` is empty; give module names or types, or None for all")
    chosen_set: dict[str, None] = {}
    for spec in specs:
        if isinstance(spec, type):
            hits = [n for n, m in named.items() if isinstance(m, spec)]
            if not hits:
                raise ValueError(f"the model has no module of type {spec.__name__}")
            for n in hits:
                if layer_kind(named[n]) is None:
                    raise ValueError(
                        f"modules of type {spec.__name__} are not supported; per-example "
                        f"gradients cover {SUPPORTED}"
                    )
                chosen_set[n] = None
            continue
        if any(c in spec for c in "*?["):  # a glob over module names, e.g. "model.layers.*.mlp.*"
            hits = [n for n, m in named.items() if fnmatch.fnmatchcase(n, spec) and layer_kind(m)]
            if not hits:
                examples = [n for n, m in named.items() if layer_kind(m)][-4:]
                raise ValueError(
                    f"the pattern {spec!r} matches no supported module ({SUPPORTED}); module "
                    f"names look like {examples}"
                )
            chosen_set.update(dict.fromkeys(hits))
            continue
        if spec not in named:
            close = [n for n in named if n and (spec in n or n in spec)][:8]
            hint = f" Similar names: {close}." if close else ""
            raise ValueError(
                f"the model has no module named {spec!r}.{hint} Use names from "
                "model.named_modules()"
            )
        if layer_kind(named[spec]):
            chosen_set[spec] = None
            continue
        prefix = f"{spec}." if spec else ""
        inner = [n for n, m in named.items() if n.startswith(prefix) and layer_kind(m)]
        if not inner:
            raise ValueError(
                f"module {spec!r} ({type(named[spec]).__name__}) is not supported and holds no "
                f"supported modules; per-example gradients cover {SUPPORTED}"
            )
        chosen_set.update(dict.fromkeys(inner))
    for n in chosen_set:
        if n in tied:
            raise ValueError(
                f"the weights of module {n!r} are tied to {tied[n]}; per-example gradients of "
                "tied weights are not supported; leave these modules out of `modules`"
            )
    order = {n: i for i, n in enumerate(named)}
    return [
        Layer(n, named[n], layer_kind(named[n]) or "")
        for n in sorted(chosen_set, key=order.__getitem__)
    ]


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the other modules sharing one of its parameters."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    out: dict[str, list[str]] = {}
    for names in owners.values():
        for n in names:
            others = [m for m in names if m != n]
            if others:
                out.setdefault(n, []).extend(o for o in others if o not in out.get(n, []))
    return out


def _used_by_functional_call(name: str, named: dict[str, nn.Module]) -> bool:
    """nn.MultiheadAttention reads its out_proj weights directly: hooks never see it."""
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return isinstance(named.get(parent), nn.MultiheadAttention)
