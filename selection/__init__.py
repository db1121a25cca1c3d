"""What every selection session shares (LANCET, active learning, label cleaning): a pool of
sample ids, labels with who and when, a budget, an oracle for experiments, and persistence."""
from metaql.selection.core import SelectionSession

__all__ = ["SelectionSession"]
