"""Node types adapted from ComfyUI's classic node interface (INPUT_TYPES, RETURN_TYPES, FUNCTION, ...)."""

from __future__ import annotations

import inspect
import math
import re
import traceback
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from nodes.node import Node, NodeDefinitionError
from nodes.spec import ANY_TYPE, InputSpec, Output

# Modules of ComfyUI itself that node files import; Loom provides none of them. (`nodes` is also
# ComfyUI's, but here it names Loom's own package, so only a missing name from it counts.)
COMFY_MODULES = frozenset({
    "comfy", "comfy_extras", "comfy_execution", "comfy_api", "comfy_api_nodes", "comfy_config", "folder_paths",
    "server", "execution", "node_helpers", "latent_preview", "app", "nodes",
})

# Node types built into ComfyUI (nodes.py and the comfy_extras files it loads, API nodes aside) that Loom does not
# provide, by the file that defines them, so that a workflow naming one is told it needs a feature of ComfyUI's
# rather than a custom node pack: mostly model families Loom does not run and 3-D, segmentation and mesh tools.
# Taken from ComfyUI's sources in November 2026 (some ids read from class names); newer ones may be missing.
COMFY_CORE_NODES_MISSING = frozenset({
    # nodes_ace.py
    "EmptyAceStepLatentAudio", "TextEncodeAceStepAudio",
    # nodes_ar_video.py
    "EmptyARVideoLatent", "SamplerARVideo",
    # nodes_audio_encoder.py
    "AudioEncoderEncode", "AudioEncoderLoader",
    # nodes_bernini.py
    "BerniniConditioning",
    # nodes_bg_removal.py
    "LoadBackGroundRemovalModel", "RemoveBackGround",
    # nodes_boogu.py
    "TextEncodeBooguEdit",
    # nodes_camera.py
    "CreateCameraInfo",
    # nodes_camera_angle.py
    "CameraAngle",
    # nodes_chroma_radiance.py
    "ChromaRadianceOptions", "EmptyChromaRadianceLatentImage",
    # nodes_compositor.py
    "AddLayer", "ImageCompositor", "LayersFromBoundingBoxes",
    # nodes_cosmos.py
    "CosmosImageToVideoLatent", "CosmosPredict2ImageToVideoLatent", "EmptyCosmosLatentVideo",
    # nodes_depth_anything_3.py
    "DA3GeometryToMesh", "DA3Inference", "DA3Render", "LoadDA3Model",
    # nodes_gaussian_splat.py
    "File3DToSplat", "GetSplatCount", "MergeSplat", "RenderSplat", "SplatToFile3D", "SplatToMesh", "TransformSplat",
    # nodes_glsl.py
    "GLSLShader",
    # nodes_hidream_o1.py
    "EmptyHiDreamO1LatentImage", "HiDreamO1PatchSeamSmoothing", "HiDreamO1ReferenceImages",
    # nodes_hunyuan.py
    "CLIPTextEncodeHunyuanDiT", "HunyuanImageToVideo", "HunyuanRefinerLatent", "TextEncodeHunyuanVideo_ImageToVideo",
    # nodes_hunyuan3d.py
    "EmptyLatentHunyuan3Dv2", "Hunyuan3Dv2Conditioning", "Hunyuan3Dv2ConditioningMultiView", "VAEDecodeHunyuan3D",
    "VoxelToMesh", "VoxelToMeshBasic",
    # nodes_images.py
    "SaveSVGNode",
    # nodes_joyimage.py
    "TextEncodeJoyImageEdit", "TextEncodeJoyImageEditPlus",
    # nodes_json_prompt.py
    "BuildJsonPromptIdeogram",
    # nodes_kandinsky5.py
    "CLIPTextEncodeKandinsky5", "Kandinsky5ImageToVideo", "NormalizeVideoLatentStart",
    # nodes_load_3d.py
    "Load3D", "Preview3D",
    # nodes_loop.py
    "EndLoop", "StartLoop",
    # nodes_lotus.py
    "LotusConditioning",
    # nodes_mage.py
    "TextEncodeMageFlowEdit",
    # nodes_marigold.py
    "MarigoldV2PostProcess",
    # nodes_mediapipe.py
    "LoadMediaPipeFaceLandmarker", "MediaPipeFaceLandmarker", "MediaPipeFaceMask", "MediaPipeFaceMeshVisualize",
    # nodes_mesh_io.py
    "File3DToMesh",
    # nodes_mesh_postprocess.py
    "ApplyTextureToMesh", "BakeAmbientOcclusion", "BakeNormalMapFromMesh", "BakeTextureFromVoxel", "DecimateMesh",
    "FillHoles", "MeshSmoothNormals", "MeshTextureToImage", "PaintMesh", "RemeshMesh", "RenderMesh", "RenderUVAtlas",
    "UnwrapMesh", "WeldVertices",
    # nodes_ming.py
    "TextEncodeMingImageEdit",
    # nodes_minimax_h3.py
    "EmptyMiniMaxH3LatentAV", "MiniMaxH3AddGuide", "MiniMaxH3FunControlNetApply", "MiniMaxH3ImageToVideo",
    "MiniMaxH3ReferenceToVideo", "MiniMaxH3SigmaShift", "MiniMaxH3TextEncoderOnlyReference",
    # nodes_minimax_music.py
    "EmptyMiniMaxMusic3LatentAudio", "MiniMaxMusic3TextEncode",
    # nodes_model_advanced.py
    "ModelNoiseScale", "ModelSamplingStableCascade",
    # nodes_model_merging_model_specific.py
    "ModelMergeAuraflow", "ModelMergeCosmos14B", "ModelMergeCosmos7B", "ModelMergeCosmosPredict2_14B",
    "ModelMergeCosmosPredict2_2B", "ModelMergeMochiPreview",
    # nodes_model_patch.py
    "AnimaLLLiteApply", "SUPIRApply", "USOStyleReference", "WanUni3CControlnetApply",
    # nodes_moge.py
    "LoadMoGeModel", "MoGeGeometryToFOV", "MoGeInference", "MoGeMaskOut", "MoGePanoramaInference", "MoGePointMapToMesh",
    "MoGeRender",
    # nodes_pid.py
    "PiDConditioning",
    # nodes_pixart.py
    "CLIPTextEncodePixArtAlpha",
    # nodes_rtdetr.py
    "DrawBBoxes", "RTDETR_detect",
    # nodes_sam3.py
    "SAM3_Detect", "SAM3_TrackPreview", "SAM3_TrackToMask", "SAM3_VideoTrack",
    # nodes_sam3d_body.py
    "SAM3DBody_FaceExpression", "SAM3DBody_Loader", "SAM3DBody_Predict", "SAM3DBody_Render", "SAM3DBody_Smooth",
    # nodes_save_3d.py
    "SaveGLB",
    # nodes_scail.py
    "SCAIL2ColoredMask", "WanSCAILToVideo",
    # nodes_sdpose.py
    "SDPoseDrawKeypoints", "SDPoseFaceBBoxes", "SDPoseKeypointExtractor",
    # nodes_seedvr.py
    "SeedVR2Conditioning", "SeedVR2InputProcessing",
    # nodes_sensenova.py
    "SenseNovaGenerate", "SenseNovaInterleaveCollector", "SenseNovaInterleaveStage", "SenseNovaSamplingOptions",
    "SenseNovaTextEncode",
    # nodes_sparse_attention.py
    "BlockSparseAttention",
    # nodes_stable3d.py
    "SV3D_Conditioning",
    # nodes_stable_cascade.py
    "StableCascade_EmptyLatentImage", "StableCascade_StageB_Conditioning", "StableCascade_StageC_VAEEncode",
    "StableCascade_SuperResolutionControlnet",
    # nodes_trellis2.py
    "EmptyTrellis2LatentStructure", "Pixal3DConditioning", "Pixal3DMultiViewConditioning", "Trellis2Conditioning",
    "Trellis2ShapeStage", "Trellis2TextureStage", "Trellis2UpsampleStage", "VaeDecodeShapeTrellis",
    "VaeDecodeStructureTrellis2", "VaeDecodeTextureTrellis",
    # nodes_triposplat.py
    "TripoSplatConditioning", "TripoSplatPreprocessImage", "TripoSplatSamplingPreview", "VAEDecodeTripoSplat",
    # nodes_void.py
    "OpticalFlowLoader", "VOIDInpaintConditioning", "VOIDQuadmaskPreprocess", "VOIDSampler", "VOIDWarpedNoise",
    "VOIDWarpedNoiseSource",
    # nodes_wan.py
    "WanAnimate2Cache", "WanAnimate2ToVideo", "WanAnimateToVideo", "WanHuMoImageToVideo", "WanInfiniteTalkToVideo",
    "WanSoundImageToVideo", "WanSoundImageToVideoExtend",
    # nodes_wandancer.py
    "VAEDecodeVideoFramewise", "WanDancerEncodeAudio", "WanDancerEncodeAudioLibrosa", "WanDancerPadKeyframes",
    "WanDancerVideo",
    # nodes_wanmove.py
    "GenerateTracks", "WanMoveConcatTrack", "WanMoveTrackToVideo", "WanMoveTracksFromCoords", "WanMoveVisualizeTracks",
    # nodes_yue2.py
    "EmptyYuE2LatentAudio", "YuE2GenerateABC", "YuE2GenerateMusic",
    # nodes_zimage.py
    "TextEncodeZImageOmni",
})

