"""The training integrations under DDP: two gloo ranks (torch.multiprocessing spawn, the launcher's
environment set by hand, no torchrun) train through Lightning's strategy='ddp' with MetaQLCallback;
each rank captures its own samples, rank 0 adopts them; the store equals a one-process capture of the
same training (the same ids, factors to 1e-5), every checkpoint complete."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import metaql
from tests.ddp_helpers import assert_same_factors, free_port, leave_group
from tests.test_integrations import _lit_module

pytestmark = pytest.mark.cluster
L = pytest.importorskip("lightning.pytorch")
LitNet = _lit_module()[1]
N, PER_RANK, EPOCHS = 32, 4, 2


def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(N, 64, generator=g), torch.randint(0, 10, (N,), generator=g)


def new_store(path: str) -> None:
    x, y = data()
    with metaql.connect(path) as con:
        con.add_samples(np.arange(N), "train", y.numpy(), x)


def fit(target, devices: int, batch: int, root: str):
    """Trains LitNet from seed 0 with MetaQLCallback on `target`; the callback."""
    from metaql.integrations.lightning import MetaQLCallback
    x, y = data()
    torch.manual_seed(0)
    module = LitNet()
    rows = torch.utils.data.TensorDataset(x, y, torch.arange(N))
    # unshuffled (Lightning's own sampler would shuffle): rank r gets the samples r, r + 2, ... so each
    # global batch is the one-process batch
    sampler = torch.utils.data.DistributedSampler(rows, devices, int(os.environ["RANK"]), shuffle=False) \
        if devices > 1 else None
    loader = torch.utils.data.DataLoader(rows, batch_size=batch, sampler=sampler)
    cb = MetaQLCallback(target, layers="*", capture_kwargs={"shard_size": 8})
    kw = dict(strategy="ddp", devices=devices, num_nodes=1, use_distributed_sampler=False) if devices > 1 else \
        dict(devices=1)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=root, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return cb


def _rank_main(rank: int, world: int, port: int, path: str, root: str) -> None:
    # what torchrun or Lightning's own launcher would set: Lightning then joins these processes
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank), PL_DISABLE_FORK="1")
    torch.set_num_threads(1)
    con, clean = (metaql.connect(path) if rank == 0 else None), False
    try:
        cb = fit(con if rank == 0 else path, world, PER_RANK, root)
        assert cb.checkpoints == ["epoch1", "epoch2"]
        clean = True
    finally:
        if con is not None:
            con.close()
        leave_group(clean)


def test_lightning_ddp_two_ranks_store_what_one_process_stores(tmp_path):
    ddp, single = str(tmp_path / "ddp.mq"), str(tmp_path / "one.mq")
    new_store(ddp)
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), ddp, str(tmp_path)), nprocs=2, join=True)
    new_store(single)
    with metaql.connect(single) as con:
        fit(con, 1, 2 * PER_RANK, str(tmp_path))        # one process, the global batches
    assert_same_stores(ddp, single)


def assert_same_stores(ddp: str, single: str) -> None:
    for checkpoint in ("epoch1", "epoch2"):
        assert_same_factors(ddp, single, checkpoint, 3 * N, atol=1e-5)     # fc1, act, fc2: each id once
    with metaql.connect(ddp, read_only=True) as con:
        assert con.verify() == []
        assert con.execute("SELECT name, status, step FROM checkpoints ORDER BY name").fetchall() == [
            ("epoch1", "complete", 0), ("epoch2", "complete", N // (2 * PER_RANK))]
        mine = con.execute("SELECT * FROM SELF_INFLUENCE(layers=*) ORDER BY sample_id").fetchall()
    with metaql.connect(single, read_only=True) as con:
        theirs = con.execute("SELECT * FROM SELF_INFLUENCE(layers=*) ORDER BY sample_id").fetchall()
    np.testing.assert_allclose(np.array(mine), np.array(theirs), rtol=1e-5)
    assert not any(Path(ddp + ".ranks").glob("*/rank-*"))       # the parts were adopted and removed


def hf_train(target, root: str):
    """Trains TinyNet from seed 0 through MetaQLTrainer on per-device batches of PER_RANK."""
    from transformers import TrainingArguments

    from metaql.integrations.huggingface import MetaQLTrainer
    from tests.test_integrations import TinyNet

    class Sequential(MetaQLTrainer):
        # unshuffled: accelerate gives rank r the per-device batches r, r + 2, ..., so each global
        # batch is the one-process batch of 2 * PER_RANK
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    x, y = data()
    rows = [{"x": x[i], "labels": int(y[i]), "sample_id": i} for i in range(N)]
    world = int(os.environ.get("WORLD_SIZE", 1))
    args = TrainingArguments(output_dir=root, per_device_train_batch_size=PER_RANK * (2 // world),
                             num_train_epochs=EPOCHS, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, ddp_backend="gloo" if world > 1 else None)
    torch.manual_seed(0)
    trainer = Sequential(model=TinyNet(), args=args, train_dataset=rows, con=target, layers="*",
                         capture_kwargs={"shard_size": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def _hf_rank_main(rank: int, world: int, port: int, path: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    con, clean = (metaql.connect(path) if rank == 0 else None), False
    try:
        trainer = hf_train(con if rank == 0 else path, root)
        assert trainer.metaql_checkpoints == ["epoch1", "epoch2"]
        clean = True
    finally:
        if con is not None:
            con.close()
        leave_group(clean)


def test_hf_trainer_ddp_two_ranks_store_what_one_process_stores(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    ddp, single = str(tmp_path / "ddp.mq"), str(tmp_path / "one.mq")
    new_store(ddp)
    torch.multiprocessing.spawn(_hf_rank_main, args=(2, free_port(), ddp, str(tmp_path / "o")), nprocs=2, join=True)
    new_store(single)
    with metaql.connect(single) as con:
        hf_train(con, str(tmp_path / "o"))
    assert_same_stores(ddp, single)


def test_ray_train_example_two_workers_store_what_one_process_stores(tmp_path):
    """examples/ray_train_capture.py with 2 CPU workers equals the one-process capture of
    tests/test_cluster_ddp.py (the same data, batches and seed)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train")
    import importlib.util

    from tests import test_cluster_ddp as one
    spec = importlib.util.spec_from_file_location("ray_train_capture",
                                                  Path(__file__).parents[1] / "examples" / "ray_train_capture.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ddp, single = str(tmp_path / "ray.mq"), str(tmp_path / "one.mq")
    one.new_store(ddp)
    x, y = one.data()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        example.capture_with_ray_train(ddp, x, y, one.batches(), num_workers=2, lr=0.1, shard_size=8,
                                       storage_path=str(tmp_path / "ray_results"))
    finally:
        if started:
            ray.shutdown()
    one.one_process(single)
    assert_same_factors(ddp, single, "c0", 2 * one.N, atol=1e-5)
    with metaql.connect(ddp, read_only=True) as con:
        assert con.verify() == []
        assert con.execute("SELECT status FROM checkpoints").fetchall() == [("complete",)]
