"""A full fine-tune sharded over the processes with torch's FSDP2 (``model.fsdp: true``).

Rank 0 alone reads the MM-DiT's weights; the other processes build it with its parameters on the
meta device (no memory). Each ``QwenImageTransformerBlock`` is one shard unit, then the root; the
weights are broadcast from rank 0 straight into the shards (``set_model_state_dict``,
``broadcast_from_rank0``). So a process holds its shard of the float32 master weights, of the
gradients, of the optimizer state and of the EMA -- one N-th of each -- plus one block gathered at a
time. Gradients are averaged over the processes (reduce-scatter), as DDP averages them, so N
processes at batch b train what one process at batch N x b trains (a 2-process CPU test compares the
weights).

Checkpoints hold every process's shards (``torch.distributed.checkpoint``: ``fsdp/`` in the
checkpoint folder, the model, the optimizer state and the EMA); the rest of the state (sampler
position, LR schedule, RNG, step) goes through accelerate as in every run. A sharded checkpoint
resumes on the same number of processes. The finished weights (and the EMA) are gathered for rank
0, which writes them as a diffusers ``transformer/`` folder.

Why not accelerate's FSDP plugin: accelerate only shards on GPUs (on the CPU it falls back to
DDP), so its path could not be run in the tests; this module uses the same torch API accelerate
calls, on every device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SHARDS = "fsdp"  # the shards' folder inside a checkpoint folder


def build_sharded(path, dtype, device, *, gradient_checkpointing: bool) -> nn.Module:
    """The MM-DiT at ``path``, all weights trainable in float32, sharded block by block over the
    process group (which must be started)."""
    import torch.distributed as dist
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from firered_core.formats.transformer_files import load_transformer

    from .config import ConfigError

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"model.fsdp: {path} is not a diffusers transformer/ folder; a sharded run reads the "
                          "release folder (model.path), not a single file")
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        model = load_transformer(path, dtype=dtype, device="cpu", weight_dtype="dequantize")
        full = model.float().state_dict()
    else:  # parameters on the meta device (plain tensors such as the RoPE tables stay real)
        config = QwenImageTransformer2DModel.load_config(str(path))
        with init_empty_weights(include_buffers=False):
            model = QwenImageTransformer2DModel.from_config(config)
        full = {}
    model.float().requires_grad_(True)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    mesh = init_device_mesh(device.type, (world,))
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if rank != 0:
        model.to_empty(device=device)
    elif device.type != "cpu":
        model.to(device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.train()


def _state(model: nn.Module, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": dict(ema.shadow) if ema is not None else {}}


def save_shards(folder: Path, model: nn.Module, optimizer, ema) -> None:
    """Every process writes its shards of the model, the optimizer state and the EMA into
    ``folder/fsdp`` (a collective: every process calls it)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, ema), checkpoint_id=str(Path(folder) / SHARDS))


def load_shards(folder: Path, model: nn.Module, optimizer, ema) -> None:
    """Restore what :func:`save_shards` wrote into this run's shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from .checkpoint import CorruptCheckpoint

    where = Path(folder) / SHARDS
    if not where.is_dir():
        raise CorruptCheckpoint(where, "missing: the checkpoint was not written by a sharded (model.fsdp) run")
    state = _state(model, optimizer, ema)
    # the model and EMA strictly; the optimizer state partly: a parameter that never had a gradient
    # (the last block's text-stream output feeds nothing) has no Adam state in the checkpoint, while
    # the fresh optimizer here was given a zero state for every parameter (get_state_dict does that)
    dcp.load({"model": state["model"], "ema": state["ema"]}, checkpoint_id=str(where))
    dcp.load({"optim": state["optim"]}, checkpoint_id=str(where),
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # the EMA's shards were read in place: state["ema"] holds ema.shadow's own tensors


def gathered_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (``{}`` on the others; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_ema(ema) -> dict[str, torch.Tensor]:
    """The EMA's whole tensors on every process's CPU (a collective)."""
    return {k: v.full_tensor().cpu() for k, v in ema.shadow.items()}
