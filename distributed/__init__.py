"""MetaQL beyond one process: the Ray query engine (ray_engine.py), stores on object storage
through pyarrow.fs (objectstore.py, shards.py), and torch.distributed capture (ddp.py).

Everything here is optional: `pip install 'metaql[ray]'` / `'metaql[s3]'`; the local engine and
local stores need none of it.
"""
