"""Eliciting latent knowledge (Burns et al. 2022): is truth linearly readable from the residual stream?

``crate-lm elk RUN --data statements.jsonl [--out DIR]``. Definitions (``x`` a hidden state):

* **Contrast pair**: a statement rendered through a template into two texts that differ only in
  the answer, ``x+`` (``"{statement} Is this true? yes"``) and ``x-`` (``"... no"``). Templates
  are strings with ``{statement}`` and one ``{affirmative|negative}`` alternation
  (``DEFAULT_TEMPLATES``). The data (:func:`load_statements`) is JSONL: ``{"text", "label"}``
  statements (optional ``"group"``: statements of one group, e.g. the true and false variant of
  one fact, always share a split) rendered through every template, or explicit
  ``{"positive", "negative", "label"}`` pairs (optional ``"template"``, ``"group"``).
* **Hidden states** (:func:`hidden_states`): ``hook_embed`` (layer ``embed``) and
  ``blocks.{i}.hook_resid_post`` (layer ``i``) of both halves, at the last token (``token="last"``)
  or averaged from the statement's first token to the end (``token="mean"``: in a causal model
  the tokens before the answer are identical in both halves, so the average must reach it). Each
  text starts with the end-of-document token, the model's document start. Cached in the output
  folder as ``hidden_<key>.safetensors``, ``key`` a hash of the checkpoint, the texts and these
  settings.
* **Normalisation** (:func:`normalize`), per template and per half, over all pairs (no labels):
  ``x <- (x - mean) / s`` with ``s = sqrt(mean ||x - mean||^2 / d)``, so each half of each
  template has mean 0 and mean squared norm d (average per-dimension variance 1). This removes
  what the answer token alone adds (the "yes"/"no" direction) and puts templates on one scale.
* **CCS** (:func:`fit_ccs`): ``p(x) = sigmoid(w.x + b)``, loss
  ``L = mean((p(x+) - (1 - p(x-)))^2) + mean(min(p(x+), p(x-))^2)`` (consistency + confidence),
  ``restarts`` random starts (Adam, full batch), the lowest loss kept; score
  ``0.5 (p(x+) + 1 - p(x-))``, prediction score > 0.5. CCS has no sign: its accuracy is
  ``max(acc, 1 - acc)``; the sign that gives it, chosen on the whole test set, is kept for the
  AUROC (which can then fall below 0.5) and for the bootstrap.
* **Baselines** on ``x+ - x-`` (normalised): logistic regression (sklearn, L2, C=1) and the
  mass-mean probe (score ``(x+ - x-) . (mu_1 - mu_0)``, threshold at the midpoint of the class
  means' projections). **LEACE** (``concept_erasure.LeaceEraser``, fitted on the training pairs)
  erases the label from ``x+ - x-``; logistic regression is refitted on what is left (``lr_leace``,
  which should sit at chance). Fitted on the same training pairs as LEACE it is chance by
  construction: LEACE zeroes the features' cross-covariance with the label, which is the logistic
  loss's gradient at w = 0, so w = 0 is the optimum; the row checks the erasure, not the model.
* **Metrics**: accuracy and AUROC on the test split (statements split by group, never by template:
  all templates of a statement sit on one side), with 95% bootstrap intervals (``BOOTSTRAP``
  resamples of the test pairs, seeded); the template transfer matrix (fit on template i's training
  pairs, AUROC on template j's test pairs) for LR and CCS.
* **Behaviour** (:func:`behavioural_accuracy`): does the model's own output know the answer? For
  every group with one true and some false statements (e.g. "A lives in X." / "A lives in Y."),
  split each at their longest common word prefix ("A lives in") and compare
  ``log p(true value | prefix)`` with ``log p(false value | prefix)``, each summed over the
  value's tokens (a shared punctuation ending is left out). Accuracy = share where the true value
  is more likely. Below ``BEHAVIOUR_MIN`` (0.9) the probes have little to find: a warning says so.

Writes ``elk.json`` (keys in :func:`elk`'s docstring) and ``elk.png`` (AUROC per layer with its
interval band, one line per method) to ``out`` (default ``<checkpoint>/elk``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_savefig

FORMAT = "crate_lm.elk.v1"
DEFAULT_TEMPLATES = (
    "{statement} Is this true? {yes|no}",
    "True or false: {statement} Answer: {True|False}",
    "{statement} This statement is {correct|wrong}.",
)
"""Built-in templates: ``{statement}`` and one ``{affirmative|negative}`` alternation each."""
METHODS = ("lr", "mass_mean", "ccs", "lr_leace")
TRANSFER_METHODS = ("lr", "ccs")
TOKENS = ("last", "mean")
BOOTSTRAP = 1000
BEHAVIOUR_MIN = 0.9
_ALTERNATION = re.compile(r"\{([^{}|]*)\|([^{}|]*)\}")


class ElkError(CrateLMError):
    """ELK cannot run as asked; the message says why and what to do."""


# ---- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One contrast pair: ``positive``/``negative`` texts, the statement's truth ``label``, its
    ``template`` name, its ``group`` (the split unit) and where the statement starts in each text."""

    positive: str
    negative: str
    label: int
    template: str
    group: str
    start_pos: int = 0
    start_neg: int = 0


