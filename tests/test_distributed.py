"""Several processes: two real gloo ranks give the same scores as one process.

The two-rank runs happen in one torch.multiprocessing.spawn (starting processes is the
slow part); each rank writes what it saw to files and the assertions run here, against a
single-process run of the same computation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import random_examples as _examples
from helpers import tiny_model as _tiny_model

from datafluence import distributed
from datafluence.methods import EmpiricalInfluence, InfluenceFunction
from datafluence.scores import Scores
from datafluence.store import RunDir
from datafluence.tasks import ClassificationTask

WORLD = 2
N_TRAIN, N_QUERY, CHUNK = 11, 3, 3  # 4 partitions, the last one short
PARTS = [(0, 3), (3, 6), (6, 9), (9, 11)]
KEPT = [(3, 6)]  # the partial run's partition kept on disk for the resume


def _setup():
    model = _tiny_model(seed=3)
    train = _examples(N_TRAIN, seed=4)
    queries = _examples(N_QUERY, seed=5, prefix="q")
    return model, ClassificationTask(), train, queries


def _influence(task: ClassificationTask) -> InfluenceFunction:
    return InfluenceFunction(task, curvature="ekfac", chunk_size=CHUNK, progress=False)


def _eif(task: ClassificationTask) -> EmpiricalInfluence:
    return EmpiricalInfluence(task, steps=2, lr=0.1, chunk_size=CHUNK, progress=False)


def _known(lo: int, hi: int) -> np.ndarray:
    """A matrix whose every entry is known: row i is i, i + 0.5, i + 1, ..."""
    return np.arange(lo, hi, dtype=np.float32)[:, None] + 0.5 * np.arange(4, dtype=np.float32)


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    out = Path(root) / f"rank{rank}"
    out.mkdir()
    model, task, train, queries = _setup()

    # influence: curvature fitted by rank 0 and loaded by rank 1, rows shared out
    run = RunDir(Path(root) / "run").open({"test": "distributed"}, overwrite=True)
    method = _influence(task)
    with distributed.main_first():
        method.fit(model, train, run=run)
    scores = method.score(model, train, queries, run=run)
    np.save(out / "influence.npy", scores.values)
    np.save(out / "influence_parts.npy", scores.parts["per_layer"])
    # no run directory: the chunks are all-gathered
    np.save(out / "influence_memory.npy", method.score(model, train, queries).values)
    # empirical influence into the same run directory
    np.save(out / "eif.npy", _eif(task).score(model, train, queries, run=run).values)
    if distributed.is_main():
        scores.save(run.path)

    # resume an influence run the parent left half done
    resumed = _influence(task).score(model, train, queries, run=RunDir(Path(root) / "partial"))
    np.save(out / "resumed.npy", resumed.values)

    # resume a generic job, recording which partitions this rank computed
    computed: list[list[int]] = []

    def compute(lo: int, hi: int) -> np.ndarray:
        computed.append([lo, hi])
        return _known(lo, hi)

    job = RunDir(Path(root) / "job")
    np.save(out / "job.npy", job.partitioned("known", N_TRAIN, 4, CHUNK, compute, progress=False))
    assembled = job.partitioned("known", N_TRAIN, 4, CHUNK, compute, dest=job.path / "known.npy")
    np.save(out / "job_dest.npy", assembled)
    (out / "computed.json").write_text(json.dumps(computed))

    # each rank in its own directory: the partitions cannot meet
    try:
        RunDir(out / "alone").partitioned("x", N_TRAIN, 4, CHUNK, _known, progress=False)
    except RuntimeError as err:
        (out / "alone_error.txt").write_text(str(err))
    distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Single-process references, a half-done run, then one spawn of two gloo ranks."""
    root = tmp_path_factory.mktemp("distributed")
    model, task, train, queries = _setup()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float32 sums then round alike, bit for bit
    ref = {
        "influence": _influence(task).score(model, train, queries),
        "eif": _eif(task).score(model, train, queries),
    }
    partial = RunDir(root / "partial")
    _influence(task).score(model, train, queries, run=partial)
    name = next((partial.path / "partitions").iterdir())
    kept = {}
    for path in name.glob("rows_*.npy"):
        lo, hi = (int(x) for x in path.stem.split("_")[1:])
        if (lo, hi) in KEPT:
            kept[path] = path.stat().st_ino
        else:
            path.unlink()
    (name / "assembled.npy").unlink()  # the assembled matrix goes too

    job = root / "job" / "partitions" / "known"
    job.mkdir(parents=True)
    for lo, hi in KEPT:
        np.save(job / f"rows_{lo:09d}_{hi:09d}.npy", _known(lo, hi))
    torch.set_num_threads(threads)
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root, ref, kept


