"""Custom GPU kernels (Metal and CUDA through mx.fast) with pure-MLX fallbacks.

Kernel bodies are written once (``*_body.h``) against the small macro set of
``sources.py`` and compiled for Metal, CUDA, or the C++ emulation the tests run.
Nothing here imports the model side: ``granite_mlx.ssm`` dispatches to these
kernels and passes in its plain reference step as the self-check's oracle.
"""

from .ssm_step import fused_ssm_step, kernel_self_check

__all__ = ["fused_ssm_step", "kernel_self_check"]
