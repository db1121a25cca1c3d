"""Small real models covering every layer kind (importable, so stores can rebuild them)."""
import torch
from torch import nn

from metaql.storage.attention import ExplicitMultiheadAttention


class ConvNet(nn.Module):
    """A conv layer of any configuration, called twice when `twice`, then a linear classifier."""

    def __init__(self, dims=2, cin=2, cout=4, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", size=6, classes=3, twice=False):
        super().__init__()
        self.metaql_config = dict(dims=dims, cin=cin, cout=cout, k=k, stride=stride, padding=padding,
                                  dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                                  size=size, classes=classes, twice=twice)
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv(cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias=bias, padding_mode=padding_mode)
        self.twice = twice
        with torch.no_grad():
            shape = (1, cin) + (size,) * dims
            n = self._features(torch.zeros(shape)).shape[1]
        self.fc = nn.Linear(n, classes)

    def _features(self, x):
        h = torch.tanh(self.conv(x))
        if self.twice:
            h = h + torch.tanh(self.conv(x.flip(-1)))
        return h.flatten(1)

    def forward(self, x):
        return self.fc(self._features(x))


class TextNet(nn.Module):
    """Embedding -> self-attention (Q, K, V read one input) -> LayerNorm -> mean -> classifier."""

    def __init__(self, vocab=11, dim=8, heads=2, classes=3):
        super().__init__()
        self.metaql_config = dict(vocab=vocab, dim=dim, heads=heads, classes=classes)
        self.emb = nn.Embedding(vocab, dim)
        self.attn = ExplicitMultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.emb(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


class BNNet(nn.Module):
    """Conv -> BatchNorm2d -> linear: exact by replay (eval mode), not in training."""

    def __init__(self, classes=3):
        super().__init__()
        self.metaql_config = dict(classes=classes)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 5, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))
