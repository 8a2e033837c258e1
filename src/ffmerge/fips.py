"""FiPS, fine-grained parameter sharing (Üyük et al., TMLR 2026, arXiv 2411.09816), at a merge's budget.

Where merging ties whole FF blocks, FiPS shares at a finer grain. For a group of adjacent layers it lays every
FF weight matrix out as ``d x d_ff`` (input projections transposed) and writes each as ``W_i = U V_i``: one basis
``U`` (``d x r``) stored once for the group, and a sparse ``V_i`` (``r x d_ff``) per matrix. A truncated SVD of
the group's concatenated matrices ``[W_1 ... W_m]`` starts both; then ``U`` and the ``V_i`` are fitted by block-wise
reconstruction (every member's FF output on its own cached calibration inputs, the loss of :mod:`ffmerge.repair`)
while gradual magnitude pruning (GMP, Zhu & Gupta 2017: cubic schedule) takes each ``V_i`` to its sparsity.

Unlike a merge, FiPS compresses every FF block of a stack; the budget is what makes it comparable. At a fraction
``f`` the merge removes ``removed_count(n, f)`` FF blocks per stack, so FiPS keeps at most the FF parameters the
merge keeps: ``(n - removed) x`` one block's parameters, counted honestly. Per stack, biases stay dense and per
layer; each group stores its basis once; each ``V_i`` stores its non-zero values plus a bitmask of where they
are (one bit per entry of ``V_i``), which counts as ``bits / 32`` float32 parameters. The rank is ``rank x d``
unless that leaves ``V`` sparser than ``min_density``, in which case the rank is lowered until the budget buys
that density (at all-but-one the budget is too small for a full-width basis). ``size_report`` counts a FiPS
model the same way (values + index bytes / 4 as parameters, bytes with the index), and the checkpoint stores
exactly that: ``U`` once, each ``V_i``'s values and packed bitmask (:class:`FactorLinear`'s state dict).

Choices of ours where the paper leaves room: groups of ``group_size`` adjacent layers from the start of each
stack (a trailing single layer joins the group before it); the loss sums squared errors over the group's
members divided by their summed output energy (the merge repair's, so both report comparable errors); every
``V_i`` is pruned to the same number of non-zeros; SVD factors are balanced (``U = U_r sqrt(S)``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, set_submodule
from .experiments import removed_count
from .features import FeatureStore
from .repair import MemberData, Picks, _as_out_in, adam_fit, error_sums, store_data

log = logging.getLogger(__name__)

METHOD = "fips"
INDEX_BITS_PER_ENTRY = 1  # a bitmask over V: one bit per entry, set where a value is stored


@dataclass(frozen=True)
class FipsConfig:
    """The ``fips`` config block: the structure (group size, rank) and the reconstruction fit."""

    group_size: int = 2
    rank: float = 1.0
    """The shared basis' width as a share of the model width d (an upper bound; see ``min_density``)."""
    min_density: float = 0.1
    """The sparsest V the budget may ask for; below it the rank is lowered instead."""
    steps: int = 200
    lr: float = 1e-3
    batch_tokens: int = 1536
    prune_end: float = 0.75
    """GMP reaches the target density at this share of the steps; the rest fine-tune the final mask."""
    prune_every: int = 10
    tolerance: float = 1e-6
    """A group whose one-shot pruned SVD start is already this exact is not fitted (Adam would only add noise)."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.group_size < 1:
            problems.append(f"group_size {self.group_size} < 1")
        if not 0 < self.rank <= 1:
            problems.append(f"rank {self.rank} is not in (0, 1] (a share of the model width)")
        if not 0 < self.min_density <= 1:
            problems.append(f"min_density {self.min_density} is not in (0, 1]")
        if self.steps < 0 or self.batch_tokens < 1 or self.lr <= 0 or self.prune_every < 1:
            problems.append("steps >= 0, batch_tokens >= 1, lr > 0 and prune_every >= 1 are needed")
        if not 0 < self.prune_end <= 1:
            problems.append(f"prune_end {self.prune_end} is not in (0, 1]")
        if problems:
            raise ValueError(f"fips: {'; '.join(problems)}")

    @classmethod
    def from_cfg(cls, block: Mapping[str, Any] | None, seed: int = 0) -> FipsConfig:
        return cls(**{**dict(block or {}), "seed": seed})


# ----------------------------------------------------------------------------------------------------------
# The factorised projection and its compact storage
# ----------------------------------------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, eight entries per byte, most significant bit first (numpy's packbits)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).reshape(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`pack_bits` for a mask of ``shape``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    flat = ((bits.reshape(-1, 1).to(torch.uint8) >> shifts) & 1).reshape(-1).bool()
    return flat[: math.prod(shape)].reshape(shape)


class FactorLinear(nn.Module):
    """An FF projection computed from its group's shared basis and its own sparse coefficients.

    ``side="in"`` (an input projection, ``[..., d] -> [..., width]``): ``y = (x U) V + b``;
    ``side="out"`` (the output projection, ``[..., width] -> [..., d]``): ``y = (x V^T) U^T + b``. The dense weight
    is never formed, so a forward costs ``d r + r width`` per row. ``coeffs`` is dense in memory (the optimizer
    needs it so) and multiplied by ``mask``; the state dict holds only the kept values and the packed mask.
    """

    def __init__(self, basis: nn.Parameter, width: int, side: str, bias: bool):
        super().__init__()
        if side not in ("in", "out"):
            raise ValueError(f"side must be 'in' or 'out', got {side!r}")
        self.side, self.width = side, width
        self.basis = basis
        self.coeffs = nn.Parameter(basis.new_zeros(basis.shape[1], width))
        # not in the plain state dict: _save_to_state_dict writes it packed as mask_bits
        self.register_buffer(
            "mask", torch.ones(basis.shape[1], width, dtype=torch.bool, device=basis.device), persistent=False
        )
        out_features = width if side == "in" else basis.shape[0]
        self.bias = nn.Parameter(basis.new_zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.coeffs * self.mask
        y = (x @ self.basis) @ v if self.side == "in" else (x @ v.T) @ self.basis.T
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> torch.Tensor:
        """The weight this module stands for, ``d x width`` (for tests and inspection)."""
        return self.basis @ (self.coeffs * self.mask)

    def stored(self) -> tuple[int, int]:
        """``(values, index bytes)`` of the coefficients as the checkpoint stores them."""
        return int(self.mask.sum()), math.ceil(self.mask.numel() * INDEX_BITS_PER_ENTRY / 8)

    @torch.no_grad()
    def prune_to(self, keep: int) -> None:
        """Keep the ``keep`` largest coefficients by magnitude (among those still kept); zero the rest."""
        scores = (self.coeffs * self.mask).abs().reshape(-1)
        kept = torch.zeros_like(scores, dtype=torch.bool)
        kept[torch.topk(scores, keep, sorted=False).indices] = True
        self.mask.copy_(kept.reshape(self.mask.shape))
        self.coeffs.mul_(self.mask)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "basis"] = self.basis if keep_vars else self.basis.detach()
        destination[prefix + "values"] = self.coeffs.detach()[self.mask]
        destination[prefix + "mask_bits"] = pack_bits(self.mask).to(self.mask.device)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        values, bits = state_dict.pop(prefix + "values", None), state_dict.pop(prefix + "mask_bits", None)
        if values is None or bits is None:
            missing_keys.extend(prefix + k for k, v in (("values", values), ("mask_bits", bits)) if v is None)
        else:
            mask = unpack_bits(bits.cpu(), tuple(self.mask.shape))
            if int(mask.sum()) != values.numel():
                error_msgs.append(f"{prefix}values holds {values.numel()} values but its mask sets {int(mask.sum())}")
            else:
                dense = torch.zeros(self.mask.shape, dtype=values.dtype)
                dense[mask] = values.cpu()
                with torch.no_grad():
                    self.mask.copy_(mask)
                state_dict[prefix + "coeffs"] = dense
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"side={self.side}, d={self.basis.shape[0]}, rank={self.basis.shape[1]}, width={self.width}"


# ----------------------------------------------------------------------------------------------------------
# Structure: groups, budget, factorised blocks
# ----------------------------------------------------------------------------------------------------------


def layer_groups(n_layers: int, group_size: int) -> list[list[int]]:
    """Adjacent layers in groups of ``group_size`` from the first; a trailing single layer joins the previous
    group (a group of one shares nothing)."""
    groups = [list(range(s, min(s + group_size, n_layers))) for s in range(0, n_layers, group_size)]
    if len(groups) > 1 and len(groups[-1]) == 1 and group_size > 1:
        last = groups.pop()
        groups[-1] += last
    return groups


def _weight_d_by_width(module: nn.Module, side: str) -> torch.Tensor:
    """A Linear or Conv1D projection's weight laid out ``d x d_ff`` (input projections transposed)."""
    w = _as_out_in(module, side)  # [outputs, inputs]
    return w.T if side == "in" else w


