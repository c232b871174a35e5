"""CLIP text encoders of SD1, SD2 and SDXL on transformers' CLIP modules, loading LDM single-file weights.

Families, as the original LDM / generative-models code and ComfyUI run them:

- SD1: OpenAI CLIP ViT-L/14 (768 wide, 12 layers, quick_gelu) at ``cond_stage_model.transformer.``,
  already in transformers naming. Last layer by default; prompts pad with the end token 49407.
- SD2: OpenCLIP ViT-H/14 (1024 wide, 24 layers, gelu) at ``cond_stage_model.model.`` in OpenCLIP
  naming. Penultimate layer by default; prompts pad with 0, as ``open_clip.tokenize`` does.
- SDXL: CLIP-L at ``conditioner.embedders.0.transformer.`` (pads with 49407) and OpenCLIP bigG
  (1280 wide, 32 layers) at ``conditioner.embedders.1.model.`` (pads with 0); both penultimate,
  concatenated to 2048 wide. Pooled: bigG's final-LayerNorm'd end-token state through its
  ``text_projection``.

Clip skip follows ComfyUI's ``stop_at_clip_layer``: -1 is the last layer, -2 the penultimate. SD1
and SD2 pass the chosen hidden state through the final LayerNorm (so -1 is exactly the model's
last hidden state, and SD2's -2 is LDM's ``ln_final`` on the penultimate layer); SDXL uses the raw
hidden state, as generative-models trained it, so its -1 is the last layer *without* the norm.

Prompt weights (see ``ldm.tokenizer``) are applied as ComfyUI does for SD: every token whose weight
``w`` is not 1 becomes ``z_empty + w * (z - z_empty)``, where ``z_empty`` is the encoding, at the
same position, of the empty prompt (start, end, padding). Longer prompts are encoded in 77-token
chunks concatenated along the sequence; a batch is padded with empty-prompt chunks to the longest
prompt, and the pooled output is that of each prompt's first chunk.

Modules for LoRA: ``encoders[name].text_model`` is transformers' CLIP text transformer, so kohya's
``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (``lora_te1_``/``lora_te2_`` for SDXL's
CLIP-L/bigG) names ``encoders.clip_l.text_model.encoder.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ldm.tokenizer import CHUNK_LENGTH, END_TOKEN, START_TOKEN, VOCAB_SIZE, ClipTokenizer, Embeddings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipConfig:
    """One CLIP text transformer and where its weights sit in an LDM file."""

    name: str  # "clip_l", "clip_h" or "clip_g": the key in TextEncoder.encoders
    ldm_prefix: str
    layout: str  # "hf": transformers names under text_model.; "openclip": OpenCLIP names
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    activation: str  # "quick_gelu" for OpenAI CLIP-L, "gelu" for OpenCLIP
    projection_dim: int | None  # width of text_projection, None when the file has none
    pad_token: int
    layer_norm_hidden_state: bool  # final LayerNorm on the hidden state that clip skip selects


@dataclass(frozen=True)
class TextEncoderConfig:
    """The text encoders of one SD family, in the order their outputs are concatenated."""

    family: str  # "sd1", "sd2" or "sdxl"
    encoders: tuple[ClipConfig, ...]
    default_clip_skip: int

    @property
    def context_dim(self) -> int:
        """Width of ``TextEncoding.cond``: the UNet's cross-attention context width."""
        return sum(encoder.hidden_size for encoder in self.encoders)

    @property
    def pooled_dim(self) -> int:
        last = self.encoders[-1]
        return last.projection_dim or last.hidden_size


@dataclass
class TextEncoding:
    cond: Tensor  # [batch, 77 * chunks, context_dim]
    pooled: Tensor | None  # [batch, pooled_dim]
    # Further options each CONDITIONING entry carries, by ComfyUI's names (e.g. LTX-Video's "attention_mask").
    extra: dict[str, Tensor] = field(default_factory=dict)


class PinnableTextEncoder(nn.Module):
    """A text encoder built around one T5-family encoder (`main_encoder` names the attribute holding it), which a
    loader may pin to the CPU (`pinned_to_cpu`, the loaders' device "cpu"): `.to()` then changes its dtype only, so
    the engine's moves leave it there. Its device and dtype are the main encoder's."""

    pinned_to_cpu: bool = False
    main_encoder: str = "t5xxl"

    def to(self, *args: object, **kwargs: object) -> PinnableTextEncoder:
        if not self.pinned_to_cpu:
            return super().to(*args, **kwargs)
        _, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self if dtype is None else super().to(dtype=dtype)

    @property
    def device(self) -> torch.device:
        return getattr(self, self.main_encoder).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.main_encoder).dtype


