"""oneDNN's fused GEMM + GELU kernels: the same values as the unfused ops, used only for CPU inference."""

import pytest
import torch
import torch.nn.functional as F

import xcit
from xcit.fast import cpu, fused

from .conftest import perturb_

needs_onednn = pytest.mark.skipif(not fused.AVAILABLE, reason="this torch build has no oneDNN fused ops")


def _close(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding of the output, 2^-8 relative, plus the GEMM's bf16 accumulation order
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2e-2)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_matches_unfused(dtype, approximate):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g) * 0.3, torch.randn(40, generator=g)
    wide = torch.randn(3, 7, 48, generator=g)
    for x in (torch.randn(5, 24, generator=g), torch.randn(2, 7, 24, generator=g), wide[..., ::2]):  # last: strided
        with torch.no_grad():
            got = fused.linear_gelu(x, w, b, approximate, dtype)
            want = F.gelu(
                F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float()), approximate=approximate
            )
        assert got.dtype == dtype and got.shape == (*x.shape[:-1], 40)
        _close(got, want, dtype)


@needs_onednn
def test_inference_uses_fused_kernels_training_does_not(tiny_kwargs):
    from .conftest import ops_run

    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(0))
    fused_gelu = {"mkldnn._linear_pointwise[gelu]"}
    for linears in (False, True):  # the GEMMs with a bias in oneDNN too, or in ATen
        try:
            fused_on = dict(fused_gelu_fp32=True, fused_gelu_bf16=True)  # whatever the family
            cpu.set_paths(onednn_linear_bf16=linears, onednn_linear_fp32=linears, **fused_on)
            with torch.no_grad():
                inference = set(ops_run(lambda: m(x)))
            with torch.autocast("cpu", torch.bfloat16), torch.inference_mode():
                bf16 = set(ops_run(lambda: m(x)))
        finally:
            cpu.set_paths()
        for ops in (inference, bf16):
            assert fused_gelu <= ops
            assert ("mkldnn._linear_pointwise[none]" in ops) == linears
        # fp32: fc2's residual add in the epilogue too (the binary form); bf16: the fp32 residual is added after
        assert ("mkldnn._linear_pointwise" in inference) == linears and "mkldnn._linear_pointwise" not in bf16
    # with a graph to record the unfused ops run: the fused ones have no backward
    training = ops_run(lambda: m(x).sum().backward())
    assert not any(op.startswith("mkldnn.") for op in training)
    assert m.blocks[0].mlp.fc1.weight.grad is not None and m.patch_embed.proj[0][0].weight.grad is not None


@needs_onednn
@pytest.mark.parametrize("flavour", ["official", "mindcv"])
def test_fused_inference_equals_unfused(flavour, tiny_kwargs):
    """The same logits with the fused kernels as with the graph-recording (unfused) path, in fp32 and bf16."""
    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", flavour=flavour, **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    unfused = m(x).detach()  # grad enabled: no fused kernel runs
    with torch.no_grad():
        torch.testing.assert_close(m(x), unfused, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", torch.bfloat16):
            got = m(x).float()
    with torch.autocast("cpu", torch.bfloat16):
        want = m(x).float().detach()
    assert (got - want).abs().max() <= 0.02 * unfused.abs().max()


@needs_onednn
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated, still what `xcit export --format torchscript` uses
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_exported_and_traced_graphs_keep_standard_ops(tiny_kwargs):
    """Export and tracing under no_grad (where eager inference would fuse) record only standard ATen ops."""
    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
        traced = torch.jit.trace(m, (x,))
        want = m(x)
    for graph in (str(ep.graph), str(traced.inlined_graph)):
        assert "xcit::" not in graph and "xcit.linear_gelu" not in graph and "mkldnn" not in graph
    assert "aten.gelu" in str(ep.graph)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("prepack", [False, True])
def test_cached_weights_follow_in_place_updates(dtype, prepack, tiny_kwargs):
    """The weights the oneDNN kernels keep (bf16 copies; prepacked, LayerScale folded in) follow in-place updates of
    every parameter they come from, and leave with their model."""
    import gc

    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(5))
    gc.collect()  # other tests' models, freed now rather than during this test
    before = len(fused._CASTS)

    def logits(model):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            return model(x).float()

    try:
        cpu.set_paths(onednn_linear_bf16=True, onednn_linear_fp32=True, prepack_weights=prepack)
        first = logits(m)
        assert len(fused._CASTS) > before or (dtype == torch.float32 and not prepack)  # fp32 needs no copies
        torch.testing.assert_close(logits(m), first, rtol=0, atol=0)
        with torch.no_grad():  # in-place updates, as an optimiser step or load_state_dict makes
            for blk in m.blocks:
                blk.mlp.fc1.weight.mul_(-1)
                blk.local_mp.conv1.bias.add_(1)
                blk.gamma2.mul_(3)  # folded into fc2's cached weight
                blk.attn.qkv.weight.mul_(0.5)
        updated = logits(m)
    finally:
        cpu.set_paths()
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):  # grad enabled: the plain path
        want = m(x).float().detach()
    assert (updated - first).abs().max() > 0.1
    assert (updated - want).abs().max() <= (0.02 if dtype == torch.bfloat16 else 1e-4) * want.abs().max()
    del m, blk
    gc.collect()
    assert len(fused._CASTS) == before
