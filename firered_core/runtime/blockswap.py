"""Block swapping, for inference and training: the weights of some repeated blocks (the MM-DiT's
``transformer_blocks``, the text encoder's layers) live on the offload device and are copied onto
the compute device just before each block runs, then dropped again.

One component serves both jobs (:class:`BlockSwapper`):

- inference (``training=False``): every tensor of a streamed block streams; the next ``prefetch``
  streamed blocks are copied ahead on a side CUDA stream, so the copy of block i+1 overlaps the
  compute of block i (``runtime.memory`` plans how many blocks stay resident);
- training (``training=True``, :func:`swap_last_blocks`): only *frozen* tensors stream (fp8 weight
  bytes and scales, frozen biases and norms); trainable tensors (LoRA adapters) stay on the device
  with their gradients and optimizer state, so the optimizer never sees a parameter change device.
  No prefetch: under gradient checkpointing the backward pass recomputes the blocks in reverse
  order, and each recomputation runs the block's hooks, which copy its weights in again; the
  copies autograd keeps for the backward of a block are freed when that backward finishes.

Between uses a streamed block points at its offload copy (pinned on CUDA machines), so nothing is
ever copied back: the weights that stream are never changed by the step. On the CPU the same code
path makes synchronous copies and gives bit-identical results (what the tests exercise).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch import nn

from ..model.modules import concrete_device

log = logging.getLogger(__name__)


def _tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner module, "p" / "b", name, tensor) of every parameter and buffer, each owner once."""
    for m in module.modules():
        for n, p in m._parameters.items():
            if p is not None:
                yield m, "p", n, p
        for n, b in m._buffers.items():
            if b is not None:
                yield m, "b", n, b


def module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for _, _, _, t in _tensors(module):
        if id(t) in seen or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def bytes_on(module: nn.Module, device) -> int:
    """Bytes of a module's tensors that sit on ``device`` (what moving it away would free)."""
    device = torch.device(device)
    seen, total = set(), 0
    for _, _, _, t in _tensors(module):
        if id(t) in seen or t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _set(owner: nn.Module, kind: str, name: str, t: torch.Tensor) -> None:
    (owner._parameters if kind == "p" else owner._buffers)[name] = t


