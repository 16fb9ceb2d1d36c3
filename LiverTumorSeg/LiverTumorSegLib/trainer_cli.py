"""``livertumorseg train``: one stage on one or more data sets, in one process or under ``torchrun``.

The run folder holds everything: ``split.json`` (shared by both stages, reused when present),
``cache/<stage>/`` (prepared samples, memory-mapped by every process),
``<stage>.config.json``, ``<stage>.checkpoint.pt``, ``<stage>.best.pt``, ``<stage>.history.json``,
``<stage>.curves.png`` and the final model file ``<stage>.ltsm`` (so a folder with both stages is
a model for ``segment --model`` and ``evaluate --model``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from . import distributed
from .datasets import SPLITS, gather_cases, lits_paper_split, make_split, read_split, write_split
from .devices import is_out_of_memory, resolve_device
from .errors import Cancelled, InputError, LiverTumorSegError, OutputError
from .imageio import refuse_existing, write_json
from .modelfile import load_model, save_model
from .overlay import save_training_curves_png
from .trainconfig import check_config, load_config, net_config, same_recipe, stage_recipe
from .samplecache import prepared_samples
from .trainer import StageTrainer, hardware, make_card

SPLIT_FILE = "split.json"


def choose_split(cases: dict, config: dict, run_dir: Path, split_file: Path | None) -> tuple[dict, str]:
    """The split to use and where it came from: --split, the run folder's, or a new one."""
    existing = run_dir / SPLIT_FILE
    if split_file is not None:
        return read_split(split_file), str(split_file)
    if existing.is_file():
        return read_split(existing), f"{existing} (from an earlier stage of this run)"
    if config["split"] == "lits-paper":
        return lits_paper_split(seed=config["seed"]), "the G-UNETR++ paper's LiTS split (authors' 20 test cases)"
    try:
        split = make_split(list(cases), tuple(config["split"]), seed=config["seed"])
    except ValueError as err:
        raise InputError(f"The config's split {config['split']} does not fit these {len(cases)} labelled cases: {err}") from None
    return split, f"new split, seed {config['seed']}"


