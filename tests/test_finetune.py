"""The finetune job: pre-trained encoder really loaded, same start for every fold, clear errors."""

import json
from collections import OrderedDict

import pytest
import torch

from hpc_btunet.data.manifest import load_manifest
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model
from hpc_btunet.train import finetune, pretrain


class Custom(OrderedDict):
    pass


SMALL = dict(base_width=4, depth=2, device="cpu")


@pytest.fixture(scope="module")
def encoder_and_data(tmp_path_factory):
    from conftest import ToySource

    from hpc_btunet.data.pack import PackConfig, pack
    from hpc_btunet.data.splits import SplitConfig

    root = tmp_path_factory.mktemp("ft")
    data = root / "data"
    pack(
        ToySource(n=80),
        PackConfig(out=data, image_size=32, splits=SplitConfig(folds=3)),
        log=lambda _: None,
    )
    cfg = pretrain.PretrainConfig(data=data, out=root / "exp", steps=3, batch_size=8, **SMALL)
    return pretrain.run(cfg), data


def cfg_for(data, tmp_path, **kw):
    return finetune.FinetuneConfig(data=data, out=tmp_path, epochs=2, batch_size=4, **(SMALL | kw))


def test_encoder_loaded_before_first_step_and_decoder_fresh(
    encoder_and_data, tmp_path, monkeypatch
):
    encoder_file, data = encoder_and_data
    saved = torch.load(encoder_file, weights_only=True)
    seen = {}
    real_step = torch.optim.Adam.step

    def spy(self, *a, **kw):
        if "encoder" not in seen:
            params = {id(p) for g in self.param_groups for p in g["params"]}
            model = seen["model"]
            assert {id(p) for p in model.parameters()} == params
            # parameters at the first step (BatchNorm running stats have moved in the forward)
            seen["encoder"] = {k: v.detach().clone() for k, v in model.encoder.named_parameters()}
        return real_step(self, *a, **kw)

    real_build = finetune.build_initial_model

    def capture(cfg, manifest):
        seen["model"] = real_build(cfg, manifest)
        seen["built"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
        return seen["model"]

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    monkeypatch.setattr(finetune, "build_initial_model", capture)
    result = json.loads(finetune.run(cfg_for(data, tmp_path, pretrained=encoder_file)).read_text())
    for k, v in seen["encoder"].items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    for k, v in saved.items():  # parameters and buffers, before any forward
        torch.testing.assert_close(seen["built"][f"encoder.{k}"], v, rtol=0, atol=0, msg=k)
    torch.manual_seed(0)
    fresh = build_model("unet", base_width=4, depth=2)
    for k, v in fresh.state_dict().items():
        if not k.startswith("encoder."):  # decoder and head: fresh initialisation, not loaded
            torch.testing.assert_close(seen["built"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(fresh.encoder.state_dict()[k], v) for k, v in saved.items())
    assert result["variant"] == "bt" and result["pretrained"] == str(encoder_file)


def test_every_fold_starts_from_the_same_weights(encoder_and_data):
    encoder_file, data = encoder_and_data
    m = load_manifest(data)
    for pretrained in (None, encoder_file):
        states = [
            finetune.build_initial_model(
                finetune.FinetuneConfig(data=data, fold=k, pretrained=pretrained, **SMALL), m
            ).state_dict()
            for k in range(3)
        ]
        for s in states[1:]:
            assert all(torch.equal(s[k], states[0][k]) for k in s)


def test_metrics_file(encoder_and_data, tmp_path):
    _, data = encoder_and_data
    path = finetune.run(cfg_for(data, tmp_path, fold=2))
    assert path == tmp_path / "finetune" / "unet" / "scratch" / "fold-2" / "metrics.json"
    r = json.loads(path.read_text())
    assert set(r["test"]["mean"]) == set(r["test"]["pooled"]) == {"precision", "dice", "iou"}
    assert r["test"]["images"] == load_manifest(data).counts["test"]
    assert len(r["validation_curve"]) == r["epochs_run"] == 2
    assert 0 <= r["epoch_kept"] < 2 and "both empty" in r["empty_rule"]
    assert {"epoch", "train_loss", "val_loss", "lr"} <= set(r["validation_curve"][0])


def test_predictions_file_matches_the_metrics_and_the_masks(encoder_and_data, tmp_path):
    import numpy as np

    from hpc_btunet.data import make_loader

    _, data = encoder_and_data
    path = finetune.run(cfg_for(data, tmp_path, fold=1))
    r = json.loads(path.read_text())
    saved = np.load(path.parent / r["predictions"])
    manifest = load_manifest(data)
    keys = list(saved["keys"])
    assert sorted(keys) == sorted(manifest.splits["test"]) and len(set(keys)) == len(keys)
    masks = saved["masks"]
    assert masks.dtype == np.uint8 and masks.shape == (len(keys), 32, 32)
    assert set(np.unique(masks)) <= {0, 1}
    for metric in ("precision", "dice", "iou"):
        assert saved[metric].dtype == np.float64 and saved[metric].shape == (len(keys),)
        assert abs(saved[metric].mean() - r["test"]["mean"][metric]) < 1e-12
    # the masks are what the per-image Dice was computed from
    truth = {}
    for batch in make_loader(data, "test", batch_size=8, shuffle=False, drop_last=False):
        for key, mask, pad in zip(batch["key"], batch["mask"], batch["pad"], strict=True):
            if not pad:
                truth[key] = mask[0].numpy().astype(bool)
    for i, key in enumerate(keys):
        pred = masks[i].astype(bool)
        tp, fp, fn = (
            (pred & truth[key]).sum(),
            (pred & ~truth[key]).sum(),
            (~pred & truth[key]).sum(),
        )
        expected = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        assert abs(saved["dice"][i] - expected) < 1e-12, key


def test_a_test_evaluation_cut_by_preemption_leaves_no_predictions(
    encoder_and_data, tmp_path, monkeypatch
):
    import numpy as np

    from hpc_btunet.train.preemption import Preempted, PreemptionWatcher

    _, data = encoder_and_data
    cfg = cfg_for(data, tmp_path)
    stale = cfg.run_dir() / finetune.PREDICTIONS_NAME
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"predictions of an attempt stopped before its metrics.json")
    testing = {"now": False}
    real_evaluate = finetune.evaluate

    def evaluate(*args, **kw):  # the test evaluation is the one that collects predictions
        testing["now"] = len(args) > 5 or "predictions" in kw
        return real_evaluate(*args, **kw)

    def should_stop(self):  # SLURM's warning, in the middle of the test evaluation
        if testing["now"]:
            self.received = 12
        return self.received is not None

    with monkeypatch.context() as m:
        m.setattr(finetune, "evaluate", evaluate)
        m.setattr(PreemptionWatcher, "should_stop", should_stop)
        with pytest.raises(Preempted):
            finetune.run(cfg)
    assert not stale.exists() and not cfg.result_file().exists()
    # the requeued job resumes after the last epoch and evaluates the test split again
    r = json.loads(finetune.run(cfg).read_text())
    saved = np.load(stale)
    assert len(saved["keys"]) == r["test"]["images"] == load_manifest(data).counts["test"]
    assert abs(saved["dice"].mean() - r["test"]["mean"]["dice"]) < 1e-12


def test_bad_pretrained_files(encoder_and_data, tmp_path):
    encoder_file, data = encoder_and_data
    m = load_manifest(data)
    with pytest.raises(UserError, match="does not exist"):
        finetune.build_initial_model(cfg_for(data, tmp_path, pretrained=tmp_path / "nope.pt"), m)

    pickled = tmp_path / "pickled.pt"
    torch.save(Custom(a=torch.zeros(1)), pickled)  # a pickled class that a safe load refuses
    with pytest.raises(UserError, match="weights_only"):
        finetune.build_initial_model(cfg_for(data, tmp_path, pretrained=pickled), m)

    other = tmp_path / "other.pt"  # an encoder of a wider model, with no signature beside it
    torch.save(build_model("unet", base_width=8, depth=2).encoder.state_dict(), other)
    with pytest.raises(UserError, match="shape") as err:
        finetune.build_initial_model(cfg_for(data, tmp_path, pretrained=other), m)
    assert str(other) in str(err.value)
    # with the signature written by pretrain, both models are named
    with pytest.raises(UserError, match="base_width") as err:
        finetune.build_initial_model(
            cfg_for(data, tmp_path, pretrained=encoder_file, base_width=8), m
        )
    assert "'base_width': 4" in str(err.value) and "'base_width': 8" in str(err.value)


def test_fold_out_of_range_and_unlabelled_dataset(encoder_and_data, toy_pack, tmp_path):
    _, data = encoder_and_data
    with pytest.raises(UserError, match="fold 3 is out of range"):
        finetune.run(cfg_for(data, tmp_path, fold=3))
    out, _ = toy_pack(n=20, image_size=32, unlabelled={f"toy-{i:04d}" for i in range(20)})
    with pytest.raises(UserError, match="no labelled subset"):
        finetune.run(cfg_for(out, tmp_path))
