"""Atomic writes: the final name only ever holds a whole file, and files follow the umask."""

import os
import stat

import pytest

from hpc_btunet.atomic import TMP_MARK, atomic_open, current_umask, remove_stale_temporaries


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(mask):
        os.umask(mask)

    yield set_umask
    os.umask(old)


@pytest.mark.parametrize(
    "mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o027, 0o640), (0o077, 0o600)]
)
def test_files_follow_the_umask_as_cp_would(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    with atomic_open(tmp_path / "f.bin") as f:
        f.write(b"x")
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("new, half")
        raise RuntimeError("crash")
    assert path.read_text() == "old" and not list(tmp_path.glob(f"*{TMP_MARK}*"))


def test_stale_temporaries_are_removed_below_a_folder(tmp_path):
    (tmp_path / "a").mkdir()
    stale = [tmp_path / f"x.pt{TMP_MARK}abc", tmp_path / "a" / f"y.json{TMP_MARK}def"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / "keep.pt").write_bytes(b"whole")
    assert sorted(remove_stale_temporaries(tmp_path, recursive=True)) == sorted(stale)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.pt"]


def test_a_packed_dataset_is_readable_by_the_group_under_the_usual_umask(tmp_path, umask):
    from hpc_btunet.submit import main

    umask(0o002)
    argv = ["pack", "--num-images", "20", "--image-size", "32", "--folds", "2"]
    assert main([*argv, "--out", str(tmp_path / "ds")]) == 0
    files = [p for p in (tmp_path / "ds").iterdir() if p.name != ".lock"]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o664 for p in files)
