"""Loom's command line: serve, run, validate, convert, nodes, schema, make-checkpoint, make-flux, make-sd3, make-chroma,
make-svd, make-wan, make-ltxv, make-qwen-image, make-z-image, make-flux2,
make-lumina2, make-hidream, make-stable-audio, train."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="folder holding models/, input/, output/, temp/ (default: the project folder)")
    parser.add_argument("--models-dir", type=Path, action="append", default=[],
                        help="another models folder (with checkpoints/, vae/, loras/, controlnet/, upscale_models/, "
                             "embeddings/, clip_vision/, style_models/, hypernetworks/, photomaker/, gligen/, "
                             "diffusion_models/, text_encoders/ inside); repeatable")
    parser.add_argument("--extra-model-paths", type=Path,
                        help="JSON file mapping model kinds to more folders, e.g. another tool's, or ComfyUI's "
                             "extra_model_paths.yaml as it is")
    parser.add_argument("--no-bundled-models", action="store_true",
                        help="do not offer the models shipped with the project (the demo checkpoint)")
    parser.add_argument("--output-dir", type=Path, help="where output images go (default: BASE/output)")
    parser.add_argument("--input-dir", type=Path, help="where input images are read (default: BASE/input)")
    parser.add_argument("--custom-nodes-dir", type=Path, action="append", default=[],
                        help="another folder of plugins besides BASE/custom_nodes; repeatable (the "
                             "--extra-model-paths file may list more under \"custom_nodes\")")
    parser.add_argument("--no-custom-nodes", action="store_true", help="load the built-in nodes only")
    device = parser.add_argument_group("device and memory")
    device.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU exists")
    device.add_argument("--lowvram", action="store_true",
                        help="keep the UNet in RAM and stream its blocks to the GPU as they run (slower, small cards)")
    device.add_argument("--weights-dtype", choices=["default", "fp8", "int8"], default="default",
                        help="store the UNet's weights in fp8 (computed in fp16/bf16) or int8 (torchao)")
    device.add_argument("--te-weights-dtype", choices=["default", "fp8", "int8"], default="default",
                        help="the same for the text encoders (moves images more than the UNet's: see docs/gpu.md)")
    device.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (slow first run per image size, faster after)")
    device.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="launch the UNet's kernels one by one instead of replaying a captured CUDA graph")
    device.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep the UNet's tensors NCHW on CUDA (channels-last saves cuDNN's layout copies)")
    device.add_argument("--vram-budget-gb", type=float, help="GiB of model weights kept on the GPU "
                        "(default: its memory less a quarter for activations)")
    device.add_argument("--ram-budget-gb", type=float, help="GiB of loaded models kept in RAM (default: half of it)")


def _has_accelerator() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def configure_engine(args: argparse.Namespace) -> Any:
    """Set up folders, device options and the node registry from the common options; returns the registry."""
    from executor.devices import EngineOptions, set_default_options
    from nodes.folders import FolderPaths, set_paths
    from nodes.registry import builtin_registry

    def gib(value: float | None) -> int | None:
        return None if value is None else int(value * 2**30)

    options = EngineOptions(
        force_cpu=args.cpu, lowvram=args.lowvram, weights_dtype=args.weights_dtype,
        te_weights_dtype=args.te_weights_dtype, compile=args.compile,
        cuda_graphs=args.cuda_graphs, channels_last=args.channels_last,
        vram_budget=gib(args.vram_budget_gb), ram_budget=gib(args.ram_budget_gb))
    set_default_options(options)
    if options.force_cpu or not _has_accelerator():
        from executor.allocator import keep_freed_memory

        keep_freed_memory()

    paths = FolderPaths(base=args.base_dir.resolve(), models_dirs=list(args.models_dir),
                        output_dir=args.output_dir, input_dir=args.input_dir)
    if args.no_bundled_models:
        paths.bundled_models = None
    if args.extra_model_paths:
        try:
            paths.load_extra_paths(args.extra_model_paths)
        except (OSError, ValueError, TypeError) as exc:
            _usage_error(f"--extra-model-paths {args.extra_model_paths}: {_reason(exc)}")
    paths.seed_input_examples()
    set_paths(paths)
    folders = plugin_folders(args, paths)
    if folders is None:
        return builtin_registry()
    from nodes.plugins import engine_registry

    return engine_registry(folders)


def plugin_folders(args: argparse.Namespace, paths: Any) -> list[Path] | None:
    """The folders plugins load from (None with --no-custom-nodes)."""
    if args.no_custom_nodes:
        return None
    for folder in args.custom_nodes_dir:
        if not folder.is_dir():
            _usage_error(f"--custom-nodes-dir {folder}: not a folder")
    return [paths.base / "custom_nodes", *args.custom_nodes_dir, *paths.first_model_paths.get("custom_nodes", []),
            *paths.extra_model_paths.get("custom_nodes", [])]


def _parse_set(assignments: list[str]) -> list[tuple[str, str, Any]]:
    out = []
    for item in assignments:
        target, sep, raw = item.partition("=")
        node_id, dot, input_name = target.partition(".")
        if not sep or not dot or not node_id or not input_name:
            _usage_error(f"--set expects NODE_ID.INPUT=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((node_id, input_name, value))
    return out


def _ui_only(path: Path, node_id: str) -> str:
    """Why a node of an editor (UI-format) file is not in the workflow it runs: it exists only in the editor (a
    PrimitiveNode, a note, a reroute), so its value is set on the inputs it feeds, which are named; "" otherwise."""
    from graph.load import load_workflow_data

    try:
        data = load_workflow_data(path)
    except Exception:  # noqa: BLE001 - the message only gains a hint, never fails for it
        return ""
    nodes = {str(n.get("id")): n for n in data.get("nodes", [])} if isinstance(data, dict) else {}
    node = nodes.get(node_id)
    if not isinstance(node, dict):
        return ""
    definitions = (data.get("definitions") or {}).get("subgraphs") or []
    subgraph = next((d for d in definitions if isinstance(d, dict) and d.get("id") == node.get("type")), None)
    if subgraph is not None:  # its widgets are its inner nodes' inputs, named <node>:<inner node>.<input>
        proxies = [p for p in (node.get("properties") or {}).get("proxyWidgets") or []
                   if isinstance(p, list) and len(p) == 2]
        shown = [f"{node_id}.{name}" for inner, name in proxies if str(inner) == "-1"]
        widgets = f"; the widgets it shows are {', '.join(shown)}" if shown else ""
        return (f" (node {node_id} is the subgraph {subgraph.get('name') or node.get('type')!r}: set its inner "
                f"nodes' inputs as {node_id}:<inner node>.<input> (`main.py convert` lists them){widgets})")
    targets = []
    for link in data.get("links") or []:
        if isinstance(link, list) and len(link) >= 5 and str(link[1]) == node_id:
            target = nodes.get(str(link[3]), {})
            inputs = target.get("inputs") or []
            if isinstance(link[4], int) and link[4] < len(inputs):
                targets.append(f"{link[3]}.{inputs[link[4]].get('name')}")
    feeds = f"; set the inputs it feeds instead: {', '.join(targets)}" if targets else ""
    return f" (node {node_id} is a {node.get('type')}, which only the editor has{feeds})"


def _set_subgraph_widgets(data: Any, sets: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """Apply the `--set`s that name a widget a subgraph node of an editor file shows (its `proxyWidgets`: a subgraph
    input it promotes, e.g. a template's width, or an inner node's widget) to that node's widget values; returns the
    others, an inner node's widget the node holds no value for as that inner node's (`92:95.steps`: Comfy-Org's
    HunyuanVideo 1.5 templates keep none)."""
    nodes = {str(n.get("id")): n for n in data.get("nodes", []) if isinstance(n, dict)} if isinstance(data, dict) \
        else {}
    subgraphs = {d.get("id") for d in ((data.get("definitions") or {}).get("subgraphs") or []) if isinstance(d, dict)} \
        if nodes else set()
    left = []
    for node_id, input_name, value in sets:
        node = nodes.get(node_id, {})
        proxies = (node.get("properties") or {}).get("proxyWidgets") or [] if node.get("type") in subgraphs else []
        slot = next((i for i, p in enumerate(proxies) if isinstance(p, list) and len(p) == 2 and p[1] == input_name),
                    None)
        values = node.get("widgets_values")
        if slot is not None and isinstance(values, list) and slot < len(values):
            values[slot] = value
        elif slot is not None and str(proxies[slot][0]) != "-1":  # an inner node's widget, its own value in force
            left.append((f"{node_id}:{proxies[slot][0]}", input_name, value))
        else:
            left.append((node_id, input_name, value))
    return left


def _load(args: argparse.Namespace, registry: Any) -> Any:
    from graph.document import DocumentError
    from graph.load import graph_from_data, load_workflow_data

    sets = _parse_set(getattr(args, "set", None) or [])
    try:
        data = load_workflow_data(args.workflow)
        sets = _set_subgraph_widgets(data, sets)
        graph = graph_from_data(data, registry)
    except DocumentError as exc:
        _fail_document(args, str(exc))
    for node_id, input_name, value in sets:
        if node_id not in graph.nodes:
            _fail_document(args, f"--set: node {node_id!r} is not in the workflow{_ui_only(args.workflow, node_id)}")
        node = graph.nodes[node_id]
        cls = registry.get(node.class_type)
        if cls is not None and (input_name not in cls.inputs or cls.inputs[input_name].hidden):
            names = ", ".join(name for name, spec in cls.inputs.items() if not spec.hidden)
            _fail_document(args, f"--set: node {node_id} ({node.class_type}) has no input {input_name!r}; "
                                 + (f"its inputs are {names}" if names else "it has no inputs"))
        node.inputs[input_name] = value
    return graph


def _usage_error(message: str) -> NoReturn:
    """A command-line option that cannot be used: the message, and exit status 2 (as argparse's own errors)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_INVALID)


def _reason(exc: Exception) -> str:
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc)


