"""AWQ as a calibrated step (Lin et al., arXiv 2306.00978): per block, search activation-aware
per-channel scales for each group of layers sharing an input, fold them into the producer of that
input (`smoothing.find_scale_groups`), then quantize every layer with a clipping search.

Math in `awq_math.py`. Layers whose input producer cannot absorb scales (e.g. GPT-2's MLP output
projection behind GELU, or o_proj behind grouped-query attention) keep unscaled inputs and get the
clipping search only; they are logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from slimlm.core.calibrate import CalibrationFields, replay_observing, run_blockwise
from slimlm.core.config import check, field
from slimlm.core.distributed import gather_rows, global_batch, sum_
from slimlm.core.layers import weight_matrix
from slimlm.core.steps import Step
from slimlm.core.targeting import as_globs
from slimlm.quant import primitives as P
from slimlm.quant.awq_math import search_clip, search_scales
from slimlm.quant.linear import QuantizedLinear, check_finite_weight
from slimlm.quant.rtn import RTNConfig, quantize_head_
from slimlm.quant.smoothing import find_scale_groups, fold_scales_

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AWQConfig(CalibrationFields, RTNConfig):
    """RTN's scheme and targets, AWQ's search settings, and the calibration sample.

    grid: number of exponents α = 0, 1/grid, ... tried (grid=1 tries α = 0 only);
    duo_scaling: divide by the weight magnitude too (the released AWQ code's default);
    clip: search each group's clipping range; clip_skip: globs of layers that skip it (the released
    code skips query/key projections; on stories260K clipping them too lowers int3 perplexity from
    10.20 to 9.78 and int4 from 7.111 to 7.096, so slimlm clips every layer by default);
    max_tokens / clip_tokens: how many calibration tokens score the scale and clipping candidates."""

    name = "awq"
    grid: int = field(20, "AWQ: exponents tried in the scale search")
    duo_scaling: bool = field(True, "AWQ: divide the scales by the weight magnitude too (the released code's default)")
    clip: bool = field(True, "AWQ: search each group's clipping range")
    clip_grid: int = field(20, "AWQ: shrink factors tried in the clipping search")
    max_shrink: float = field(0.5, "AWQ: the most the clipping search shrinks a range, in [0, 1)")
    clip_skip: tuple[str, ...] = field((), "AWQ: name globs of layers that skip the clipping search (repeatable)")
    max_tokens: int = field(4096, "AWQ: calibration tokens that score the scale candidates")
    clip_tokens: int = field(512, "AWQ: calibration tokens that score the clipping candidates")
    quantize: bool = field(True, "AWQ: quantize after folding the scales (false leaves float layers for a later "
                                 "step, e.g. gptq)")

    def __post_init__(self) -> None:
        RTNConfig.__post_init__(self)
        CalibrationFields.__post_init__(self)
        object.__setattr__(self, "clip_skip", as_globs(self.clip_skip, "clip_skip"))
        for field in ("grid", "clip_grid", "max_tokens", "clip_tokens"):
            value = getattr(self, field)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"{field} {value!r} must be a positive integer")
        check(isinstance(self.max_shrink, (int, float)) and 0 <= self.max_shrink < 1,
              f"max_shrink {self.max_shrink!r} must be in [0, 1), e.g. 0.5")
        for field in ("duo_scaling", "clip", "quantize"):
            check(isinstance(getattr(self, field), bool), f"{field} must be true or false, got {getattr(self, field)!r}")


class _TokenSample:
    """A seeded random sample of rows of a layer's inputs, `per_batch` rows from each batch.

    Under torch.distributed each process sees its share of the batches (`core.distributed.my_share`);
    the generator is advanced past the other processes' batches, so the union of the processes'
    samples is the one process's sample, and `tokens` / `mean_abs` combine them."""

    def __init__(self, per_batch: int, seed: int) -> None:
        self.per_batch, self.rows, self.abs_sum, self.count = per_batch, [], None, 0
        self.generator = torch.Generator().manual_seed(seed)
        self.local = self.consumed = 0  # batches seen here; batches the generator has drawn for (all processes)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (T, K)
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.count += x.shape[0]
        while self.consumed < global_batch(self.local):  # other processes' batches, drawn as one process would
            torch.randperm(x.shape[0], generator=self.generator)
            self.consumed += 1
        pick = torch.randperm(x.shape[0], generator=self.generator)[: self.per_batch].to(x.device)
        self.consumed, self.local = self.consumed + 1, self.local + 1
        self.rows.append(x[pick].cpu())

    def tokens(self) -> Tensor:
        return gather_rows(torch.cat(self.rows))  # (T_sample, K)

    def mean_abs(self) -> Tensor:
        count = sum_(torch.tensor([float(self.count)], dtype=torch.float64))
        return (sum_(self.abs_sum.clone()) / float(count)).cpu()  # (K,)


