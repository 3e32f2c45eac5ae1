"""Red team: a user's mistakes through the real command line, each a few seconds on tiny data.

Every case runs ``python -m hpc_btunet.submit ...`` in a fresh process, in a folder holding the
inputs, and asserts: exit status 2, exactly one ``error:`` line naming the thing and the fix, no
traceback, and nothing written or lost (the folder's tree, sizes, times and modes are the same
afterwards). A case is ``(args, words)``: the command line, with ``{name}`` standing for an input
made by the fixture, and words the message must hold.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ToySource, flip_torch_byte

from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.folder_lock import FolderLock
from hpc_btunet.models import build_model, model_signature
from hpc_btunet.train.checkpoint import save_weights
from hpc_btunet.train.pretrain import PretrainConfig

pytestmark = pytest.mark.slow
TINY = ["--base-width", "4", "--depth", "2", "--executor", "local"]


def _make_world(root: Path) -> dict[str, Path]:
    """Every input the cases refer to, made once."""
    w: dict[str, Path] = {}
    w["data"] = root / "data"
    pack(
        ToySource(n=40),
        PackConfig(out=w["data"], image_size=32, shard_size=15, splits=SplitConfig(folds=3)),
        log=lambda _: None,
    )
    w["nolabels"] = root / "nolabels"
    pack(
        ToySource(n=20, unlabelled={f"toy-{i:04d}" for i in range(20)}),
        PackConfig(out=w["nolabels"], image_size=32),
        log=lambda _: None,
    )
    manifest_text = (w["data"] / "manifest.json").read_text()

    def copy_with(name: str, manifest: str | None = None) -> Path:
        shutil.copytree(w["data"], root / name)
        if manifest is not None:
            (root / name / "manifest.json").write_text(manifest)
        return root / name

    w["wrongshape"] = copy_with("wrongshape", "[]")
    w["edited"] = copy_with("edited", manifest_text.replace('"image_size": 32', '"image_size": 33'))
    w["oldschema"] = copy_with(
        "oldschema", manifest_text.replace("hpc_btunet.manifest/2", "hpc_btunet.manifest/1")
    )
    w["truncated"] = copy_with("truncated")
    shard = w["truncated"] / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])

    w["file"] = root / "a-file"
    w["file"].write_text("not a folder\n")
    w["garbage_pt"] = root / "garbage.pt"
    w["garbage_pt"].write_bytes(b"not a torch file")
    model = build_model("attention_unet", in_channels=1, base_width=4, depth=2)
    w["other_encoder"] = root / "other" / "encoder.pt"
    save_weights(
        w["other_encoder"],
        model.encoder.state_dict(),
        model_signature("attention_unet", in_channels=1, base_width=4, depth=2)
        | {"image_size": 32},
    )
    unet = build_model("unet", in_channels=1, base_width=4, depth=2)
    w["flipped_encoder"] = root / "flipped" / "encoder.pt"
    save_weights(
        w["flipped_encoder"],
        unet.encoder.state_dict(),
        model_signature("unet", in_channels=1, base_width=4, depth=2) | {"image_size": 32},
    )
    flip_torch_byte(w["flipped_encoder"])

    w["unknown_key_yaml"] = root / "unknown.yaml"
    w["unknown_key_yaml"].write_text("data: x\nbatchsize: 4\n")
    w["list_yaml"] = root / "list.yaml"
    w["list_yaml"].write_text("- lr\n- 0.1\n")
    w["broken_yaml"] = root / "broken.yaml"
    w["broken_yaml"].write_text("lr: [0.1\n")

    # folder datasets: masks missing, a link loop among the images
    for name in ("raw_nomasks", "raw_loop"):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        w[name] = root / name
    (w["raw_nomasks"] / "images" / "a.png").write_bytes(_tiny_png())
    (w["raw_loop"] / "images" / "a.png").write_bytes(_tiny_png())
    (w["raw_loop"] / "masks" / "a.png").write_bytes(_tiny_png())
    os.symlink("b.png", w["raw_loop"] / "images" / "b.png")
    w["complete_pack"] = w["data"]

    # run folders: one started with lr 1e-3 (a checkpoint exists), one complete with lr 1e-3
    for name, complete in (("started", False), ("complete", True)):
        cfg = PretrainConfig(data=w["data"], out=root / name, lr=1e-3, base_width=4, depth=2)
        run = cfg.run_dir()
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "step-00000004.pt").write_bytes(b"")
        (run / "config.yaml").write_text(yaml.safe_dump({"identity": cfg.identity(1)}))
        if complete:
            (run / "encoder.pt").write_bytes(b"")
        w[name] = root / name
    w["locked"] = root / "locked"
    w["report_corrupt"] = root / "report_corrupt"
    fold = w["report_corrupt"] / "finetune" / "unet" / "scratch" / "fold-0"
    fold.mkdir(parents=True)
    (fold / "metrics.json").write_text('{"model": "unet", "variant": "scr')
    w["report_wrongshape"] = root / "report_wrongshape"
    fold = w["report_wrongshape"] / "finetune" / "unet" / "scratch" / "fold-0"
    fold.mkdir(parents=True)
    (fold / "metrics.json").write_text(json.dumps({"model": "unet", "variant": "scratch"}))
    w["empty_path_dir"] = root / "emptybin"
    w["empty_path_dir"].mkdir()

    # --deepspeed-config files: each wrong in one way
    for name, text in {
        "ds_broken": '{"train_batch_size": ',
        "ds_list": "[1, 2]",
        "ds_unknown": '{"zero_optimisation": {"stage": 1}}',
        "ds_micro": '{"train_micro_batch_size_per_gpu": 3}',
        "ds_global": '{"train_batch_size": 16}',
        "ds_accumulate": '{"gradient_accumulation_steps": 2}',
        "ds_clip": '{"gradient_clipping": 1.0}',
        "ds_zero2": '{"zero_optimization": {"stage": 2}}',
        "ds_bf16": '{"bf16": {"enabled": true}}',
        "ds_optimizer": '{"optimizer": {"type": "Adam", "params": {"lr": 0.001}}}',
        "ds_scheduler": '{"scheduler": {"type": "WarmupLR"}}',
    }.items():
        w[name] = root / f"{name}.json"
        w[name].write_text(text + "\n")
    w["ds_binary"] = root / "ds_binary.json"
    w["ds_binary"].write_bytes(b"\xff\xfe{}")
    w["ds_folder"] = root / "ds-folder"
    w["ds_folder"].mkdir()

    # a run folder started by the ddp engine: a real 2-step run with its encoder removed, so that
    # its config.yaml and checkpoints are what an interrupted ddp run leaves
    w["started_ddp"] = root / "started_ddp"
    done = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", "pretrain", "--data", str(w["data"])]
        + ["--out", str(w["started_ddp"]), "--base-width", "4", "--depth", "2"]
        + ["--batch-size", "4", "--steps", "2", "--checkpoint-every", "1"]
        + ["--executor", "debug", "--engine", "ddp", "--wandb", "disabled"],
        cwd=root,
        env=dict(os.environ, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    run = w["started_ddp"] / "pretrain" / "unet"
    for name in ("encoder.pt", "encoder.json"):
        (run / name).unlink()
    assert (run / "checkpoints" / "step-00000002" / "complete.json").is_file()
    return w


def _tiny_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PRE = ["pretrain", "--data", "{data}", "--out", "{root}/exp", *TINY, "--batch-size", "4"]
FT = ["finetune", "--data", "{data}", "--out", "{root}/exp", *TINY]
DS = [*PRE, "--engine", "deepspeed"]
FT_DS = [*FT, "--engine", "deepspeed"]

CASES = {
    # pack
    "pack-folder-without-root": (["pack", "--source", "folder", "--out", "{root}/o"], ["--root"]),
    "pack-unknown-source": (
        ["pack", "--source", "nifti", "--out", "{root}/o"],
        ["--source", "choose"],
    ),
    "pack-tiny-image-size": (
        ["pack", "--image-size", "4", "--out", "{root}/o"],
        ["--image-size", "at least 16"],
    ),
    "pack-test-fraction-above-one": (
        ["pack", "--test-fraction", "1.5", "--out", "{root}/o"],
        ["--test-fraction", "(0, 1)"],
    ),
    "pack-no-images": (["pack", "--num-images", "0", "--out", "{root}/o"], ["num_images"]),
    "pack-one-fold": (["pack", "--folds", "1", "--out", "{root}/o"], ["--folds", "at least 2"]),
    "pack-shard-size-zero": (
        ["pack", "--shard-size", "0", "--out", "{root}/o"],
        ["--shard-size", "at least 1"],
    ),
    "pack-out-is-a-file": (["pack", "--out", "{file}"], ["is a file", "folder"]),
    "pack-over-a-complete-dataset": (
        ["pack", "--out", "{complete_pack}"],
        ["--overwrite", "another --out"],
    ),
    "pack-root-with-synthetic": (
        ["pack", "--root", "{root}", "--out", "{root}/o"],
        ["--root is not used"],
    ),
    "pack-bad-channels": (
        ["pack", "--channels", "2", "--out", "{root}/o"],
        ["--channels", "invalid choice"],
    ),
    "pack-missing-masks": (
        ["pack", "--source", "folder", "--root", "{raw_nomasks}", "--out", "{root}/o"],
        ["missing mask", "--unlabelled"],
    ),
    "pack-symlink-loop": (
        ["pack", "--source", "folder", "--root", "{raw_loop}", "--out", "{root}/o"],
        ["b.png", "link"],
    ),
    "pack-invalid-group-regex": (
        [
            "pack",
            "--source",
            "folder",
            "--root",
            "{raw_loop}",
            "--group-regex",
            "(",
            "--out",
            "{root}/o",
        ],
        ["group_regex", "not a valid regex"],
    ),
    "pack-regex-without-group": (
        [
            "pack",
            "--source",
            "folder",
            "--root",
            "{raw_loop}",
            "--group-regex",
            "abc",
            "--out",
            "{root}/o",
        ],
        ["capture group"],
    ),
    # verify and manifests
    "verify-missing-dataset": (
        ["verify", "--data", "{root}/nothing"],
        ["no packed dataset", "pack"],
    ),
    "verify-truncated-shard": (["verify", "--data", "{truncated}"], ["train-000000.tar", "repack"]),
    "manifest-wrong-shape": ([*PRE[:2], "{wrongshape}", *PRE[3:]], ["manifest.json", "repack"]),
    "manifest-edited": ([*PRE[:2], "{edited}", *PRE[3:]], ["manifest.json", "checksum", "repack"]),
    "manifest-old-schema": ([*PRE[:2], "{oldschema}", *PRE[3:]], ["older version", "repack"]),
    # job options
    "no-data": (["pretrain", "--executor", "local"], ["--data is required"]),
    "data-missing": (
        ["pretrain", "--data", "{root}/nothing", "--out", "{root}/exp", *TINY],
        ["no packed dataset", "pack"],
    ),
    "lr-nan": ([*PRE, "--lr", "nan"], ["--lr", "finite"]),
    "lr-negative": ([*PRE, "--lr", "-1"], ["--lr", "> 0"]),
    "lr-not-a-number": ([*PRE, "--lr", "fast"], ["--lr", "invalid float"]),
    "num-workers-negative": ([*PRE, "--num-workers", "-1"], ["--num-workers", ">= 0"]),
    "batch-size-one-pretrain": ([*PRE, "--batch-size", "1"], ["global batch of 1", "--batch-size"]),
    "accumulate-zero": ([*PRE, "--accumulate", "0"], ["--accumulate", ">= 1"]),
    "bn-scope-unknown": ([*PRE, "--bn-scope", "sync"], ["--bn-scope", "choose"]),
    "batchnorm-over-one-image": (
        [*PRE, "--batch-size", "1", "--accumulate", "2", "--bn-scope", "local"],
        ["BatchNorm over 1 image", "--batch-size"],
    ),
    "accumulated-batch-over-train-split": (
        [*PRE, "--accumulate", "100"],
        ["fewer than one global batch", "--accumulate"],
    ),
    "global-batch-over-train-split": (
        [*PRE, "--batch-size", "500"],
        ["fewer than one global batch", "--batch-size"],
    ),
    "unknown-model": ([*PRE, "--model", "vnet"], ["unknown model", "vnet"]),
    "size-not-divisible": ([*PRE, "--depth", "6"], ["not divisible by 64", "--image-size"]),
    "spectral-pool-too-small": (
        [
            "pretrain",
            "--data",
            "{data}",
            "--out",
            "{root}/exp",
            "--model",
            "inception_unet",
            "--depth",
            "5",
            "--base-width",
            "4",
            "--executor",
            "local",
        ],
        ["smallest valid size", "--image-size"],
    ),
    "out-is-a-file": ([*PRE[:4], "{file}", *PRE[5:]], ["--out", "is a file"]),
    "crop-scale-zero": ([*PRE, "--crop-scale", "0"], ["--crop-scale", "> 0"]),
    "rotation-too-large": ([*PRE, "--rotation", "400"], ["--rotation", "<= 180"]),
    "epochs-zero": ([*PRE, "--epochs", "0"], ["--epochs", ">= 1"]),
    "stage-on-error-unknown": (
        [*PRE, "--stage-to", "{root}/node", "--stage-on-error", "ignore"],
        ["--stage-on-error", "invalid choice", "fallback", "stop"],
    ),
    "config-missing": ([*PRE, "--config", "{root}/none.yaml"], ["--config", "does not exist"]),
    "config-unknown-key": ([*PRE, "--config", "{unknown_key_yaml}"], ["batchsize", "valid keys"]),
    "config-not-a-mapping": ([*PRE, "--config", "{list_yaml}"], ["mapping"]),
    "config-broken-yaml": ([*PRE, "--config", "{broken_yaml}"], ["not valid YAML"]),
    # launch
    "slurm-absent": (
        [*PRE[:5], "--base-width", "4", "--depth", "2", "--batch-size", "4", "--executor", "slurm"],
        ["needs SLURM", "--executor local"],
    ),
    "bad-time": ([*PRE, "--time", "1h"], ["--time", "SLURM time"]),
    "unknown-profile": ([*PRE, "--profile", "nope"], ["profile", "not found"]),
    "nodes-local": ([*PRE, "--nodes", "2"], ["--nodes 2 needs --executor slurm"]),
    "after-local": ([*PRE, "--after", "123"], ["--after needs --executor slurm"]),
    "tasks-per-node-zero": ([*PRE, "--tasks-per-node", "0"], ["--tasks-per-node", ">= 1"]),
    "sbatch-without-key": ([*PRE, "--sbatch", "=x"], ["--sbatch", "KEY=VALUE"]),
    # fine-tuning
    "fold-out-of-range": ([*FT, "--fold", "7"], ["fold 7 is out of range", "repack"]),
    "folds-more-than-packed": ([*FT, "--folds", "9"], ["--folds 9", "ask for 1 to 3"]),
    "variants-unknown": ([*FT, "--variants", "fine"], ["--variants", "bt,scratch"]),
    "models-unknown": ([*FT, "--models", "vnet,unet"], ["unknown model", "vnet"]),
    "pretrained-missing": ([*FT, "--pretrained", "{root}/none.pt"], ["does not exist"]),
    "pretrained-not-torch": ([*FT, "--pretrained", "{garbage_pt}"], ["not a readable torch file"]),
    "pretrained-other-model": (
        [*FT, "--pretrained", "{other_encoder}"],
        ["attention_unet", "pre-trained for this model"],
    ),
    "pretrained-damaged": ([*FT, "--pretrained", "{flipped_encoder}"], ["damaged", "CRC"]),
    "finetune-several-tasks": (
        [*FT, "--tasks-per-node", "2"],
        ["one process per", "--tasks-per-node 1"],
    ),
    "finetune-without-labels": (
        [*FT[:2], "{nolabels}", *FT[3:]],
        ["no labelled subset", "labelled dataset"],
    ),
    # engines and precision
    "engine-unknown": ([*PRE, "--engine", "horovod"], ["--engine", "invalid choice", "deepspeed"]),
    "finetune-engine-unknown": (
        [*FT, "--engine", "horovod"],
        ["--engine", "invalid choice", "deepspeed"],
    ),
    "precision-unknown": ([*PRE, "--precision", "fp8"], ["--precision", "invalid choice", "bf16"]),
    "zero-stage-three": ([*DS, "--zero-stage", "3"], ["--zero-stage", "invalid choice", "0, 1, 2"]),
    "fp16-on-cpu": ([*PRE, "--precision", "fp16"], ["--precision fp16", "CUDA", "bf16"]),
    "fp16-on-cpu-deepspeed": ([*DS, "--precision", "fp16"], ["--precision fp16", "bf16"]),
    "finetune-fp16-on-cpu": ([*FT, "--precision", "fp16"], ["--precision fp16", "bf16"]),
    "zero-stage-without-deepspeed": (
        [*PRE, "--zero-stage", "1"],
        ["--zero-stage 1", "--engine deepspeed"],
    ),
    "finetune-zero-stage-without-deepspeed": (
        [*FT, "--zero-stage", "2"],
        ["--zero-stage 2", "--engine deepspeed"],
    ),
    "deepspeed-config-without-deepspeed": (
        [*PRE, "--deepspeed-config", "{ds_clip}"],
        ["--deepspeed-config", "--engine deepspeed"],
    ),
    "finetune-deepspeed-config-without-deepspeed": (
        [*FT, "--engine", "ddp", "--deepspeed-config", "{ds_clip}"],
        ["--deepspeed-config", "--engine deepspeed"],
    ),
    "lars-with-zero": (
        [*DS, "--optimizer", "lars", "--zero-stage", "1"],
        [
            "--optimizer lars",
            "--zero-stage 1",
            "--zero-stage 0",
            "--engine ddp",
            "--optimizer adam",
        ],
    ),
    "lars-with-zero-two": (
        [*DS, "--optimizer", "lars", "--zero-stage", "2"],
        ["--optimizer lars", "--zero-stage 2", "--zero-stage 0"],
    ),
    # --deepspeed-config files
    "deepspeed-config-missing": (
        [*DS, "--deepspeed-config", "{root}/none.json"],
        ["--deepspeed-config", "none.json", "does not exist"],
    ),
    "deepspeed-config-a-folder": (
        [*DS, "--deepspeed-config", "{ds_folder}"],
        ["--deepspeed-config", "ds-folder", "is a folder"],
    ),
    "deepspeed-config-not-json": (
        [*DS, "--deepspeed-config", "{ds_broken}"],
        ["ds_broken.json", "not JSON", "fix the file"],
    ),
    "deepspeed-config-binary": (
        [*DS, "--deepspeed-config", "{ds_binary}"],
        ["ds_binary.json", "not JSON"],
    ),
    "deepspeed-config-a-list": (
        [*DS, "--deepspeed-config", "{ds_list}"],
        ["ds_list.json", "JSON object"],
    ),
    "deepspeed-config-unknown-key": (
        [*DS, "--deepspeed-config", "{ds_unknown}"],
        ["unknown key(s) zero_optimisation", "valid keys", "zero_optimization", "bf16"],
    ),
    "deepspeed-config-micro-batch": (
        [*DS, "--deepspeed-config", "{ds_micro}"],
        ["train_micro_batch_size_per_gpu = 3", "the flags give 4 (--batch-size)"],
    ),
    "finetune-deepspeed-config-micro-batch": (
        [*FT_DS, "--deepspeed-config", "{ds_micro}"],
        ["train_micro_batch_size_per_gpu = 3", "the flags give 8 (--batch-size)"],
    ),
    "deepspeed-config-global-batch": (
        [*DS, "--deepspeed-config", "{ds_global}"],
        ["train_batch_size = 16", "the flags give 4", "--batch-size x --accumulate x world size"],
    ),
    "deepspeed-config-accumulation": (
        [*DS, "--deepspeed-config", "{ds_accumulate}"],
        ["gradient_accumulation_steps = 2", "the flags give 1", "--accumulate"],
    ),
    "deepspeed-config-clipping": (
        [*DS, "--deepspeed-config", "{ds_clip}"],
        ["gradient_clipping = 1.0", "--grad-clip"],
    ),
    "deepspeed-config-zero-stage": (
        [*DS, "--zero-stage", "1", "--deepspeed-config", "{ds_zero2}"],
        ["zero_optimization.stage = 2", "the flags give 1 (--zero-stage)"],
    ),
    "deepspeed-config-precision": (
        [*DS, "--deepspeed-config", "{ds_bf16}"],
        ["bf16.enabled", "--precision"],
    ),
    "deepspeed-config-optimizer": (
        [*DS, "--deepspeed-config", "{ds_optimizer}"],
        ["'optimizer'", "remove it", "the job builds its optimiser"],
    ),
    "finetune-deepspeed-config-optimizer": (
        [*FT_DS, "--deepspeed-config", "{ds_optimizer}"],
        ["'optimizer'", "remove it", "the job builds its optimiser"],
    ),
    "deepspeed-config-scheduler": (
        [*DS, "--deepspeed-config", "{ds_scheduler}"],
        ["'scheduler'", "remove it", "learning-rate schedule"],
    ),
    # run folders
    "run-folder-locked": (
        [*PRE[:4], "{locked}", *PRE[5:]],
        ["being written by another process", "pid"],
    ),
    "resume-with-other-options": (
        [*PRE[:4], "{started}", *PRE[5:], "--lr", "0.01"],
        ["lr: 0.001 (run) vs 0.01 (now)", "--force-resume"],
    ),
    "resume-ddp-run-with-deepspeed": (
        [*PRE[:4], "{started_ddp}", *PRE[5:], "--steps", "2", "--engine", "deepspeed"],
        ["was started with other options (engine: ddp (run) vs deepspeed (now))", "--force-resume"],
    ),
    "force-resume-ddp-run-with-deepspeed": (
        [*PRE[:4], "{started_ddp}", *PRE[5:], "--steps", "2", "--engine", "deepspeed"]
        + ["--force-resume"],
        ["written by the ddp engine", "uses --engine deepspeed", "--engine ddp"],
    ),
    "complete-with-other-options": (
        [*PRE[:4], "{complete}", *PRE[5:], "--lr", "0.01"],
        ["is complete but was run with other options", "another --out"],
    ),
    # report
    "report-missing": (
        ["report", "--experiment", "{root}/nothing"],
        ["--experiment", "not a folder"],
    ),
    "report-corrupt-metrics": (
        ["report", "--experiment", "{report_corrupt}"],
        ["fold-0/metrics.json", "not valid JSON", "run that fold again"],
    ),
    "report-wrong-shape-metrics": (
        ["report", "--experiment", "{report_wrongshape}"],
        ["not a fine-tuning result"],
    ),
    # demo: refused before anything is packed
    "demo-odd-image-size": (["demo", "--image-size", "33"], ["not divisible", "--image-size 32"]),
    "demo-unknown-model": (["demo", "--models", "unet,vnet"], ["unknown model", "vnet"]),
    "demo-too-few-images": (
        ["demo", "--num-images", "5"],
        ["--num-images 5", "fewer than one pre-training batch"],
    ),
    "demo-inception-too-small": (
        ["demo", "--image-size", "16", "--models", "inception_unet"],
        ["smallest valid size"],
    ),
    "demo-batch-one": (["demo", "--pretrain-batch-size", "1"], ["--pretrain-batch-size", ">= 2"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam")
    return root, _make_world(root)


def _snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_error(world, case):
    root, inputs = world
    args, words = CASES[case]
    argv = [a.format(root=root, **inputs) for a in args]
    env = dict(os.environ, WANDB_MODE="disabled")
    if case == "slurm-absent":
        env["PATH"] = str(inputs["empty_path_dir"])
    lock = FolderLock(PretrainConfig(data=inputs["data"], out=inputs["locked"]).run_dir())
    if case == "run-folder-locked":
        lock.acquire()  # this process is the live writer the command must not disturb
    before = _snapshot(root)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hpc_btunet.submit", *argv],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=100,
        )
    finally:
        lock.release()
    err = done.stderr
    assert done.returncode == 2, (done.returncode, done.stdout, err)
    assert "Traceback" not in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    assert _snapshot(root) == before, "a refused command wrote or removed something"


def test_the_red_team_is_large_enough():
    assert len(CASES) >= 40
