"""The method contract, checked over every method in `methods.REGISTRY`.

A new method passes by implementing `methods.base.Method` and being registered; nothing
here names a method. Each runs on a tiny classifier and, where it supports causal LMs, on a
tiny GPT-2 with its texts; both small enough for every call to take well under a second.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from datafluence import progress
from datafluence.methods import ALIASES, REGISTRY, make_method
from datafluence.methods.base import SELF_COLUMN, Call
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import CausalLMTask, ClassificationTask

pytest.importorskip("transformers")
from tiny_lm import CharTokenizer, char_gpt2  # noqa: E402

N_TRAIN, N_QUERY, CHUNK = 6, 3, 2  # three chunks of training rows
TEXTS = [("ab", "cd"), ("ba", "dc e"), "abc", ("h", "gg"), "fade", ("e", "a")]
QUERIES = [("ab", "c"), "bad", "cafe"]


def classifier_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    task = ClassificationTask(num_classes=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_QUERY, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=gen)
    ids = [f"t{i}" for i in range(N_TRAIN)] + [f"q{j}" for j in range(N_QUERY)]
    train = task.examples(x[:N_TRAIN], y[:N_TRAIN], ids[:N_TRAIN])
    queries = task.examples(x[N_TRAIN:], y[N_TRAIN:], ids[N_TRAIN:])
    return model, task, train, queries


def lm_setup():
    model = char_gpt2()
    task = CausalLMTask(CharTokenizer())
    train = task.examples(TEXTS, ids=[f"t{i}" for i in range(N_TRAIN)])
    queries = task.examples(QUERIES, ids=[f"q{j}" for j in range(N_QUERY)])
    return model, task, train, queries


SETUPS = {"classifier": classifier_setup, "lm": lm_setup}
# Only what keeps the tiny runs fast or well-posed, never what makes a method work at all:
# PBRF's solves get a small budget, TRAK a projection below n_train, EIF on the LM a LoRA
# adapter (a GPT-2's full weights under vmap are the "your model" issue's fallback), and
# prompted influence a template the character tokenizer can spell (it has no newline).
FAST = {
    "pbrf": {"max_iter": 40, "rtol": 1e-4},
    "trak": {"projection_dim": 4},
}
FAST_LM = {
    "empirical": {"lora_rank": 2, "lora_targets": ("*c_attn",), "lr": 1e-2},
    "prompted": {"template": "{context} {prompt}"},
}


def cases():
    out = []
    for name, cls in REGISTRY.items():
        for setup in SETUPS:
            task = ClassificationTask() if setup == "classifier" else CausalLMTask(CharTokenizer())
            if cls.supports(task):
                out.append(pytest.param(name, setup, id=f"{name}-{setup}"))
    return out


def build(name: str, setup: str, **options):
    model, task, train, queries = SETUPS[setup]()
    opts = {**FAST.get(name, {}), **(FAST_LM.get(name, {}) if setup == "lm" else {}), **options}
    opts.setdefault("progress", False)
    opts.setdefault("chunk_size", CHUNK)
    method = make_method(name, task, **opts)
    if not REGISTRY[name].uses_model:
        model = None
    return method, model, train, queries


def quiet(fn, *args, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. PBRF's budget warning on tiny solves
        return fn(*args, **kwargs)


def test_every_method_is_registered_and_every_case_is_covered():
    assert len(REGISTRY) >= 9 and all(cls.name == name for name, cls in REGISTRY.items())
    covered = {p.values[0] for p in cases()}
    assert covered == set(REGISTRY), "a registered method runs on neither setup"


@pytest.mark.parametrize(("name", "setup"), cases())
def test_shape_ids_settings_and_timings(name, setup):
    method, model, train, queries = build(name, setup)
    scores = quiet(method.score, model, train, queries)
    assert isinstance(scores, Scores)
    assert scores.shape == (N_TRAIN, N_QUERY)
    assert scores.train_ids == train.ids and scores.query_ids == queries.ids
    assert np.isfinite(scores.values).all()
    json.dumps(scores.settings)  # settings are JSON
    json.dumps(method.settings())
    assert not _timing_keys(scores.settings), "timings belong in Scores.timings"
    assert scores.timings["seconds"] >= 0


def _timing_keys(settings) -> list[str]:
    if isinstance(settings, dict):
        found = [k for k in settings if "second" in str(k) or str(k) in ("time", "timings")]
        return found + [k for v in settings.values() for k in _timing_keys(v)]
    if isinstance(settings, list):
        return [k for v in settings for k in _timing_keys(v)]
    return []


@pytest.mark.parametrize("form", ["str", "path", "rundir"])
@pytest.mark.parametrize(("name", "setup"), cases())
def test_run_is_a_str_a_path_or_a_rundir(name, setup, form, tmp_path):
    method, model, train, queries = build(name, setup)
    plain = quiet(method.score, model, train, queries)
    run = {"str": str(tmp_path), "path": Path(tmp_path), "rundir": RunDir(tmp_path)}[form]
    fresh, model, train, queries = build(name, setup)
    saved = quiet(fresh.score, model, train, queries, run=run)
    np.testing.assert_allclose(saved.values, plain.values, rtol=1e-6, atol=1e-9)
    assert list((tmp_path / "partitions").glob("*/rows_*.npy")), "rows were not saved"


class Interrupt:
    """Counts the chunks the row loop computes; raises Ctrl-C at chunk `stop_at`."""

    def __init__(self, monkeypatch, stop_at: int | None) -> None:
        self.computed = 0
        original = Call.table

        def table(call, n_rows, width, compute, **kwargs):
            def counted(lo, hi):
                self.computed += 1
                if stop_at is not None and self.computed == stop_at:
                    raise KeyboardInterrupt
                return compute(lo, hi)

            return original(call, n_rows, width, counted, **kwargs)

        monkeypatch.setattr(Call, "table", table)


@pytest.mark.parametrize(("name", "setup"), cases())
def test_killed_and_resumed_equals_uninterrupted(name, setup, tmp_path, monkeypatch):
    method, model, train, queries = build(name, setup)
    whole = quiet(method.score, model, train, queries)
    with monkeypatch.context() as patch:
        Interrupt(patch, stop_at=2)
        killed, model, train, queries = build(name, setup)
        with pytest.raises(KeyboardInterrupt):
            quiet(killed.score, model, train, queries, run=tmp_path)
    counter = Interrupt(monkeypatch, stop_at=None)
    again, model, train, queries = build(name, setup)
    resumed = quiet(again.score, model, train, queries, run=tmp_path)
    np.testing.assert_allclose(resumed.values, whole.values, rtol=1e-6, atol=1e-9)
    assert counter.computed == N_TRAIN // CHUNK - 1, "the saved chunk was computed again"


@pytest.mark.parametrize(("name", "setup"), cases())
def test_progress_false_prints_nothing_and_true_draws_a_bar(name, setup, capfd, monkeypatch):
    monkeypatch.setattr(progress, "is_tty", lambda: True)
    method, model, train, queries = build(name, setup, progress=False)
    quiet(method.score, model, train, queries)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    method, model, train, queries = build(name, setup, progress=True)
    quiet(method.score, model, train, queries)
    out, err = capfd.readouterr()
    assert out == "" and "%" in err, "progress=True drew no bar on a terminal"


@pytest.mark.parametrize(("name", "setup"), cases())
def test_self_score_is_the_diagonal_of_score_train_train(name, setup):
    method, model, train, _ = build(name, setup)
    full = quiet(method.score, model, train, train)
    method, model, train, _ = build(name, setup)
    own = quiet(method.self_score, model, train)
    assert isinstance(own, Scores) and own.shape == (N_TRAIN, 1)
    assert own.train_ids == train.ids and own.query_ids == (SELF_COLUMN,)
    assert not _timing_keys(own.settings)
    scale = max(float(np.abs(full.values).max()), 1e-12)
    np.testing.assert_allclose(own.values[:, 0], np.diag(full.values), rtol=1e-4, atol=1e-6 * scale)


def _accepts(name: str, option: str) -> bool:
    return option in inspect.signature(REGISTRY[name].__init__).parameters


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_options_out_of_range_are_clear_errors(name):
    task = CausalLMTask(CharTokenizer()) if name == "prompted" else ClassificationTask()
    bad = [
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, ValueError, "chunk_size"),
        ({"progress": "yes"}, TypeError, "progress"),
        ({"no_such_option": 1}, TypeError, f"bad options for method '{name}'"),
    ]
    if _accepts(name, "seed"):
        bad.append(({"seed": -1}, ValueError, "seed"))
    if _accepts(name, "damping"):
        bad += [
            ({"damping": -1.0}, ValueError, "damping"),
            ({"damping": float("nan")}, ValueError, "damping"),
            ({"damping_factor": 0.0}, ValueError, "damping_factor"),
            ({"damping": 0.1, "damping_factor": 0.1}, ValueError, "not both"),
        ]
    for options, error, match in bad:
        with pytest.raises(error, match=match):
            make_method(name, task, **options)


@pytest.mark.parametrize("name", sorted({*REGISTRY, *ALIASES}))
def test_every_name_builds_with_its_defaults(name):
    task = CausalLMTask(CharTokenizer()) if name == "prompted" else ClassificationTask()
    method = make_method(name, task)
    assert method.chunk_size >= 1 and method.progress is True
    json.dumps(method.settings())


def test_unknown_names_and_preset_clashes_are_refused():
    with pytest.raises(ValueError, match="unknown method 'magic'.*ekfac"):
        make_method("magic", ClassificationTask())
    with pytest.raises(ValueError, match="sets \\['curvature'\\] itself"):
        make_method("ekfac", ClassificationTask(), curvature="kfac")
