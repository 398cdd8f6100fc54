"""CUDA-only mistakes caught without a GPU: the model's forward and the device-side batch work on fake ``cuda``
tensors (PyTorch's ``FakeTensorMode``: shapes, dtypes and devices are propagated, no kernel runs).

The installed torch is a CUDA build, so fake CUDA tensors can be made here. A tensor left on the CPU (a buffer made
with ``torch.zeros(...)`` in a forward, a table built on the default device) meets a CUDA tensor in an op and fails
with the same device-mismatch error a GPU run gives. Backward needs a real device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from xcit.config.train_config import load_config
from xcit.data.pipeline import batch_stage, mixup_fn
from xcit.weights.factory import create_model

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}

pytestmark = pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="needs a CUDA build of torch")


def _fake_call(model: torch.nn.Module, x: torch.Tensor, mode: FakeTensorMode, dtype=None) -> torch.Tensor:
    """``model(x)`` with every parameter and buffer converted to a fake CUDA tensor (``functional_call``), in
    ``dtype`` when given (a half-precision model: autocast itself switches off where no GPU is present)."""
    state = {}
    for k, v in [*model.named_parameters(), *model.named_buffers()]:
        v = mode.from_tensor(v).to("cuda")
        state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return torch.func.functional_call(model, state, (x if dtype is None else x.to(dtype),))


@pytest.mark.parametrize("name", ["xcit_nano_12_p16_224", "xcit_tiny_12_p8_224"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_model_forward_on_fake_cuda(name, dtype):
    model = create_model(name, num_classes=10, img_size=32, **TINY).eval()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3, 32, 48)).to("cuda")  # a non-square grid too
        out = _fake_call(model, x, mode, dtype)
    assert out.device.type == "cuda" and out.shape == (2, 10)
    assert out.dtype == (dtype or torch.float32)


def test_train_mode_forward_on_fake_cuda():
    """Training-mode forward: drop path and BatchNorm's batch statistics on the device."""
    model = create_model("xcit_nano_12_p16_224", num_classes=10, img_size=32, drop_path_rate=0.1, **TINY).train()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(4, 3, 32, 32)).to("cuda")
        out = _fake_call(model, x, mode)
    assert out.device.type == "cuda" and out.shape == (4, 10)


def test_a_cpu_tensor_in_a_cuda_forward_is_caught():
    """The check can fail: a buffer left on the CPU meets the CUDA activations."""
    model = create_model("xcit_nano_12_p16_224", num_classes=10, img_size=32, **TINY).eval()
    with FakeTensorMode() as mode:
        state = {k: mode.from_tensor(v).to("cuda") for k, v in [*model.named_parameters(), *model.named_buffers()]}
        state["head.bias"] = mode.from_tensor(model.head.bias)  # forgotten on the CPU
        x = mode.from_tensor(torch.randn(2, 3, 32, 32)).to("cuda")
        with pytest.raises(RuntimeError, match="device"):
            torch.func.functional_call(model, state, (x,))


def test_batch_stage_and_mixup_on_fake_cuda():
    """The device-side batch work: uint8 -> normalised float, random erasing, then mixup/cutmix with smoothed
    targets, all on the (fake) GPU."""
    cfg = load_config(["--re_prob", "1.0", "--re_value", "pixel", "--mixup", "0.8", "--cutmix", "1.0",
                       "--label_smoothing", "0.1", "--batch_size", "4"])[0]  # fmt: skip
    mix = mixup_fn(cfg, num_classes=10)
    with FakeTensorMode() as mode:
        stage = batch_stage(cfg, "cuda")  # mean/std (and erasing's noise) made on the device
        x = mode.from_tensor(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)).to("cuda")
        y = mode.from_tensor(torch.arange(4)).to("cuda")
        out = stage(x)  # erasing draws its rectangles from Python's random, its noise on the device
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (4, 3, 32, 32)
        for seed in (0, 3):  # both branches: mixup and cutmix
            np.random.seed(seed)
            xm, ym = mix(out, y)
            assert xm.device.type == "cuda" and ym.device.type == "cuda" and ym.shape == (4, 10)
        with pytest.raises(RuntimeError, match="device"):  # a CPU mean would be caught
            x.float().sub_(torch.zeros(1, 3, 1, 1))
