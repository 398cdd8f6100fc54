"""What a new user runs into first: conversions, one-line errors, file-type messages (through the CLI)."""

import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xcit
from xcit.cli import main
from xcit.weights.files import SUPPORTED

from .conftest import perturb_

KW = dict(embed_dim=32, depth=2, num_heads=2, num_classes=10)
NAME = "xcit_nano_12_p16_224"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def weights(tmp_path):
    model = perturb_(xcit.create_model(NAME, **KW)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    return model, tmp_path / "w.pth"


def _is_safetensors(path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return len(list(f.keys())) > 0


@pytest.mark.parametrize("to", ["timm", "official"])
def test_convert_to_timm_or_official_with_safetensors_name_writes_safetensors(weights, tmp_path, to):
    from xcit.weights.hub import timm_model

    model, src = weights
    dst = tmp_path / f"out_{to}.safetensors"
    assert main(["convert", str(src), str(dst), "--to", to]) == 0
    assert _is_safetensors(dst)
    x = torch.randn(2, 3, 32, 32)
    back = xcit.create_model(NAME, pretrained=dst, **KW).eval()  # and our reader reads it back
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
        if to == "timm":  # timm loads it as its own weights
            torch.testing.assert_close(timm_model(dst, model)(x), model(x), atol=1e-4, rtol=1e-4)


def test_python_convert_to_timm_writes_safetensors(weights, tmp_path):
    _, src = weights
    xcit.convert(src, tmp_path / "t.safetensors", to="timm")
    assert _is_safetensors(tmp_path / "t.safetensors")


def test_safetensors_files_follow_the_umask(weights, tmp_path):
    _, src = weights
    old = os.umask(0o022)
    try:
        assert main(["convert", str(src), str(tmp_path / "u.safetensors")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "u.safetensors").stat().st_mode) == 0o644


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_export_extra_is_one_line_naming_it(weights, tmp_path, monkeypatch, capsys, missing):
    _, src = weights
    monkeypatch.setitem(sys.modules, missing, None)  # as if the package were not installed: import fails
    assert main(["export", "--pretrained", str(src), "--model", NAME, "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"'{missing}'" in err and "pip install -e '.[export]'" in err


def test_missing_hub_package_names_the_extra(monkeypatch, capsys, tmp_path):
    from xcit.cli.main import error_line

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError) as e:
        import huggingface_hub  # noqa: F401
    assert "'.[hub]'" in error_line(e.value)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError) as e:
        import tensorboard  # noqa: F401
    assert "'.[tensorboard]'" in error_line(e.value)


def test_os_errors_are_one_line(weights, tmp_path, capsys):
    _, src = weights
    (tmp_path / "dir.safetensors").mkdir()  # a folder where the output file should go
    assert main(["convert", str(src), str(tmp_path / "dir.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xcit convert: error:") and len(err.splitlines()) == 1


def test_root_train_py_goes_through_the_cli_error_handling(tmp_path):
    import subprocess

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    (tmp_path / "afile").touch()  # ckpt_save_dir under a regular file: an OSError when the run makes its folder
    r = subprocess.run([sys.executable, str(root / "train.py"), "--data_dir", str(tmp_path / "data"),
                        "--ckpt_save_dir", str(tmp_path / "afile" / "out")], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "xcit train: error:" in r.stderr


def _non_weight_files(tmp_path):
    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "table.csv").write_text("epoch,loss\n1,0.5\n")
    return [root / "configs" / "demo.yaml", root / "README.md", tmp_path / "photo.png", tmp_path / "table.csv"]


def test_a_file_that_is_not_weights_is_named_as_such(tmp_path, capsys):
    for path in _non_weight_files(tmp_path):
        argv = ["predict", str(tmp_path / "photo.png"), "--pretrained", str(path), "--model", NAME]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"xcit predict: error: {path}: not a weight file of any supported format ({SUPPORTED})", err


def test_a_real_pickle_with_code_keeps_the_refusal(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    torch.save({"model": Evil()}, tmp_path / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("evil.pth", "evil_legacy.pt"):
        assert main(["predict", str(tmp_path / name), "--pretrained", str(tmp_path / name), "--model", NAME]) == 2
        assert "refused to load" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec, named",
    [
        ("randaugm9", "unknown policy 'randaugm9'"),
        ("rand-m9-mstd0.5-inc1x", "part 'inc1x': inc takes 0 or 1"),
        ("randaug-m9-foo", "unknown part 'foo'"),
        ("rand-mx", "part 'mx': m takes an integer"),
        ("rand-m9-", "unknown part ''"),
        ("augmix-m5-q2", "unknown part 'q2'"),
        ("original-m3", "unknown part 'm3'"),
    ],
)
def test_bad_auto_augment_names_the_part(tmp_path, capsys, spec, named):
    assert main(["train", "--data_dir", str(tmp_path), "--auto_augment", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"xcit train: error: bad value for 'auto_augment': {spec!r}: ") and named in err, err


@pytest.mark.parametrize(
    "spec",
    ["rand-m9-mstd0.5-inc1", "randaug-m9-mstd0.5-inc1", "rand-m9-n3-mstd0.5", "rand-mstd1-tweights", "rand-m7-p0.3",
     "rand-m9-mmax10-t3a", "original-mstd0.5", "originalr", "autoaug", "autoaugr-mstd0.5", "v0", "v0r", "3a",
     "augmix", "augmix-m5-w4-d2", "augmix-m5-a1.0-b1-mstd0.5", "trivialaugwide-m20"],
)  # fmt: skip
def test_every_timm_and_mindcv_spelling_is_accepted(spec):
    from xcit.config.train_config import load_config

    assert load_config(["--auto_augment", spec])[0].auto_augment == spec


def test_tensorboard_missing_is_one_notice(tmp_path, caplog, monkeypatch):
    import logging

    from xcit.train.logs import MetricsLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without tensorboard installed
    with caplog.at_level(logging.INFO, logger="xcit"):
        MetricsLog(tmp_path, tensorboard=True)
        MetricsLog(tmp_path, tensorboard=False)  # turned off: no notice
    assert [r.message for r in caplog.records if "tensorboard" in r.message] == [
        "tensorboard: not installed, no event files (pip install -e '.[tensorboard]'; tensorboard: False silences this)"
    ]


def _digit_png(tmp_path) -> Path:
    import numpy as np
    from PIL import Image

    path = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_underscore_and_dash_spellings_work_in_every_command(weights, tmp_path, capsys):
    _, src = weights
    img, w = str(_digit_png(tmp_path)), ["--pretrained", str(src), "--model", NAME]
    assert main(["predict", img, *w, "--batch_size", "2", "--img_size", "32", "--json"]) == 0
    assert main(["predict", img, *w, "--batch-size", "2", "--img-size", "32", "--json"]) == 0
    out, attn = str(tmp_path / "m.pt"), str(tmp_path / "attn")
    assert main(["export", *w, "--format", "torchscript", "--out", out, "--img_size", "32", "--dynamic_batch"]) == 0
    assert main(["attention", img, *w, "--out", attn, "--channel_blocks", "0", "--img_size", "32"]) == 0
    assert (tmp_path / "attn" / "xca_block0.png").is_file()
    assert main(["convert", str(src), str(tmp_path / "c.safetensors"), "--to", "timm"]) == 0
    assert main(["models", "nano", "--json"]) == 0


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_train_help_is_grouped_typed_and_clean(capsys):
    text = _help(["train", "--help"], capsys)
    for group in ("data", "model", "augmentation", "optimiser", "schedule", "checkpoints and EMA", "distributed",
                  "precision"):  # fmt: skip
        assert f"\n{group}" in text and " options:\n" in text, group
    assert " V " not in text and " V\n" not in text  # no bare metavar: types and choices instead
    assert "--batch_size INT" in text and "--opt {adamw,adam," in text and "--scale FLOAT,FLOAT" in text
    assert "57.12," in text and "57.120000000000005" not in text
    assert "- or _" in text


def test_validate_help_lists_only_what_validate_reads(capsys, tmp_path):
    text = _help(["validate", "--help"], capsys)
    assert "--ckpt_path" in text and "--val_split" in text and "--crop_pct" in text
    for key in ("--opt ", "--mixup ", "--lr ", "--warmup_epochs", "--epoch_size", "--auto_augment"):
        assert key not in text, key
    from xcit.config.train_config import load_config

    assert load_config(["--opt", "sgd"], prog="xcit validate", keys=frozenset())[0].opt == "sgd"  # still accepted


def test_predict_help_and_version(capsys):
    text = _help(["predict", "--help"], capsys)
    assert "image files and folders" in text and "classes to print per image" in text
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"xcit {xcit.__version__}"


def test_benchmark_one_round_warns_and_records_the_warnings(tmp_path, capsys):
    import json

    out = tmp_path / "b.json"
    argv = ["benchmark", "--model", NAME, "--batch", "1", "--img-size", "32", "--mode", "infer", "--compare", "timm",
            "--rounds", "1", "--iters", "1", "--warmup", "1", "--threads", "1", "--no-memory", "--results-file",
            str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "warning: infer: one round gives no spread" in capsys.readouterr().out
    assert any("one round" in w for w in json.loads(out.read_text())["warnings"])


def _bench_result(ours_ms, timm_ms, fraction=0.5):
    entry = {"gflops_per_s": 100.0 * fraction, "fraction_of_peak": fraction}
    return {"precision": "fp32", "matmul_peak_gflops": {"fp32": 100.0, "bf16": 400.0},
            "train": {"ours": {**entry, "round_medians_ms": ours_ms}, "timm": {**entry, "round_medians_ms": timm_ms},
                      "ratio": {}}}  # fmt: skip


def test_benchmark_warns_when_rounds_disagree_and_says_how_many_rounds():
    from xcit.bench.checks import check, rounds_needed

    steady = _bench_result([10.0, 10.1, 9.9, 10.0], [12.0, 12.1, 11.9, 12.0])
    assert check(steady) == []
    noisy = _bench_result([10.0, 10.0, 10.0, 10.0], [79.1, 1.44, 12.0, 11.0])  # 7.91 and 0.144 as seen in one run
    (line,) = check(noisy)
    n = rounds_needed([7.91, 0.144, 1.2, 1.1])
    assert line.startswith("train: the rounds disagree: per-round ours/timm ratios 0.144 .. 7.910") and n > 100
    assert f"needs about {n} rounds" in line


def test_benchmark_warns_when_the_measured_peak_is_below_the_run():
    from xcit.bench.checks import check

    (line,) = [w for w in check(_bench_result([10.0] * 3, [11.0] * 3, fraction=1.151)) if "ours" in w]
    assert "115% of the measured fp32 GEMM peak (100 GFLOP/s)" in line and "not meaningful" in line
    # bf16 slower than fp32 (emulated, AVX2): one line that says so, not a "busier moment"
    emulated = {**_bench_result([10.0] * 3, [11.0] * 3, fraction=5.0), "precision": "bf16"}
    emulated["matmul_peak_gflops"]["bf16"] = 2.5
    (line,) = check(emulated)
    assert "bf16 is emulated on this CPU" in line and "busier" not in line


@pytest.mark.slow  # three short training runs: about 10 s
def test_mid_epoch_resume_reports_the_whole_epochs_loss_and_csv_counts_from_one(tmp_path, caplog):
    import csv
    import json
    import logging

    from xcit.config.train_config import load_config
    from xcit.data.demo import write_digits
    from xcit.train.fit import fit

    data = write_digits(tmp_path / "digits", classes=3, per_class=10)  # 24 train images: 4 steps of 6
    recipe = ["--model", NAME, "--model_overrides", "{embed_dim: 32, depth: 1, num_heads: 2}", "--image_resize", "16",
              "--num_parallel_workers", "0", "--tensorboard", "False", "--data_dir", str(data), "--batch_size", "6",
              "--epoch_size", "1", "--lr", "0.003", "--warmup_epochs", "0", "--decay_epochs", "1"]  # fmt: skip

    def train(out: str, *extra: str, on_step=None) -> list[dict]:
        cfg, explicit = load_config([*recipe, "--ckpt_save_dir", str(tmp_path / out), *extra])
        fit(cfg, explicit, on_step=on_step)
        return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    class Crash(Exception):
        pass

    def crash(state):
        if state.batches_done == 3:  # after the step checkpoint at step 2
            raise Crash

    straight = train("straight")
    with pytest.raises(Crash):
        train("resumed", "--ckpt_interval_steps", "2", on_step=crash)
    resumed = train("resumed", "--resume", "auto")
    assert resumed[0]["train_loss"] == straight[0]["train_loss"]  # all 4 steps, not the 2 after the resume
    with open(tmp_path / "resumed" / "metrics.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1"]
    with caplog.at_level(logging.INFO, logger="xcit"):
        train("resumed", "--resume", "auto")  # once more: the run has finished, and says so
    text = caplog.text
    assert "the run had finished (epoch 1 of 1): nothing left to train" in text
    assert f"model {NAME} with model_overrides {{embed_dim: 32, depth: 1, num_heads: 2}} (1 XCA blocks):" in text


def test_weights_repr_is_a_summary(weights):
    _, src = weights
    text = repr(xcit.read_weights(src))
    assert len(text) < 300 and "tensors" in text and "tensor([" not in text


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures that the code under test saves (inspected after it closes them)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    return figures


def _visible_ticks(ax, axis="y"):
    lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
    ticks = ax.get_yticks() if axis == "y" else ax.get_xticks()
    return [t for t in ticks if lo <= t <= hi]


def test_sweep_plot_over_a_short_range_has_readable_log_ticks(tmp_path, saved_figures):
    from xcit.bench.sweep import plot_sweep

    pts = [{"tokens": t, "img_size": s, "ms_per_image": m, "peak_memory_mib_per_image": p}
           for t, s, m, p in ((196, 224, 9.0, 3.1), (256, 256, 11.5, 3.9))]  # fmt: skip
    result = {"model": NAME, "reference": "deit_tiny_patch16_224", "precision": "fp32", "ours": pts,
              "reference_points": pts}  # fmt: skip
    plot_sweep(result, tmp_path / "sweep.png")
    for ax in saved_figures[0].axes:
        ax.figure.canvas.draw()
        assert len(_visible_ticks(ax)) >= 2, ax.get_ylabel()


def test_one_epoch_metrics_plot_has_no_negative_top1_ticks(tmp_path, saved_figures):
    from xcit.train.logs import MetricsLog

    m = MetricsLog(tmp_path, tensorboard=False)
    m.add({"epoch": 0, "step": 5, "train_loss": 2.0, "lr": 1e-3, "val_loss": 1.9, "top1": 0.0, "top5": 50.0})
    top1_ax = saved_figures[-1].axes[2]
    assert min(top1_ax.get_ylim()) >= 0 and all(t >= 0 for t in _visible_ticks(top1_ax))
    for ax in saved_figures[-1].axes:  # whole epochs only
        assert all(float(t).is_integer() for t in _visible_ticks(ax, "x"))


@pytest.mark.slow  # one short chaos run with one kill: about 30 s
@pytest.mark.timeout(300)
def test_chaos_resume_removes_its_temp_dir_after_success(tmp_path, monkeypatch, capsys):
    import importlib.util
    import tempfile

    spec = importlib.util.spec_from_file_location("chaos_resume", ROOT / "scripts" / "chaos_resume.py")
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp's default folder
    assert chaos.main(["--kills", "1", "--epochs", "2", "--workers", "0"]) == 0
    assert "RESULT: bit-identical" in capsys.readouterr().out
    assert not list(tmp_path.glob("xcit-chaos-*"))


@pytest.mark.slow  # one short demo epoch on the digits: about 5 s
def test_demo_epoch_size_scales_the_schedule(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("XCIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    argv = ["train", "--epoch_size", "1", "--warmup_epochs", "0", "--num_samples", "64", "--ckpt_save_dir", str(out)]
    assert main(argv) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["decay_epochs"] == 1  # not the recipe's 28


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_sigusr1_prints_every_threads_stack(tmp_path):
    """A hung rank can be asked where it waits: ``kill -USR1 PID`` makes any ``xcit`` command print its stacks."""
    code = (
        "import os, signal, time\n"
        "from xcit.cli import main\n"
        "main(['--version'])\n"
        "def waiting_here():\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    time.sleep(0.2)\n"
        "waiting_here()\n"
        "print('still running')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "still running" in r.stdout, r.stderr
    assert "waiting_here" in r.stderr and "Current thread" in r.stderr


# ----------------------------------------------------------------------------------------------------------------------
# A user's mistakes: one line and exit 2 (no traceback); messages that say what happens
# ----------------------------------------------------------------------------------------------------------------------

TRAIN = ["--model", "xcit_nano_12_p8_224", "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}",
         "--image_resize", "16", "--batch_size", "6", "--num_parallel_workers", "0", "--tensorboard", "False",
         "--device_target", "cpu", "--epoch_size", "1"]  # fmt: skip


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"xcit {command}: error: "), err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_device_the_machine_lacks_is_one_line(weights, tmp_path, capsys):
    from .test_data import make_folder

    _, src = weights
    img = str(_digit_png(tmp_path))
    assert main(["predict", img, "--pretrained", str(src), "--model", NAME, "--device", "cuda"]) == 2
    assert "no CUDA device; use --device cpu" in _one_error_line(capsys, "predict")
    assert main(["benchmark", "--model", NAME, "--img-size", "32", "--device", "cuda:1"]) == 2
    assert "no CUDA device" in _one_error_line(capsys, "benchmark")
    data = make_folder(tmp_path / "data", per_class=2, size=16)
    ckpt = ["--ckpt_path", str(src), "--model", NAME, "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}"]
    assert main(["validate", "--data_dir", str(data), *ckpt, "--device_target", "GPU"]) == 2
    assert "--device_target cuda: this machine has no CUDA device" in _one_error_line(capsys, "validate")
    out = ["--ckpt_save_dir", str(tmp_path / "out")]
    assert main(["train", "--data_dir", str(data), *TRAIN, *out, "--device_target", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err  # train logs its error line after the notices
    assert not (tmp_path / "out").exists()


def test_counts_that_cannot_run_are_one_line(weights, tmp_path, capsys):
    model, src = weights
    img = str(_digit_png(tmp_path))
    w = ["--pretrained", str(src), "--model", NAME, "--img-size", "32"]
    assert main(["predict", img, *w, "--topk", "-1"]) == 2
    assert "--topk -1: give 0 or more" in _one_error_line(capsys, "predict")
    assert main(["predict", img, *w, "--topk", "0", "--json"]) == 0  # 0 is a valid (empty) answer
    assert json.loads(capsys.readouterr().out)["predictions"][0]["topk"] == []
    bench = ["benchmark", "--model", NAME, "--img-size", "32", "--threads", "1"]
    for flag in ("--batch", "--iters", "--rounds"):
        assert main([*bench, flag, "0"]) == 2
        assert f"{flag} 0: give 1 or more" in _one_error_line(capsys, "benchmark")


def test_folders_and_other_kinds_of_file_are_named(weights, tmp_path, capsys):
    _, src = weights
    assert main(["convert", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert f"{tmp_path} is a folder, not a weights file" in _one_error_line(capsys, "convert")
    assert main(["validate", "--data_dir", str(tmp_path), "--ckpt_path", str(tmp_path)]) == 2
    assert f"ckpt_path '{tmp_path}' is a folder, not a weights file" in _one_error_line(capsys, "validate")
    assert main(["attention", str(tmp_path), "--pretrained", str(src), "--model", NAME, "--out", "a"]) == 2
    assert f"{tmp_path} is a folder: xcit attention draws one image file" in _one_error_line(capsys, "attention")
    assert main(["convert", str(src), str(tmp_path / "out.onnx")]) == 2  # a .pth under an .onnx name: refused
    assert "come from xcit export" in _one_error_line(capsys, "convert")
    assert not (tmp_path / "out.onnx").exists()
    w = ["--pretrained", str(src), "--model", NAME, "--img-size", "32"]
    assert main(["export", *w, "--format", "onnx", "--out", str(tmp_path / "m.pth")]) == 2
    assert "--format onnx writes .onnx files" in _one_error_line(capsys, "export")


def _ema_checkpoint(tmp_path, model) -> tuple[Path, torch.nn.Module]:
    """A training checkpoint as xcit train writes one: raw weights, EMA weights, architecture, classes."""
    import dataclasses

    ema = perturb_(xcit.create_model(NAME, **KW), seed=5).eval()
    path = tmp_path / "best.pth"
    classes = [str(i) for i in range(10)]
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "arch": NAME, "epoch": 3,
                "model_config": dataclasses.asdict(model.cfg), "classes": classes}, path)  # fmt: skip
    return path, ema


def test_every_command_takes_ema_weights_when_present_and_says_so(weights, tmp_path, capsys, caplog):
    from safetensors.torch import load_file

    model, _ = weights
    path, ema = _ema_checkpoint(tmp_path, model)
    with caplog.at_level(logging.INFO, logger="xcit"):
        assert main(["convert", str(path), str(tmp_path / "c.safetensors"), "--to", "timm"]) == 0
        assert main(["export", "--pretrained", str(path), "--format", "timm", "--out", str(tmp_path / "e.safetensors"),
                     "--img-size", "32"]) == 0  # fmt: skip
        assert main(["convert", str(path), str(tmp_path / "raw.pth"), "--to", "timm", "--ema", "False"]) == 0
    said = caplog.text
    assert "from " + str(path) + " (xcit, EMA weights)" in said and "EMA weights from epoch 3" in said
    assert "(xcit, model weights (its EMA weights are not used))" in said
    converted, exported = load_file(str(tmp_path / "c.safetensors")), load_file(str(tmp_path / "e.safetensors"))
    for k, v in ema.state_dict().items():  # the two ways to write timm weights give the same (EMA) tensors
        assert torch.equal(converted[k], v) and torch.equal(exported[k], v), k
    raw = torch.load(tmp_path / "raw.pth", weights_only=True)
    assert all(torch.equal(raw[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit) as e:  # argparse: usage and the error, exit 2
        main(["convert", str(path), str(tmp_path / "x.pth"), "--ema", "maybe"])
    assert e.value.code == 2 and "expected a boolean" in capsys.readouterr().err


def test_validate_without_model_does_not_claim_one_was_asked_for(weights, tmp_path, caplog):
    from .test_data import make_folder

    model, _ = weights
    path, _ = _ema_checkpoint(tmp_path, model)
    data = make_folder(tmp_path / "data", classes=[str(i) for i in range(10)], per_class=2, size=16)
    with caplog.at_level(logging.INFO, logger="xcit"):
        assert main(["validate", "--data_dir", str(data), "--ckpt_path", str(path), "--image_resize", "32"]) == 0
    assert "was asked for" not in caplog.text and "EMA weights from epoch 3" in caplog.text


def test_resume_from_bare_weights_says_it_is_not_a_training_checkpoint(weights, tmp_path, caplog):
    from .test_data import make_folder

    _, src = weights
    data = make_folder(tmp_path / "data", per_class=2, size=16)
    argv = ["train", "--data_dir", str(data), *TRAIN, "--ckpt_save_dir", str(tmp_path / "out"), "--resume", str(src)]
    with caplog.at_level(logging.ERROR, logger="xcit"):
        assert main(argv) == 2
    assert f"{src} is not a training checkpoint" in caplog.text and "--pretrained" in caplog.text
    assert "was trained as None" not in caplog.text


def test_banner_says_the_resolution_where_the_schedule_ends_and_prints_values_as_typed(tmp_path, caplog):
    from xcit.config.train_config import TrainConfig
    from xcit.train.evaluate import eval_preprocessing

    from .test_data import make_folder

    data = make_folder(tmp_path / "data", per_class=2, size=16)
    argv = ["train", "--data_dir", str(data), *TRAIN, "--ckpt_save_dir", str(tmp_path / "out"), "--epoch_size", "3",
            "--warmup_epochs", "1", "--decay_epochs", "30", "--model_overrides",
            "{embed_dim: 32, depth: 2, num_heads: 2, img_size: 32}"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="xcit"):
        assert main(argv) == 0
    lines = caplog.text.splitlines()
    banner = next(line for line in lines if "warm-up epochs" in line)
    last = next(line for line in lines if "epoch 3/3: train loss" in line)
    end = float(last.split(", lr ")[1].split(",")[0])
    assert "the run ends after 3 epochs, before warm-up + decay_epochs (1 + 30), at lr" in banner
    assert 1e-4 < end < 1e-3  # the decay has begun and is far from min_lr
    assert float(banner.rsplit("at lr ", 1)[1]) == pytest.approx(end, rel=1e-2)  # what the last step took
    assert any("images at 16px" in line for line in lines)
    assert any("model_overrides img_size 32 is the model's nominal size only" in line for line in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xcit"):
        eval_preprocessing(TrainConfig(), TrainConfig().to_dict(), set())
    assert "57.12, 57.375]" in caplog.text and "57.120000000000005" not in caplog.text


def test_fine_tuning_starts_from_the_ema_weights_and_says_so(weights, tmp_path, caplog):
    from .test_data import make_folder

    model, _ = weights
    path, ema = _ema_checkpoint(tmp_path, model)
    data = make_folder(tmp_path / "data", per_class=2, size=16)
    arch = ["--model", NAME, "--model_overrides", "{embed_dim: 32, depth: 2, num_heads: 2}", "--image_resize", "32"]
    out = ["--ckpt_save_dir", str(tmp_path / "out"), "--val_while_train", "False"]
    argv = ["train", "--data_dir", str(data), *TRAIN, *arch, *out, "--pretrained", str(path), "--lr", "1e-12",
            "--warmup_epochs", "0"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="xcit"):
        assert main(argv) == 0
    assert f"{path}: EMA weights from epoch 3" in caplog.text
    tuned = torch.load(tmp_path / "out" / "ckpt_e0001.pth", weights_only=True)["model"]["blocks.0.attn.qkv.weight"]
    key = "blocks.0.attn.qkv.weight"  # lr 1e-12: still the starting weights
    assert (tuned - ema.state_dict()[key]).abs().max() < 1e-6 < (tuned - model.state_dict()[key]).abs().max()
