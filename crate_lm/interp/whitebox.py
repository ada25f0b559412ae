"""White-box read-outs: does each layer compress and sparsify, as the objective says it should?

Per layer l, on held-out token sequences (formulas from CRATE.md, eps^2 = 0.01):

* coding rate of the tokens entering the layer's MSSA, Z = LN1(Z^l) (N tokens x d, each token
  l2-normalised):  R(Z) = 1/2 logdet(I + d / (N eps^2) Z^T Z);
* compression term against the layer's own subspaces, from Q_k = LN1(Z^l) U_k (each token's
  per-head vector l2-normalised):  R^c(Z | U_[K]) = sum_k 1/2 logdet(I + p / (N eps^2) Q_k^T Q_k);
* sparsity of the ISTA code A (B, T, m): fraction of zeros, and mean L0 (nonzeros per token);
* the LASSO objective the ISTA step descends, per token, f(A) = 1/2 ||Y - D A||^2 + lambda ||A||_1
  with Y = LN2(Z'), before the step (A_0: 0 for 'overcomplete'/'alpha', Y for 'crate') and after
  it (the code A).

R and R^c are computed per sequence (N = its tokens) and reported as mean and std over
sequences, as the reference measurement does. For the GPT baseline the measures that apply are
reported: R(Z) per layer and the sparsity of the MLP's hidden neurons (GELU output <= 0 counts
as inactive). A trained CRATE should show R^c falling and sparsity rising against the same
model at initialisation; the tool reports what it measures either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from crate_lm.fsutil import atomic_savefig

EPS2 = 0.01


def coding_rate(z: Tensor, eps2: float = EPS2) -> float:
    """R(Z) = 1/2 logdet(I + d / (N eps^2) Z^T Z) for Z of N rows and d columns (float64;
    the smaller of Z^T Z and Z Z^T is used: their logdets agree by Sylvester's identity)."""
    n, d = z.shape
    z = z.double()
    gram = z.T @ z if d <= n else z @ z.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return 0.5 * torch.linalg.slogdet(eye + (d / (n * eps2)) * gram)[1].item()


def compression_term(q: Tensor, eps2: float = EPS2) -> float:
    """R^c = sum_k 1/2 logdet(I + p / (N eps^2) Q_k^T Q_k) for Q of shape (K, N, p)."""
    return sum(coding_rate(q_k, eps2) for q_k in q)


def lasso_objective(y: Tensor, a: Tensor, dictionary: Tensor, lam: float) -> Tensor:
    """Per-token 1/2 ||y - D a||^2 + lambda ||a||_1 (rows are tokens, D is d x m)."""
    residual = y - a @ dictionary.t()
    return 0.5 * residual.pow(2).sum(-1) + lam * a.abs().sum(-1)


def unit_rows(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.double(), dim=-1)


@dataclass
class LayerReadout:
    layer: int
    coding_rate: list[float] = field(default_factory=list)
    compression: list[float] = field(default_factory=list)
    zeros: float = 0.0  # count of zero code entries
    entries: float = 0.0
    tokens: int = 0
    lasso_before: float = 0.0
    lasso_after: float = 0.0

    def summary(self) -> dict:
        def stats(values: list[float]) -> tuple[float | None, float | None]:
            if not values:
                return None, None
            mean = sum(values) / len(values)
            return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

        r_mean, r_std = stats(self.coding_rate)
        rc_mean, rc_std = stats(self.compression)
        out = {"layer": self.layer, "coding_rate": r_mean, "coding_rate_std": r_std}
        if self.compression:
            out |= {"compression": rc_mean, "compression_std": rc_std}
        if self.entries:
            width = self.entries / max(self.tokens, 1)
            out |= {"zero_fraction": self.zeros / self.entries, "mean_l0": width * (1 - self.zeros / self.entries)}
        if self.lasso_after:
            out |= {"lasso_before": self.lasso_before / self.tokens, "lasso_after": self.lasso_after / self.tokens}
        return out


@torch.no_grad()
def measure(model, batches, eps2: float = EPS2) -> list[dict]:
    """Per-layer read-outs of ``model`` over ``batches`` of (input_ids, attention_mask or None)."""
    cfg = model.config
    crate = cfg.arch == "crate"
    names = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]
    if crate:
        names += [f"blocks.{i}.attn.hook_q" for i in range(cfg.n_layers)]
        names += [f"blocks.{i}.hook_resid_mid" for i in range(cfg.n_layers)]
        names += [f"blocks.{i}.ista.hook_code" for i in range(cfg.n_layers)]
    else:
        names += [f"blocks.{i}.mlp.hook_post" for i in range(cfg.n_layers)]
    layers = [LayerReadout(i) for i in range(cfg.n_layers)]
    for ids, mask in batches:
        _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
        keep = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        for i, block in enumerate(model.blocks):
            out = layers[i]
            ln1 = block.attn.ln
            z = ln1(cache[f"blocks.{i}.hook_resid_pre"])
            for b in range(ids.shape[0]):
                rows = keep[b]
                out.coding_rate.append(coding_rate(unit_rows(z[b][rows]), eps2))
                if crate:
                    q = cache[f"blocks.{i}.attn.hook_q"][b][:, rows]  # (K, N, p)
                    out.compression.append(compression_term(unit_rows(q), eps2))
            if crate:
                code = cache[f"blocks.{i}.ista.hook_code"][keep].float()  # (N, m)
                y = block.ista.ln(cache[f"blocks.{i}.hook_resid_mid"])[keep].float()
                start = y if cfg.ista == "crate" else torch.zeros_like(code)
                dictionary = block.ista.dict.float()
                out.lasso_before += lasso_objective(y, start, dictionary, cfg.ista_lambda).sum().item()
                out.lasso_after += lasso_objective(y, code, dictionary, cfg.ista_lambda).sum().item()
                active = code != 0
            else:
                active = cache[f"blocks.{i}.mlp.hook_post"][keep] > 0
            out.zeros += (~active).sum().item()
            out.entries += active.numel()
            out.tokens += int(keep.sum())
    return [layer.summary() for layer in layers]


