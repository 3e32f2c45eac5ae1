"""The launcher's checks, which run before anything is submitted (no SLURM needed here)."""

from pathlib import Path

import pytest
import submitit
from conftest import flip_sample_byte

from hpc_btunet.errors import UserError
from hpc_btunet.launch import LaunchConfig, check_slurm_request, load_profile, parse_slurm_time
from hpc_btunet.submit import main


@pytest.mark.parametrize(
    "text,minutes",
    [
        ("90", 90),
        ("1:30", 2),
        ("2:00:00", 120),
        ("1:30:01", 91),
        ("1-0", 1440),
        ("1-2:03", 1563),
        ("0-00:10:00", 10),
    ],
)
def test_slurm_time_strings(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["1h", "", "1:2:3:4", "-5", "0", "ten"])
def test_bad_time_strings(text):
    with pytest.raises(UserError, match="--time"):
        parse_slurm_time(text)


def test_profile_defaults_and_limits(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "partition: gpu\ngpus_per_node: 4\nmax_nodes: 2\nmax_gpus_per_node: 4\ntime: '1-00:00:00'\n"
        "accounts: [a, b]\nsbatch: {exclusive: true}\n"
    )
    cfg = LaunchConfig(executor="slurm", profile=str(profile), nodes=2, sbatch=["mail-type=END"])
    assert (cfg.partition, cfg.gpus_per_node, cfg.tasks_per_node, cfg.timeout_min) == (
        "gpu",
        4,
        4,
        1440,
    )
    assert cfg.extra == {"exclusive": True, "mail_type": "END"} and cfg.world_size == 8
    assert (
        LaunchConfig(executor="slurm", profile=str(profile), partition="big").partition == "big"
    )  # flags win
    with pytest.raises(UserError, match="--nodes 3 is more than the cluster profile allows"):
        LaunchConfig(executor="slurm", profile=str(profile), nodes=3)
    with pytest.raises(UserError, match="--gpus-per-node 8"):
        LaunchConfig(executor="slurm", profile=str(profile), gpus_per_node=8)
    with pytest.raises(UserError, match="not one of the profile's accounts: a, b"):
        LaunchConfig(executor="slurm", profile=str(profile), account="c")


def test_profile_errors(tmp_path):
    with pytest.raises(UserError, match="not found.*local"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("partitoin: x\n")
    with pytest.raises(UserError, match="unknown key.*partitoin"):
        load_profile(str(bad))
    assert load_profile("local")["partition"] == "debug"


def test_local_executor_limits():
    with pytest.raises(UserError, match="--nodes 2 needs --executor slurm"):
        LaunchConfig(executor="local", nodes=2)
    with pytest.raises(UserError, match="--after needs --executor slurm"):
        LaunchConfig(executor="local", after="123")
    with pytest.raises(UserError, match="KEY=VALUE"):
        LaunchConfig(executor="local", sbatch=["=x"])


def test_slurm_executor_without_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="needs SLURM"):
        check_slurm_request(LaunchConfig(executor="slurm"))
    assert LaunchConfig().executor == "local", (
        "the default executor is local where sbatch is missing"
    )


