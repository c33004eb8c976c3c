"""A tiny real trainer with avpgan's command line, used to test the launch and SLURM layer.

`python tests/fake_stage.py train --config X [key=value ...]` behaves like `avpgan train` as far
as the cluster can see: one Accelerator per run (gloo on the CPU), the run dir and stage list from
the config, preemption through avpgan.train.preempt, an atomic checkpoint on preemption, automatic
resume from the newest checkpoint, and `RUN/status.json` = {"state", "step"} at exit. The model is
a linear regression, so a stage takes seconds. `evaluate --config X` checks that every stage's
final model exists and writes RUN/eval.json.

Test hooks (environment): FAKE_STEP_SECONDS sleeps in each step so a signal can land mid-run.
Each rank appends one JSON line per attempt to RUN/<stage>/attempts-rank<R>.jsonl, and rank 0
rewrites RUN/<stage>/progress.json after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from avpgan import config as config_mod
from avpgan.train import preempt

DIM = 16


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("step-*.pt"))
    return found[-1] if found else None


def batch(seed: int, step: int, rank: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
    w = torch.arange(DIM, dtype=torch.float32) / DIM
    x = torch.randn(size, DIM, generator=g)
    return x, x @ w[:, None]


def train_stage(acc: Accelerator, cfg, stage: str, run: Path) -> tuple[str, int]:
    scfg = getattr(cfg.train, stage)
    sdir = run / stage
    ckpt_dir = sdir / "checkpoints"
    final = sdir / "final" / "model.pt"
    if final.exists():
        return "finished", scfg.steps
    if acc.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    torch.manual_seed(cfg.train.seed)
    model = torch.nn.Linear(DIM, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    start = 0
    ckpt = latest_checkpoint(ckpt_dir)
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        acc.print(f"{stage}: resumed from {ckpt.name} (step {start})")
    model, opt = acc.prepare(model, opt)

    def save(step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            path = ckpt_dir / f"step-{step:07d}.pt"
            tmp = path.with_suffix(".tmp")
            torch.save({"step": step, "model": acc.unwrap_model(model).state_dict(),
                        "optimizer": opt.state_dict()}, tmp)
            os.replace(tmp, path)
        acc.wait_for_everyone()

    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0"))
    step, loss, stopped = start, float("nan"), False
    while step < scfg.steps:
        x, y = batch(cfg.train.seed, step, acc.process_index, scfg.batch_size)
        loss_t = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        acc.backward(loss_t)
        opt.step()
        step += 1
        loss = loss_t.item()
        if step_seconds:
            time.sleep(step_seconds)
        if acc.is_main_process:
            write_json(sdir / "progress.json", {"step": step})
        if step % cfg.train.checkpoint_every == 0 and step < scfg.steps:
            save(step)
        if preempt.should_stop(acc):
            save(step)
            stopped = True
            break

    weights = acc.unwrap_model(model).weight.detach().flatten().tolist()
    record = {"restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")), "start": start,
              "stop": step, "preempted": stopped, "reason": preempt.reason(),
              "world": acc.num_processes, "pid": os.getpid(), "loss": loss, "weights": weights}
    with open(sdir / f"attempts-rank{acc.process_index}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if not stopped:
        acc.wait_for_everyone()
        if acc.is_main_process:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_suffix(".tmp")
            torch.save({"step": step, "model": acc.unwrap_model(model).state_dict()}, tmp)
            os.replace(tmp, final)
        acc.wait_for_everyone()
    # Release DDP before the process group goes: a gloo thread owned by a DDP model that lives
    # until interpreter exit can abort the process (exit -6) under torchrun.
    model = opt = loss_t = None
    acc.free_memory()
    if stopped:
        acc.print(f"{stage}: preempted at step {step}, checkpoint saved")
        return "preempted", step
    return "finished", step


def cmd_train(cfg) -> int:
    run = Path(cfg.train.run_dir)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    preempt.install()
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    state, step = "finished", 0
    try:
        for stage in cfg.train.stages:
            state, step = train_stage(acc, cfg, stage, run)
            if state != "finished":
                break
    except BaseException:
        if acc.is_main_process:
            write_json(run / "status.json", {"state": "failed", "step": step})
        raise
    if acc.is_main_process:
        write_json(run / "status.json", {"state": state, "step": step})
    acc.end_training()
    return 0


def cmd_evaluate(cfg) -> int:
    run = Path(cfg.train.run_dir)
    result = {}
    for stage in cfg.train.stages:
        final = run / stage / "final" / "model.pt"
        if not final.exists():
            print(f"evaluate: {final} missing", file=sys.stderr)
            return 1
        result[stage] = torch.load(final, map_location="cpu")["step"]
    write_json(run / "eval.json", {"stages": result, "time": time.time()})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_stage")
    parser.add_argument("command", choices=["train", "evaluate"])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    cfg = config_mod.load(args.config, args.overrides)
    return cmd_train(cfg) if args.command == "train" else cmd_evaluate(cfg)


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
