"""lora-train --offload-blocks N: N of the UNet's or transformer's repeated blocks kept off the execution device, each
streamed in for its forward and its backward (as sd-scripts' --blocks_to_swap); the VAE and the frozen text encoders
leave the device once everything they compute is cached.

Which blocks: of the repeated blocks (Backbone.repeated_blocks, those --compile compiles: a UNet's transformer blocks
and resnets, SD3's joint blocks, FLUX's double and single blocks), the N holding the most frozen bytes, the later one
among equals: a DiT's last N blocks, a UNet's widest ones, where N blocks save the most memory.

What moves: a block's frozen tensors only (its parameters and buffers that do not require grad: base layers, norms,
whatever quantized form they hold: bitsandbytes' packed weights as they are, torchao's tensor subclasses by their
inner tensors); the adapters inside it (all their tensors: the trained ones with their gradients and optimizer
state, and their alphas) stay on the device. A parked
tensor keeps its object and its storage object, the storage resized to 0 bytes, as FSDP does; loading resizes it back
and copies its bytes in from a CPU copy (pinned on CUDA) made once, when the run starts, frozen tensors never change.
The tensors autograd saved in the forward share those storages, so they see their data again when the block is
loaded for its backward.

When: a forward pre-hook loads a block and a forward hook parks it (under no_grad too: validation samples). In the
backward a block is loaded when the gradient of its output arrives (a hook on its output tensors), and parked when
the next block to load is loaded, or when the backward ends (an autograd callback). autograd runs a graph's nodes
latest-created first, so when a block's output gradient arrives every node of the blocks after it has run. With
gradient checkpointing the forward that the backward recomputes loads the block (already loaded) and keeps it.

Residency: of the N offloaded blocks, at most one is loaded at a time: the one computing. With prefetch (CUDA: the
next offloaded block in execution order is copied on a side stream while the current one computes), at most two.
So the device holds at most blocks - N + 1 repeated blocks' frozen tensors, blocks - N + 2 with prefetch.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .config import ConfigError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PREFETCH: bool | None = None  # None: on CUDA only (copies overlap compute there; on the CPU they cannot)


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a tensor subclass's inner tensors (torchao)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [leaf for n in names for leaf in _leaves(getattr(t, n))]
    return [t]


def frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    """The plain tensors of a block's frozen parameters and buffers (those that do not require grad), but none of
    its adapters' (their alphas, a frozen adapter's factors: read outside the block's forward, by checkpoints)."""
    from ..layers import LoraWrapper

    adapters = [m.adapters for m in block.modules() if isinstance(m, LoraWrapper)]
    kept = {id(t) for a in adapters for t in (*a.parameters(), *a.buffers())}
    tensors = [t for t in (*block.parameters(), *block.buffers()) if id(t) not in kept and not t.requires_grad]
    return [leaf for t in tensors for leaf in _leaves(t)]


class _Storage:
    """One frozen storage of a block: the device storage (resized to 0 bytes when parked) and its CPU copy."""

    def __init__(self, tensors: list[torch.Tensor], pin: bool):
        first = tensors[0]
        storage = first.untyped_storage()
        if not storage.resizable():  # (a storage over a file mapping, say): tensors re-pointed to a copy of it
            copy = storage.clone()
            with torch.no_grad():
                for t in tensors:
                    t.set_(copy, t.storage_offset(), t.size(), t.stride())
            storage = copy
        self.storage, self.nbytes = storage, storage.nbytes()
        self.cpu = storage.cpu() if storage.device.type != "cpu" else storage.clone()
        if pin:
            self.cpu = self.cpu.pin_memory()

    def park(self) -> None:
        self.storage.resize_(0)

    def load(self, non_blocking: bool) -> None:
        if self.storage.nbytes() == self.nbytes:
            return
        self.storage.resize_(self.nbytes)
        self.storage.copy_(self.cpu, non_blocking=non_blocking)


class _Block:
    def __init__(self, module: nn.Module, name: str, pin: bool):
        self.module, self.name = module, name
        groups: dict[int, list[torch.Tensor]] = {}  # tensors by storage (views share one)
        for t in frozen_tensors(module):
            groups.setdefault(t.untyped_storage()._cdata, []).append(t)
        self.storages = [_Storage(ts, pin) for ts in groups.values()]
        self.loaded, self.ready = True, None  # ready: the CUDA event its prefetch copy records


def _storages(tensors) -> dict[int, int]:
    """Bytes of each storage the tensors use, by storage."""
    return {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}


