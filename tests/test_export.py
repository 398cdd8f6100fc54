"""ONNX (checked with onnxruntime), TorchScript and torch.export round trips, with dynamic batch and resolution."""

import json

import pytest
import torch

import xcit
from xcit.cli import export as export_cmd
from xcit.infer.export import (
    export_onnx,
    export_program,
    export_torchscript,
    onnx_opset,
    run_exported,
    save_program,
    verify,
)

from .conftest import perturb_

TINY = dict(embed_dim=32, depth=2, num_heads=2)
# other batch sizes and resolutions than the example (2, 3, 32, 48) the graph is traced with
SHAPES = [(2, 3, 32, 48), (5, 3, 32, 48), (1, 3, 64, 32), (3, 3, 96, 112)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturb_(xcit.create_model("xcit_nano_12_p16_224", num_classes=10, **TINY)).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*s, generator=g) for s in SHAPES]


@pytest.fixture(scope="module")
def program(model, inputs):
    return export_program(model, inputs[0], dynamic_batch=True, dynamic_size=True)


@pytest.mark.slow
def test_onnx_dynamo_from_program(model, inputs, program, tmp_path):
    pytest.importorskip("onnxruntime")
    meta = {"class_names": json.dumps([str(i) for i in range(10)])}
    path = export_onnx(program, inputs[0], tmp_path / "m.onnx", dynamic_size=True, metadata=meta)
    assert onnx_opset(path) == 18
    diffs = verify(path, "onnx", model, inputs)
    assert max(diffs) <= 1e-4, diffs
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["class_names"])[3] == "3"
    graph = onnx.load(str(path)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [
        "batch", 3, "height", "width"
    ]  # fmt: skip
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 10]


def test_onnx_axes_are_named_batch_height_width():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from xcit.infer.export import name_axes

    shapes = {"image": ["s77", 3, "16*s52", "16*s80"], "t": ["s77", "s52*s80 + 1", 64], "logits": ["s77", 10]}
    image, t, logits = (helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items())
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [image], [logits], [], "",
                              [t])  # fmt: skip
    proto = helper.make_model(graph)
    name_axes(proto)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in
            (*proto.graph.input, *proto.graph.output, *proto.graph.value_info)}  # fmt: skip
    assert dims == {
        "image": ["batch", 3, "height", "width"],
        "logits": ["batch", 10],
        "t": ["batch", "height_patches*width_patches + 1", 64],
    }
    onnx.checker.check_model(proto)


def test_torch_export_save_and_load(model, inputs, program, tmp_path):
    path = save_program(program, tmp_path / "m.pt2")
    assert max(verify(path, "export", model, inputs)) <= 1e-5


def test_torchscript_trace(model, inputs, tmp_path):
    path = export_torchscript(model, inputs[0], tmp_path / "m.pt")
    assert max(verify(path, "torchscript", model, inputs)) <= 1e-5


def test_export_command_on_a_training_checkpoint(model, tmp_path, caplog):
    ort = pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "arch": "xcit_nano_12_p16_224", "classes": list("abcdefghij")}, ckpt)
    out = tmp_path / "m.onnx"
    argv = [
        "--pretrained",
        str(ckpt),
        "--out",
        str(out),
        "--img-size",
        "32",
        "48",
        "--batch-size",
        "2",
        "--opset",
        "17",
    ]
    with caplog.at_level("INFO", logger="xcit"):
        assert export_cmd.main(argv) == 0
    assert "opset 17" in caplog.text and "(2, 3, 32, 48)" in caplog.text
    assert onnx_opset(out) == 17
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(run_exported(out, "onnx", x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument):  # static unless --dynamic-batch
        run_exported(out, "onnx", torch.randn(3, 3, 32, 48))
    with pytest.raises(ValueError, match="--format export writes .pt2 files"):
        export_cmd.main(["--format", "export", "--pretrained", str(ckpt), "--out", str(tmp_path / "m.onnx")])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        export_cmd.main(["--pretrained", str(ckpt), "--out", str(out), "--img-size", "40"])


def test_onnx_metadata_records_the_architecture_with_its_overrides(model):
    from xcit.infer.export import onnx_metadata
    from xcit.model.arch import XCiTConfig
    from xcit.model.xcit import XCiT

    meta = onnx_metadata(model, {"input_size": [3, 32, 32]}, list("abcdefghij"))
    cfg = json.loads(meta["xcit_config"])
    assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["num_classes"]) == (32, 2, 2, 10)
    XCiT(XCiTConfig(**cfg)).load_state_dict(model.state_dict())  # strict: the very architecture


@pytest.mark.slow  # one ONNX export: about 15 s of CPU
def test_onnx_metadata_rebuilds_the_real_model(model, tmp_path):
    """The metadata names the architecture with its overrides (a 2-block, 32-wide nano here), so the file alone is
    enough to rebuild the PyTorch model it came from."""
    import dataclasses

    import onnx

    from xcit.model.arch import XCiTConfig
    from xcit.model.xcit import XCiT

    ckpt = tmp_path / "ckpt.pth"
    state = {"model": model.state_dict(), "arch": "xcit_nano_12_p16_224", "classes": list("abcdefghij")}
    torch.save({**state, "model_config": dataclasses.asdict(model.cfg)}, ckpt)
    out = tmp_path / "m.onnx"
    assert export_cmd.main(["--pretrained", str(ckpt), "--out", str(out), "--img-size", "32"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["architecture"] == "xcit_nano_12_p16_224" and json.loads(props["class_names"]) == list("abcdefghij")
    rebuilt = XCiT(XCiTConfig(**json.loads(props["xcit_config"]))).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the same shapes as the exported model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(run_exported(out, "onnx", x), rebuilt(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["hub", "timm"])
def test_export_command_hub_and_timm(model, tmp_path, caplog, fmt):
    """A training checkpoint (with its recorded preprocessing) -> hub folder / timm file, checked by the command."""
    from xcit.config.train_config import TrainConfig

    cfg = TrainConfig(image_resize=32, interpolation="bicubic", crop_pct=0.9, mean=[0.5] * 3, std=[0.5] * 3)
    ckpt = tmp_path / "ckpt.pth"
    state = {"model": model.state_dict(), "arch": "xcit_nano_12_p16_224", "classes": list("abcdefghij")}
    torch.save({**state, "config": cfg.to_dict()}, ckpt)
    out = tmp_path / ("folder" if fmt == "hub" else "timm.safetensors")
    with caplog.at_level("INFO", logger="xcit"):
        assert export_cmd.main(["--format", fmt, "--pretrained", str(ckpt), "--out", str(out)]) == 0
    assert "(1, 3, 48, 64)" in caplog.text  # another resolution was checked too
    if fmt == "hub":
        config = json.loads((out / "config.json").read_text())
        assert config["pretrained_cfg"]["crop_pct"] == 0.9 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
        assert config["label_names"] == list("abcdefghij")
        loaded = xcit.from_pretrained(out)
        assert torch.equal(loaded.head.weight, model.head.weight)
