"""marlin: a PyTorch Lightning + Hydra research template for person re-identification."""

import os as _os

#: oneDNN's AMX bf16 convolution is broken in torch 2.14.1 (pytorch/pytorch#169688); capping
#: oneDNN at AVX512_CORE_BF16 avoids it and costs fp32 nothing. It must be set before torch's
#: first oneDNN call, hence here; an explicit ONEDNN_MAX_CPU_ISA wins. See src/utils/precision.py.
ONEDNN_ISA_CAP = "AVX512_CORE_BF16"
_os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_ISA_CAP)
