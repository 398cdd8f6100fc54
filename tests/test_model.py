import copy

import pytest
import torch

import xcit
from xcit.fast import forwards, plain
from xcit.model.pyramid import XCiTPyramid

from .conftest import perturb_

timm = pytest.importorskip("timm")


def _timm_pair(name, seed=0, **kw):
    ref = perturb_(timm.create_model(name, **kw), seed).eval()
    ours = xcit.create_model(name, num_classes=kw.get("num_classes", 1000)).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_all_28_variants_have_timm_param_counts():
    names = xcit.list_models()
    assert len(names) == 28
    for name in names:
        with torch.device("meta"):
            n_ref = sum(p.numel() for p in timm.create_model(name).parameters())
            n_ours = sum(p.numel() for p in xcit.create_model(name).parameters())
        assert n_ref == n_ours, name


@pytest.mark.parametrize(
    "name", ["xcit_nano_12_p16_224", "xcit_tiny_12_p8_224", "xcit_tiny_24_p16_224", "xcit_small_12_p16_224"]
)
def test_timm_parity(name, tmp_path):
    ref, ours = _timm_pair(name)
    # the same weights, saved in the official release's layout and read back through load_weights
    official = xcit.weights.files.timm_to_official(ref.state_dict())
    assert "pos_embeder.token_projection.weight" in official and "cls_attn_blocks.0.attn.qkv.weight" in official
    torch.save({"model": official}, tmp_path / "official.pth")
    from_official = xcit.create_model(name, pretrained=tmp_path / "official.pth").eval()
    slow = plain(copy.deepcopy(ours))  # the plain forwards (what export and tracing record)
    assert type(ours) is forwards.FastXCiT and type(slow) is xcit.XCiT
    for hw in [(224, 224), (160, 224)]:
        x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = ref(x)
            assert (ours(x) - want).abs().max() <= 1e-4
            assert (slow(x) - want).abs().max() <= 1e-4
            assert (from_official(x) - want).abs().max() <= 1e-4


def test_unknown_name_suggests():
    with pytest.raises(ValueError, match="xcit_tiny_12_p16_224"):
        xcit.create_model("xcit_tiny12_p16_224")
    with pytest.raises(TypeError, match="embed_dim"):
        xcit.create_model("xcit_nano_12_p16_224", embed_dims=8)


def test_any_resolution_and_clear_error(tiny_kwargs):
    m = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 320)).shape == (1, 10)
        assert m(torch.randn(1, 3, 32, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="multiple of the patch size 16.*224 or 240"):
        m(torch.randn(1, 3, 230, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(3, 224, 224))


def test_nano_high_resolution():
    m = xcit.create_model("xcit_nano_12_p16_224").eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, 512, 512))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_no_nan_and_close(dtype, tiny_kwargs):
    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=dtype):
            zeros = m(torch.zeros(2, 3, 64, 64))
            auto = m(x)
        half = m.to(dtype)
        zeros_cast = half(torch.zeros(2, 3, 64, 64, dtype=dtype))
        cast = half(x.to(dtype))
    for y in (zeros, auto, zeros_cast, cast):
        assert torch.isfinite(y).all()
    tol = 0.05 * ref.abs().max()
    assert (auto.float() - ref).abs().max() < tol
    assert (cast.float() - ref).abs().max() < tol


def test_xca_zero_input_fp16_no_nan():
    attn = xcit.model.xcit.XCA(32, 2)
    attn.qkv.bias.data.zero_()
    x = torch.zeros(1, 16, 32, dtype=torch.float16)
    big = torch.full((1, 4096, 32), 60.0, dtype=torch.float16)  # |q|^2 over the tokens overflows fp16
    with torch.no_grad():
        for x in (x, big):
            a, _ = attn.half().attention(x)
            fast, _ = forwards._channel_attention(attn, x)
            assert torch.isfinite(a).all() and torch.isfinite(fast).all()
            assert torch.isfinite(attn(x)).all()


def test_forward_intermediates_and_pyramid():
    m = xcit.create_model("xcit_nano_12_p16_224", embed_dim=32, num_heads=2).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        final, feats = m.forward_intermediates(x, indices=[3, -1])
        only = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert final.shape == (1, 1 + 4 * 6, 32)
        assert [f.shape for f in feats] == [(1, 32, 4, 6)] * 2
        assert len(only) == 2
        torch.testing.assert_close(m.forward_features(x), final)
        pyr = xcit.create_model("xcit_nano_12_p16_224", embed_dim=32, num_heads=2, features_only=True).eval()
        assert isinstance(pyr, XCiTPyramid) and pyr.out_indices == [3, 5, 7, 11]
        out = pyr(torch.randn(1, 3, 64, 96))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert all(v.shape[1] == 32 for v in out.values())
    p8 = xcit.create_model("xcit_nano_12_p8_224", embed_dim=32, num_heads=2, depth=24, features_only=True).eval()
    assert p8.out_indices == [7, 11, 15, 23]
    with torch.no_grad():
        out = p8(torch.randn(1, 3, 64, 64))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_class_attention_maps(tiny_kwargs):
    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        logits, attn = m(x, return_attention=True)
        full = m.class_attention(x)
        torch.testing.assert_close(logits, m(x))
        maps = m.channel_attention(x, indices=[0])
    assert attn.shape == (2, 2, 3, 4)
    assert full.shape == (2, 2, 1 + 12)
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(attn.flatten(2), full[:, :, 1:])
    assert maps[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 16))


