"""Data-cleaning table functions and the algorithms behind them.

ELITE (papers/000, Part I): robust deep anomaly detection with meta-gradients.

    elite.py           EliteDetector, the algorithm with a scikit-learn face (no store dependency)
    metagrad.py        meta-gradients of a mini-batch: factored inner products, or a virtual step
    pseudo_labels.py   the hinge loss (Eq. 4, 6), pseudo labels and weights (Eq. 10-14)
    scores.py          anomaly scores Omega: Deep SVDD distance, autoencoder reconstruction error
    networks.py        conv nets for images, MLPs for tables, sized to the input
    baselines.py       Deep SVDD and Deep SAD on the same networks
    detector.py        scoring, thresholds, save / load (safetensors + JSON) shared by the detectors
    checks.py          input checks, run before any training
    thresholds.py      the decision threshold of predict()
    training.py        mini-batching, optimizers, autoencoder pretraining
    elite_function.py  the ELITE(...) table function over the store
"""
