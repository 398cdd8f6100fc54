"""Export an XCiT to ONNX, TorchScript or a ``torch.export`` program, and check the result against PyTorch.

Dynamic shapes: the Fourier positional encoding is rebuilt from the patch grid with ``arange`` at every forward, so
both the batch axis and the spatial axes can stay symbolic. With ``torch.export`` (and the ONNX exporter built on
it, ``torch.onnx.export(..., dynamo=True)``) height and width are declared as ``patch_size * Dim`` so that the
model's "multiple of the patch size" check becomes a shape constraint instead of a guard; ``torch.jit.trace``
records the size arithmetic as graph ops. All three give outputs that match PyTorch for other batch sizes and
resolutions than the example they were traced with (see ``tests/test_export.py``).

ONNX goes through the dynamo exporter only: the older TorchScript-based exporter (``dynamo=False``) has no
symbolic for ``aten::mT``, which the attention uses, and even with one its graph only runs at the traced shape.

The exported graphs cannot raise the model's friendly error for sizes that are not a multiple of the patch size:
feed multiples of ``patch_size`` (16 or 8).

Every exporter records the model's plain forwards (:func:`xcit.fast.plain_forwards`): standard ATen ops only, the
computation as the paper writes it; the model keeps its own forwards afterwards.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..fast import plain_forwards
from ..model.xcit import XCiT

log = logging.getLogger("xcit")

FORMATS = ("onnx", "torchscript", "export")
DEFAULT_OPSET = 18  # ONNX opset written by default; onnxruntime >= 1.14 runs it


# the file names each --format writes; a .pth named .onnx (or the reverse) misleads whoever opens it next
OUT_SUFFIXES = {
    "onnx": (".onnx",),
    "torchscript": (".pt", ".pth", ".ts"),
    "export": (".pt2",),
    "timm": (".safetensors", ".pth", ".pt", ".bin"),
}


def check_out_name(fmt: str, path: str | os.PathLike) -> None:
    """A ``ValueError`` when ``path``'s extension names another kind of file than ``fmt`` writes (``hub`` writes a
    folder: any name)."""
    suffix = Path(path).suffix.lower()
    if fmt in OUT_SUFFIXES and suffix not in OUT_SUFFIXES[fmt]:
        raise ValueError(f"--format {fmt} writes {' or '.join(OUT_SUFFIXES[fmt])} files: --out {path} names "
                         f"{'another kind of file' if suffix else 'no extension'}")  # fmt: skip


def onnx_metadata(model: XCiT, preprocessing: dict, class_names: list[str]) -> dict[str, str]:
    """What an ONNX file records about its model (``metadata_props``): the variant name, the full architecture
    (``xcit_config``: overrides included, so the model can be rebuilt as ``XCiT(XCiTConfig(**config))``), the class
    names and the evaluation preprocessing, each as JSON text."""
    import dataclasses
    import json

    return {
        "architecture": model.name,
        "xcit_config": json.dumps(dataclasses.asdict(model.cfg)),
        "class_names": json.dumps(class_names),
        "preprocessing": json.dumps(preprocessing),
    }


def _dims(model: XCiT, dynamic_batch: bool, dynamic_size: bool) -> dict[int, object]:
    from torch.export import Dim

    dims: dict[int, object] = {}
    if dynamic_batch:
        dims[0] = Dim("batch", min=1, max=4096)
    if dynamic_size:
        p = model.patch_size
        # H = p * h: the model's H % p == 0 check is then always true instead of a guard on the example's size
        dims[2] = p * Dim("grid_h", min=1, max=1024)
        dims[3] = p * Dim("grid_w", min=1, max=1024)
    return dims


def export_program(
    model: XCiT, example: torch.Tensor, dynamic_batch: bool = True, dynamic_size: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (in eval mode) with optional symbolic batch and spatial axes."""
    dims = _dims(model, dynamic_batch, dynamic_size)
    if dynamic_batch and example.shape[0] == 1:  # torch.export specialises size-1 axes: trace with a batch of 2
        example = example.expand(2, -1, -1, -1)
    with plain_forwards(model.eval()):
        return torch.export.export(model, (example,), dynamic_shapes={"x": dims or None})


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """``torch.export.save`` to ``path`` (conventionally ``.pt2``); load with ``torch.export.load(path).module()``."""
    torch.export.save(program, str(path))
    return Path(path)


