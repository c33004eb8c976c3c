"""One rank of the checkpoint tests: `python tests/ckpt_worker.py RANK WORLD STORE COMMAND ...`.

Ranks meet through a torch FileStore (no ports); WORLD=1 runs without a process group. The
state is a tiny GAN's worth of objects, as the training stages hold them: two DDP-wrapped
networks, their Adam optimizers, an EMA copy and a GradScaler.

Commands
    train ROOT STEPS SAVE_AT KEEP SNAP   train, save at the steps listed in SAVE_AT ("2,3");
                                         snapshot at each of those and at the end: SNAP-<step>-<rank>.pt
    block ROOT KEEP FLAG                 save step 1, then save step 2 but stop rank 0 just
                                         before the marker (touches FLAG, sleeps) to be killed
    load MORE CKPT SNAP [CKPT SNAP ...]  for each CKPT: fresh objects, load it, snapshot to
                                         SNAP-<rank>.pt, train MORE steps, snapshot to SNAP-after-<rank>.pt
    loop ROOT KEEP                       resume from latest() (checking its digest), then train
                                         and save every step until killed
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from avpgan.train import checkpoint  # noqa: E402
from avpgan.train.ema import EMA  # noqa: E402


def make_state(seed: int, world: int) -> dict[str, object]:
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 6))
    d = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    ema = EMA(g, 0.9)
    if world > 1:
        g, d = DDP(g), DDP(d)
    return {
        "g": g, "d": d, "ema": ema,
        "opt_g": torch.optim.Adam(g.parameters(), lr=1e-2, betas=(0.5, 0.999)),
        "opt_d": torch.optim.Adam(d.parameters(), lr=2e-2, betas=(0.5, 0.999)),
        # growth_interval=1: the scale changes every step, so a lost scaler state shows.
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1),
    }


def train_step(state: dict, rank: int, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    z, real = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen) + 1
    g, d, scaler = state["g"], state["d"], state["scaler"]
    loss_d = nn.functional.softplus(d(g(z).detach())).mean() + nn.functional.softplus(-d(real)).mean()
    state["opt_d"].zero_grad()
    scaler.scale(loss_d).backward()
    scaler.step(state["opt_d"])
    loss_g = nn.functional.softplus(-d(g(z))).mean()
    state["opt_g"].zero_grad()
    scaler.scale(loss_g).backward()
    scaler.step(state["opt_g"])
    scaler.update()
    state["ema"].update(g.module if isinstance(g, DDP) else g)


def rank_state(rank: int, step: int) -> dict:
    return {"rank": rank, "step": step, "torch_rng": torch.get_rng_state(),
            "stream": {"epoch": [step], "index": [3 * step + rank]}}


def snapshot(state: dict) -> dict:
    """Plain (unwrapped, torch-native) state dicts: what must be bit-identical after a load."""
    out = {}
    for name, obj in state.items():
        obj = obj.module if isinstance(obj, DDP) else obj
        out[name] = obj.state_dict()
    return out


def digest(state: dict) -> str:
    h = hashlib.sha256()

    def walk(x):
        if torch.is_tensor(x):
            h.update(x.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(snapshot(state))
    return h.hexdigest()


def save(root: Path, step: int, state: dict, rank: int, world: int, keep: int) -> Path:
    meta = {"step": step, "world_size": world, "digest": digest(state), "mlflow_run_id": "abc", "config": "a: 1\n"}
    return checkpoint.save(root, step, state, rank_state=rank_state(rank, step), meta=meta, keep_last=keep)


def main() -> None:
    rank, world, store, command, *args = sys.argv[1:]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    state = make_state(seed=0, world=world)

    if command == "train":
        root, steps, save_at, keep, snap = Path(args[0]), int(args[1]), args[2], int(args[3]), args[4]
        for step in range(1, steps + 1):
            train_step(state, rank, step)
            if str(step) in save_at.split(",") or step == steps:
                if str(step) in save_at.split(","):
                    save(root, step, state, rank, world, keep)
                torch.save({"state": snapshot(state), "rank_state": rank_state(rank, step)}, f"{snap}-{step}-{rank}.pt")

    elif command == "block":
        root, keep, flag = Path(args[0]), int(args[1]), Path(args[2])
        publish = checkpoint._publish

        def stuck(tmp, final, step, world_):
            if step == 2:  # every rank's shards and files are written; the marker is not
                flag.touch()
                time.sleep(600)
            publish(tmp, final, step, world_)

        checkpoint._publish = stuck
        for step in (1, 2):
            train_step(state, rank, step)
            save(root, step, state, rank, world, keep)

    elif command == "load":
        more = int(args[0])
        for ckpt, snap in zip(args[1::2], args[2::2]):
            state = make_state(seed=1, world=world)  # differs from the saved objects until loaded
            meta, rs = checkpoint.load(Path(ckpt), state)
            torch.save({"state": snapshot(state), "rank_state": rs, "meta": meta}, f"{snap}-{rank}.pt")
            for step in range(meta["step"] + 1, meta["step"] + more + 1):
                train_step(state, rank, step)
            torch.save({"state": snapshot(state)}, f"{snap}-after-{rank}.pt")

    elif command == "loop":
        root, keep = Path(args[0]), int(args[1])
        step, start = 0, checkpoint.latest(root)
        if start is not None:
            meta, rs = checkpoint.load(start, state)
            step = meta["step"]
            if digest(state) != meta["digest"] or rs is None or rs["step"] != step:
                sys.exit(f"rank {rank}: {start} does not hold the state its meta.json describes")
            print(f"rank {rank}: resumed from {start}", flush=True)
        while True:
            step += 1
            train_step(state, rank, step)
            save(root, step, state, rank, world, keep)

    else:
        sys.exit(f"unknown command {command}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    # Tearing down DDP's reducer after the gloo group sometimes hangs at interpreter exit; the
    # files are written and closed, so skip the destructors.
    os._exit(0)


if __name__ == "__main__":
    main()