def _fail_document(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"status": "invalid", "error": {"type": "invalid_prompt", "message": message}}))
    else:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_INVALID)


def _report_problems(args: argparse.Namespace, checked: Any) -> int:
    problems = checked.problems
    if args.json:
        print(json.dumps({"status": "invalid", **checked.error_response()}, indent=2))
    else:
        print(f"The workflow has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
    return EXIT_INVALID


def cmd_validate(args: argparse.Namespace) -> int:
    from graph.validate import validate

    registry = configure_engine(args)
    checked = validate(_load(args, registry), registry)
    if checked.problems:
        return _report_problems(args, checked)
    if args.json:
        print(json.dumps({"status": "ok", "outputs": checked.outputs, "order": checked.order}))
    else:
        print(f"OK: {len(checked.order)} nodes to run for outputs {', '.join(checked.outputs)}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from executor.executor import Executor
    from executor.progress import ConsoleProgress
    from graph.validate import validate

    registry = configure_engine(args)
    checked = validate(_load(args, registry), registry)
    if checked.problems:
        return _report_problems(args, checked)
    from executor.services import Services

    executor = Executor(registry, services=Services.create())
    progress = ConsoleProgress(enabled=not args.json and not args.quiet)
    result = executor.run(checked, on_event=progress)
    progress.close()
    files = _output_files(result.outputs)
    if args.json:
        body: dict[str, Any] = {"status": result.status, "prompt_id": result.prompt_id,
                                "outputs": result.outputs, "files": files,
                                "executed": result.executed, "cached": result.cached,
                                "duration_s": round(result.duration_s, 3)}
        if result.error is not None:
            body["error"] = result.error.data()
        print(json.dumps(body, indent=2, default=str))
    elif result.ok:
        for nid, ui in result.outputs.items():
            for text in ui.get("text", []):
                print(f"node {nid}: {text}")
        for path in files:
            print(f"saved {path}")
        print(f"done in {result.duration_s:.2f}s ({len(result.executed)} nodes ran, "
              f"{len(result.cached)} cached)", file=sys.stderr)
    else:
        err = result.error
        print(f"error in node {err.node_id} ({err.node_type}): "
              f"{getattr(err, 'exception_type', 'Interrupted')}: {getattr(err, 'exception_message', '')}",
              file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


def _output_files(outputs: dict[str, dict[str, Any]]) -> list[str]:
    from nodes.folders import get_paths

    paths = get_paths()
    roots = {"output": paths.output, "temp": paths.temp, "input": paths.input}
    files = []
    for ui in outputs.values():
        # SaveImage, the animation and audio savers, SaveLatent, model savers
        for kind in ("images", "audio", "latents", "files"):
            for item in ui.get(kind, []):
                if isinstance(item, dict) and "filename" in item:
                    root = roots.get(item.get("type", "output"), paths.output)
                    files.append(str(root / item.get("subfolder", "") / item["filename"]))
    return files


def _print_plugins(registry: Any, as_json: bool) -> int:
    from nodes.plugins import plugin_summary

    if as_json:
        print(json.dumps([plugin_summary(p) for p in registry.plugins], indent=2))
        return EXIT_OK
    failed = sum(not p.loaded for p in registry.plugins)
    print(f"{len(registry.plugins) - failed} plugin(s) loaded, {failed} failed")
    for p in registry.plugins:
        status = "ok" if p.loaded else "FAILED"
        print(f"  {status:<6} {p.import_s:7.3f}s  {p.name}  ({len(p.node_names)} nodes)  {p.source}")
        if p.web_dir:
            print(f"         editor extensions: {p.web_dir}")
        if p.error:
            print(f"         {p.error}")
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    registry = configure_engine(args)
    if args.plugins:
        return _print_plugins(registry, args.json)
    if args.json:
        print(json.dumps(registry.object_info(), indent=2, default=str))
        return EXIT_OK
    by_category: dict[str, list[str]] = {}
    for name in registry:
        cls = registry.get(name)
        by_category.setdefault(cls.category, []).append(name)
    for category in sorted(by_category):
        print(f"{category}:")
        for name in sorted(by_category[category]):
            cls = registry.get(name)
            ins = ", ".join(f"{k}:{s.type}" for k, s in cls.inputs.items() if not s.hidden)
            outs = ", ".join(o.type for o in cls.outputs) or "-"
            print(f"  {name}({ins}) -> {outs}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from graph.load import graph_from_data, load_workflow_data

    registry = configure_engine(args)
    from graph.document import DocumentError

    try:
        graph = graph_from_data(load_workflow_data(args.workflow), registry)
    except DocumentError as exc:
        _fail_document(args, str(exc))
    api = graph.to_api()
    for node_id, node in api.items():
        kept = node.get("_meta", {}).get("widgets_values")
        if kept is not None and registry.get(node["class_type"]) is None:
            print(f"note: node {node_id} ({node['class_type']}) is not a node type this engine has; its widget "
                  f"values {json.dumps(kept)} are kept in _meta.widgets_values, not as inputs", file=sys.stderr)
    text = json.dumps(api, indent=2)
    if args.output:
        try:
            args.output.write_text(text + "\n")
        except OSError as exc:
            _usage_error(f"-o {args.output}: {_reason(exc)}")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from graph.document import api_json_schema

    print(json.dumps(api_json_schema(), indent=2))
    return EXIT_OK


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from ldm.presets import make_checkpoint

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    path = make_checkpoint(args.preset, args.output, seed=args.seed, dtype=dtype)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, random weights, preset {args.preset})")
    return EXIT_OK


def cmd_make_flux(args: argparse.Namespace) -> int:
    import torch

    from ldm.flux_presets import make_flux_files

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    for part, path in make_flux_files(args.models_dir, args.variant, seed=args.seed, dtype=dtype).items():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, random weights, tiny Flux.1 {part})")
    return EXIT_OK


def cmd_make_sd3(args: argparse.Namespace) -> int:
    import torch

    from ldm.sd3_presets import make_sd3_files

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    for part, path in make_sd3_files(args.models_dir, args.variant, seed=args.seed, dtype=dtype).items():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, random weights, tiny {args.variant} {part})")
    return EXIT_OK


# Tiny random-weight files of one model family in the layouts ComfyUI users have: (module, function, what), each
# function taking (models_dir, seed=, dtype=) and returning {part: path}.
PART_MAKERS = {
    "make-chroma": ("ldm.chroma_files", "make_chroma_files", "Chroma"),
    "make-wan": ("ldm.wan_presets", "make_wan_files", "Wan 2.1"),
    "make-ltxv": ("ldm.ltxv_presets", "make_ltxv_files", "LTX-Video 0.9.1"),
    "make-qwen-image": ("ldm.qwen_image_presets", "make_qwen_image_files", "Qwen-Image"),
    "make-qwen-image21": ("ldm.qwen_image_presets", "make_qwen_image21_files", "Qwen-Image 2.1"),
    "make-z-image": ("ldm.z_image_presets", "make_z_image_files", "Z-Image"),
    "make-flux2": ("ldm.flux2_presets", "make_flux2_files", "FLUX.2"),
    "make-lumina2": ("ldm.lumina2_presets", "make_lumina2_files", "Lumina 2"),
    "make-hidream": ("ldm.hidream_presets", "make_hidream_files", "HiDream-I1"),
    "make-stable-audio": ("ldm.stable_audio_presets", "make_stable_audio_files", "Stable Audio Open"),
    "make-ace-step": ("ldm.ace_step15_presets", "make_ace_step15_files", "ACE-Step 1.5"),
    "make-ltx2": ("ldm.ltx2_files", "make_ltx2_files", "LTX-2"),
    "make-hunyuan-video15": ("ldm.hunyuan_video15_files", "make_hunyuan_video15_files", "HunyuanVideo 1.5"),
    "make-hunyuan-image21": ("ldm.hunyuan_image21_files", "make_hunyuan_image21_files", "HunyuanImage 2.1"),
}
# Each command's help: what it writes, and where (under the models folder).
PART_HELP = {
    "make-chroma": ("diffusion model in BFL's layout, T5-XXL, Flux's VAE", "diffusion_models/, text_encoders/ and "
                    "vae/ (chroma-tiny, t5xxl-chroma-tiny, ae-chroma-tiny)"),
    "make-wan": ("text-to-video, image-to-video and VACE transformers, UMT5-XXL, the video VAE, a CLIP vision "
                 "tower", "diffusion_models/, text_encoders/, vae/ and clip_vision/ (wan2.1_t2v-tiny, "
                 "wan2.1_i2v-tiny, wan2.1_vace-tiny, umt5_xxl-tiny, wan_2.1_vae-tiny, clip_vision_h-tiny)"),
    "make-ltxv": ("the all-in-one checkpoint: transformer and video VAE; T5-XXL", "checkpoints/ and text_encoders/ "
                  "(ltx-video-2b-v0.9.1-tiny, t5xxl-ltxv-tiny)"),
    "make-qwen-image": ("the transformer, Qwen2.5-VL's language model, the VAE, ControlNets, Qwen-Image-Layered's "
                        "transformer and RGBA VAE", "diffusion_models/, text_encoders/, vae/, controlnet/ and "
                        "model_patches/ (qwen_image-tiny, qwen_2.5_vl_7b-tiny, qwen_image_vae-tiny, "
                        "qwen_image_layered-tiny, qwen_image_layered_vae-tiny, ...)"),
    "make-qwen-image21": ("the transformer, Qwen3-VL-8B's language model and vision tower, the RGBA VAE",
                          "diffusion_models/, text_encoders/ and vae/ (qwen_image_2.1-tiny, qwen3vl_8b-tiny, "
                          "qwen_image_2.1_vae-tiny)"),
    "make-z-image": ("the transformer, Qwen3-4B, Flux's VAE", "diffusion_models/, text_encoders/ and vae/ "
                     "(z_image_turbo-tiny, qwen_3_4b-tiny, ae-z_image-tiny)"),
    "make-flux2": ("the klein and dev transformers, Qwen3 and Mistral Small 3, the VAE", "diffusion_models/, "
                   "text_encoders/ and vae/ (flux-2-klein-4b-tiny, qwen_3_4b-klein-tiny, flux2_dev-tiny, "
                   "mistral_3_small_flux2-tiny, flux2-vae-tiny)"),
    "make-lumina2": ("the all-in-one checkpoint (transformer, Flux's VAE, Gemma-2-2B), the split transformer and "
                     "Gemma-2-2B", "checkpoints/, diffusion_models/ and text_encoders/ (lumina_2-tiny, "
                     "lumina_2_model-tiny, gemma_2_2b-tiny)"),
    "make-hidream": ("the transformer, CLIP-L, CLIP-G, T5-XXL, Llama 3.1 (scaled fp8), Flux's VAE",
                     "diffusion_models/, text_encoders/ and vae/ (hidream_i1_dev-tiny, clip_l_hidream-tiny, "
                     "clip_g_hidream-tiny, t5xxl_hidream-tiny, llama_3.1_8b_instruct_fp8_scaled-tiny, "
                     "ae-hidream-tiny)"),
    "make-stable-audio": ("the checkpoint (transformer, seconds conditioners, Oobleck VAE) and T5-base",
                          "checkpoints/ and text_encoders/ (stable-audio-open-1.0-tiny, t5_base-tiny)"),
    "make-ace-step": ("the diffusion model, Qwen3-0.6B, the 5 Hz language model, the 48 kHz Oobleck VAE, and the "
                      "all-in-one checkpoint of them", "diffusion_models/, text_encoders/, vae/ and checkpoints/ "
                      "(acestep_v1.5_turbo-tiny, qwen_0.6b_ace15-tiny, qwen_1.7b_ace15-tiny, ace_1.5_vae-tiny, "
                      "ace_step_1.5_turbo_aio-tiny)"),
    "make-ltx2": ("the all-in-one checkpoints of LTX-2 and LTX-2.3 (audio-video transformer, video VAE, audio VAE, "
                  "vocoder, text projection), Gemma 3 with its vision tower and the x2 latent upscaler",
                  "checkpoints/, text_encoders/ and latent_upscale_models/ (ltx-2-19b-dev-tiny, "
                  "ltx-2.3-22b-dev-tiny, gemma_3_12B_it-tiny, ltx-2-spatial-upscaler-x2-1.0-tiny)"),
    "make-hunyuan-video15": ("the 720p text-to-video and image-to-video transformers, the 1080p SR one, the VAE, "
                             "Qwen2.5-VL's language model, the byT5 glyph encoder, the SigLIP tower and the 1080p "
                             "latent upsampler", "diffusion_models/, vae/, text_encoders/, clip_vision/ and "
                             "latent_upscale_models/ (hunyuanvideo1.5_720p_t2v-tiny, hunyuanvideo1.5_720p_i2v-tiny, "
                             "hunyuanvideo1.5_1080p_sr_distilled-tiny, hunyuanvideo15_vae-tiny, "
                             "qwen_2.5_vl_7b-hunyuan_video15-tiny, byt5_small_glyphxl-tiny, "
                             "sigclip_vision_patch14_384-tiny, hunyuanvideo15_latent_upsampler_1080p-tiny)"),
    "make-hunyuan-image21": ("the transformer and its distilled copy, the VAE, Qwen2.5-VL's language model and the "
                             "byT5 glyph encoder", "diffusion_models/, vae/ and text_encoders/ (hunyuanimage2.1-tiny, "
                             "hunyuanimage2.1_distilled-tiny, hunyuan_image_2.1_vae-tiny, "
                             "qwen_2.5_vl_7b-hunyuan_image21-tiny, byt5_small_glyphxl-hunyuan_image21-tiny)"),
}


def cmd_make_parts(args: argparse.Namespace) -> int:
    import importlib

    import torch

    module, function, what = PART_MAKERS[args.maker]
    make = getattr(importlib.import_module(module), function)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    for part, path in make(args.models_dir, seed=args.seed, dtype=dtype).items():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, random weights, tiny {what} {part})")
    return EXIT_OK


