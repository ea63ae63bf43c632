"""Custom GPU kernels (Metal and CUDA through mx.fast) with pure-MLX fallbacks.

Kernel bodies are written once (``*_body.h``) against the small macro set of
``sources.py`` and compiled for Metal, CUDA, or the C++ emulation the tests run.
"""

from .ssm_step import fused_ssm_step, kernel_self_check, ssm_step_reference

__all__ = ["fused_ssm_step", "kernel_self_check", "ssm_step_reference"]
