"""Where models run and live: CUDA, Apple MPS or the CPU, the compute dtype, and a VRAM budget.

Loaders put weights on the *offload* device (the CPU); a node asks `use(module)` for the model it is
about to run, which moves it to the *compute* device, first moving the least recently used models
back when the VRAM budget would be exceeded. With `lowvram`, a UNet or a diffusion transformer stays on
the offload device and its blocks are streamed to the compute device one at a time (`ldm.offload`). On the CPU both
devices are the same and moving is free, but the bookkeeping (and the streaming hooks) still run,
so the code that matters on a GPU is exercised by the CPU tests.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

WEIGHTS_DTYPES = ("default", "fp8", "int8")


@dataclass
class EngineOptions:
    """The engine's device options, as the command line gives them (`--cpu`, `--lowvram`, ...)."""

    force_cpu: bool = False
    lowvram: bool = False
    weights_dtype: str = "default"  # the UNet's: "fp8": e4m3 storage, upcast per layer; "int8": torchao weight-only
    te_weights_dtype: str = "default"  # the text encoders', the same choices
    compile: bool = False  # torch.compile the UNet forward (reused for every run of the same shape)
    cuda_graphs: bool = True  # on CUDA, replay the UNet's steps as a captured CUDA graph (ldm/cuda_graphs.py)
    channels_last: bool = True  # on CUDA with graphs and without compile, the UNet NHWC (ldm/layout.py)
    vram_budget: int | None = None  # bytes of model weights on the compute device; None: from the card
    ram_budget: int | None = None  # bytes of loaded models kept in RAM; None: from the machine

    def __post_init__(self) -> None:
        for value in (self.weights_dtype, self.te_weights_dtype):
            if value not in WEIGHTS_DTYPES:
                raise ValueError(f"weights dtype must be one of {WEIGHTS_DTYPES}, not {value!r}")


_defaults = EngineOptions()


def set_default_options(options: EngineOptions) -> None:
    """Options for engines created without explicit ones (the CLI sets them once, before serving)."""
    global _defaults
    _defaults = options


def default_options() -> EngineOptions:
    return _defaults


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def module_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA, MPS and the CPU allocator's)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, MemoryError)


def _streamed(module: Any) -> bool:
    """Whether --lowvram streams `module`: a UNet or ControlNet, or a diffusion model (a MODEL's denoiser, marked
    `loom_denoiser`) whose blocks hold most of its bytes. Text encoders and VAEs move whole."""
    if hasattr(module, "input_blocks"):
        return True
    from ldm.offload import streamable

    return getattr(module, "loom_denoiser", False) and streamable(module)


@dataclass
class _Resident:
    ref: weakref.ref
    size: int
    streamed: bool = False


