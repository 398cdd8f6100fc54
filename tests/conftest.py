import os
import subprocess
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("XCIT_THREADS", "2")  # runs in and under the tests keep one thread count (equal sums)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise every parameter and BN statistic so that parity tests cannot pass by symmetry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


@pytest.fixture
def tiny_kwargs():
    """A depth-2, dim-32 XCiT for fast tests."""
    return dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)


needs_mindcv = pytest.mark.skipif(
    not os.environ.get("XCIT_MINDCV_PYTHON"), reason="set XCIT_MINDCV_PYTHON to a MindCV python"
)


def run_mindcv_fixture_script(what: str, out_dir, timeout: int = 300) -> None:
    """Run scripts/make_mindcv_train_fixture.py ``--what what`` with the MindCV python, writing into ``out_dir``."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_mindcv_train_fixture.py"
    cmd = [os.environ["XCIT_MINDCV_PYTHON"], str(script), "--what", what, "--out-dir", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def ops_run(fn) -> list[str]:
    """Names of the ops ``fn()`` dispatches, in order; oneDNN's fused GEMM/conv kernels with their epilogue
    (``mkldnn._linear_pointwise[gelu]``, ``mkldnn._convolution_pointwise[none]``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    epilogue_at = {"mkldnn._linear_pointwise": 3, "mkldnn._convolution_pointwise": 7}
    seen: list[str] = []

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            at = epilogue_at.get(name)
            seen.append(name if at is None or func.name().endswith(".binary") else f"{name}[{args[at]}]")
            return func(*args, **(kwargs or {}))

    with Names():
        fn()
    return seen
