"""Tasks: the loss is part of the model.

A task turns (model output, targets) into per-sample losses and says what the query-side `loss=`
options mean for it. It is recorded with the model in the catalog (models.loss, a JSON spec such as
{"task": "regression", "target": "target"}) by con.capture(..., task=) and con.checkpoint(..., task=),
and every replay (con.replay, a query's query side, the recompute strategy, con.update_predictions)
takes its losses from the checkpoint's task, so a query-side gradient is always one of the loss the
model was captured with.

    classification           cross-entropy on samples.label (the default; stores before tasks say
                             'cross_entropy'); loss=label | pred | expected as in storage/losses.py
    sequence_classification  the same on Hugging Face style outputs (anything with .logits)
    regression               squared error summed over output dims, per sample, against float samples
                             columns named by "target" (a name or a list, one per output dim; default
                             'target'); loss=label only (a prediction is its own target: pred and
                             expected are meaningless)
    causal_lm                token-level cross-entropy of each next token on the shifted input ids,
                             ignoring label `ignore_index` (-100) and tokens equal to `pad_token_id`
                             (and, in cap.loss, where attention_mask is 0); a sample's loss is the MEAN
                             over its counted tokens ("reduction": "sum" for the sum); loss=label
                             (true next tokens), pred (the model's argmax tokens), expected (entropy)
    custom                   a user's importable "pkg.mod:fn", fn(output, target) -> per-sample losses
                             (target: the samples column named by "target", default 'label'); used only
                             when this process trusts that exact string, like a model factory

Model outputs: a tensor, a tuple or list (its first element), or a dict / ModelOutput with 'logits'.
A task's `inputs` are the batch as the model got it (storage/inputs.py): a tensor, a tuple or a dict
such as a tokenizer's output; causal_lm reads the token ids and the padding mask from it.
"""
from __future__ import annotations

import json
import types

import numpy as np
import torch
import torch.nn.functional as F

from metaql.errors import BinderException, InvalidInputException, IOException
from metaql.storage import models as model_files
from metaql.storage.losses import LOSS_TARGETS, per_sample_loss

LEGACY_CLASSIFICATION = "cross_entropy"     # models.loss of stores written before tasks
TASKS: dict[str, type["Task"]] = {}


def register_task(cls: type["Task"]) -> type["Task"]:
    TASKS[cls.name] = cls
    return cls