def _load(root: Path, name: str) -> list[np.ndarray]:
    return [np.load(root / f"rank{r}" / f"{name}.npy") for r in range(WORLD)]


def test_two_ranks_equal_one_process(two_ranks):
    root, ref, _ = two_ranks
    for got in _load(root, "influence") + _load(root, "influence_memory"):
        np.testing.assert_allclose(got, ref["influence"].values, rtol=0, atol=0)
    for got in _load(root, "influence_parts"):
        np.testing.assert_allclose(got, ref["influence"].parts["per_layer"], rtol=0, atol=0)
    for got in _load(root, "eif"):
        np.testing.assert_allclose(got, ref["eif"].values, rtol=0, atol=0)
    saved = Scores.load(root / "run")
    np.testing.assert_allclose(saved.values, ref["influence"].values, rtol=0, atol=0)
    assert (root / "run" / "curvature" / "curvature.safetensors").exists()
    meta = json.loads((root / "run" / "meta.json").read_text())
    assert meta["settings"] == {"test": "distributed"}


def test_two_ranks_resume_and_share_partitions(two_ranks):
    root, ref, kept = two_ranks
    for got in _load(root, "resumed"):
        np.testing.assert_allclose(got, ref["influence"].values, rtol=0, atol=0)
    # the partition left on disk was reused, not rewritten
    assert kept and all(path.stat().st_ino == ino for path, ino in kept.items())
    expected = _known(0, N_TRAIN)
    for got in _load(root, "job") + _load(root, "job_dest"):
        np.testing.assert_array_equal(got, expected)
    computed = [
        [tuple(x) for x in json.loads((root / f"rank{r}" / "computed.json").read_text())]
        for r in range(WORLD)
    ]
    # rank r computed the missing partitions with index % 2 == r, each once, none twice
    assert computed[0] == [PARTS[0], PARTS[2]]
    assert computed[1] == [PARTS[3]]
    for r in range(WORLD):
        message = (root / f"rank{r}" / "alone_error.txt").read_text()
        assert "missing" in message and "--out" in message


def test_single_process_helpers(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()  # nothing to wait for
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather({1: "b", 0: "a"}) == {0: "a", 1: "b"}
    ran = []
    with distributed.main_first():
        ran.append(True)
    assert ran == [True]
    assert distributed.init_from_env() is False  # not under torchrun: stays one process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT.*torchrun"):
        distributed.init_from_env()


def test_torchrun_cli_equals_one_process(tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m datafluence.cli scores` writes what one process does."""
    from click.testing import CliRunner

    from datafluence.cli import main

    monkeypatch.setenv("DATAFLUENCE_CACHE", str(tmp_path / "cache"))
    args = ["scores", "--method", "ekfac", "--train", "40", "--queries", "4", "--epochs", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun gives each rank one thread
    try:
        one = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert one.exit_code == 0, one.output
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    two = subprocess.run(
        [*launch, "2", "-m", "datafluence.cli", *args, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("40 train x 4 queries") == 1  # rank 0 alone reports
    a, b = Scores.load(tmp_path / "one"), Scores.load(tmp_path / "two")
    np.testing.assert_array_equal(b.values, a.values)
    np.testing.assert_array_equal(b.parts["per_layer"], a.parts["per_layer"])
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["status"] == "done"
    assert not (tmp_path / "two" / "partitions").exists()
