"""Labeling table functions: LANCET (papers/000 Part II) and its building blocks.

    cfm.py              the conditional feature matching loss (Eq. 27)
    embedding.py        the pluggable model protocol and the training loop that adds CFM
    augment.py          one-pixel shifts of the labeled batch for image-shaped pools
    semigan.py          SemiGAN, the default embedding model (Eq. 32-35)
    propagation.py      labels and confidences from the linear head (§9)
    dmn.py              the distribution matching network and online weight approximation
                        (Eq. 40-46, Algorithm 2), candidate selection
    termination.py      the stop rule (§10.4) and its diagnostics
    lancet.py           one round: embed, propagate, weigh, decide
    session.py          labels with who/when, a budget, cached state, save/load
    (human labels live in the catalog table `labels`: metaql.storage.labels)
    lancet_functions.py LANCET_CANDIDATES, LANCET, LANCET_STATUS

The table functions register when `metaql.labeling.lancet_functions` is imported (the engine's
builtins do this); the rest is plain tensors and never touches a store.
"""
from metaql.labeling.lancet import LancetConfig, LancetResult, run_lancet
from metaql.labeling.session import LabelingSession

__all__ = ["LabelingSession", "LancetConfig", "LancetResult", "run_lancet"]
