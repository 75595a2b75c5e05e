"""Recording training runs for Simfluence: which examples each step saw, and every test loss.

`RunLogger` plugs into a plain PyTorch loop (or, through `trainer_callback`, into a
Hugging Face Trainer); `collect_runs` trains many short runs from one starting point on
their own random curricula and saves each finished run, so an interrupted collection
resumes at the next unfinished run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from datafluence import store
from datafluence.simfluence._checks import check_curricula
from datafluence.simfluence.curricula import random_curriculum
from datafluence.store import RunDir
from datafluence.tasks import Examples, Task, eval_mode


class RunLogger:
    """Curriculum ids and per-test-example losses of one training run.

    Call `start()` before the first step (records L_0) and `step(batch_ids)` after every
    optimizer step. Test losses are measured every `every` steps under no_grad in eval
    mode (the model's train/eval mode is restored). `batch_ids` are pool positions, or
    pool ids when `pool_ids` is given; every step must hold the same number of examples
    (use drop_last=True).
    """

    def __init__(
        self,
        test_examples: Examples,
        task: Task,
        model: nn.Module,
        every: int = 1,
        *,
        pool_ids: Sequence[str] | None = None,
        chunk_size: int = 1024,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        task.check(test_examples, "test")
        self.test = test_examples
        self.task = task
        self.model = model
        self.every = every
        self.chunk_size = chunk_size
        self.pool_ids = None if pool_ids is None else tuple(str(i) for i in pool_ids)
        self._index = None if self.pool_ids is None else {p: i for i, p in enumerate(self.pool_ids)}
        self._on_device: tuple[torch.device, Examples] | None = None
        self._pending: deque[list[Any]] = deque()
        self._batches: list[np.ndarray] | None = None
        self._losses: list[np.ndarray] = []

    @property
    def test_ids(self) -> tuple[str, ...]:
        return self.test.ids

    @property
    def steps_done(self) -> int:
        return 0 if self._batches is None else len(self._batches)

    def start(self) -> None:
        """Forget any earlier run and record L_0 (the losses before training)."""
        self._batches = []
        self._losses = [self.test_losses()]
        self._pending.clear()

    def step(self, batch_ids: Sequence[int] | Sequence[str] | Tensor | np.ndarray) -> None:
        """Record the examples of the step just taken; measure the test losses if due."""
        if self._batches is None:
            raise RuntimeError("call logger.start() before training, to record L_0")
        ids = self._positions(batch_ids)
        if self._batches and ids.size != self._batches[0].size:
            raise ValueError(
                f"step {len(self._batches) + 1} holds {ids.size} examples but the first held "
                f"{self._batches[0].size}; Simfluence needs a fixed batch size: use "
                "drop_last=True in the DataLoader"
            )
        self._batches.append(ids)
        if len(self._batches) % self.every == 0:
            self._losses.append(self.test_losses())

    def test_losses(self) -> np.ndarray:
        """[M] per-example loss of every test example under the current model."""
        test = self._test_on_device()
        out = []
        with torch.no_grad(), eval_mode(self.model):
            for s in range(0, len(test), self.chunk_size):
                batch = test[s : s + self.chunk_size].tensors
                out.append(self.task.loss(self.model, batch).detach().double().cpu())
        losses = torch.cat(out).numpy()
        if losses.shape != (len(test),):
            raise ValueError(
                f"task.loss returned {losses.shape} values for {len(test)} test examples; it "
                "must return one loss per example (reduction='none')"
            )
        return losses

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(curriculum, losses) in the simulators' layout.

        every=1: curriculum [T, b] and losses [T+1, M]. every=k: k consecutive steps make
        one block, curriculum [T//k, k*b] and losses [T//k + 1, M] at steps 0, k, 2k, ...;
        a trailing incomplete block is left out. Fit simulators to blocks as to steps (exact
        for the additive model, a first-order approximation for α).
        """
        if self._batches is None:
            raise RuntimeError("nothing recorded yet; call logger.start() and logger.step()")
        losses = np.stack(self._losses)
        if not self._batches:
            return np.zeros((0, 0), dtype=np.int64), losses
        steps = np.stack(self._batches)
        blocks = len(self._batches) // self.every
        curriculum = steps[: blocks * self.every].reshape(blocks, self.every * steps.shape[1])
        return curriculum, losses[: blocks + 1]

    def wrap_collator(
        self, collate: Callable[[list[Any]], Any], id_key: str = "simfluence_id"
    ) -> Callable[[list[Any]], Any]:
        """A data collator that pops `id_key` from each feature and queues the batch's ids.

        For `trainer_callback`: the Trainer gives callbacks no batch, so the ids travel
        through the collator. Put the id column in the training dataset only (evaluation
        batches without it are not queued), set remove_unused_columns=False and
        dataloader_num_workers=0 (workers collate in other processes).
        """

        def wrapped(features: list[Any]) -> Any:
            if features and isinstance(features[0], Mapping) and id_key in features[0]:
                features = [dict(f) for f in features]
                self._pending.append([f.pop(id_key) for f in features])
            return collate(features)

        return wrapped

    def take_pending(self, n_batches: int) -> list[Any]:
        """The ids of the oldest `n_batches` queued (collated, now trained-on) batches."""
        if len(self._pending) < n_batches:
            raise RuntimeError(
                f"{n_batches} batch(es) of ids expected but {len(self._pending)} queued; wrap the "
                "training data collator with logger.wrap_collator(...), give the training "
                "dataset an id column, and set dataloader_num_workers=0"
            )
        ids: list[Any] = []
        for _ in range(n_batches):
            ids.extend(self._pending.popleft())
        return ids

    def _positions(
        self, batch_ids: Sequence[int] | Sequence[str] | Tensor | np.ndarray
    ) -> np.ndarray:
        if isinstance(batch_ids, Tensor):
            batch_ids = batch_ids.detach().cpu().numpy()
        arr = np.asarray(batch_ids).reshape(-1)
        if arr.size == 0:
            raise ValueError("an empty batch was logged; log the ids of the examples trained on")
        if arr.dtype.kind in "US":
            if self._index is None:
                raise ValueError(
                    "string ids were logged but the logger has no pool_ids to map them to "
                    "positions; pass pool_ids=... or log integer positions"
                )
            missing = [str(i) for i in arr if str(i) not in self._index]
            if missing:
                raise ValueError(f"ids not in the pool: {missing[:5]}; log ids from pool_ids")
            return np.array([self._index[str(i)] for i in arr], dtype=np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"batch ids must be integer positions or string ids, got {arr.dtype}")
        if (arr < 0).any() or (self.pool_ids is not None and (arr >= len(self.pool_ids)).any()):
            raise ValueError(f"batch positions {arr.tolist()} fall outside the pool")
        return arr.astype(np.int64)

    def _test_on_device(self) -> Examples:
        """The test set on the model's current device (a Trainer may move the model)."""
        param = next(iter(self.model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, self.test.to(device))
        return self._on_device[1]


def trainer_callback(logger: RunLogger) -> Any:
    """A `transformers.TrainerCallback` that drives `logger` from a Hugging Face Trainer.

    Wrap the training collator with `logger.wrap_collator` so the callback learns each
    step's ids; with gradient accumulation a step records all its micro-batches.
    """
    try:
        from transformers import TrainerCallback
    except ImportError as err:
        raise ImportError(
            "trainer_callback needs Hugging Face transformers; install it with "
            "`pip install transformers`, or call logger.start()/logger.step() in your own loop"
        ) from err

    class SimfluenceCallback(TrainerCallback):  # type: ignore[misc, valid-type]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            logger.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            accumulation = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
            logger.step(logger.take_pending(accumulation))

    return SimfluenceCallback()


def collect_runs(
    make_model: Callable[[], nn.Module],
    pool: Examples,
    test: Examples,
    task: Task,
    R: int,
    T: int,
    b: int,
    lr: float,
    seed: int = 0,
    run: RunDir | None = None,
    *,
    optimizer: Literal["sgd", "adam"] = "sgd",
    subset_size: int | None = None,
    replace: bool = False,
    overwrite: bool = False,
    on_run_end: Callable[[int], None] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Train R runs of T steps from one starting point; return curricula [R, T, b] and
    losses [R, T+1, M].

    The starting weights are `make_model()` built under torch.manual_seed(seed); each run
    reloads them, draws its own curriculum (`random_curriculum(..., seed, run=r)`) and
    seeds torch from (seed, r), so run r is the same whatever R is and whether or not the
    collection was interrupted. With `run`, each finished run is saved atomically as
    runs/run_000.npz...; a re-run loads those and trains only the rest (R is not a
    setting: asking for more runs later extends the collection). `on_run_end(r)` is
    called after run r is finished and saved.
    """
    if R < 1 or T < 1 or b < 1:
        raise ValueError(f"R, T and b must be at least 1, got {R}, {T}, {b}")
    _check_recipe(lr, optimizer)
    task.check(pool, "pool")
    task.check(test, "test")
    start_model = _start_model(make_model, seed)
    init = {k: v.detach().clone() for k, v in start_model.state_dict().items()}
    settings = {
        "kind": "simfluence-runs",
        "T": T,
        "b": b,
        "lr": lr,
        "seed": seed,
        "optimizer": optimizer,
        "subset_size": subset_size,
        "replace": replace,
        "task": task.settings(),
        "pool": store.examples_fingerprint(pool),
        "test": store.examples_fingerprint(test),
        "model": store.model_fingerprint(start_model),
    }
    if run is not None:
        run.open(settings, overwrite=overwrite, pool_ids=list(pool.ids), test_ids=list(test.ids))
    curricula = np.empty((R, T, b), dtype=np.int64)
    losses = np.empty((R, T + 1, len(test)))
    for r in tqdm(range(R), desc="simfluence runs", unit="run", disable=not progress, leave=False):
        path = None if run is None else run.path / "runs" / f"run_{r:03d}.npz"
        if path is not None and path.exists():
            with np.load(path) as saved:
                curricula[r], losses[r] = saved["curriculum"], saved["losses"]
            continue
        curricula[r] = random_curriculum(
            len(pool), T, b, subset_size=subset_size, seed=seed, run=r, replace=replace
        )
        losses[r] = _train_one(
            make_model, init, pool, test, task, curricula[r], lr, optimizer, seed, r
        )
        if path is not None:
            with store.atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, curriculum=curricula[r], losses=losses[r])
        if on_run_end is not None:
            on_run_end(r)
    if run is not None:
        run.update_meta(status="done", n_runs=max(R, int(run.meta().get("n_runs", 0))))
    return curricula, losses


def train_curriculum(
    make_model: Callable[[], nn.Module],
    pool: Examples,
    test: Examples,
    task: Task,
    curriculum: np.ndarray,
    lr: float,
    *,
    optimizer: Literal["sgd", "adam"] = "sgd",
    seed: int = 0,
    run: int = 0,
    before_step: Callable[[int, nn.Module], None] | None = None,
) -> np.ndarray:
    """Train one curriculum [T, b] from `collect_runs`' starting point; its losses [T+1, M].

    Counterfactual curricula are checked against reality with this: given run r's own
    curriculum and `run=r` it reproduces `collect_runs`' run r exactly (same start, same
    torch seed); given an edited curriculum it answers "what if run r had trained on this".
    `before_step(t, model)` is called before step t (parameters θ_t, t = 0..T−1), e.g. to
    take TracIn checkpoints; it must not change the model.
    """
    _check_recipe(lr, optimizer)
    task.check(pool, "pool")
    task.check(test, "test")
    if np.ndim(curriculum) != 2:
        raise ValueError(
            f"train_curriculum trains one curriculum [steps, batch], got shape "
            f"{np.shape(curriculum)}; loop over runs for several"
        )
    c = check_curricula(curriculum, len(pool))[0]
    init = _start_state(make_model, seed)
    return _train_one(make_model, init, pool, test, task, c, lr, optimizer, seed, run, before_step)


def _check_recipe(lr: float, optimizer: str) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adam'")


def _start_model(make_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model()


def _start_state(make_model: Callable[[], nn.Module], seed: int) -> dict[str, Tensor]:
    model = _start_model(make_model, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_one(
    make_model: Callable[[], nn.Module],
    init: Mapping[str, Tensor],
    pool: Examples,
    test: Examples,
    task: Task,
    curriculum: np.ndarray,
    lr: float,
    optimizer: str,
    seed: int,
    r: int,
    before_step: Callable[[int, nn.Module], None] | None = None,
) -> np.ndarray:
    """One run from the shared start; returns its [T+1, M] test losses."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.SeedSequence([seed, r]).generate_state(1)[0]))
        model = make_model()
        model.load_state_dict(init)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (
            torch.optim.SGD(params, lr=lr)
            if optimizer == "sgd"
            else torch.optim.Adam(params, lr=lr)
        )
        logger = RunLogger(test, task, model)
        logger.start()
        for t, ids in enumerate(curriculum):
            if before_step is not None:
                before_step(t, model)
            idx = torch.as_tensor(ids)  # a batch may hold an example twice: no Examples
            batch = {k: v[idx] for k, v in pool.tensors.items()}
            loss = task.loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            logger.step(ids)
        return logger.arrays()[1]
