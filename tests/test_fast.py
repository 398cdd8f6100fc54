"""The fast forwards (``xcit.fast``) against the plain model (``xcit.model.xcit``): the same values and gradients
under every combination of the CPU switches each precision reads, the switch between them, and export recording
the plain forwards."""

import copy
import dataclasses
import itertools

import pytest
import torch

import xcit
from xcit.fast import accelerate, cpu, forwards, is_accelerated, plain, plain_forwards
from xcit.model import xcit as plain_model

from .conftest import perturb_

# the switches each precision's paths read (the others leave that precision's path as it is)
FP32_SWITCHES = ("fused_gelu_fp32", "onednn_linear_fp32", "prepack_weights", "fold_mixing_fp32")
BF16_SWITCHES = ("fused_gelu_bf16", "batched_heads_bf16", "cache_bf16_weights", "onednn_linear_bf16", "prepack_weights")


def test_the_switches_cover_every_cpu_switch():
    assert set(FP32_SWITCHES) | set(BF16_SWITCHES) == {f.name for f in dataclasses.fields(cpu.FastPaths)}


def _pair(tiny_kwargs, **kw):
    """A perturbed plain model and its accelerated copy (the same parameters)."""
    slow = perturb_(xcit.create_model("xcit_nano_12_p16_224", fast=False, **tiny_kwargs, **kw))
    fast = accelerate(copy.deepcopy(slow))
    assert not is_accelerated(slow) and is_accelerated(fast)
    return slow, fast


def _combinations(names):
    for values in itertools.product((False, True), repeat=len(names)):
        yield dict(zip(names, values))


def _run(model, x, dtype, train):
    """Logits (inference) or logits and every parameter's gradient (a training step), under ``dtype`` autocast."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        if not train:
            with torch.no_grad():
                return model(x).float(), {}
        out = model(x)
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("dtype", "names"), [(torch.float32, FP32_SWITCHES), (torch.bfloat16, BF16_SWITCHES)])
def test_fast_equals_plain_under_every_switch_combination(dtype, names, tiny_kwargs):
    slow, fast = _pair(tiny_kwargs)
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    _, exact = _run(copy.deepcopy(slow), x, torch.float32, True)  # bf16 gradients: how far from fp32's
    try:
        for switches in _combinations(names):
            cpu.set_paths(**switches)
            for train in (False, True):
                want, want_grads = _run(slow, x, dtype, train)
                got, grads = _run(fast, x, dtype, train)
                if dtype == torch.float32:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{switches}: {m}")
                else:  # bf16 rounds at other places in each: a few bf16 steps of the largest logit
                    assert (got - want).abs().max() <= 0.03 * want.abs().max(), switches
                for name, g in grads.items():
                    ref = want_grads[name]
                    if dtype == torch.float32:
                        torch.testing.assert_close(
                            g, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{switches} {name}: {m}"
                        )
                    else:  # as close to the fp32 gradient as the plain forwards' bf16 gradient is
                        err, plain_err = (g - exact[name]).norm(), (ref - exact[name]).norm()
                        assert err <= 2 * plain_err + 0.02 * exact[name].norm(), (switches, name, err, plain_err)
    finally:
        cpu.set_paths()


def _fixed_dropout(self, x):
    """Dropout with a mask drawn in the tensor's logical order (seeded by its size): the plain and fast forwards lay
    the same values out differently in memory, and torch's dropout draws its mask in memory order."""
    if not self.training or self.p == 0:
        return x
    keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(x.numel())) >= self.p
    return x * keep.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("flavour", ["official", "mindcv"])
def test_fast_equals_plain_with_dropout_drop_path_and_attention(flavour, tiny_kwargs, monkeypatch):
    """Training with dropout and drop path (the same random draws), the attention maps, fp16 and both flavours."""
    slow, fast = _pair(tiny_kwargs, flavour=flavour, drop_rate=0.1, drop_path_rate=0.2)
    monkeypatch.setattr(torch.nn.Dropout, "forward", _fixed_dropout)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (slow, fast):
        m.train()
        torch.manual_seed(0)  # drop path's per-image draws
        m(x).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():
        (a, maps_a), (b, maps_b) = (m.eval()(x, return_attention=True) for m in (slow, fast))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(maps_b, maps_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.class_attention(x), slow.class_attention(x), rtol=1e-4, atol=1e-6)
        half = (m.half()(x.half()).float() for m in (slow, fast))
        torch.testing.assert_close(next(half), next(half), rtol=0, atol=0.02 * a.abs().max().item())


def test_accelerate_and_plain_switch_classes_in_place_and_keep_the_state_dict(tiny_kwargs):
    m = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)
    assert type(m) is forwards.FastXCiT and type(m.blocks[0].attn) is forwards.FastXCA  # create_model's default
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert plain(m) is m and type(m) is plain_model.XCiT and not is_accelerated(m)
    assert {type(x) for x in m.modules()}.isdisjoint(forwards.PLAIN)
    assert accelerate(m) is m and {type(x) for x in m.modules()} >= set(forwards.PLAIN)
    assert m.state_dict().keys() == state.keys() and all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert isinstance(m, plain_model.XCiT) and isinstance(m.blocks[0].attn, plain_model.XCA)
    with plain_forwards(m):
        assert not is_accelerated(m)
    assert type(m.blocks[0].attn) is forwards.FastXCA
    assert not is_accelerated(xcit.create_model("xcit_nano_12_p16_224", fast=False, **tiny_kwargs))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_records_the_plain_forwards(tiny_kwargs, tmp_path):
    """torch.export and TorchScript tracing of an accelerated model record the plain modules, and the model keeps
    its fast forwards afterwards."""
    from xcit.infer.export import export_program, export_torchscript

    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 32, 48)
    program = export_program(m, x)
    stacks = [n.meta.get("nn_module_stack", {}) for n in program.graph.nodes]
    classes = {str(cls) for stack in stacks for _, cls in stack.values()}
    assert any("XCA" in c for c in classes) and not any("Fast" in c for c in classes)
    traced = torch.jit.load(export_torchscript(m, x, tmp_path / "m.pt"))
    assert getattr(traced.blocks, "0").attn.original_name == "XCA" and traced.original_name == "XCiT"
    assert type(m.blocks[0].attn) is forwards.FastXCA
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), m(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced(x), m(x), rtol=1e-5, atol=1e-5)
