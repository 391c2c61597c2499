"""Multi-process training (DistributedDataParallel under ``torchrun``): process group set-up,
rank helpers and the reductions the training loop needs.

One process per device; ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed` joins the group;
:func:`current` describes this process (rank 0 of 1 when no group is initialised, so every
helper here is a no-op in a single process). :func:`launch_argv` builds the ``torchrun``
command the train stage re-launches itself with.

The global batch of a step is split into contiguous per-rank slices; the loss normalisers
(number of base masks, of images with novel targets, ...) are summed over the ranks by
:class:`GlobalCount`, so that the gradient DDP averages equals the single-process gradient
of the same global batch.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.distributed as dist

from .device import resolve_device

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class DistInfo:
    """This process in the group: rank, world size, rank within its node, and its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """True in a process started by ``torchrun`` (it sets ``LOCAL_RANK``)."""
    return "LOCAL_RANK" in os.environ


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("train.dist_backend is 'nccl' but training runs on the CPU; use 'gloo' or 'auto'")
    return backend


def init_distributed(backend: str = "auto", device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment and pin this process to its
    device (``cuda:LOCAL_RANK`` on CUDA). ``backend``: ``auto`` (nccl on CUDA, else gloo),
    ``nccl`` or ``gloo``; ``device``: ``train.device``. Idempotent."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolve_device(device).type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: train.nproc_per_node must be at most the "
                               f"number of GPUs of a node ({torch.cuda.device_count()})")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(resolve_backend(backend, dev), rank=rank, world_size=world, **kw)
    return DistInfo(rank, world, local_rank, dev)


def current() -> DistInfo:
    """This process's place in the initialised group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = (torch.device("cuda", torch.cuda.current_device())
           if dist.get_backend() == "nccl" else torch.device("cpu"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _reduce_device(like: torch.device | None = None) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors (and CUDA ones, through copies).
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like if like is not None else torch.device("cpu")


def all_reduce_mean(values: Mapping[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """The mean over ranks of each value (float64 tensors; keys reduced in sorted order, so ranks
    must hold the same keys). Identity (as float64 tensors) in a single process."""
    keys = sorted(values)
    if not keys:
        return {}
    first = values[keys[0]]
    like = first.device if torch.is_tensor(first) else None
    dev = _reduce_device(like) if current().distributed else (like or torch.device("cpu"))
    buf = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(dev) for k in keys])
    if current().distributed:
        dist.all_reduce(buf)
        buf = buf / dist.get_world_size()
    return dict(zip(keys, buf.unbind(0)))


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (a list of one in a single process)."""
    info = current()
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average ``.grad`` of ``params`` over the ranks in one all-reduce (for parameters DDP does
    not own, e.g. SimNet in the criterion). A parameter keeps ``grad = None`` when no rank has a
    gradient for it, so the optimizer skips it exactly as in a single process."""
    info = current()
    params = [q for q in params if q.requires_grad]
    if not info.distributed or not params:
        return
    dev = _reduce_device(params[0].device)
    flat = [(q.grad if q.grad is not None else torch.zeros_like(q)).detach().reshape(-1).to(dev, torch.float32)
            for q in params]
    has = torch.tensor([q.grad is not None for q in params], dtype=torch.float32, device=dev)
    buf = torch.cat([*flat, has])
    dist.all_reduce(buf)
    sizes = [q.numel() for q in params]
    chunks = buf[:sum(sizes)].split(sizes)
    for q, g, n in zip(params, chunks, buf[sum(sizes):].tolist()):
        if n == 0:
            q.grad = None
        else:
            avg = (g / info.world_size).view_as(q).to(q.device, q.dtype)
            if q.grad is None:
                q.grad = avg
            else:
                q.grad.copy_(avg)


class GlobalCount:
    """The loss normaliser hook of the criterion in a multi-process run.

    ``total(n)``: the sum of the per-rank counts ``n`` over all ranks (one all-reduce).
    ``self(n)``: ``total(n) / world_size``: dividing each rank's *sum* of a loss term by this
    and letting DDP average the ranks' gradients gives the single-process normalisation
    (sum over the global batch / global count), as MaskFormer does with ``num_masks``.
    Every rank must call it the same number of times in the same order (it is a collective).
    """

    def __init__(self, world_size: int):
        self.world_size = int(world_size)

    def total(self, n, device: torch.device | None = None) -> torch.Tensor:
        like = n.device if torch.is_tensor(n) else device
        dev = _reduce_device(like)
        t = (n.detach().to(dev, torch.float64, copy=True) if torch.is_tensor(n)
             else torch.tensor(float(n), dtype=torch.float64, device=dev))
        dist.all_reduce(t)
        return t.to(like) if like is not None else t

    def __call__(self, n, device: torch.device | None = None) -> torch.Tensor:
        return self.total(n, device) / self.world_size


def launch_argv(nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str, master_port: int,
                module: str, argv: Sequence[str], python: str | None = None) -> list[str]:
    """The ``torchrun`` command (as ``python -m torch.distributed.run``) that runs
    ``python -m module argv...`` in ``nproc_per_node`` processes on this node."""
    return [python or sys.executable, "-m", "torch.distributed.run",
            "--nproc_per_node", str(nproc_per_node), "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--master_addr", str(master_addr), "--master_port", str(master_port),
            "-m", module, *map(str, argv)]


SLURM_ENV = ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_NNODES", "SLURM_JOB_NODELIST")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[07-09,12],cpu1`` -> ``gpu07``), without Slurm:
    what ``scontrol show hostnames`` prints first."""
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):            # the first item of the top-level comma list
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]
    while "[" in item:                          # each bracket: its first number (zero padding kept)
        pre, rest = item.split("[", 1)
        inside, post = rest.split("]", 1)
        first = inside.split(",", 1)[0].split("-", 1)[0]
        item = pre + first + post
    if not item:
        raise ValueError(f"empty Slurm node list {nodelist!r}")
    return item


