"""CPU-family dispatch (``xcit.fast.cpu``): detection, overrides, and every switch changing the path but not the
values."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import xcit
from xcit.bench import cpu_paths as cpu_bench
from xcit.fast import cpu, fused

needs_onednn = pytest.mark.skipif(not fused.AVAILABLE, reason="this torch build has no oneDNN fused ops")


@pytest.mark.parametrize(
    "capability, flags, want",
    [
        ("AVX512", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "amx"),  # Sapphire Rapids and later
        ("AVX512", {"avx512f", "avx512_bf16"}, "avx512_bf16"),  # AMD EPYC Zen 4 / 5, Cooper Lake
        ("AVX512", {"avx512f"}, "avx2"),  # Skylake-SP: AVX-512 without bf16
        ("AVX2", {"avx2", "fma"}, "avx2"),
        ("AVX2", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "avx2"),  # ATEN_CPU_CAPABILITY=avx2 on AMX
        ("SVE256", {"sve", "bf16"}, "other"),  # ARM (Graviton 3)
        ("DEFAULT", set(), "other"),
    ],
)
def test_detect_family(capability, flags, want):
    assert cpu.detect(capability, flags) == want


def test_this_machine_is_detected_from_its_flags():
    flags = cpu._flags()
    got = cpu.detect()
    assert got in cpu.FAMILIES
    assert (got == "amx") == ("amx_tile" in flags or "amx_bf16" in flags)
    if "amx_tile" not in flags and "avx512_bf16" in flags and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert got == "avx512_bf16"


def test_parse_switches_and_its_errors():
    assert cpu.parse_switches(" fused_gelu_bf16=0, batched_heads_bf16=on ,") == {
        "fused_gelu_bf16": False,
        "batched_heads_bf16": True,
    }
    with pytest.raises(ValueError, match="unknown switch 'fused_gelu'.*fused_gelu_bf16"):
        cpu.parse_switches("fused_gelu=0")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        cpu.parse_switches("fused_gelu_bf16=maybe")


def _in_fresh_process(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


def test_environment_overrides_family_and_switches():
    code = "import dataclasses, xcit.fast.cpu as c; print(c.family(), dataclasses.asdict(c.paths()))"
    r = _in_fresh_process(code, XCIT_CPU_FAMILY="amx", XCIT_CPU_PATHS="fused_gelu_bf16=0")
    assert r.returncode == 0, r.stderr
    fam, _, rest = r.stdout.strip().partition(" ")
    want = {**vars(cpu.CHOICES["amx"]), "fused_gelu_bf16": False}
    assert fam == "amx" and eval(rest) == want
    bad = _in_fresh_process("import xcit", XCIT_CPU_FAMILY="sparc")
    assert bad.returncode != 0 and "XCIT_CPU_FAMILY must be one of amx, avx512_bf16, avx2, other" in bad.stderr


def _ops(model, x, dtype):
    """Names of the ops one inference call runs, and its output."""
    from .conftest import ops_run

    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
        seen = ops_run(lambda: out.append(model(x).float()))
    return seen, out[0]


@needs_onednn
@pytest.mark.parametrize(
    "switch, dtype, op",
    [
        ("fused_gelu_fp32", None, "mkldnn._linear_pointwise[gelu]"),
        ("fused_gelu_bf16", torch.bfloat16, "mkldnn._linear_pointwise[gelu]"),
        ("onednn_linear_bf16", torch.bfloat16, "mkldnn._linear_pointwise[none]"),
        ("onednn_linear_fp32", None, "mkldnn._linear_pointwise[none]"),
        ("batched_heads_bf16", torch.bfloat16, "aten.permute"),  # the (image, head)-batched q^T k
        ("fold_mixing_fp32", None, "aten.baddbmm_"),  # attn folded into proj, the residual accumulated in place
    ],
)
def test_each_switch_changes_the_path_not_the_values(switch, dtype, op, tiny_kwargs):
    from .conftest import perturb_

    m = perturb_(xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs)).eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    try:
        cpu.set_paths(**{switch: True})
        on_ops, on = _ops(m, x, dtype)
        cpu.set_paths(**{switch: False})
        off_ops, off = _ops(m, x, dtype)
    finally:
        cpu.set_paths()
    count = on_ops.count(op) - off_ops.count(op)
    assert count > 0  # the switch took another path
    tol = 1e-5 if dtype is None else 0.02 * on.abs().max().item()
    assert (on - off).abs().max() <= tol


@pytest.mark.parametrize("with_gamma", [False, True])
def test_unfolded_channel_mixing_without_a_shortcut(with_gamma):
    """XCA alone (no residual to accumulate into): attn @ v then proj equals the folded form, LayerScale or not."""
    from xcit.fast.forwards import FastXCA

    torch.manual_seed(0)
    xca = FastXCA(32, 4).eval()
    x, gamma = torch.randn(2, 10, 32), (torch.rand(32) + 0.5 if with_gamma else None)
    outs = []
    try:
        for fold in (True, False):
            cpu.set_paths(fold_mixing_fp32=fold)
            with torch.no_grad():
                outs.append(xca(x, gamma=gamma))
    finally:
        cpu.set_paths()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@needs_onednn
def test_weight_cache_switches(tiny_kwargs):
    """cache_bf16_weights keeps bf16 copies of parameters, prepack_weights GEMM weights in oneDNN's layout."""
    import gc

    m = xcit.create_model("xcit_nano_12_p16_224", **tiny_kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    gc.collect()
    before = set(fused._CASTS)

    def new_entries(**switches):
        cpu.set_paths(onednn_linear_bf16=True, **switches)
        _ops(m, x, torch.bfloat16)
        return {k[-1] for k in set(fused._CASTS) - before}  # packed or not

    try:
        assert new_entries(cache_bf16_weights=False, prepack_weights=False) == set()
        assert new_entries(cache_bf16_weights=True, prepack_weights=False) == {False}
        assert True in new_entries(cache_bf16_weights=False, prepack_weights=True)
    finally:
        cpu.set_paths()
    assert cpu.paths() == cpu.default_paths()


@pytest.mark.slow
def test_benchmark_cpu_paths_command_reports_every_switch(tmp_path, capsys):
    """`xcit benchmark --cpu-paths` times each switch on and off and writes the measurements as JSON."""
    import json

    from xcit.cli.benchmark import main

    out = tmp_path / "paths.json"
    args = ["--cpu-paths", "--model", "xcit_nano_12_p16_224", "--batch", "1", "--rounds", "1", "--iters", "1"]
    assert main([*args, "--results-file", str(out)]) == 0
    res = json.loads(out.read_text())["cpu_paths"]
    assert set(res["switches"]) == {f.name for f in dataclasses.fields(cpu.FastPaths)}
    assert all(r["img_per_s_on"] > 0 and r["img_per_s_off"] > 0 for r in res["switches"].values())
    assert res["family"] == cpu.family() and "linear_gelu_bf16_ms" in res["ops"]
    printed = capsys.readouterr().out
    assert all(name in printed for name in res["switches"])


@pytest.mark.skipif(
    "avx2" not in cpu._flags() or not fused.AVAILABLE, reason="needs an x86 CPU with AVX2 and a oneDNN build"
)
def test_cpu_paths_on_an_avx2_only_cpu_times_fp32_and_skips_emulated_bf16(tmp_path):
    """With ATen, inductor and oneDNN capped to AVX2 (bf16 then runs through conversions, ~100x slower than fp32),
    `xcit benchmark --cpu-paths` takes the avx2 family's choices, times the fp32 switches (prepacking in fp32) and
    skips the bf16-only ones, and the GEMM peaks are measured at a size that takes seconds, not minutes."""
    import json

    out = tmp_path / "paths.json"
    code = (
        "from xcit.cli.benchmark import main; raise SystemExit(main(['--cpu-paths', '--model', "
        f"'xcit_nano_12_p16_224', '--batch', '1', '--rounds', '1', '--iters', '1', '--results-file', {str(out)!r}]))"
    )
    caps = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    r = _in_fresh_process(code, **caps, XCIT_CPU_PATHS="", XCIT_CPU_FAMILY="")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["cpu_paths"]
    assert res["family"] == "avx2" and res["capability"] == "AVX2" and res["chosen"] == vars(cpu.CHOICES["avx2"])
    assert res["bf16"]["native"] is False and res["machine"]["environment"]["ATEN_CPU_CAPABILITY"] == "avx2"
    switches = res["switches"]
    skipped = {k for k, v in switches.items() if "skipped" in v}
    bf16_only = {k for k, d in cpu_bench.SWITCH_DTYPE.items() if d is torch.bfloat16} - cpu_bench.BOTH_PRECISIONS
    assert skipped == bf16_only and all("emulated" in switches[k]["skipped"] for k in skipped)
    assert switches["prepack_weights"]["precision"] == "fp32"
    assert all(v["img_per_s_on"] > 0 and v["img_per_s_off"] > 0 for k, v in switches.items() if k not in skipped)
    assert set(res["ops"]) == {"linear_gelu_fp32_ms"}
    assert "not timed: bf16 is emulated here" in r.stdout