@dataclass(frozen=True)
class Template:
    """A parsed template: ``text`` with ``{statement}``, and the two answers of its alternation."""

    text: str
    affirmative: str
    negative: str

    def render(self, statement: str, answer: str) -> tuple[str, int]:
        """The text with ``answer`` in the alternation, and the character where the statement starts."""
        m = _ALTERNATION.search(self.text)
        filled = self.text[: m.start()] + answer.replace("{", "{{").replace("}", "}}") + self.text[m.end() :]
        start = filled.index("{statement}")
        return filled.replace("{statement}", statement, 1), start


def parse_template(text: str) -> Template:
    """``"{statement} Is this true? {yes|no}"`` -> Template; a one-line error says what is missing."""
    if not isinstance(text, str) or text.count("{statement}") != 1:
        raise ElkError(f"template {text!r} must contain {{statement}} exactly once")
    found = _ALTERNATION.findall(text)
    if len(found) != 1 or found[0][0] == found[0][1]:
        raise ElkError(f"template {text!r} needs exactly one {{affirmative|negative}} alternation, e.g. {{yes|no}}")
    return Template(text, found[0][0], found[0][1])


def resolve_templates(templates: str | Sequence[str] | None) -> list[Template]:
    """None: ``DEFAULT_TEMPLATES``; a list of template strings; or a path to a text file with one
    template a line (blank lines and ``#`` comments skipped)."""
    if templates is None:
        texts = list(DEFAULT_TEMPLATES)
    elif isinstance(templates, str):
        path = Path(templates).expanduser()
        if not path.is_file():
            raise ElkError(f"--templates {templates}: no such file; give a text file with one template a line")
        texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip() and not t.startswith("#")]
    else:
        texts = list(templates)
    if not texts:
        raise ElkError("no templates given; each looks like '{statement} Is this true? {yes|no}'")
    parsed = [parse_template(t) for t in texts]
    if len({t.text for t in parsed}) != len(parsed):
        raise ElkError("the templates repeat one another; give each once")
    return parsed


def _label(value: Any, where: str) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise ElkError(f"{where}: 'label' must be 0 or 1, got {value!r}")
    return int(value)


