"""``torch.distributed``: the plain loop on every rank under ``torchrun``, with DDP or FSDP2.

Each rank runs the documented loop on its share of the global batch; the pipeline's calls
stay where they are. Four calls of this module go around it::

    from steadytrain.adapters import distributed

    dist.init_process_group()                   # torchrun sets the rank and world size
    distributed.log_on_rank_zero()              # structlog events of ranks > 0 are dropped
    pipe = steadytrain.Pipeline.from_config("stability.toml")
    model = DDP(model)                          # or fully_shard(model) (FSDP2)
    distributed.setup(pipe, model, optimizer, total_steps=N)   # instead of pipe.setup
    for x, y in loader:                         # this rank's share of the global batch
        pipe.before_step(batch=x, targets=y)
        logits = model(x)
        loss = pipe.compute_loss(F.cross_entropy(logits, y), outputs={"logits": logits})
        loss.backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()
    distributed.save("ckpt/step-100", pipe, model=model, optimizer=optimizer)

What happens on the ranks:

* regularizer terms are computed per rank in the rank's forward pass and go through its
  one backward, whose gradients DDP averages (FSDP2 reduce-scatters): for terms that are
  means over samples, the same gradient as one process on the global batch;
* ``after_backward`` makes one skip decision for all ranks (the core all-reduces it), so
  a NaN on one rank skips the step everywhere;
* ``pipe.metrics()`` averages every metric over all ranks (the core's metric store
  all-reduces when read): call it on every rank, at the same steps;
* ``grad_clip`` clips each group by the norm of the whole gradient, over every rank's
  shard; ``ema`` averages each rank's shards without gathering them;
* :func:`setup` refuses ranks whose pipelines differ and models it cannot work with;
* :func:`save` and :func:`load` (or :class:`PipelineState` inside your own
  ``torch.distributed.checkpoint`` call) keep sharded state sharded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import torch
import torch.distributed as dist

from steadytrain import CheckpointError, ConfigError, Pipeline, UsageError

__all__ = ["PipelineState", "check_same_config", "load", "log_on_rank_zero", "save", "setup"]

#: The key of the pipeline's state in the checkpoints of :func:`save`.
CHECKPOINT_KEY = "steadytrain"


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    if _initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


# -- logging ------------------------------------------------------------------------------


def _drop_unless_rank_zero(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _rank() != 0:
        raise structlog.DropEvent
    return event


def log_on_rank_zero() -> None:
    """Drop every structlog event on ranks other than 0, steadytrain's and yours.

    Call it once per process, before training (loggers that structlog cached on first use
    keep the processors they had). The processors configured so far stay as they are,
    after the one that drops; calling it again changes nothing. The rank is
    ``torch.distributed``'s once the process group exists and ``$RANK`` (set by
    ``torchrun``) before.
    """
    processors = list(structlog.get_config()["processors"])
    if _drop_unless_rank_zero not in processors:
        structlog.configure(processors=[_drop_unless_rank_zero, *processors])


# -- the same pipeline on every rank ------------------------------------------------------------


def _plain(value: Any) -> Any:
    """*value* as JSON data: attrs instances (options, schedules) field by field."""
    if attrs.has(type(value)):
        fields = {f.name: _plain(getattr(value, f.name)) for f in attrs.fields(type(value))}
        return {"type": type(value).__qualname__, **fields}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _describe(pipe: Pipeline, total_steps: int | None = None) -> dict[str, Any]:
    """What must be the same on every rank: each instance with its settings, in hook order,
    and the run's length."""
    instances = {}
    for key, plugin in pipe.plugins.items():
        selection = getattr(plugin, "filter", None)
        instances[key] = {
            "plugin": getattr(plugin, "name", None) or type(plugin).__qualname__,
            "options": _plain(getattr(plugin, "config", None)),
            "weight": _plain(getattr(plugin, "weight", None)),
            "include": _plain(getattr(selection, "include", None)),
            "exclude": _plain(getattr(selection, "exclude", None)),
        }
    return {"instances": instances, "finite_check": pipe.finite_check,
            "total_steps": total_steps}


def _leaves(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_leaves(item, f"{path}.{key}" if path else key))
        return out
    return {path: value}


