"""Capture during training in the frameworks users train with, without rewriting their loop.

    metaql.integrations.huggingface   MetaQLTrainer, a transformers.Trainer that captures
    metaql.integrations.lightning     MetaQLCallback, a Lightning callback that captures

Each opens a capture (con.capture) per epoch, or every N optimizer steps, as a checkpoint named as
the user chooses, takes each sample's id from the dataset, and closes the checkpoint when the
period or the training ends; an exception leaves the checkpoint unfinished, which is never scored.
The modules are imported on their own so that neither framework is needed by the other.
"""