# Where each hidden input of a classic node gets its value (ComfyUI's hidden input kinds).
_HIDDEN_SOURCES: dict[str, Callable[[Any], Any]] = {
    "UNIQUE_ID": lambda ctx: ctx.node_id,
    "PROMPT": lambda ctx: ctx.extra.get("prompt"),
    "EXTRA_PNGINFO": lambda ctx: ctx.extra.get("extra_pnginfo"),
}

# Options an input declaration may carry that map onto InputSpec fields; the rest are passed
# through to the editor untouched (display, placeholder, label_on, dynamicPrompts, ...).
_OPTION_FIELDS = {"default": "default", "min": "min", "max": "max", "step": "step", "round": "round",
                  "multiline": "multiline", "tooltip": "tooltip", "forceInput": "force_input",
                  "image_upload": "image_upload", "control_after_generate": "control_after_generate",
                  "lazy": "lazy"}


class ComfyInternalsError(ImportError):
    """A node file reached for a module of ComfyUI itself."""

    def __init__(self, module: str) -> None:
        super().__init__(f"this plugin imports ComfyUI internals (`{module}`), which Loom does not provide")
        self.module = module


def comfy_module_in(exc: BaseException) -> str | None:
    """The ComfyUI module (e.g. `comfy.model_management`) behind a failed import, or None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if top in COMFY_MODULES and top != "nodes":
            return _imported_name(exc, top) or exc.name
    elif isinstance(exc, ImportError) and exc.name in COMFY_MODULES:
        missing = re.search(r"cannot import name '(\w+)'", str(exc))
        return f"{exc.name}.{missing.group(1)}" if missing else exc.name
    elif isinstance(exc, AttributeError) and getattr(getattr(exc, "obj", None), "__name__", None) in COMFY_MODULES:
        return f"{exc.obj.__name__}.{exc.name}"
    return None


def _raise_if_comfy(exc: BaseException) -> None:
    """Name the ComfyUI module a node reached for late (inside INPUT_TYPES or its function)."""
    module = comfy_module_in(exc)
    if module is not None:
        raise ComfyInternalsError(module) from exc


def _imported_name(exc: BaseException, top: str) -> str | None:
    """The full dotted name in the failing import statement (`import comfy.utils` names `comfy.utils`)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        found = re.search(rf"(?:from|import)\s+({re.escape(top)}(?:\.\w+)*)", frame.line or "")
        if found:
            return found.group(1)
    return None


