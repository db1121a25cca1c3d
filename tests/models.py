"""Small real models for tests (importable, so a store can rebuild them from their factory)."""
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, din: int = 6, hidden: int = 5, classes: int = 3, bias: bool = True):
        super().__init__()
        self.metaql_config = {"din": din, "hidden": hidden, "classes": classes, "bias": bias}
        self.fc1 = nn.Linear(din, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class SeqModel(nn.Module):
    """Linear layers over a token sequence (B, T, Din), mean-pooled, then a classifier; `proj` is
    called twice per forward pass (a module used several times contributes all its calls)."""

    def __init__(self, din: int = 4, hidden: int = 5, classes: int = 3, bias: bool = True):
        super().__init__()
        self.metaql_config = {"din": din, "hidden": hidden, "classes": classes, "bias": bias}
        self.tok = nn.Linear(din, hidden, bias=bias)
        self.proj = nn.Linear(hidden, hidden, bias=bias)
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.tok(x))
        h = torch.tanh(self.proj(h)) + self.proj(h * 0.5)
        return self.head(h.mean(dim=1))
