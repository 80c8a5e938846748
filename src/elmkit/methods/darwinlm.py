"""DarwinLM: evolutionary structured pruning (Tang, Sieberling, Kurtic, Shen, Alistarh, 2025,
arXiv 2502.07780), with the ZipLM-style one-shot and a uniform baseline at the same sparsity.

A. Database. Per layer, from the *dense* model's inputs (so every entry is independent of the
   levels other layers get), second-order structured pruning (ZipLM) of the input columns of
   o_proj (one group = the head_dim columns of a query head) and of down_proj (one group = one
   channel). With H = 2 X X^T / n over calibration tokens, damped by lambda * mean(diag H), the
   group S with the lowest

       score_S = tr( W[:, S] ([H^-1]_SS)^-1 W[:, S]^T )

   is removed and the other columns absorb it,

       W      <- W - W[:, S] ([H^-1]_SS)^-1 H^-1[S, :]
       H^-1   <- H^-1 - H^-1[:, S] ([H^-1]_SS)^-1 H^-1[S, :]

   so that the reconstruction error (1/n) ||W X - W' X||^2 grows by exactly score_S / 2 (for the
   damped H). Snapshots at a ladder of levels (level l removes round(l / (L - 1) * groups) groups)
   are stored compactly: the kept group indices and the updated kept columns.

B. Search. State: one level per o_proj and one per down_proj. Mutation ("level switch"): 1-3 flips
   (min of two draws), each lowering one module's level and raising another's of the same kind, so
   the level sum of each kind — the compression — is fixed. 16 offspring per generation go through
   stages of training-aware selection: each candidate is fine-tuned briefly (AdamW, CE) on a fresh
   training minibatch, then scored by the token-averaged KL(P_dense || P_candidate) on a fresh
   fitness minibatch; the best survive (8, 4, 2, 1), tokens grow per stage, and the parent joins the
   last stage (elitism).

C. Stitch: the database weights of the found levels, cut into a slim model (query heads whose
   o_proj columns are gone lose their q rows; a KV head whose query heads are all gone goes too;
   q/k/v and gate/up rows get no update, as in the paper); optional post-training.

Modes: ``search`` (DarwinLM), ``ziplm`` (the database at uniform levels: the search's start),
``uniform`` (the same per-layer widths, groups chosen by the diagonal score ||W[:, S]||^2 diag(H)_S
with no second-order update: our contrast for what the OBS update and the search each add).

The target ``ratio`` is a fraction of the non-embedding parameters; it becomes one level sum per
kind (K/V projections are not pruned, so the query/output/MLP groups carry it). Differences from the
official code, on purpose: fitness and fine-tuning use the calibration's target tokens (all tokens
for text); candidates are fine-tuned in batches of ``train_batch_size`` sequences.
"""

