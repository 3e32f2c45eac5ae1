"""One writer per folder: a second writer is refused naming the holder; a dead holder frees it."""

import signal
import subprocess
import sys
import time

import pytest

from hpc_btunet.folder_lock import FolderLock, FolderLocked, check_unlocked, holder

HOLD = """
import sys, time
from hpc_btunet.folder_lock import FolderLock
FolderLock(sys.argv[1], "run folder").acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    with FolderLock(tmp_path / "run", "run folder"):
        assert "pid" in holder(tmp_path / "run")
        with pytest.raises(FolderLocked, match=r"run folder .*run is being written by .*pid"):
            FolderLock(tmp_path / "run", "run folder").acquire()
        with pytest.raises(FolderLocked, match="choose another --out"):
            check_unlocked(tmp_path / "run", "run folder")
    assert holder(tmp_path / "run") is None
    check_unlocked(tmp_path / "run", "run folder")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_dead_holder_does_not_keep_the_lock(tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    assert holder(tmp_path / "run") is not None
    with pytest.raises(FolderLocked):
        FolderLock(tmp_path / "run").acquire()
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while holder(tmp_path / "run") is not None and time.time() < deadline:
        time.sleep(0.05)
    with FolderLock(tmp_path / "run"):
        pass


def test_a_second_pack_into_the_same_folder_is_refused(tmp_path, capsys):
    from hpc_btunet.submit import main

    argv = ["pack", "--num-images", "20", "--image-size", "32", "--folds", "2"]
    argv += ["--out", str(tmp_path / "ds")]
    with FolderLock(tmp_path / "ds", "dataset folder"):
        assert main(argv) == 2
    assert "dataset folder" in capsys.readouterr().err
    assert main(argv) == 0
