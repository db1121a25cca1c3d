"""Selection rules over the store for active learning and active label cleaning (papers/002):
GRADNORM (gradient-norm acquisition from replayed factors), LABEL_CLEANING_SCORE (Phi), the
annotation log, and the label-cleaning session."""
