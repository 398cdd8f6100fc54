"""``xcit submit``: ``xcit train``'s config and flags, run as one SLURM job through submitit, requeued when it is
preempted or reaches its time limit.

Every task of the job is one rank (gloo on CPU, NCCL on GPUs); the world comes from SLURM's environment as submitit's
``TorchDistributedEnvironment`` reads it. The job folder (``--job_dir``, by default the run's ``ckpt_save_dir``)
holds submitit's files and each task's log beside the run's ``train.log``, checkpoints and metrics.

Signals (:mod:`xcit.runtime.preemption`): SLURM sends SIGUSR2 to every task ``--signal`` seconds (90 unless
``--sbatch "--signal=USR2@N"`` says otherwise) before the time limit, and ``scancel --signal=USR2`` sends it to
simulate a preemption. Every rank stops at the same step, the checkpoint is written, and rank 0 requeues the job
with ``scontrol requeue`` while fewer than ``--max_requeues`` requeues have happened. ``scontrol requeue`` and
preemption send SIGTERM, which stops the run the same way (SLURM requeues it itself). A requeued job
(``SLURM_RESTART_COUNT`` > 0) resumes by itself from its newest checkpoint (:mod:`xcit.train.requeue`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config.train_config import ConfigError, TrainConfig, load_config
from ..runtime.preemption import SLURM_WARNING_SIGNAL, slurm_restart_count
from ..train.runlock import LOCK_NAME, owner_alive, slurm_job_active

log = logging.getLogger("xcit")

DEFAULT_LEAD_S = 90  # submitit's signal_delay_s: SIGUSR2 this many seconds before the time limit
MARKER = "submitted.json"  # in the job folder: the job that holds it


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xcit submit",
        description="Submit `xcit train` (the same -c config and --key value flags) as one SLURM job through "
        "submitit. Every task is one rank; a preempted or timed-out job is requeued and resumes by itself.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("the job's shape")
    g.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    g.add_argument("--tasks_per_node", type=int, default=None, help="tasks (ranks) per node (default 1)")
    g.add_argument("--ngpus", type=int, default=None, help="GPUs per node, one task each (sets --tasks_per_node)")
    g.add_argument("--cpus_per_task", type=int, default=None, help="CPUs per task (default: SLURM's)")
    g.add_argument("--mem_gb", type=float, default=None, help="memory per node in GB (default: SLURM's)")
    g = p.add_argument_group("scheduling")
    g.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's default)")
    g.add_argument("--timeout", type=int, default=60 * 24, help="time limit in minutes (default 1440)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--sbatch", default="", help='extra sbatch options, e.g. "--exclusive --signal=USR2@120"')
    g = p.add_argument_group("the job")
    g.add_argument("--job_dir", default=None, help="the job folder: submitit's files and the logs (default: "
                   "ckpt_save_dir)")  # fmt: skip
    g.add_argument("--max_requeues", type=int, default=5, help="requeues of any cause before the job stops (5)")
    g.add_argument("--dry_run", action="store_true", help="print the sbatch script and submit nothing")
    g.add_argument("--wait", action="store_true", help="wait for the job to end and exit with its status")
    return p


# ----------------------------------------------------------------------------------------------------------------------
# What runs on every task
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainTask:
    """The callable submitit runs on every task: ``xcit train`` with ``argv``, then the requeue decision."""

    argv: list[str]
    max_requeues: int

    def __call__(self) -> dict:
        import submitit

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        restarts = slurm_restart_count()
        if restarts > self.max_requeues:
            raise RuntimeError(f"requeued {restarts} times, more than --max_requeues {self.max_requeues}: stopped")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from .train import main as train_main

        code = train_main(list(self.argv))
        rank = int(os.environ["RANK"])
        if code == 0:
            return {"rank": rank, "exit": 0}
        if code == 128 + SLURM_WARNING_SIGNAL and rank == 0:
            self._requeue(restarts)
        if code in (128 + SLURM_WARNING_SIGNAL, 128 + signal.SIGTERM):
            # SystemExit, not an exception: submitit writes no result, so the job is not reported as over while
            # SLURM requeues it (submitit's own handler exits the same way)
            sys.exit(code)
        raise RuntimeError(f"xcit train exited with status {code} on rank {rank}: its error is in this task's log")

    def _requeue(self, restarts: int) -> None:
        job = os.environ["SLURM_JOB_ID"]
        if restarts >= self.max_requeues:
            raise RuntimeError(f"stopped by the warning signal after {restarts} requeues: --max_requeues "
                               f"{self.max_requeues} reached, not requeued")  # fmt: skip
        log.warning("xcit submit: requeueing SLURM job %s (requeue %d of at most %d)", job, restarts + 1,
                    self.max_requeues)  # fmt: skip
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=120)

    def checkpoint(self, *args, **kwargs):
        """submitit's SIGUSR2 handler, before ``xcit train`` has taken the signal over (start-up): nothing is
        trained yet, so the same task is requeued as it is (None, when out of requeues, ends the job)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self) if slurm_restart_count() < self.max_requeues else None


