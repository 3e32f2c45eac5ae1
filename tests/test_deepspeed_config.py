"""DeepSpeed's config: what the flags generate, the keys a user's file may set, the merge of that
file over the generated config, and the precision a device can train in. No process group and no
training: each test is a dictionary and a small JSON file."""

from __future__ import annotations

import json

import pytest
import torch

from hpc_btunet.errors import UserError
from hpc_btunet.train.deepspeed_engine import (
    OWNED,
    REFUSED,
    build_config,
    generated_config,
    read_user_config,
    valid_keys,
)
from hpc_btunet.train.engine import EngineSpec, check_precision

CPU = torch.device("cpu")


def spec(**kw) -> EngineSpec:
    return EngineSpec(**({"kind": "deepspeed", "batch_size": 4} | kw))


@pytest.fixture
def user_file(tmp_path):
    """Write a user's --deepspeed-config file; returns its path."""

    def write(content) -> object:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(content))
        return path

    return write


# --- the generated config --------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 3, 8])
def test_generated_batch_is_the_flag_and_global_batch_is_batch_times_world(world):
    config = generated_config(spec(batch_size=5), world)
    assert config["train_micro_batch_size_per_gpu"] == 5
    assert config["train_batch_size"] == 5 * world
    assert config["gradient_accumulation_steps"] == 1
    # the identity DeepSpeed checks: global = micro x accumulation x world
    assert config["train_batch_size"] == (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world
    )


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_generated_zero_stage(stage):
    assert generated_config(spec(zero_stage=stage), 2)["zero_optimization"] == {"stage": stage}


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)],
)
def test_generated_precision_flags(precision, bf16, fp16):
    config = generated_config(spec(precision=precision), 1)
    assert config["bf16"]["enabled"] is bf16
    assert config["fp16"]["enabled"] is fp16


def test_fp16_uses_dynamic_loss_scaling():
    fp16 = generated_config(spec(precision="fp16"), 1)["fp16"]
    assert fp16["enabled"] is True
    assert fp16["loss_scale"] == 0  # 0: dynamic, a fixed scale otherwise


@pytest.mark.parametrize("clip", [0.0, 1.5])
def test_generated_gradient_clipping(clip):
    assert generated_config(spec(grad_clip=clip), 1)["gradient_clipping"] == clip


def test_generated_config_leaves_the_optimiser_and_schedule_to_the_job():
    config = generated_config(spec(), 1)
    assert not set(config) & set(REFUSED)
    assert config["zero_allow_untested_optimizer"] is True  # our Adam/LARS objects


def test_generated_config_is_json_and_every_owned_key_is_in_it():
    config = generated_config(spec(precision="bf16", zero_stage=2, grad_clip=1.0), 4)
    assert json.loads(json.dumps(config)) == config  # it is written as deepspeed.json
    flat = _flatten(config)
    assert set(OWNED) <= set(flat)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


# --- valid keys --------------------------------------------------------------------------------


def test_valid_keys_are_the_keys_deepspeed_reads():
    keys = valid_keys()
    for known in (
        "zero_optimization",
        "bf16",
        "fp16",
        "communication_data_type",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_clipping",
        "steps_per_print",
        "wall_clock_breakdown",
    ):
        assert known in keys, known
    assert "zero_optimisation" not in keys  # a misspelling
    assert "made_up_key" not in keys
    assert keys == sorted(set(keys))


def test_valid_keys_hold_every_generated_key_and_the_refused_sections():
    keys = set(valid_keys())
    assert set(generated_config(spec(), 1)) <= keys
    assert set(REFUSED) <= keys  # refused with their own message, not as unknown


# --- a user's file merged over the generated config ----------------------------------------------


def test_without_a_file_the_config_is_the_generated_one():
    assert build_config(spec(zero_stage=1), 2) == generated_config(spec(zero_stage=1), 2)


