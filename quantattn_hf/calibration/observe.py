"""Watch a model or pipeline run and record the Q, K and V of each attention layer into `CalibrationStats`.

Two ways in, both undone on exit: diffusers attention modules are marked by forward hooks and
`torch.nn.functional.scaled_dot_product_attention` is wrapped so a call inside a marked module is
recorded under its name; transformers models switch to the attention function "quantattn_observe",
which records (K and V before any GQA repeat) and hands over to SDPA (or quantattn's attention).
quantattn's own diffusers processors (which call no SDPA) report through their `observer` hook;
other attention code can call `notify(module, q, k, v)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .stats import CalibrationStats

_SESSIONS: list[_Session] = []
OBSERVE_IMPLEMENTATION = "quantattn_observe"


class _Session:
    """One active observation: the stats to fill, module names by id, the stack of entered attention modules."""

    def __init__(self, stats: CalibrationStats, names: dict[int, str]) -> None:
        self.stats = stats
        self.names = names
        self.stack: list[str] = []
        self.delegate: dict[int, str] = {}

    def enter_hook(self, name: str) -> Callable[..., None]:
        """A forward pre-hook marking `name` as the attention module now running."""

        def hook(*_: Any) -> None:
            self.stack.append(name)

        return hook

    def exit_hook(self, *_: Any) -> None:
        """Forward hook: the innermost attention module has returned (its output is left as is)."""
        self.stack.pop()

    def processor_observer(
        self, processor: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str
    ) -> None:
        """The `observer` hook of quantattn's diffusers processors: they run no SDPA, so they report here."""
        if layout == "BSHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.stack:
            self.stats.record(self.stack[-1], q, k, v)


def notify(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Record one call's [B, H, S, D] operands if an observation is active and knows `module`."""
    if _SESSIONS:
        session = _SESSIONS[-1]
        name = session.names.get(id(module))
        if name is not None:
            session.stats.record(name, q, k, v)


def is_pipeline(target: Any) -> bool:
    """True for a diffusers pipeline (a `components` dict of models), False for a single model."""
    return not isinstance(target, torch.nn.Module) and isinstance(getattr(target, "components", None), dict)


def _is_diffusers_model(module: torch.nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:
        return False
    return isinstance(module, ModelMixin)


def _is_transformers_model(module: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(module, PreTrainedModel)


def models_of(target: Any) -> list[tuple[str, torch.nn.Module]]:
    """(prefix, model) pairs: ("", model) for a model; (component name, model) for a pipeline's diffusers models."""
    if isinstance(target, torch.nn.Module):
        return [("", target)]
    if is_pipeline(target):
        return [
            (name, comp)
            for name, comp in sorted(target.components.items())
            if isinstance(comp, torch.nn.Module) and _is_diffusers_model(comp)
        ]
    raise TypeError(f"expected a torch model or a diffusers pipeline, got {type(target).__name__}")


def layer_name(prefix: str, qualname: str) -> str:
    """The calibration key of a module: its qualified name, after the pipeline component's name."""
    return f"{prefix}.{qualname}" if prefix else qualname


def is_attention_module(module: torch.nn.Module) -> bool:
    """True for diffusers attention modules (`Attention` and the `AttentionModuleMixin` family)."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError:
        return False
    return isinstance(module, (Attention, AttentionModuleMixin))


def attention_layers(target: Any) -> dict[str, torch.nn.Module]:
    """Every module that can be calibrated, by calibration key (all modules of transformers models)."""
    out = {}
    for prefix, model in models_of(target):
        everything = _is_transformers_model(model)
        for qualname, module in model.named_modules():
            if everything or is_attention_module(module):
                out[layer_name(prefix, qualname)] = module
    return out


def _observed_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
):
    """The transformers attention function used while observing: record, then run SDPA (or quantattn's).

    Its masks are SDPA's (boolean), so it hands over to SDPA, or to quantattn's attention when the
    model ran that (which takes the same masks), whatever else the model used before.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    notify(module, query, key, value)
    session = _SESSIONS[-1] if _SESSIONS else None
    original = session.delegate.get(id(module.config)) if session is not None else None
    fn = ALL_ATTENTION_FUNCTIONS[original] if original == "quantattn" else sdpa_attention_forward
    return fn(module, query, key, value, *args, **kwargs)


def _register_observer_function() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(OBSERVE_IMPLEMENTATION, _observed_attention)
    AttentionMaskInterface.register(OBSERVE_IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def _patched_sdpa(session: _Session) -> Iterator[None]:
    """Wrap torch's SDPA so calls inside a marked diffusers attention module are recorded."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        if session.stack:
            session.stats.record(session.stack[-1], query, key, value)
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def observe(target: Any, stats: CalibrationStats | None = None) -> Iterator[CalibrationStats]:
    """Within the block, every attention call of `target` (a model or pipeline) is recorded into `stats`."""
    stats = stats if stats is not None else CalibrationStats()
    layers = attention_layers(target)
    session = _Session(stats, {id(m): name for name, m in layers.items()})
    with contextlib.ExitStack() as stack:
        for name, module in layers.items():
            if is_attention_module(module):
                pre = module.register_forward_pre_hook(session.enter_hook(name))
                post = module.register_forward_hook(session.exit_hook, always_call=True)
                stack.callback(pre.remove)
                stack.callback(post.remove)
                processor = getattr(module, "processor", None)
                if hasattr(processor, "observer"):
                    stack.callback(setattr, processor, "observer", processor.observer)
                    processor.observer = session.processor_observer
        for _, model in models_of(target):
            if _is_transformers_model(model):
                _register_observer_function()
                previous = model.config._attn_implementation
                for sub in model.modules():
                    if _is_transformers_model(sub):
                        session.delegate[id(sub.config)] = sub.config._attn_implementation
                model.set_attn_implementation(OBSERVE_IMPLEMENTATION)
                stack.callback(model.set_attn_implementation, previous)
        stack.enter_context(_patched_sdpa(session))
        _SESSIONS.append(session)
        stack.callback(_SESSIONS.remove, session)
        yield stats