def _moved(t: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    out = t.to(device, non_blocking=non_blocking, copy=True)
    if type(t) is nn.Parameter:
        out = nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _pinned(t: torch.Tensor) -> torch.Tensor:
    if type(t) not in (torch.Tensor, nn.Parameter) or t.is_pinned():
        return t
    p = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
    return nn.Parameter(p, requires_grad=t.requires_grad) if type(t) is nn.Parameter else p


def stream_lists(module: nn.Module) -> list[nn.ModuleList]:
    """The ModuleLists of repeated layers to stream in a model: the MM-DiT's ``transformer_blocks``;
    for other models (the text encoder) every ModuleList of 4 or more modules."""
    if hasattr(module, "transformer_blocks"):
        return [module.transformer_blocks]
    out, inside = [], set()
    for _, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 4 and id(m) not in inside:
            out.append(m)
            inside.update(id(x) for x in m.modules())
    return out


def spread_positions(n: int, k: int) -> list[int]:
    """``k`` of the positions ``0..n-1``, evenly spread and ending at the last (the ``j``-th is
    ``floor((j + 1) n / k) - 1``): 4 of 6 are 0, 2, 3, 5; all of them when ``k == n``."""
    return [(j + 1) * n // k - 1 for j in range(k)] if k > 0 else []


class BlockSwapper:
    """Keep ``resident`` blocks of each list on ``device``; stream the others.

    Which ones: for inference the streamed blocks are spread evenly through the list
    (:func:`spread_positions`), so each one's copy overlaps the compute of the resident blocks
    before it. Streaming a contiguous tail instead leaves the copies nothing to hide behind once
    the first streamed block is reached: where a block's copy takes longer than its compute (a
    release block over PCIe: about 14 ms against 5.5 ms on an H100-class card), every streamed
    block stalls. Training streams the last blocks (their backward runs first).

    A streamed block's weights live on the offload device (pinned on CUDA). Its forward pre-hook
    puts device copies in place (copied ahead on a side stream, waited on by the compute stream)
    and starts copying the next ``prefetch`` streamed blocks; its forward post-hook puts the CPU
    tensors back, which frees the device copies. Skipped blocks (step cache) are simply not loaded;
    stale prefetches are dropped. On the CPU the copies are made synchronously -- same code path,
    bit-identical results.

    ``training=True``: only tensors that need no gradient stream (trainable ones stay where they
    are, on the device), and ``prefetch`` is 0 (see the module docstring).
    """

    def __init__(self, root: nn.Module, lists: list[nn.ModuleList] | None = None, *, resident: int = 0,
                 device="cuda", offload_device="cpu", prefetch: int = 1, pin_memory: bool = True,
                 training: bool = False):
        self.root = root
        self.training = bool(training)
        if self.training:
            prefetch = 0
        self.lists = lists if lists is not None else stream_lists(root)
        self.device = concrete_device(device)  # tensors carry the index: "cuda" would never match them
        self.offload_device = concrete_device(offload_device)
        self.resident = int(resident)
        self.prefetch = int(prefetch)
        self.cuda = self.device.type == "cuda"
        self.pin = pin_memory and self.cuda and self.offload_device.type == "cpu"
        self.order: list[nn.Module] = [b for lst in self.lists for b in lst]
        self.streamed: list[int] = []
        for lst_start, lst in self._starts():
            n, k = len(lst), len(lst) - min(self.resident, len(lst))
            positions = range(n - k, n) if self.training else spread_positions(n, k)  # training: the tail
            self.streamed += [lst_start + j for j in positions]
        self._index = {id(b): i for i, b in enumerate(self.order)}
        self._masters: dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
        self._loaded: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self._handles: list[Any] = []
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.copies = 0  # block copies made (for tests / stats)
        self.installed = False

    def _starts(self):
        s = 0
        for lst in self.lists:
            yield s, lst
            s += len(lst)

    def install(self) -> "BlockSwapper":
        if self.installed:
            return self
        streamed_ids = {id(self.order[i]) for i in self.streamed}
        in_streamed = {id(m) for i in self.streamed for m in self.order[i].modules()}
        # everything outside the streamed blocks goes to the device
        for owner, kind, name, t in list(_tensors(self.root)):
            if id(owner) not in in_streamed and t.device != self.device:
                _set(owner, kind, name, _moved(t, self.device))
        for i in self.streamed:
            masters = []
            for owner, kind, name, t in _tensors(self.order[i]):
                if self.training and t.requires_grad:
                    if t.device != self.device:
                        raise ValueError(f"block swap for training: the trainable tensor {name!r} is on {t.device}, "
                                         f"not on the compute device {self.device}; move the model there first")
                    continue
                if self.pin and type(t) in (torch.Tensor, nn.Parameter):
                    m = _pinned(t)  # straight into page-locked memory, one tensor at a time
                else:
                    m = t if t.device == self.offload_device else _moved(t, self.offload_device)
                _set(owner, kind, name, m)
                masters.append((owner, kind, name, m))
            self._masters[i] = masters
        for b in self.order:
            self._handles.append(b.register_forward_pre_hook(self._pre))
            if id(b) in streamed_ids:
                self._handles.append(b.register_forward_hook(self._post))
        self.installed = True
        log.info("block swap: %d of %d blocks resident on %s, %d streamed from %s%s", len(self.order) - len(self.streamed),
                 len(self.order), self.device, len(self.streamed), self.offload_device, " (pinned)" if self.pin else "")
        return self

    def uninstall(self, device=None) -> None:
        """Remove the hooks; every streamed block is left on ``device`` (default: the offload device)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i in list(self._loaded):
            self._restore(i)
        target = concrete_device(device) if device is not None else None
        for i, masters in self._masters.items():
            for owner, kind, name, m in masters:
                _set(owner, kind, name, _moved(m, target) if target is not None and m.device != target else m)
        self._masters.clear()
        self.installed = False

    def offload(self) -> None:
        """Move what is resident (outside-block weights, resident blocks) to the offload device."""
        in_streamed = {id(m) for i in self.streamed for m in self.order[i].modules()}
        for i in list(self._loaded):
            self._restore(i)
        for owner, kind, name, t in list(_tensors(self.root)):
            if id(owner) not in in_streamed and t.device != self.offload_device:
                _set(owner, kind, name, _moved(t, self.offload_device))

    def to_device(self) -> None:
        in_streamed = {id(m) for i in self.streamed for m in self.order[i].modules()}
        for owner, kind, name, t in list(_tensors(self.root)):
            if id(owner) not in in_streamed and t.device != self.device:
                _set(owner, kind, name, _moved(t, self.device))

    # -- the copies ------------------------------------------------------------------------------

    def _start_copy(self, i: int) -> None:
        if i in self._loaded:
            return
        masters = self._masters[i]
        if self.cuda:
            with torch.cuda.stream(self._stream):
                copies = [_moved(m, self.device, non_blocking=True) for _, _, _, m in masters]
                ev = torch.cuda.Event()
                ev.record(self._stream)
        else:
            copies, ev = [_moved(m, self.device) for _, _, _, m in masters], None
        self._loaded[i] = (copies, ev)
        self.copies += 1

    def _upcoming(self, i: int) -> list[int]:
        """The next ``prefetch`` streamed blocks after block ``i``, wrapping to the next forward."""
        s = self.streamed
        if not s:
            return []
        after = [j for j in s if j > i] + [j for j in s if j <= i]
        return after[: self.prefetch]

    def _pre(self, block: nn.Module, args) -> None:
        i = self._index[id(block)]
        wanted = self._upcoming(i)
        if i in self._masters:
            self._start_copy(i)
            copies, ev = self._loaded[i]
            if ev is not None:
                cur = torch.cuda.current_stream(self.device)
                cur.wait_event(ev)
                for c in copies:
                    c.record_stream(cur)
            for (owner, kind, name, _), c in zip(self._masters[i], copies):
                _set(owner, kind, name, c)
            wanted = [i] + wanted
        for j in list(self._loaded):  # drop stale prefetches (blocks the step cache skipped)
            if j not in wanted:
                self._restore(j)
        for j in wanted:
            self._start_copy(j)

    def _restore(self, i: int) -> None:
        self._loaded.pop(i, None)
        for owner, kind, name, m in self._masters[i]:
            _set(owner, kind, name, m)

    def _post(self, block: nn.Module, args, output) -> None:
        self._restore(self._index[id(block)])


HANDLE = "_firered_block_swapper"


def swap_last_blocks(transformer: nn.Module, n_blocks: int, device) -> BlockSwapper:
    """Training: keep the frozen weights of the MM-DiT's last ``n_blocks`` blocks (the ones whose
    backward runs first) on the CPU between uses; ``device`` is where the blocks compute. The
    swapper is kept on the model (``remove_block_swap`` undoes it). ``n_blocks`` in
    ``[0, len(blocks) - 1]`` (config key ``model.blocks_to_swap``)."""
    blocks = transformer.transformer_blocks
    if not 0 <= n_blocks < len(blocks):
        raise ValueError(f"model.blocks_to_swap must be in [0, {len(blocks) - 1}], got {n_blocks}")
    remove_block_swap(transformer, device)
    swapper = BlockSwapper(transformer, [blocks], resident=len(blocks) - n_blocks, device=device, training=True)
    transformer.__dict__[HANDLE] = swapper.install()
    return swapper


def remove_block_swap(transformer: nn.Module, device) -> None:
    """Remove a :func:`swap_last_blocks` swapper and put every swapped tensor back on ``device``."""
    swapper = transformer.__dict__.pop(HANDLE, None)
    if swapper is not None:
        swapper.uninstall(device)
