"""Where an experiment's results come from, for ``report.md``: the dataset and its manifest
hash, the package version and git revision, engines, world sizes and wall times, collected from
every run folder's ``config.yaml`` (``config``, ``provenance``), the pre-training runs'
``metrics.jsonl`` (``train_seconds``, summed over requeues) and the fine-tuning results
(``train_seconds`` of each run's last start). Every file goes through
:mod:`hpc_btunet.readers`; one it cannot use is left out of the counts ("unknown", "n/a")."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hpc_btunet.errors import UserError
from hpc_btunet.readers import loads_json, open_regular
from hpc_btunet.report.results import MAX_SECONDS, mapping, number_within, read_yaml
from hpc_btunet.report.table import model_order

MAX_LOG_BYTES = 4 << 30  # a pre-training run's metrics.jsonl, read line by line
MAX_LINE_BYTES = 64 << 10  # one logged step; a longer line is skipped


def _counted(values: Counter) -> str:
    if not values:
        return "unknown"
    if len(values) == 1:
        return next(iter(values))
    return ", ".join(f"{v} ({n} runs)" for v, n in sorted(values.items()))


def _pretrain_seconds(folder: Path) -> float | None:
    """The last ``train_seconds`` logged by a finished pre-training run (None for a run of a
    version that did not log it)."""
    seconds = None
    path = folder / "metrics.jsonl"
    try:
        with open_regular(path, MAX_LOG_BYTES, "metrics log") as f:
            for line in _lines(f):
                try:
                    step = loads_json(line, path)
                except UserError:
                    continue
                value = step.get("train_seconds") if isinstance(step, dict) else None
                if _seconds(value):
                    seconds = float(value)
    except (UserError, OSError):
        return None
    return seconds


def _lines(f):
    """The lines of a binary file, each at most ``MAX_LINE_BYTES`` (longer ones are skipped,
    so that memory stays bounded)."""
    while line := f.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
            pass  # the rest of a line too long to be a logged step


def _seconds(value: object) -> bool:
    return number_within(value, 0, MAX_SECONDS)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def provenance(
    experiment: Path,
    results: list[dict],
    record: dict | None,
    data: Path | None,
    current_sha256: str | None,
) -> tuple[list[str], list[str]]:
    """(lines, warnings) for report.md. ``current_sha256``: the manifest's hash of the dataset
    as it is now (None when it is not readable)."""
    stages = {
        "pre-training": sorted(Path(experiment).glob("pretrain/*/config.yaml")),
        "fine-tuning": sorted(Path(experiment).glob("finetune/*/*/fold-*/config.yaml")),
    }
    manifests, versions, revisions, pythons = Counter(), Counter(), Counter(), Counter()
    engines: dict[str, Counter] = {stage: Counter() for stage in stages}
    worlds: dict[str, Counter] = {stage: Counter() for stage in stages}
    for stage, paths in stages.items():
        for path in paths:
            recorded = read_yaml(path)
            prov, config = mapping(recorded, "provenance"), mapping(recorded, "config")
            for counter, value in (
                (manifests, prov.get("manifest_sha256")),
                (versions, prov.get("package_version")),
                (revisions, prov.get("git_revision")),
                (pythons, prov.get("python")),
            ):
                if value:
                    counter[str(value)] += 1
            if config:
                engines[stage][
                    f"{config.get('engine', 'ddp')} ({config.get('precision', 'fp32')})"
                ] += 1
                worlds[stage][str(config.get("world_size", 1))] += 1
    planned = str((record or {}).get("manifest_sha256") or "")[:128]
    hashes = sorted(set(manifests) | ({planned} if planned else set()))
    warnings = []
    if len(hashes) > 1:
        warnings.append(
            f"{len(hashes)} different manifests (datasets) among the runs and the experiment "
            "record: the comparison may mix datasets"
        )
    if current_sha256 and hashes and current_sha256 not in hashes:
        warnings.append(
            f"the dataset at {data} has changed since the runs (manifest sha256 "
            f"{current_sha256[:12]}... now): Fig. 5's images may not be the ones tested"
        )

    def sources(sha: str) -> str:
        where = (["experiment.json"] if sha == planned else []) + (
            [f"{manifests[sha]} run(s)"] if manifests[sha] else []
        )
        return f"{sha} ({', '.join(where)})"

    lines = [
        f"- dataset: {data or 'unknown'}; manifest sha256: "
        + ("; ".join(map(sources, hashes)) or "unknown"),
        f"- package version: {_counted(versions)}; git revision: {_counted(revisions)}; "
        f"python {_counted(pythons)}",
    ]
    for stage in stages:
        if engines[stage]:
            lines.append(
                f"- {stage}: engine {_counted(engines[stage])}; world size "
                f"{_counted(worlds[stage])}"
            )
    pre = []
    finished = {p.parent.name: p.parent for p in Path(experiment).glob("pretrain/*/encoder.pt")}
    for folder in (finished[m] for m in model_order(finished)):
        seconds = _pretrain_seconds(folder)
        pre.append(
            f"{folder.name} "
            + (_duration(seconds) if seconds is not None else "n/a (not logged by its version)")
        )
    lines.append(
        "- wall time of pre-training (training loop, summed over requeues): "
        + ("; ".join(pre) if pre else "no finished pre-training")
    )
    fine = [float(r["train_seconds"]) for r in results if _seconds(r.get("train_seconds"))]
    if fine:
        lines.append(
            f"- wall time of fine-tuning (training and test of each run's last start): "
            f"{_duration(sum(fine))} over {len(fine)} run(s), longest {_duration(max(fine))}"
        )
    return lines, warnings
