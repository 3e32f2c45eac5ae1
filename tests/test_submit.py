"""The command line end to end: bad input stops before anything is written, with one message."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hpc_btunet.data.manifest import load_manifest
from hpc_btunet.submit import main


def make_folder(root, n=12, size=(20, 24), skip_masks=(), mask_size=None, bad_images=(), extra=()):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        stem = f"img{i:02d}"
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(
            root / "images" / f"{stem}.png"
        )
        if stem not in skip_masks:
            msize = mask_size if (mask_size and i == 0) else size
            Image.fromarray(((rng.random(msize) > 0.5) * 255).astype(np.uint8)).save(
                root / "masks" / f"{stem}.png"
            )
    for stem in bad_images:
        path = root / "images" / f"{stem}.png"
        path.write_bytes(path.read_bytes()[:60])
    for name in extra:
        (root / "images" / name).write_bytes((root / "images" / "img00.png").read_bytes())
    return root


def run_pack(capsys, *args):
    code = main(["pack", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pack_and_verify_synthetic(tmp_path, capsys):
    out = tmp_path / "synth"
    code, stdout, _ = run_pack(
        capsys, "--num-images", 30, "--image-size", 32, "--folds", 3, "--out", out
    )
    assert code == 0, stdout
    assert "packed 30 32x32 images" in stdout
    m = load_manifest(out)
    assert (
        m.source["kind"] == "synthetic"
        and len(m.folds) == 3
        and sum(m.counts["folds"]) == m.counts["labelled"] == 4
    )
    assert main(["verify", "--data", str(out)]) == 0
    assert "all match the manifest" in capsys.readouterr().out


def test_pack_folder_happy_path(tmp_path, capsys):
    root = make_folder(tmp_path / "raw", n=40)
    code, stdout, _ = run_pack(
        capsys, "--source", "folder", "--root", root, "--image-size", 16, "--out", tmp_path / "o"
    )
    assert code == 0
    m = load_manifest(tmp_path / "o")
    assert m.channels == 1 and m.counts["total"] == 40


@pytest.mark.parametrize(
    "case,expect",
    [
        ({"skip_masks": ("img03", "img07")}, ["img03", "img07", "--unlabelled"]),
        ({"mask_size": (10, 10)}, ["img00", "size"]),
        ({"bad_images": ("img02", "img05")}, ["img02", "img05", "re-export"]),
        ({"extra": ("img01.tif",)}, ["img01.png", "img01.tif", "duplicate"]),
        ({"n": 0}, ["no images"]),
    ],
    ids=["missing-mask", "mask-size", "truncated", "duplicate-stem", "empty"],
)
def test_bad_folder_stops_before_writing(tmp_path, capsys, case, expect):
    root = make_folder(tmp_path / "raw", **case)
    out = tmp_path / "out"
    code, stdout, err = run_pack(capsys, "--source", "folder", "--root", root, "--out", out)
    assert code == 2
    assert not out.exists(), "nothing may be written for bad input"
    assert err.count("error:") == 1 and "Traceback" not in err
    for word in expect:
        assert word in err


def test_every_offender_of_every_kind_in_one_message(tmp_path, capsys):
    root = make_folder(
        tmp_path / "raw", skip_masks=("img04",), mask_size=(8, 8), bad_images=("img09",)
    )
    code, _, err = run_pack(capsys, "--source", "folder", "--root", root, "--out", tmp_path / "out")
    assert code == 2
    assert all(name in err for name in ("img04", "img00", "img09"))


def test_missing_masks_accepted_with_unlabelled(tmp_path, capsys):
    root = make_folder(tmp_path / "raw", n=40, skip_masks=("img03", "img07"))
    code, *_ = run_pack(
        capsys,
        "--source",
        "folder",
        "--root",
        root,
        "--unlabelled",
        "--image-size",
        16,
        "--out",
        tmp_path / "out",
    )
    assert code == 0
    assert load_manifest(tmp_path / "out").unlabelled == ["img03", "img07"]


def test_existing_dataset_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    args = ["--num-images", 20, "--image-size", 32, "--folds", 2, "--out", out]
    assert run_pack(capsys, *args)[0] == 0
    code, _, err = run_pack(capsys, *args)
    assert code == 2 and "--overwrite" in err
    assert run_pack(capsys, *args, "--overwrite")[0] == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--source", "folder"], "--root"),
        (["--source", "nifti"], "unknown --source"),
        (["--image-size", "4"], "--image-size"),
        (["--test-fraction", "1.5"], "--test-fraction"),
        (["--num-images", "0"], "num_images"),
    ],
)
def test_bad_options(tmp_path, capsys, args, message):
    code, _, err = run_pack(capsys, *args, "--out", tmp_path / "o")
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_verify_reports_corruption(tmp_path, capsys):
    out = tmp_path / "synth"
    run_pack(capsys, "--num-images", 20, "--image-size", 32, "--folds", 2, "--out", out)
    shard = out / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    assert main(["verify", "--data", str(out)]) == 2
    assert "train-000000.tar" in capsys.readouterr().err


def test_console_script_and_module_are_one_command():
    by_module = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", "pack", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    script = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from hpc_btunet.submit import main; "
            "sys.argv[0] = 'hpc-btunet'; sys.exit(main())",
            "pack",
            "--help",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert by_module == script
    assert "(default: 256)" in by_module and "--labelled-fraction" in by_module