def cmd_make_svd(args: argparse.Namespace) -> int:
    import torch

    from ldm.svd_files import make_svd_checkpoint
    from ldm.zero123 import make_zero123_checkpoint

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    folder = args.models_dir / "checkpoints"
    for what, make, name in (("Stable Video Diffusion", make_svd_checkpoint, "svd-tiny.safetensors"),
                             ("Stable Zero123", make_zero123_checkpoint, "stable_zero123-tiny.safetensors")):
        path = make(folder / name, seed=args.seed, dtype=dtype)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, random weights, tiny {what})")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from nodes.folders import get_paths
    from web.serve import run_server
    from web.state import ServerConfig

    registry = configure_engine(args)
    paths = get_paths()
    config = ServerConfig(listen=args.listen, port=args.port, token=args.token or os.environ.get("LOOM_TOKEN"),
                          data_dir=args.data_dir or paths.base / "user", history_cap=args.history_cap,
                          max_upload_bytes=args.max_upload_mb * 1024 * 1024, allowed_origins=args.allow_origin,
                          ray=_ray_options(args, paths), worker_process=_process_spec(args, paths))
    run_server(config, registry, paths)
    return EXIT_OK


def _registry_factory(args: argparse.Namespace, paths: Any) -> Any:
    """What builds this engine's node types again in a worker process (picklable: a function or a partial)."""
    import functools

    from nodes.plugins import engine_registry
    from nodes.registry import builtin_registry

    folders = plugin_folders(args, paths)
    return builtin_registry if folders is None else functools.partial(engine_registry, folders)