# ----------------------------------------------------------------------------------------------------------------------
# Submitting
# ----------------------------------------------------------------------------------------------------------------------


def _train_config(argv: list[str]) -> TrainConfig:
    """The run's config as ``xcit train`` resolves it (the demo recipe without a data_dir or config)."""
    from ..data.demo import DEMO_RECIPE

    cfg, _ = load_config(argv, prog="xcit submit")
    if not cfg.data_dir and not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        cfg, _ = load_config(argv, prog="xcit submit", base=DEMO_RECIPE)
    if not cfg.data_dir and cfg.dataset != "digits":
        raise ConfigError("data_dir is not set: pass --data_dir /path/to/dataset (or run without a config)")
    return cfg


def signal_lead(sbatch: list[str]) -> tuple[int, list[str]]:
    """The warning signal's lead in seconds from ``--signal=[SIG]USR2@N`` among the extra sbatch options, and the
    other options. Another signal, or one sent to the batch shell only (``B:``), is refused: only SIGUSR2 reaches
    every task and is handled."""
    lead, rest, i = DEFAULT_LEAD_S, [], 0
    while i < len(sbatch):
        opt = sbatch[i]
        if opt == "--signal" and i + 1 < len(sbatch):
            opt, i = f"--signal={sbatch[i + 1]}", i + 1
        if opt.startswith("--signal="):
            m = re.fullmatch(r"(?:SIG)?(USR2|12)@(\d+)", opt.split("=", 1)[1])
            if m is None:
                raise ConfigError(f"--sbatch {opt}: xcit submit handles --signal=USR2@SECONDS (sent to every task)")
            lead = int(m.group(2))
        else:
            rest.append(opt)
        i += 1
    return lead, rest


def sbatch_parameters(options: list[str]) -> dict[str, object]:
    """``["--exclusive", "--gres=gpu:8", "--mail-type", "END"]`` -> submitit's ``additional_parameters``."""
    params, i = {}, 0
    while i < len(options):
        opt = options[i]
        if not opt.startswith("--"):
            raise ConfigError(f"--sbatch: {opt!r} is not a long sbatch option (--name=value or --flag)")
        key, eq, value = opt[2:].partition("=")
        if not eq and i + 1 < len(options) and not options[i + 1].startswith("--"):
            value, i = options[i + 1], i + 1
        params[key.replace("-", "_")] = value if (eq or value) else True
        i += 1
    return params