@dataclass(frozen=True)
class StackBudget:
    """How a stack's FiPS model spends the merge's budget (all counts in float32 parameters)."""

    rank: int
    keep: int
    """Non-zeros kept in every ``V_i``."""
    groups: list[list[int]]
    budget: int
    """The FF parameters the merge at this fraction keeps in the stack."""
    cost: int
    """What FiPS stores: bases + values + index bytes / 4 + biases; never above ``budget``."""

    def density(self, width: int) -> float:
        return self.keep / (self.rank * width)


def stack_budget(model: nn.Module, stack: str, fraction: str, cfg: FipsConfig) -> StackBudget:
    """Rank and non-zeros per ``V_i`` that keep the stack's FF parameters within the merge's at ``fraction``."""
    adapter = get_adapter(model)
    n = adapter.num_layers(model, stack)
    modules = adapter.ff_modules(model, stack, 0)
    block = sum(p.numel() for m in modules.values() for p in m.parameters())
    biases = sum(m.bias.numel() for m in modules.values() if m.bias is not None)
    d, width = _weight_d_by_width(modules["out"], "out").shape
    budget = (n - removed_count(n, fraction)) * block
    groups = layer_groups(n, cfg.group_size)
    matrices = n * len(modules)
    free = budget - n * biases  # what the bases, values and masks may take

    def index_params(rank: int) -> int:  # the bitmasks' bytes as float32 parameters, as size_report counts them
        return math.ceil(matrices * math.ceil(rank * width * INDEX_BITS_PER_ENTRY / 8) / 4)

    def keep_at(rank: int) -> int:
        return min(rank * width, (free - len(groups) * d * rank - index_params(rank)) // matrices)

    rank = max(1, round(cfg.rank * d))
    if keep_at(rank) < cfg.min_density * rank * width:
        per_rank = len(groups) * d + matrices * width * (cfg.min_density + INDEX_BITS_PER_ENTRY / 32)
        rank = math.floor(free / per_rank)
        while rank > 1 and keep_at(rank) < cfg.min_density * rank * width:  # the index's rounding
            rank -= 1
    keep = keep_at(rank) if rank >= 1 else 0
    if keep < 1:
        raise ValueError(
            f"fips: {stack}'s budget at {fraction} ({budget:,} parameters for {n} FF blocks) cannot hold a basis and "
            f"sparse factors; use a smaller fraction, or a larger fips.group_size (fewer bases)"
        )
    cost = len(groups) * d * rank + matrices * keep + index_params(rank) + n * biases
    return StackBudget(rank=rank, keep=keep, groups=groups, budget=budget, cost=cost)


def factor_blocks(
    model: nn.Module, stack: str, groups: list[list[int]], rank: int
) -> list[tuple[list[FactorLinear], list[nn.Module]]]:
    """Replace the FF projections of every layer in ``groups`` by :class:`FactorLinear` modules, one basis per
    group, in place. The new modules hold zeros (a loaded checkpoint fills them, :func:`init_group` when
    compressing); returned per group with the projections they replaced, in the same order."""
    adapter = get_adapter(model)
    spec = adapter.stack(stack)
    made = []
    for group in groups:
        reference = adapter.ff_modules(model, stack, group[0])["out"]
        d = _weight_d_by_width(reference, "out").shape[0]
        basis = nn.Parameter(reference.weight.new_zeros(d, rank))
        factors, sources = [], []
        for j in group:
            modules = adapter.ff_modules(model, stack, j)
            layer = adapter.layers(model, stack)[j]
            for role, path in (*spec.ff_in, ("out", spec.ff_out)):
                side = "out" if role == "out" else "in"
                width = _weight_d_by_width(modules[role], side).shape[1]
                factor = FactorLinear(basis, width, side, bias=modules[role].bias is not None)
                set_submodule(layer, path, factor)
                factors.append(factor)
                sources.append(modules[role])
        made.append((factors, sources))
    return made


@torch.no_grad()
def init_group(factors: list[FactorLinear], sources: list[nn.Module]) -> float:
    """Start a group from the truncated SVD of its concatenated ``d x d_ff`` matrices (``sources``: the
    projections the factors replace); returns the share of their squared Frobenius norm that the rank-r
    truncation loses (0 when the matrices share an exact basis of at most r columns)."""
    dense = [_weight_d_by_width(m, f.side).double() for f, m in zip(factors, sources, strict=True)]
    u, s, vh = torch.linalg.svd(torch.cat(dense, 1), full_matrices=False)
    rank = factors[0].basis.shape[1]
    root = s[:rank].sqrt()
    factors[0].basis.copy_((u[:, :rank] * root).to(factors[0].basis.dtype))
    parts = (root[:, None] * vh[:rank]).split([m.shape[1] for m in dense], 1)
    for f, m, part in zip(factors, sources, parts, strict=True):
        f.coeffs.copy_(part.to(f.coeffs.dtype))
        if f.bias is not None:
            f.bias.copy_(m.bias)
    return float(s[rank:].pow(2).sum()) / max(float(s.pow(2).sum()), 1e-30)


def gmp_keep(step: int, end: int, full: int, keep: int) -> int:
    """Gradual magnitude pruning's non-zeros at ``step``: cubic from ``full`` at 0 to ``keep`` at ``end``."""
    if step >= end:
        return keep
    return keep + math.ceil((full - keep) * (1 - step / end) ** 3)


# ----------------------------------------------------------------------------------------------------------
# Fitting
# ----------------------------------------------------------------------------------------------------------


def _members(model: nn.Module, stack: str, group: list[int]) -> dict[int, Any]:
    adapter = get_adapter(model)
    return {j: adapter.ff_forward(model, stack, j) for j in group}


def fit_group(blocks: Mapping[int, Any], factors: list[FactorLinear], data: MemberData, keep: int, cfg: FipsConfig):
    """Adam on the group's basis, coefficients and biases against the members' summed reconstruction error,
    while GMP prunes every ``V_i`` from dense to ``keep`` non-zeros; ends exactly at ``keep``. Returns the losses."""
    params = list({id(p): p for f in factors for p in f.parameters()}.values())
    full = factors[0].mask.numel()
    end = max(1, round(cfg.prune_end * cfg.steps))
    energy = sum(float(data.y[j].pow(2).sum(1).mean()) for j in data.layers)

    def prune(step: int) -> None:
        if step % cfg.prune_every == 0 and step > 0:
            for f in factors:
                f.prune_to(gmp_keep(step, end, full, keep))

    def loss(picks: Picks) -> torch.Tensor:
        per_member = len(picks[0][1])
        total = sum((blocks[j](data.x[j][pick]) - data.y[j][pick]).pow(2).sum() / per_member for j, pick in picks)
        return total / energy

    losses = adam_fit(
        params,
        loss,
        data,
        steps=cfg.steps,
        lr=cfg.lr,
        batch_tokens=cfg.batch_tokens,
        seed=cfg.seed,
        before_step=prune,
    )
    for f in factors:
        f.prune_to(keep)  # the final mask, exactly at the budget (also the one-shot prune of steps: 0)
    return losses


def _snapshot(factors: list[FactorLinear]) -> dict[int, torch.Tensor]:
    tensors = {id(t): t for f in factors for t in (*f.parameters(), f.mask)}
    return {key: t.detach().clone() for key, t in tensors.items()}


@torch.no_grad()
def _restore(factors: list[FactorLinear], saved: Mapping[int, torch.Tensor]) -> None:
    for f in factors:
        for t in (*f.parameters(), f.mask):
            t.copy_(saved[id(t)])


def factorize_stack(
    model: nn.Module,
    stack: str,
    groups: list[list[int]],
    rank: int,
    keep: int,
    store: FeatureStore | None,
    cfg: FipsConfig,
) -> dict[str, Any]:
    """FiPS on one stack in place: factorise, SVD start, fit with GMP (with a feature ``store``), prune to ``keep``
    non-zeros per ``V_i``. Returns the stack's record: groups, rank, non-zeros and, with a store, the relative
    reconstruction errors of the SVD start, of that start pruned in one shot, and of the final blocks (fitted,
    unless the one-shot pruning was already exact or the fit did worse: then the one-shot pruning stays)."""
    started = time.perf_counter()
    truncation: list[float] = []
    sums = dict.fromkeys(("svd", "pruned", "fitted", "energy"), 0.0)
    reverted = 0
    for group, (factors, sources) in zip(groups, factor_blocks(model, stack, groups, rank), strict=True):
        truncation.append(init_group(factors, sources))
        if store is None:
            for f in factors:
                f.prune_to(keep)
            continue
        data = store_data(store, stack, group)
        blocks = _members(model, stack, group)
        svd, energy = error_sums(blocks, data)
        start = _snapshot(factors)
        for f in factors:
            f.prune_to(keep)
        pruned = fitted = error_sums(blocks, data)[0]
        if cfg.steps and pruned > cfg.tolerance * energy:
            one_shot = _snapshot(factors)
            _restore(factors, start)  # the fit prunes gradually from the dense start
            fit_group(blocks, factors, data, keep, cfg)
            fitted = error_sums(blocks, data)[0]
            if fitted >= pruned:  # a fit that made the group worse is undone
                _restore(factors, one_shot)
                fitted, reverted = pruned, reverted + 1
        for key, value in (("svd", svd), ("pruned", pruned), ("fitted", fitted), ("energy", energy)):
            sums[key] += value
        log.info(f"fips {stack} {group}: relative error {pruned / energy:.4g} pruned, {fitted / energy:.4g} fitted")
    width = factors[0].width
    record: dict[str, Any] = {
        "groups": groups,
        "rank": rank,
        "keep": keep,
        "density": round(keep / (rank * width), 6),
        "svd_truncation": max(truncation),
    }
    if store is not None:
        energy = max(sums["energy"], 1e-30)
        record["error_svd"] = sums["svd"] / energy  # the dense rank-r start
        record["error_pruned"] = sums["pruned"] / energy  # that start pruned in one shot
        # after the fit, under the merge repair's name: Table 9 prints both in one column
        record["error_repaired"] = sums["fitted"] / energy
        record["reverted"] = reverted
    record["seconds"] = round(time.perf_counter() - started, 2)
    log.info(f"fips {stack}: {record}")
    return record


def compress_fips(model: nn.Module, store: FeatureStore | None, fraction: str, cfg: FipsConfig) -> dict[str, Any]:
    """FiPS on every stack at the merge's budget for ``fraction``, in place; returns the record the model's
    result files keep (under ``repair``: the fit is FiPS's block reconstruction)."""
    adapter = get_adapter(model)
    report: dict[str, Any] = {"method": METHOD, "config": asdict(cfg), "stacks": {}}
    for spec in adapter.stacks:
        budget = stack_budget(model, spec.name, fraction, cfg)
        stats = factorize_stack(model, spec.name, budget.groups, budget.rank, budget.keep, store, cfg)
        report["stacks"][spec.name] = {**stats, "budget": budget.budget, "cost": budget.cost}
    return report


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: the structure the config cannot describe
# ----------------------------------------------------------------------------------------------------------


def fips_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{stack: {"groups": [[layer, ...], ...], "rank": r}}`` of the factorised stacks (found by type), which a
    checkpoint records so that :func:`restore_fips` can rebuild the modules before the tensors load."""
    adapter = get_adapter(model)
    layout = {}
    for spec in adapter.stacks:
        groups: dict[int, list[int]] = {}
        rank = None
        for j in range(adapter.num_layers(model, spec.name)):
            out = adapter.ff_modules(model, spec.name, j)["out"]
            if isinstance(out, FactorLinear):
                groups.setdefault(id(out.basis), []).append(j)
                rank = out.basis.shape[1]
        if groups:
            layout[spec.name] = {"groups": list(groups.values()), "rank": rank}
    return layout


def restore_fips(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Give a freshly built model the factorised structure of ``layout`` (values come from the checkpoint)."""
    for stack, entry in layout.items():
        factor_blocks(model, stack, [list(g) for g in entry["groups"]], int(entry["rank"]))
    return model
