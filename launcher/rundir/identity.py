"""A run's identity: one short hash of everything that defines its result, and of nothing else.

The plan stamps it on every run (``run_id`` in run.yaml), the manifest keys its entries by it, and
``launcher submit`` compares it to tell a changed config from a resubmission. Placement is left out:
where a run executes (``backend``, ``hostfile``, the ``cluster`` and ``local`` settings), where its
metrics are reported (``logging``) and what the planner estimated about it (``resources.est_mem_gib``,
``est_reserved_gib``, ``fits``: a better memory model is not a new run). So moving an experiment from
``backend: local`` to ``backend: slurm``, or to another partition, resubmits the same runs instead of
reporting them as changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launcher.rundir.run_config import RunConfig

# The id itself, where the run executes and where its metrics go.
EXCLUDED_KEYS: tuple[str, ...] = ("run_id", "backend", "hostfile", "cluster", "local", "logging")
ESTIMATE_KEYS: tuple[str, ...] = ("est_mem_gib", "est_reserved_gib", "fits")
RUN_ID_CHARS = 12
# Options added after runs existed: left out at their default, so those runs keep their ids.
OMITTED_AT_DEFAULT: dict[tuple[str, str], Any] = {
    ("training", "attn_implementation"): "auto",
    ("training", "liger_kernel"): False,
}


def identity_fields(run: RunConfig) -> dict[str, Any]:
    """The run's config as plain data, without placement and estimates."""
    data = run.model_dump(mode="json", exclude=set(EXCLUDED_KEYS))
    for key in ESTIMATE_KEYS:
        data["resources"].pop(key, None)
    for (section, key), default in OMITTED_AT_DEFAULT.items():
        if data.get(section, {}).get(key, default) == default:
            data.get(section, {}).pop(key, None)
    return data


def run_id_of(run: RunConfig) -> str:
    """The same config always gives the same id (sorted keys), on every machine."""
    text = json.dumps(identity_fields(run), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:RUN_ID_CHARS]
