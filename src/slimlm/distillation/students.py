"""Students built from a teacher.

- `layer_subset`: a copy of the teacher keeping some of its transformer blocks (default every other
  one, from the first), the DistilBERT initialisation (Sanh et al., arXiv 1910.01108): embeddings,
  norms and head are the teacher's, so training starts from a model that already speaks.
- `from_config`: a freshly initialised model from any config (a different width or depth).
A compressed copy of the teacher (pruned with `slimlm.prune`, quantized and prepared with
`qat.prepare_qat_`) is a student too: the trainer heals it.
"""

from __future__ import annotations

import copy

from torch import nn

from slimlm.core.config import check
from slimlm.core.layers import find_blocks, keep_blocks_


def layer_subset(teacher: nn.Module, keep: list[int] | None = None) -> nn.Module:
    """A copy of the teacher with blocks `keep` (default 0, 2, 4, ...)."""
    _, blocks = find_blocks(teacher)
    n = len(blocks)
    keep = list(range(0, n, 2)) if keep is None else list(keep)
    check(keep and all(isinstance(i, int) and 0 <= i < n for i in keep) and len(set(keep)) == len(keep),
          f"keep must list distinct block indices in [0, {n}), got {keep}")
    return keep_blocks_(copy.deepcopy(teacher), sorted(keep))


def from_config(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)
