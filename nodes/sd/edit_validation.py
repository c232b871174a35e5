"""Validation-time checks of Flux's edit inputs: reference latents (ReferenceLatent, Kontext) and the images that
InpaintModelConditioning (Fill) and InstructPixToPixConditioning (Depth / Canny) add to the prompts, against the
model a KSampler samples, as far as file headers tell (the model's family and, for Flux, its img_in width: its edit
kind). The run (`nodes.sd.flux_variants`) refuses the same, in the same words, where validation cannot tell."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from nodes.sd.flux_variants import concat_refusal, references_refusal
from nodes.sd.models import file_fingerprint

_UNKNOWN = "?"  # a Flux file whose edit kind its header does not tell (None is a known plain model)


@functools.lru_cache(maxsize=64)
def _flux_edit_kind(path: str, fingerprint: str) -> str | None:
    from ldm.checkpoint import CheckpointError
    from ldm.flux_files import peek_flux

    try:
        family = peek_flux(path)
    except (CheckpointError, OSError, ValueError):  # the loader reports it when it runs
        return _UNKNOWN
    return _UNKNOWN if family is None else family.unet_config.edit_kind


def model_file_facts(path: Path | None, name: Any, family: str) -> dict[str, Any]:
    """More facts of a MODEL loaded from the file `path` (named `name` in the workflow) of `family`: its name for
    messages and, for Flux, its edit kind ("fill", "control" or None) where the header tells it."""
    facts: dict[str, Any] = {"source": str(name)}
    if family == "flux" and path is not None:
        kind = _flux_edit_kind(str(path), str(file_fingerprint(path)))
        if kind != _UNKNOWN:
            facts["edit_kind"] = kind
    return facts


def with_edit_inputs(linked: dict[str, dict[str, Any]], names: tuple[str, ...], **facts: Any) -> dict[int, dict]:
    """Output facts of a node that adds edit inputs to its CONDITIONING inputs `names` (its outputs in that order):
    each input's facts, with `facts` ({"reference_latents": True}, {"concat": "inpaint" | "control"})."""
    return {i: {**linked.get(name, {}), **facts} for i, name in enumerate(names)}


def edit_input_refusal(linked: dict[str, dict[str, Any]]) -> str | None:
    """Why the MODEL linked refuses the edit inputs its prompts carry, as far as validation knows; None otherwise."""
    model = linked.get("model", {})
    family = model.get("family")
    if family is None:
        return None
    source = model.get("source", "the MODEL linked")
    known_kind = "edit_kind" in model
    for side in ("positive", "negative"):
        facts = linked.get(side, {})
        if facts.get("reference_latents") and (family != "flux" or known_kind):
            refusal = references_refusal(source, family, model.get("edit_kind"))
            if refusal:
                return refusal
        if family == "flux" and known_kind and facts.get("concat") in ("inpaint", "control"):
            refusal = concat_refusal(source, model["edit_kind"], facts["concat"] == "inpaint")
            if refusal:
                return refusal
    return None