def test_grad_checkpointing_same_grads_and_batchnorm_statistics(tiny_kwargs):
    import copy

    plain = xcit.create_model("xcit_nano_12_p16_224", drop_path_rate=0.2, **tiny_kwargs)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt):
        torch.manual_seed(0)  # the same drop-path draws; the recomputation replays them
        m(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # the recomputed forward must not update BatchNorm's running statistics a second time
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_grad_checkpointing_under_compile(tiny_kwargs):
    import copy

    plain = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    plain(x).sum().backward()
    torch.compile(ckpt)(x).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):  # one update: num_batches_tracked 1, not 2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_drop_path_is_constant_and_init(tiny_kwargs):
    m = xcit.create_model("xcit_tiny_24_p16_224", drop_path_rate=0.1, **tiny_kwargs)
    assert {b.drop_path.p for b in m.blocks} == {0.1}
    assert float(m.blocks[0].gamma1[0]) == pytest.approx(1e-5)
    assert float(m.blocks[0].attn.qkv.bias.abs().max()) == 0.0
    assert 0.015 < float(m.blocks[0].mlp.fc1.weight.std()) < 0.025


def test_head_api(tiny_kwargs):
    m = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    feats = m.forward_features(x)
    assert m.forward_head(feats, pre_logits=True).shape == (1, m.num_features)
    m.reset_classifier(3)
    assert m(x).shape == (1, 3)
    m.reset_classifier(0)
    assert m(x).shape == (1, 32)


def test_torch_export_matches_eager(tiny_kwargs):
    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 32, 48)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), m(x), atol=1e-5, rtol=1e-5)


def test_mindcv_flavour_switch(tiny_kwargs):
    m = xcit.create_model("xcit_nano_12_p16_224", flavour="mindcv", **tiny_kwargs)
    assert not m.blocks[0].attn.qk_norm and m.blocks[0].mlp.act.approximate == "tanh"
    m.set_flavour("official")
    assert m.blocks[0].attn.qk_norm and m.blocks[0].mlp.act.approximate == "none"
    assert m.patch_embed.proj[1].approximate == "none"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_xca_low_precision_cpu_layout_matches_fp32(dtype):
    """CPU bf16/fp16 take their own GEMM layouts for q^T k and the channel mixing: same values as fp32 on the same
    (rounded) inputs, with batch, heads, head dim and tokens all different so that a transposed index shows."""
    g = torch.Generator().manual_seed(3)
    attn = perturb_(forwards.FastXCA(24, 3), 3).eval()
    attn.temperature.data = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    x = torch.randn(2, 10, 24, generator=g).to(dtype)
    shortcut, gamma = torch.randn(2, 10, 24, generator=g).to(dtype), torch.rand(24, generator=g)
    low = attn.to(dtype)
    with torch.no_grad():
        got = low(x, shortcut=shortcut, gamma=gamma.to(dtype)).float()
        a_low, _ = forwards._channel_attention(low, x)
        ref = attn.float()
        want = ref(x.float(), shortcut=shortcut.float(), gamma=gamma.to(dtype).float())
        a_ref, _ = forwards._channel_attention(ref, x.float())
    torch.testing.assert_close(a_low.float(), a_ref, rtol=0, atol=2e-2)
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())


def test_token_norms_stay_fp32_under_compile_and_autocast():
    """q/k norms are summed and returned in fp32, even where autocast would run the compiled path's GEMV in bf16.
    (Eager squares bf16 inputs in bf16, then sums in fp32: 2^-9 relative at most per square.)"""
    t = torch.randn(3, 200, 16, generator=torch.Generator().manual_seed(4)).bfloat16()
    want = t.float().square().sum(dim=1).sqrt()
    compiled = torch.compile(xcit.fast.fastpath.column_norms, fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        eager, graph = xcit.fast.fastpath.column_norms(t), compiled(t)
    assert eager.dtype == graph.dtype == torch.float32
    torch.testing.assert_close(graph, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(eager, want, rtol=2**-9, atol=0)


def test_ddp_finds_every_gradient_in_its_bucket_layout(tmp_path, tiny_kwargs):
    """LPI's depthwise weights are created with the strides their gradients come back with, so DDP neither warns
    nor copies those gradients into its buckets at every step."""
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ddp(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        dist.destroy_process_group()
    assert not [w for w in seen if "strides" in str(w.message)]
    for p in m.parameters():
        assert p.grad.stride() == p.stride()


def test_block_indices_past_the_end_are_refused_not_wrapped(tiny_kwargs):
    """An index past either end names itself and the block count, as timm's message does; negative ones count from
    the end, as Python and timm count them."""
    m = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs).eval()  # 2 blocks
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for bad in ([0, 3], [0, -3], [12]):
            with pytest.raises(ValueError, match=rf"feature index {bad[-1]} is out of range \(0 to 1.* 2 XCA blocks"):
                m.forward_intermediates(x, indices=bad)
            with pytest.raises(ValueError, match=rf"feature index {bad[-1]} is out of range"):
                m.channel_attention(x, bad)
        with pytest.raises(ValueError, match=r"last-n \(3\) is out of range \(1 to 2\)"):
            m.forward_intermediates(x, indices=3)
        last = m.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]
        torch.testing.assert_close(last, m.forward_intermediates(x, indices=[1], intermediates_only=True)[0])
        assert set(m.channel_attention(x, [-2, -1])) == {0, 1}
    with pytest.raises(ValueError, match=r"feature index 12 is out of range \(0 to 11"):
        xcit.create_model(
            "xcit_nano_12_p16_224", embed_dim=32, num_heads=2, features_only=True, out_indices=[3, 5, 7, 12]
        )
    pyr = xcit.create_model(
        "xcit_nano_12_p16_224", embed_dim=32, num_heads=2, features_only=True, out_indices=[3, 5, 7, -1]
    )
    assert pyr.out_indices == [3, 5, 7, 11]