def test_a_non_conflicting_key_is_merged_and_the_generated_keys_are_kept(user_file):
    path = user_file({"communication_data_type": "fp32"})
    config = build_config(spec(zero_stage=1, deepspeed_config=path), 2)
    expected = generated_config(spec(zero_stage=1), 2) | {"communication_data_type": "fp32"}
    assert config == expected


def test_nested_keys_are_merged_into_the_generated_sections(user_file):
    path = user_file(
        {"zero_optimization": {"reduce_bucket_size": 1000}, "fp16": {"initial_scale_power": 8}}
    )
    config = build_config(spec(zero_stage=2, precision="fp16", deepspeed_config=path), 1)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    generated = generated_config(spec(zero_stage=2, precision="fp16"), 1)
    for key in set(generated) - {"zero_optimization", "fp16"}:
        assert config[key] == generated[key], key


def test_the_generated_config_is_not_changed_by_a_merge(user_file):
    path = user_file({"zero_optimization": {"reduce_bucket_size": 1000}})
    build_config(spec(deepspeed_config=path), 1)
    assert generated_config(spec(), 1)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize(
    ("content", "flags", "world"),
    [
        ({"train_micro_batch_size_per_gpu": 4}, {}, 1),
        ({"train_batch_size": 8}, {}, 2),
        ({"gradient_accumulation_steps": 1}, {}, 1),
        ({"gradient_clipping": 0.5}, {"grad_clip": 0.5}, 1),
        ({"zero_optimization": {"stage": 2}}, {"zero_stage": 2}, 1),
        ({"bf16": {"enabled": True}}, {"precision": "bf16"}, 1),
        ({"fp16": {"enabled": False}, "bf16": {"enabled": False}}, {}, 1),
    ],
    ids=["micro", "global", "accumulation", "clipping", "zero", "bf16", "fp16-and-bf16-off"],
)
def test_an_owned_key_that_matches_its_flag_is_accepted(user_file, content, flags, world):
    path = user_file(content)
    config = build_config(spec(deepspeed_config=path, **flags), world)
    assert config == generated_config(spec(**flags), world)


# (file content, flags, owned key, the flag the message names)
CONFLICTS = [
    ({"train_batch_size": 16}, {}, "train_batch_size", "--batch-size x --accumulate x world"),
    ({"train_micro_batch_size_per_gpu": 3}, {}, "train_micro_batch_size_per_gpu", "--batch-size"),
    ({"gradient_accumulation_steps": 2}, {}, "gradient_accumulation_steps", "--accumulate"),
    ({"gradient_clipping": 1.0}, {}, "gradient_clipping", "--grad-clip"),
    (
        {"zero_optimization": {"stage": 2}},
        {"zero_stage": 1},
        "zero_optimization.stage",
        "--zero-stage",
    ),
    ({"bf16": {"enabled": True}}, {}, "bf16.enabled", "--precision"),
    ({"fp16": {"enabled": True}}, {"precision": "bf16"}, "fp16.enabled", "--precision"),
    ({"bf16": {"enabled": False}}, {"precision": "bf16"}, "bf16.enabled", "--precision"),
]


def test_every_owned_key_has_a_conflict_case():
    assert {key for _, _, key, _ in CONFLICTS} == set(OWNED)


@pytest.mark.parametrize(
    ("content", "flags", "key", "flag"), CONFLICTS, ids=[c[2] for c in CONFLICTS]
)
def test_a_conflicting_key_is_refused_naming_the_key_and_the_flag(
    user_file, content, flags, key, flag
):
    path = user_file(content)
    with pytest.raises(UserError) as e:
        build_config(spec(deepspeed_config=path, **flags), 1)
    message = str(e.value)
    assert str(path) in message
    assert f"sets {key} = " in message
    assert flag in message
    assert "remove it from the file or change the flag" in message


@pytest.mark.parametrize(
    "content",
    [
        {"zero_optimization": 2},
        {"bf16": True},
        {"zero_optimization": {"stgae": 2}},
        {"bf16": {"enabeld": True}},
    ],
    ids=["section-not-an-object", "flag-not-an-object", "misspelled-nested", "misspelled-bf16"],
)
def test_sections_deepspeed_would_reject_at_job_start_are_refused_now(user_file, content):
    path = user_file(content)
    with pytest.raises(UserError, match="must be a JSON object|not a valid DeepSpeed config"):
        build_config(spec(deepspeed_config=path), 1)


