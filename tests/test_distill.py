"""Knowledge distillation: the loss against DeiT's formulas, the frozen teacher, and a training run with one."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import xcit
from xcit.config.train_config import ConfigError, load_config
from xcit.data.demo import write_digits
from xcit.runtime.checkpoint import load_checkpoint
from xcit.train.distill import build_teacher
from xcit.train.fit import fit
from xcit.train.losses import Criterion, DistillationLoss
from xcit.weights.files import WeightsError

from .test_train import FAST, TINY


class LinearTeacher(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_loss_mixes_the_label_loss_and_the_teacher_loss(kind):
    torch.manual_seed(0)
    x, y, logits = torch.randn(6, 3, 4, 4), torch.randint(0, 5, (6,)), torch.randn(6, 5)
    teacher = LinearTeacher(5).eval()
    loss = DistillationLoss(Criterion("CE", 0.1), teacher, kind, alpha=0.3, tau=2.0)(logits, y, x)
    t = teacher(x).detach()
    if kind == "hard":
        kd = F.cross_entropy(logits, t.argmax(1))
    else:  # sum over the batch of KL(p_teacher || p_student) at temperature 2, times tau^2, over batch x classes
        p_t, log_p_s = (t / 2).softmax(1), (logits / 2).log_softmax(1)
        kd = (p_t * (p_t.log() - log_p_s)).sum() * 4 / logits.numel()
    expected = 0.7 * F.cross_entropy(logits, y, label_smoothing=0.1) + 0.3 * kd
    torch.testing.assert_close(loss, expected)


def test_teachers_are_frozen_xcit_or_timm_models_with_their_weights(tmp_path):
    timm = pytest.importorskip("timm")
    ref = timm.create_model("test_resnet", num_classes=4)
    torch.save({"model": ref.state_dict()}, tmp_path / "resnet.pth")
    teacher = build_teacher("test_resnet", str(tmp_path / "resnet.pth"), 4, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), ref.eval()(x))

    own = xcit.create_model("xcit_nano_12_p16_224", num_classes=4, depth=3)  # an architecture the shapes pin down
    torch.save(own.state_dict(), tmp_path / "nano.pth")
    teacher = build_teacher("xcit_nano_12_p16_224", str(tmp_path / "nano.pth"), 4, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher(x), own.eval()(x))
    with pytest.raises(ValueError, match="4 classes, the student 5"):
        build_teacher("xcit_nano_12_p16_224", str(tmp_path / "nano.pth"), 5, torch.device("cpu"))
    with pytest.raises(WeightsError, match="shape mismatch"):  # a teacher for other classes is refused, not cut
        build_teacher("test_resnet", str(tmp_path / "resnet.pth"), 5, torch.device("cpu"))


def test_training_with_a_teacher(tmp_path):
    pytest.importorskip("timm")
    import timm

    data = write_digits(tmp_path / "digits", classes=3, per_class=8)
    teacher = timm.create_model("test_resnet", num_classes=3)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    recipe = [*TINY, *FAST, "--data_dir", str(data), "--batch_size", "6", "--seed", "1", "--epoch_size", "1"]
    recipe += ["--opt", "adamw", "--lr", "0.003", "--warmup_epochs", "0", "--mixup", "0.8", "--label_smoothing", "0.1"]
    runs = {}
    for name, extra in {
        "plain": [],
        "hard": ["--distillation_type", "hard", "--teacher_model", "test_resnet"],
        "soft": ["--distillation_type", "soft", "--distillation_tau", "2", "--teacher_model", "test_resnet"],
    }.items():
        teacher_args = ["--teacher_path", str(tmp_path / "teacher.pth")] if extra else []
        cfg, explicit = load_config([*recipe, *extra, *teacher_args, "--ckpt_save_dir", str(tmp_path / name)])
        fit(cfg, explicit)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (rows[-1]["train_loss"], load_checkpoint(tmp_path / name / "ckpt_e0001.pth")["model"])
    assert all(math.isfinite(loss) for loss, _ in runs.values())
    # the same seed, data and student: only the teacher term differs
    for name in ("hard", "soft"):
        assert runs[name][0] != pytest.approx(runs["plain"][0], rel=1e-6)
        assert not torch.equal(runs[name][1]["head.weight"], runs["plain"][1]["head.weight"])
    assert set(runs["hard"][1]) == set(runs["plain"][1])  # the checkpoint holds the student only


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--distillation_type", "hard"], "needs 'teacher_path'"),
        (["--distillation_type", "soft", "--teacher_path", "/no/such.pth"], "not a file"),
    ],
)
def test_training_without_the_teacher_file_fails_before_any_work(tmp_path, argv, match):
    cfg, explicit = load_config([*argv, "--data_dir", str(tmp_path / "none"), "--ckpt_save_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match=match):  # before the (missing) data is looked at
        fit(cfg, explicit)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--distillation_type", "feature"], "distillation_type"),
        (["--distillation_alpha", "1.5"], "probability"),
        (["--distillation_tau", "0"], "must be > 0"),
    ],
)
def test_bad_distillation_settings_fail_before_any_work(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv)