def load_statements(path: str | Path, templates: Sequence[Template]) -> tuple[list[Pair], list[dict]]:
    """Contrast pairs from a JSONL file, and the plain statements (``{"text", "label", "group"}``)
    for :func:`behavioural_accuracy`. A line is a statement ``{"text", "label"[, "group"]}``,
    rendered through every template (template names ``t0``, ``t1``, ...), or an explicit pair
    ``{"positive", "negative", "label"[, "template", "group"]}``. Group defaults to the statement's
    text (explicit pairs: the positive text), so a statement's templates always share a split."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ElkError(f"--data {path}: no such file; give a JSONL file of statements")
    pairs: list[Pair] = []
    statements: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ElkError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ElkError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "label" not in row:
                raise ElkError(f"{where}: no 'label' (0 or 1)")
            label = _label(row["label"], where)
            group = row.get("group")
            if group is not None and not isinstance(group, (str, int)):
                raise ElkError(f"{where}: 'group' must be a string or a number, got {type(group).__name__}")
            if "text" in row:
                text = row["text"]
                if not isinstance(text, str) or not text.strip():
                    raise ElkError(f"{where}: 'text' must be a non-empty string")
                group = str(group) if group is not None else text
                statements.append({"text": text, "label": label, "group": group})
                for i, tpl in enumerate(templates):
                    pos, start_pos = tpl.render(text, tpl.affirmative)
                    neg, start_neg = tpl.render(text, tpl.negative)
                    pairs.append(Pair(pos, neg, label, f"t{i}", group, start_pos, start_neg))
            elif "positive" in row and "negative" in row:
                pos, neg = row["positive"], row["negative"]
                if not all(isinstance(t, str) and t.strip() for t in (pos, neg)):
                    raise ElkError(f"{where}: 'positive' and 'negative' must be non-empty strings")
                template = row.get("template", "custom")
                if not isinstance(template, (str, int)):
                    raise ElkError(f"{where}: 'template' must be a name, got {type(template).__name__}")
                pairs.append(Pair(pos, neg, label, str(template), str(group) if group is not None else pos))
            else:
                raise ElkError(f"{where}: expected {{\"text\", \"label\"}} or {{\"positive\", \"negative\", \"label\"}}, "
                               f"got keys {', '.join(sorted(row)) or 'none'}")  # fmt: skip
    if not pairs:
        raise ElkError(f"--data {path}: no statements in it")
    return pairs, statements


def split_by_group(groups: Sequence[str], test_fraction: float = 0.4, seed: int = 0) -> np.ndarray:
    """Boolean test mask: a seeded random ``test_fraction`` of the distinct groups (at least one,
    at most all but one) and every pair of them; a group never sits on both sides."""
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise ElkError("the data has fewer than 2 statements (groups); a train/test split needs more")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
    test = {unique[i] for i in order[:n_test]}
    return np.array([g in test for g in groups], dtype=bool)


# ---- metrics ----------------------------------------------------------------------------------------


def auroc(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under the ROC curve (Mann-Whitney, ties counted half) of ``scores`` (..., n) against
    binary ``y`` (..., n); NaN where a row has one class only."""
    from scipy.stats import rankdata

    scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=bool)
    ranks = rankdata(scores, axis=-1)
    n_pos = y.sum(-1)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((ranks * y).sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def accuracy(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.asarray(pred, dtype=bool) == np.asarray(y, dtype=bool)).mean(-1)


def bootstrap_ci(scores: np.ndarray, pred: np.ndarray, y: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Accuracy and AUROC of a test set with 95% percentile intervals over ``n`` resamples (with
    replacement, seeded) of its items: {accuracy, accuracy_ci, auroc, auroc_ci}."""
    scores, pred, y = np.asarray(scores, dtype=np.float64), np.asarray(pred, dtype=bool), np.asarray(y, dtype=bool)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n, len(y)))
    accs = accuracy(pred[idx], y[idx])
    aucs = auroc(scores[idx], y[idx])
    aucs = aucs[np.isfinite(aucs)]
    return {
        "accuracy": float(accuracy(pred, y)),
        "accuracy_ci": [float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))],
        "auroc": _num(float(auroc(scores, y))),
        "auroc_ci": [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))] if len(aucs) else [None, None],
    }


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else x


# ---- probes ------------------------------------------------------------------------------------------


def normalize(x: np.ndarray, templates: Sequence[str]) -> np.ndarray:
    """Per template: subtract the mean over that template's rows, divide by
    ``sqrt(mean ||x - mean||^2 / d)`` (so the rows' mean squared norm is d). Call it on each half."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    names = np.asarray(templates)
    for name in dict.fromkeys(templates):
        rows = names == name
        centred = x[rows] - x[rows].mean(0)
        scale = math.sqrt(float((centred**2).sum(-1).mean()) / x.shape[1])
        out[rows] = centred / (scale if scale > 0 else 1.0)
    return out


def ccs_loss(p_pos: torch.Tensor, p_neg: torch.Tensor) -> torch.Tensor:
    """``mean((p+ - (1 - p-))^2) + mean(min(p+, p-)^2)`` over the last dimension."""
    consistency = (p_pos - (1 - p_neg)).pow(2).mean(-1)
    confidence = torch.minimum(p_pos, p_neg).pow(2).mean(-1)
    return consistency + confidence


@dataclass
class CCSProbe:
    """A fitted CCS probe: ``w`` (d,), ``b``, its training ``loss``; ``score`` = 0.5 (p+ + 1 - p-)."""

    w: np.ndarray
    b: float
    loss: float

    def score(self, x_pos: np.ndarray, x_neg: np.ndarray) -> np.ndarray:
        p_pos = 1 / (1 + np.exp(-(x_pos @ self.w + self.b)))
        p_neg = 1 / (1 + np.exp(-(x_neg @ self.w + self.b)))
        return 0.5 * (p_pos + 1 - p_neg)


def fit_ccs(x_pos: np.ndarray, x_neg: np.ndarray, restarts: int = 10, epochs: int = 1000, lr: float = 1e-2,
            weight_decay: float = 1e-2, seed: int = 0) -> CCSProbe:  # fmt: skip
    """CCS on normalised halves (n, d): ``restarts`` probes trained at once from random unit-norm
    starts, full batch Adam; the one with the lowest final loss."""
    gen = torch.Generator().manual_seed(seed)
    xp = torch.as_tensor(np.asarray(x_pos), dtype=torch.float32)
    xn = torch.as_tensor(np.asarray(x_neg), dtype=torch.float32)
    d = xp.shape[1]
    w0 = torch.randn(restarts, d, generator=gen)
    w = (w0 / w0.norm(dim=1, keepdim=True)).requires_grad_(True)
    b = torch.zeros(restarts, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = ccs_loss(torch.sigmoid(w @ xp.T + b[:, None]), torch.sigmoid(w @ xn.T + b[:, None]))
            loss.sum().backward()
            opt.step()
    with torch.no_grad():
        loss = ccs_loss(torch.sigmoid(w @ xp.T + b[:, None]), torch.sigmoid(w @ xn.T + b[:, None]))
    best = int(loss.argmin())
    return CCSProbe(w[best].detach().double().numpy(), float(b.detach()[best]), float(loss[best]))


def fit_lr(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Any:
    """L2 logistic regression (C = 1) on features ``x`` (n, d)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x, y)


def mass_mean(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Direction ``mu_1 - mu_0`` of the class means and the threshold at the midpoint of their projections."""
    y = np.asarray(y, dtype=bool)
    mu1, mu0 = x[y].mean(0), x[~y].mean(0)
    direction = mu1 - mu0
    return direction, float((mu1 + mu0) @ direction / 2)


def leace_erase(x_train: np.ndarray, y_train: np.ndarray, *xs: np.ndarray) -> list[np.ndarray]:
    """Fit LEACE on (``x_train``, ``y_train``) and erase the label from ``x_train`` and every ``xs``."""
    from concept_erasure import LeaceEraser

    eraser = LeaceEraser.fit(torch.as_tensor(x_train, dtype=torch.float64), torch.as_tensor(y_train, dtype=torch.int64))
    return [eraser(torch.as_tensor(x, dtype=torch.float64)).numpy() for x in (x_train, *xs)]


def _signed(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CCS's scores and predictions with the sign that makes its test accuracy >= 0.5."""
    pred = scores > 0.5
    if accuracy(pred, y) < 0.5:
        return 1 - scores, ~pred
    return scores, pred


def probe_layer(x_pos: np.ndarray, x_neg: np.ndarray, y: np.ndarray, templates: np.ndarray, test: np.ndarray,
                restarts: int = 10, seed: int = 0, n_boot: int = BOOTSTRAP, ccs_epochs: int = 1000) -> dict:  # fmt: skip
    """All methods on one layer's normalised halves: per method the test metrics with intervals
    (:func:`bootstrap_ci`), the CCS loss, and the template transfer matrices (AUROC)."""
    y = np.asarray(y, dtype=bool)
    diff = x_pos - x_neg
    tr, te = ~test, test
    results: dict[str, dict] = {}
    lr = fit_lr(diff[tr], y[tr], seed)
    s = lr.decision_function(diff[te])
    results["lr"] = bootstrap_ci(s, s > 0, y[te], n_boot, seed)
    direction, threshold = mass_mean(diff[tr], y[tr])
    s = diff[te] @ direction
    results["mass_mean"] = bootstrap_ci(s, s > threshold, y[te], n_boot, seed)
    ccs = fit_ccs(x_pos[tr], x_neg[tr], restarts=restarts, epochs=ccs_epochs, seed=seed)
    s, pred = _signed(ccs.score(x_pos[te], x_neg[te]), y[te])
    results["ccs"] = bootstrap_ci(s, pred, y[te], n_boot, seed)
    erased_tr, erased_te = leace_erase(diff[tr], y[tr], diff[te])
    s = fit_lr(erased_tr, y[tr], seed).decision_function(erased_te)
    results["lr_leace"] = bootstrap_ci(s, s > 0, y[te], n_boot, seed)
    names = list(dict.fromkeys(templates.tolist()))
    transfer = {m: [[None] * len(names) for _ in names] for m in TRANSFER_METHODS}
    for i, a in enumerate(names):
        fit_rows = tr & (templates == a)
        if len(set(y[fit_rows].tolist())) < 2:
            continue
        lr_a = fit_lr(diff[fit_rows], y[fit_rows], seed)
        ccs_a = fit_ccs(x_pos[fit_rows], x_neg[fit_rows], restarts=restarts, epochs=ccs_epochs, seed=seed)
        for j, b in enumerate(names):
            rows = te & (templates == b)
            if len(set(y[rows].tolist())) < 2:
                continue
            transfer["lr"][i][j] = _num(float(auroc(lr_a.decision_function(diff[rows]), y[rows])))
            a_ccs = float(auroc(ccs_a.score(x_pos[rows], x_neg[rows]), y[rows]))
            transfer["ccs"][i][j] = _num(max(a_ccs, 1 - a_ccs))
    return {"methods": results, "ccs_loss": ccs.loss, "transfer": transfer}


# ---- the model's side ------------------------------------------------------------------------------


def layer_hooks(n_layers: int) -> dict[str, str]:
    """Layer name -> hook point: ``embed`` -> hook_embed, ``i`` -> blocks.i.hook_resid_post."""
    return {"embed": "hook_embed", **{str(i): f"blocks.{i}.hook_resid_post" for i in range(n_layers)}}


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _encode_batch(loaded: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, each text after the end-of-document token."""
    ids, mask = loaded.to_tokens(texts, prepend_eod=True, return_mask=True)
    if ids.dim() == 1:
        ids, mask = ids[None], mask[None]
    return ids, mask.bool()


def hidden_states(loaded: Any, texts: Sequence[str], starts: Sequence[int], token: str = "last",
                  batch_size: int = 32, progress: Any = None) -> np.ndarray:  # fmt: skip
    """(n, layers, d) float32: every layer (:func:`layer_hooks`) at the last token of each text,
    or (``token="mean"``) averaged from the token holding character ``starts[k]`` to the end."""
    model = loaded.model
    hooks = layer_hooks(loaded.cfg.model.n_layers)
    context = loaded.cfg.model.max_seq_len
    out = []
    with torch.inference_mode():
        for rows in _batches(len(texts), batch_size):
            batch = [texts[k] for k in rows]
            ids, mask = _encode_batch(loaded, batch)
            if ids.shape[1] > context:
                raise ElkError(f"a text is {ids.shape[1]} tokens, longer than the model's context ({context}); "
                               "shorten the statements or templates")  # fmt: skip
            _, cache = model.run_with_cache(ids, names_filter=list(hooks.values()), attention_mask=mask)
            acts = torch.stack([cache[h] for h in hooks.values()], dim=1).float()  # (B, L, T, d)
            lengths = mask.sum(1)
            if token == "last":
                picked = acts[torch.arange(len(batch)), :, lengths - 1]
            else:
                first = torch.tensor([1 + len(loaded.tokenizer.encode(t[:s])) if s > 0 else 1
                                      for t, s in zip(batch, (starts[k] for k in rows))])  # fmt: skip
                pos = torch.arange(ids.shape[1])
                keep = (pos[None] >= first[:, None]) & mask
                picked = (acts * keep[:, None, :, None]).sum(2) / keep.sum(1).clamp(min=1)[:, None, None]
            out.append(picked.cpu().numpy())
            if progress is not None:
                progress.update(len(batch))
    return np.concatenate(out).astype(np.float32)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_value(true: str, false: str) -> tuple[str, str, str] | None:
    """("A lives in", " X", " Y") from "A lives in X." and "A lives in Y.": the common prefix cut
    back to a word boundary, then each value without a shared punctuation/space ending."""
    cut = true.rfind(" ", 0, _common_prefix(true, false))
    if cut <= 0:
        return None
    prefix = true[:cut]
    rest_t, rest_f = true[len(prefix) :], false[len(prefix) :]
    m = _common_prefix(rest_t[::-1], rest_f[::-1])
    tail = rest_t[len(rest_t) - m :] if m else ""
    cut = next((i for i, c in enumerate(tail) if not c.isalnum()), len(tail))
    shared = len(tail) - cut
    value_t, value_f = rest_t[: len(rest_t) - shared], rest_f[: len(rest_f) - shared]
    if not value_t.strip() or not value_f.strip() or value_t == value_f:
        return None
    return prefix, value_t, value_f


def _value_logprob(loaded: Any, items: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
    """log p(value | prefix) summed over the value's tokens, for each (prefix, value)."""
    tok = loaded.tokenizer
    rows = []
    for prefix, value in items:
        head = [tok.eod_id, *tok.encode(prefix)]
        full = [tok.eod_id, *tok.encode(prefix + value)]
        rows.append((full, max(_common_prefix_ids(head, full), 1)))
    out = []
    with torch.inference_mode():
        for chunk in _batches(len(rows), batch_size):
            seqs = [rows[i] for i in chunk]
            width = max(len(s) for s, _ in seqs)
            ids = torch.full((len(seqs), width), tok.specials.get("pad", 0) or 0, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.bool)
            for r, (s, _) in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = True
            device = next(loaded.model.parameters()).device
            logits = loaded.model(ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, (s, k) in enumerate(seqs):
                targets = torch.tensor(s[k:])
                out.append(float(logp[r, k - 1 : len(s) - 1].gather(-1, targets[:, None]).sum()))
    return out


def _common_prefix_ids(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def behavioural_accuracy(loaded: Any, statements: Sequence[dict], batch_size: int = 32, seed: int = 0,
                         n_boot: int = BOOTSTRAP) -> dict | None:  # fmt: skip
    """Share of (true, false) statement pairs of one group where the model finds the true value more
    likely after their common prefix (module docstring), with a 95% bootstrap interval; None when
    no group has a true and a false statement that differ in a value after a common prefix."""
    by_group: dict[str, list[dict]] = {}
    for s in statements:
        by_group.setdefault(s["group"], []).append(s)
    items = []
    for rows in by_group.values():
        trues = [r["text"] for r in rows if r["label"] == 1]
        if len(trues) != 1:
            continue
        for false in (r["text"] for r in rows if r["label"] == 0):
            split = split_value(trues[0], false)
            if split is not None:
                items.append(split)
    if not items:
        return None
    wins, margins, examples = [], [], []
    logps = _value_logprob(loaded, [(p, v) for p, t, f in items for v in (t, f)], batch_size)
    for k, (prefix, value_t, value_f) in enumerate(items):
        lp_t, lp_f = logps[2 * k], logps[2 * k + 1]
        wins.append(lp_t > lp_f)
        margins.append(lp_t - lp_f)
        if len(examples) < 5:
            examples.append(
                {"prefix": prefix, "true": value_t, "false": value_f, "logp_true": lp_t, "logp_false": lp_f}
            )
    wins_a = np.asarray(wins)
    idx = np.random.default_rng(seed).integers(0, len(wins_a), size=(n_boot, len(wins_a)))
    boots = wins_a[idx].mean(1)
    acc = float(wins_a.mean())
    return {"accuracy": acc, "accuracy_ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "facts": len(items), "mean_logp_margin": float(np.mean(margins)), "threshold": BEHAVIOUR_MIN,
            "ok": acc >= BEHAVIOUR_MIN, "examples": examples}  # fmt: skip


# ---- the command -----------------------------------------------------------------------------------


def _checkpoint_identity(folder: Path) -> list:
    """What names a checkpoint's weights for the cache key: file names, sizes and modification times."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pt", ".bin", ".yaml"))
    return [str(folder.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(checkpoint: Path, pairs: Sequence[Pair], settings: dict) -> str:
    """16 hex digits of a hash of the checkpoint, every pair's texts and the extraction settings."""
    h = hashlib.sha256()
    h.update(
        json.dumps({"checkpoint": _checkpoint_identity(checkpoint), "settings": settings}, sort_keys=True).encode()
    )
    for p in pairs:
        h.update(json.dumps([p.positive, p.negative, p.start_pos, p.start_neg]).encode())
    return h.hexdigest()[:16]


def _positive_int(value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ElkError(f"{flag} must be a whole number >= 1, got {value!r}")
    return value


def _check_split(y: np.ndarray, test: np.ndarray) -> None:
    for side, rows in (("training", ~test), ("test", test)):
        if len(set(y[rows].tolist())) < 2:
            raise ElkError(f"the {side} split has only one label; give more statements with both labels "
                           "(true and false) or change --test_fraction / --seed")  # fmt: skip


def elk(
    run: str,
    data: str,
    out: str | None = None,
    templates: str | Sequence[str] | None = None,
    token: str = "last",
    test_fraction: float = 0.4,
    restarts: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    device: str = "cpu",
    bootstrap: int = BOOTSTRAP,
    ccs_epochs: int = 1000,
    show_progress: bool = True,
    quiet: bool = False,
) -> dict:
    """ELK probes of every layer of ``run`` on the statements in ``data`` (module docstring); writes
    ``elk.json`` and ``elk.png`` to ``out`` (default ``<checkpoint>/elk``) and returns the report.

    ``elk.json`` keys (format ``crate_lm.elk.v1``): ``format``, ``run``, ``checkpoint``, ``data``,
    ``out``, ``templates`` (name -> template text; explicit pairs carry their own names), ``token``,
    ``test_fraction``, ``restarts``, ``bootstrap`` (resamples), ``ccs_epochs``, ``seed``, ``counts`` (statements, pairs, groups,
    train_pairs, test_pairs), ``behaviour`` (:func:`behavioural_accuracy`: accuracy, accuracy_ci,
    facts, mean_logp_margin, threshold, ok, examples; or None), ``layers`` (names, ``embed`` first),
    ``methods`` (``METHODS``), ``results`` (layer -> method -> accuracy, accuracy_ci, auroc,
    auroc_ci), ``ccs_loss`` (layer -> the kept probe's training loss), ``transfer`` (layer -> lr/ccs
    -> matrix of AUROC, rows the training template, columns the test template, in ``templates``
    order; null where a side has one label), ``cache`` (the hidden-state file), ``plot`` and
    ``line`` (the summary). Everything is checked before a file is written."""
    if token not in TOKENS:
        raise ElkError(f"--token must be one of {', '.join(TOKENS)}, got {token!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ElkError(f"--test_fraction must be between 0 and 1 (exclusive), e.g. 0.4, got {test_fraction!r}")
    restarts = _positive_int(restarts, "--restarts")
    batch_size = _positive_int(batch_size, "--batch_size")
    bootstrap = _positive_int(bootstrap, "--bootstrap")
    ccs_epochs = _positive_int(ccs_epochs, "--ccs_epochs")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ElkError(f"--seed must be an integer, got {seed!r}")
    if data is None:
        raise ElkError('--data is required: a JSONL file of {"text", "label"} statements or explicit pairs')
    parsed = resolve_templates(templates)
    pairs, statements = load_statements(data, parsed)
    y = np.array([p.label for p in pairs], dtype=bool)
    names = np.array([p.template for p in pairs])
    test = split_by_group([p.group for p in pairs], float(test_fraction), seed)
    _check_split(y, test)

    import crate_lm

    loaded = crate_lm.load(run, device=device)
    folder = Path(out) if out is not None else Path(loaded.path) / "elk"
    folder = folder.expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ElkError(f"--out {folder} is a file; choose a folder")
    settings = {"token": token, "prepend_eod": True, "hooks": layer_hooks(loaded.cfg.model.n_layers), "v": 1}
    key = cache_key(Path(loaded.path), pairs, settings)
    cache_file = folder / f"hidden_{key}.safetensors"
    from safetensors.numpy import load_file, save_file

    if cache_file.is_file():
        cached = load_file(str(cache_file))
        h_pos, h_neg = cached["positive"], cached["negative"]
    else:
        from tqdm import tqdm

        with tqdm(total=2 * len(pairs), desc="elk: hidden states", unit="text", disable=not show_progress,
                  file=sys.stderr) as bar:  # fmt: skip
            h_pos = hidden_states(loaded, [p.positive for p in pairs], [p.start_pos for p in pairs], token,
                                  batch_size, bar)  # fmt: skip
            h_neg = hidden_states(loaded, [p.negative for p in pairs], [p.start_neg for p in pairs], token,
                                  batch_size, bar)  # fmt: skip
    behaviour = behavioural_accuracy(loaded, statements, batch_size, seed, bootstrap) if statements else None
    if behaviour is not None and not behaviour["ok"] and not quiet:
        print(f"warning: the model's own behavioural accuracy on these facts is {behaviour['accuracy']:.3f} "
              f"(< {BEHAVIOUR_MIN}): it does not reliably know the answers, so the probes have little to find",
              file=sys.stderr, flush=True)  # fmt: skip

    layers = list(layer_hooks(loaded.cfg.model.n_layers))
    from tqdm import tqdm

    results, losses, transfer = {}, {}, {}
    for li, layer in enumerate(tqdm(layers, desc="elk: probes", unit="layer", disable=not show_progress,
                                    file=sys.stderr)):  # fmt: skip
        x_pos = normalize(h_pos[:, li], names.tolist())
        x_neg = normalize(h_neg[:, li], names.tolist())
        found = probe_layer(x_pos, x_neg, y, names, test, restarts=restarts, seed=seed, n_boot=bootstrap,
                            ccs_epochs=ccs_epochs)  # fmt: skip
        results[layer], losses[layer], transfer[layer] = found["methods"], found["ccs_loss"], found["transfer"]
    tpl_text = {f"t{i}": t.text for i, t in enumerate(parsed)}
    report = {
        "format": FORMAT,
        "run": str(run),
        "checkpoint": str(loaded.path),
        "data": str(Path(data).expanduser().absolute()),
        "out": str(folder),
        "templates": {n: tpl_text.get(n, n) for n in dict.fromkeys(names.tolist())},
        "token": token,
        "test_fraction": float(test_fraction),
        "restarts": restarts,
        "bootstrap": bootstrap,
        "ccs_epochs": ccs_epochs,
        "seed": seed,
        "counts": {
            "statements": len(statements),
            "pairs": len(pairs),
            "groups": len({p.group for p in pairs}),
            "train_pairs": int((~test).sum()),
            "test_pairs": int(test.sum()),
        },  # fmt: skip
        "behaviour": behaviour,
        "layers": layers,
        "methods": list(METHODS),
        "results": results,
        "ccs_loss": losses,
        "transfer": transfer,
        "cache": cache_file.name,
        "plot": "elk.png",
    }
    report["line"] = summary_line(report)
    from crate_lm.fsutil import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    if not cache_file.is_file():
        tmp = cache_file.with_name(f".{cache_file.name}.tmp")
        save_file({"positive": np.ascontiguousarray(h_pos), "negative": np.ascontiguousarray(h_neg)}, str(tmp))
        tmp.replace(cache_file)
    atomic_write_json(folder / "elk.json", report)
    plot(report, folder / "elk.png")
    if not quiet:
        print(report["line"], flush=True)
    return report


# ---- reporting --------------------------------------------------------------------------------------

LABELS = {"lr": "logistic regression", "mass_mean": "mass-mean", "ccs": "CCS", "lr_leace": "LR after LEACE"}


def summary_line(report: dict) -> str:
    """'elk: N pairs (S statements x T templates), behaviour 0.97; best AUROC lr L2 0.99 [..], ... -> DIR'."""
    c = report["counts"]
    beh = report["behaviour"]
    said = f"behaviour {beh['accuracy']:.3f} on {beh['facts']} facts" if beh else "behaviour n/a"
    best = []
    for m in METHODS:
        layer = max(report["layers"], key=lambda L: report["results"][L][m]["auroc"] or 0)
        r = report["results"][layer][m]
        lo, hi = r["auroc_ci"]
        best.append(f"{m} L{layer} {r['auroc']:.3f} [{lo:.2f}, {hi:.2f}]" if r["auroc"] is not None else f"{m} n/a")
    return (f"elk: {c['pairs']} pairs ({c['train_pairs']} train / {c['test_pairs']} test, {len(report['templates'])} "
            f"templates), {said}; best test AUROC: {', '.join(best)} -> {report['out']}")  # fmt: skip


def summary_table(report: dict) -> str:
    """Markdown: one row per layer, AUROC [95% interval] of every method."""
    rows = ["| layer | " + " | ".join(LABELS[m] for m in METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for layer in report["layers"]:
        cells = []
        for m in METHODS:
            r = report["results"][layer][m]
            lo, hi = r["auroc_ci"]
            cells.append(f"{r['auroc']:.3f} [{lo:.2f}, {hi:.2f}]" if r["auroc"] is not None else "-")
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(report: dict, out_png: Path) -> None:
    """Test AUROC per layer, one line per method with its 95% bootstrap band; chance at 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    xs = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, m in enumerate(METHODS):
        rows = [report["results"][L][m] for L in layers]
        ys = np.array([r["auroc"] if r["auroc"] is not None else np.nan for r in rows], dtype=float)
        lo = np.array([r["auroc_ci"][0] if r["auroc_ci"][0] is not None else np.nan for r in rows], dtype=float)
        hi = np.array([r["auroc_ci"][1] if r["auroc_ci"][1] is not None else np.nan for r in rows], dtype=float)
        color = plt.get_cmap("tab10")(i)
        ax.plot(xs, ys, marker="o", color=color, label=LABELS[m])
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xticks(xs)
    ax.set_xticklabels(layers)
    ax.set_ylim(0.3, 1.02)
    ax.set_xlabel("layer (residual stream after the block)")
    ax.set_ylabel("test AUROC (95% bootstrap band)")
    beh = report["behaviour"]
    said = f"; behavioural accuracy {beh['accuracy']:.2f}" if beh else ""
    ax.set_title(f"ELK: {Path(report['checkpoint']).parent.parent.name or report['run']}{said}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=110)


__all__ = [
    "BEHAVIOUR_MIN",
    "DEFAULT_TEMPLATES",
    "METHODS",
    "CCSProbe",
    "ElkError",
    "Pair",
    "Template",
    "accuracy",
    "auroc",
    "behavioural_accuracy",
    "bootstrap_ci",
    "cache_key",
    "ccs_loss",
    "elk",
    "fit_ccs",
    "fit_lr",
    "hidden_states",
    "leace_erase",
    "load_statements",
    "mass_mean",
    "normalize",
    "parse_template",
    "plot",
    "probe_layer",
    "resolve_templates",
    "split_by_group",
    "split_value",
    "summary_line",
    "summary_table",
]
