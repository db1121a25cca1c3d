"""Artifacts (ELITE detectors, LANCET sessions) are saved as one unit and a read-only store writes
none (issue #16)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import metaql
from metaql.cleaning.elite import EliteDetector
from metaql.engine.errors import IOException, Warning as MetaQLWarning
from metaql.labeling import lancet_functions
from metaql.labeling.dmn import OWAConfig
from metaql.labeling.embedding import TrainConfig
from metaql.labeling.lancet import LancetConfig
from metaql.labeling.session import LabelingSession
from metaql.storage.artifacts import artifact_problems, current_version

N, CLASSES = 60, 3


@pytest.fixture(autouse=True)
def _tiny_rounds(monkeypatch):
    def tiny(steps, cfm, alpha_t, seed, augment, after_stop):
        return LancetConfig(train=TrainConfig(steps=min(steps, 20), cfm=cfm, seed=seed, augment=augment),
                            owa=OWAConfig(iterations=30, refine_iterations=10, seed=seed),
                            semigan={"hidden": [16], "feature_dim": 8}, warm_steps=5,
                            alpha_t=alpha_t, after_stop=after_stop)
    monkeypatch.setattr(lancet_functions, "lancet_config", tiny)


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def store(tmp_path):
    """A closed store on disk: blobs in 'train', a small labeled 'val', two human labels per class."""
    path = tmp_path / "s.mq"
    g = torch.Generator().manual_seed(0)
    y = np.arange(N) % CLASSES
    x = 6.0 * torch.eye(CLASSES, 4)[torch.from_numpy(y)] + torch.randn(N, 4, generator=g)
    with metaql.connect(str(path), config={"progress": False}) as con:
        con.add_samples(np.arange(N), "train", labels=(y == 2).astype(int), inputs=x)
        con.add_samples(1000 + np.arange(6), "val", labels=[0, 0, 0, 1, 1, 1], inputs=torch.randn(6, 4, generator=g))
        con.label([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2], by="ana")
    return path


ELITE = "SELECT * FROM ELITE(data=train, labeled=val, epochs=2, batch_size=32)"


def test_elite_on_a_read_only_store_computes_but_writes_nothing(store):
    before = files(store)
    with metaql.connect(str(store), read_only=True, config={"progress": False}) as con:
        with pytest.warns(MetaQLWarning, match="read-only"):
            rows = con.execute(ELITE).fetchall()
        with warnings.catch_warnings():
            warnings.simplefilter("error")                      # warned once per store
            con.execute(ELITE).fetchall()
    assert len(rows) == N
    assert files(store) == before


def test_lancet_on_a_read_only_store_reads_and_refuses_to_persist(store):
    with metaql.connect(str(store), config={"progress": False}) as con:      # one cached round
        cached = con.execute("SELECT * FROM LANCET(pool=train) ORDER BY sample_id").fetchall()
    before = files(store)
    with metaql.connect(str(store), read_only=True, config={"progress": False}) as con:
        assert con.execute("SELECT * FROM LANCET(pool=train) ORDER BY sample_id").fetchall() == cached
        assert len(con.execute("SELECT * FROM LANCET_STATUS(pool=train)").fetchall()) == 1
        with pytest.warns(MetaQLWarning, match="read-only"):    # another round: computed, not cached
            con.execute("SELECT * FROM LANCET(pool=train, seed=1)").fetchall()
        with pytest.raises(IOException, match="read-only"):
            con.execute("SELECT * FROM LANCET_CANDIDATES(pool=train, budget=3, oracle='label', seed=2)")
    assert files(store) == before


def fitted(seed: int) -> EliteDetector:
    g = torch.Generator().manual_seed(seed)
    xu, xl = torch.randn(40, 4, generator=g), torch.randn(6, 4, generator=g) + 3 * (seed % 2)
    return EliteDetector(epochs=2, batch_size=16, seed=seed).fit(xu, xl, [0, 0, 0, 1, 1, 1])


def crash_on(monkeypatch, filename: str) -> None:
    """A kill at the moment `filename` would be written: that write and everything after it never happen."""
    real = Path.write_text

    def dying(self, *args, **kwargs):
        if self.name == filename:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", dying)


def test_a_save_killed_between_the_detectors_files_leaves_the_old_detector_whole(tmp_path, monkeypatch):
    slot, x = tmp_path / "artifacts" / "elite" / "train", torch.randn(30, 4)
    old, new = fitted(0), fitted(1)
    old.save(slot)
    with monkeypatch.context() as m:
        crash_on(m, "detector.json")       # after the weights, before the threshold
        with pytest.raises(KeyboardInterrupt):
            new.save(slot)
    back = EliteDetector.load(slot)
    assert np.array_equal(back.decision_function(x), old.decision_function(x))
    assert back.threshold_ == old.threshold_
    assert artifact_problems(tmp_path) == []
    new.save(slot)                         # the next save replaces it and clears the leftovers
    assert np.array_equal(EliteDetector.load(slot).decision_function(x), new.decision_function(x))
    assert sorted(p.name for p in slot.iterdir() if p.name.startswith(".tmp")) == []


def test_a_damaged_detector_raises_and_verify_lists_it(tmp_path):
    slot = tmp_path / "artifacts" / "elite" / "train"
    fitted(0).save(slot)
    weights = current_version(slot) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IOException, match="damaged"):
        EliteDetector.load(slot)
    assert artifact_problems(tmp_path) == ["artifact elite/train: corrupt weights.safetensors"]
    (slot / "CURRENT").write_text("v-1-deadbeef")
    with pytest.raises(IOException, match="missing"):
        EliteDetector.load(slot)
    assert len(artifact_problems(tmp_path)) == 1


def test_a_session_save_killed_midway_leaves_the_old_session(tmp_path, monkeypatch):
    old = LabelingSession(np.arange(10), 3)
    old.label([1, 2], [0, 1], by="ana")
    old.save(tmp_path / "session")
    new = LabelingSession(np.arange(10), 3)
    new.label([1, 2, 3, 4], [0, 1, 2, 2], by="bob")
    with monkeypatch.context() as m:
        crash_on(m, "session.json")
        with pytest.raises(KeyboardInterrupt):
            new.save(tmp_path / "session")
    assert LabelingSession.load(tmp_path / "session").labels == old.labels


def test_a_symlinked_artifacts_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with metaql.connect(str(tmp_path / "s.mq")) as con:
        (tmp_path / "s.mq" / "artifacts").symlink_to(outside, target_is_directory=True)
        with pytest.raises(IOException, match="symlink"):
            con.store.artifact_dir("elite", "train")
    assert list(outside.iterdir()) == []