@dataclass(frozen=True)
class _Slot:
    """Where one encoder of a family sits in an LDM file and how that family runs it."""

    name: str
    ldm_prefix: str
    layout: str
    pad_token: int
    layer_norm_hidden_state: bool


@dataclass(frozen=True)
class _Family:
    name: str
    default_clip_skip: int
    slots: tuple[_Slot, ...]


# An "hf" prefix ends where transformers' text transformer starts (its embeddings, encoder, ...).
_CLIP_L_SD1 = _Slot("clip_l", "cond_stage_model.transformer.text_model.", "hf", END_TOKEN, True)
# Some SD1 files lack the "text_model." level (ComfyUI renames them on load); kept as found.
_CLIP_L_SD1_FLAT = _Slot("clip_l", "cond_stage_model.transformer.", "hf", END_TOKEN, True)
_CLIP_H_SD2 = _Slot("clip_h", "cond_stage_model.model.", "openclip", 0, True)
_CLIP_L_SDXL = _Slot("clip_l", "conditioner.embedders.0.transformer.text_model.", "hf", END_TOKEN, False)
_CLIP_G_SDXL = _Slot("clip_g", "conditioner.embedders.1.model.", "openclip", 0, False)
_SDXL = _Family("sdxl", -2, (_CLIP_L_SDXL, _CLIP_G_SDXL))
# The SDXL refiner has OpenCLIP bigG alone, as the first embedder.
_CLIP_G_REFINER = _Slot("clip_g", "conditioner.embedders.0.model.", "openclip", 0, False)
_SDXL_REFINER = _Family("sdxl_refiner", -2, (_CLIP_G_REFINER,))
_SD2 = _Family("sd2", -2, (_CLIP_H_SD2,))
_SD1 = _Family("sd1", -1, (_CLIP_L_SD1,))
# Tried in order: the first rule whose encoders are all present in a state dict wins.
_DETECTION_RULES = (_SDXL, _SDXL_REFINER, _SD2, _SD1, _Family("sd1", -1, (_CLIP_L_SD1_FLAT,)))
_PROBE = {"hf": "embeddings.token_embedding.weight", "openclip": "token_embedding.weight"}
_LAYER_KEY = {"hf": r"encoder\.layers\.(\d+)\.", "openclip": r"transformer\.resblocks\.(\d+)\."}
_FC1 = {"hf": "encoder.layers.0.mlp.fc1.weight", "openclip": "transformer.resblocks.0.mlp.c_fc.weight"}
_ACTIVATION = {"hf": "quick_gelu", "openclip": "gelu"}
# Keys real files carry that no computation reads: CLIP's contrastive temperature, and a
# position-id buffer (corrupted in some merged checkpoints, so it is rebuilt, never loaded).
_IGNORED = {"hf": ("embeddings.position_ids",), "openclip": ("logit_scale",)}

# OpenCLIP names -> transformers names. Per layer, attn.in_proj_* holds q, k and v stacked in that
# order along dim 0; text_projection is applied as x @ P, the transpose of a Linear weight.
_OPENCLIP_NAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}


@dataclass(frozen=True)
class _KeyPair:
    ldm: str
    hf: tuple[str, ...]
    kind: str = "copy"  # "copy", "transpose" or "split" (one fused tensor -> q, k, v)


def _num_heads(hidden_size: int) -> int:
    # A state dict does not record the head count. Every released CLIP text model uses 64-wide
    # heads; widths that are not a multiple of 64 only occur in test models, which use 16.
    return hidden_size // 64 if hidden_size % 64 == 0 else max(1, hidden_size // 16)


def _make_config(family: _Family, sizes: list[tuple[int, int, int, int | None]]) -> TextEncoderConfig:
    encoders = tuple(
        ClipConfig(
            name=slot.name,
            ldm_prefix=slot.ldm_prefix,
            layout=slot.layout,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=_num_heads(hidden),
            intermediate_size=intermediate,
            activation=_ACTIVATION[slot.layout],
            projection_dim=projection,
            pad_token=slot.pad_token,
            layer_norm_hidden_state=slot.layer_norm_hidden_state,
        )
        for slot, (hidden, layers, intermediate, projection) in zip(family.slots, sizes, strict=True)
    )
    return TextEncoderConfig(family.name, encoders, family.default_clip_skip)