from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..io import atomic_write_text, read_json, write_json
from ..models.adapters import get_layers
from ..models.slim import LayerKeep, to_slim
from ..train.dist import current
from .common import NO_TARGETS, input_hessians, non_embedding_parameters

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class DarwinLMConfig:
    """Target, database, search and post-training of DarwinLM (and its two contrasts)."""

    ratio: float = 0.25
    """Fraction of non-embedding parameters to remove."""
    mode: Literal["search", "ziplm", "uniform"] = "search"
    """search (DarwinLM), ziplm (database at uniform levels), uniform (same widths, no OBS)."""
    levels: int = 11
    """Levels per module in the database, from 0 (dense) to levels-1 (all groups removed)."""
    rel_damp: float = 1e-2
    """Hessian damping, relative to the mean of its diagonal."""
    generations: int = 200
    """Generations of the evolutionary search."""
    offspring: int = 16
    """Offspring per generation."""
    survivors: tuple[int, ...] = (8, 4, 2, 1)
    """Candidates kept after each selection stage (the last must be 1)."""
    fitness_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192)
    """Scored tokens per selection stage (capped by the calibration's)."""
    train_tokens: tuple[int, ...] = (10000, 50000, 100000, 200000)
    """Fine-tuning tokens per candidate per stage (0: score without fine-tuning)."""
    train_batch_size: int = 1
    """Sequences per fine-tuning step of a candidate."""
    lr: float = 1e-5
    """AdamW learning rate of the candidates' fine-tuning."""
    post_train_steps: int = 0
    """Fine-tuning steps of the stitched model (0: none)."""
    post_train_lr: float = 1e-5
    """AdamW learning rate of the post-training."""
    batch_size: int = 8
    """Sequences per forward pass when collecting Hessians and scoring."""
    seed: int = 0
    """Seed of the search and its minibatch draws."""

    def __post_init__(self):
        for name in ("survivors", "fitness_tokens", "train_tokens"):
            v = getattr(self, name)
            v = tuple(int(x) for part in ([v] if isinstance(v, (int, str)) else v)
                      for x in str(part).split(",") if x != "")
            object.__setattr__(self, name, v)
        if not 0 <= self.ratio < 1:
            raise ValueError("--ratio must be in [0, 1)")
        if self.mode not in ("search", "ziplm", "uniform"):
            raise ValueError("--mode must be search, ziplm or uniform")
        if self.levels < 2:
            raise ValueError("--levels must be >= 2")
        if self.rel_damp < 0:
            raise ValueError("--rel-damp must be >= 0")
        if not len(self.survivors) == len(self.fitness_tokens) == len(self.train_tokens) >= 1:
            raise ValueError("--survivors, --fitness-tokens and --train-tokens need one entry per stage")
        if self.survivors[-1] != 1 or any(a < b for a, b in zip(self.survivors, self.survivors[1:])):
            raise ValueError("--survivors must be non-increasing and end with 1")
        if min(self.survivors + self.fitness_tokens) < 1 or min(self.train_tokens) < 0:
            raise ValueError("--survivors and --fitness-tokens must be >= 1, --train-tokens >= 0")
        if min(self.generations, self.post_train_steps) < 0 or min(self.offspring, self.batch_size,
                                                                   self.train_batch_size) < 1:
            raise ValueError("--generations/--post-train-steps must be >= 0, --offspring/--batch-size/"
                             "--train-batch-size >= 1")


@dataclass(frozen=True)
class DarwinLMPlan:
    attn_levels: tuple[int, ...]
    """Per layer: database level of o_proj (heads removed: attn_counts[level])."""
    mlp_levels: tuple[int, ...]
    """Per layer: database level of down_proj (channels removed: mlp_counts[level])."""
    attn_counts: tuple[int, ...]
    """Query heads removed at each level."""
    mlp_counts: tuple[int, ...]
    """MLP channels removed at each level."""
    mode: str
    """search, ziplm or uniform."""
    fitness: float | None
    """KL of the stitched levels to the dense model on the whole calibration (before post-training)."""


# ---------------------------------------------------------------------------------------------
# A. the database
# ---------------------------------------------------------------------------------------------


def ladder(groups: int, levels: int) -> list[int]:
    """Groups removed at each level: round(l / (levels - 1) * groups), l = 0 .. levels - 1."""
    return [round(l * groups / (levels - 1)) for l in range(levels)]


@torch.no_grad()
def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, group: int, counts: list[int],
              rel_damp: float = 1e-2, second_order: bool = True
              ) -> list[tuple[list[int], torch.Tensor, float]]:
    """Greedy structured OBS on the input columns of ``weight`` (d_out, d_in), in groups of
    ``group`` consecutive columns; ``hessian`` (d_in, d_in) = 2 X X^T / n.

    Returns, for each entry of ``counts`` (groups removed, ascending): (kept groups, their updated
    columns (d_out, kept * group), predicted error sum(score) / 2). ``second_order=False`` ranks once
    by ||W[:, S]||^2 * diag(H)_S / 2 and removes without updating (the uniform baseline)."""
    d_out, d_in = weight.shape
    if d_in % group:
        raise ValueError(f"{d_in} columns do not split into groups of {group}")
    n_groups = d_in // group
    W, H = _prepare(weight, hessian, rel_damp)
    alive = torch.ones(n_groups, dtype=torch.bool, device=W.device)
    loss, removed = 0.0, 0
    want = sorted(set(counts))
    if want and (want[0] < 0 or want[-1] > n_groups):
        raise ValueError(f"counts must be in 0..{n_groups}")
    if not second_order:
        diag = H.diagonal().view(n_groups, group)
        score = (W.pow(2).view(d_out, n_groups, group).sum(0) * diag).sum(1)  # (G,)
        order = sorted(range(n_groups), key=lambda g: (float(score[g]), g))
    else:
        Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    snaps = {}
    for target in want:
        while removed < target:
            if second_order:
                s, binv = _obs_scores(W, Hinv, group, alive)
                s[~alive] = float("inf")
                g = int(torch.argmin(s))  # ties: the lowest index
                cols = slice(g * group, (g + 1) * group)
                b = binv[g]  # (group, group) = ([H^-1]_SS)^-1
                W -= W[:, cols] @ b @ Hinv[cols, :]
                Hinv -= Hinv[:, cols] @ b @ Hinv[cols, :]
                # the removed block is now zero: an identity keeps the batched block inverse defined
                Hinv[cols, cols] = torch.eye(group, dtype=Hinv.dtype, device=Hinv.device)
                loss += float(s[g]) / 2
            else:
                g = order[removed]
                loss += float(score[g]) / 2
            W[:, g * group:(g + 1) * group] = 0.0
            alive[g] = False
            removed += 1
        kept = torch.nonzero(alive).flatten()
        cols = (kept[:, None] * group + torch.arange(group, device=W.device)).flatten()
        snaps[target] = (kept.tolist(), W[:, cols].to(weight.dtype).clone(), loss)
    return [snaps[c] for c in counts]