class AWQStep:
    def __init__(self, config: AWQConfig) -> None:
        self.config = config
        self.clip_samples: dict[str, _TokenSample] = {}
        self.per_batch = 1
        self.summary: list[dict] = []  # one entry per scaled group, for reports and tests

    @torch.no_grad()
    def begin_block(self, block: nn.Module, prefix: str, names: list[str], inputs: list[tuple]) -> None:
        c = self.config
        groups, orphans = find_scale_groups(block, prefix, names, inputs)
        if orphans:
            log.info("AWQ: no producer can absorb scales for %s; those layers get the clipping search only", ", ".join(orphans))
        modules = dict(block.named_modules(prefix=prefix.rstrip(".")))
        batches = int(sum_(torch.tensor([len(inputs)])))  # over every process
        samples = {g.producer: _TokenSample(math.ceil(c.max_tokens / batches), c.seed) for g in groups}
        replay_observing(block, inputs, {modules[g.layers[0]]: samples[g.producer].add for g in groups})
        for g in groups:
            layers = [modules[n] for n in g.layers]
            for n, m in zip(g.layers, layers):
                check_finite_weight(n, m.weight)
            weights = [weight_matrix(m).cpu() for m in layers]
            sample = samples.pop(g.producer)
            scheme = c.scheme_for(g.layers[0])  # layers sharing an input share a scheme in any sane override
            s, error, rtn_error, alpha = search_scales(sample.tokens(), weights, sample.mean_abs(), scheme, c.grid, c.duo_scaling)
            fold_scales_(modules[g.producer], layers, s.to(layers[0].weight.device))
            self.summary.append({"producer": g.producer, "layers": g.layers, "alpha": alpha,
                                 "error": error, "rtn_error": rtn_error})
        self.per_batch = math.ceil(c.clip_tokens / batches)

    def _clips(self, name: str) -> bool:
        return self.config.quantize and self.config.clip and not any(fnmatchcase(name, glob) for glob in self.config.clip_skip)

    def observe(self, name: str, module: nn.Module, inputs: Tensor) -> None:
        if self._clips(name):
            self.clip_samples.setdefault(name, _TokenSample(self.per_batch, self.config.seed)).add(inputs)

    def compress(self, name: str, module: nn.Module) -> QuantizedLinear | None:
        c = self.config
        if not c.quantize:
            return None
        scheme = c.scheme_for(name)
        check_finite_weight(name, module.weight)
        w = weight_matrix(module).float().cpu()  # (N, K), already scaled
        sample = self.clip_samples.pop(name, None)
        if sample is not None:
            scale, zero = search_clip(w, sample.tokens(), scheme, c.clip_grid, c.max_shrink)
        else:
            scale, zero = P.compute_qparams(w, scheme)
        return QuantizedLinear.from_codes(P.quantize(w, scale, zero, scheme), scale, zero, module, scheme)


def awq_quantize_(model: nn.Module, config: AWQConfig, samples: Tensor, on_block=None) -> nn.Module:
    """Quantize the selected linear layers with AWQ using calibration samples (n, T), and the output head
    as `config.head` says (int8 RTN, `rtn.quantize_head_`; not when `quantize` is off); in place."""
    run_blockwise(model, samples, config.targets(model), AWQStep(config), config.batch_size, on_block)
    if config.quantize:
        quantize_head_(model, config)
    return model


AWQ = Step(AWQConfig, awq_quantize_, "quantize", calibrated=True,
           summary="AWQ: activation-aware scales folded into the producers, then a clipping search (arXiv 2306.00978)")
