"""What a training run leaves behind: a plain log file, per-epoch metrics (CSV and JSONL), a PNG plot of loss,
learning rate and top-1, and TensorBoard events when ``tensorboard`` is installed. Only rank 0 writes."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from ..runtime.fileio import atomic_write

log = logging.getLogger("xcit")
step_log = logging.getLogger("xcit.steps")  # per-step lines: the log file only (the console has the tqdm bar)

COLUMNS = (
    "epoch", "step", "train_loss", "lr", "val_loss", "top1", "top5", "epoch_time", "img_per_sec", "bad_images",
    "val_skipped",
)  # fmt: skip


def setup_logging(log_file: Path | None, rank: int = 0) -> None:
    """Rank 0 logs INFO to the console and everything to ``log_file``; other ranks only warnings, prefixed."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    step_log.propagate = False
    step_log.setLevel(logging.INFO)
    if rank != 0:
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        return
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        handler.set_name("xcit-run-log")
        for lg in (log, step_log):
            for old in [h for h in lg.handlers if h.get_name() == "xcit-run-log"]:  # a second fit() in-process
                lg.removeHandler(old)
                old.close()
            lg.addHandler(handler)


def _csv_row(row: dict) -> dict:
    """The CSV counts epochs from 1, as the log and the plot do (the JSONL keeps the 0-based loop index)."""
    return {**row, "epoch": row["epoch"] + 1}