def check_split(split: dict, cases: dict, source: str = "the split") -> list[str]:
    """Warnings for split cases that are not in the (labelled) data; an error when nothing is left to train on."""
    warnings = []
    for part in SPLITS:
        missing = [name for name in split[part] if name not in cases]
        if missing:
            warnings.append(f"{len(missing)} {part} case(s) of the split are not in the data, or have no labels: "
                            f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    unused = sorted(set(cases) - {n for part in SPLITS for n in split[part]})
    if unused:
        warnings.append(f"{len(unused)} case(s) of the data are in no part of the split, unused: {', '.join(unused[:5])}")
    if not any(name in cases for name in split["train"]):
        raise InputError(f"No case of the training part of {source} is in the data with labels.")
    return warnings


def labelled_cases(cases: dict, show: bool) -> dict:
    """The cases with reference labels (a data folder may also hold unlabelled ones, e.g. LiTS's test volumes)."""
    unlabelled = [n for n, c in cases.items() if c.label is None]
    if unlabelled and show:
        print(f"warning: {len(unlabelled)} case(s) have no labels and are left out: {', '.join(unlabelled[:5])}"
              + (" ..." if len(unlabelled) > 5 else ""), file=sys.stderr)
    return {n: c for n, c in cases.items() if c.label is not None}


def same_split(a: dict, b: dict) -> bool:
    """Whether two splits put the same cases in each part (the order within a part does not matter)."""
    return all(sorted(a[part]) == sorted(b[part]) for part in SPLITS)


def pseudo_label_manifest(case) -> dict | None:
    """The pseudo-labels.json of the folder a case comes from, when its labels are a teacher's."""
    from .teacher import MANIFEST

    path = Path(case.image).parent / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _usable_for_stage(cases: dict, stage: str, show: bool) -> dict:
    """Liver-only pseudo-labels teach the liver stage only: the tumor stage leaves those cases out."""
    if stage != "tumor":
        return cases
    liver_only = [n for n, c in cases.items() if (m := pseudo_label_manifest(c)) and not m.get("with_tumors")]
    if liver_only and show:
        print(f"warning: {len(liver_only)} case(s) have liver-only pseudo-labels; the tumor stage leaves them out.", file=sys.stderr)
    return {n: c for n, c in cases.items() if n not in liver_only}


def _stage_files(run_dir: Path, stage: str) -> list[Path]:
    """A stage's results: what a new run would replace (its config and curves alone, left by a start
    that failed before the first epoch, hold no work and do not block a fresh start)."""
    return [run_dir / f"{stage}.{suffix}" for suffix in ("ltsm", "checkpoint.pt", "best.pt", "history.json")]


def _check_run_dir(run_dir: Path, stage: str, resume: bool, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"The run folder {run_dir} is a file.")
    existing = [p for p in _stage_files(run_dir, stage) if p.exists()]
    if resume:
        if not (run_dir / f"{stage}.checkpoint.pt").is_file():
            raise InputError(f"Nothing to resume: {run_dir / (stage + '.checkpoint.pt')} does not exist.")
    elif existing and not overwrite:
        raise OutputError(f"{run_dir} already has a {stage} run ({existing[0].name}); continue it with --resume "
                          "or replace it with --overwrite.")
    refuse_existing([run_dir / SPLIT_FILE], overwrite=True)  # a folder that cannot be made or written


def load_run_config(args, run_dir: Path) -> dict:
    """The config (--config, else on --resume the run's own copy, else small) with --epochs applied."""
    saved = run_dir / f"{args.stage}.config.json"
    if args.resume and args.config is None:
        if not saved.is_file():
            raise InputError(f"--resume: {run_dir} has no {saved.name}; give --config, or start a new run.")
        config = check_config(json.loads(saved.read_text(encoding="utf-8")), str(saved))
    else:
        config = load_config(args.config or "small")
    if args.epochs is not None:
        config = check_config({**config, "epochs": args.epochs}, f"the config with --epochs {args.epochs}")
    if args.resume and saved.is_file():  # refused before anything is written: the run's own config stays
        before = json.loads(saved.read_text(encoding="utf-8"))
        if not same_recipe(before, config):
            raise InputError(f"{run_dir} was trained with another config ({saved.name}); resume with the same one "
                             "(only --epochs may change), or start a new run.")
    return config


def run_train(args) -> int:
    from tqdm import tqdm

    world = distributed.world_from_env()
    run_dir = Path(args.output)
    stage = args.stage
    if world.main:
        _check_run_dir(run_dir, stage, args.resume, args.overwrite)
    config = load_run_config(args, run_dir)
    recipe = stage_recipe(config, stage)
    liver_model = stage1_model(args)
    init = load_model(args.init, stage=stage) if args.init else None  # a bad file fails before the run folder is made
    device = distributed.start(world, resolve_device(args.device))
    try:
        cases = labelled_cases(gather_cases([Path(d) for d in args.data], args.format), world.main)
        cases = _usable_for_stage(cases, stage, world.main)
        split, split_source = choose_split(cases, config, run_dir, args.split)
        for warning in check_split(split, cases, split_source) if world.main else []:
            print(f"warning: {warning}", file=sys.stderr)
        existing = run_dir / SPLIT_FILE
        if world.main:
            if existing.is_file() and not same_split(read_split(existing), split):
                raise InputError(f"{existing} holds another split than {split_source}; both stages of a run "
                                 "use one split (use another run folder).")
            print(f"{stage}: split from {split_source}; device {device}; {world.size} process(es)", file=sys.stderr)
        distributed.barrier(world)
        cache = run_dir / "cache" / stage
        liver_tta = args.liver_tta is not False  # mirrored unless --no-liver-tta, as segment's default
        masks = {"liver_model": liver_model, "liver_tta": liver_tta, "device": device}
        gpu_model = liver_model is not None and device.type == "cuda"
        if world.main:  # one process prepares (with its workers); the others map its files
            train = prepared_samples(split["train"], cases, stage, recipe.preprocessing, cache, build=True, show=True,
                                     workers=prepare_workers(args.workers, len(split["train"]), gpu_model), **masks)
            val = prepared_samples(split["val"], cases, stage, recipe.preprocessing, cache, build=True, show=True,
                                   workers=prepare_workers(args.workers, len(split["val"]), gpu_model), **masks)
            if gpu_model:  # the liver model is done with: give its GPU memory to training
                liver_model.net.cpu()
                torch.cuda.empty_cache()
        if world.main:  # written once the samples are ready: a start that fails before leaves no run behind
            run_dir.mkdir(parents=True, exist_ok=True)
            if not existing.is_file():
                write_split(split, existing, overwrite=True)  # both stages may start at once: same content
            write_json(config, run_dir / f"{stage}.config.json", overwrite=True)
        distributed.barrier(world)
        if not world.main:
            train = prepared_samples(split["train"], cases, stage, recipe.preprocessing, cache, build=False, **masks)
            val = []
        trainer = StageTrainer(config, stage, train, val, run_dir, device, world, init.net if init else None,
                               loader_workers=loader_workers(args.loader_workers, device))
        total = config["epochs"] * config["iterations_per_epoch"]
        bar = tqdm(total=total, desc=f"training {stage}", unit="it", disable=None if world.main else True, file=sys.stderr)

        def progress(epoch, it, iterations, loss):
            bar.n = epoch * iterations + it
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", refresh=False)
            bar.update(0)

        def on_epoch(entry):
            if "val_dice" in entry:
                bar.write(f"epoch {entry['epoch']}: loss {entry['loss']:.4f}, validation Dice {entry['val_dice']:.4f}", file=sys.stderr)
            if world.main:
                save_training_curves_png(trainer.history, run_dir / f"{stage}.curves.png", f"{stage} stage ({run_dir.name})")

        try:
            limit = args.time_limit * 60 if args.time_limit is not None else None
            outcome = trainer.run(resume=args.resume, progress=progress, on_epoch=on_epoch, time_limit=limit)
        except KeyboardInterrupt:
            if not world.main:  # torchrun stops every process when one fails: one message is enough
                raise SystemExit(130) from None
            raise Cancelled(f"training interrupted; {trainer.epoch} finished epoch(s) are kept in "
                            f"{trainer.files['checkpoint.pt']}: continue with --resume.") from None
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            raise LiverTumorSegError(training_out_of_memory(err, config, device, world)) from None
        finally:
            bar.close()
        if world.main:
            _write_model(args, trainer, config, cases, split, device, world, outcome, init, liver_model, liver_tta)
    finally:
        distributed.stop(world)
    return 0


def training_out_of_memory(err: BaseException, config: dict, device, world: distributed.World) -> str:
    """What ran out of memory in training, and what to change."""
    where = f"{device}" + (f" (process {world.rank} of {world.size})" if world.active else "")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    more = "a GPU with more memory or more GPUs (torchrun)" if device.type == "cuda" else "a machine with more memory"
    return (f"Out of memory on {where} while training with the global batch {config['batch']} and the tile "
            f"{'x'.join(map(str, net_config(config).tile))} ({first}). Start a new run with a smaller 'batch' or "
            f"'tile' in the config, or continue this one with --resume on {more}.")


def prepare_workers(asked: int | None, cases: int, gpu_model: bool = False) -> int:
    """Sample-preparing processes: as asked, else the CPU count (at most 8) for 16 cases or more;
    fewer cases are prepared in this process (starting a worker costs seconds), and so are cases that
    a liver model segments on a GPU (each worker would hold the model and its own CUDA context there)."""
    if asked is not None:
        return asked
    return min(8, os.cpu_count() or 1) if cases >= 16 and not gpu_model else 1


def loader_workers(asked: int | None, device) -> int:
    """Batch-loading processes: as asked, else 4 per GPU process (at most the CPUs each process's share
    allows), 0 on the CPU, where the network's threads already use the cores."""
    if asked is not None:
        if asked < 0:
            raise InputError("--loader-workers must be 0 or more.")
        return asked
    if device.type != "cuda":
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's training processes on this node
    return max(0, min(4, (os.cpu_count() or 1) // processes - 1))


def stage1_model(args):
    """The liver model whose predictions the tumor stage's samples are built around (--liver-model), or None."""
    if args.liver_model is None:
        if args.liver_tta is not None:
            raise InputError("--liver-tta / --no-liver-tta say how --liver-model predicts the liver; give --liver-model too.")
        return None
    if args.stage != "tumor":
        raise InputError("--liver-model is for the tumor stage: it builds stage 2's samples around stage 1's predicted liver.")
    from .registry import stage_files

    path, _ = stage_files(None, args.liver_model, need_tumor=False)
    return load_model(path, stage="liver")


def _write_model(args, trainer, config, cases, split, device, world, outcome, init, liver_model=None,
                 liver_tta=True) -> None:
    stage, run_dir = args.stage, Path(args.output)
    net, epoch = trainer.final_network()
    present = {part: [n for n in split[part] if n in cases] for part in SPLITS}
    used = {n for part in SPLITS for n in present[part]}
    teachers = {json.dumps(m["teacher"], sort_keys=True): m for n in used if (m := pseudo_label_manifest(cases[n]))}
    data = {
        "folders": [Path(d).resolve().name for d in args.data],
        "format": args.format,
        **{f"{part}_cases": present[part] for part in SPLITS},
        "pseudo_labels": [{"what": m["what"], "teacher": m["teacher"]} for m in teachers.values()] or None,
    }
    name = args.name or f"{run_dir.resolve().name}-{stage}"
    command = "livertumorseg " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "livertumorseg train"
    card = make_card(name, config, stage, data=data, best=outcome["best"], history=outcome["history"], epoch=epoch,
                     seconds=outcome["history"][-1]["seconds"], hardware=hardware(device, world), command=command, init=init and init.identity(),
                     liver_masks=liver_model and {**liver_model.identity(), "mirrored": liver_tta},
                     stopped=outcome["stopped"])
    path = save_model(net, card, run_dir / f"{stage}.ltsm")
    best = outcome["best"]
    if best["epoch"]:
        note = f"validation Dice {best['dice']:.4f} at epoch {best['epoch']}"
    else:
        note = "not validated before the time limit: last epoch" if trainer.val else "no validation cases: last epoch"
    print(f"wrote {path} ({note}; {time.strftime('%H:%M:%S', time.gmtime(card['training']['seconds']))} of training)")
    if outcome["stopped"]:
        print(f"stopped at the time limit after epoch {trainer.epoch} of {config['epochs']}: continue with --resume "
              f"(the model file is rewritten at the end)", file=sys.stderr)