def export_torchscript(model: XCiT, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """``torch.jit.trace`` (scripting cannot type the config dataclass); sizes are recorded as ops, so other batch
    sizes and resolutions run. Load with ``torch.jit.load(path)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the patch-size check is data-independent
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        with plain_forwards(model.eval()):
            traced = torch.jit.trace(model, (example,))
    traced.save(str(path))
    return Path(path)


def export_onnx(
    model: XCiT | torch.export.ExportedProgram,
    example: torch.Tensor,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an ONNX graph (``torch.onnx.export(..., dynamo=True)``) with input ``image`` (B, C, H, W) and output
    ``logits`` (B, classes). A given :class:`torch.export.ExportedProgram` is converted as is; a model is exported
    with :func:`export_program` first. ``metadata`` is stored in the model's ``metadata_props`` (class names,
    preprocessing).
    """
    import onnx

    path = Path(path)
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines list every folded constant
        logging.getLogger(name).setLevel(logging.WARNING)
    if isinstance(model, torch.export.ExportedProgram):
        program = model
    else:
        program = export_program(model, example, dynamic_batch, dynamic_size)
    onnx_program = torch.onnx.export(
        program, (example,), dynamo=True, verbose=False, input_names=["image"], output_names=["logits"],
        opset_version=opset,
    )  # fmt: skip
    onnx_program.save(str(path))
    proto = onnx.load(str(path))
    name_axes(proto)
    if metadata:
        onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
    onnx.save(proto, str(path))
    return path


AXIS_NAMES = ("batch", None, "height", "width")  # of the input image; the logits' first axis is "batch" too


def name_axes(proto) -> None:
    """Give the graph's symbolic axes readable names in place: the input's dynamic axes become ``batch``,
    ``height`` and ``width`` (and the logits' first axis ``batch``), where the exporter writes ``s77``,
    ``16*s52``, ``16*s80``. The symbols inside the other shapes follow (``s52`` -> ``height_patches``)."""
    exact: dict[str, str] = {}
    symbols: dict[str, str] = {}
    for dim, name in zip(proto.graph.input[0].type.tensor_type.shape.dim, AXIS_NAMES):
        if name and dim.dim_param:
            exact[dim.dim_param] = name
            found = re.findall(r"[A-Za-z_]\w*", dim.dim_param)
            if len(found) == 1:  # "s77" or "16*s52": the axis is one symbol (times the patch size)
                symbols[found[0]] = name if found[0] == dim.dim_param else f"{name}_patches"
    if not exact:
        return
    pattern = re.compile(r"[A-Za-z_]\w*")
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = exact.get(dim.dim_param) or pattern.sub(
                    lambda m: symbols.get(m.group(0), m.group(0)), dim.dim_param
                )


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an ONNX file was written with."""
    import onnx

    return next(
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    )


def load_exported(
    path: str | os.PathLike, fmt: str, model: XCiT | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running an exported file with its own runtime (onnxruntime, torch.jit, torch.export, timm, or
    :func:`xcit.from_pretrained` for a hub folder). ``timm`` needs the source ``model`` for its architecture."""
    if fmt == "hub":
        from ..weights.loading import from_pretrained

        loaded = from_pretrained(path)
        return lambda x: loaded(x).detach()
    if fmt == "timm":
        from ..weights.hub import timm_model

        loaded = timm_model(path, model)
        return lambda x: loaded(x).detach()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.load(str(path), map_location="cpu")
        return lambda x: module(x).detach()
    if fmt == "export":
        module = torch.export.load(str(path)).module()
        return lambda x: module(x).detach()
    raise ValueError(f"format must be one of {FORMATS}, 'hub' or 'timm', got {fmt!r}")


def run_exported(path: str | os.PathLike, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file once on ``x``."""
    return load_exported(path, fmt)(x)


def verify(path: str | os.PathLike, fmt: str, model: XCiT, inputs: list[torch.Tensor]) -> list[float]:
    """Max absolute logit difference between the exported file and ``model`` for each input."""
    run = load_exported(path, fmt, model)
    with torch.no_grad():
        return [float((run(x) - model.eval()(x)).abs().max()) for x in inputs]