def test_cli_stops_before_submitting(toy_pack, tmp_path, capsys):
    data, _ = toy_pack(n=40, image_size=32)
    code = main(
        [
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--executor",
            "local",
            "--time",
            "1h",
        ]
    )
    assert code == 2 and "--time '1h' is not a SLURM time" in capsys.readouterr().err
    assert not (tmp_path / "pretrain").exists()
    code = main(
        [
            "finetune",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--executor",
            "local",
            "--folds",
            "9",
        ]
    )
    assert code == 2 and "has 5 folds" in capsys.readouterr().err
    code = main(
        [
            "finetune",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--executor",
            "local",
            "--variants",
            "bt",
        ]
    )
    assert code == 2 and "pretrain --model unet` first" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failed_job_prints_where_its_log_is(toy_pack, tmp_path, capsys):
    # damage that only the job can find: a flipped byte inside a labelled sample's image
    data, manifest = toy_pack(n=40, image_size=32)
    flip_sample_byte(data, manifest, manifest.labelled[0])
    code = main(
        [
            "finetune",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "exp"),
            "--executor",
            "local",
            "--base-width",
            "4",
            "--depth",
            "2",
            "--wait",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "finetune job" in err and "(unet/scratch/fold-0) failed" in err
    assert manifest.labelled[0] in err and "Traceback" not in err
    log = err.split("log: ")[1].split()[0]
    assert manifest.labelled[0] in Path(log).read_text()


def test_sbatch_script_matches_the_recorded_one(monkeypatch):
    import hpc_btunet.launch as launch

    # the text alone is compared: no SLURM is needed (submitit's executor looks for srun)
    monkeypatch.setattr(launch, "check_slurm_request", lambda cfg: None)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    cfg = LaunchConfig(
        executor="slurm",
        profile="example-gpu",
        nodes=4,
        after="123",
        sbatch=["mail-type=END"],
        logs=Path("experiments/x/logs"),
    )
    executor = launch.make_executor(cfg, "pretrain")
    text = executor._executor._make_submission_file_text(
        "python -u -m submitit.core._submit FOLDER", "UID"
    )
    recorded = (Path(__file__).parent / "data" / "sbatch-example-gpu.txt").read_text()
    assert text.replace(str(Path.cwd().resolve()), "<cwd>") == recorded


@pytest.mark.parametrize(
    "job,args,message",
    [
        ("pretrain", ["--data", "missing"], "no packed dataset at missing"),
        ("pretrain", ["--model", "vnet"], "unknown model 'vnet'"),
        ("pretrain", ["--depth", "6"], "not divisible by 64"),
        ("finetune", ["--fold", "7"], "fold 7 is out of range"),
    ],
)
def test_mistakes_stop_before_anything_is_submitted(toy_pack, tmp_path, capsys, job, args, message):
    data, _ = toy_pack(n=40, image_size=32)
    argv = [job, "--data", str(data), "--out", str(tmp_path / "exp"), "--executor", "local", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp").exists(), "no job was started, no folder written"


def test_single_process_run_leaves_the_environment_alone(monkeypatch):
    from hpc_btunet.distributed import PLACEMENT_VARIABLES, init_process_group

    for name in PLACEMENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    placement = init_process_group(use_cuda=False)
    assert placement.world_size == 1
    assert not any(name in __import__("os").environ for name in PLACEMENT_VARIABLES), (
        "jobs submitted later from this process would inherit a wrong placement"
    )


def test_rendezvous_port_is_outside_the_ephemeral_range():
    """Rank 0 listens on a port derived from the job id; one in the kernel's range for the local
    ports of outgoing connections can be taken by any connection on the node (a flaky
    EADDRINUSE). Every task derives the same port; ports stay below the default range and,
    where this machine's range is readable, outside it too."""
    from hpc_btunet.distributed import _port_for

    ports = [_port_for(str(job)) for job in range(20000, 30000)]
    assert ports == [_port_for(str(job)) for job in range(20000, 30000)], "derived alike"
    assert max(ports) < 32768 and min(ports) >= 1024
    assert len(set(ports)) > 5000, "spread over the range"
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except OSError:
        return
    assert not any(low <= p <= high for p in ports)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_debug_executor_reports_a_failing_job_without_a_debugger(toy_pack, tmp_path):
    """submitit's debug executor opens pdb on any error (blocking for good when stdin is a
    pipe); the toolkit's debug executor runs the job in-process and reports like the others."""
    import subprocess
    import sys

    data, manifest = toy_pack(n=40, image_size=32)
    flip_sample_byte(data, manifest, manifest.labelled[0])
    cmd = ["finetune", "--data", str(data), "--out", str(tmp_path / "exp"), "--executor", "debug"]
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", *cmd, "--base-width", "4", "--depth", "2"],
        stdin=subprocess.PIPE,  # never closed: a debugger prompt would wait here
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 2 and "(Pdb)" not in proc.stdout
    assert manifest.labelled[0] in proc.stderr and "Traceback" not in proc.stderr