def check_cluster(partition: str | None) -> None:
    """SLURM's client commands are here and the partition exists (before anything is written)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError("SLURM is not installed here (no sbatch on PATH): run xcit submit on the cluster's login "
                          "node (--dry_run prints the job script anywhere)")  # fmt: skip
    proc = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConfigError(f"SLURM does not answer (sinfo: {first})")
    partitions = sorted(set(proc.stdout.split()))
    if partition is not None and partition not in partitions:
        raise ConfigError(f"partition {partition!r} does not exist (partitions: {', '.join(partitions) or 'none'})")


def check_folders(job_dir: Path, ckpt_dir: Path) -> None:
    """Refuse folders that a job still queued or running holds: its submission marker, or a live run lock."""
    try:
        marker = json.loads((job_dir / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and slurm_job_active(str(marker.get("job_id"))):
        job = marker["job_id"]
        raise ConfigError(f"{job_dir} is held by SLURM job {job}, which is still queued or running: wait for it, "
                          f"cancel it (scancel {job}), or use another --job_dir")  # fmt: skip
    try:
        owner = json.loads((ckpt_dir / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return
    if isinstance(owner, dict) and owner and owner_alive(owner) is not False:
        who = f"SLURM job {owner['slurm_job']}" if owner.get("slurm_job") else f"pid {owner.get('pid')}"
        raise ConfigError(f"{ckpt_dir} is in use by another training run ({who} on {owner.get('host')}): use "
                          f"another ckpt_save_dir, or wait for that run to end")  # fmt: skip


def make_executor(args: argparse.Namespace, job_dir: Path, lead: int, extra: dict, name: str):
    import submitit

    tasks = args.tasks_per_node or args.ngpus or 1
    ex = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=args.max_requeues)
    params = dict(job_name=name, nodes=args.nodes, ntasks_per_node=tasks, time=args.timeout, signal_delay_s=lead)
    optional = dict(cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account, qos=args.qos,
                    constraint=args.constraint, gpus_per_node=args.ngpus)  # fmt: skip
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.mem_gb is not None:
        params["mem"] = f"{int(args.mem_gb * 1024)}MB"
    ex.update_parameters(**params, additional_parameters=extra)
    return ex


def _join_sbatch(argv: list[str]) -> list[str]:
    """``--sbatch --exclusive`` -> ``--sbatch=--exclusive``: argparse would take a value that starts with ``--`` for
    a flag of its own."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--sbatch" and i + 1 < len(argv):
            out.append(f"--sbatch={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_sbatch(list(sys.argv[1:] if argv is None else argv))
    args, train_argv = build_parser().parse_known_args(argv)
    try:
        import submitit  # noqa: F401  (the slurm extra)
    except ImportError:
        print("xcit submit: error: the optional package 'submitit' is not installed: pip install -e '.[slurm]' "
              "(or pip install submitit)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        cfg = _train_config(train_argv)
        lead, rest = signal_lead(shlex.split(args.sbatch))
        extra = sbatch_parameters(rest)
        if args.timeout * 60 <= lead:
            raise ConfigError(f"--timeout {args.timeout} min leaves no time before the warning signal, which "
                              f"comes {lead} s before the limit: give a longer --timeout (or --signal=USR2@N in "
                              f"--sbatch)")  # fmt: skip
        ckpt_dir = Path(cfg.ckpt_save_dir).resolve()
        job_dir = Path(args.job_dir).resolve() if args.job_dir else ckpt_dir
        train_argv = [*train_argv, "--ckpt_save_dir", str(ckpt_dir)]  # the job may start in another directory
        if not args.dry_run:
            check_cluster(args.partition)
            check_folders(job_dir, ckpt_dir)
    except ConfigError as e:
        print(f"xcit submit: error: {e}", file=sys.stderr)
        return 2
    executor = make_executor(args, job_dir, lead, extra, f"xcit-{cfg.model}")
    if args.dry_run:  # submitit's own script text, as sbatch would get it (the folder is not created)
        print(executor._make_submission_file_text(executor._submitit_command_str, "DRY_RUN"))
        print(f"# task: xcit train {shlex.join(train_argv)}", file=sys.stderr)
        return 0
    return _submit(executor, TrainTask(train_argv, args.max_requeues), job_dir, ckpt_dir, args.wait)


def _submit(executor, task: TrainTask, job_dir: Path, ckpt_dir: Path, wait: bool) -> int:
    import submitit

    try:
        job = executor.submit(task)
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError, OSError) as e:
        lines = [x for x in str(e).splitlines() if "error" in x.lower()] or str(e).splitlines() or [type(e).__name__]
        print(f"xcit submit: error: sbatch refused the job: {lines[-1].strip()}", file=sys.stderr)
        return 2
    (job_dir / MARKER).write_text(json.dumps({"job_id": job.job_id, "ckpt_save_dir": str(ckpt_dir)}) + "\n")
    print(f"submitted SLURM job {job.job_id}")
    print(f"folder:  {job_dir}")
    print(f"follow:  tail -F {job.paths.stdout}   (rank 0; {ckpt_dir / 'train.log'} once training starts)")
    print(f"cancel:  scancel {job.job_id}")
    if not wait:
        return 0
    try:
        job.results()
    except KeyboardInterrupt:
        print(f"xcit submit: stopped waiting; SLURM job {job.job_id} goes on (scancel {job.job_id})", file=sys.stderr)
        return 130
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
        state = _final_state(job, "FAILED")
        print(f"xcit submit: SLURM job {job.job_id} failed ({state}): {_last_line(e)}", file=sys.stderr)
        return 1
    print(f"SLURM job {job.job_id} finished ({_final_state(job, 'COMPLETED')})")
    return 0


def _final_state(job, default: str) -> str:
    """sacct's state of the job now (submitit's cached one may still say RUNNING); ``default`` where accounting
    cannot be asked."""
    try:
        return job.get_info(mode="force").get("State", default)
    except Exception:  # any failure of sacct: the results are in, which is what counts
        return default


def _last_line(e: BaseException) -> str:
    """The most telling line of a submitit error: the exception that ended the task."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and not set(x.strip()) <= {"-"}]
    errors = [x for x in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", x)]
    return (errors or lines or [type(e).__name__])[-1][:500]
