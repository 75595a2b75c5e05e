"""Run directories: atomic files, saved settings, and resumable partitions.

Every write goes to a temporary file in the same folder and is renamed into place, so an
interrupted job never leaves a half-written file that a later run would trust. Long jobs
are split into row partitions saved as they finish; re-running the same command computes
only the missing ones. A directory remembers the settings it was made with and refuses
work under other settings unless told to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from datafluence import distributed
from datafluence.progress import bar as progress_bar


class RunMismatchError(RuntimeError):
    """A run directory was made with other settings than the ones asked for now."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint(obj: Any) -> str:
    """A short stable hash of JSON-able settings (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_fingerprint(model: Any) -> str:
    """A hash of every parameter and buffer, so results are tied to the exact weights."""
    return tensors_fingerprint(model.state_dict())


def tensors_fingerprint(tensors: Mapping[str, Any]) -> str:
    """A hash of named tensors' values, so cached results are tied to the exact data."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        h.update(name.encode())
        h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()[:16]


def examples_fingerprint(examples: Any) -> str:
    """Ids and tensor values of a set of examples: partitions keyed by it are never reused
    for other data that happens to carry the same ids.

    The one hash of `Examples` in the package (score partitions, fitted statistics, ground
    truths, Simfluence runs), so the same data gives the same key everywhere."""
    return fingerprint(
        {"ids": list(examples.ids), "tensors": tensors_fingerprint(examples.tensors)}
    )


