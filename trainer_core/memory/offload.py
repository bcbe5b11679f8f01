"""Group offloading for training: frozen weights live on the CPU and visit the GPU group by group.

Built on diffusers' hook machinery (``diffusers.hooks.HookRegistry`` / ``ModelHook``, the hooks behind
``apply_group_offloading``), but the tensors move with semantics made for *training*, because
diffusers' own offloading is written for inference:

* Only frozen tensors are offloaded. The trainable LoRA weights stay on the device for the whole
  run: the optimizer updates them there and their gradients live there. (diffusers offloads whole
  modules, LoRA included, and with streams even restores weights from a snapshot taken at set-up,
  which would silently undo every optimizer step.)
* Weights are *replaced*, never mutated. Onloading puts a device copy into the module; offloading
  puts the CPU copy back, so offloading a frozen weight copies nothing. Autograd keeps alive the
  device copies it saved for backward, so gradients are exact whatever an op saved (a view of the
  weight or the weight itself). diffusers' ``param.data = ...`` swaps would change tensors that
  autograd already saved, and do nothing at all to quanto weights (tensor subclasses whose data
  sits in inner tensors; ``tests/test_memory.py`` pins this).
* A group is onloaded by whichever member runs first and offloaded once every member has run.
  Gradient checkpointing recomputes blocks one at a time, in reverse order, during backward, and
  may stop a recomputation early (no post-forward call); so onloading a group also offloads the
  other block/leaf groups still resident, which bounds device memory to about one group (two
  with stream prefetching).

Layouts (SimpleTuner's ``group_offload_type``):

* ``block_level``: the items of every ``ModuleList`` / ``Sequential`` (the transformer blocks),
  ``blocks_per_group`` at a time. Everything else is grouped per top-level child (embedders, final
  layers) and onloaded while that child runs.
* ``leaf_level``: every module's own frozen tensors are a group, onloaded while it runs: least
  memory, most transfers.

``use_stream`` (CUDA only) copies the next block group on a side stream while the current one
computes. Recomputation under gradient checkpointing runs blocks in reverse, so the prefetch would
fetch the wrong group: ``check_memory_spec`` turns streams off then, with a warning (as SimpleTuner).

On a CPU-only machine the onload device is the CPU and nothing moves, but the hooks still run, so
the same code paths are exercised; ``poison=True`` (tests) parks meta tensors in the module while a
group is offloaded, so any use of a weight that was not onloaded fails loudly even there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

log = logging.getLogger(__name__)

# diffusers finds hooks registered under this name (``_get_group_onload_device``): pipelines and
# ``ModelMixin.device`` then report the onload device, and ``ModelMixin.to`` refuses to move the model.
HOOK_NAME = "group_offloading"
POISON_DEFAULT = False  # tests flip this to run whole trainings with poisoned offloaded weights


def inner_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a tensor's data (quanto / torchao weights are wrapper subclasses)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        yield t
        return
    names, _ = flatten()
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            yield from inner_tensors(inner)


def _to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in (nested) args/kwargs to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, non_blocking) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


@dataclass
class _Slot:
    """One frozen parameter or buffer: where it sits and its CPU copy."""

    owner: torch.nn.Module
    name: str
    is_param: bool
    stored: torch.Tensor  # the CPU copy (pinned when streaming); the source of every onload
    resting: torch.Tensor  # what the module holds while offloaded: ``stored``, or a meta tensor (poison)

    def put(self, t: torch.Tensor) -> None:
        if self.is_param:
            if not isinstance(t, torch.nn.Parameter):
                t = torch.nn.Parameter(t, requires_grad=False)
            self.owner._parameters[self.name] = t
        else:
            self.owner._buffers[self.name] = t

    def current(self) -> torch.Tensor:
        table = self.owner._parameters if self.is_param else self.owner._buffers
        return table[self.name]


@dataclass(eq=False)
class OffloadGroup:
    """Tensors that are onloaded and offloaded together, and the modules whose forward uses them."""

    name: str
    slots: list[_Slot]
    members: list[torch.nn.Module]
    device: torch.device
    exclusive: bool  # block or leaf group: never nested in another exclusive group's forward
    offloader: GroupOffloader
    stream: Any = None
    next: OffloadGroup | None = None  # prefetched when this group starts (streams only)
    resident: bool = False
    pending: set[int] = field(default_factory=set)
    _event: Any = None

    def onload(self, *, demand: bool) -> None:
        if self.resident:
            return
        if demand and self.exclusive:
            self.offloader.evict_exclusive(keep=(self, self.next if self.stream is not None else None))
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                copies = [s.stored.to(self.device, non_blocking=True) for s in self.slots]
            self._event = self.stream.record_event()
        else:
            copies = [s.stored.to(self.device) for s in self.slots]
        for slot, t in zip(self.slots, copies):
            slot.put(t)
        self.resident = True
        self.pending = {id(m) for m in self.members}

    def wait(self) -> None:
        """Make the compute stream wait for a streamed copy, and tell the allocator it uses it."""
        if self._event is None:
            return
        current = torch.cuda.current_stream()
        current.wait_event(self._event)
        for slot in self.slots:
            for inner in inner_tensors(slot.current()):
                inner.record_stream(current)
        self._event = None

    def offload(self) -> None:
        if not self.resident:
            return
        for slot in self.slots:
            slot.put(slot.resting)
        self.resident = False
        self.pending = set()
        self._event = None

    def finished(self, module: torch.nn.Module) -> None:
        self.pending.discard(id(module))
        if self.resident and not self.pending:
            self.offload()


class _GroupHook(ModelHook):
    """The hook on one module: onload its group before forward, offload it after; move inputs to the device."""

    def __init__(self, group: OffloadGroup | None, device: torch.device, root_of: GroupOffloader | None) -> None:
        super().__init__()
        self.group = group
        self.device = device
        self.root_of = root_of  # set on the root: each top-level call starts with nothing resident
        self.config = SimpleNamespace(onload_device=device)  # what diffusers reads from group-offload hooks

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if self.root_of is not None:
            self.root_of.offload_all()  # drops groups a recomputation left resident during the last backward
        g = self.group
        if g is not None:
            g.onload(demand=True)
            g.wait()
            if g.next is not None and g.stream is not None:
                g.next.onload(demand=False)
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.group is not None:
            self.group.finished(module)
        return output


def _frozen_direct(module: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    out = [(n, p, True) for n, p in module._parameters.items() if p is not None and not p.requires_grad]
    out += [(n, b, False) for n, b in module._buffers.items() if b is not None]
    return out


def _block_lists(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """ModuleList/Sequential containers holding frozen tensors, outermost first, in definition order."""
    found: list[tuple[str, torch.nn.Module]] = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and _has_frozen(child):
                found.append((full, child))
            else:
                walk(full + ".", child)

    walk("", root)
    return found


def _has_frozen(module: torch.nn.Module) -> bool:
    return any(_frozen_direct(m) for m in module.modules())


@dataclass
class OffloadSummary:
    """What was set up; reported in the ``memory`` event."""

    offload_type: str
    groups: int
    offloaded_bytes: int
    use_stream: bool


class GroupOffloader:
    """Group offloading of one module tree (see the module docstring)."""

    def __init__(
        self,
        root: torch.nn.Module,
        onload_device: torch.device,
        *,
        offload_type: str = "block_level",
        blocks_per_group: int = 1,
        use_stream: bool = False,
        offload_device: torch.device | str = "cpu",
        poison: bool | None = None,
    ) -> None:
        if offload_type not in ("block_level", "leaf_level"):
            raise ValueError(f"group_offload_type must be block_level or leaf_level, got {offload_type!r}")
        if use_stream and torch.device(onload_device).type != "cuda":
            raise ValueError("group offload streams need a CUDA onload device")
        self.root = root
        self.device = torch.device(onload_device)
        self.offload_device = torch.device(offload_device)
        self.offload_type = offload_type
        self.blocks_per_group = max(1, int(blocks_per_group))
        self.stream = torch.cuda.Stream(device=self.device) if use_stream else None
        self.poison = POISON_DEFAULT if poison is None else poison
        self.groups: list[OffloadGroup] = []
        self._hooked: list[torch.nn.Module] = []
        self._apply()

    # ------------------------------------------------------------------ set-up
    def _slot(self, owner: torch.nn.Module, name: str, t: torch.Tensor, is_param: bool) -> _Slot:
        stored = t.to(self.offload_device)
        if self.stream is not None and type(stored) in (torch.Tensor, torch.nn.Parameter):
            stored = stored.pin_memory()  # pinned host memory: the only kind copied asynchronously
        if is_param and not isinstance(stored, torch.nn.Parameter):
            stored = torch.nn.Parameter(stored, requires_grad=False)
        resting = stored
        if self.poison:
            resting = torch.empty(t.shape, dtype=t.dtype, device="meta")
            if is_param:
                resting = torch.nn.Parameter(resting, requires_grad=False)
        return _Slot(owner, name, is_param, stored, resting)

    def _group(
        self, name: str, modules: list[torch.nn.Module], members: list[torch.nn.Module], exclusive: bool, deep: bool
    ) -> OffloadGroup | None:
        seen: set[int] = set()
        slots = []
        for module in modules:
            for sub in module.modules() if deep else [module]:
                if id(sub) in self._claimed:
                    continue
                for tname, t, is_param in _frozen_direct(sub):
                    if id(t) in seen:
                        continue
                    seen.add(id(t))
                    slots.append(self._slot(sub, tname, t, is_param))
                self._claimed.add(id(sub))
        if not slots:
            return None
        group = OffloadGroup(name, slots, members, self.device, exclusive, self, stream=self.stream)
        for slot in slots:
            slot.put(slot.resting)
        self.groups.append(group)
        return group

    def _apply(self) -> None:
        self._claimed: set[int] = set()
        hooks: dict[int, tuple[torch.nn.Module, OffloadGroup | None]] = {}
        if self.offload_type == "block_level":
            chain: list[OffloadGroup] = []
            for list_name, container in _block_lists(self.root):
                items = list(container)
                for i in range(0, len(items), self.blocks_per_group):
                    chunk = items[i : i + self.blocks_per_group]
                    group = self._group(f"{list_name}[{i}:{i + len(chunk)}]", chunk, chunk, True, deep=True)
                    if group is None:
                        continue
                    chain.append(group)
                    for member in chunk:
                        hooks[id(member)] = (member, group)
            for prev, nxt in zip(chain, chain[1:]):
                prev.next = nxt
            for name, child in self.root.named_children():
                group = self._group(name, [child], [child], False, deep=True)
                if group is not None:
                    hooks[id(child)] = (child, group)
            group = self._group("<root>", [self.root], [self.root], False, deep=False)
            if group is not None:
                hooks[id(self.root)] = (self.root, group)
        else:
            for name, module in self.root.named_modules():
                leaf = not any(True for _ in module.children())
                group = self._group(name or "<root>", [module], [module], leaf, deep=False)
                if group is not None:
                    hooks[id(module)] = (module, group)
        hooks.setdefault(id(self.root), (self.root, None))  # the root at least moves inputs to the device
        for module, group in hooks.values():
            registry = HookRegistry.check_if_exists_or_initialize(module)
            root_of = self if module is self.root else None
            registry.register_hook(_GroupHook(group, self.device, root_of), HOOK_NAME)
            self._hooked.append(module)
        for p in self.root.parameters():  # trainable weights (the LoRA) live on the device
            if p.requires_grad and p.device != self.device:
                p.data = p.data.to(self.device)
        del self._claimed
        mb = self.nbytes() / 2**20
        log.info("group offload (%s): %d groups, %.1f MB offloaded", self.offload_type, len(self.groups), mb)

    # ------------------------------------------------------------------ use
    def evict_exclusive(self, keep: tuple[OffloadGroup | None, ...]) -> None:
        for g in self.groups:
            if g.exclusive and g.resident and not any(g is k for k in keep):
                g.offload()

    def offload_all(self) -> None:
        for g in self.groups:
            g.offload()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups for s in g.slots for t in inner_tensors(s.stored))

    def summary(self) -> OffloadSummary:
        return OffloadSummary(self.offload_type, len(self.groups), self.nbytes(), self.stream is not None)

    def remove(self) -> None:
        """Undo: every frozen tensor back on the onload device, hooks removed."""
        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        for g in self.groups:
            for s in g.slots:
                s.put(s.stored.to(self.device))
        self.groups = []
        self._hooked = []
