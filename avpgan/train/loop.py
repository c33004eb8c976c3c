"""The one training loop every stage runs under: Accelerate, checkpoints, health, signals, tracking.

Read top to bottom: `train()` makes one Accelerator and one tracker for the run, copies what it
prints to RUN/train.log (train/console.py) and walks the configured stages; `run_stage()`
resumes a stage from its newest complete checkpoint, pulls batches from the stage's batch source
(the shard stream, or the GAN's embedding bank), calls the stage's `step`, logs, checkpoints,
and stops cleanly on preemption, Ctrl-C or too many non-finite losses.

Determinism (what makes "N steps straight" equal "N/2 steps, kill -9, resume, N/2 steps"):
- model init is seeded by (seed, stage) on every rank, so all ranks start equal;
- every step re-seeds torch's RNG from (seed, stage, rank, step), so noise, dropout and
  augmentation inside a step depend on the step number only, not on what ran before;
- the batch source is a pure function of its saved position (`StreamPosition`, `BankPosition`);
- models, EMA, optimizers and the fp16 grad scaler round-trip exactly through `checkpoint.py`;
  nothing else needs saving (no RNG state: the per-step re-seeding above replaces it).
"""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from avpgan import atomic, bundle, errors, seeding
from avpgan import config as config_mod
from avpgan.config import Config
from avpgan.images import with_title
from avpgan.train import checkpoint, console, preempt
from avpgan.train.runlock import RunLock, RunLocked
from avpgan.train.stages import STAGES, Stage
from avpgan.tracking import Tracker, reproducibility_tags, ui_hint


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite losses, a checkpoint that cannot be written); the
    message says why and what was saved. `exit_code` is the command's (avpgan.errors)."""

    def __init__(self, message: str, exit_code: int = errors.EXIT_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


# Checkpoint entries that older checkpoints lack: before avpgan saved the grad scaler, an fp16
# run's checkpoints had none; resuming one, the scaler starts again from its initial scale.
OPTIONAL_STATE = ("scaler",)


def _seed_for(*key) -> int:
    """A 32-bit seed for (seed, stage, ...). The loop's key parts enter as text (5 and "5" alike),
    as they always have: saved runs must resume with the same numbers."""
    return seeding.seed32(*(str(k) for k in key))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def write_status(run_dir: Path, **status) -> None:
    """RUN/status.json tells the batch script whether to requeue (finished | preempted | interrupted | failed)."""
    atomic.write_text(run_dir / "status.json", json.dumps(status))


def write_failed_status(run_dir: Path, stage: str) -> None:
    """status.json = failed, if the run directory still takes a write: when a full or read-only
    disk is why the run stops, the error that says so must not be replaced by this one."""
    try:
        write_status(run_dir, state="failed", stage=stage)
    except OSError:
        pass


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 kernels natively (AVX512-BF16 or AMX); elsewhere torch emulates
    them, and bf16 autocast is then usually slower than fp32. Torch asks oneDNN, through a private op."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_accelerator(cfg: Config) -> Accelerator:
    use_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        # The GAN step forwards D on real and fake in one call and never leaves parameters unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    if use_cpu and cfg.train.mixed_precision == "bf16" and not cpu_has_bf16():
        accelerator.print("warning: train.mixed_precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 "
                          "or AMX) is emulated, which is usually slower than fp32 (docs/performance.md)")
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def train(cfg: Config, resume: str = "auto") -> Path:
    """Run every configured stage in order; a finished stage (its model file exists) is skipped."""
    for name in cfg.train.stages:
        if name not in STAGES:
            raise config_mod.ConfigError(f"train.stages: unknown stage '{name}' (known: {', '.join(STAGES)})")
    run_dir = Path(cfg.train.run_dir)
    accelerator = make_accelerator(cfg)
    lock = hold_run_lock(accelerator, run_dir)
    handlers = preempt.install()
    try:
        with console.copy_output_to(run_dir / "train.log" if accelerator.is_main_process else None):
            return _train(cfg, resume, accelerator, run_dir)
    finally:
        preempt.restore(handlers)
        if lock is not None:
            lock.release()


def hold_run_lock(accelerator: Accelerator, run_dir: Path) -> RunLock | None:
    """The main process locks the run directory before writing anything there; every rank raises
    RunLocked when another training holds it (so no rank waits for a peer that gave up)."""
    lock, refused = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as e:
            refused = str(e)
    if accelerator.num_processes > 1:
        box = [refused]
        broadcast_object_list(box, from_process=0)
        refused = box[0]
    if refused:
        raise RunLocked(refused)
    if lock is not None:
        for note in (lock.warning, lock.takeover_note()):
            if note:
                accelerator.print(note)
    return lock


def _train(cfg: Config, resume: str, accelerator: Accelerator, run_dir: Path) -> Path:
    """`train` once the run directory is locked."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    accelerator.wait_for_everyone()
    accelerator.print(f"avpgan train {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC on {socket.gethostname()}, "
              f"{accelerator.num_processes} process(es) on {accelerator.device.type}")
    accelerator.print(f"run directory: {run_dir.resolve()}  (this output is also appended to {run_dir / 'train.log'})")
    tracker = Tracker(cfg.tracking, run_dir, is_main=accelerator.is_main_process, run_id=_saved_run_id(run_dir))
    tracker.start(config_mod.flatten(config_mod.to_dict(cfg)), config_mod.to_yaml(cfg),
                  cfg.tracking.run_name or cfg.name, tags=run_tags(cfg, accelerator, run_dir) if tracker.active else None)
    announce_tracking(accelerator, tracker)
    attach_node_monitors(accelerator, tracker)
    global_step = 0
    stopped_in = None  # the stage a stop signal (preemption, Ctrl-C) ended, after its checkpoint
    try:
        for name in cfg.train.stages:
            stage_cls = STAGES[name]
            done = run_dir / name / "model.safetensors"
            steps = cfg.train.stage(name).steps
            if done.exists():
                accelerator.print(f"[{name}] already finished ({done}); skipping")
                global_step += steps
                continue
            outcome = run_stage(cfg, stage_cls, accelerator, tracker, run_dir, global_step, resume)
            if outcome == "preempted":
                stopped_in = name
                break
            global_step += steps
    except (TrainingStopped, checkpoint.CheckpointError):  # stopped on purpose / no checkpoint to trust
        if accelerator.is_main_process:
            write_failed_status(run_dir, name)
        tracker.finish(status="FAILED")
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: out now; the newest checkpoint is where a rerun resumes
        if accelerator.is_main_process:
            write_status(run_dir, state="interrupted", stage=name)
        tracker.finish(status="KILLED", timeout_s=5)
        raise
    if stopped_in is not None:
        # Ctrl-C is the user's own stop: "interrupted", which the SLURM scripts do not requeue, and exit 130.
        interrupted = preempt.reason() == "SIGINT"
        if accelerator.is_main_process:
            write_status(run_dir, state="interrupted" if interrupted else "preempted", stage=stopped_in)
        tracker.finish(status="KILLED")
        shutdown(accelerator)
        if interrupted:
            raise TrainingStopped(f"[{stopped_in}] interrupted (Ctrl-C); checkpoint saved in "
                                  f"{run_dir / stopped_in / 'checkpoints'}; run the same command to resume",
                                  exit_code=errors.EXIT_INTERRUPTED)
        return run_dir
    if accelerator.is_main_process:
        log_bundle(run_dir, tracker, global_step)
        write_status(run_dir, state="finished", stage=cfg.train.stages[-1] if cfg.train.stages else "")
    tracker.finish()
    if tracker.model_uri:
        accelerator.print(f"MLflow model: {tracker.model_uri}  (mlflow.pyfunc.load_model(...).predict(waveforms): docs/mlflow.md)")
    shutdown(accelerator)
    return run_dir


def run_tags(cfg: Config, accelerator: Accelerator, run_dir: Path) -> dict[str, str]:
    """The MLflow run's tags: how to reproduce it, and a description the UI shows on the run page."""
    device = accelerator.device.type
    if device == "cuda":
        device += f" ({torch.cuda.get_device_name(accelerator.device)})"
    stages = " -> ".join(f"{s} ({cfg.train.stage(s).steps} steps)" for s in cfg.train.stages)
    return {**reproducibility_tags(accelerator.num_processes, device, cfg.train.mixed_precision),
            "mlflow.note.content": f"avpgan, config `{cfg.name}`: {stages}; run directory `{run_dir.resolve()}`"}


def announce_tracking(accelerator: Accelerator, tracker: Tracker) -> None:
    """Say where the run's MLflow record is and how to open it (rank 0)."""
    if not accelerator.is_main_process:
        return
    if not tracker.cfg.enabled:
        accelerator.print("MLflow: off (tracking.enabled=false)")
        return
    run = tracker.run_id or "not created yet (the store does not answer; logging is queued and retried)"
    accelerator.print(f"MLflow: tracking URI {tracker.uri}, run {run}")
    accelerator.print(f"MLflow UI: {ui_hint(tracker.uri, tracker.experiment_id, tracker.run_id)}")


def log_bundle(run_dir: Path, tracker: Tracker, step: int) -> None:
    """When the run has what inference needs (voice + gan), export RUN/model.safetensors and log it,
    as a file and as an MLflow Model (with the run's metrics at `step`, the last global step)."""
    if not ((run_dir / "voice" / "model.safetensors").exists() and (run_dir / "gan" / "model.safetensors").exists()):
        return
    out = run_dir / "model.safetensors"
    bundle.export(run_dir, out)
    print(f"exported bundle: {out.resolve()}  (avpgan generate {out} VOICE.wav --out faces/)")
    tracker.log_artifact(out, "model")
    tracker.log_model(out, step)


def shutdown(accelerator: Accelerator) -> None:
    """Release the prepared models and the process group before the interpreter exits: a DDP model
    still referenced at exit sometimes aborts a gloo worker (exit -6) after a clean save."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()


def attach_node_monitors(accelerator: Accelerator, tracker: Tracker) -> None:
    """Other nodes' first process reports its node's system metrics into rank 0's MLflow run."""
    if accelerator.num_processes == 1 or not tracker.cfg.enabled:
        return
    box = [tracker.run_id]
    broadcast_object_list(box, from_process=0)
    if box[0] and accelerator.is_local_main_process and not accelerator.is_main_process:
        tracker.attach_node_monitor(box[0], node_id=socket.gethostname())


def _saved_run_id(run_dir: Path) -> str | None:
    f = run_dir / "mlflow_run_id"
    return f.read_text().strip() if f.exists() else None


def run_stage(cfg: Config, stage_cls: type[Stage], accelerator: Accelerator, tracker: Tracker, run_dir: Path,
              global_offset: int, resume: str) -> str:
    """Train one stage to its configured number of steps; returns 'finished' or 'preempted'."""
    name = stage_cls.name
    scfg = cfg.train.stage(name)
    stage_dir = run_dir / name
    ckpt_root = stage_dir / "checkpoints"
    seed_everything(_seed_for(cfg.train.seed, name, "init"))
    stage = stage_cls(cfg, accelerator, run_dir)
    state = stage.state()
    if accelerator.scaler is not None:  # fp16 on a GPU: the loss scale and its growth count go on where they were
        state["scaler"] = accelerator.scaler

    step, saved, start = 0, None, None
    if resume == "auto":  # the newest checkpoint that verifies; each refused one is named in the log
        found = checkpoint.load_newest(ckpt_root, state, say=lambda line: accelerator.print(f"[{name}] {line}"),
                                       optional=OPTIONAL_STATE)
        if found is not None:
            start, meta, rank_state = found
    elif resume != "never":  # a checkpoint the user named: no fallback
        start = Path(resume)
        meta, rank_state = checkpoint.load(start, state, optional=OPTIONAL_STATE)
    if start is not None:
        step = int(meta["step"])
        saved = (rank_state or {}).get("stream")

    source = stage.batches(_seed_for(cfg.train.seed, name, "data"), step, saved)
    if start is not None:
        if saved is None:
            accelerator.print(f"[{name}] checkpoint written by {meta.get('world_size')} ranks, now {accelerator.num_processes}: "
                      f"{source.position.on_new_world}")
        accelerator.print(f"[{name}] resumed from {start} at step {step}")
    fixed = stage.fixed_inputs() if accelerator.is_main_process else None

    def save(at_step: int) -> None:
        try:
            checkpoint.save(
                ckpt_root, at_step, state, keep_last=cfg.train.keep_last,
                rank_state={"stream": source.position.state_dict()},  # after the last batch taken, stream or bank
                meta={"stage": name, "step": at_step, "samples_seen": at_step * scfg.batch_size * accelerator.num_processes,
                      "world_size": accelerator.num_processes, "mlflow_run_id": tracker.run_id,
                      "config": config_mod.to_yaml(cfg)},
            )
        except checkpoint.CheckpointWriteError as e:  # every rank gets it
            raise save_failed(e, ckpt_root, name) from e

    def stop_unhealthy(at_step: int) -> None:
        """Stop the run when `train.max_nonfinite` updates in a row were skipped (read on the host here,
        at log, checkpoint and stop steps only). Skipped updates changed nothing, so the state saved
        is the last good one, or a later finite one when the run recovered before this read."""
        streak = health.read()
        if streak is not None:
            save(at_step)
            raise TrainingStopped(
                f"[{name}] {cfg.train.max_nonfinite} non-finite losses in a row at step {streak} (seen at step "
                f"{at_step}); stopped. The last good state is saved in {ckpt_root}. "
                "Lower the learning rate or use bf16/no mixed precision."
            )

    progress = console.StageProgress(name, scfg.steps, step, show=accelerator.is_main_process)
    try:
        health = NonFiniteWatch(cfg.train.max_nonfinite, first_step=step + 1)
        window = MetricWindow()
        t_data, t_aside, t_window = 0.0, 0.0, time.perf_counter()
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # Nothing in this loop reads a device value between log steps: metrics and finite flags stay
        # tensors until then, so the host queues step after step while the device works.
        while step < scfg.steps:
            t0 = time.perf_counter()
            batch = next(source)
            t_data += time.perf_counter() - t0
            torch.manual_seed(_seed_for(cfg.train.seed, name, accelerator.process_index, step))
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            metrics, finite = stage.step(batch, step)
            step += 1
            progress.update(step)
            window.add(metrics)
            health.add(finite)

            if step % cfg.train.log_every == 0 or step == scfg.steps:
                stop_unhealthy(step)
                means = window.means(accelerator.device)  # the window's one read of the device (waits for its steps)
                elapsed = time.perf_counter() - t_window - t_aside
                local = torch.cat([means, torch.tensor([t_data, elapsed], device=accelerator.device, dtype=torch.float64)])
                mean = accelerator.reduce(local, reduction="mean")
                # corrupt samples and broken tar members, all ranks
                skipped = torch.tensor([source.skipped], device=accelerator.device)
                skipped = int(accelerator.reduce(skipped, reduction="sum")[0])
                keys = window.keys
                logged = {f"{name}/{k}": float(mean[i]) for i, k in enumerate(keys)}
                data_s, wall = (float(x) for x in mean[len(keys):])
                logged.update({
                    f"{name}/time_data_ms": 1000 * data_s / len(window),
                    f"{name}/time_compute_ms": 1000 * (wall - data_s) / len(window),
                    f"{name}/samples_per_s": len(window) * scfg.batch_size * accelerator.num_processes / max(wall, 1e-9),
                    f"{name}/nonfinite_skipped": health.total,
                    f"{name}/corrupt_samples": skipped,
                    f"{name}/peak_mem_mb": _peak_memory_mb(accelerator),
                })
                tracker.log_metrics(logged, step=global_offset + step)
                progress.say(f"[{name}] {progress.status(step)} " + " ".join(
                    f"{k.split('/')[-1]}={v:.4g}" for k, v in logged.items() if not k.endswith(("_skipped", "_samples"))))
                window = MetricWindow()
                t_data, t_aside, t_window = 0.0, 0.0, time.perf_counter()

            t_set_aside = time.perf_counter()  # sample grids and checkpoints: not the steps' time
            if fixed is not None and (step % cfg.train.sample_every == 0 or step == scfg.steps):
                grid = stage.sample_grid(fixed)
                if grid is not None:
                    grid = with_title(grid, f"{name} samples, step {step} of {scfg.steps} "
                                            f"(global step {global_offset + step})")
                    tracker.log_image(grid, key=f"{name}_samples", step=global_offset + step)
                    _save_png(grid, run_dir / "samples" / f"{name}-{step:07d}.png")
                extra = stage.sample_metrics(fixed)
                if extra:
                    tracker.log_metrics({f"{name}/{k}": v for k, v in extra.items()}, step=global_offset + step)
                    progress.say(f"[{name}] step {step} " + " ".join(f"{k}={v:.4g}" for k, v in extra.items()))

            if step == scfg.steps:
                break
            if stop_requested(accelerator, step):
                stop_unhealthy(step)
                save(step)
                why = "interrupted (Ctrl-C)" if preempt.reason() == "SIGINT" else "preempted"
                progress.say(f"[{name}] {why} at step {step}, checkpoint saved")
                return "preempted"
            if step % cfg.train.checkpoint_every == 0:
                stop_unhealthy(step)
                save(step)
            t_aside += time.perf_counter() - t_set_aside  # subtracted from the window's wall time at its log

        save(step)
        if accelerator.is_main_process:
            stage.write_model(stage_dir / "model.safetensors")
        accelerator.wait_for_everyone()
        return "finished"
    finally:
        progress.close()


class MetricWindow:
    """The metric tensors of the steps since the last log, kept on the device until `means`.

    Some metrics (R1) appear only on some steps; each is averaged over the steps that have it."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.steps = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(torch.as_tensor(v).detach())

    @property
    def keys(self) -> list[str]:
        return sorted(self.values)

    def means(self, device: torch.device) -> torch.Tensor:
        """float64 [len(keys)] on `device`, in `keys` order."""
        rows = [torch.stack(self.values[k]).to(device, torch.float64).mean() for k in self.keys]
        return torch.stack(rows) if rows else torch.zeros(0, device=device, dtype=torch.float64)

    def __len__(self) -> int:
        return self.steps


class NonFiniteWatch:
    """Consecutive skipped (non-finite) updates, counted from per-step bool tensors that stay on the
    device until `read`, which fetches all of them at once. All ranks hold the same flags (the
    gradients are all-reduced), so all ranks reach the same verdict at the same step."""

    def __init__(self, limit: int, first_step: int):
        self.limit = limit
        self.flags: list[torch.Tensor] = []
        self.next_step = first_step  # the step number (counted from 1) of the first flag not read yet
        self.in_row = 0
        self.total = 0

    def add(self, finite: torch.Tensor | bool) -> None:
        self.flags.append(torch.as_tensor(finite))

    def read(self) -> int | None:
        """The step at which `limit` skipped updates in a row were first reached since the last
        read, or None."""
        if not self.flags:
            return None
        finite = torch.stack([f.to(self.flags[0].device) for f in self.flags]).tolist()
        reached = None
        for i, ok in enumerate(finite):
            self.in_row = 0 if ok else self.in_row + 1
            self.total += not ok
            if reached is None and self.in_row >= self.limit:
                reached = self.next_step + i
        self.next_step += len(finite)
        self.flags.clear()
        return reached


def stop_requested(accelerator: Accelerator, step: int, every: int = 10) -> bool:
    """Has any rank been asked to stop (preemption, Ctrl-C)? One process asks its own flag, which
    costs nothing. Several agree through an all-reduce whose result the host must read: on GPUs
    that read waits for the device, so they ask every `every` steps (a stop lands within that many
    steps, well inside the scheduler's warning); on CPU (gloo) every step."""
    if accelerator.num_processes == 1:
        return preempt.requested()
    if accelerator.device.type == "cuda" and step % every:
        return False
    return preempt.should_stop(accelerator)


def save_failed(e: checkpoint.CheckpointWriteError, ckpt_root: Path, stage: str) -> TrainingStopped:
    """A checkpoint the file system refused stops the run (going on would train steps that no
    checkpoint can keep), saying why and which checkpoint a rerun resumes from."""
    kept = checkpoint.latest(ckpt_root)
    previous = f"the previous checkpoint {kept} is intact" if kept else "there is no earlier checkpoint"
    return TrainingStopped(f"[{stage}] {e}; training stopped, {previous}; make room or fix the folder, "
                           "then run again to resume", exit_code=errors.EXIT_WRITE)


def _peak_memory_mb(accelerator: Accelerator) -> float:
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _save_png(grid: np.ndarray, path: Path) -> None:
    from avpgan.images import save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)
