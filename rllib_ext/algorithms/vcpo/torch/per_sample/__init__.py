"""Exact per-trajectory score-function gradients from one forward and one backward pass.

For trajectory ``i`` of a batch, ``g_i = grad_theta sum_t mask_it * logp_it`` (its score
function). OPOB needs the squared norms ``||g_i||^2`` before it can weight the gradient
``sum_i c_i g_i``. :class:`PerSampleGradients` gets them from one forward with hooks plus one
backward pass that computes only input gradients: the per-trajectory parameter gradients are
rebuilt from each layer's captured input ``a`` and output gradient ``g`` (rows of a batch do
not interact, so row ``i`` of ``g`` is trajectory ``i``'s output gradient), materialised or as
"ghost norms" (``factored.py``); the chunked LM head's per-sample gradient is taken inside its
own backward (``head.py``). The per-parameter route is planned from a FLOP + memory-traffic
estimate (``params.py``) with a device constant (``device_costs.py``). The reference's exact
route, one backward per trajectory, lives with the other OPOB code (``torch/opob.py``).

Which is cheaper (measured in ``bench/vcpo_per_sample_grads.py``): with short rows (``L``
tokens) relative to the layer widths, as in the CPU models of this project, the one-pass route
costs a fraction of one extra backward while the loop costs ``B`` small passes (10-40x a plain
step on CPU). With rows much longer than the widths (``L >> d_in d_out / (d_in + d_out)``) and
``B x P`` too large to keep, the one-pass route needs the weight-gradient matmul twice (once for
the norms, once for the weighted sum), about +33% FLOPs over a plain step, whereas the loop's
micro-batches of one long row are already efficient GEMMs: there the loop can be the cheaper
exact route.

Assumptions of :class:`PerSampleGradients` (checked where checkable, with a clear error):
the batch dimension is dim 0 of every hooked module's input and output; trajectories do not
interact inside the model (no batch norm, no cross-row ops); every trainable parameter belongs to
an ``nn.Linear``, an ``nn.Embedding`` or an elementwise-affine module ``y = weight * h(x) + bias``
(RMSNorm / LayerNorm style, verified numerically at construction), or is the chunked LM head's
weight (tied to an embedding or not; no trainable head bias); no hooked tensor is modified in
place after the hook saw it; no gradient checkpointing (it would re-run the hooks).
Padding needs no special care: a padded position whose output reaches no real log-prob has an
output gradient of exactly 0, so it adds nothing - as in autograd. Unlike autograd, on a CPU
the work skips such rows where it can see them for free: trailing positions whose output
gradient is 0 in every row leave the norm computations, and rows ``(i, t)`` with a zero output
gradient (the diagonal of the ghost route's Gram matrix) leave the weighted sum; in a causal LM
that is the last position and the right padding, ~20% of the rows of the tiny model's batches.
``nn.Embedding.padding_idx`` rows get no gradient, as in autograd.
"""

from rllib_ext.algorithms.vcpo.torch.per_sample.gradients import PerSampleGradients, score_objective
from rllib_ext.algorithms.vcpo.torch.per_sample.head import RowClasses
from rllib_ext.algorithms.vcpo.torch.per_sample.modules import UnsupportedModuleError
from rllib_ext.algorithms.vcpo.torch.per_sample.params import STRATEGIES

__all__ = ["STRATEGIES", "PerSampleGradients", "RowClasses", "UnsupportedModuleError",
           "score_objective"]
