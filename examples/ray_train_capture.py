"""Capture under Ray Train: a TorchTrainer's workers train DigitsMLP data-parallel (DDP over gloo on
CPU; nccl on GPUs) and each captures its own samples of every global batch through
metaql.distributed.ddp.distributed_capture; worker 0 opens the store and commits the checkpoint.

    python examples/ray_train_capture.py runs/ray.mq --workers 2

The workers must see the store's directory (one machine, or a shared file system): worker 0 writes
the store, the others their part stores beside it (STORE.ranks/...), which worker 0 then adopts."""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import metaql
from metaql.demo import DigitsMLP


def train_loop(config: dict) -> None:
    """One Ray Train worker: trains on its share of each global batch, capturing it."""
    import ray.train
    import ray.train.torch
    from metaql.distributed.ddp import distributed_capture
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    model = ray.train.torch.prepare_model(DigitsMLP(), move_to_device=False)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    x, y = torch.as_tensor(config["x"]), torch.as_tensor(config["y"])
    con = metaql.connect(config["path"]) if rank == 0 else None     # one writer: worker 0
    try:
        with distributed_capture(con if rank == 0 else config["path"], model, layers=config["layers"],
                                 checkpoint=config["checkpoint"], lr=config["lr"],
                                 shard_size=config["shard_size"]) as cap:
            for ids in config["batches"]:
                mine = torch.as_tensor(ids)[rank::world]            # this worker's share of the global batch
                cap.backward(F.cross_entropy(model(x[mine]), y[mine]), mine.numpy())
                opt.step()
                opt.zero_grad()
    finally:
        if con is not None:
            con.close()


def capture_with_ray_train(path: str, x: torch.Tensor, y: torch.Tensor, batches: list, num_workers: int = 2,
                           lr: float = 0.1, layers=("fc1", "fc2"), checkpoint: str = "c0", shard_size: int = 2048,
                           seed: int = 0, storage_path: str | None = None) -> None:
    """Trains DigitsMLP on the global `batches` (arrays of sample ids registered in the store at `path`)
    with `num_workers` Ray Train workers, capturing checkpoint `checkpoint`. Needs ray.init() first
    (or joins a running cluster)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    config = dict(path=path, x=x.numpy(), y=y.numpy(), batches=[np.asarray(b) for b in batches], lr=lr,
                  layers=list(layers), checkpoint=checkpoint, shard_size=shard_size, seed=seed)
    trainer = TorchTrainer(train_loop, train_loop_config=config, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False),
                           run_config=RunConfig(storage_path=storage_path))
    trainer.fit()


def main() -> None:
    import ray
    from sklearn.datasets import load_digits
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    d = load_digits()
    x, y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    n = len(y) - len(y) % a.batch          # whole global batches: every sample on one worker once
    with metaql.connect(a.store) as con:
        con.add_samples(np.arange(n), "train", y[:n].numpy(), x[:n])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ray.init(num_cpus=a.workers + 1)
    capture_with_ray_train(a.store, x[:n], y[:n], list(order.reshape(-1, a.batch).numpy()), a.workers)
    with metaql.connect(a.store, read_only=True) as con:
        print(con.execute("SELECT * FROM SELF_INFLUENCE(layers=*) ORDER BY score DESC LIMIT 5").fetchall())


if __name__ == "__main__":
    main()