def _input_spec(node: str, name: str, declared: Any, optional: bool) -> InputSpec:
    if isinstance(declared, str):  # a bare type name, as some files write it
        declared = (declared,)
    if not isinstance(declared, list | tuple) or not declared:
        raise NodeDefinitionError(node, f"input {name!r}: expected (TYPE, options), got {declared!r}")
    kind, options = declared[0], dict(declared[1]) if len(declared) > 1 and declared[1] else {}
    fields: dict[str, Any] = {"optional": optional}
    extra: dict[str, Any] = {}
    for key, value in options.items():
        if key in _OPTION_FIELDS:
            fields[_OPTION_FIELDS[key]] = bool(value) if key in ("control_after_generate", "lazy") else value
        elif key != "options":
            extra[key] = value
    if isinstance(kind, list | tuple) or kind == "COMBO":
        initial = list(kind) if isinstance(kind, list | tuple) else list(options.get("options", []))
        fields.setdefault("default", initial[0] if initial else None)
        return InputSpec(type="COMBO", choices=tuple(initial), extra=extra, **fields)
    return InputSpec(type=str(kind), extra=extra, **fields)


def _fresh_choices(classic: type, group: str, name: str, fallback: tuple[Any, ...]) -> Callable[[], list[Any]]:
    """Combo choices listed again on each call: INPUT_TYPES of file pickers reads the folder anew."""

    def choices() -> list[Any]:
        try:
            declared = classic.INPUT_TYPES()[group][name]
        except Exception:  # a node whose INPUT_TYPES fails now keeps the choices it loaded with
            return list(fallback)
        if isinstance(declared[0], list | tuple):
            return list(declared[0])
        options = declared[1] if len(declared) > 1 and isinstance(declared[1], dict) else {}
        return list(options.get("options", fallback))

    return choices