def choose(blocks: list[tuple[str, nn.Module]], n: int) -> list[tuple[str, nn.Module]]:
    """The n blocks holding the most frozen bytes (the later one among equals), in module order."""
    size = {id(m): sum(_storages(frozen_tensors(m)).values()) for _, m in blocks}
    order = sorted(range(len(blocks)), key=lambda i: (size[id(blocks[i][1])], i), reverse=True)
    return [blocks[i] for i in sorted(order[:n])]


class BlockOffload:
    """N blocks of a model parked off `device`, streamed in by hooks; `close()` loads them back and removes the
    hooks. `prefetch` (default: on CUDA) copies the next offloaded block in while the current one computes."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], device: torch.device, prefetch: bool | None = None):
        device = torch.device(device)
        cuda = device.type == "cuda"
        prefetch = PREFETCH if prefetch is None else prefetch
        self.prefetch = cuda if prefetch is None else prefetch
        self.stream = torch.cuda.Stream(device) if cuda and self.prefetch else None
        self.blocks = [_Block(m, name, pin=cuda) for name, m in blocks]
        self.order: list[_Block] = []  # the offloaded blocks in execution order, as the first forward ran them
        self.current: _Block | None = None  # the offloaded block computing (loaded for its forward or backward)
        self.loads = 0  # how many times a block came in while streaming (tests)
        self._task = None  # the backward whose end-callback is queued
        self._handles = []
        for block in self.blocks:
            self._handles.append(block.module.register_forward_pre_hook(self._hook(self._before_forward, block)))
            self._handles.append(block.module.register_forward_hook(self._hook(self._after_forward, block)))
        for block in self.blocks:
            self._park(block)

    def _hook(self, fn, block):
        @torch._dynamo.disable  # (eager, outside a compiled block's graph)
        def hook(module, args, *output):
            fn(block, *output)

        return hook

    # -- moving bytes ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _plain(self):
        with torch.inference_mode(False), torch.no_grad():  # (a pipeline call runs under inference mode)
            yield

    def _park(self, block: _Block) -> None:
        if not block.loaded:
            return
        if block.ready is not None:  # prefetched, never used: its memory is freed once its copy is done
            torch.cuda.current_stream().wait_event(block.ready)
        with self._plain():
            for s in block.storages:
                s.park()
        block.loaded, block.ready = False, None
        if self.current is block:
            self.current = None

    def _copy_in(self, block: _Block, side: bool) -> None:
        with self._plain():
            if side:  # allocated on the compute stream (freed there too), filled on the side stream once it is free
                for s in block.storages:
                    s.storage.resize_(s.nbytes)
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    for s in block.storages:
                        s.storage.copy_(s.cpu, non_blocking=True)
                    block.ready = self.stream.record_event()
            else:
                for s in block.storages:
                    s.load(non_blocking=self.stream is not None)
        block.loaded = True

    def _load(self, block: _Block) -> None:
        """Load `block` for computing; every other offloaded block is parked first (a prefetched one that is not
        `block` was prefetched in vain). Loading the block already computing again (a block with several outputs,
        gradient checkpointing's recomputation) changes nothing."""
        if block is self.current and block.loaded:
            return
        for other in self.blocks:
            if other is not block:
                self._park(other)
        if not block.loaded:
            self._copy_in(block, side=False)
            self.loads += 1
        if block.ready is not None:  # its prefetch copy: the compute stream waits for it
            torch.cuda.current_stream().wait_event(block.ready)
            block.ready = None
        self.current = block

    def _prefetch(self, block: _Block | None) -> None:
        if not self.prefetch or block is None or block.loaded:
            return
        self._copy_in(block, side=self.stream is not None)
        self.loads += 1

    def _neighbour(self, block: _Block, step: int) -> _Block | None:
        if block not in self.order:
            return None
        i = self.order.index(block) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    # -- hooks ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def _before_forward(self, block: _Block) -> None:
        if block not in self.order and not self._in_backward():
            self.order.append(block)
        self._load(block)
        self._prefetch(self._neighbour(block, -1 if self._in_backward() else 1))

    def _after_forward(self, block: _Block, output) -> None:
        if self._in_backward():  # gradient checkpointing's recomputed forward: the backward runs next
            return
        if torch.is_grad_enabled():
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._grad_hook(block))
        self._park(block)

    def _grad_hook(self, block: _Block):
        def hook(grad):
            self._before_backward(block)

        return hook

    def _before_backward(self, block: _Block) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # once per backward: park whatever is loaded when it ends
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._park_all)
        self._load(block)
        self._prefetch(self._neighbour(block, -1))

    def _park_all(self) -> None:
        self._task = None
        for block in self.blocks:
            self._park(block)

    def close(self) -> None:
        """Every block loaded back, for good, and the hooks removed."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for block in self.blocks:
            if not block.loaded:
                self._copy_in(block, side=False)
            block.storages = []
        if self.stream is not None:
            torch.cuda.current_stream().synchronize()


def offloadable(backbone) -> list[tuple[str, nn.Module]]:
    """The main model's repeated blocks, by module path."""
    names = {id(m): n for n, m in backbone.main.named_modules()}
    return [(names[id(m)], m) for m in backbone.repeated_blocks()]