def slurm_first_host(nodelist: str) -> str:
    """The first host of ``nodelist`` from ``scontrol show hostnames`` (the parser above when
    scontrol is not on PATH)."""
    import shutil
    import subprocess
    if shutil.which("scontrol"):
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
        hosts = r.stdout.split()
        if r.returncode == 0 and hosts:
            return hosts[0]
    return first_host(nodelist)


def node_placement(nnodes: int, node_rank: int, master_addr: str, env: Mapping[str, str] | None = None,
                   first=slurm_first_host) -> tuple[int, str, str]:
    """This node's rank and the rendezvous host of a training over ``nnodes`` nodes:
    ``(node_rank, master_addr, source)``.

    Under Slurm (``SLURM_JOB_ID`` set) with ``nnodes > 1`` they come from Slurm's environment, one
    ``srun`` task per node: ``SLURM_NODEID`` and the first host of ``SLURM_JOB_NODELIST``; the job
    must have ``nnodes`` nodes (``SLURM_NNODES``). ``train.node_rank`` and ``train.master_addr``
    are then not used (source ``slurm``). Elsewhere, or on one node, the params' (source ``params``).
    """
    env = os.environ if env is None else env
    if nnodes <= 1 or not env.get("SLURM_JOB_ID"):
        return node_rank, master_addr, "params"
    missing = [k for k in SLURM_ENV if not env.get(k, "").strip()]
    if missing:
        raise RuntimeError(f"train.nnodes is {nnodes} inside Slurm job {env['SLURM_JOB_ID']}, but "
                           f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start the stage "
                           "once per node with srun (docs/CLUSTER.md)")
    try:
        nodes, rank = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    except ValueError:
        raise RuntimeError(f"Slurm's SLURM_NNODES {env['SLURM_NNODES']!r} / SLURM_NODEID {env['SLURM_NODEID']!r} "
                           "are not integers") from None
    if nodes != nnodes:
        raise RuntimeError(f"train.nnodes is {nnodes} but Slurm job {env['SLURM_JOB_ID']} has {nodes} nodes "
                           f"(SLURM_NNODES): ask sbatch for --nodes={nnodes}, or set train.nnodes: {nodes}")
    if not 0 <= rank < nodes:
        raise RuntimeError(f"Slurm's SLURM_NODEID {rank} is outside 0 .. {nodes - 1}")
    return rank, first(env["SLURM_JOB_NODELIST"]), "slurm"


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA in a process group (made the current
    device), else ``device``."""
    info = current()
    if not info.distributed or device.type != "cuda":
        return device
    dev = torch.device("cuda", info.local_rank)
    torch.cuda.set_device(dev)
    return dev


def wrap_model(model: torch.nn.Module, device: torch.device, find_unused: bool) -> torch.nn.Module:
    """``model`` in DistributedDataParallel. ``find_unused``: let DDP search the graph for
    parameters without a gradient (slower; needed only when a whole family of losses is off)."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def rank_rng_states(device: torch.device) -> dict:
    """Every rank's RNG states, for the checkpoint (so that each rank resumes its own dropout
    stream); ``{}`` in a single process. A collective: every rank calls it."""
    if not current().distributed:
        return {}
    rngs = all_gather_object((torch.get_rng_state(),
                              torch.cuda.get_rng_state() if device.type == "cuda" else None))
    return {"world_size": len(rngs), "rng_cpu_ranks": [r[0] for r in rngs], "rng_cuda_ranks": [r[1] for r in rngs]}


def restore_rank_rng(ck: dict, device: torch.device) -> bool:
    """Set this rank's RNG states from a checkpoint of :func:`rank_rng_states` with the same
    world size; False when there are none to restore (a single process, another world size)."""
    info = current()
    cpu, cuda = ck.get("rng_cpu_ranks"), ck.get("rng_cuda_ranks")
    if not info.distributed or cpu is None or len(cpu) != info.world_size:
        return False
    torch.set_rng_state(cpu[info.rank])
    if device.type == "cuda" and cuda is not None and cuda[info.rank] is not None:
        torch.cuda.set_rng_state(cuda[info.rank])
    return True


def all_true(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise AND of a bool tensor over the ranks (identity in a single process)."""
    if not current().distributed:
        return flags
    t = flags.to(_reduce_device(flags.device), torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.to(flags.device).bool()
