"""The child-process runner with real child processes: progress parsed, outputs written, cancel
kills the whole process tree, a failure reported with the child's error line."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "LiverTumorSeg"))

from LiverTumorSegLib.imageio import read_labels, write_volume  # noqa: E402
from LiverTumorSegLib.phantom import generate_case  # noqa: E402
from LiverTumorSegLib.pipeline import Probabilities  # noqa: E402
from LiverTumorSegSlicer.runner import ChildRun, Finished, Log, Progress, child_environment, segment_command  # noqa: E402


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    ct, _ = generate_case(7, spacing=(2.0, 2.0, 4.0), matrix=160)
    return write_volume(ct, tmp_path_factory.mktemp("ct") / "ct.nii.gz")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:  # a zombie is dead
        return f.read().split()[2] != "Z"


def test_command_passes_the_panels_flags(ct_file, tmp_path):
    default = segment_command(sys.executable, ct_file, tmp_path, model="phantom-small", device="cpu", fast=False)
    both = segment_command(sys.executable, ct_file, tmp_path, model="phantom-small", device="cuda:1", fast=True, tta=True)
    quick = segment_command(sys.executable, ct_file, tmp_path, model="phantom-small", device="cpu", fast=True, tta=False)
    assert "--fast" not in default and default[-1] == "--tta"  # mirroring is the default
    assert both[-2:] == ["--fast", "--tta"] and both[both.index("--device") + 1] == "cuda:1"
    assert quick[-2:] == ["--fast", "--no-tta"]


def test_child_segments_and_reports_progress(ct_file, tmp_path):
    cmd = segment_command(sys.executable, ct_file, tmp_path, model="phantom-small", device="cpu", fast=True)
    run = ChildRun(cmd, env=child_environment(threads=1))
    events = run.wait(timeout=300)
    done = events[-1]
    assert isinstance(done, Finished) and done.returncode == 0 and done.error is None, run.log[-5:]
    progress = [e for e in events if isinstance(e, Progress)]
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Liver" in p.message for p in progress) and any("Tumors" in p.message for p in progress)
    labels = read_labels(tmp_path / "labels.nii.gz")
    probs = Probabilities.load(tmp_path / "probabilities.npz")
    assert (labels.array == 1).sum() > 1000 and probs.liver.shape == labels.array.shape
    assert (tmp_path / "report.json").is_file()


def test_a_child_error_with_non_ascii_text_reaches_the_parent_intact(tmp_path):
    """The child writes UTF-8 whatever the platform's pipe encoding (Windows: the ANSI code page)."""
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('error: cannot read /données/Ünter 肝臓.nii', flush=True)\nsys.exit(2)\n",
                      encoding="utf-8")
    env = dict(child_environment(threads=1), PYTHONUTF8="0", LC_ALL="C", LANG="C")
    run = ChildRun([sys.executable, str(script)], env=env)
    done = run.wait(timeout=60)[-1]
    assert isinstance(done, Finished) and done.returncode == 2
    assert done.error == "cannot read /données/Ünter 肝臓.nii"


def test_cancel_kills_the_process_tree(tmp_path):
    """The child starts a grandchild; cancel must end both."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('PROGRESS {\"fraction\": 0.1, \"message\": \"grandchild ' + str(child.pid) + '\"}', flush=True)\n"
        "time.sleep(60)\n", encoding="utf-8")
    run = ChildRun([sys.executable, str(script)])
    deadline = time.monotonic() + 30
    progress = []
    while not progress and time.monotonic() < deadline:
        progress = [e for e in run.poll() if isinstance(e, Progress)]
        time.sleep(0.05)
    grandchild = int(progress[0].message.split()[-1])
    assert _alive(run.process.pid) and _alive(grandchild)
    run.cancel()
    done = run.wait(timeout=30)[-1]
    assert done.cancelled and done.error is None and done.returncode != 0
    time.sleep(0.2)
    assert not _alive(grandchild)


def test_failure_is_reported_with_the_childs_error(tmp_path):
    not_ct = tmp_path / "mask.nii.gz"
    from LiverTumorSegLib.volume import Volume

    write_volume(Volume(np.zeros((20, 40, 40), np.uint8), (1, 1, 1)), not_ct)
    cmd = segment_command(sys.executable, not_ct, tmp_path, model="phantom-small", device="cpu", fast=True)
    run = ChildRun(cmd, env=child_environment(threads=1))
    events = run.wait(timeout=120)
    done = events[-1]
    assert done.returncode == 2 and not done.cancelled
    assert "same value" in done.error or "label" in done.error, done.error
    assert any(isinstance(e, Log) and e.line.startswith("error:") for e in events)
    assert not (tmp_path / "labels.nii.gz").exists()


@pytest.mark.parametrize("code, expected", [
    ("import os, signal; print('loading the models'); os.kill(os.getpid(), signal.SIGKILL)",
     ["killed (SIGKILL)", "lack of memory", "loading the models"]),
    ("import no_such_package", ["exit code 1", "ModuleNotFoundError"]),
    ("import sys; print('livertumorseg: error: unrecognized arguments: --bogus'); sys.exit(2)",
     ["unrecognized arguments: --bogus"]),
])
def test_a_child_that_dies_without_our_error_line_is_explained(code, expected):
    """Killed (the kernel's out-of-memory killer sends SIGKILL), a crash at import, argparse's error:
    the message names the cause, not only an exit code."""
    if os.name != "posix" and "SIGKILL" in code:
        pytest.skip("no SIGKILL on Windows")
    done = ChildRun([sys.executable, "-c", code]).wait(timeout=60)[-1]
    assert done.returncode != 0 and not done.cancelled
    assert all(words in done.error for words in expected), done.error
