"""Hook points: named places in the forward pass where a tensor can be read or replaced.

A HookPoint is an identity module. The root module walks its submodules once to name every HookPoint by its
module path ("blocks.3.mlp.hook_topk_indices"), as TransformerLens does. A hook function receives the tensor
and the HookPoint and may return a replacement, which then flows downstream.

A HookPoint with no functions attached returns its input untouched, and modules check `hook.active` before
computing anything that exists only to be observed (the attention pattern, per-expert outputs), so hooks
that nobody asked for cost nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = str | Iterable[str] | Callable[[str], bool] | None


class HookPoint(nn.Module):
    """An identity module that calls the hook functions attached to it."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = "<unnamed>"
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.fns:
            replacement = fn(x, self)
            if replacement is not None:
                if not isinstance(replacement, torch.Tensor):
                    raise TypeError(f"hook on {self.name} returned {type(replacement).__name__}, not a tensor")
                if replacement.shape != x.shape:
                    raise ValueError(
                        f"hook on {self.name} returned shape {tuple(replacement.shape)}; "
                        f"it must keep the shape {tuple(x.shape)}"
                    )
                x = replacement
        return x

    def extra_repr(self) -> str:
        return self.name


class ActivationCache(dict):
    """Activations by hook name, as returned by `run_with_cache`. A missing name suggests close ones."""

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return super().__getitem__(name)
        except KeyError:
            close = difflib.get_close_matches(name, list(self.keys()), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"{name!r} is not in this cache ({len(self)} hooks cached){hint}") from None


class HookedModule(nn.Module):
    """Mixin for the root module: the name table, scoped hooks and caching runs."""

    def setup_hooks(self) -> None:
        """Name every HookPoint by its module path. Call at the end of the root's __init__."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hooks_active(self) -> bool:
        """Whether any hook function is attached (the fused kernels and CUDA graphs run only when none is)."""
        return any(point.fns for point in self.hook_dict.values())

    def hook_names(self) -> list[str]:
        """Every hook name, in module order (blocks in layer order)."""
        return list(self.hook_dict)

    def resolve_hook_names(self, names: NameFilter) -> list[str]:
        """Hook names from a name, a list of names or a predicate (None means all). Unknown names raise."""
        if names is None:
            return self.hook_names()
        if callable(names):
            return [name for name in self.hook_dict if names(name)]
        if isinstance(names, str):
            names = [names]
        names = list(names)
        for name in names:
            self._check_hook_name(name)
        return names

    def _check_hook_name(self, name: str) -> None:
        if name in self.hook_dict:
            return
        close = difflib.get_close_matches(name, self.hook_names(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See model.hook_names()."
        raise KeyError(f"unknown hook name {name!r}.{hint}")

    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], HookFn]]) -> Iterator[HookedModule]:
        """Attach hooks for the duration of a `with` block.

        fwd_hooks: pairs (name or predicate on names, fn); fn(tensor, hook) may return a replacement tensor.
        All names are checked before any hook is attached; every hook is removed on exit, even on error.
        """
        attached: list[tuple[HookPoint, HookFn]] = []
        pairs = []
        for name, fn in fwd_hooks:
            if not callable(fn):
                raise TypeError(f"the hook for {name!r} must be callable, got {type(fn).__name__}")
            targets = self.resolve_hook_names(name)
            pairs.extend((target, fn) for target in targets)
        try:
            for target, fn in pairs:
                point = self.hook_dict[target]
                point.fns.append(fn)
                attached.append((point, fn))
            yield self
        finally:
            for point, fn in reversed(attached):
                point.fns.remove(fn)

    def run_with_cache(
        self, input_ids: torch.Tensor, names: NameFilter = None, detach: bool = True, **forward_kwargs
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Run the model and keep the activations at `names` (all hooks when None).

        Returns (logits [B, T, vocab], cache) with cache[name] the tensor that flowed through that hook.
        Asking for the attention pattern or per-expert outputs makes the model compute them; other hooks are
        views of tensors computed anyway.
        """
        cache = ActivationCache()

        def keep(tensor: torch.Tensor, hook: HookPoint) -> None:
            cache[hook.name] = tensor.detach() if detach else tensor

        hook_pairs = [(name, keep) for name in self.resolve_hook_names(names)]
        with torch.set_grad_enabled(not detach and torch.is_grad_enabled()), self.hooks(hook_pairs):
            logits = self(input_ids, **forward_kwargs)
        return logits, cache
