"""Build MindCV XCiT reference fixtures, and check that MindSpore/MindCV accept exported checkpoints.

Runs in a separate environment with MindSpore and MindCV (never the project's own)::

    python3 -m venv /work/mindcv-venv && /work/mindcv-venv/bin/pip install "numpy<2" mindspore mindcv
    /work/mindcv-venv/bin/python scripts/make_mindcv_fixture.py                   # tests/fixtures/mindcv/*
    /work/mindcv-venv/bin/python scripts/make_mindcv_fixture.py --full --out-dir /tmp/mindcv_full
    /work/mindcv-venv/bin/python scripts/make_mindcv_fixture.py --verify-export exported.ckpt

Fixtures (MindSpore PYNATIVE mode on CPU, every parameter perturbed with a seeded NumPy generator, eval mode):

* ``xcit_small_fixture.ckpt`` / ``.npz``: MindCV ``XCiT`` with D=32, depth 2, 2 heads, p16, 10 classes,
  ``eta=1.0, tokens_norm=True``, written by ``mindspore.save_checkpoint(net)``; the npz holds ``input``
  (2x3x48x64, a non-square grid of 3x4 tokens), ``logits`` and ``config`` (JSON of the constructor arguments).
* ``xcit_small_fixture_ema.ckpt`` / ``.npz``: a MindCV *training* checkpoint (``save_checkpoint`` of the
  ``TrainStep`` that ``mindcv.create_trainer`` builds with ``ema=True`` and AdamW) of a D=16, depth 1, p8,
  ``tokens_norm=False`` model: model weights, ``ema.*`` copies (perturbed independently), ``adam_m.*``/``adam_v.*``
  and the optimiser / loss-scale scalars. The npz holds ``input``, ``logits`` (trained weights), ``logits_ema``
  (the EMA weights loaded with MindCV's own ``load_model_checkpoint(..., ema=True)``) and ``config``.

``--full`` builds the registered ``xcit_tiny_12_p16_224`` (not committed; for checking the key map on the real
architecture). ``--verify-export PATH`` loads a checkpoint written by
``xcit.weights.mindspore_ckpt.write_mindspore_ckpt``
with ``mindspore.load_checkpoint`` + ``load_param_into_net(strict_load=True)`` and with MindCV's
``load_model_checkpoint`` into the fixture's architecture, and compares the logits with the fixture's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

import mindspore as ms  # noqa: E402
from mindcv.models import xcit as mcv_xcit  # noqa: E402
from mindcv.models.helpers import load_model_checkpoint  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mindcv"

# Constructor arguments of mindcv.models.xcit.XCiT for the committed fixtures. eta must be given: MindCV's default
# None fails in XCABlock (eta * ones).
SMALL = dict(
    img_size=48, patch_size=16, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, qkv_bias=True,
    eta=1.0, tokens_norm=True,
)  # fmt: skip
SMALL_EMA = dict(
    img_size=32, patch_size=8, num_classes=10, embed_dim=16, depth=1, num_heads=2, mlp_ratio=4, qkv_bias=True,
    eta=1.0, tokens_norm=False,
)  # fmt: skip
# mindcv/models/xcit.py: xcit_tiny_12_p16_224 (tokens_norm=True, eta=1.0, LayerNorm eps 1e-6).
TINY = dict(
    img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12, num_heads=4, mlp_ratio=4, qkv_bias=True,
    eta=1.0, tokens_norm=True,
)  # fmt: skip


def setup_mindspore() -> None:
    """PYNATIVE mode on the CPU, deterministic."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)


def build(config: dict) -> nn.Cell:
    """MindCV's XCiT with ``config``, in eval mode."""
    net = mcv_xcit.XCiT(**config)
    net.set_train(False)
    return net


def perturbed(name: str, shape: tuple[int, ...], rng: np.random.Generator, temperature: float = 1.0) -> np.ndarray:
    """A random value for parameter ``name`` with a scale that keeps activations O(1).

    Every parameter gets fresh normal noise (LayerScale gammas and XCA temperatures included); BatchNorm moving
    statistics get non-trivial means and variances. ``temperature`` scales the XCA temperatures: without q/k
    normalisation the attention logits grow with the token count, and a saturated random network amplifies float
    rounding (at 224 px, float32 and float64 logits would differ by ~1).
    """
    leaf = name.rsplit(".", 1)[-1]
    n = rng.standard_normal(shape)
    if leaf == "moving_variance":
        return rng.uniform(0.5, 2.0, shape)
    if leaf == "moving_mean":
        return 0.2 * n
    if leaf == "gamma":  # LayerNorm / BatchNorm scale
        return 1.0 + 0.2 * n
    if leaf in ("beta", "bias"):
        return 0.1 * n
    if leaf in ("gamma1", "gamma2", "gamma3"):  # LayerScale
        return 1.0 + 0.25 * n
    if leaf == "temperature":
        return temperature * (1.0 + 0.25 * n)
    if leaf == "cls_token":
        return n
    if name == "head.weight":  # large logits make the tanh-vs-erf GELU gap (~3e-4 per activation) show clearly
        return 10.0 * n / np.sqrt(shape[1])
    if leaf == "weight" and len(shape) >= 2:
        return n / np.sqrt(np.prod(shape[1:]))
    raise KeyError(f"no perturbation rule for parameter {name!r}")


def perturb(net: nn.Cell, seed: int, prefix: str = "", temperature: float = 1.0) -> None:
    """Overwrite every parameter of ``net`` (whose name starts with ``prefix``) with seeded random values."""
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        if not p.name.startswith(prefix):
            continue
        value = perturbed(p.name[len(prefix) :], tuple(p.shape), rng, temperature)
        p.set_data(Tensor(value.astype(np.float32)))