def heldout_batches(loaded, data: str | None, tokens: int, batch_size: int = 8, seq_len: int | None = None):
    """Batches of held-out sequences, chosen as ``crate-lm extract`` chooses them: the validation
    split of prepared shards (default: the run's own data), or a text file's lines packed into
    sequences."""
    from crate_lm.interp.extract import open_sequences

    cfg = loaded.cfg
    seq = min(seq_len or cfg.data.seq_len or cfg.model.max_seq_len, cfg.model.max_seq_len)
    device = next(loaded.model.parameters()).device
    rows = [torch.from_numpy(ids) for _, ids, _, _ in open_sequences(loaded, data, "validation", seq, tokens).iter()]
    for start in range(0, len(rows), batch_size):
        yield torch.stack(rows[start : start + batch_size]).to(device=device, dtype=torch.long), None


def initial_model(loaded):
    """The same architecture at initialisation, with the run's seed (as the trainer builds it)."""
    from crate_lm.model import build_model

    torch.manual_seed(loaded.cfg.train.seed)
    model = build_model(loaded.cfg.model)
    params = next(loaded.model.parameters())
    return model.to(device=params.device, dtype=params.dtype).eval()


def plot(report: dict, out_png: Path) -> None:
    """One panel per measure, layers on the x axis, trained vs initialisation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [
        ("coding_rate", "R(Z): coding rate"),
        ("compression", "R^c(Z | U): compression term"),
        ("zero_fraction", "fraction of zeros in the code"),
        ("lasso_after", "LASSO objective after ISTA"),
    ]
    measures = [(k, t) for k, t in measures if any(k in row for row in report["trained"])]
    fig, axes = plt.subplots(1, len(measures), figsize=(4 * len(measures), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], measures):
        for label, rows, style in (("trained", report["trained"], "o-"), ("init", report.get("init"), "s--")):
            if rows:
                xs = [r["layer"] for r in rows if r.get(key) is not None]
                ys = [r[key] for r in rows if r.get(key) is not None]
                ax.plot(xs, ys, style, label=label)
                std = key + "_std"
                if rows and std in rows[0]:
                    lo = [r[key] - r[std] for r in rows]
                    hi = [r[key] + r[std] for r in rows]
                    ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks([r["layer"] for r in report["trained"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(report["title"], fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=110)


def whitebox(
    run: str,
    data: str | None = None,
    tokens: int = 20_000,
    compare_init: bool = False,
    out: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict:
    """Measure every layer of a trained model (and, with ``compare_init``, of the same model at
    initialisation); write ``whitebox.json`` and ``whitebox.png`` to ``out`` (default
    ``<checkpoint>/whitebox``). Returns the report."""
    from crate_lm.checkpoint import load
    from crate_lm.errors import CrateLMError

    if tokens < 1:
        raise CrateLMError(f"--tokens must be >= 1, got {tokens}")
    loaded = load(run, device=device)
    batches = list(heldout_batches(loaded, data, tokens, batch_size))
    measured = sum(int(ids.numel()) for ids, _ in batches)
    cfg = loaded.cfg.model
    report = {
        "checkpoint": str(loaded.path),
        "title": f"{cfg.arch} {cfg.ista if cfg.arch == 'crate' else ''} d{cfg.d_model} L{cfg.n_layers} K{cfg.n_heads}: "
        f"{measured:,} held-out tokens",
        "eps2": EPS2,
        "tokens": measured,
        "trained": measure(loaded.model, batches),
    }
    if compare_init:
        report["init"] = measure(initial_model(loaded), batches)
    folder = Path(out) if out else Path(loaded.path) / "whitebox"
    folder.mkdir(parents=True, exist_ok=True)
    from crate_lm.fsutil import atomic_write_json

    report["out"] = str(folder)
    atomic_write_json(folder / "whitebox.json", report)
    plot(report, folder / "whitebox.png")
    return report
