"""PhotoMaker v1 (Li et al. 2023, "PhotoMaker: Customizing Realistic Human Photos via Stacked ID Embedding"): its ID
encoder, and the fusion of a person's photos into the class word of an SDXL prompt.

The ID encoder (TencentARC's `photomaker/model.py`) is a CLIP ViT-L/14 image tower whose pooled (post-LayerNorm)
class token goes through two projections, `visual_projection` (1024 -> 768, CLIP-L's width) and
`visual_projection_2` (1024 -> 1280, bigG's), concatenated to one 2048-wide ID embedding per photo. Its
`fuse_module` merges each ID embedding with the prompt's embedding at the class word (SDXL's 2048-wide
penultimate-layer output, CLIP-L's and bigG's side by side):
    x = mlp1([class_embed, id_embed]) + class_embed;  x = mlp2(x);  fused = LayerNorm(x)
where each MLP is LayerNorm -> Linear -> GELU (exact) -> Linear, mlp2 with a residual.

The prompt names the person with a class word followed by the trigger word, "a man photomaker": the trigger's
tokens are dropped, and the class word's last token is repeated once per photo, each copy taking one photo's
fused embedding (the paper's stacked ID embedding, as its pipeline builds it). The rest of the prompt, the pooled
output included, is encoded as usual from the edited tokens. ComfyUI's PhotoMakerEncode follows the same rule for a
batch of one photo and prompts of one-token words; it finds the trigger by `text.split(" ")` and uses only the
first photo of a batch. Here the trigger is found among the tokens (so "photomaker," and "Photomaker" count, as
the paper's pipeline finds its trigger token), a class word of several tokens fuses at its last one, and every
photo of a batch counts.

Files: TencentARC's `photomaker-v1.bin` (a torch pickle `{"id_encoder": {...}, "lora_weights": {...}}`, read with
weights_only) or a safetensors conversion (the encoder's keys bare or under `id_encoder.`). The `lora_weights`
half is a LoRA for the UNet in diffusers' attention-processor layout; ComfyUI's nodes do not read it (nor its
LoraLoader, the pickle as it is), so neither do these: it is skipped, not reported. PhotoMaker v2
(`qformer_perceiver.*`, fed InsightFace face embeddings) is refused by name, as ComfyUI's loader cannot load it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.checkpoint import CheckpointError, StateDict, _load_torch, _materialize, _sniff, load_state_dict
from ldm.clip_vision import ClipVisionConfig, ClipVisionModel, clip_vision_config, preprocess
from ldm.text_encoders import TextEncoder, TextEncoding
from ldm.tokenizer import (
    CHUNK_CAPACITY,
    CHUNK_LENGTH,
    START_TOKEN,
    VOCAB_SIZE,
    ClipTokenizer,
    Embeddings,
    TokenizedPrompt,
    _bpe,
)

TRIGGER_WORD = "photomaker"  # ComfyUI's; the paper's pipeline lets its caller choose (its demos say "img")
_ENCODER_PREFIX, _LORA_PREFIX = "id_encoder.", "lora_weights."
_IGNORED = ("vision_model.embeddings.position_ids",)  # a buffer rebuilt on load, as for every CLIP tower here


@dataclass(frozen=True)
class PhotoMakerConfig:
    vision: ClipVisionConfig
    projection_2_dim: int  # visual_projection_2's width: 1280, bigG's

    @property
    def embed_dim(self) -> int:
        """The width of an ID embedding, and of the prompts it fuses into (2048: SDXL's)."""
        return self.vision.projection_dim + self.projection_2_dim


class FuseMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with a residual when it keeps its width (PhotoMaker's MLP)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, residual: bool) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc2(F.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.residual else out


class FuseModule(nn.Module):
    """Merges ID embeddings into the class word's prompt embeddings, one photo per copy of the class token."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.mlp1 = FuseMLP(embed_dim * 2, embed_dim, embed_dim, residual=False)
        self.mlp2 = FuseMLP(embed_dim, embed_dim, embed_dim, residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: Tensor, id_embeds: Tensor) -> Tensor:
        """class_embeds, id_embeds [n, embed_dim] -> the fused embeddings [n, embed_dim]."""
        x = self.mlp1(torch.cat([class_embeds, id_embeds], dim=-1)) + class_embeds
        return self.layer_norm(self.mlp2(x))


class PhotoMakerIDEncoder(nn.Module):
    """The ID encoder, its parameters named as the file's keys (transformers' CLIP vision modules)."""

    def __init__(self, config: PhotoMakerConfig) -> None:
        super().__init__()
        self.config = config
        tower = ClipVisionModel(config.vision).model
        self.vision_model = tower.vision_model
        self.visual_projection = tower.visual_projection
        self.visual_projection_2 = nn.Linear(config.vision.width, config.projection_2_dim, bias=False)
        self.fuse_module = FuseModule(config.embed_dim)

    @torch.no_grad()
    def id_embeds(self, image: Tensor) -> Tensor:
        """An IMAGE [B, H, W, C] in 0..1 (CLIP's preprocessing, centre-cropped) -> ID embeddings [B, embed_dim]."""
        weight = self.visual_projection.weight
        pixels = preprocess(image.to(weight.device), self.config.vision.image_size).to(weight.dtype)
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)

    @torch.no_grad()
    def fuse(self, class_embeds: Tensor, id_embeds: Tensor) -> Tensor:
        weight = self.visual_projection.weight
        return self.fuse_module(class_embeds.to(weight), id_embeds.to(weight))


# --- files -----------------------------------------------------------------------------------------------

@dataclass
class LoadedPhotoMaker:
    model: PhotoMakerIDEncoder
    unused_keys: list[str]
    path: Path


def _encoder_weights(path: Path) -> StateDict:
    """The ID encoder's tensors of a PhotoMaker file, under their bare names (`lora_weights` left out)."""
    if _sniff(path) == "safetensors":
        sd = load_state_dict(path)
    else:
        data = _load_torch(path)
        if isinstance(data, dict) and isinstance(data.get("id_encoder"), dict):
            data = data["id_encoder"]
        sd = {k: v for k, v in data.items() if isinstance(v, Tensor)} if isinstance(data, dict) else {}
    if any(k.startswith(_ENCODER_PREFIX) for k in sd):
        sd = {k.removeprefix(_ENCODER_PREFIX): v for k, v in sd.items() if not k.startswith(_LORA_PREFIX)}
    return sd


def _refusal(sd: StateDict) -> str | None:
    """Why a file is no PhotoMaker v1 ID encoder, or None when it is one."""
    if any(k.startswith("qformer_perceiver.") for k in sd):
        return ("PhotoMaker V2, which needs InsightFace face embeddings beside the photos; ComfyUI's PhotoMaker nodes, "
                "and these, read PhotoMaker V1 (photomaker-v1.bin) only")
    if "fuse_module.layer_norm.weight" in sd and "visual_projection_2.weight" in sd:
        return None
    if any(k.startswith("vision_model.") for k in sd):
        return "a CLIP vision model without PhotoMaker's fuse module (load it with Load CLIP Vision)"
    if any(k.startswith("model.diffusion_model.") for k in sd):
        return "a Stable Diffusion checkpoint (load it with Load Checkpoint)"
    if any("lora" in k for k in sd):
        return "a LoRA (load it with Load LoRA)"
    return "no id_encoder (vision_model.*, visual_projection_2, fuse_module.*) weights"


def photomaker_config(weights: StateDict) -> PhotoMakerConfig:
    """The encoder's shape from its weights; raises CheckpointError when its parts do not fit together."""
    config = PhotoMakerConfig(clip_vision_config(weights), weights["visual_projection_2.weight"].shape[0])
    fuse_width = weights["fuse_module.layer_norm.weight"].shape[0]
    if fuse_width != config.embed_dim:
        raise CheckpointError(f"a fuse module {fuse_width} wide for ID embeddings {config.vision.projection_dim} + "
                              f"{config.projection_2_dim} = {config.embed_dim} wide")
    return config


def load_photomaker(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> LoadedPhotoMaker:
    """A PhotoMaker v1 ID encoder on `device` in `dtype`. Every key of the encoder's part is used or listed in
    `unused_keys`; a file that holds none, or PhotoMaker v2's, raises CheckpointError saying what it is."""
    path = Path(path)
    sd = _encoder_weights(path)
    reason = _refusal(sd)
    if reason is not None:
        raise CheckpointError(f"{path.name}: not a PhotoMaker v1 model: {reason}")
    try:
        config = photomaker_config(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    model = _materialize(lambda: PhotoMakerIDEncoder(config), sd, "PhotoMaker ID encoder", path, device, dtype)
    embeddings = model.vision_model.embeddings
    # A non-persistent buffer, left on the meta device by the weights-only load.
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
    used = set(model.state_dict()) | set(_IGNORED)
    return LoadedPhotoMaker(model, sorted(k for k in sd if k not in used), path)


# --- the prompt ------------------------------------------------------------------------------------------

def _starts_word(token: int) -> bool:
    """Whether a word may start after this token: the start token, an embedding's vector, or a word's end."""
    return token == START_TOKEN or token >= VOCAB_SIZE or _bpe().convert_ids_to_tokens(token).endswith("</w>")


def mark_class_word(prompt: TokenizedPrompt, copies: int,
                    trigger: str = TRIGGER_WORD) -> tuple[TokenizedPrompt, list[int]] | None:
    """The prompt with its first trigger word's tokens dropped and the class word's last token (the one before them)
    repeated `copies` times, and the positions of those copies in the encoded sequence (chunk * 77 + index);
    None when the prompt has no trigger word. A chunk that grows past 75 tokens splits in two."""
    pattern = ClipTokenizer().encode_text(trigger)
    ids, weights = [list(c) for c in prompt.ids], [list(w) for w in prompt.weights]
    where = next(((c, j) for c, chunk in enumerate(ids) for j in range(1, len(chunk))
                  if chunk[j:j + len(pattern)] == pattern and _starts_word(chunk[j - 1])), None)
    if where is None:
        return None
    c, j = where
    del ids[c][j:j + len(pattern)], weights[c][j:j + len(pattern)]
    if j == 1 and c == 0:
        raise ValueError(f"the trigger word {trigger!r} follows no class word: put the word for the person before "
                         f"it, as in 'photograph of a man {trigger}'")
    # With words kept whole within a chunk, a trigger that opens a chunk has its class word ending the one before.
    c, j = (c, j - 1) if j > 1 else (c - 1, len(ids[c - 1]) - 2)
    ids[c][j + 1:j + 1] = [ids[c][j]] * (copies - 1)
    weights[c][j + 1:j + 1] = [weights[c][j]] * (copies - 1)
    body, body_weights = ids[c][1:-1], weights[c][1:-1]
    pieces = range(0, len(body), CHUNK_CAPACITY)
    ids[c:c + 1] = [[ids[c][0], *body[k:k + CHUNK_CAPACITY], ids[c][-1]] for k in pieces]
    weights[c:c + 1] = [[1.0, *body_weights[k:k + CHUNK_CAPACITY], 1.0] for k in pieces]
    first = j - 1  # the first copy's index in the chunk's body
    positions = [(c + k // CHUNK_CAPACITY) * CHUNK_LENGTH + 1 + k % CHUNK_CAPACITY
                 for k in range(first, first + copies)]
    return TokenizedPrompt(ids, weights), positions


class _MarkingTokenizer(ClipTokenizer):
    """The text encoder's tokenizer, marking the class word of the prompts it tokenizes (see `mark_class_word`)."""

    def __init__(self, copies: int) -> None:
        self.copies = copies
        self.positions: list[int] | None = None

    def tokenize(self, prompt: str, embeddings: Embeddings | None = None) -> TokenizedPrompt:
        tokenized = super().tokenize(prompt, embeddings)
        marked = mark_class_word(tokenized, self.copies)
        if marked is None:
            return tokenized
        tokenized, self.positions = marked
        return tokenized


def encode_with_id(id_encoder: PhotoMakerIDEncoder, text_encoder: TextEncoder, prompt: str, image: Tensor,
                   **encode_options: object) -> TextEncoding:
    """SDXL's encoding of `prompt` with the person in `image` (an IMAGE batch, one photo each) fused into its class
    word (the word before the trigger word). A prompt without the trigger word is encoded as it is, the photos
    unused, as ComfyUI does. `encode_options` go to `TextEncoder.encode` (clip_skip, embeddings)."""
    width = text_encoder.config.context_dim
    if width != id_encoder.config.embed_dim:
        raise ValueError(f"PhotoMaker fuses into {id_encoder.config.embed_dim}-wide prompts (SDXL's) and this text "
                         f"encoder ({text_encoder.config.family}) makes {width}-wide ones: load an SDXL checkpoint")
    tokenizer = _MarkingTokenizer(copies=image.shape[0])
    view = copy.copy(text_encoder)  # shares every weight; only its tokenizer differs
    view.tokenizer = tokenizer
    encoding = view.encode([prompt], **encode_options)
    if tokenizer.positions is None:
        return encoding
    cond = encoding.cond.clone()
    fused = id_encoder.fuse(cond[0, tokenizer.positions], id_encoder.id_embeds(image))
    cond[0, tokenizer.positions] = fused.to(cond)
    return TextEncoding(cond, encoding.pooled)
