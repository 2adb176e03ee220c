"""Multi-scale deformable sampling for MMFS: one ``torch.library`` op over three backends.

``ms_deform_sample`` is the public entry point; see :mod:`cuda_ops.ops` for backend selection
(``WEFT_DEFORM_BACKEND=auto|cuda|cpu|reference``) and :mod:`cuda_ops.build` for the JIT build.
"""

from cuda_ops.ops import ms_deform_sample
from cuda_ops.reference import ms_deform_sample_reference

__all__ = ["ms_deform_sample", "ms_deform_sample_reference"]