def _accepted(func: Callable[..., Any], values: dict[str, Any]) -> dict[str, Any]:
    """The inputs a hook's signature names (all of them if it takes **kwargs)."""
    params = inspect.signature(func).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(values)
    names = {p.name for p in params}
    return {k: v for k, v in values.items() if k in names}


class ClassicNode(Node):
    """Base of the node types made from classic ComfyUI classes; `classic` is the wrapped class."""

    classic: ClassVar[type]
    hidden_kinds: ClassVar[dict[str, str]] = {}
    # ComfyUI keeps one object per node of a workflow across runs; some classes keep state on it.
    instances: ClassVar[dict[str, Any]] = {}

    def _object(self) -> Any:
        """The class's object for this node id, made on first use and kept between runs, as ComfyUI keeps it."""
        obj = self.instances.get(self.ctx.node_id)
        if obj is None:
            obj = self.instances[self.ctx.node_id] = self.classic()
        return obj

    def execute(self, **inputs: Any) -> Any:
        obj = self._object()
        for key, kind in self.hidden_kinds.items():
            source = _HIDDEN_SOURCES.get(kind)
            value = source(self.ctx) if source else None
            inputs[key] = [value] if self.input_is_list else value
        try:
            result = getattr(obj, self.classic.FUNCTION)(**inputs)
        except (ImportError, AttributeError) as exc:
            _raise_if_comfy(exc)
            raise
        if isinstance(result, dict) and "expand" in result:
            raise NotImplementedError(f"{self.name} returned a node expansion (`expand`), which Loom does not support")
        return result

    def check_lazy_status(self, **inputs: Any) -> list[str] | None:
        obj = self._object()
        hook = getattr(obj, "check_lazy_status", None)
        if hook is None:
            return None
        return hook(**_accepted(hook, inputs))

    @classmethod
    def fingerprint(cls, inputs: dict[str, Any]) -> Any:
        hook = getattr(cls.classic, "IS_CHANGED", None)
        if hook is None:
            return None
        if cls.input_is_list:
            inputs = {k: [v] for k, v in inputs.items()}
        try:
            value = hook(**_accepted(hook, inputs))
        except Exception:  # ComfyUI treats a failing IS_CHANGED as "changed": the node re-runs
            return uuid.uuid4().hex
        # NaN never equals itself, which ComfyUI nodes use to say "always re-run".
        if isinstance(value, float) and math.isnan(value):
            return uuid.uuid4().hex
        return value

    @classmethod
    def check_inputs(cls, inputs: dict[str, Any]) -> str | None:
        hook = getattr(cls.classic, "VALIDATE_INPUTS", None)
        if hook is None:
            return None
        values = dict(inputs)
        if "input_types" in inspect.signature(hook).parameters:
            values["input_types"] = {}  # the types of linked inputs are not passed (a documented limit)
        accepted = _accepted(hook, values)
        try:
            inspect.signature(hook).bind(**accepted)
        except TypeError:
            return None  # it needs a linked input's value, which is only known while running
        try:
            result = hook(**accepted)
        except Exception as exc:
            return f"VALIDATE_INPUTS raised {type(exc).__name__}: {exc}"
        return None if result is True else str(result)