@torch.no_grad()
def obs_remove(weight: torch.Tensor, hessian: torch.Tensor, cols: list[int],
               rel_damp: float = 1e-2) -> torch.Tensor:
    """``weight`` (d_out, d_in) with input columns ``cols`` removed together and the others updated
    to absorb them (joint OBS: W <- W - W[:, S] ([H^-1]_SS)^-1 H^-1[S, :]); same dtype, the removed
    columns zero. ``hessian`` = 2 X X^T / n of the inputs."""
    W, H = _prepare(weight, hessian, rel_damp)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    S = torch.as_tensor(cols, dtype=torch.long, device=W.device)
    W -= W[:, S] @ torch.linalg.solve(Hinv[S][:, S], Hinv[S, :])
    W[:, S] = 0.0
    return W.to(weight.dtype)


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, rel_damp: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of W and the damped H; inputs that never fire (diag 0) carry no information
    and nothing to update with: their columns are zeroed and their diagonal set to 1."""
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += rel_damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return W, H


def _obs_scores(W: torch.Tensor, Hinv: torch.Tensor, group: int, alive: torch.Tensor):
    """(scores (G,), inverted diagonal blocks of H^-1 (G, group, group))."""
    d_out, d_in = W.shape
    G = d_in // group
    if group == 1:
        d = Hinv.diagonal()
        return W.pow(2).sum(0) / d, (1.0 / d).view(G, 1, 1)
    idx = torch.arange(G, device=W.device)
    blocks = Hinv.view(G, group, G, group)[idx, :, idx, :]  # (G, g, g)
    try:
        binv = torch.linalg.inv(blocks)
    except RuntimeError:  # singular block: the pseudo-inverse, as the reference does
        binv = torch.linalg.pinv(blocks)
    Wg = W.view(d_out, G, group).transpose(0, 1)  # (G, d_out, g)
    return torch.einsum("goi,gij,goj->g", Wg, binv, Wg), binv


@torch.no_grad()
def hessians(model, calib: Calibration, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Per layer: H = 2 X X^T / n (float32) of the inputs of o_proj ("attn") and down_proj ("mlp")
    over non-pad tokens, all from one pass of the dense model."""
    device = next(model.parameters()).device
    layers = get_layers(model)
    modules = {(i, kind): lin for i, layer in enumerate(layers)
               for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj))}
    hs = input_hessians(model, modules, calib.batches(batch_size, device))
    return [{kind: hs[(i, kind)] for kind in KINDS if (i, kind) in hs} for i in range(len(layers))]


