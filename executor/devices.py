"""Which device and dtype the models run on: CUDA, Apple MPS or the CPU (`--cpu` forces it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DeviceManager:
    force_cpu: bool = False
    _device: Any = None

    @property
    def device(self) -> Any:
        """Probed on first use, never at import time."""
        if self._device is None:
            import torch

            if not self.force_cpu and torch.cuda.is_available():
                self._device = torch.device("cuda")
            elif not self.force_cpu and torch.backends.mps.is_available():
                self._device = torch.device("mps")
            else:
                self._device = torch.device("cpu")
        return self._device

    @property
    def dtype(self) -> Any:
        """bf16 where the GPU supports it, else fp16 on GPUs; fp32 on the CPU."""
        import torch

        if self.device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if self.device.type == "mps":
            return torch.float16
        return torch.float32

    @property
    def vae_dtype(self) -> Any:
        """The VAE overflows in fp16 (black or NaN images), so it never runs in fp16."""
        import torch

        return torch.float32 if self.dtype == torch.float16 else self.dtype