def _process_spec(args: argparse.Namespace, paths: Any) -> Any:
    """`--workers local` (the default): the web.runner.WorkerSpec of the child process that runs the prompts."""
    if args.workers != "local" or args.ray_address is not None:
        return None
    from executor.devices import default_options
    from web.runner import WorkerSpec

    return WorkerSpec(paths=paths, registry=_registry_factory(args, paths), threads=None, options=default_options())


def _ray_options(args: argparse.Namespace, paths: Any) -> Any:
    """`--workers ray` settings (web.ray_pool.RayOptions), or None to run prompts in this process."""
    if args.workers != "ray" and args.ray_address is None:
        return None
    try:
        from web.ray_pool import RayOptions
    except ImportError as exc:
        _usage_error(str(exc))
    for name in ("ray_workers", "ray_cpus_per_worker", "ray_max_attempts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            _usage_error(f"--{name.replace('_', '-')} must be at least 1")
    if args.ray_gpus_per_worker is not None and args.ray_gpus_per_worker < 0:
        _usage_error("--ray-gpus-per-worker must not be negative")
    return RayOptions(address=args.ray_address, workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                      gpus_per_worker=args.ray_gpus_per_worker, max_attempts=args.ray_max_attempts,
                      registry=_registry_factory(args, paths))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="start the server: the editor, the HTTP API and the websocket")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--listen", default="127.0.0.1", help="address to bind; anything but loopback needs a token")
    p.add_argument("--token", help="access token required on every request (default: $LOOM_TOKEN)")
    p.add_argument("--data-dir", type=Path, help="where the queue and history database lives (default: BASE/user)")
    p.add_argument("--history-cap", type=int, default=10000, help="finished prompts kept in the history")
    p.add_argument("--max-upload-mb", type=int, default=50, help="largest accepted upload")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (e.g. https://example.org) allowed to call the API; repeatable")
    p.add_argument("--workers", choices=["local", "thread", "ray"], default="local",
                   help="where prompts run: a child process (default), a thread of the server's process (one "
                        "process to debug), or a pool of Ray workers")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. auto or HEAD:6379; implies --workers ray); without it "
                        "--workers ray starts a local Ray instance")
    p.add_argument("--ray-workers", type=int, metavar="N",
                   help="Ray workers, each with its own device (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--ray-cpus-per-worker", type=int, default=1, metavar="N",
                   help="CPUs each Ray worker reserves and its torch threads (default 1)")
    p.add_argument("--ray-gpus-per-worker", type=float, metavar="G",
                   help="GPUs each Ray worker reserves (default: 1 if the cluster has GPUs when the server starts, "
                        "else 0; 0.5 puts two workers on each GPU)")
    p.add_argument("--ray-max-attempts", type=int, default=2, metavar="N",
                   help="starts of one prompt before a worker dying under it fails it (default 2)")
    _add_engine_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="validate and run a workflow (API or UI JSON, or a PNG, WEBP, video or audio "
                                           "file that carries one)")
    p.add_argument("workflow", type=Path)
    p.add_argument("--set", action="append", metavar="NODE_ID.INPUT=VALUE",
                   help="set an input to a constant before running (VALUE is JSON, or a plain string; links "
                        "cannot be made this way); repeatable")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_engine_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check a workflow and list every problem")
    p.add_argument("workflow", type=Path)
    p.add_argument("--set", action="append", metavar="NODE_ID.INPUT=VALUE")
    p.add_argument("--json", action="store_true")
    _add_engine_options(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="convert a UI-format workflow (or a PNG, WEBP, video or audio file that "
                                               "carries one) to the native API format")
    p.add_argument("workflow", type=Path)
    p.add_argument("-o", "--output", type=Path, help="output file (default: standard output)")
    _add_engine_options(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("nodes", help="list the node types")
    p.add_argument("--json", action="store_true", help="the /object_info document")
    p.add_argument("--plugins", action="store_true", help="list the plugins: loaded or failed, why, import time")
    _add_engine_options(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the real LDM file layout")
    p.add_argument("--preset", required=True, choices=["tiny-sd1", "tiny-sd2", "tiny-sdxl",
                   "tiny-sdxl-refiner", "sd15", "sdxl", "sdxl-refiner"])
    p.add_argument("output", type=Path, help="the .safetensors file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored weight type")
    p.set_defaults(func=cmd_make_checkpoint)

    p = sub.add_parser("make-flux", help="write tiny random-weight Flux.1 files in the real layouts (diffusion "
                       "model, CLIP-L, T5-XXL, VAE, and one all-in-one checkpoint) into a models folder")
    p.add_argument("models_dir", type=Path, help="the models folder: files go into its diffusion_models/, "
                   "text_encoders/, vae/ and checkpoints/ (named flux1-tiny-*, clip_l-tiny, t5xxl-tiny, ae-tiny)")
    p.add_argument("--variant", choices=["dev", "schnell", "kontext", "fill", "depth", "canny"], default="dev",
                   help="kontext: dev's shape; fill, depth, canny: the edit models' wider inputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored weight type")
    p.set_defaults(func=cmd_make_flux)

    p = sub.add_parser("make-sd3", help="write tiny random-weight SD3 / SD3.5 files in the real layouts (checkpoints "
                       "with and without the text encoders, and CLIP-L, CLIP-G, T5-XXL files) into a models folder")
    p.add_argument("models_dir", type=Path, help="the models folder: files go into its checkpoints/ and "
                   "text_encoders/ (named VARIANT-tiny*, sd3-clip_l-tiny, sd3-clip_g-tiny, sd3-t5xxl-tiny)")
    p.add_argument("--variant", choices=["sd3-medium", "sd3.5-large", "sd3.5-medium"], default="sd3-medium")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored weight type")
    p.set_defaults(func=cmd_make_sd3)

    for command, (what, where) in PART_HELP.items():
        p = sub.add_parser(command, help=f"write tiny random-weight {PART_MAKERS[command][2]} files in the real "
                           f"layouts ({what}) into a models folder")
        p.add_argument("models_dir", type=Path, help=f"the models folder: files go into its {where}")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored weight type")
        p.set_defaults(func=cmd_make_parts, maker=command)

    p = sub.add_parser("make-svd", help="write tiny random-weight Stable Video Diffusion and Stable Zero123 "
                       "checkpoints in the real single-file layouts into a models folder")
    p.add_argument("models_dir", type=Path, help="the models folder: files go into its checkpoints/ "
                   "(svd-tiny.safetensors, stable_zero123-tiny.safetensors), for ImageOnlyCheckpointLoader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="stored weight type")
    p.set_defaults(func=cmd_make_svd)

    p = sub.add_parser("schema", help="print the JSON Schema of the native workflow format")
    p.set_defaults(func=cmd_schema)

    from ldm.training.cli import add_train_parser

    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit, so that a reader that has gone is seen below
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # a pipe of the command's own
        # `main.py nodes | head`: the reader stopped reading, which is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _stdout_reader_gone() -> bool:
    """True when standard output is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real file behind stdout
        return False


if __name__ == "__main__":
    sys.exit(main())
