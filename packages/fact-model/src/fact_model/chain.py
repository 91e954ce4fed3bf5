"""A backbone's forward pass as a chain of named steps, to run it from or up to any chain point.

The concept head of a FaCT layer (``codes -> logits``, what the deletion metric perturbs) is the
part of the network after that layer. B-cos models are chains at some granularity (ResNet: stem,
stages, classifier, pooling, logit layer; DenseNet: the ``features`` sequence, classifier, ...;
ViTc: stem, positional embedding, encoders, pooling, head), so the head is "the steps after the
layer". :func:`forward_chain` describes a model as such a chain -- recursively, every
``nn.Sequential`` is expanded into its children -- and the *points* of the chain are the module
names whose output alone determines the rest of the forward pass (``layer4``, ``layer3.5``,
``features.transition2``, ``0.transformer.encoder_8``, ...). A module inside a residual block is
not a point: its output does not determine the logits without the shortcut.

Register a builder for other architectures with :func:`register_chain`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from bcos_layers.models.densenet import BcosDenseNet
from bcos_layers.models.resnet import BcosResNet
from bcos_layers.models.vit import SimpleViT

__all__ = ["ForwardChain", "Step", "forward_chain", "register_chain"]


class Step(NamedTuple):
    """One step of a forward chain: ``fn`` maps the running tensor to the next one.

    ``name`` is the qualified module name when the step is a module call whose output is a
    chain point, else ``None`` (e.g. a pooling written as a function in ``forward``).
    """

    name: str | None
    fn: Callable[[Tensor], Tensor]


ChainBuilder = Callable[[nn.Module, str], list[Step]]
_BUILDERS: dict[type[nn.Module], ChainBuilder] = {}


def register_chain(cls: type[nn.Module], builder: ChainBuilder) -> None:
    """Describe the forward pass of ``cls`` (and subclasses) as steps.

    ``builder(module, prefix)`` returns the steps of ``module.forward`` (without input checks),
    naming each module step ``prefix + child_name``; use :func:`expand` for a child to let it be
    expanded recursively. The chain of every registered model is tested to reproduce
    ``module(x)`` exactly (see ``tests/test_fact_model_chain.py``).
    """
    _BUILDERS[cls] = builder


def _builder_for(module: nn.Module) -> ChainBuilder | None:
    for cls in type(module).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls]
    return None


def expand(module: nn.Module | None, name: str) -> list[Step]:
    """The steps of ``module`` called ``name``: expanded if a builder knows its type, else one step."""
    if module is None:
        return []
    builder = _builder_for(module)
    if builder is None:
        return [Step(name, module)]
    steps = builder(module, f"{name}." if name else "")
    # The module's own name marks the end of its steps (its output).
    if name:
        steps.append(Step(name, _identity))
    return steps


def _identity(x: Tensor) -> Tensor:
    return x


def _sequential(module: nn.Module, prefix: str) -> list[Step]:
    steps: list[Step] = []
    for child_name, child in module.named_children():
        steps += expand(child, prefix + child_name)
    return steps


def _resnet(m: nn.Module, p: str) -> list[Step]:
    assert isinstance(m, BcosResNet)
    steps = expand(m.conv1, p + "conv1") + expand(m.bn1, p + "bn1")
    if m.pool is not None:
        steps += expand(m.pool, p + "pool")
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        steps += expand(getattr(m, stage), p + stage)
    return [
        *steps,
        *expand(m.fc, p + "fc"),
        *expand(m.avgpool, p + "avgpool"),
        Step(None, lambda x: torch.flatten(x, 1)),
        *expand(m.logit_layer, p + "logit_layer"),
    ]


def _densenet(m: nn.Module, p: str) -> list[Step]:
    assert isinstance(m, BcosDenseNet)
    return [
        *expand(m.features, p + "features"),
        *expand(m.classifier, p + "classifier"),
        Step(None, lambda x: torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)),
        *expand(m.logit_layer, p + "logit_layer"),
    ]


def _vit(m: nn.Module, p: str) -> list[Step]:
    assert isinstance(m, SimpleViT)
    pos = m.positional_embedding

    def add_positions(x: Tensor) -> Tensor:
        # SimpleViT.forward_tokens: tokens (B, h, w, D) -> (B, h*w, D) + fixed sin-cos embedding.
        return x.flatten(1, 2) + pos(x)

    return [
        *expand(m.to_patch_embedding, p + "to_patch_embedding"),
        Step(None, add_positions),
        *expand(m.transformer, p + "transformer"),
        Step(None, lambda x: x.mean(dim=1)),
        *expand(m.to_latent, p + "to_latent"),
        *expand(m.linear_head, p + "linear_head"),
    ]


register_chain(nn.Sequential, _sequential)
register_chain(BcosResNet, _resnet)
register_chain(BcosDenseNet, _densenet)
register_chain(SimpleViT, _vit)


class ForwardChain:
    """``model``'s forward pass as steps, with the index after which each point's output exists."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps = expand(model, "")
        self.points: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            if step.name is not None:
                self.points[step.name] = i + 1  # last occurrence = the module's output

    def __contains__(self, name: str) -> bool:
        return name in self.points

    def run(self, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run steps ``start .. stop - 1`` on ``x``."""
        for step in self.steps[start:stop]:
            x = step.fn(x)
        return x

    def index(self, name: str) -> int:
        """Number of steps after which the tensor is ``name``'s output."""
        if name not in self.points:
            raise ValueError(
                f"{name!r} is not a point of the forward chain of {type(self.model).__name__}: "
                "its output alone does not determine the logits (e.g. a module inside a "
                f"residual block). Chain points: {self.summary()}"
            )
        return self.points[name]

    def tail(self, name: str, x: Tensor) -> Tensor:
        """The rest of the network after ``name``, applied to ``x`` (= ``name``'s output)."""
        return self.run(x, start=self.index(name))

    def prefix(self, name: str, x: Tensor) -> Tensor:
        """The network up to and including ``name``, applied to the input ``x``."""
        return self.run(x, stop=self.index(name))

    def summary(self, limit: int = 12) -> str:
        """A short list of the chain points (the coarsest first)."""
        names = sorted(self.points, key=lambda n: (n.count("."), self.points[n]))
        more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more


def forward_chain(model: nn.Module) -> ForwardChain:
    """The :class:`ForwardChain` of ``model`` (built from its current module tree)."""
    return ForwardChain(model)
