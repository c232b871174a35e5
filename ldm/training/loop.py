"""The shared training loop: AdamW with warmup, autocast, EMA, gradient checkpointing, resume, progress, plots."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoopConfig:
    """How long and how to optimise. A run stops at `max_steps` or after `minutes` of wall time
    (sampling included), whichever comes first; both count the whole run across resumes."""

    max_steps: int | None = None
    minutes: float | None = None
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds loss scaling)
    grad_checkpointing: bool = False
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    save_every: int = 500

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.max_steps is None and self.minutes is None:
            raise ValueError("give a budget: max_steps, minutes or both")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be 1 or more, not {self.batch_size}")

    def as_dict(self) -> dict:
        return asdict(self)


def checkpoint_modules(modules: Iterable[nn.Module]) -> int:
    """Recompute each module's activations in the backward pass instead of storing them.

    The modules' forward is wrapped on the instance, so parameter names (and checkpoint keys) do
    not change. Returns how many modules were wrapped.
    """
    count = 0
    for module in modules:
        forward = module.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        module.forward = recomputed
        count += 1
    return count


class EMA:
    """Exponential moving average of parameters, with the usual warm-up so early steps are not frozen in."""

    def __init__(self, modules: dict[str, nn.Module], decay: float) -> None:
        self.decay = decay
        self.modules = modules
        self.shadow = {f"{name}.{k}": p.detach().clone().float()
                       for name, m in modules.items() for k, p in m.named_parameters() if p.requires_grad}

    def _params(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, module in self.modules.items():
            for key, param in module.named_parameters():
                if f"{name}.{key}" in self.shadow:
                    yield f"{name}.{key}", param

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, param in self._params():
            self.shadow[key].lerp_(param.detach().float(), 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averaged weights in for the duration of the block (sampling, saving)."""
        saved = {key: param.detach().clone() for key, param in self._params()}
        with torch.no_grad():
            for key, param in self._params():
                param.copy_(self.shadow[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, param in self._params():
                    param.copy_(saved[key])


@dataclass
class History:
    steps: list[int]
    losses: list[float]


class TrainLoop:
    """Optimises `modules` on `loss_fn(generator) -> loss`; every random draw comes from one seeded
    CPU generator that is saved with the state, so a resumed run continues exactly."""

    def __init__(self, name: str, modules: dict[str, nn.Module], config: LoopConfig, out_dir: str | Path,
                 device: torch.device, state_file: str | None = None, settings: dict | None = None) -> None:
        self.name, self.modules, self.config, self.device = name, modules, config, device
        # What a saved state must have been made with to be resumed (a LoRA's alpha, say, changes no shape).
        self.settings = settings or {}
        self.out_dir = Path(out_dir)
        self.state_file = state_file or f"{name}-state.pt"
        params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.99))
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.ema = EMA(modules, config.ema_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed = 0.0
        self.history = History([], [])

    @property
    def state_path(self) -> Path:
        return self.out_dir / self.state_file

    def autocast(self) -> torch.autocast:
        dtype = PRECISIONS[self.config.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def done(self) -> bool:
        c = self.config
        return ((c.max_steps is not None and self.step >= c.max_steps)
                or (c.minutes is not None and self.elapsed >= c.minutes * 60))

    def save(self) -> Path:
        state = {
            "modules": {name: m.state_dict() for name, m in self.modules.items()},
            "ema": self.ema.shadow, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(), "step": self.step, "elapsed": self.elapsed,
            "history_steps": self.history.steps, "history_losses": self.history.losses,
            "settings": self.settings,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        partial = self.state_path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.state_path)  # an interrupted save never leaves a half-written state
        return self.state_path

    def resume(self) -> bool:
        """Load the saved state if there is one; True if the run continues from it."""
        if not self.state_path.is_file():
            return False
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        saved = state.get("settings", {})
        changed = {k: (saved[k], v) for k, v in self.settings.items() if k in saved and saved[k] != v}
        if changed:
            said = ", ".join(f"{k} {old!r} then, {new!r} now" for k, (old, new) in changed.items())
            raise ValueError(f"{self.state_path} was saved by a run with other settings ({said})")
        for name, module in self.modules.items():
            module.load_state_dict(state["modules"][name])
        self.ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"].cpu())
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.history = History(list(state["history_steps"]), list(state["history_losses"]))
        return True

    def _lr(self) -> float:
        return self.config.lr * min(1.0, (self.step + 1) / max(1, self.config.warmup_steps))

    def run(self, loss_fn: Callable[[torch.Generator], Tensor],
            on_sample: Callable[[int], None] | None = None) -> History:
        c = self.config
        for module in self.modules.values():
            module.train()
        progress = Progress(self.name, c)
        pending = torch.zeros((), device=self.device)
        pending_steps = 0
        started = time.perf_counter()
        base_elapsed = self.elapsed
        try:
            while not self.done():
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr()
                with self.autocast():
                    loss = loss_fn(self.generator)
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], c.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(self.step)
                self.step += 1
                # Summing on the device and reading back every log_every steps avoids a sync per step.
                pending += loss.detach().float()
                pending_steps += 1
                self.elapsed = base_elapsed + time.perf_counter() - started
                if self.step % c.log_every == 0 or self.done():
                    mean = float(pending) / pending_steps
                    if math.isfinite(mean):
                        self.history.steps.append(self.step)
                        self.history.losses.append(mean)
                    progress.update(self.step, mean, self.elapsed, pending_steps)
                    pending.zero_()
                    pending_steps = 0
                if self.step % c.sample_every == 0 and on_sample is not None:
                    self._sample(on_sample)
                if self.step % c.save_every == 0:
                    self.save()
        except KeyboardInterrupt:  # Ctrl-C: keep what was trained, so that the same command resumes
            progress.close()
            print(f"{self.name}: interrupted at step {self.step}; saved {self.save()}: run the same command again "
                  "to resume", file=sys.stderr)
            raise
        progress.close()
        self.save()
        plot_losses({self.name: self.history}, self.out_dir / f"{self.name}-loss.png")
        return self.history

    def _sample(self, on_sample: Callable[[int], None]) -> None:
        for module in self.modules.values():
            module.eval()
        with torch.no_grad(), self.ema.applied():
            on_sample(self.step)
        for module in self.modules.values():
            module.train()
        plot_losses({self.name: self.history}, self.out_dir / f"{self.name}-loss.png")


class Progress:
    """One status line: step, loss, steps/s, images/s and the time budget; redrawn in place on a terminal."""

    def __init__(self, name: str, config: LoopConfig) -> None:
        self.name, self.config = name, config
        self.tty = sys.stderr.isatty()
        self.last_time = time.perf_counter()

    def update(self, step: int, loss: float, elapsed: float, steps: int) -> None:
        now = time.perf_counter()
        rate = steps / max(now - self.last_time, 1e-9)
        self.last_time = now
        total = f"/{self.config.max_steps}" if self.config.max_steps else ""
        budget = f"/{self.config.minutes * 60:.0f}s" if self.config.minutes else ""
        line = (f"{self.name} step {step}{total} loss {loss:.4f} {rate:.1f} it/s "
                f"{rate * self.config.batch_size:.0f} img/s {elapsed:.0f}{budget}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def plot_losses(curves: dict[str, History], path: str | Path, width: int = 640, height: int = 360) -> Path:
    """`draw_losses` saved as a PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_losses(curves, width, height).save(path)
    return path


def draw_losses(curves: dict[str, History], width: int = 640, height: int = 360) -> PILImage:
    """A log-scale loss plot drawn with PIL (no plotting library needed on a training machine), as a PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 20, width - 10, height - 30
    draw.rectangle((left, top, right, bottom), outline="black")
    points = [(s, v) for h in curves.values() for s, v in zip(h.steps, h.losses, strict=True) if v > 0]
    if points:
        max_step = max(s for s, _ in points) or 1
        low, high = (math.log10(f(v for _, v in points)) for f in (min, max))
        high = max(high, low + 1e-3)
        colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
        for i, (name, history) in enumerate(curves.items()):
            xy = [(left + (right - left) * s / max_step, bottom - (bottom - top) * (math.log10(v) - low) / (high - low))
                  for s, v in zip(history.steps, history.losses, strict=True) if v > 0]
            if len(xy) > 1:
                draw.line(xy, fill=colours[i % len(colours)], width=2)
            draw.text((left + 8, top + 6 + 14 * i), name, fill=colours[i % len(colours)])
        draw.text((4, top), f"{10 ** high:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{10 ** low:.3g}", fill="black")
        draw.text((right - 60, bottom + 8), f"step {max_step}", fill="black")
    return image


def save_grid(images: Tensor, path: str | Path, columns: int = 8) -> Path:
    """Images [N, 3, H, W] in -1..1 as one PNG grid."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(images.float().cpu()):
        r, col = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = (image.clamp(-1, 1) + 1) / 2
    array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