def check(n: int, backbone) -> list[tuple[str, nn.Module]]:
    """The blocks --offload-blocks n offloads; ConfigError for more blocks than the model has, or for blocks holding
    memory that a tensor outside them holds too."""
    blocks = offloadable(backbone)  # (under FSDP distributed.check has refused offloading before the model loaded)
    if n > len(blocks):
        kind = "UNet" if backbone.objective == "diffusion" else "transformer"
        raise ConfigError("offload_blocks", n, f"it must be at most {len(blocks)}, the repeated blocks of this "
                          f"{backbone.arch} {kind}")  # fmt: skip
    chosen = choose(blocks, n)
    # a storage of an offloaded block that another tensor uses too (tied weights) would vanish under that tensor
    owners: dict[int, str] = {}
    moved: set[int] = set()
    for name, m in chosen:
        for t in frozen_tensors(m):
            moved.add(id(t))
            if owners.setdefault(t.untyped_storage()._cdata, name) != name:
                owners[t.untyped_storage()._cdata] = ""
    inside = {id(x) for _, m in chosen for x in m.modules()}
    others = set()  # the storages of every tensor that stays: outside the chosen blocks, or not frozen inside them
    for m in backbone.main.modules():
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            others |= {x.untyped_storage()._cdata for x in _leaves(t) if id(m) not in inside or id(x) not in moved}
    if "" in owners.values() or owners.keys() & others:
        raise ConfigError("offload_blocks", n, "it cannot offload blocks whose frozen tensors share memory with "
                          "other tensors (tied weights)")  # fmt: skip
    return chosen


class _NoDropout:
    """An rng whose draws never drop a caption (Batcher.caption with caption dropout: the caption when kept)."""

    @staticmethod
    def random() -> float:
        return 1.0


def releasable(cfg, batcher) -> list[str]:
    """The pipeline components that can leave the device once the cache holds what they compute: the VAE when
    latents are cached; the text encoders too when their embeddings are cached (none trains) and every caption is
    known in advance (no caption shuffling; caption dropout adds only the empty caption). Nothing while validation
    samples are drawn: the pipeline needs them all."""
    if not cfg.cache or (cfg.validation_prompt and cfg.validate_every):
        return []
    names = ["vae"]
    if batcher.text is not None and not cfg.shuffle_captions:
        names += [n for n in TEXT_ENCODERS if getattr(batcher.backbone.pipe, n, None) is not None]
    return names


def cache_all(cfg, batchers, text: bool) -> None:
    """Every latent distribution (both flips with --flip) and, with `text`, every caption's embedding, cached now."""
    from tqdm import tqdm

    todo = [(b, i) for b in batchers for i in range(len(b.examples))]
    for batcher, i in tqdm(todo, desc="caching", file=sys.stderr, disable=None):
        for flip in (False, True) if cfg.flip else (False,):
            batcher.latent_dist(i, flip)
        if text:
            prior = batcher is not batchers[0]
            captions = [batcher.caption(batcher.examples[i].caption, _NoDropout, prior)]
            batcher.encode(captions + [""] if cfg.caption_dropout else captions)


class Offload:
    """What --offload-blocks changed in a run: the blocks streamed, and the components moved off the device (to the
    CPU); `close()` undoes both."""

    def __init__(self, blocks: BlockOffload, moved: list[str], pipe, device):
        self.blocks, self.moved, self.pipe, self.device = blocks, moved, pipe, device

    def close(self) -> None:
        self.blocks.close()
        for name in self.moved:
            getattr(self.pipe, name).to(self.device)


def start(cfg, backbone, batchers, device) -> Offload | None:
    """--offload-blocks for a run whose adapters are built: the chosen blocks parked and streamed from now on; the VAE
    and text encoders cached (`batchers`: the instance images' then the class images') and moved to the CPU where
    `releasable` allows. None without --offload-blocks."""
    if not cfg.offload_blocks:
        return None
    chosen = check(cfg.offload_blocks, backbone)
    batchers = [b for b in batchers if b is not None]
    moved = releasable(cfg, batchers[0])
    if moved:
        cache_all(cfg, batchers, text=len(moved) > 1)
        for name in moved:
            getattr(backbone.pipe, name).to("cpu")
    blocks = BlockOffload(chosen, device)
    return Offload(blocks, moved, backbone.pipe, device)
