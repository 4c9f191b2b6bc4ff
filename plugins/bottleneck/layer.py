"""The torch side of bottleneck adapters: the adapter module, the per-site container, and the hooks.

Math (AdapterHub ``methods/modeling.py`` ``Adapter`` / ``ParallelAdapter`` and
``methods/bottleneck.py`` ``BottleneckLayer``, adapters 1.3). At a site the
model computes ``LN(h + r)`` (post-LN, BERT) or ``r + h`` (pre-LN, Llama,
GPT-2), with ``h`` the sub-layer's output and ``r`` its residual input. With
the adapter (``A(x) = dropout(scale * up(act(down(ln_before(x)))))``):

sequential::

    res = h                                  # residual_before_ln=True
    x = LN(h + r) if original_ln_before      # just h + r in pre-LN models ("post_add": res = h + r)
    res = x                                  # residual_before_ln=False
    out = ln_after(A(x) + res) if adapter_residual_before_ln else ln_after(A(x)) + res
    final = LN(out + r) if original_ln_after else out     # out + r in pre-LN models

parallel::

    out = ln_after(A(r)) + h
    final = LN(out + r) if original_ln_after else out     # out + r in pre-LN models

Several adapters at one site run as AdapterHub's ``Stack``: each adapter's
``pre`` and ``forward`` in turn, the last one's ``post``. A runtime composition
(``adapterkit.activate``, ``BottleneckSite.composition``) runs AdapterHub's
``compose_stack`` / ``compose_average`` instead: a stack as above over its
children; an average (or weighted sum) applies the first member's ``pre`` once,
runs each child on that input and residual, and combines the outputs as
``mean_i(w_i * out_i)`` (AdapterHub's ``torch.mean(stack * w)``; ``sum_i`` for
a weighted sum); the last member's ``post`` closes the site.

Injection never replaces a module of the model, so module paths (and every
other method's canonical keys) stay what they are: a :class:`BottleneckSite`
holding the name-keyed adapters is added as the child ``bottleneck_attention``
or ``bottleneck_ffn`` of the module that holds the site's layer norm (the BERT
block, the Llama / GPT-2 decoder layer), and forward hooks apply it:

- post-LN blocks (BERT ``BertSelfOutput`` / ``BertOutput``: ``dense``,
  ``dropout``, ``LayerNorm``): a hook on ``dropout`` keeps ``h``, a hook on the
  block replaces its output ``LN(h + r)`` with ``final``;
- pre-LN layers (Llama ``self_attn`` / ``mlp``, GPT-2 ``attn`` / ``mlp``): a
  pre-hook on the sub-layer's pre-norm keeps ``r``, a hook on the sub-layer
  replaces ``h`` with ``final - r`` (the layer adds ``r`` itself).

Adapter weights are plain parameters (no ``nn.Linear``), so LoRA's
``all-linear`` never picks them up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

LN_EPS = 1e-5  # nn.LayerNorm's default, as AdapterHub builds its adapter layer norms

POST_LN = "post_ln"
PRE_LN = "pre_ln"


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


#: transformers' ACT2FN functions, as AdapterHub calls them through get_activation
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_fast,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "swish": F.silu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": F.leaky_relu,
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "relu2": lambda x: torch.square(F.relu(x)),
    "mish": F.mish,
    "linear": lambda x: x,
}


class Affine(nn.Module):
    """A weight and a bias (a linear map or a layer norm's affine), deliberately not an ``nn.Linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)


class BottleneckAdapter(nn.Module):
    """One named adapter at one site: down ``[size, hidden]``, up ``[hidden, size]``, optional norms and scale.

    Parameter names (``down.weight``, ``up.bias``, ``ln_before.weight``, ``scale`` ...) are the
    ``<param>`` part of the canonical keys.
    """

    def __init__(self, hidden: int, size: int, config: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None):
        super().__init__()
        self.hidden, self.size = hidden, size
        self.parallel = bool(config["parallel"])
        self.non_linearity = config["non_linearity"]
        self.activation = ACTIVATION_FUNCTIONS[self.non_linearity]
        self.original_ln_before = bool(config["original_ln_before"])
        self.original_ln_after = bool(config["original_ln_after"])
        self.residual_before_ln = config["residual_before_ln"]
        self.adapter_residual_before_ln = bool(config["adapter_residual_before_ln"])
        self.dropout = float(config["dropout"])
        kw = {"dtype": dtype, "device": device}
        if config["ln_before"]:
            self.ln_before = Affine(torch.ones(hidden, **kw), torch.zeros(hidden, **kw))
        self.down = Affine(torch.empty(size, hidden, **kw), torch.zeros(size, **kw))
        self.up = Affine(torch.empty(hidden, size, **kw), torch.zeros(hidden, **kw))
        if config["ln_after"]:
            self.ln_after = Affine(torch.ones(hidden, **kw), torch.zeros(hidden, **kw))
        scaling = config["scaling"]
        self.fixed_scale: float | None = None
        if scaling == "learned":
            self.scale = nn.Parameter(torch.ones(1, **kw))
        elif scaling == "channel":
            self.scale = nn.Parameter(torch.ones(hidden, **kw))
        else:
            self.fixed_scale = float(scaling)
        self.reset_parameters(config["init_weights"])

    def reset_parameters(self, init: str) -> None:
        """AdapterHub's initialisations (``Adapter.__init__``): bert, houlsby, mam_adapter."""
        with torch.no_grad():
            if init == "bert":
                self.down.weight.normal_(0.0, 0.02)
                self.up.weight.normal_(0.0, 0.02)
            elif init == "houlsby":
                nn.init.trunc_normal_(self.down.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.trunc_normal_(self.up.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            elif init == "mam_adapter":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                self.up.weight.zero_()
            else:
                raise ValueError(f"unknown init_weights {init!r}")
            self.down.bias.zero_()
            self.up.bias.zero_()

    @staticmethod
    def _norm(x: torch.Tensor, affine: Affine) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), affine.weight.to(x.dtype), affine.bias.to(x.dtype), LN_EPS)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(scale * up(act(down(ln_before(x)))))``."""
        if hasattr(self, "ln_before"):
            x = self._norm(x, self.ln_before)
        down = self.activation(F.linear(x, self.down.weight.to(x.dtype), self.down.bias.to(x.dtype)))
        up = F.linear(down, self.up.weight.to(x.dtype), self.up.bias.to(x.dtype))
        up = up * (self.fixed_scale if self.fixed_scale is not None else self.scale.to(x.dtype))
        return F.dropout(up, self.dropout, self.training) if self.dropout > 0 else up

    def pre(self, h: torch.Tensor, r: torch.Tensor | None, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter input, adapter residual): AdapterHub's ``pre_forward``."""
        if self.parallel:
            assert r is not None
            return r, r
        res = h
        if self.original_ln_before:
            if norm is not None:
                h = h + r
                if self.residual_before_ln == "post_add":
                    res = h
                h = norm(h)
            elif r is not None:
                h = h + r
        if self.residual_before_ln is False:
            res = h
        return h, res

    def forward(self, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        out = self.bottleneck(x)
        if self.parallel:
            return self._norm(out, self.ln_after) if hasattr(self, "ln_after") else out
        if self.adapter_residual_before_ln:
            out = out + res
        if hasattr(self, "ln_after"):
            out = self._norm(out, self.ln_after)
        if not self.adapter_residual_before_ln:
            out = out + res
        return out

    def post(self, out: torch.Tensor, h: torch.Tensor, r: torch.Tensor, norm: nn.Module | None,
             adds_residual: bool) -> torch.Tensor:
        """AdapterHub's ``post_forward``; with ``adds_residual`` the model adds ``r`` after us (pre-LN)."""
        if self.parallel:
            out = out + h
        if adds_residual:
            return out if self.original_ln_after else out - r
        if self.original_ln_after:
            return norm(out + r) if norm is not None else out + r
        return out

    def extra_repr(self) -> str:
        kind = "parallel" if self.parallel else "sequential"
        return f"{kind}, hidden={self.hidden}, size={self.size}, non_linearity={self.non_linearity}"


class BottleneckSite(nn.Module):
    """The name-keyed adapters after one sub-layer, and the hooks that apply them."""

    def __init__(self, style: str, site: str, anchor: str):
        super().__init__()
        self.style = style  # POST_LN or PRE_LN
        self.site = site  # "attention" or "ffn"
        self.anchor = anchor  # the anchor norm's name, relative to the module holding this container
        self.adapters = nn.ModuleDict()
        self.enabled = True
        self.composition: Any = None  # a core.composition Block while adapterkit.activate runs one
        self.handles: list[Any] = []
        self._stash: torch.Tensor | None = None  # h (post-LN) or r (pre-LN) of the running forward

    @property
    def active(self) -> bool:
        if self.composition is not None:
            return self.enabled and any(name in self.adapters for name in self.composition.members())
        return self.enabled and len(self.adapters) > 0

    def combine(self, h: torch.Tensor, r: torch.Tensor, norm: nn.Module | None, adds_residual: bool) -> torch.Tensor:
        """Run every adapter (a Stack, in insertion order) on sub-layer output ``h`` and residual ``r``."""
        if self.composition is not None:
            hidden, _, last = self._run(self.composition, h, r, r, norm)
            return self.adapters[last].post(hidden, h, r, norm, adds_residual)
        hidden, adapters = h, list(self.adapters.values())
        for adapter in adapters:
            x, res = adapter.pre(hidden, r, norm)
            hidden = adapter(x, res)
        return adapters[-1].post(hidden, h, r, norm, adds_residual)

    def _holds(self, child: Any) -> bool:
        return child in self.adapters if isinstance(child, str) else any(n in self.adapters for n in child.members())

    def _run(self, block: Any, hidden: torch.Tensor, r: torch.Tensor, res: torch.Tensor,
             norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, str | None]:
        """One composition block on the state (hidden, residual input r, adapter residual res); members absent here are skipped.

        Returns the new hidden state, adapter residual and the name of the last adapter that ran.
        """
        if block.kind == "stack":  # AdapterHub compose_stack: pre_block + compose_single per adapter
            last = None
            for child in block.children:
                if isinstance(child, str):
                    if child not in self.adapters:
                        continue
                    adapter = self.adapters[child]
                    x, res = adapter.pre(hidden, r, norm)
                    hidden, last = adapter(x, res), child
                elif self._holds(child):
                    hidden, res, last = self._run(child, hidden, r, res, norm)
            return hidden, res, last
        present = [(child, w) for child, w in zip(block.children, _runtime_weights(block)) if self._holds(child)]
        if not present:
            return hidden, res, None
        first = next(name for name in block.leaves() if name in self.adapters)
        x, res = self.adapters[first].pre(hidden, r, norm)  # AdapterHub pre_block: the first member's pre_forward
        outputs, last = [], None
        for child, _ in present:
            if isinstance(child, str):
                outputs.append(self.adapters[child](x, res))
                last = child
            else:
                out, _, last = self._run(child, x, r, res, norm)
                outputs.append(out)
        weights = torch.tensor([w for _, w in present], dtype=x.dtype, device=x.device).reshape(-1, *[1] * x.dim())
        stacked = torch.stack(outputs, 0) * weights
        hidden = torch.mean(stacked, dim=0) if block.kind == "average" else torch.sum(stacked, dim=0)
        return hidden, res, last

    # ---- hooks ----------------------------------------------------------------
    def keep(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        """Post-LN: the block's ``dropout`` output is ``h``."""
        self._stash = output

    def keep_residual(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pre-LN: the pre-norm's input is the sub-layer's residual ``r``."""
        self._stash = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))

    def apply_post_ln(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        h, self._stash = self._stash, None
        if not self.active:
            return None
        r = args[1] if len(args) > 1 else kwargs.get("input_tensor")
        if h is None or r is None:
            raise RuntimeError(f"bottleneck adapter: {type(module).__name__} did not run dense -> dropout -> "
                               "LayerNorm(h + input_tensor); this block layout is not supported")
        return self.combine(h, r, module.LayerNorm, adds_residual=False)

    def apply_pre_ln(self, module: nn.Module, _args: Any, _kwargs: Any, output: Any) -> Any:
        r, self._stash = self._stash, None
        if not self.active:
            return None
        if r is None:
            raise RuntimeError(f"bottleneck adapter: the pre-norm of {type(module).__name__} did not run before it; "
                               "this decoder-layer layout is not supported")
        h = output[0] if isinstance(output, tuple) else output
        new = self.combine(h, r, None, adds_residual=True)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._stash = None

    def extra_repr(self) -> str:
        return f"style={self.style}, site={self.site}, anchor={self.anchor}, enabled={self.enabled}"


def _runtime_weights(block: Any) -> list[float]:
    """Average: AdapterHub's (normalised) weights, averaged by ``torch.mean``; weighted sum: the weights as given."""
    return block.normalized_weights() if block.kind == "average" else block.coefficients()


# ---- where adapters go: site detection --------------------------------------------

@dataclass
class SitePlan:
    """One place an adapter can follow.

    ``anchor_path`` names the layer norm of the sub-layer's residual branch: the block's
    ``LayerNorm`` in post-LN models (it closes the branch), the sub-layer's pre-norm in pre-LN
    models (it opens it, and its input is the residual). Its weight ``[hidden]`` is what a
    ``--base`` check verifies. The site container lives beside it, on ``owner_path``.
    """

    layer: int | None
    site: str  # "attention" | "ffn"
    style: str  # POST_LN | PRE_LN
    owner_path: str  # the module holding the anchor norm (and the site container)
    anchor_name: str  # the norm, relative to the owner
    sublayer_name: str | None = None  # pre-LN: the sub-layer whose output is changed, relative to the owner

    @property
    def anchor_path(self) -> str:
        return f"{self.owner_path}.{self.anchor_name}" if self.owner_path else self.anchor_name

    @property
    def container_name(self) -> str:
        return f"bottleneck_{self.site}"


# (pre-norm, sub-layer, output projection) per site, for pre-LN decoder layers
_PRE_LN_LAYOUTS = (
    {"attention": ("input_layernorm", "self_attn", "o_proj"), "ffn": ("post_attention_layernorm", "mlp", "down_proj")},
    {"attention": ("ln_1", "attn", "c_proj"), "ffn": ("ln_2", "mlp", "c_proj")},
)
# Extra norms around a sub-layer (Gemma, OLMo2 ...) put its output somewhere AdapterHub's math does not expect.
_UNSUPPORTED_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "post_attention_norm")


def _layer_index(path: str) -> int | None:
    parts = [p for p in path.split(".") if p.isdigit()]
    return int(parts[-1]) if parts else None


def _is_post_ln_block(module: nn.Module) -> bool:
    names = dict(module.named_children())
    return (isinstance(names.get("LayerNorm"), nn.LayerNorm) and isinstance(names.get("dropout"), nn.Dropout)
            and "dense" in names)


def find_sites(model: nn.Module) -> list[SitePlan]:
    """Every attention / FFN site of the model's transformer layers, in model order."""
    plans: list[SitePlan] = []
    for path, module in model.named_modules():
        if isinstance(module, BottleneckSite):
            continue
        children = dict(module.named_children())
        prefix = f"{path}." if path else ""
        # BERT-style post-LN layer: attention.output and output are dense -> dropout -> LayerNorm(h + residual)
        attention, output = children.get("attention"), children.get("output")
        if attention is not None and output is not None and "intermediate" in children:
            attn_out = getattr(attention, "output", None)
            if isinstance(attn_out, nn.Module) and _is_post_ln_block(attn_out) and _is_post_ln_block(output):
                layer = _layer_index(path)
                plans.append(SitePlan(layer, "attention", POST_LN, f"{prefix}attention.output", "LayerNorm"))
                plans.append(SitePlan(layer, "ffn", POST_LN, f"{prefix}output", "LayerNorm"))
                continue
        for layout in _PRE_LN_LAYOUTS:
            if all(norm in children and sub in children and hasattr(children[sub], proj)
                   for norm, sub, proj in layout.values()):
                if any(name in children for name in _UNSUPPORTED_NORMS):
                    break
                layer = _layer_index(path)
                for site, (norm, sub, _proj) in layout.items():
                    plans.append(SitePlan(layer, site, PRE_LN, path, norm, sub))
                break
    return plans


def attach(model: nn.Module, plan: SitePlan) -> BottleneckSite:
    """The site container of ``plan``, created (with its hooks) on first use."""
    owner = model.get_submodule(plan.owner_path)
    site = getattr(owner, plan.container_name, None)
    if isinstance(site, BottleneckSite):
        return site
    if site is not None:
        raise RuntimeError(f"{plan.owner_path or type(model).__name__} already has an attribute {plan.container_name!r}")
    site = BottleneckSite(plan.style, plan.site, plan.anchor_name).train(owner.training)
    owner.add_module(plan.container_name, site)
    if plan.style == POST_LN:
        site.handles.append(owner.get_submodule("dropout").register_forward_hook(site.keep))
        site.handles.append(owner.register_forward_hook(site.apply_post_ln, with_kwargs=True))
    else:
        norm = owner.get_submodule(plan.anchor_name)
        sublayer = owner.get_submodule(plan.sublayer_name or "")
        site.handles.append(norm.register_forward_pre_hook(site.keep_residual, with_kwargs=True))
        site.handles.append(sublayer.register_forward_hook(site.apply_pre_ln, with_kwargs=True))
    return site


def sites(model: nn.Module, adapter_name: str | None = None) -> list[tuple[str, BottleneckSite]]:
    """(anchor path, site) of every site in ``model`` (holding ``adapter_name`` when given), in model order."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, BottleneckSite) and (adapter_name is None or adapter_name in module.adapters):
            owner = path.rpartition(".")[0]
            out.append((f"{owner}.{module.anchor}" if owner else module.anchor, module))
    return out


def detach_site(model: nn.Module, site: BottleneckSite) -> None:
    """Remove a site's hooks and the container itself."""
    site.remove_hooks()
    for _path, module in model.named_modules():
        for name, child in list(module.named_children()):
            if child is site:
                delattr(module, name)
                return