class Database:
    """Per layer and kind: for every level, (kept group indices, kept columns of the updated
    weight). Saved as database.json + one safetensors file per layer."""

    def __init__(self, counts: dict[str, list[int]], entries: list[dict[str, list]], meta: dict):
        self.counts = counts  # kind -> groups removed per level
        self.entries = entries  # layer -> kind -> level -> (kept, weight)
        self.meta = meta

    @property
    def levels(self) -> int:
        return len(self.counts["attn"])

    @classmethod
    def build(cls, model, calib: Calibration, cfg: DarwinLMConfig, folder: str | Path | None = None,
              progress: bool = True) -> Database:
        """OBS snapshots of every layer; with ``folder``, finished layers are saved as they come and
        a re-run with the same settings loads them instead of recomputing."""
        c = model.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        counts = {"attn": ladder(c.num_attention_heads, cfg.levels),
                  "mlp": ladder(c.intermediate_size, cfg.levels)}
        groups = {"attn": hd, "mlp": 1}
        second = cfg.mode != "uniform"
        meta = {"levels": cfg.levels, "rel_damp": cfg.rel_damp, "second_order": second, "counts": counts,
                "calib": [int(calib.input_ids.sum()), len(calib)], "head_dim": hd}
        folder = Path(folder) if folder is not None else None
        if folder is not None:
            old = folder / "database.json"
            if old.is_file() and read_json(old) != meta:  # another model, data or ladder: start over
                for f in folder.glob("layer_*.safetensors"):
                    f.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            write_json(old, meta)
        layers = get_layers(model)
        todo = [i for i in range(len(layers))
                if folder is None or not (folder / f"layer_{i:03d}.safetensors").is_file()]
        hs = hessians(model, calib, cfg.batch_size) if todo else None
        entries = []
        for i in tqdm(range(len(layers)), desc="OBS database", disable=not progress):
            path = folder / f"layer_{i:03d}.safetensors" if folder is not None else None
            if i not in todo:
                entries.append(_read_layer(path, cfg.levels))
                continue
            e = {}
            for kind, lin in (("attn", layers[i].self_attn.o_proj), ("mlp", layers[i].mlp.down_proj)):
                if kind not in hs[i]:
                    raise ValueError(NO_TARGETS)
                h = hs[i][kind].to(lin.weight.device)
                e[kind] = [(kept, w.cpu()) for kept, w, _ in
                           obs_prune(lin.weight, h, groups[kind], counts[kind], cfg.rel_damp, second)]
            hs[i] = None
            if path is not None:
                _write_layer(path, e)
            entries.append(e)
        return cls(counts, entries, meta)


def _write_layer(path: Path, e: dict) -> None:
    tensors = {}
    for kind, snaps in e.items():
        for l, (kept, w) in enumerate(snaps):
            tensors[f"{kind}.{l}.kept"] = torch.tensor(kept, dtype=torch.long)
            tensors[f"{kind}.{l}.weight"] = w.clone()  # equal counts share one snapshot
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks of a multi-process run write alike
    save_file(tensors, str(tmp))
    tmp.replace(path)


def _read_layer(path: Path, levels: int) -> dict:
    t = load_file(str(path))
    return {kind: [(t[f"{kind}.{l}.kept"].tolist(), t[f"{kind}.{l}.weight"]) for l in range(levels)]
            for kind in KINDS}


@torch.no_grad()
def load_levels_(model, db: Database, levels: dict[str, list[int]]) -> None:
    """Write the database weights of ``levels`` into ``model``'s o_proj / down_proj at full shape
    (removed columns zero): the same function as the slim model, used to score candidates."""
    hd = db.meta["head_dim"]
    for i, layer in enumerate(get_layers(model)):
        for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            kept, w = db.entries[i][kind][levels[kind][i]]
            g = hd if kind == "attn" else 1
            cols = (torch.tensor(kept, dtype=torch.long)[:, None] * g + torch.arange(g)).flatten()
            lin.weight.zero_()
            lin.weight[:, cols.to(lin.weight.device)] = w.to(lin.weight)


# ---------------------------------------------------------------------------------------------
# B. the search
# ---------------------------------------------------------------------------------------------


def level_sums(model, cfg: DarwinLMConfig) -> dict[str, int]:
    """Level sum per kind that removes ``cfg.ratio`` of the non-embedding parameters, the same
    fraction f of the query/output and MLP parameters: sum = round(f * (levels - 1) * N)."""
    c = model.config
    n = c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    prunable = n * (2 * c.num_attention_heads * hd * c.hidden_size + 3 * c.intermediate_size * c.hidden_size)
    f = cfg.ratio * non_embedding_parameters(model) / prunable
    if f > 1:
        raise ValueError(f"--ratio {cfg.ratio} needs more than every query head and MLP channel")
    s = round(f * (cfg.levels - 1) * n)
    return {"attn": s, "mlp": s}