@dataclass
class DeviceManager:
    force_cpu: bool = False
    options: EngineOptions = field(default_factory=EngineOptions)
    _device: Any = None
    _resident: OrderedDict[int, _Resident] = field(default_factory=OrderedDict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    moves: int = 0  # models moved to the compute device (for tests and stats)
    evictions: int = 0

    @property
    def device(self) -> Any:
        """Probed on first use, never at import time."""
        if self._device is None:
            import torch

            cpu = self.force_cpu or self.options.force_cpu
            if not cpu and torch.cuda.is_available():
                self._device = torch.device("cuda")
                torch.backends.cudnn.benchmark = True  # fixed shapes per run: autotuned convolutions pay
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            elif not cpu and torch.backends.mps.is_available():
                self._device = torch.device("mps")
            else:
                self._device = torch.device("cpu")
        return self._device

    @property
    def offload_device(self) -> Any:
        """Where loaded weights wait while another model has the compute device."""
        import torch

        return torch.device("cpu")

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
        """The VAE overflows in fp16 (black or NaN images), so it never runs in fp16: fp32 instead."""
        import torch

        return torch.float32 if self.dtype == torch.float16 else self.dtype

    @property
    def vram_budget(self) -> int | None:
        """Bytes of weights allowed on the compute device: the option, else the card's memory less a
        reserve for activations (a quarter, at least 1.5 GiB); None (unbounded) on the CPU."""
        if self.options.vram_budget is not None:
            return self.options.vram_budget
        if self.device.type == "cuda":
            import torch

            total = torch.cuda.get_device_properties(self.device).total_memory
            return total - max(total // 4, 3 << 29)
        if self.device.type == "mps":
            return physical_memory() // 2
        return None

    @property
    def ram_budget(self) -> int:
        """Bytes of loaded models kept in RAM: the option, else half the machine's memory."""
        return self.options.ram_budget if self.options.ram_budget is not None else physical_memory() // 2

    # --- placement ---------------------------------------------------------------------------------

    def use(self, module: Any, keep: Iterable[Any] = ()) -> Any:
        """Make `module` runnable on the compute device and mark it most recently used.

        Models that no longer fit within the VRAM budget go back to the offload device, least
        recently used first, except those in `keep` (models the same node runs together with this one,
        such as a UNet's ControlNets). With `lowvram`, UNets and ControlNets (anything with
        `input_blocks`) are streamed, and so are the diffusion transformers (`_streamed`).
        """
        with self._lock:
            key = id(module)
            entry = self._resident.get(key)
            if entry is not None and entry.ref() is module:
                self._resident.move_to_end(key)
                # Moved anyway (a no-op when in place): a LoRA copy shares tensors with its base model,
                # so offloading one may have taken weights of the other along.
                if entry.streamed:
                    from ldm.offload import stream_blocks

                    stream_blocks(module, self.device, pin_budget=self.ram_budget // 2)
                else:
                    module.to(self.device)
                return module
            self._drop_dead()
            streamed = self.options.lowvram and _streamed(module)
            if streamed:
                from ldm.offload import stream_blocks

                size = stream_blocks(module, self.device, pin_budget=self.ram_budget // 2)
            else:
                size = module_bytes(module)
            self._make_room(size, {id(m) for m in keep})
            if not streamed:
                module.to(self.device)
            self._resident[key] = _Resident(weakref.ref(module), size, streamed)
            self.moves += 1
            return module

    def resident(self) -> list[Any]:
        """The modules on the compute device, least recently used first."""
        with self._lock:
            self._drop_dead()
            return [entry.ref() for entry in self._resident.values()]

    def resident_bytes(self) -> int:
        with self._lock:
            self._drop_dead()
            return sum(entry.size for entry in self._resident.values())

    def offload(self, module: Any) -> None:
        with self._lock:
            entry = self._resident.pop(id(module), None)
            if entry is not None and entry.ref() is module:
                self._send_home(module, entry)

    def free(self) -> int:
        """Move every model back to the offload device and release cached device memory; bytes freed."""
        with self._lock:
            freed = 0
            while self._resident:
                _, entry = self._resident.popitem(last=False)
                module = entry.ref()
                if module is not None:
                    freed += entry.size
                    self._send_home(module, entry)
            self.empty_cache()
            return freed

    def empty_cache(self) -> None:
        torch = sys.modules.get("torch")
        if torch is None or self._device is None:
            return
        import gc

        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        elif self._device.type == "mps":
            torch.mps.empty_cache()

    def memory_stats(self) -> dict[str, int]:
        """Bytes on the compute device: weights this manager placed, and torch's allocator figures."""
        stats = {"resident_weights": self.resident_bytes()}
        torch = sys.modules.get("torch")
        if torch is not None and self._device is not None and self._device.type == "cuda":
            stats["allocated"] = torch.cuda.memory_allocated(self._device)
            stats["reserved"] = torch.cuda.memory_reserved(self._device)
            stats["peak_allocated"] = torch.cuda.max_memory_allocated(self._device)
        return stats

    def _make_room(self, size: int, keep: frozenset[int] | set[int] = frozenset()) -> None:
        budget = self.vram_budget
        if budget is None:
            return
        while self.resident_bytes() + size > budget:
            victim = next((key for key in self._resident if key not in keep), None)
            if victim is None:
                break
            entry = self._resident.pop(victim)
            module = entry.ref()
            if module is not None:
                log.info("offloading a %.0f MiB model to make room", entry.size / 2**20)
                self._send_home(module, entry)
                self.evictions += 1
        if self.resident_bytes() + size > budget:
            log.warning("%.0f MiB of models needed together exceed the VRAM budget of %.0f MiB; try --lowvram",
                        (self.resident_bytes() + size) / 2**20, budget / 2**20)

    def _send_home(self, module: Any, entry: _Resident) -> None:
        graphs = sys.modules.get("ldm.cuda_graphs")
        if graphs is not None:
            graphs.release(module)  # its captured graphs hold activation memory and would be stale
        if entry.streamed:
            from ldm.offload import unstream_blocks

            unstream_blocks(module)
        module.to(self.offload_device)

    def _drop_dead(self) -> None:
        for key in [k for k, entry in self._resident.items() if entry.ref() is None]:
            del self._resident[key]
