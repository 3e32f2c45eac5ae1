"""One option vocabulary for every job: flags, YAML files, defaults in --help, strict keys."""

import re

import pytest

from hpc_btunet.errors import UserError
from hpc_btunet.submit import build_parser, main


def parse(*argv):
    from hpc_btunet.config import resolve

    args = build_parser().parse_args(list(argv))
    return resolve(args.config_class, args)


def test_flags_override_file_override_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: shards/x\nbatch-size: 64\nlr: 0.01\nout: exp\n")
    cfg = parse("pretrain", "--config", str(f), "--lr", "0.5")
    assert cfg.batch_size == 64 and cfg.lr == 0.5 and str(cfg.out) == "exp" and cfg.epochs == 20


def test_unknown_key_lists_valid_ones(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nbatchsize: 3\n")
    with pytest.raises(UserError, match="unknown key.*batchsize.*valid keys:.*batch_size"):
        parse("pretrain", "--config", str(f))


def test_wrong_type_and_choice(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nepochs: many\n")
    with pytest.raises(
        UserError, match="c.yaml: epochs must be a whole number, got .many.: fix that key"
    ):
        parse("pretrain", "--config", str(f))
    f.write_text("data: d\noptimizer: sgd\n")
    with pytest.raises(UserError, match="optimizer must be one of adam, lars"):
        parse("pretrain", "--config", str(f))


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_engine_options_in_a_config_file(tmp_path, job):
    f = tmp_path / "c.yaml"
    f.write_text("data: d\nengine: deepspeed\nzero-stage: 2\nprecision: bf16\n")
    cfg = parse(job, "--config", str(f))
    assert (cfg.engine, cfg.zero_stage, cfg.precision) == ("deepspeed", 2, "bf16")
    assert cfg.engine_spec().kind == "deepspeed" and cfg.engine_spec().zero_stage == 2
    f.write_text("data: d\nengine: horovod\n")
    with pytest.raises(UserError, match="engine must be one of ddp, deepspeed"):
        parse(job, "--config", str(f))


@pytest.mark.parametrize("job", ["pretrain", "finetune", "demo"])
def test_help_documents_shared_vocabulary_with_defaults(job, capsys):
    with pytest.raises(SystemExit):
        main([job, "--help"])
    text = capsys.readouterr().out
    for flag in ("--out", "--seed", "--config"):
        assert flag in text
    if job != "demo":
        for flag in ("--data", "--model", "--epochs", "--batch-size", "--lr"):
            assert flag in text
    assert "(default: " in text


def test_missing_data_is_one_clear_error(capsys):
    assert main(["pretrain", "--executor", "debug"]) == 2
    assert "--data is required" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pack", "verify", "pretrain", "finetune", "report", "demo"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    blocks = re.split(r"\n  (?=-)", capsys.readouterr().out)  # one block per option
    for block in (" ".join(b.split()) for b in blocks):  # argparse wraps lines
        assert "(default: None)" not in block and block.count("(default") <= 1, block


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--lr", "nan", "--lr must be a finite number"),
        ("--lr", "inf", "--lr must be a finite number"),
        ("--lr", "0", "--lr must be > 0"),
        ("--num-workers", "-1", "--num-workers must be >= 0"),
        ("--crop-scale", "1.5", "--crop-scale must be > 0 and <= 1"),
    ],
)
def test_numbers_are_checked_where_the_config_is_built(flag, value, message):
    with pytest.raises(UserError, match=message):
        parse("pretrain", "--data", "d", flag, value)