def logits(net: nn.Cell, x: np.ndarray) -> np.ndarray:
    """Eval-mode forward of ``net`` on ``x``."""
    net.set_train(False)
    return net(Tensor(x)).asnumpy()


def save_ckpt(cell: nn.Cell, path: Path) -> None:
    """``mindspore.save_checkpoint`` (MindCV's own writer), then the usual permissions instead of its read-only 0400."""
    ms.save_checkpoint(cell, str(path))
    os.chmod(path, 0o644)


def save_npz(path: Path, config: dict, **arrays: np.ndarray) -> None:
    """Write the fixture's arrays and its config (as a JSON string)."""
    meta = dict(config, mindspore=ms.__version__, mindcv=_mindcv_version())
    np.savez(path, config=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def _mindcv_version() -> str:
    import mindcv

    return getattr(mindcv, "__version__", "unknown")


def make_model_fixture(
    out_dir: Path, stem: str, config: dict, input_shape: tuple[int, ...], seed: int, temperature: float = 1.0
) -> None:
    """A plain ``save_checkpoint(net)`` file plus its input and logits."""
    net = build(config)
    perturb(net, seed, temperature=temperature)
    x = np.random.default_rng(seed + 1).standard_normal(input_shape).astype(np.float32)
    y = logits(net, x)
    save_ckpt(net, out_dir / f"{stem}.ckpt")
    save_npz(out_dir / f"{stem}.npz", config, input=x, logits=y)
    print(f"{stem}: logits {y.shape}, |logits| max {np.abs(y).max():.3f}")


def make_training_fixture(out_dir: Path, stem: str, config: dict, input_shape: tuple[int, ...], seed: int) -> None:
    """A MindCV training checkpoint (TrainStep with EMA, AdamW, fixed loss scale) plus both sets of logits."""
    from mindcv.loss import create_loss
    from mindcv.optim import create_optimizer
    from mindcv.utils import create_trainer

    net = build(config)
    perturb(net, seed)
    opt = create_optimizer(net.trainable_params(), opt="adamw", lr=5e-4, weight_decay=0.05)
    model = create_trainer(
        net, create_loss(name="CE", label_smoothing=0.1), opt, metrics={"acc"}, amp_level="O0",
        amp_cast_list=None, loss_scale_type="fixed", loss_scale=1024.0, ema=True, ema_decay=0.99996,
    )  # fmt: skip
    train_net = model._train_network  # what mindcv/utils/callbacks.py saves (cb_params.train_network)
    perturb(train_net, seed + 100, prefix="ema.")
    x = np.random.default_rng(seed + 1).standard_normal(input_shape).astype(np.float32)
    y = logits(net, x)
    path = out_dir / f"{stem}.ckpt"
    save_ckpt(train_net, path)

    ema_net = build(config)
    load_model_checkpoint(ema_net, str(path), ema=True)  # mindcv/models/helpers.py
    y_ema = logits(ema_net, x)
    assert np.abs(y - y_ema).max() > 1e-2, "EMA logits should differ from the trained weights' logits"
    save_npz(out_dir / f"{stem}.npz", config, input=x, logits=y, logits_ema=y_ema)
    names = list(ms.load_checkpoint(str(path)))
    print(f"{stem}: {len(names)} entries, e.g. {[n for n in names if '.' not in n or n.startswith('adam')][:8]}")


def verify_export(ckpt: Path, fixture: Path, tol: float) -> int:
    """Load ``ckpt`` into MindCV's XCiT with the config of ``fixture`` and compare logits; return an exit code."""
    data = np.load(fixture)
    config = json.loads(str(data["config"]))
    config = {k: config[k] for k in SMALL}
    ok = True

    net = build(config)
    perturb(net, 12345)  # make sure every value below comes from the file
    params = ms.load_checkpoint(str(ckpt))
    not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
    diff = float(np.abs(logits(net, data["input"]) - data["logits"]).max())
    print(f"mindspore.load_checkpoint + load_param_into_net: {len(params)} tensors, params not loaded: "
          f"{not_loaded}, unused ckpt entries: {unused}, max |logits - fixture| = {diff:.3g}")  # fmt: skip
    ok &= not not_loaded and not unused and diff <= tol

    net = build(config)
    perturb(net, 12345)
    load_model_checkpoint(net, str(ckpt))  # mindcv/models/helpers.py (what create_model(checkpoint_path=) uses)
    diff = float(np.abs(logits(net, data["input"]) - data["logits"]).max())
    print(f"mindcv load_model_checkpoint: max |logits - fixture| = {diff:.3g}")
    ok &= diff <= tol
    print("export verification", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=FIXTURES)
    ap.add_argument("--full", action="store_true", help="build xcit_tiny_12_p16_224 instead of the small fixtures")
    ap.add_argument("--verify-export", type=Path, metavar="PATH", help="check a ckpt exported by write_mindspore_ckpt")
    ap.add_argument("--fixture", type=Path, default=FIXTURES / "xcit_small_fixture.npz",
                    help="fixture whose config, input and logits --verify-export uses")  # fmt: skip
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args(argv)
    setup_mindspore()

    if args.verify_export:
        return verify_export(args.verify_export, args.fixture, args.tol)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.full:
        make_model_fixture(
            args.out_dir, "xcit_tiny_12_p16_224_fixture", TINY, (2, 3, 224, 224), seed=7, temperature=0.01
        )
        return 0
    make_model_fixture(args.out_dir, "xcit_small_fixture", SMALL, (2, 3, 48, 64), seed=0)
    make_training_fixture(args.out_dir, "xcit_small_fixture_ema", SMALL_EMA, (2, 3, 32, 40), seed=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