@pytest.mark.parametrize("section", sorted(REFUSED))
def test_the_optimizer_and_scheduler_sections_are_refused(user_file, section):
    path = user_file({section: {"type": "Adam", "params": {"lr": 0.1}}})
    with pytest.raises(UserError) as e:
        build_config(spec(deepspeed_config=path), 1)
    assert repr(section) in str(e.value)
    assert "remove it; the job builds its" in str(e.value)
    assert REFUSED[section] in str(e.value)


def test_an_unknown_key_is_refused_listing_the_valid_keys(user_file):
    path = user_file({"zero_optimisation": {"stage": 1}, "communication_data_type": "fp32"})
    with pytest.raises(UserError) as e:
        build_config(spec(deepspeed_config=path), 1)
    message = str(e.value)
    assert "unknown key(s) zero_optimisation;" in message
    assert "valid keys: " + ", ".join(valid_keys()) in message


def test_unknown_keys_are_listed_together(user_file):
    path = user_file({"b_made_up": 1, "a_made_up": 2})
    with pytest.raises(UserError, match="unknown key\\(s\\) a_made_up, b_made_up;"):
        build_config(spec(deepspeed_config=path), 1)


@pytest.mark.parametrize(
    ("write", "words"),
    [
        (None, "does not exist"),
        (b'{"train_batch_size": ', "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'"zero_optimization"', "must hold a JSON object"),
        (b'{"gradient_clipping": 0.0, "gradient_clipping": 1.0}', "'gradient_clipping' twice"),
        (b"{" * 100 + b"}" * 100, "nests 100 levels deep"),
        (b" " * (2 << 20), "more than a DeepSpeed config may be"),
    ],
    ids=["missing", "truncated", "not-utf8", "list", "string", "duplicate", "deep", "huge"],
)
def test_an_unreadable_file_is_refused(tmp_path, write, words):
    path = tmp_path / "ds.json"
    if write is not None:
        path.write_bytes(write)
    with pytest.raises(UserError) as e:
        read_user_config(path)
    assert words in str(e.value)
    assert f"--deepspeed-config {path}" in str(e.value)
    with pytest.raises(UserError):
        build_config(spec(deepspeed_config=path), 1)


# --- precision on a device ---------------------------------------------------------------------


def test_fp16_on_cpu_is_refused_naming_bf16():
    with pytest.raises(UserError) as e:
        check_precision("fp16", CPU)
    assert "--precision fp16" in str(e.value)
    assert "--precision bf16" in str(e.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_on_cpu_are_accepted(precision):
    check_precision(precision, CPU)


# --- ZeRO-Offload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zero", "key"),
    [
        ({"stage": 1, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer"),
        (
            {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}},
            "offload_optimizer",
        ),
        ({"stage": 1, "offload_param": {"device": "cpu"}}, "offload_param"),
        ({"stage": 1, "offload_optimizer": "cpu"}, "offload_optimizer"),
        ({"stage": 1, "cpu_offload": True}, "cpu_offload"),
    ],
    ids=["optimizer-cpu", "optimizer-nvme", "param", "not-a-section", "old-flag"],
)
def test_zero_offload_is_refused_naming_the_key(user_file, zero, key):
    path = user_file({"zero_optimization": zero})
    with pytest.raises(UserError) as e:
        build_config(spec(zero_stage=zero["stage"], deepspeed_config=path), 1)
    message = str(e.value)
    assert f"sets zero_optimization.{key} = " in message
    assert "ZeRO-Offload" in message and f"remove {key} from the file" in message


def test_offload_to_none_is_no_offload(user_file):
    path = user_file({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "none"}}})
    config = build_config(spec(zero_stage=1, deepspeed_config=path), 1)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "none"}