def _difference(mine: dict[str, Any], theirs: dict[str, Any], rank: int) -> str:
    """The first setting in which rank *rank*'s description differs from rank 0's."""
    if list(mine["instances"]) != list(theirs["instances"]):
        return (f"rank 0 has the instances {list(mine['instances'])} and rank {rank} has "
                f"{list(theirs['instances'])} (a disable list or $STEADYTRAIN_DISABLE that "
                "differs?)")
    if mine["total_steps"] != theirs["total_steps"]:
        return (f"setup(total_steps=...) is {mine['total_steps']!r} on rank 0 but "
                f"{theirs['total_steps']!r} on rank {rank}")
    flat, other = _leaves(mine, ""), _leaves(theirs, "")
    for path in sorted(flat.keys() | other.keys()):
        if flat.get(path) != other.get(path):
            where = path.removeprefix("instances.").replace(".options.", ".")
            return (f"{where} is {flat.get(path)!r} on rank 0 but {other.get(path)!r} on "
                    f"rank {rank}")
    return "their descriptions differ"  # pragma: no cover - equal leaves, equal digests


def check_same_config(pipe: Pipeline, *, total_steps: int | None = None) -> None:
    """Raise :class:`steadytrain.ConfigError` on every rank unless all ranks built the same
    pipeline: the same instances in the same order, with the same options, weights and
    include/exclude patterns, and the same *total_steps*.

    Every rank must call it (one ``all_gather_object`` of a digest of the settings and the
    settings themselves). A rank whose pipeline differs would compute other terms, clip by
    other thresholds or skip other steps, and the ranks' weights would drift apart.
    """
    if _world_size() == 1:
        return
    description = _describe(pipe, total_steps)
    text = json.dumps(description, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    gathered: list[Any] = [None] * _world_size()
    dist.all_gather_object(gathered, (digest, description))
    differing = [rank for rank, (other, _) in enumerate(gathered) if other != gathered[0][0]]
    if differing:
        first = differing[0]
        digests = ", ".join(f"rank {r}: {d[:12]}" for r, (d, _) in enumerate(gathered))
        raise ConfigError(
            f"the steadytrain pipelines of the ranks differ ({len(differing)} of "
            f"{len(gathered)} ranks differ from rank 0): "
            f"{_difference(gathered[0][1], gathered[first][1], first)}. Start every rank "
            "with the same config, disable list and $STEADYTRAIN_DISABLE, and the same "
            f"total_steps (config digests {digests})"
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters the plugins select: DDP's inner module."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if "torch.distributed.fsdp" in sys.modules:  # else no module can be an FSDP1 wrapper
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise ConfigError(
                "the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
                "parameters hide the names the plugins select by; shard it with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
    return model


def setup(
    pipe: Pipeline,
    model: torch.nn.Module,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    *,
    total_steps: int | None = None,
) -> Pipeline:
    """``pipe.setup(model, optimizers, total_steps=...)`` on every rank of a distributed run.

    First checks that every rank built the same pipeline (:func:`check_same_config`),
    then binds the pipeline to the model: a ``DistributedDataParallel`` wrapper is
    unwrapped, so that patterns name parameters as the model does (``enc.weight``, not
    ``module.enc.weight``); a model sharded with ``fully_shard`` is used as it is. A model
    wrapped in ``FullyShardedDataParallel`` (FSDP1) is refused. Without a process group
    (or with one rank) this is ``pipe.setup``.
    """
    model = _unwrap(model)
    check_same_config(pipe, total_steps=total_steps)
    return pipe.setup(model, optimizers, total_steps=total_steps)


# -- checkpoints ----------------------------------------------------------------------------


def _is_sharded(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _split(state: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DTensors of *state* (a nested dict of the same shape) and everything else."""
    sharded: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        if _is_sharded(value):
            sharded[key] = value
        elif isinstance(value, Mapping):
            inner, rest[key] = _split(value, f"{where}[{key!r}]")
            if inner:
                sharded[key] = inner
        else:
            if isinstance(value, (list, tuple)) and any(_is_sharded(v) for v in value):
                raise CheckpointError(
                    f"{where}[{key!r}] is a sequence holding DTensors; a plugin state keeps "
                    "sharded tensors in dicts, so that each has a name in the checkpoint"
                )
            rest[key] = value
    return sharded, rest


def _merge(rest: dict[str, Any], sharded: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(rest)
    for key, value in sharded.items():
        merged[key] = (_merge(merged.get(key, {}), value) if isinstance(value, Mapping)
                       else value)
    return merged


def _rank_key(rank: int) -> str:
    return f"rank{rank}"


class PipelineState:
    """The pipeline's state in the form ``torch.distributed.checkpoint`` saves and loads.

    A ``Stateful``: put it into the state dict you hand to ``dcp.save`` / ``dcp.load``,
    next to the model and optimizer::

        state = {"app": AppState(model, optimizer), "steadytrain": PipelineState(pipe)}
        dcp.save(state, checkpoint_id=path)
        dcp.load(state, checkpoint_id=path)

    Sharded tensors (DTensors: the EMA average of FSDP2 parameters) are saved as
    ``dcp`` saves sharded tensors, each rank writing its shards. The rest of the state
    (counters, the guard's loss history, averages of unsharded parameters) is saved per
    rank, because ranks see different batches and may keep different states; a run is
    therefore resumed with the number of ranks it was saved with. Loading writes the
    sharded tensors in place, as ``dcp`` loads a model, then hands the state to
    ``pipe.load_state_dict``.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipeline = pipe

    def state_dict(self) -> dict[str, Any]:
        sharded, rest = _split(self.pipeline.state_dict(), "the pipeline state")
        buffer = io.BytesIO()
        torch.save({"world_size": _world_size(), "state": rest}, buffer)
        return {"sharded": sharded, _rank_key(_rank()): buffer.getvalue()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        key = _rank_key(_rank())
        if not isinstance(state.get(key), bytes):
            raise CheckpointError(
                f"the checkpoint holds no pipeline state for rank {_rank()}: it was saved "
                "by fewer ranks; resume with the number of ranks it was saved with"
            )
        saved = torch.load(io.BytesIO(state[key]), weights_only=True)
        if saved["world_size"] != _world_size():
            raise CheckpointError(
                f"the pipeline state was saved by {saved['world_size']} ranks and this run "
                f"has {_world_size()}; per-rank state (such as the guard's loss history) "
                "cannot be redistributed: resume with the number of ranks it was saved with"
            )
        self.pipeline.load_state_dict(_merge(saved["state"], state.get("sharded", {})))


class _TrainingState:
    """Model and optimizer state through ``torch.distributed.checkpoint.state_dict``."""

    def __init__(self, model: torch.nn.Module, optimizers: Any) -> None:
        self.model, self.optimizers = model, optimizers

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizers is None:
            return {"model": get_model_state_dict(self.model)}
        model, optimizer = get_state_dict(self.model, self.optimizers)
        return {"model": model, "optimizer": optimizer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizers is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizers, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"])


def _states(
    pipe: Pipeline, model: torch.nn.Module | None, optimizer: Any
) -> dict[str, Any]:
    if optimizer is not None and model is None:
        raise UsageError("save/load(optimizer=...): pass the model too (model=...)")
    state: dict[str, Any] = {CHECKPOINT_KEY: PipelineState(pipe)}
    if model is not None:
        state["training"] = _TrainingState(model, optimizer)
    return state


def save(
    checkpoint_id: str | os.PathLike[str],
    pipe: Pipeline,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> None:
    """Save the pipeline (and *model* and *optimizer*) with ``torch.distributed.checkpoint``.

    Call it on every rank, between steps. *checkpoint_id* is the checkpoint's folder. The
    model and optimizer go through ``get_state_dict`` (DDP and FSDP2 alike); the pipeline
    is saved as :class:`PipelineState` describes.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(pipe, model, optimizer), checkpoint_id=checkpoint_id)


def load(
    checkpoint_id: str | os.PathLike[str],
    pipe: Pipeline,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> None:
    """Load what :func:`save` wrote into the pipeline (and *model* and *optimizer*).

    Call it on every rank after :func:`setup`, before the first step of the resumed run.
    A checkpoint saved by another number of ranks is refused (see :class:`PipelineState`).
    """
    import torch.distributed.checkpoint as dcp

    path = Path(checkpoint_id)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    ranks = sorted(int(k.rsplit("rank", 1)[1]) for k in keys
                   if k.startswith(f"{CHECKPOINT_KEY}.rank"))
    if not ranks:
        raise CheckpointError(
            f"{path}: no steadytrain pipeline state in this checkpoint; save it with "
            "steadytrain.adapters.distributed.save"
        )
    if len(ranks) != _world_size():
        raise CheckpointError(
            f"{path}: the pipeline state was saved by {len(ranks)} ranks and this run "
            f"has {_world_size()}; resume with {len(ranks)} ranks"
        )
    dcp.load(_states(pipe, model, optimizer), checkpoint_id=checkpoint_id)