def text_encoder_config_from_state_dict(sd: Mapping[str, Tensor]) -> TextEncoderConfig | None:
    """The text encoder configuration of an LDM single-file state dict, None if it has none."""
    for family in _DETECTION_RULES:
        if not all(slot.ldm_prefix + _PROBE[slot.layout] in sd for slot in family.slots):
            continue
        sizes = []
        for slot in family.slots:
            prefix, layout = slot.ldm_prefix, slot.layout
            layer_key = re.compile(re.escape(prefix) + _LAYER_KEY[layout])
            layers = {int(m.group(1)) for key in sd if (m := layer_key.match(key))}
            projection = sd.get(prefix + "text_projection") if layout == "openclip" else None
            sizes.append(
                (
                    sd[prefix + _PROBE[layout]].shape[1],
                    len(layers),
                    sd[prefix + _FC1[layout]].shape[0] if prefix + _FC1[layout] in sd else 0,
                    None if projection is None else projection.shape[1],
                )
            )
        return _make_config(family, sizes)
    return None


_PRESETS: dict[str, tuple[_Family, list[tuple[int, int, int, int | None]]]] = {
    "tiny-sd1": (_SD1, [(32, 2, 64, None)]),
    "tiny-sd2": (_SD2, [(32, 2, 64, 32)]),
    "tiny-sdxl": (_SDXL, [(32, 2, 64, None), (48, 2, 96, 48)]),
    "tiny-sdxl-refiner": (_SDXL_REFINER, [(48, 2, 96, 48)]),
    "sd15": (_SD1, [(768, 12, 3072, None)]),
    "sdxl": (_SDXL, [(768, 12, 3072, None), (1280, 32, 5120, 1280)]),
    "sdxl-refiner": (_SDXL_REFINER, [(1280, 32, 5120, 1280)]),
}