def adapt_classic(name: str, classic: type, display_name: str | None = None,
                  python_module: str = "custom_nodes") -> type[Node]:
    """A Node type that runs a classic ComfyUI node class under the name `name`."""
    function = getattr(classic, "FUNCTION", None)
    if not isinstance(function, str) or not callable(getattr(classic, function, None)):
        raise NodeDefinitionError(name, f"FUNCTION names no method of {classic.__name__}")
    try:
        declared = classic.INPUT_TYPES()
    except Exception as exc:
        _raise_if_comfy(exc)
        raise NodeDefinitionError(name, f"INPUT_TYPES() raised {type(exc).__name__}: {exc}") from exc
    inputs: dict[str, InputSpec] = {}
    for group in ("required", "optional"):
        for key, decl in (declared.get(group) or {}).items():
            spec = _input_spec(name, key, decl, optional=group == "optional")
            if spec.type == "COMBO":
                spec = spec.model_copy(update={"choices_fn": _fresh_choices(classic, group, key, spec.choices or ())})
            inputs[key] = spec
    validate_hook = getattr(classic, "VALIDATE_INPUTS", None)
    if validate_hook is not None:
        self_checked = _accepted(validate_hook, dict.fromkeys(inputs))
        inputs.update({k: inputs[k].model_copy(update={"checked_by_node": True}) for k in self_checked})
    hidden = {k: (v[0] if isinstance(v, list | tuple) else v) for k, v in (declared.get("hidden") or {}).items()}
    for key, kind in hidden.items():
        inputs[key] = InputSpec(type=str(kind), optional=True, hidden=True)

    types = list(getattr(classic, "RETURN_TYPES", ()))
    names = list(getattr(classic, "RETURN_NAMES", None) or ())
    is_list = list(getattr(classic, "OUTPUT_IS_LIST", None) or ())
    tooltips = list(getattr(classic, "OUTPUT_TOOLTIPS", None) or ())
    outputs = tuple(
        Output("COMBO" if isinstance(kind, list | tuple) else str(kind) or ANY_TYPE,
               names[i] if i < len(names) else None,
               is_list=bool(is_list[i]) if i < len(is_list) else False,
               tooltip=tooltips[i] if i < len(tooltips) else None)
        for i, kind in enumerate(types)
    )
    namespace = {
        "name": name, "display_name": display_name or name, "classic": classic, "inputs": inputs,
        "hidden_kinds": hidden, "instances": {}, "outputs": outputs, "python_module": python_module,
        "category": getattr(classic, "CATEGORY", "sd"), "description": getattr(classic, "DESCRIPTION", "") or "",
        "output_node": bool(getattr(classic, "OUTPUT_NODE", False)),
        "input_is_list": bool(getattr(classic, "INPUT_IS_LIST", False)),
        "__module__": getattr(classic, "__module__", __name__), "__doc__": None,
    }
    return type(name, (ClassicNode,), namespace)