def model_output(output) -> torch.Tensor:
    """The tensor a loss reads from whatever the model returned."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "logits"):
        logits = output.get("logits") if isinstance(output, dict) else output.logits
        if isinstance(logits, torch.Tensor):
            return logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InvalidInputException(f"the model returned a {type(output).__name__}; MetaQL reads a tensor, the first "
                                "element of a tuple, or the 'logits' of a dict/ModelOutput: make forward return one")


class Task:
    name = ""
    loss_targets: tuple[str, ...] = ("label",)
    options: dict[str, object] = {}      # option name -> default

    def __init__(self, **options):
        unknown = set(options) - set(self.options)
        if unknown:
            raise InvalidInputException(f"task '{self.name}' has no option {sorted(unknown)}; its options are "
                                        f"{sorted(self.options) or 'none'}")
        self.opts = {**self.options, **options}

    def spec(self) -> dict:
        return {"task": self.name, **self.opts}

    def check_target(self, target: str) -> None:
        if target not in self.loss_targets:
            what = "one of " + ", ".join(self.loss_targets) if len(self.loss_targets) > 1 else "label"
            raise BinderException(f"loss={target} is not defined for a {self.name} model ({self.why_not(target)}); "
                                  f"use loss={what}")

    def why_not(self, target: str) -> str:
        return f"unknown loss target; MetaQL knows {', '.join(LOSS_TARGETS)}"

    def stored_targets(self, store, ids, target: str = "label") -> torch.Tensor | None:
        """What replay reads from the catalog for these samples (None: the loss needs nothing)."""
        self.check_target(target)
        return None

    def losses(self, output, inputs, targets, target: str = "label", attention_mask=None) -> torch.Tensor:
        raise NotImplementedError

    def predictions(self, output) -> torch.Tensor | None:
        """A class per sample for samples.pred, or None when the task has no classes."""
        return None


@register_task
class Classification(Task):
    name = "classification"
    loss_targets = LOSS_TARGETS

    def stored_targets(self, store, ids, target="label"):
        self.check_target(target)
        if target != "label":
            return None
        col = store.sample_columns(ids, ["label"])["label"]
        if any(v is None for v in col) or np.isnan(col.astype(float)).any():
            raise BinderException("loss=label needs labels, but some samples have none; use loss=pred")
        return torch.as_tensor(col.astype(np.int64))

    def losses(self, output, inputs, targets, target="label", attention_mask=None):
        return per_sample_loss(model_output(output), targets, target)

    def predictions(self, output):
        out = model_output(output)
        return out.reshape(out.shape[0], -1).argmax(1)


@register_task
class SequenceClassification(Classification):
    name = "sequence_classification"


@register_task
class Regression(Task):
    name = "regression"
    options = {"target": "target"}

    def why_not(self, target):
        return "a regression prediction is its own target, so its loss and gradient would be zero"

    def __init__(self, **options):
        super().__init__(**options)
        cols = self.opts["target"]
        if not (isinstance(cols, str) or (isinstance(cols, list) and cols and all(isinstance(c, str) for c in cols))):
            raise InvalidInputException("a regression task's 'target' names the samples column of the targets, or "
                                        f"a list of columns (one per output), got {model_files._show(cols)}")

    def columns(self) -> list[str]:
        cols = self.opts["target"]
        return [cols] if isinstance(cols, str) else list(cols)

    def stored_targets(self, store, ids, target="label"):
        self.check_target(target)
        cols = store.sample_columns(ids, self.columns())
        y = np.stack([np.asarray(cols[c], dtype=float) for c in self.columns()], axis=1)
        if not np.isfinite(y).all():
            raise BinderException(f"a regression loss needs the targets in samples column(s) {self.columns()}, "
                                  "but some samples have none (NULL or NaN): fill them, or leave those samples out")
        return torch.as_tensor(y, dtype=torch.float32)

    def losses(self, output, inputs, targets, target="label", attention_mask=None):
        self.check_target(target)
        if targets is None:
            raise InvalidInputException("a regression loss needs targets")
        out = model_output(output)
        out = out.reshape(out.shape[0], -1)
        y = torch.as_tensor(targets, dtype=out.dtype, device=out.device).reshape(out.shape[0], -1)
        if y.shape != out.shape:
            raise InvalidInputException(f"the model predicts {out.shape[1]} values per sample but there are "
                                        f"{y.shape[1]} targets (columns {self.columns()})")
        return ((out - y) ** 2).sum(1)


@register_task
class CausalLM(Task):
    name = "causal_lm"
    loss_targets = LOSS_TARGETS
    options = {"ignore_index": -100, "reduction": "mean", "pad_token_id": None}

    def __init__(self, **options):
        super().__init__(**options)
        if self.opts["reduction"] not in ("mean", "sum"):
            raise InvalidInputException("causal_lm reduction must be 'mean' or 'sum' over a sample's tokens")

    def losses(self, output, inputs, targets=None, target="label", attention_mask=None):
        """Each sample's loss over its next tokens: token t's logits predict token t+1."""
        self.check_target(target)
        logits = model_output(output)
        if logits.dim() != 3:
            raise InvalidInputException(f"a causal_lm model must return logits of shape (batch, tokens, vocab), "
                                        f"got {tuple(logits.shape)}")
        token_ids, attention_mask = token_inputs(inputs, attention_mask)
        labels = torch.as_tensor(token_ids if targets is None else targets).long().clone()
        if self.opts["pad_token_id"] is not None:
            labels[torch.as_tensor(token_ids) == self.opts["pad_token_id"]] = self.opts["ignore_index"]
        if attention_mask is not None:
            labels[torch.as_tensor(attention_mask) == 0] = self.opts["ignore_index"]
        logits, labels = logits[:, :-1], labels[:, 1:].to(logits.device)
        counted = labels != self.opts["ignore_index"]
        if target == "expected":
            logp = F.log_softmax(logits, dim=-1)
            per_token = -(logp.exp() * logp).sum(-1)
        else:
            if target == "pred":
                labels = logits.argmax(-1).detach()
            per_token = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~counted, 0), reduction="none")
        total = (per_token * counted).sum(1)
        # a sample without a counted token has loss 0 (and no gradient), never NaN
        return total if self.opts["reduction"] == "sum" else total / counted.sum(1).clamp_min(1)


def token_inputs(inputs, attention_mask=None):
    """(token ids, padding mask) of a causal LM's inputs in any registered structure: a tensor of
    ids, a dict with 'input_ids' (a tokenizer's output; its 'labels' win when present) and
    'attention_mask', or a pair (ids, mask) such as a registered list of variable-length ids gives."""
    from collections.abc import Mapping
    if isinstance(inputs, Mapping):
        key = "labels" if "labels" in inputs else "input_ids"
        if key not in inputs:
            raise InvalidInputException(f"a causal_lm task reads the token ids from inputs['input_ids'], but the "
                                        f"inputs have keys {sorted(inputs)}; register the tokenizer's output")
        return inputs[key], attention_mask if attention_mask is not None else inputs.get("attention_mask")
    if isinstance(inputs, tuple):
        mask = inputs[1] if len(inputs) == 2 and attention_mask is None else attention_mask
        return inputs[0], mask
    return inputs, attention_mask


@register_task
class Custom(Task):
    name = "custom"
    options = {"loss": None, "target": "label"}

    def __init__(self, trusted=frozenset(), **options):
        super().__init__(**options)
        name = self.opts["loss"]
        try:
            model_files.check_factory_name(name)
        except BinderException:
            raise InvalidInputException(f"a custom task names its loss as 'package.module:function', got "
                                        f"{model_files._show(name)}") from None
        if name not in trusted:
            raise model_files.UntrustedFactoryError(
                f"this store's model is trained with the loss '{name}', code that this process has not trusted "
                "(MetaQL never runs code a store names unless you say so). If you trust it: metaql.connect(path, "
                f"config={{'trusted_factories': ['{name}']}})")
        self.fn = resolve_loss(name)

    def stored_targets(self, store, ids, target="label"):
        self.check_target(target)
        col = store.sample_columns(ids, [self.opts["target"]])[self.opts["target"]]
        if any(v is None for v in col):
            raise BinderException(f"the loss '{self.opts['loss']}' needs samples.{self.opts['target']}, "
                                  "but some samples have none")
        return torch.as_tensor(np.asarray(col, dtype=np.int64 if col.dtype.kind in "iu" else np.float32))

    def losses(self, output, inputs, targets, target="label", attention_mask=None):
        self.check_target(target)
        out = self.fn(output, targets)
        from metaql.storage.inputs import batch_size
        n = len(targets) if targets is not None else batch_size(inputs)
        if not isinstance(out, torch.Tensor) or out.dim() != 1 or out.shape[0] != n:
            raise InvalidInputException(f"the loss '{self.opts['loss']}' must return one loss per sample "
                                        f"(a tensor of shape ({n},)), got "
                                        f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out


def resolve_loss(name: str):
    """The plain function an importable loss names (the same safe walk as a model factory)."""
    try:
        fn = model_files._resolve(name)
    except BinderException as e:
        raise BinderException(str(e).replace("cannot rebuild the model: factory", "cannot load the loss")) from None
    if not isinstance(fn, types.FunctionType):
        raise BinderException(f"the loss '{name}' is a {type(fn).__name__}, not a plain function: write "
                              "fn(output, target) -> per-sample losses")
    return fn


def task_spec(task) -> tuple[dict, set[str]]:
    """(the JSON spec, the loss code the user named and so trusts) of a task as capture takes it:
    None, a task name, a spec dict, a Task, 'pkg.mod:fn' or an importable function."""
    if task is None:
        return {"task": "classification"}, set()
    if isinstance(task, Task):
        return task.spec(), {task.opts["loss"]} if isinstance(task, Custom) else set()
    if isinstance(task, types.FunctionType):
        name = f"{task.__module__}:{task.__qualname__}"
        try:
            same = resolve_loss(name) is task
        except BinderException:
            same = False
        if not same:
            raise InvalidInputException(f"the loss function {name} is not importable by that name (defined in a "
                                        "script or a function body): move it into a module, then pass it or "
                                        "'package.module:function'")
        task = name
    given = task
    if isinstance(task, str):
        task = {"task": "custom", "loss": task} if ":" in task else {"task": task}
    if not isinstance(task, dict) or task.get("task") not in TASKS:
        raise InvalidInputException(f"unknown task '{model_files._show(given)}'; use one of {', '.join(TASKS)}, a "
                                    "spec dict such as {'task': 'regression', 'target': 'y'}, or 'pkg.mod:loss_fn'")
    trusted = {task["loss"]} if task["task"] == "custom" and isinstance(task.get("loss"), str) else set()
    spec = make_task(task, trusted).spec()
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        raise InvalidInputException(f"the task spec {model_files._show(spec)} must be plain JSON data "
                                    "(strings, numbers, lists): it is recorded in the catalog") from None
    return spec, trusted


def make_task(spec: dict, trusted=frozenset()) -> Task:
    options = {k: v for k, v in spec.items() if k != "task"}
    cls = TASKS[spec["task"]]
    return cls(trusted=trusted, **options) if cls is Custom else cls(**options)


def spec_text(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def parse_task(text, trusted=frozenset()) -> Task:
    """The task a catalog's models.loss records; junk means the store was tampered with."""
    if text is None or text == LEGACY_CLASSIFICATION:
        return Classification()
    try:
        spec = json.loads(text) if isinstance(text, str) and len(text) < 4096 else None
        if not isinstance(spec, dict) or spec.get("task") not in TASKS:
            raise ValueError
        return make_task(spec, trusted)
    except (ValueError, TypeError, InvalidInputException):
        raise IOException(f"the catalog's model task {model_files._show(text)} is not a task spec MetaQL "
                          "knows: the store was tampered with or damaged") from None


def task_at(store, checkpoint: str) -> Task:
    """The task recorded with the model of a checkpoint."""
    c = store.checkpoint(checkpoint)
    row = store.db.execute("SELECT loss FROM models WHERE model_id = ?", [c["model_id"]]).fetchone()
    trusted = set(store.trusted_factories) | set(model_files.DEFAULT_TRUSTED)
    return parse_task(None if row is None else row[0], trusted)
