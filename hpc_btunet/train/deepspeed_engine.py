"""The DeepSpeed engine: ``deepspeed.initialize`` with a config generated from the job's flags.

Config. The toolkit's flags decide the micro-batch (``--batch-size``), the global batch, ZeRO's
stage (``--zero-stage 0|1|2``), the precision and gradient clipping; ``--deepspeed-config FILE``
merges a user's JSON over that (communication, bucket sizes, logging, ...). Unknown top-level keys
fail listing the valid ones (those the installed DeepSpeed reads), and a key that contradicts a
flag fails naming both. ZeRO-Offload (``zero_optimization.offload_optimizer`` /
``offload_param`` / ``cpu_offload``) is refused: it steps DeepSpeed's own CPU optimiser, and the job
hands DeepSpeed its own. The file is read as untrusted input (a regular file of bounded size,
strict JSON: no key twice). The merged config is written next to the run's ``config.yaml`` as
``deepspeed.json``.

What DeepSpeed does not do for us, and how this engine makes up for it:

- It broadcasts parameters at start-up, never buffers: BatchNorm running statistics are
  broadcast from rank 0 here, and BatchNorm statistics are global during training, so every rank
  holds the same buffers and the exported weights do not depend on which rank saved them.
- Its bf16/fp16 modes cast the *parameters* to half precision but keep buffers in fp32, which
  ``nn.BatchNorm`` and ``nn.SyncBatchNorm`` cannot run with; every BatchNorm then becomes our
  ``GlobalBatchNorm``, which computes in fp32 (and globally when the world size is above one).
  In fp32, BatchNorm is converted to ``nn.SyncBatchNorm`` on CUDA before ``deepspeed.initialize``
  (converting afterwards fails).
- It does not cast inputs: ``inputs()`` does.
- It loads checkpoints with ``torch.load(weights_only=False)``: this engine's checkpoint reader
  loads them with ``weights_only=True``, allowing only the three DeepSpeed classes its optimiser
  states hold.
- Its CPU backend compiles a shared-memory op with g++ at start-up that only inference uses: it
  is not built, so DeepSpeed on CPU needs no compiler.
- It averages gradients over ranks like DDP, so the Barlow Twins loss's autograd-aware gather
  gives the exact global-batch gradient here too.
- It divides each micro-batch's loss by its gradient-accumulation steps; the job's micro-batch
  losses already give exact gradients (the gradient cache of ``--accumulate``), so ``backward``
  is told not to.
- Its ZeRO 1/2 checkpoints hold each rank's partition of the optimiser state, which DeepSpeed
  (0.19) refuses to load on another world size (only its offline "universal checkpoint"
  conversion re-splits them): such a resume is refused before submission
  (:func:`hpc_btunet.train.session.check_resumable`). ZeRO 0 keeps the whole optimiser state in
  one file and resumes on any world size, as DDP does.

LARS: ZeRO 1 and 2 hand the optimiser flat partitions that mix tensors, where LARS's per-tensor
trust ratios are meaningless; that combination is refused when the config is built
(``PretrainConfig.__post_init__``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpc_btunet import distributed
from hpc_btunet.errors import UserError
from hpc_btunet.global_batchnorm import convert_global_batchnorm
from hpc_btunet.readers import MB, UnreadableFile, loads_json, read_bytes
from hpc_btunet.train.engine import HALF, Engine, EngineSpec, plain

CONFIG_NAME = "deepspeed.json"
# keys of the generated config that belong to the toolkit's flags, and the flag that owns each
OWNED = {
    "train_batch_size": "--batch-size x --accumulate x world size",
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--accumulate (exact: the job hands over gradient-cache losses)",
    "gradient_clipping": "--grad-clip",
    "zero_optimization.stage": "--zero-stage",
    "bf16.enabled": "--precision",
    "fp16.enabled": "--precision",
}
# sections that would replace what the job builds itself
REFUSED = {
    "optimizer": "the job builds its optimiser from its own flags (--lr, ...; see --help)",
    "scheduler": "the job builds its learning-rate schedule from its own flags (see --help)",
}
# ZeRO-Offload's keys in zero_optimization: each runs the optimiser step (and with it the
# optimiser) on the CPU, which DeepSpeed allows only for its own DeepSpeedCPUAdam
OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")  # {"device": "cpu" | "nvme" | "none"}
OFFLOAD_FLAGS = ("cpu_offload", "cpu_offload_param")  # the older booleans
USER_CONFIG_LIMIT = 1 * MB
_JSON_FIX = "fix the file (DeepSpeed reads plain JSON: not JSON5, no comments or trailing commas)"


@contextlib.contextmanager
def environment_kept():
    """DeepSpeed reads and sets variables (``DS_ACCELERATOR``, ``LOCAL_RANK``, ...) while it
    starts; they are put back afterwards, because sbatch passes this process's environment on to
    every job it submits later (a notebook or a test that trained in-process first)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def import_deepspeed(device: torch.device):
    """Import DeepSpeed for ``device`` (its accelerator is chosen once, at import), quietly."""
    try:
        with environment_kept():
            if device.type == "cpu":
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed
    except Exception as e:  # a broken install can fail in many ways at import
        raise UserError(
            f"--engine deepspeed: DeepSpeed cannot be imported here ({type(e).__name__}: {e}); "
            "reinstall it or use --engine ddp"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's CPU backend compiles a shared-memory all-reduce op (g++, at first use) that
    # serves only inference_all_reduce; training never calls it, and a machine without a C++
    # compiler would fail at start-up: the backend is told there is none
    # (by module path: `deepspeed.comm.torch` as an attribute is the torch library)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def generated_config(spec: EngineSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config the flags ask for."""
    return {
        "train_batch_size": spec.batch_size * spec.accumulate * world_size,
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.accumulate,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {
            "enabled": spec.precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
        },
        "zero_allow_untested_optimizer": True,  # our Adam/LARS objects, not DeepSpeed's own
        "steps_per_print": 2**31 - 1,  # the job logs
        "wall_clock_breakdown": False,
    }


@functools.cache
def valid_keys() -> list[str]:
    """The top-level keys the installed DeepSpeed reads from a config (recorded while it parses
    one), so that a misspelled key fails instead of being ignored."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recording(dict):
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):  # `key in config.keys()` is the other way DeepSpeed asks
            return RecordingKeys(self)

    class RecordingKeys:
        def __init__(self, d):
            self.d = d

        def __contains__(self, key):
            return key in self.d

        def __iter__(self):
            return iter(dict.keys(self.d))

        def __len__(self):
            return len(self.d)

    generated = generated_config(EngineSpec(batch_size=1), 1)
    config = Recording(generated)
    with contextlib.suppress(Exception):  # only the keys it looked at matter
        DeepSpeedConfig(config)
    return sorted(seen | set(generated) | set(REFUSED))


def read_user_config(path: Path) -> dict[str, Any]:
    """The ``--deepspeed-config`` file: a regular file of at most 1 MB holding one JSON object,
    read strictly (:mod:`hpc_btunet.readers`: no key given twice, bounded nesting)."""
    path = Path(path)
    where = f"--deepspeed-config {path}"
    if path.is_dir():
        raise UserError(f"{where} is a folder: pass a JSON file")
    try:
        raw = read_bytes(path, USER_CONFIG_LIMIT, "DeepSpeed config")
    except FileNotFoundError:
        raise UserError(f"{where} does not exist: check the path") from None
    except UnreadableFile as e:
        raise UserError(f"--deepspeed-config {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (byte {e.start}): {_JSON_FIX}") from None
    data = loads_json(text, where, _JSON_FIX)
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a JSON object (a mapping of keys)")
    return data


def _refuse_offload(user: dict[str, Any], path: Path) -> None:
    """ZeRO-Offload, which steps DeepSpeed's own CPU optimiser where the job hands it its own."""
    zero = user.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    asked = [
        key
        for key in OFFLOAD_SECTIONS
        if key in zero
        and not (isinstance(zero[key], dict) and str(zero[key].get("device", "none")) == "none")
    ]
    asked += [key for key in OFFLOAD_FLAGS if zero.get(key) not in (None, False)]
    if asked:
        key = asked[0]
        raise UserError(
            f"--deepspeed-config {path} sets zero_optimization.{key} = "
            f"{json.dumps(zero[key])}: ZeRO-Offload steps DeepSpeed's own CPU optimiser "
            "(DeepSpeedCPUAdam), and the job builds its own (--optimizer, --lr); remove "
            f"{key} from the file (to save GPU memory: --zero-stage 2, or a smaller --batch-size)"
        )


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(spec: EngineSpec, world_size: int) -> dict[str, Any]:
    """The generated config with the user's file merged over it; every conflict is refused."""
    config = generated_config(spec, world_size)
    if spec.deepspeed_config is None:
        return config
    path = spec.deepspeed_config
    user = read_user_config(path)
    valid = valid_keys()
    unknown = sorted(set(user) - set(valid))
    if unknown:
        raise UserError(
            f"--deepspeed-config {path}: unknown key(s) {', '.join(unknown)}; valid keys: "
            + ", ".join(valid)
        )
    for key, why in REFUSED.items():
        if key in user:
            raise UserError(f"--deepspeed-config {path} sets {key!r}: remove it; {why}")
    _refuse_offload(user, path)
    for key, value in user.items():
        if isinstance(config.get(key), dict) and not isinstance(value, dict):
            raise UserError(
                f"--deepspeed-config {path}: {key!r} must be a JSON object (like "
                f"{json.dumps(config[key])}), not {json.dumps(value)}"
            )
    ours, theirs = _flatten(config), _flatten(user)
    for key, flag in OWNED.items():
        if key in theirs and theirs[key] != ours[key]:
            raise UserError(
                f"--deepspeed-config {path} sets {key} = {json.dumps(theirs[key])}, but the flags "
                f"give {json.dumps(ours[key])} ({flag}): remove it from the file or change the flag"
            )
    merged = _merge(config, user)
    _validate(merged, path)
    return merged


def _validate(config: dict[str, Any], path: Path) -> None:
    """DeepSpeed's own checks of every section (misspelled nested keys, wrong types), now
    rather than when the job starts. The batch keys were checked above; they are made
    consistent with one process here, as DeepSpeed checks them against the current world."""
    from deepspeed.runtime.config import DeepSpeedConfig

    single = dict(config, train_batch_size=config["train_micro_batch_size_per_gpu"])
    try:
        DeepSpeedConfig(single)
    except Exception as e:  # pydantic's ValidationError, TypeError, AssertionError, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = "; ".join(line for line in lines if "errors.pydantic.dev" not in line)
        raise UserError(
            f"--deepspeed-config {path} is not a valid DeepSpeed config ({detail}): fix the file"
        ) from None


def _safe_loader(checkpoint_engine):
    """DeepSpeed's checkpoint reader with ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, spec: EngineSpec, device: torch.device, placement: distributed.Placement):
        super().__init__(spec, device, placement)
        self.deepspeed = import_deepspeed(device)
        if not distributed.is_distributed():  # DeepSpeed needs a process group, even of one
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                store=dist.HashStore(),
                rank=0,
                world_size=1,
            )
        with environment_kept():
            self.deepspeed.init_distributed(
                dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False
            )
        self.config = build_config(spec, self.world_size)
        self.ds = None

    def config_files(self):
        return {CONFIG_NAME: self.config}

    def close(self) -> None:
        """Leave the process group, and forget the groups DeepSpeed cached on it: a second job
        in this process (the debug executor's next task, a notebook) builds new ones."""
        groups = importlib.import_module("deepspeed.utils.groups")
        for name, value in vars(groups).copy().items():
            if name.endswith("_GROUP") or name.endswith("_GROUP_RANKS") or name == "mesh_device":
                setattr(groups, name, {} if isinstance(value, dict) else None)
        groups.mpu = None
        importlib.import_module("deepspeed.comm.comm").cdb = None
        super().close()

    def meta(self):
        return super().meta() | {"zero_stage": self.spec.zero_stage}

    def _convert_batchnorm(self, module):
        if self.spec.precision in HALF and not self._local_bn:  # half parameters, fp32 buffers
            return convert_global_batchnorm(module)
        return super()._convert_batchnorm(module)

    def prepare(self, module, optimizer, scheduler=None):
        self.module = self._convert_batchnorm(self._place(module))
        self.optimizer, self.scheduler = optimizer, scheduler
        with environment_kept():
            # DeepSpeed asserts LOCAL_RANK is set; the placement exports it for several ranks only
            os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
            self.ds, *_ = self.deepspeed.initialize(
                model=self.module,
                optimizer=optimizer,
                config=self.config,
                dist_init_required=False,
            )
        _safe_loader(self.ds.checkpoint_engine)
        self._broadcast_buffers()
        self.wrapped = self.ds
        return self.ds

    def _broadcast_buffers(self) -> None:
        if self.world_size > 1:
            for buffer in self.module.buffers():
                dist.broadcast(buffer, 0)

    def inputs(self, x):
        x = super().inputs(x)
        return x.to(HALF[self.spec.precision]) if self.spec.precision in HALF else x

    def step(self, loss):
        boundary = self.ds.is_gradient_accumulation_boundary()  # DeepSpeed counts micro-batches
        self.ds.backward(loss, scale_wrt_gas=False)  # the job's micro-batch losses are exact
        self.ds.step()  # at the boundary: clips, unscales, steps and zeroes the gradients
        if not boundary:
            return False
        if self.ds.was_step_applied() and self.scheduler is not None:
            self.scheduler.step()
        self._after_step()
        return True

    def save(self, folder):
        folder = Path(folder)
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        if self.is_main:
            self._save_schedule(folder)

    def load(self, folder):
        folder = Path(folder)
        path, _ = self.ds.load_checkpoint(
            str(folder.parent), tag=folder.name, load_lr_scheduler_states=False
        )
        if path is None:
            raise UserError(f"checkpoint {folder} holds no DeepSpeed state: remove it")
        if self.scheduler is not None:
            self.scheduler.load_state_dict(self._load_state(folder)["scheduler"])

    def export(self):
        """fp32 master weights where DeepSpeed keeps them (gathered from the ZeRO partitions),
        the module's own tensors otherwise; buffers as they are (fp32)."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.module.named_parameters())
        out = {}
        for name, value in self.module.state_dict().items():
            if name in params:
                full = safe_get_full_fp32_param(params[name])
                value = full if full is not None else value
            out[name] = plain(value)
        return out

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """After a backward, before the step: every parameter's full gradient (tests)."""
        from deepspeed.utils import safe_get_full_grad

        return {
            n: safe_get_full_grad(p).detach().float().cpu()
            for n, p in self.module.named_parameters()
        }