def package_versions() -> dict[str, str]:
    """Versions that change numbers: saved with every run so results can be traced."""
    import datafluence

    return {
        "datafluence": datafluence.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                out.extend(_diff(old[key], new[key], name))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def as_run(run: RunDir | str | Path | None) -> RunDir | None:
    """`run=` as every method takes it: a RunDir, a path (str or Path), or None."""
    if run is None or isinstance(run, RunDir):
        return run
    if isinstance(run, str | os.PathLike):
        return RunDir(run)
    raise TypeError(f"run must be a RunDir, a str or a Path, got {type(run).__name__}")


class RunDir:
    """One run directory: meta.json, scores, metrics.json, figures/, checkpoint, partitions."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def meta(self) -> dict[str, Any]:
        return read_json(self.meta_path) if self.exists() else {}

    def update_meta(self, **fields: Any) -> None:
        meta = self.meta()
        meta.update(fields)
        atomic_write_json(self.meta_path, meta)

    def open(self, settings: Mapping[str, Any], overwrite: bool = False, **meta: Any) -> RunDir:
        """Claim the directory for these settings; refuse other settings unless overwriting.

        Settings must be JSON-able and hold everything that changes the numbers (recipe,
        data and model fingerprints); execution details such as chunk sizes go in `meta`.
        Under torchrun every rank calls it: rank 0 claims, the others then join.
        """
        claimed: dict[str, Any] = json.loads(json.dumps(settings, default=str))
        # Under torchrun rank 0 checks, clears and creates; the others then find its
        # meta.json with the same settings and write nothing.
        with distributed.main_first():
            return self._claim(claimed, overwrite and distributed.is_main(), meta)

    def _claim(self, settings: dict[str, Any], overwrite: bool, meta: dict[str, Any]) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(
                f"{self.path} exists and is not a directory; choose another --out"
            )
        if self.exists():
            old = self.meta().get("settings")
            if old != settings:
                if not overwrite:
                    changes = "\n  ".join(_diff(old, settings)[:20])
                    raise RunMismatchError(
                        f"{self.path} already holds a run made with other settings:\n  {changes}\n"
                        "Use a new output directory, or pass --overwrite (overwrite=True) to "
                        "discard the old results."
                    )
                self.clear()
        elif overwrite and self.path.exists():
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.exists():
            atomic_write_json(
                self.meta_path,
                {
                    "settings": settings,
                    "settings_hash": fingerprint(settings),
                    "versions": package_versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "status": "running",
                    **meta,
                },
            )
        return self

    def clear(self) -> None:
        """Remove everything this directory holds (used by overwrite)."""
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def sub(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    def save_metrics(self, metrics: Mapping[str, Any]) -> None:
        atomic_write_json(self.path / "metrics.json", metrics)

    def metrics(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        return read_json(path) if path.exists() else {}

    @property
    def figures(self) -> Path:
        path = self.path / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def partitioned(
        self,
        name: str,
        n_rows: int,
        n_cols: int,
        part_size: int,
        compute: Callable[[int, int], np.ndarray],
        desc: str | None = None,
        progress: bool = True,
        dest: str | Path | None = None,
    ) -> np.ndarray:
        """Compute an [n_rows, n_cols] float32 matrix in row partitions, resumably.

        Each partition [start, end) is saved as soon as it is done; partitions already on
        disk are loaded instead of recomputed. The partition size is fixed by the first
        run so a resumed run splits the rows exactly as the interrupted one did.

        Under torchrun every rank must call this with the same arguments: each computes
        only its share of the missing partitions (distributed.shard), all wait for each
        other, and every rank returns the whole matrix (with `dest`, rank 0 assembles the
        file and the others map it). On return, no rank still reads the partition files.
        """
        if n_rows < 1 or n_cols < 1:
            raise ValueError(f"nothing to compute: {n_rows} rows x {n_cols} columns")
        folder = self.path / "partitions" / name
        layout_path = folder / "layout.json"
        layout = {"n_rows": n_rows, "n_cols": n_cols, "part_size": part_size}
        if layout_path.exists():
            saved = read_json(layout_path)
            if (saved["n_rows"], saved["n_cols"]) != (n_rows, n_cols):
                raise RunMismatchError(
                    f"{folder} holds partitions of a {saved['n_rows']}x{saved['n_cols']} matrix, "
                    f"not {n_rows}x{n_cols}; use --overwrite or a new output directory"
                )
            layout = saved
        else:  # several ranks may write it: atomically, with identical content
            atomic_write_json(layout_path, layout)
        size = int(layout["part_size"])
        bounds = [(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]
        paths = [folder / f"rows_{s:09d}_{e:09d}.npy" for s, e in bounds]
        sharded = distributed.world_size() > 1
        mine = set(distributed.shard(len(bounds)))
        # one process fills the result as partitions come; several assemble it afterwards
        out, tmp_dest = (None, None) if sharded else _assembly(n_rows, n_cols, dest)
        todo = []
        for i, ((start, end), path) in enumerate(zip(bounds, paths, strict=True)):
            if path.exists():
                if out is not None:
                    out[start:end] = np.load(path)
            elif i in mine:
                todo.append((start, end, path))
        bar = progress_bar(
            progress=progress, total=len(bounds), initial=len(bounds) - len(todo), desc=desc or name
        )
        try:
            for start, end, path in todo:
                block = np.asarray(compute(start, end), dtype=np.float32)
                if block.shape != (end - start, n_cols):
                    raise RuntimeError(
                        f"partition {start}:{end} returned shape {block.shape}, "
                        f"expected {(end - start, n_cols)}"
                    )
                atomic_save_npy(path, block)
                if out is not None:
                    out[start:end] = block
                bar.update(1)
        except BaseException as err:
            bar.close()
            if tmp_dest is not None:
                del out
                tmp_dest.unlink(missing_ok=True)
            if not isinstance(err, KeyboardInterrupt):
                raise
            done = len(list(folder.glob("rows_*.npy")))
            raise KeyboardInterrupt(
                f"interrupted with {done}/{len(bounds)} partitions of {name!r} saved in {folder}; "
                "re-run the same command to compute only the rest"
            ) from None
        bar.close()
        if sharded:
            return _assemble_shared(name, folder, bounds, paths, n_rows, n_cols, dest)
        assert out is not None  # one process: `_assembly` made it above
        return _finish(out, tmp_dest, dest)

    def drop_partitions(self, name: str | None = None) -> None:
        """Free the disk once the assembled result is saved (all partitions when no name)."""
        shutil.rmtree(self.path / "partitions" / (name or ""), ignore_errors=True)
        parent = self.path / "partitions"
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()


def _assembly(n_rows: int, n_cols: int, dest: str | Path | None) -> tuple[np.ndarray, Path | None]:
    """The matrix to fill: in memory, or a memory-mapped temporary file beside `dest`."""
    if dest is None:
        return np.empty((n_rows, n_cols), dtype=np.float32), None
    dest = Path(dest)
    tmp_dest = dest.with_name(f".{dest.name}.assembling.tmp")
    out = np.lib.format.open_memmap(tmp_dest, mode="w+", dtype=np.float32, shape=(n_rows, n_cols))
    return out, tmp_dest


def _finish(out: np.ndarray, tmp_dest: Path | None, dest: str | Path | None) -> np.ndarray:
    if tmp_dest is None:
        return out
    cast(np.memmap, out).flush()  # `_assembly` memory-maps it whenever there is a tmp_dest
    del out
    os.replace(tmp_dest, dest)  # type: ignore[arg-type]
    return np.load(dest, mmap_mode="r")  # type: ignore[arg-type]


def _assemble_shared(
    name: str,
    folder: Path,
    bounds: list[tuple[int, int]],
    paths: list[Path],
    n_rows: int,
    n_cols: int,
    dest: str | Path | None,
) -> np.ndarray:
    """After every rank saved its partitions: the whole matrix on every rank."""
    distributed.barrier()
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} partitions of {name!r} are missing from {folder} after every rank "
            f"finished (e.g. {missing[0]}); do all ranks share this run directory? Put --out on "
            "a file system every process sees"
        )
    if dest is not None and not distributed.is_main():
        distributed.barrier()  # rank 0 assembles `dest`
        return np.load(dest, mmap_mode="r")
    out, tmp_dest = _assembly(n_rows, n_cols, dest)
    for (start, end), path in zip(bounds, paths, strict=True):
        out[start:end] = np.load(path)
    out = _finish(out, tmp_dest, dest)
    distributed.barrier()  # every rank is done with the partitions: they may be dropped now
    return out
