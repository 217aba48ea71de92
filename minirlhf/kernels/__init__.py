"""Fused kernels: per-token logprobs (LM head fused with log-softmax) and GAE.

Each kernel is one function with three paths behind it (see `dispatch.py`):

=============  ===========================================  ==========================================
path           token_logprobs                               gae
=============  ===========================================  ==========================================
reference      ``log_softmax(h @ W.T / T).gather``          the per-timestep Python loop
fused (torch)  vocab blocks + online log-sum-exp + a        a two-level blocked scan (matmuls with
               custom autograd.Function that recomputes     decay matrices); log-depth scan for
               the blocks in backward (CPU default)         masks with gaps (CPU default)
triton         forward + backward kernels (CUDA)            a tiled associative scan (CUDA)
triton_tiled   opt-in: tensor cores, a chunked backward     (runs the triton path)
               without atomics; speed not yet measured
=============  ===========================================  ==========================================

``impl=None`` uses the process-wide default, `set_kernel_impl("auto" | "reference")` (the stage
scripts' ``--kernels`` flag). ``"auto"``: Triton for CUDA tensors when Triton is importable,
otherwise the fused torch path; never ``"triton_tiled"`` (see docs/kernels.md). Triton is optional
and imported only when first needed.
"""

from minirlhf.kernels.dispatch import (
    KERNEL_IMPLS,
    get_kernel_impl,
    set_kernel_impl,
    triton_is_available,
)
from minirlhf.kernels.gae import gae, gae_fused, gae_reference
from minirlhf.kernels.logprobs import (
    logprobs_from_logits,
    token_logprobs,
    token_logprobs_reference,
)

__all__ = [
    "KERNEL_IMPLS",
    "gae",
    "gae_fused",
    "gae_reference",
    "get_kernel_impl",
    "logprobs_from_logits",
    "set_kernel_impl",
    "token_logprobs",
    "token_logprobs_reference",
    "triton_is_available",
]