def random_text_encoder_config(preset: str) -> TextEncoderConfig:
    """Configuration of a named preset: tiny-sd1, tiny-sd2, tiny-sdxl, tiny-sdxl-refiner (tests), sd15, sdxl or
    sdxl-refiner (real sizes)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r}; known: {', '.join(_PRESETS)}")
    return _make_config(*_PRESETS[preset])


def _install_output_hooks(model: nn.Module) -> None:
    """Installs transformers 5's hidden-state capturing hooks now rather than at the first forward. A LoRA'd copy
    (ldm.lora.shallow_copy) shares this model's hook lists but not its "installed" mark: hooks the copy's first
    forward installed would reach this model, which would then install its own too and collect every hidden
    state twice (the wrong layer for SDXL's penultimate one)."""
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # transformers 4 collects hidden states without hooks
        return
    maybe_install_capturing_hooks(model)


class ClipTextTransformer(nn.Module):
    """One CLIP text transformer (a transformers model) with its LDM key mapping."""

    def __init__(self, config: ClipConfig) -> None:
        # Imported here: transformers takes seconds to import, and reading a config from a state
        # dict (or importing this module at all) should not pay for it.
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        self.config = config
        hf_config = CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            max_position_embeddings=CHUNK_LENGTH,
            hidden_act=config.activation,
            layer_norm_eps=1e-5,
            projection_dim=config.projection_dim or config.hidden_size,
            bos_token_id=START_TOKEN,
            # Pooling reads the first end token; transformers' legacy argmax path is for eos id 2.
            eos_token_id=END_TOKEN,
            pad_token_id=config.pad_token,
        )
        model = CLIPTextModel(hf_config)
        # transformers 4 wraps the transformer in .text_model, 5 does not; keeping the inner module
        # as our own .text_model gives parameter names equal to the LDM keys under the prefix.
        self.text_model = getattr(model, "text_model", model)
        _install_output_hooks(model)
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False)
            if config.projection_dim
            else None
        )

    def key_pairs(self) -> list[_KeyPair]:
        """Every parameter as (LDM key, transformers names, conversion)."""
        prefix = self.config.ldm_prefix
        if self.config.layout == "hf":
            return [_KeyPair(prefix + name, ("text_model." + name,)) for name in self.text_model.state_dict()]
        pairs = [_KeyPair(prefix + ours, (theirs,)) for ours, theirs in _OPENCLIP_NAMES.items()]
        for i in range(self.config.num_layers):
            block, layer = f"{prefix}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
            pairs += [
                _KeyPair(f"{block}{ours}.{param}", (f"{layer}{theirs}.{param}",))
                for ours, theirs in _OPENCLIP_LAYER_MODULES.items()
                for param in ("weight", "bias")
            ]
            pairs += [
                _KeyPair(block + ours, tuple(f"{layer}self_attn.{p}_proj.{suffix}" for p in "qkv"), "split")
                for ours, suffix in _OPENCLIP_FUSED.items()
            ]
        if self.config.projection_dim:
            pairs.append(_KeyPair(prefix + "text_projection", ("text_projection.weight",), "transpose"))
        return pairs

    def ignored_keys(self) -> tuple[str, ...]:
        return tuple(self.config.ldm_prefix + key for key in _IGNORED[self.config.layout])

    def forward(self, ids: Tensor, layer: int, extra: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Hidden state after ``layer`` (-1 last) for each token, and the pooled end-token state. ``extra``
        [k, width] are the token vectors of ids VOCAB_SIZE .. VOCAB_SIZE + k - 1 (textual inversion)."""
        if extra is None:
            out = self.text_model(input_ids=ids, output_hidden_states=True)
        else:
            table = self.text_model.embeddings.token_embedding
            vectors = torch.cat([table.weight, extra.to(table.weight)])
            table.forward = lambda input_ids: nn.functional.embedding(input_ids, vectors)  # for this call only
            try:
                out = self.text_model(input_ids=ids, output_hidden_states=True)
            finally:
                del table.forward
        hidden = out.hidden_states[layer]  # index 0 is the embeddings, -1 the last layer's output
        if self.config.layer_norm_hidden_state:
            hidden = self.text_model.final_layer_norm(hidden)
        pooled = out.pooler_output  # final-LayerNorm'd state at the first end token
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled


class TextEncoder(nn.Module):
    """The text conditioning of one SD family: tokenizer, encoder(s) and LDM weight mapping."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = ClipTokenizer()
        self.encoders = nn.ModuleDict({c.name: ClipTextTransformer(c) for c in config.encoders})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def load_ldm_state_dict(self, sd: Mapping[str, Tensor]) -> set[str]:
        """Load weights from LDM keys; return every key consumed, intentionally ignored ones included.

        Raises ValueError naming every missing key or wrong shape, before changing any weight. A
        model built on the meta device takes the tensors as they are (cast to its dtype), without
        a copy; otherwise they are copied into the existing parameters.
        """
        consumed: set[str] = set()
        missing: list[str] = []
        wrong_shapes: list[str] = []
        states: dict[str, dict[str, Tensor]] = {}
        for name, encoder in self.encoders.items():
            expected = encoder.state_dict()
            state: dict[str, Tensor] = {}
            for pair in encoder.key_pairs():
                if pair.ldm not in sd:
                    missing.append(pair.ldm)
                    continue
                consumed.add(pair.ldm)
                for hf_name, tensor in zip(pair.hf, _to_hf(sd[pair.ldm], pair), strict=True):
                    target = expected[hf_name]
                    if tensor.shape != target.shape:
                        wrong_shapes.append(
                            f"{pair.ldm}: {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                        )
                    device = tensor.device if target.is_meta else target.device
                    state[hf_name] = tensor.to(device=device, dtype=target.dtype)
            states[name] = state
        if missing:
            raise ValueError(f"text encoder: {len(missing)} keys missing from the state dict: {missing}")
        if wrong_shapes:
            raise ValueError(f"text encoder: tensors of the wrong shape: {wrong_shapes}")
        for name, encoder in self.encoders.items():
            on_meta = any(p.is_meta for p in encoder.parameters())
            encoder.load_state_dict(states[name], strict=True, assign=on_meta)
            if on_meta:
                embeddings = encoder.text_model.embeddings
                positions = torch.arange(CHUNK_LENGTH, device=embeddings.token_embedding.weight.device)
                embeddings.register_buffer("position_ids", positions.expand((1, -1)), persistent=False)
        ignored = {key for encoder in self.encoders.values() for key in encoder.ignored_keys() if key in sd}
        if ignored:
            logger.info("text encoder: ignoring unused keys %s", sorted(ignored))
        return consumed | ignored

    def ldm_state_dict(self) -> dict[str, Tensor]:
        """All weights under their LDM keys (the inverse of ``load_ldm_state_dict``)."""
        out: dict[str, Tensor] = {}
        for encoder in self.encoders.values():
            state = encoder.state_dict()
            for pair in encoder.key_pairs():
                out[pair.ldm] = _to_ldm([state[name] for name in pair.hf], pair)
        return out

    @torch.no_grad()
    def init_random_weights(self, seed: int, std: float = 0.02) -> None:
        """Seeded small random weights (LayerNorm scales around 1) so that tiny models give finite output."""
        generator = torch.Generator().manual_seed(seed)
        norm_scales = {id(m.weight) for m in self.modules() if isinstance(m, nn.LayerNorm)}
        for param in self.parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(noise + 1.0 if id(param) in norm_scales else noise)

    def encode(self, prompts: list[str], clip_skip: int | None = None,
               per_encoder: dict[str, list[str]] | None = None,
               embeddings: Callable[[str], dict[int, Tensor] | None] | None = None) -> TextEncoding:
        """Encode prompts (emphasis syntax allowed) to the UNet's context and the pooled vector.

        ``clip_skip`` is ComfyUI's stop_at_clip_layer (-1 last layer, -2 penultimate, ...); None
        takes the family's default. ``per_encoder`` gives some encoders prompts of their own (SDXL's
        ``{"clip_l": [...], "clip_g": [...]}``, as CLIPTextEncodeSDXL's text_l and text_g); the
        encoders' chunks are padded with empty ones to the same count. ``cond`` and ``pooled`` come
        in the model's dtype and device. ``embeddings(name)`` gives a textual-inversion embedding's
        vectors by width, for ``embedding:NAME`` in prompts (ldm.embeddings.load_embedding reads the files).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        texts = {name: (per_encoder or {}).get(name, prompts) for name in self.encoders}
        unknown = set(per_encoder or {}) - set(self.encoders)
        if unknown or any(len(t) != len(prompts) for t in texts.values()):
            raise ValueError(f"per_encoder needs {len(prompts)} prompts for some of {sorted(self.encoders)}, "
                             f"got {({k: len(v) for k, v in (per_encoder or {}).items()})}")
        layer = self._layer(clip_skip)
        named = None if embeddings is None else Embeddings(embeddings)
        tokenized_by_text = {text: self.tokenizer.tokenize(text, named) for batch in texts.values() for text in batch}
        tokenized = {name: [tokenized_by_text[text] for text in batch] for name, batch in texts.items()}
        num_chunks = max(len(t.ids) for batch in tokenized.values() for t in batch)
        batch = len(prompts)
        conds: list[Tensor] = []
        pooled: Tensor | None = None
        for name, encoder in self.encoders.items():
            pad = encoder.config.pad_token
            padded = [t.padded(pad, num_chunks) for t in tokenized[name]]
            ids = torch.tensor([row for rows, _ in padded for row in rows], device=self.device)
            # Kept in float32 so that fp16 models weigh as precisely as the reference does.
            weights = torch.tensor([row for _, rows in padded for row in rows], device=self.device).unsqueeze(-1)
            weighted = bool((weights != 1.0).any())
            if weighted:
                empty = [START_TOKEN, END_TOKEN] + [pad] * (CHUNK_LENGTH - 2)
                ids = torch.cat([ids, torch.tensor([empty], device=self.device)])
            extra = named.table(encoder.config.hidden_size, name) if named is not None and named.slots else None
            hidden, pool = encoder(ids, layer, extra)
            if weighted:
                z_empty, hidden, pool = hidden[-1:].float(), hidden[:-1], pool[:-1]
                moved = (z_empty + weights * (hidden.float() - z_empty)).to(hidden.dtype)
                hidden = torch.where(weights != 1.0, moved, hidden)
            conds.append(hidden.reshape(batch, num_chunks * CHUNK_LENGTH, -1))
            pooled = pool.reshape(batch, num_chunks, -1)[:, 0]
        return TextEncoding(torch.cat(conds, dim=-1), pooled)

    def _layer(self, clip_skip: int | None) -> int:
        layer = self.config.default_clip_skip if clip_skip is None else clip_skip
        depth = min(encoder.num_layers for encoder in self.config.encoders)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer <= -1:
            raise ValueError(
                f"clip_skip must be an int from -{depth} to -1 (-1 is the last layer), got {layer!r}"
            )
        return layer


def _to_hf(tensor: Tensor, pair: _KeyPair) -> tuple[Tensor, ...]:
    if pair.kind == "split":
        return tuple(tensor.chunk(3, dim=0))
    if pair.kind == "transpose":
        return (tensor.t().contiguous(),)
    return (tensor,)


def _to_ldm(tensors: list[Tensor], pair: _KeyPair) -> Tensor:
    if pair.kind == "split":
        return torch.cat(tensors, dim=0)
    if pair.kind == "transpose":
        return tensors[0].t().contiguous()
    return tensors[0]


def build_text_encoder(
    config: TextEncoderConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> TextEncoder:
    """A frozen (eval, no grad) text encoder. ``device="meta"`` allocates nothing until loading."""
    with torch.device(device or "cpu"):
        encoder = TextEncoder(config)
    if dtype is not None:
        encoder.to(dtype)
    return encoder.eval().requires_grad_(False)
