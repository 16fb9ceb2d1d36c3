"""Prepared stage samples on disk, memory-mapped.

A run prepares each case once per stage (``<run>/cache/<stage>/<case>/``); every training process
of a node then maps the same files, so N processes share one copy in the page cache instead of
holding N copies in RAM, and a resumed run skips the preparation. A case's ``meta.json`` is
written last and records what the arrays were built from; anything else there is rebuilt.

Tumor-stage samples can be built around stage 1's predicted liver instead of the reference one
(``liver_model``), so stage 2 learns on the masks it will be handed at inference (stage 1 also
lets in bits of neighbours, e.g. the gallbladder). The prediction runs as ``segment`` runs it by
default (normal step, mirrored), or unmirrored as ``segment --no-tta`` (``liver_tta`` False), once
per case. The cache key holds the liver model's weights sha256, a hash of its card less the
metrics (writing measured numbers into a card keeps the samples) and the mirroring.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .datasets import Case, load_case
from .errors import InputError
from .trainer import Sample, build_sample

CACHE_FORMAT = 1
ARRAYS = ("image", "target", "mask")


def cache_key(case: Case, stage: str, pre: dict, liver_model=None, liver_tta: bool = True) -> dict:
    """What a prepared sample depends on: the source files (path, size, time; for a folder, e.g.
    IRCAD masks or a DICOM series, every file in it), the preprocessing and (tumor stage) the liver
    model whose prediction it is built around."""
    def stamp(path: Path | None):
        if path is None:
            return None
        if path.is_dir():  # a file rewritten in place changes neither the folder's size nor its time
            files = sorted(f for f in path.rglob("*") if f.is_file())
            return [str(path.resolve()), [[str(f.relative_to(path)), *stamp(f)[1:]] for f in files]]
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]

    key = {"format": CACHE_FORMAT, "stage": stage, "preprocessing": pre, "image": stamp(case.image), "label": stamp(case.label)}
    if liver_model is not None:
        key["liver_model"] = liver_model.prediction_key()
        key["liver_tta"] = liver_tta
    return key


def predicted_liver(ct, liver_model, device, tta: bool = True) -> np.ndarray:
    """Stage 1's liver mask of a CT on its own grid, as ``segment`` computes it (mirrored unless
    ``tta`` is False, as with ``segment --no-tta``)."""
    from .pipeline import segment

    return segment(ct, liver_model, None, device=str(device), tta=tta).labels > 0


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store(sample: Sample | None, key: dict, folder: Path) -> None:
    """Write a sample (or the fact that the case has none for this stage) and then its meta.json."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if sample is not None:
        for name in ARRAYS:
            array = getattr(sample, name)
            if array is not None:
                np.save(folder / f"{name}.npy", array)
    meta = {"key": key, "empty": sample is None}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(tmp, folder / "meta.json")


def load(folder: Path, name: str) -> Sample | None:
    """A stored sample with its arrays memory-mapped read-only (None for a case without one)."""
    if _read_meta(folder)["empty"]:
        return None
    arrays = {a: np.load(folder / f"{a}.npy", mmap_mode="r") if (folder / f"{a}.npy").is_file() else None for a in ARRAYS}
    return Sample(name, arrays["image"], arrays["target"], arrays["mask"])


def prepared_samples(names: list[str], cases: dict, stage: str, pre: dict, cache_dir: Path, *,
                     build: bool, show: bool = False, liver_model=None, liver_tta: bool = True,
                     device="cpu", workers: int = 1) -> list[Sample]:
    """The stage samples of the named cases, from the cache; missing or stale ones are built when
    ``build`` (the one process per run that prepares), else that is an error. Without ``build`` the
    source files' stamps are not compared: another node's copy of the data may stamp them
    differently, and the preparing process has just checked them. Cases without labels, and for
    tumors cases without liver, have no sample. ``liver_model`` (tumor stage): build around its
    predicted liver (mirrored unless ``liver_tta`` is False), run on ``device``. ``workers`` > 1
    builds that many cases at once in separate processes (the same files as one process)."""
    from tqdm import tqdm

    names = [n for n in names if n in cases]
    liver_model = liver_model if stage == "tumor" else None
    keys = {n: json.loads(json.dumps(cache_key(cases[n], stage, pre, liver_model, liver_tta))) for n in names}
    compared = (lambda key: key) if build else (lambda key: {k: v for k, v in key.items() if k not in ("image", "label")})
    stale = [n for n in names if (meta := _read_meta(cache_dir / n)) is None or compared(meta["key"]) != compared(keys[n])]
    if stale and not build:
        raise InputError(f"The prepared sample of case '{stale[0]}' is missing from {cache_dir / stale[0]} (every "
                         "process of a run reads the run folder: on several nodes, it must be on storage they share).")
    jobs = [(cases[n], stage, pre, keys[n], cache_dir / n, liver_model and liver_model.path, liver_tta, str(device))
            for n in stale]
    bar = tqdm(total=len(jobs), desc=f"preparing {stage}", unit="case", disable=None if show else True, file=sys.stderr)
    with bar:
        if workers > 1 and len(jobs) > 1:
            _build_in_processes(jobs, min(workers, len(jobs)), bar)
        else:
            for job in jobs:
                _build_and_store(*job, liver_model=liver_model)
                bar.update()
    return [sample for n in names if (sample := load(cache_dir / n, n)) is not None]


def _build_and_store(case: Case, stage: str, pre: dict, key: dict, folder: Path, liver_path, liver_tta: bool,
                     device: str, liver_model=None) -> None:
    """Build one case's sample (around the liver model's prediction when the key names one) and store it."""
    ct, labels = load_case(case)
    sample = None
    if labels is not None:
        if key.get("liver_model") and liver_model is None:
            liver_model = _worker_liver_model(liver_path, device)
        liver = predicted_liver(ct, liver_model, device, liver_tta) if key.get("liver_model") else None
        sample = build_sample(ct, labels, stage, pre, case.name, liver=liver)
    store(sample, key, folder)


_WORKER_MODELS: dict = {}  # a worker process loads the liver model once


def _worker_liver_model(path, device: str):
    from .modelfile import load_model

    if path not in _WORKER_MODELS:
        _WORKER_MODELS[path] = load_model(path, stage="liver", device=device)
    return _WORKER_MODELS[path]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _build_in_processes(jobs: list[tuple], workers: int, bar) -> None:
    """Build the jobs in ``workers`` spawned processes, the CPU threads shared among them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        for done in as_completed([pool.submit(_build_and_store, *job) for job in jobs]):
            done.result()  # a worker's error is raised here
            bar.update()
