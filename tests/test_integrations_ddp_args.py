"""The integrations outside torch.distributed: a store path (what DDP ranks other than 0 pass) is
refused with a hint, not opened as a second writer."""
import numpy as np
import pytest
import torch

import metaql


def test_lightning_callback_refuses_a_store_path_outside_ddp(tmp_path):
    from tests.test_integrations import _lit_module
    L, LitNet, _ = _lit_module()
    from metaql.integrations.lightning import MetaQLCallback
    path = str(tmp_path / "s.mq")
    with metaql.connect(path) as con:
        con.add_samples(np.arange(4), "train", np.zeros(4, dtype=np.int64), torch.zeros(4, 64))
    data = torch.utils.data.TensorDataset(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), torch.arange(4))
    trainer = L.Trainer(max_epochs=1, callbacks=[MetaQLCallback(path)], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path))
    with pytest.raises(metaql.InvalidInputException, match="store path outside torch.distributed"):
        trainer.fit(LitNet(), torch.utils.data.DataLoader(data, batch_size=2))
    with metaql.connect(path, read_only=True) as con:
        assert con.store.checkpoints() == []
