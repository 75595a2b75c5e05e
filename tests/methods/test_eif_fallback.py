"""EIF on models that do not run under vmap: the batched engine hands over to the naive loop,
says so once, and gives the naive loop's numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import datafluence as dfl


class DataDependent(nn.Module):
    """A classifier with Python control flow on a tensor's value (`.item()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if h.abs().max().item() > 10.0:  # never true here, but vmap cannot tell
            h = h / 10.0
        return self.head(h)


def data(n: int, seed: int, task):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    return task.examples(x, torch.randint(0, 3, (n,), generator=gen))


def test_a_model_vmap_cannot_run_falls_back_to_the_naive_loop_with_one_warning():
    torch.manual_seed(0)
    model, task = DataDependent().eval(), dfl.ClassificationTask()
    train, queries = data(5, 0, task), data(4, 1, task)
    options = {"lr": 0.1, "steps": 2, "chunk_size": 2, "progress": False}
    with pytest.warns(UserWarning, match="does not run under torch.func.vmap") as caught:
        batched = dfl.EmpiricalInfluence(task, **options).score(model, train, queries)
    assert sum("vmap" in str(w.message) for w in caught) == 1
    naive = dfl.EmpiricalInfluence(task, engine="naive", **options).score(model, train, queries)
    np.testing.assert_allclose(batched.values, naive.values, rtol=1e-5, atol=1e-6)
    assert batched.settings["engine_used"].startswith("naive")
    assert naive.settings["recipe"] == batched.settings["recipe"]


def test_a_model_vmap_can_run_keeps_the_batched_engine_and_warns_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    task = dfl.ClassificationTask()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = dfl.EmpiricalInfluence(task, lr=0.1, progress=False).score(
            model, data(4, 0, task), data(3, 1, task)
        )
    assert scores.settings["engine_used"] == "BatchedFinetuner"


def test_a_hugging_face_causal_lm_fine_tunes_in_full_through_the_fallback():
    pytest.importorskip("transformers")
    from tiny_lm import CharTokenizer, char_gpt2

    model = char_gpt2()
    task = dfl.CausalLMTask(CharTokenizer())
    train, queries = task.examples(["abc", ("ab", " cd"), "fade"]), task.examples(["bad", "cab"])
    options = {"lr": 1e-2, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = dfl.EmpiricalInfluence(task, **options).score(model, train, queries)
    naive = dfl.EmpiricalInfluence(task, engine="naive", **options).score(model, train, queries)
    np.testing.assert_allclose(batched.values, naive.values, rtol=1e-5, atol=1e-7)
    # transformers' attention-mask code reads tensor values: no vmap, so the naive loop runs
    assert batched.settings["engine_used"].startswith("naive")
