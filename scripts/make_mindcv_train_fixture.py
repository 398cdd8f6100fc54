"""Record what MindCV's own training code does, for the training-parity tests (tests/test_mindcv_train.py).

Runs in a separate environment with MindSpore and MindCV (never the project's own)::

    python3 -m venv /work/venvs/mindcv && /work/venvs/mindcv/bin/pip install mindspore mindcv "numpy<2"
    /work/venvs/mindcv/bin/python scripts/make_mindcv_train_fixture.py                    # all fixtures below
    /work/venvs/mindcv/bin/python scripts/make_mindcv_train_fixture.py --what schedules --out-dir /tmp/x

``--what`` picks one part (default ``all``); each writes into ``--out-dir`` (default ``tests/fixtures/mindcv``):

* ``schedules`` -> ``schedules.json``: every step's lr of ``mindcv.scheduler.create_scheduler`` for a set of cases
  (each scheduler, warm-up and ``lr_epoch_stair`` on and off), and the error message of each refused case.
* ``config`` -> ``mindcv_saved_config.yaml``: the file MindCV's ``train.py`` writes beside its checkpoints
  (``config.save_args`` after ``config.parse_args(["-c", <seed recipe>])``). MindCV's ``config.py`` lives in its
  repository, not in the wheel: pass ``--mindcv-config path/to/mindcv/config.py``.
* ``train`` -> ``train_parity.npz``: 20 steps of MindCV training (see :func:`make_train`).
* ``optim`` -> ``optimizers.npz``: a few steps of every optimiser ``create_optimizer`` builds, on two small
  parameters with fixed gradients (see :func:`make_optimizers`).

MindSpore runs in PYNATIVE mode on the CPU, in float32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mindcv"

# create_scheduler keyword arguments; every case also gets lr 0.5, min_lr 1e-3 unless it sets them
SCHEDULE_CASES = [
    dict(scheduler="cosine_decay", steps_per_epoch=3, warmup_epochs=2, warmup_factor=0.1, decay_epochs=3, num_epochs=6),
    dict(scheduler="cosine_decay", steps_per_epoch=3, warmup_epochs=2, warmup_factor=0.1, decay_epochs=3, num_epochs=6,
         lr_epoch_stair=True),
    dict(scheduler="cosine_decay", steps_per_epoch=4, warmup_epochs=1, decay_epochs=2, num_epochs=7, num_cycles=2,
         cycle_decay=0.5),
    dict(scheduler="cosine_decay", steps_per_epoch=3, warmup_epochs=1, decay_epochs=8, num_epochs=5),
    dict(scheduler="multi_step_decay", steps_per_epoch=6, warmup_epochs=1, milestones=[1, 2], decay_rate=0.1,
         num_epochs=4),
    dict(scheduler="multi_step_decay", steps_per_epoch=6, warmup_epochs=1, milestones=[1, 2], decay_rate=0.1,
         num_epochs=4, lr_epoch_stair=True, warmup_factor=0.01),
    dict(scheduler="step_decay", steps_per_epoch=3, warmup_epochs=1, decay_epochs=2, decay_rate=0.5, num_epochs=6),
    dict(scheduler="exponential_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=0.7, num_epochs=5),
    dict(scheduler="exponential_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=0.7, num_epochs=5,
         lr_epoch_stair=True),
    dict(scheduler="polynomial_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=2.0, num_epochs=5),
    dict(scheduler="polynomial_decay", steps_per_epoch=3, warmup_epochs=1, decay_rate=2.0, num_epochs=5,
         lr_epoch_stair=True),
    dict(scheduler="constant", steps_per_epoch=3, warmup_epochs=2, warmup_factor=0.2, num_epochs=4),
    dict(scheduler="one_cycle", steps_per_epoch=4, warmup_epochs=0, num_epochs=5),
    dict(scheduler="cyclic", steps_per_epoch=4, warmup_epochs=0, num_epochs=5, num_cycles=2),
    dict(scheduler="cyclic", steps_per_epoch=5, warmup_epochs=0, num_epochs=3, num_cycles=1, min_lr=0.0),
    dict(scheduler="one_cycle", steps_per_epoch=4, warmup_epochs=1, num_epochs=5),
    dict(scheduler="cyclic", steps_per_epoch=4, warmup_epochs=0, num_epochs=5, lr_epoch_stair=True),
]  # fmt: skip


def make_schedules(out_dir: Path) -> None:
    """``schedules.json``: ``[{"kwargs": ..., "lrs": [...]} or {"kwargs": ..., "error": "..."}]``."""
    from mindcv.scheduler import create_scheduler

    records = []
    for case in SCHEDULE_CASES:
        kwargs = {"lr": 0.5, "min_lr": 1e-3, **case}
        try:
            records.append({"kwargs": kwargs, "lrs": [float(v) for v in create_scheduler(**kwargs)]})
        except ValueError as e:
            records.append({"kwargs": kwargs, "error": str(e)})
    (out_dir / "schedules.json").write_text(json.dumps({"mindcv": _version(), "cases": records}, indent=1) + "\n")
    print(f"schedules.json: {len(records)} cases")


def make_saved_config(out_dir: Path, mindcv_config: Path) -> None:
    """``mindcv_saved_config.yaml``: MindCV's ``save_args`` output for the seed recipe (as its train.py writes it)."""
    spec = importlib.util.spec_from_file_location("mindcv_repo_config", mindcv_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    recipe = ROOT / "configs" / "xcit" / "xcit_tiny_12_p16_ascend.yaml"
    args = module.parse_args(["-c", str(recipe.relative_to(ROOT))])
    path = out_dir / "mindcv_saved_config.yaml"
    module.save_args(args, str(path))
    print(f"{path.name}: {len(vars(args))} keys")


# The training run of ``train_parity.npz``: a small MindCV XCiT (its own initialisation, seed 0) trained as MindCV's
# train.py trains it from these keys, on 16 fixed images (4 batches of 4, the same order every epoch, no
# augmentation): AdamW, 1 warm-up epoch then cosine decay, label smoothing 0.1, EMA, fixed loss scale 1024.
TRAIN_ARCH = dict(
    img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4, qkv_bias=True,
    eta=1.0, tokens_norm=True,
)  # fmt: skip
TRAIN_KEYS = dict(
    opt="adamw", lr=0.002, weight_decay=0.05, weight_decay_filter="norm_and_bias", momentum=0.9, use_nesterov=False,
    eps=1e-10, scheduler="warmup_cosine_decay", warmup_epochs=1, warmup_factor=0.0, min_lr=1e-5, decay_epochs=4,
    epoch_size=5, label_smoothing=0.1, loss="CE", ema=True, ema_decay=0.99996, loss_scale=1024.0, batch_size=4,
)  # fmt: skip
TRAIN_IMAGES = 16

# create_optimizer cases of optimizers.npz (train.py's arguments; the lr list is a dynamic lr, one value per step)
OPTIM_STEPS = 5
OPTIM_LRS = [0.1, 0.05, 0.03, 0.02, 0.01]
OPTIM_CASES = [
    dict(opt="adamw"), dict(opt="adam"), dict(opt="sgd"), dict(opt="momentum"), dict(opt="momentum", nesterov=True),
    dict(opt="sgd", nesterov=True), dict(opt="nadam"), dict(opt="lamb"), dict(opt="rmsprop"), dict(opt="adagrad"),
    dict(opt="lion"), dict(opt="adan"),
]  # fmt: skip


def _setup_mindspore() -> None:
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    ms.set_seed(0)


def _params(cell) -> dict:
    """Every parameter of ``cell`` (BatchNorm moving statistics included) as float32 arrays, by MindSpore name."""
    return {p.name: p.asnumpy().astype("float32") for p in cell.get_parameters()}


def make_train(out_dir: Path) -> None:
    """``train_parity.npz``: ``images`` (16, 3, 32, 32), ``labels``, ``loss`` (MindCV's loss at each of the 20
    steps), ``init/<name>``, ``final/<name>`` and ``ema/<name>`` (MindCV parameter names), ``keys`` and ``arch``
    (JSON). Built with MindCV's create_model-free ``XCiT`` class, ``create_loss``, ``create_scheduler``,
    ``create_optimizer`` and ``create_trainer`` (its ``TrainStep`` with EMA), called as MindCV's train.py calls them."""
    import numpy as np
    from mindcv.loss import create_loss
    from mindcv.models import xcit as mcv_xcit
    from mindcv.optim import create_optimizer
    from mindcv.scheduler import create_scheduler
    from mindcv.utils import create_trainer
    from mindspore import Tensor

    _setup_mindspore()
    k = TRAIN_KEYS
    net = mcv_xcit.XCiT(**TRAIN_ARCH)
    init = _params(net)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((TRAIN_IMAGES, 3, TRAIN_ARCH["img_size"], TRAIN_ARCH["img_size"])).astype("float32")
    labels = rng.integers(0, TRAIN_ARCH["num_classes"], TRAIN_IMAGES).astype("int32")
    steps_per_epoch = TRAIN_IMAGES // k["batch_size"]
    loss_fn = create_loss(name=k["loss"], reduction="mean", label_smoothing=k["label_smoothing"], aux_factor=0.0)
    lrs = create_scheduler(
        steps_per_epoch, scheduler=k["scheduler"], lr=k["lr"], min_lr=k["min_lr"], warmup_epochs=k["warmup_epochs"],
        warmup_factor=k["warmup_factor"], decay_epochs=k["decay_epochs"], num_epochs=k["epoch_size"],
    )  # fmt: skip
    opt = create_optimizer(
        net, opt=k["opt"], lr=lrs, weight_decay=k["weight_decay"], momentum=k["momentum"],
        nesterov=k["use_nesterov"], weight_decay_filter=k["weight_decay_filter"], loss_scale=1.0, eps=k["eps"],
    )  # fmt: skip
    trainer = create_trainer(
        net, loss_fn, opt, metrics={"acc"}, amp_level="O0", amp_cast_list=None, loss_scale_type="fixed",
        loss_scale=k["loss_scale"], ema=k["ema"], ema_decay=k["ema_decay"],
    )  # fmt: skip
    step = trainer._train_network  # mindcv.utils.TrainStep, what Model.train runs each step
    step.set_train(True)
    losses = []
    for _ in range(k["epoch_size"]):
        for b in range(steps_per_epoch):
            sl = slice(b * k["batch_size"], (b + 1) * k["batch_size"])
            losses.append(float(step(Tensor(images[sl]), Tensor(labels[sl])).asnumpy()))
    final = _params(net)
    ema = {n[len("ema.") :]: v for n, v in _params(step).items() if n.startswith("ema.")}
    assert set(ema) == set(final), sorted(set(ema) ^ set(final))
    arrays = {f"init/{n}": v for n, v in init.items()}
    arrays.update({f"final/{n}": v for n, v in final.items()})
    arrays.update({f"ema/{n}": v for n, v in ema.items()})
    meta = {"keys": k, "arch": TRAIN_ARCH, "lrs": [float(v) for v in lrs], "version": _version()}
    np.savez_compressed(
        out_dir / "train_parity.npz", images=images, labels=labels, loss=np.array(losses, dtype="float64"),
        meta=np.array(json.dumps(meta)), **arrays,
    )  # fmt: skip
    print(f"train_parity.npz: {len(init)} tensors, loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def make_optimizers(out_dir: Path) -> None:
    """``optimizers.npz``: for each case of :data:`OPTIM_CASES`, ``<case>/<param>/<step>`` the parameter after each
    step; ``init/<param>`` and ``grad/<param>/<step>`` the shared start and gradients; ``meta`` (JSON)."""
    import numpy as np
    from mindcv.optim import create_optimizer
    from mindspore import Parameter, Tensor, nn

    _setup_mindspore()
    rng = np.random.default_rng(1)
    init = {"weight": rng.standard_normal((4, 3)).astype("float32"), "bias": 0.1 * rng.standard_normal(3)}
    init["bias"] = init["bias"].astype("float32")
    grads = {n: [(rng.standard_normal(v.shape) * (1.0 if n == "weight" else 0.01)).astype("float32")
                 for _ in range(OPTIM_STEPS)] for n, v in init.items()}  # fmt: skip
    arrays = {f"init/{n}": v for n, v in init.items()}
    arrays.update({f"grad/{n}/{t}": g for n, gs in grads.items() for t, g in enumerate(gs)})
    names, errors = [], {}
    for case in OPTIM_CASES:
        name = case["opt"] + ("_nesterov" if case.get("nesterov") else "")
        names.append(name)

        class Tiny(nn.Cell):
            def __init__(self) -> None:
                super().__init__()
                self.weight = Parameter(Tensor(init["weight"]), name="weight")
                self.bias = Parameter(Tensor(init["bias"]), name="bias")

        net = Tiny()
        opt = create_optimizer(
            net.trainable_params(), opt=case["opt"], lr=list(OPTIM_LRS), weight_decay=0.1, momentum=0.9,
            nesterov=case.get("nesterov", False), weight_decay_filter="norm_and_bias", eps=1e-10,
        )  # fmt: skip
        order = [p.name for p in net.trainable_params()]
        try:
            for t in range(OPTIM_STEPS):
                opt(tuple(Tensor(grads[n][t]) for n in order))
                for p in net.trainable_params():
                    arrays[f"{name}/{p.name}/{t}"] = p.asnumpy().astype("float32")
        except RuntimeError as e:  # nn.Lamb's kernel exists on Ascend and GPU only
            errors[name] = next(line for line in str(e).splitlines() if line.strip("- "))
            print(f"{name}: {errors[name]}")
    meta = {"cases": names, "errors": errors, "lrs": OPTIM_LRS, "steps": OPTIM_STEPS, "weight_decay": 0.1,
            "momentum": 0.9, "eps": 1e-10, "weight_decay_filter": "norm_and_bias", "version": _version()}  # fmt: skip
    np.savez_compressed(out_dir / "optimizers.npz", meta=np.array(json.dumps(meta)), **arrays)
    print(f"optimizers.npz: {len(names)} cases")


def _version() -> str:
    import mindcv
    import mindspore

    return f"mindcv {getattr(mindcv, '__version__', '?')}, mindspore {mindspore.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=FIXTURES)
    ap.add_argument("--what", choices=("all", "schedules", "config", "train", "optim"), default="all")
    ap.add_argument("--mindcv-config", type=Path, help="MindCV's repository config.py (for --what config)")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.what in ("all", "schedules"):
        make_schedules(args.out_dir)
    if args.what in ("all", "config"):
        if args.mindcv_config is None:
            ap.error("--what config needs --mindcv-config (config.py of a MindCV checkout)")
        make_saved_config(args.out_dir, args.mindcv_config)
    if args.what in ("all", "train"):
        make_train(args.out_dir)
    if args.what in ("all", "optim"):
        make_optimizers(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