class MetricsLog:
    """Per-epoch rows in ``metrics.csv`` and ``metrics.jsonl``, ``metrics.png``, and TensorBoard scalars.

    On resume, rows of epochs that will be trained again (``epoch >= start_epoch``) are dropped first.
    """

    def __init__(self, out_dir: Path, start_epoch: int = 0, tensorboard: bool = True) -> None:
        self.dir = out_dir
        self.jsonl, self.csv, self.png = out_dir / "metrics.jsonl", out_dir / "metrics.csv", out_dir / "metrics.png"
        self.rows = [r for r in self._read() if r["epoch"] < start_epoch]
        self._rewrite()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional: say so once, at start-up
                log.info("tensorboard: not installed, no event files (pip install -e '.[tensorboard]'; "
                         "tensorboard: False silences this)")  # fmt: skip

    def _read(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        lines = self.jsonl.read_text(errors="replace").splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                rows.append(row)
                continue
            what = "a torn last line (a crash mid-append)" if i == len(lines) else "not a metrics row"
            log.warning("%s: line %d is %s; dropped, the file is rewritten without it", self.jsonl, i, what)
        return rows

    def _rewrite(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(map(_csv_row, self.rows))

    def add(self, row: dict) -> None:
        """Append one epoch's metrics (keys of :data:`COLUMNS`; missing ones stay empty) and redraw the plot."""
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore").writerow(_csv_row(row))
        if self.tb is not None:
            for k in ("train_loss", "lr", "val_loss", "top1", "top5", "img_per_sec"):
                if row.get(k) is not None:
                    self.tb.add_scalar(k, row[k], row["epoch"] + 1)
            self.tb.flush()
        self.plot()

    def plot(self) -> None:
        """Loss (train and val), learning rate and top-1 against epoch, as one PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        ep = [r["epoch"] + 1 for r in self.rows]
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
        ax[0].plot(ep, [r.get("train_loss") for r in self.rows], "o-", label="train")
        val = [(e, r["val_loss"]) for e, r in zip(ep, self.rows) if r.get("val_loss") is not None]
        if val:
            ax[0].plot(*zip(*val), "s-", label="val")
        ax[0].set(title="loss", xlabel="epoch")
        ax[0].legend()
        ax[1].plot(ep, [r.get("lr") for r in self.rows], "o-")
        ax[1].set(title="learning rate (end of epoch)", xlabel="epoch")
        acc = [(e, r["top1"]) for e, r in zip(ep, self.rows) if r.get("top1") is not None]
        if acc:
            ax[2].plot(*zip(*acc), "o-")
        ax[2].set(title="val top-1 (%)", xlabel="epoch")
        if acc:  # top-1 stays inside [0, 100], even for one point (matplotlib would centre it on +-0.06)
            lo, hi = min(t for _, t in acc), max(t for _, t in acc)
            pad = max(2.0, 0.05 * (hi - lo))
            ax[2].set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        for a in ax:
            a.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs
            if max(ep) - min(ep) < 4:  # half an epoch of margin around a short run
                a.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
            a.grid(alpha=0.3)
        fig.tight_layout()
        try:
            atomic_write(self.png, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
        finally:
            plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _schedule_end(cfg, lr: float, end_lr: float | None) -> str:
    """Where the schedule really ends when ``epoch_size`` cuts it short (MindCV counts decay_epochs after warm-up:
    a run shorter than warm-up + decay_epochs stops before the decay reaches min_lr)."""
    if end_lr is None:
        return ""
    if cfg.epoch_size <= cfg.warmup_epochs:
        return f"; the run ends inside the warm-up, at lr {end_lr:.3g}"
    cut = cfg.scheduler == "cosine_decay" and cfg.epoch_size < cfg.warmup_epochs + cfg.decay_epochs
    if cut and abs(end_lr - cfg.min_lr) > 1e-3 * lr:
        return (f"; the run ends after {cfg.epoch_size} epochs, before warm-up + decay_epochs "
                f"({cfg.warmup_epochs} + {cfg.decay_epochs}), at lr {end_lr:.3g}")  # fmt: skip
    return f"; last step at lr {end_lr:.3g}"


def run_banner(cfg, world, model, n_train, n_val, classes, steps_per_epoch, lr, amp_dtype, end_lr=None) -> None:
    """The start-up lines of a training run: model, device, data (and the resolution it trains at), global batch, lr
    rule and the lr the last step will take (``end_lr``), precision, output."""
    from ..config.options import show
    from .ema import describe_ema

    params = sum(p.numel() for p in model.parameters())
    accum = cfg.gradient_accumulation_steps
    global_batch = cfg.batch_size * world.size * accum
    backend = f" ({'nccl' if world.device.type == 'cuda' else 'gloo'})" if world.distributed else ""
    rule = (
        f"lr_scale linear: {cfg.lr:g} x {global_batch}/512 (official rule)"
        if cfg.lr_scale == "linear"
        else "lr_scale none: lr used as given (MindCV rule; the official rule is 5e-4 x global_batch/512)"
    )
    over = f" with model_overrides {show(cfg.model_overrides)} ({model.cfg.depth} XCA blocks)"
    over = over if cfg.model_overrides else ""
    log.info("model %s%s: %.2fM params, %s numerics, %d outputs for %d classes", cfg.model, over, params / 1e6,
             model.flavour, model.num_classes, len(classes))  # fmt: skip
    log.info("device %s x %d process(es)%s", world.device.type, world.size, backend)
    log.info("data %s: %d train / %d val images at %dpx, %d steps per epoch", cfg.data_dir, n_train, n_val,
             cfg.image_resize, steps_per_epoch)  # fmt: skip
    log.info("global batch %d = batch_size %d x %d process(es) x %d accumulation step(s)", global_batch,
             cfg.batch_size, world.size, accum)  # fmt: skip
    log.info("lr %.3g (%s), %s to %.3g after %d warm-up epochs%s", lr, rule, cfg.scheduler, cfg.min_lr,
             cfg.warmup_epochs, _schedule_end(cfg, lr, end_lr))  # fmt: skip
    log.info("precision %s, compile %s, ema %s, output %s", amp_dtype or "fp32",
             "on" if cfg.compiles_on(world.device.type) else "off",
             describe_ema(cfg.ema_decay, cfg.ema_warmup) if cfg.ema else "off", cfg.ckpt_save_dir)  # fmt: skip
