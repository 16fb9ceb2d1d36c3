"""Pack what the lent GPU machine lacks (SimpleITK, MONAI, cc3d) to travel with the repo, and unpack it there.

    .venv/bin/python scripts/device_kit.py build [--wheels DIR] [--kit .devkit]
    python3 scripts/device_kit.py unpack --kit .devkit --site /tmp/site      (on the device)

The device machine (an H200 with torch 2.11, numpy, scipy, scikit-image, matplotlib, safetensors and
tqdm) has no package registry, and a call carries at most 64 MiB: the working tree (about 15 MB)
plus what ``carry`` names. The SimpleITK cp312 wheel alone is about 50 MiB, so ``build`` repacks it
as tar.xz (about 27 MiB); MONAI and cc3d travel as their wheels (about 6 MiB together). ``build`` downloads the
three for CPython 3.12 on manylinux x86-64 unless ``--wheels`` names a folder that has them, and
adds the kit folder to ``.git/info/exclude``. ``unpack`` needs only the standard library: a wheel
is a zip of its ``--target`` install, so extracting it into the site folder installs it.

A device call then reads (carry: [".devkit"], plus data copied into an ignored folder):
    python3 scripts/device_kit.py unpack && export PYTHONPATH=/tmp/site:$PWD/LiverTumorSeg && \
    python3 -m LiverTumorSegLib.cli train ...
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"simpleitk": "simpleitk==2.5.7", "monai": "monai==1.6.1", "connected_components_3d": "connected-components-3d==3.24.0"}
REPACKED = "simpleitk"  # too large as a wheel: travels as tar.xz of its installed tree
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20


def _wheel(folder: Path, name: str) -> Path | None:
    found = sorted(folder.glob(f"{name}-*.whl"), key=lambda p: p.name.lower())
    return found[-1] if found else None


def _download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec]
    subprocess.run(cmd, check=True)


def build(wheels: Path | None, kit: Path) -> dict:
    """Fill ``kit`` with the repacked SimpleITK and the other wheels; returns the sizes in bytes."""
    kit.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(wheels) if wheels else Path(tmp)
        sizes = {}
        for name, spec in PACKAGES.items():
            wheel = _wheel(source, name)
            if wheel is None:
                _download(spec, source)
                wheel = _wheel(source, name)
            if wheel is None:
                raise SystemExit(f"no wheel for {spec} in {source}")
            if name == REPACKED:
                tree = Path(tmp) / "tree"
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(tree)
                out = kit / f"{name}.tar.xz"
                with tarfile.open(out, "w:xz", preset=6) as tar:
                    for item in sorted(tree.iterdir()):
                        tar.add(item, arcname=item.name)
            else:
                out = kit / wheel.name
                shutil.copyfile(wheel, out)
            sizes[out.name] = out.stat().st_size
    exclude = REPO / ".git" / "info" / "exclude"
    line = f"/{kit.resolve().relative_to(REPO)}/" if kit.resolve().is_relative_to(REPO) else None
    if line and line not in (exclude.read_text(encoding="utf-8").splitlines() if exclude.exists() else []):
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    return sizes


def unpack(kit: Path, site: Path) -> list[str]:
    """Install the kit into ``site`` (extract the tar.xz and the wheels); returns what was installed."""
    site.mkdir(parents=True, exist_ok=True)
    done = []
    for item in sorted(kit.iterdir()):
        if item.name.endswith(".tar.xz"):
            with tarfile.open(item) as tar:
                tar.extractall(site, filter="data")
        elif item.suffix == ".whl":
            with zipfile.ZipFile(item) as z:
                z.extractall(site)
        else:
            continue
        done.append(item.name)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the kit (here)")
    b.add_argument("--wheels", type=Path, help="a folder that already holds the wheels (else pip downloads them)")
    b.add_argument("--kit", type=Path, default=REPO / ".devkit")
    u = sub.add_parser("unpack", help="install the kit into a site folder (on the device)")
    u.add_argument("--kit", type=Path, default=REPO / ".devkit")
    u.add_argument("--site", type=Path, default=Path("/tmp/site"))
    args = ap.parse_args(argv)
    if args.command == "build":
        sizes = build(args.wheels, args.kit)
        total = sum(sizes.values())
        for name, size in sizes.items():
            print(f"{size / 2**20:7.1f} MiB  {name}")
        print(f"{total / 2**20:7.1f} MiB in all; with the working tree it must stay under {CARRY_LIMIT / 2**20:.0f} MiB a call")
    else:
        print("installed:", ", ".join(unpack(args.kit, args.site)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
