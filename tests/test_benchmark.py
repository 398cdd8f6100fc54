"""``xcit benchmark`` runs and writes the documented JSON fields. No timing is asserted anywhere."""

import dataclasses
import json

import pytest
import torch

from xcit.bench import data as D
from xcit.bench import runner as B
from xcit.bench import sweep as S
from xcit.cli import main

TINY = dict(embed_dim=32, depth=2, num_heads=2)
NANO = "xcit_nano_12_p16_224"


def _finite_positive(x) -> bool:
    return isinstance(x, float) and x > 0 and x == x and x != float("inf")


def test_run_with_timm_has_every_field():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    res = B.run(NANO, batch=2, img_size=32, compare="timm", warmup=1, rounds=2, iters=1, **TINY)
    for key in ("model", "batch", "img_size", "precision", "compile", "threads", "machine", "versions"):
        assert key in res
    from xcit.fast import cpu

    assert res["machine"]["cpu_family"] == cpu.family() and isinstance(res["machine"]["environment"], dict)
    assert set(res["matmul_peak_gflops"]) == {"fp32", "bf16"} and all(
        map(_finite_positive, res["matmul_peak_gflops"].values())
    )
    macs = res["gmacs_per_image"]
    assert set(macs) == {"ours", "timm"} and all(map(_finite_positive, macs.values()))
    for mode in ("infer", "train"):
        for impl in ("ours", "timm"):
            r = res[mode][impl]
            for key in ("img_per_s", "ms_per_batch", "peak_memory_mib", "gflops_per_s", "fraction_of_peak"):
                assert _finite_positive(r[key]), (mode, impl, key, r.get(key))
            assert len(r["round_medians_ms"]) == 2
        q = res[mode]["ratio"]
        if mode == "infer":
            for impl in ("ours", "timm"):
                g = res[mode][impl]["gemm_only"]
                for key in ("ms_per_batch", "gflop_per_batch", "share_of_batch_time", "img_per_s_bound"):
                    assert _finite_positive(g[key]), (impl, key, g.get(key))
                assert _finite_positive(g["bound_fraction_of_peak"]) and _finite_positive(
                    g["bound_fraction_of_bf16_peak"]
                )
                assert 0 < g["distinct_calls"] <= g["calls"]
        assert q["round_ratio_min"] <= q["ratio"] * 1.000001 and q["ratio"] <= q["round_ratio_max"] * 1.000001
    json.dumps(res)  # JSON-ready