def spread(total: int, n: int, top: int) -> list[int]:
    """``total`` levels over ``n`` layers as evenly as possible (the extra ones evenly spaced)."""
    base, extra = divmod(total, n)
    if base > top or (base == top and extra):
        raise ValueError(f"a level sum of {total} does not fit {n} layers of at most {top}")
    return [base + ((i + 1) * extra // n - i * extra // n) for i in range(n)]


def mutate(levels: dict[str, list[int]], top: int, rng: random.Random) -> dict[str, list[int]]:
    """Level switch: 1-3 flips (biased to 1), each moving one level from a module to another of the
    same kind; each kind's level sum is unchanged."""
    new = {k: list(v) for k, v in levels.items()}
    kinds = list(new)
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        lv = new[rng.choices(kinds, weights=[len(new[k]) for k in kinds])[0]]
        down = [i for i, l in enumerate(lv) if l > 0]
        up = [i for i, l in enumerate(lv) if l < top]
        if not down or not up:
            continue
        i = rng.choice(down)
        lv[i] -= 1
        lv[rng.choice([j for j, l in enumerate(lv) if l < top])] += 1
    return new


class FitnessPool:
    """Calibration sequences with the dense model's next-token log-probabilities at their target
    positions (kept on the CPU: positions x vocab floats)."""

    def __init__(self, dense, calib: Calibration, batch_size: int):
        self.calib, self.batch_size = calib, batch_size
        self.dense = [t.cpu() for t in _target_logprobs(dense, calib, list(range(len(calib))), batch_size)]
        self.tokens = [t.shape[0] for t in self.dense]
        if sum(self.tokens) == 0:
            raise ValueError(NO_TARGETS)

    def draw(self, tokens: int, rng: random.Random) -> list[int]:
        """Random sequences until ``tokens`` scored tokens (the whole pool if it holds fewer)."""
        order = [i for i in rng.sample(range(len(self.tokens)), len(self.tokens)) if self.tokens[i]]
        out, got = [], 0
        for i in order:
            if got >= tokens:
                break
            out.append(i)
            got += self.tokens[i]
        return sorted(out)

    @torch.no_grad()
    def kl(self, model, seqs: list[int]) -> float:
        """Token-averaged KL(P_dense || P_model) over the target positions of ``seqs``."""
        total, n = 0.0, 0
        for i, lp in zip(seqs, _target_logprobs(model, self.calib, seqs, self.batch_size)):
            ref = self.dense[i].to(lp.device)
            total += float((ref.exp() * (ref - lp)).sum())
            n += lp.shape[0]
        return total / max(n, 1)


@torch.no_grad()
def _target_logprobs(model, calib: Calibration, seqs: list[int], batch_size: int) -> list[torch.Tensor]:
    """Per sequence: log-softmax of the logits that predict its target tokens, (n_i, V) float32."""
    device = next(model.parameters()).device
    target = calib.target_mask if calib.target_mask is not None else calib.attention_mask
    out = []
    for s in range(0, len(seqs), batch_size):
        idx = seqs[s:s + batch_size]
        mask = calib.attention_mask[idx]
        keep = int(mask.sum(1).max())
        ids, mask = calib.input_ids[idx, :keep].to(device), mask[:, :keep].to(device)
        tgt = (target[idx, 1:keep] * calib.attention_mask[idx, 1:keep]).bool().to(device)  # (B, T-1)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        for b in range(len(idx)):
            out.append(F.log_softmax(logits[b][tgt[b]], dim=-1))
    return out


def _finetune_(model, calib: Calibration, seqs: list[int], batch_size: int, lr: float,
               steps: int | None = None, rng: random.Random | None = None) -> None:
    """AdamW on the CE of the target tokens: over ``seqs`` once, or ``steps`` batches drawn from them."""
    device = next(model.parameters()).device
    target = calib.target_mask if calib.target_mask is not None else calib.attention_mask
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    batches = [seqs[s:s + batch_size] for s in range(0, len(seqs), batch_size)] if steps is None else \
        [rng.sample(seqs, min(batch_size, len(seqs))) for _ in range(steps)]
    for idx in batches:
        mask = calib.attention_mask[idx]
        keep = int(mask.sum(1).max())
        ids = calib.input_ids[idx, :keep].to(device)
        labels = ids.masked_fill((target[idx, :keep] * mask[:, :keep]).to(device) == 0, -100)
        if not (labels[:, 1:] != -100).any():
            continue
        model(input_ids=ids, attention_mask=mask[:, :keep].to(device), labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _draw_train(calib: Calibration, tokens: int, rng: random.Random) -> list[int]:
    """Random sequences of the training pool until ``tokens`` real tokens."""
    lens = calib.attention_mask.sum(1).tolist()
    out, got = [], 0
    for i in rng.sample(range(len(lens)), len(lens)):
        if got >= tokens:
            break
        out.append(i)
        got += lens[i]
    return out


def search(dense, db: Database, pool: FitnessPool, train: Calibration, cfg: DarwinLMConfig,
           folder: str | Path | None = None, progress: bool = True) -> dict:
    """Evolutionary search over per-layer levels from the uniform start; returns {"levels", "history"}.

    With ``folder``, the state is saved after every generation (search_state.json) and a re-run with
    the same settings continues from it; the levels are also written as levels.txt.

    On N processes (``accelerate launch`` / ``torchrun``) each selection stage's candidates are
    fine-tuned and scored round-robin across the ranks and the scores gathered; every rank draws
    the same offspring and minibatches (one seed), so all make the same selection. Rank 0 writes."""
    d = current()
    n = len(get_layers(dense))
    top = db.levels - 1
    sums = level_sums(dense, cfg)
    parent = {k: spread(sums[k], n, top) for k in KINDS}
    rng = random.Random(cfg.seed)
    history: list[float] = []
    # a longer search (more generations) or other post-training continues from the saved state
    own = {k: v for k, v in asdict(cfg).items()
           if k not in ("generations", "post_train_steps", "post_train_lr")}
    settings = {"cfg": own, "db": db.meta, "pool": [len(pool.tokens), sum(pool.tokens)],
                "train": [len(train), int(train.attention_mask.sum())]}
    state_path = Path(folder) / "search_state.json" if folder is not None else None
    start = 0
    if state_path is not None and state_path.is_file():
        st = read_json(state_path)
        if st["settings"] == json.loads(json.dumps(settings)):
            start, parent, history = st["generation"], st["parent"], st["history"]
            v, inner, gauss = st["rng"]
            rng.setstate((v, tuple(inner), gauss))
    work = copy.deepcopy(dense)
    bar = tqdm(range(start, cfg.generations), desc="DarwinLM search", disable=not (progress and d.main),
               initial=start, total=cfg.generations)
    for gen in bar:
        seen = {_key(parent)}
        cands = []
        for _ in range(100 * cfg.offspring):  # duplicates of the parent or of each other are redrawn
            if len(cands) == cfg.offspring:
                break
            child = mutate(parent, top, rng)
            if _key(child) not in seen:
                seen.add(_key(child))
                cands.append(child)
        if not cands:  # nothing to move (every level at 0 or at the top)
            break
        for s, (keep, ftok, ttok) in enumerate(zip(cfg.survivors, cfg.fitness_tokens, cfg.train_tokens)):
            if s == len(cfg.survivors) - 1:
                cands = cands + [parent]  # elitism: the parent competes in the last stage
            fit = pool.draw(ftok, rng)
            tr = _draw_train(train, ttok, rng) if ttok else []
            mine = {j: _fitness(work, db, cands[j], pool, fit, train, tr, cfg)
                    for j in d.shard(list(range(len(cands))))}
            pooled = {k: v for part in d.gather(mine) for k, v in part.items()}
            scores = [pooled[j] for j in range(len(cands))]
            order = sorted(range(len(cands)), key=lambda j: (scores[j], j))[:keep]
            cands, best = [cands[j] for j in order], scores[order[0]]
        parent = cands[0]
        history.append(best)
        bar.set_postfix(kl=f"{best:.4f}")
        if state_path is not None and d.main:
            write_json(state_path, {"settings": settings, "generation": gen + 1, "parent": parent,
                                    "history": history, "rng": list(rng.getstate())})
            write_levels(Path(folder) / "levels.txt", parent)
        d.barrier()
    return {"levels": parent, "history": history}


def _fitness(work, db, levels, pool, fit, train, tr, cfg) -> float:
    load_levels_(work, db, levels)
    if not tr:
        return pool.kl(work, fit)
    m = copy.deepcopy(work)
    _finetune_(m, train, tr, cfg.train_batch_size, cfg.lr)
    return pool.kl(m, fit)


def _key(levels: dict[str, list[int]]) -> tuple:
    return tuple(tuple(levels[k]) for k in KINDS)


def write_levels(path: Path, levels: dict[str, list[int]]) -> None:
    """The per-layer level file, one module per line as the official code writes it."""
    lines = [f"model.layers.{i}.self_attn.o_proj: {a}\nmodel.layers.{i}.mlp.down_proj: {m}"
             for i, (a, m) in enumerate(zip(levels["attn"], levels["mlp"]))]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# C. plan / stitch
# ---------------------------------------------------------------------------------------------


def plan(model, calib: Calibration, cfg: DarwinLMConfig, train: Calibration | None = None,
         folder: str | Path | None = None, progress: bool = True) -> tuple[DarwinLMPlan, Database, dict]:
    """Database, then (mode search) the search; returns (plan, database, stats)."""
    db = Database.build(model, calib, cfg, Path(folder) / "database" if folder is not None else None,
                        progress)
    n = len(get_layers(model))
    top = db.levels - 1
    sums = level_sums(model, cfg)
    levels = {k: spread(sums[k], n, top) for k in KINDS}
    pool = FitnessPool(model, calib, cfg.batch_size)
    stats: dict = {}
    if cfg.mode == "search" and cfg.generations:
        found = search(model, db, pool, train if train is not None else calib, cfg, folder, progress)
        levels, stats["history"] = found["levels"], found["history"]
    work = copy.deepcopy(model)
    load_levels_(work, db, levels)
    fitness = pool.kl(work, list(range(len(calib))))
    del work
    if folder is not None and current().main:
        write_levels(Path(folder) / "levels.txt", levels)
        _plot(Path(folder) / "search.png", levels, db, stats.get("history", []), cfg.mode)
    p = DarwinLMPlan(tuple(levels["attn"]), tuple(levels["mlp"]), tuple(db.counts["attn"]),
                     tuple(db.counts["mlp"]), cfg.mode, fitness)
    return p, db, stats


@torch.no_grad()
def apply_(model, p: DarwinLMPlan, db: Database):
    """The slim model of the plan: database weights for o_proj / down_proj, dense slices elsewhere."""
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    work = copy.deepcopy(model)
    load_levels_(work, db, {"attn": list(p.attn_levels), "mlp": list(p.mlp_levels)})
    keep = []
    for i in range(c.num_hidden_layers):
        q = db.entries[i]["attn"][p.attn_levels[i]][0]
        keep.append(LayerKeep(q, sorted({h // group for h in q}), db.entries[i]["mlp"][p.mlp_levels[i]][0]))
    return to_slim(work, keep)


def compress_(model, calib: Calibration, cfg: DarwinLMConfig, train: Calibration | None = None,
              progress: bool = True, folder: str | Path | None = None):
    """plan + apply_ (+ post-training); returns (slim model, plan, stats) — a new model. ``train``
    is the fine-tuning pool of the search and post-training (default: ``calib``); ``folder`` keeps
    the database and the search state, so an interrupted run resumes."""
    p, db, stats = plan(model, calib, cfg, train, folder, progress)
    slim = apply_(model, p, db)
    if cfg.post_train_steps:
        pool = train if train is not None else calib
        _finetune_(slim, pool, list(range(len(pool))), cfg.train_batch_size, cfg.post_train_lr,
                   steps=cfg.post_train_steps, rng=random.Random(cfg.seed))
    return slim, p, {**stats, "fitness": p.fitness}


def for_target(base: DarwinLMConfig, model, fraction: float) -> DarwinLMConfig:
    """The config that removes ``fraction`` of the non-embedding parameters."""
    return replace(base, ratio=fraction)


def _plot(png: Path, levels: dict[str, list[int]], db: Database, history: list[float], mode: str) -> None:
    """Kept heads / channels per layer and, after a search, the parent's KL per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import save_figure

    n = len(levels["attn"])
    heads = [len(db.entries[i]["attn"][l][0]) for i, l in enumerate(levels["attn"])]
    chans = [len(db.entries[i]["mlp"][l][0]) for i, l in enumerate(levels["mlp"])]
    fig, axes = plt.subplots(1, 3 if history else 2, figsize=(11 if history else 7.5, 3))
    axes[0].bar(range(n), heads, color="#4c72b0")
    axes[0].set(xlabel="layer", ylabel="query heads kept", title=f"{mode}: attention")
    axes[1].bar(range(n), chans, color="#c44e52")
    axes[1].set(xlabel="layer", ylabel="MLP channels kept", title=f"{mode}: MLP")
    if history:
        axes[2].plot(range(1, len(history) + 1), history, marker=".")
        axes[2].set(xlabel="generation", ylabel="KL to dense (selection minibatch)", title="search")
    fig.tight_layout()
    save_figure(fig, png)