def test_cli_writes_results_file(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["benchmark", "--model", NANO, "--batch", "1", "--img-size", "32", "--mode", "infer", "--precision", "bf16"]
    argv += [
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--iters",
        "1",
        "--threads",
        "1",
        "--no-memory",
        "--results_file",
        str(out),
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["command"].startswith("xcit benchmark") and res["precision"] == "bf16" and res["threads"] == 1
    assert set(res["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert "train" not in res and _finite_positive(res["infer"]["ours"]["img_per_s"])
    assert "peak_memory_mib" not in res["infer"]["ours"]
    assert "ours" in capsys.readouterr().out


def test_peak_memory_counts_what_a_step_allocates():
    x = torch.zeros(256, 1024)  # 1 MiB
    small = B.peak_memory_mib(lambda: x + 1, torch.device("cpu"))
    big = B.peak_memory_mib(lambda: torch.cat([x] * 8) + 1, torch.device("cpu"))  # 8 + 8 MiB live at once
    assert 1 <= small < 4 and 15 <= big < 24


def test_flop_count_matches_the_analytic_count():
    from xcit.weights.factory import gmacs

    m = B.build_pair(NANO, torch.device("cpu"), None)["ours"]
    counted = B.count_flops(m.eval(), 224, torch.device("cpu")) / 2e9
    # the analytic count includes class attention's k and v (never computed here): ours is a little lower
    assert 0.9 * gmacs(m.cfg) < counted <= gmacs(m.cfg)


@pytest.mark.parametrize("impl", ["ours", "timm"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gemm_time_replays_every_counted_call(impl, precision):
    """The GEMM-only time covers exactly what FlopCounterMode counts: the same calls, the same FLOPs."""
    if impl == "timm":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    pair = B.build_pair(NANO, torch.device("cpu"), "timm" if impl == "timm" else None, **TINY)
    m = pair[impl].train()
    g = B.gemm_time(m, torch.randn(1, 3, 64, 64), B.PRECISIONS[precision], reps=1)
    assert m.training  # recorded in eval mode, the caller's mode restored
    assert _finite_positive(g["ms_per_batch"]) and 0 < g["distinct_calls"] < g["calls"]  # the blocks repeat
    counted = B.count_flops(m.eval(), 64, torch.device("cpu"), dtype=B.PRECISIONS[precision])
    assert g["gflop_per_batch"] == pytest.approx(counted / 1e9, rel=1e-9)


def test_gemm_time_times_fused_kernels_without_their_gelu():
    from .conftest import ops_run

    out = []
    x, w, b = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(16, 8), torch.randn(16)
    args = tuple(B._spec(a) for a in (x, w, b, "none", torch.bfloat16))
    call = B._gemm_of(torch.ops.xcit.linear_gelu.default, args)
    with torch.no_grad():
        seen = ops_run(lambda: out.append(call()))
    assert out[0].shape == (4, 16) and out[0].dtype == torch.bfloat16
    assert "aten.addmm" in seen and not any("gelu" in s for s in seen)
    # eager mode's call of the same oneDNN kernel is timed with no epilogue
    args = tuple(B._spec(a) for a in (x, w.bfloat16(), b.bfloat16(), "gelu", [], "none"))
    call = B._gemm_of(torch.ops.mkldnn._linear_pointwise.default, args)
    with torch.no_grad():
        seen = ops_run(lambda: out.append(call()))
    assert out[1].shape == (4, 16) and seen == ["mkldnn._linear_pointwise[none]"]


def test_sweep_and_plot(tmp_path):
    pytest.importorskip("timm")
    res = S.sweep(NANO, sizes=[32, 128], iters=1, batch=1, **TINY)
    assert [p["tokens"] for p in res["ours"]] == [4, 64] and [p["tokens"] for p in res["reference_points"]] == [4, 64]
    for p in res["ours"] + res["reference_points"]:
        assert _finite_positive(p["ms_per_image"]) and _finite_positive(p["peak_memory_mib_per_image"])
    assert res["scaling"]["tokens_ratio"] == 16 and _finite_positive(res["scaling"]["time_ratio"])
    png = S.plot_sweep(res, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_pipeline_bench(tmp_path):
    pytest.importorskip("timm")
    folder = D.write_jpegs(tmp_path / "jpegs", n=3, size=(80, 60))
    assert len(list(folder.glob("*/*.jpg"))) == 3
    res = D.bench_data(folder, rounds=2)
    assert res["images"] == 3 and res["recipe"]["auto_augment"] == "randaug-m9-mstd0.5-inc1"
    for k in ("ours", "timm"):
        assert _finite_positive(res[k]["img_per_s"])
    assert _finite_positive(res["ours"]["decode_ms"]) and _finite_positive(res["ratio"])


def test_data_command_says_whether_training_waits_for_data(tmp_path, capsys):
    """``--data`` times one training step of the model too, and sets the two against each other."""
    pytest.importorskip("timm")
    folder = D.write_jpegs(tmp_path / "jpegs", n=3, size=(80, 60))
    out = tmp_path / "data.json"
    argv = ["benchmark", "--data", str(folder), "--model", NANO, "--img-size", "32", "--batch", "2", "--threads", "1"]
    assert main([*argv, "--rounds", "2", "--iters", "1", "--results_file", str(out)]) == 0
    share = json.loads(out.read_text())["data_share"]
    assert share["model"] == NANO and share["batch"] == 2 and share["threads"] == 1
    assert _finite_positive(share["step_ms"]) and _finite_positive(share["loader_ms_per_batch_one_core"])
    assert share["loader_fraction_of_step"] == pytest.approx(share["loader_ms_per_batch_one_core"] / share["step_ms"])
    assert share["bound"] in ("compute", "data") and 0 < share["data_share_shared_cores"] < 1
    assert "one core prepares the batch in" in capsys.readouterr().out


def _always_c(tmp_path):
    """A 3-class checkpoint (classes a, b, c recorded) whose head always answers c, and a dataset root whose val
    split holds only b and c: folder order would call c class 1."""
    from PIL import Image

    import xcit

    model = xcit.create_model(NANO, embed_dim=32, depth=2, num_heads=2, num_classes=3, img_size=32)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    path = tmp_path / "always_c.pth"  # as xcit train records a model: its architecture and class names
    torch.save({"model": model.state_dict(), "arch": NANO, "model_config": dataclasses.asdict(model.cfg),
                "classes": ["a", "b", "c"]}, path)  # fmt: skip
    for split, classes in (("train", "abc"), ("val", "bc")):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), (60 * i, 100, 20)).save(tmp_path / "data" / split / c / f"{i}.png")
    return path, tmp_path / "data"


def _agreement(argv, tmp_path) -> dict:
    out = tmp_path / "agree.json"
    assert main(["benchmark", *argv, "--img-size", "32", "--threads", "1", "--results_file", str(out)]) == 0
    return json.loads(out.read_text())["agreement"]


def test_agreement_labels_classes_as_validate_does(tmp_path, capsys):
    weights, data = _always_c(tmp_path)
    argv = ["--agreement", str(data / "val"), "--pretrained", str(weights)]
    assert main(["benchmark", *argv, "--img-size", "32"]) == 2  # validate refuses a split that lacks classes
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not hold the checkpoint's classes" in err
    res = _agreement([*argv, "--ignore-class-mismatch", "True"], tmp_path)
    assert res["images"] == 6 and res["top1"]["fp32"] == 0.5  # the 3 c images are right, as validate scores them
    assert set(res["agreement_with_fp32"]) == {"bf16", "fp16"}
    vargs = ["--data_dir", str(data), "--ckpt_path", str(weights), "--image_resize", "32"]
    result = tmp_path / "val.json"
    assert main(["validate", *vargs, "--ignore_class_mismatch", "True", "--results_file", str(result)]) == 0
    assert json.loads(result.read_text())["top1"] == 100 * res["top1"]["fp32"]
    root = _agreement(["--agreement", str(data), "--pretrained", str(weights), "--ignore-class-mismatch", "True"],
                      tmp_path)  # fmt: skip
    assert root["images"] == 6 and root["folder"] == str((data / "val").resolve())  # a root: its val split


def test_agreement_refuses_random_weights_and_a_file(tmp_path, capsys):
    weights, data = _always_c(tmp_path)
    assert main(["benchmark", "--agreement", str(data / "val")]) == 2
    assert main(["benchmark", "--agreement", str(weights), "--pretrained", str(weights)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "needs --pretrained" in err[0] and "not a folder" in err[1] and len(err) == 2


@pytest.mark.gpu
def test_cuda_paths_bf16_channels_last_compile():
    """On CUDA: eager, channels_last input, bf16 autocast and torch.compile agree with timm's model."""
    timm = pytest.importorskip("timm")
    import xcit

    from .conftest import perturb_

    torch.backends.cudnn.allow_tf32 = False  # exact fp32 convolutions for the parity part
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    ref = perturb_(timm.create_model("xcit_tiny_12_p16_224")).to(dev).eval()
    ours = xcit.create_model("xcit_tiny_12_p16_224").to(dev).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 224, 224, device=dev)
    with torch.inference_mode():
        want = ref(x)
        assert (ours(x) - want).abs().max() <= 1e-4
        assert (ours(x.contiguous(memory_format=torch.channels_last)) - want).abs().max() <= 1e-4
        assert (torch.compile(ours)(x) - want).abs().max() <= 1e-3
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = ours(x).float()
        assert torch.isfinite(low).all() and (low - want).abs().max() < 0.05 * want.abs().max()
    train = xcit.create_model("xcit_nano_12_p16_224").to(dev).train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.compile(train)(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in train.parameters())


@pytest.mark.gpu
def test_cuda_benchmark_train_and_memory():
    pytest.importorskip("timm")
    res = B.run(NANO, batch=2, img_size=64, precision="bf16", compare="timm", device="cuda", warmup=1, rounds=1,
                iters=1)  # fmt: skip
    for mode in ("infer", "train"):
        assert res[mode]["ours"]["peak_memory_mib"] > 0 and res[mode]["ratio"]["ratio"] > 0


def test_fast_paths_keep_timm_gradients():
    """The folded training path (LayerScale in the GEMMs, channel mixing in proj, k/v-free class attention)
    gives timm's gradients and BN statistics for the same weights and batch."""
    timm = pytest.importorskip("timm")
    import xcit

    from .conftest import perturb_

    ref = perturb_(timm.create_model(NANO, num_classes=10, **TINY)).train()
    ours = xcit.create_model(NANO, num_classes=10, **TINY).train()
    ours.load_state_dict(ref.state_dict())
    x, y = torch.randn(4, 3, 48, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    for m in (ref, ours):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    want = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.endswith("attn.k.bias"):  # cancels in the softmax: its gradient is 0 up to rounding in both
            assert p.grad.abs().max() < 1e-5
            continue
        torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(ours.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.slow
def test_compiled_paths_match_timm_on_cpu():
    """torch.compile takes separate code paths (bias-free GEMMs, GEMV token norms, unfolded LayerScale in LPI):
    compiled inference gives timm's logits, and a compiled training step gives timm's gradients."""
    timm = pytest.importorskip("timm")
    import xcit

    from .conftest import perturb_

    ref = perturb_(timm.create_model(NANO, num_classes=10, **TINY))
    ours = xcit.create_model(NANO, num_classes=10, **TINY)
    ours.load_state_dict(ref.state_dict())
    x, y = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    compiled = torch.compile(ours)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), ref.eval()(x), rtol=0, atol=1e-4)
    for m in (ref.train(), compiled.train()):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    want = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if not name.endswith("attn.k.bias"):  # cancels in the softmax (see the test above)
            torch.testing.assert_close(p.grad, want[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_a_capped_cpu_compiles_without_the_on_disk_graph_caches(monkeypatch):
    """inductor's graph caches do not key on the vector ISA: under ATEN_CPU_CAPABILITY the benchmark compiles anew."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        assert B.uncached_if_capped() is False and inductor_config.fx_graph_cache
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
        assert B.uncached_if_capped() is True
        assert not inductor_config.fx_graph_cache and not functorch_config.enable_autograd_cache
