"""Fast decoding for dense and ELM models: a static KV cache and the decode step in CUDA graphs.

transformers' eager ``generate`` launches a decoder's few hundred small kernels from Python on
every token and grows its cache as it goes, so at batch 1 the GPU mostly waits. Here the same
weights (the model's own modules: nothing is copied but the ELM projection's two halves) run one
decode step of fixed-shape tensor operations:

* a static KV cache: one K and one V tensor of shape (slots, B, H_kv, L, D), allocated once for
  prompt + new tokens. A dense model has one slot per layer; an ELM has N - M slots for its kept
  layers plus one for the block (``kv_mode="one_step"``: every evaluation overwrites it) or
  ``max_iter`` (``"per_iter"``);
* the step reads its token, position, cache slot and key mask from device buffers and writes the
  next token back, so it is captured once in a CUDA graph and replayed with no host work per token;
* packed projections: each layer's q/k/v and gate/up weights are stacked into one matrix and the
  modules' own weights become row views of it, so a step runs one GEMM per group and no weight is
  held twice (``StepConfig.pack``);
* the whole step through ``torch.compile`` (``StepConfig.compile="step"``, the GPU default): the
  embedding gather, residual adds, RMSNorms, RoPE, the K/V cache writes and SiLU x up fuse into a
  few kernels between the matmuls, and the ELM's ``W_z z + (W_h h + b)`` add into the block's first
  norm;
* the ELM fixed-point loop is inside the step. W_h h + b is computed once per token, so an
  evaluation costs W_z z plus the layer. Per-token convergence masks freeze converged tokens
  exactly as ``elm_solvers`` does (naive and Anderson), and an evaluation's K/V write is kept only
  while some token is still iterating, so evaluations past convergence change nothing;
* with a tolerance the step is three kinds of graph (before the block, one per evaluation, after):
  the host launches evaluation k + 1 before it reads whether any token was still active after
  evaluation k, so the GPU never waits for the host and the loop runs at most one evaluation past
  the last one needed. Without a tolerance the whole step, all evaluations, is one graph.

Greedy decoding gives the tokens of the reference ``model.generate`` (tested); sampling uses
temperature and top-k with the Gumbel-max trick, seeded. Prompts of different lengths are left
padded, as for ``generate``. On a CPU (or with ``cuda_graphs=False``) the same step runs eagerly
unless ``StepConfig(compile="step")`` asks for inductor's CPU kernels.

Example::

    dec = Decoder(model, batch_size=8, max_len=640)
    tokens, stats = dec.generate(input_ids, attention_mask, DecodeConfig(max_new_tokens=128))
"""

from __future__ import annotations

import copy
import os
import time
import types
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .models.adapters import (
    UnsupportedModelError,
    family_of,
    get_embed,
    get_head,
    get_layers,
    get_norm,
    get_rotary,
    layer_type,
)
from .models.elm_solvers import NonFiniteError, anderson_mix, solve

Tensor = torch.Tensor


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm as the supported families compute it: fp32 statistics, cast back, then the weight."""
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _silu_mul(g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u


def _triton_attention(device: torch.device, compiled: bool):
    """elmkit.decode_attention's kernel, or one clear error where it cannot run."""
    try:
        from .decode_attention import decode_attention
    except ImportError as e:
        raise ValueError(f'attention="triton" needs the triton package ({e}); it comes with CUDA '
                         'builds of torch') from None
    if device.type != "cuda" and (os.environ.get("TRITON_INTERPRET") != "1" or compiled):
        raise ValueError('attention="triton" runs on a GPU; on a CPU only under Triton\'s interpreter '
                         '(TRITON_INTERPRET=1, with compile="none" or "ops"), slowly, for tests')
    return decode_attention


def _auto_attention(device: torch.device, compiled: bool) -> str:
    """attention="auto": elmkit's Triton kernels in a compiled step on a CUDA GPU of compute
    capability 8.0 or newer (bf16 dots) with the triton package, where they were measured fastest
    (BENCHMARKS.md: 1.10x SDPA's step on the 1.5B shape, 1.20x on SmolLM2-135M, H100); SDPA
    elsewhere, including the eager and "ops" steps, which were not timed with them."""
    if (device.type != "cuda" or not compiled or torch.version.hip is not None  # ROCm: not measured
            or torch.cuda.get_device_capability(device) < (8, 0)):
        return "sdpa"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "sdpa"
    return "triton"


# compile="ops": one compiled kernel each (RMSNorm alone is six eager kernels, RoPE about ten); they
# see tensors only, so every layer reuses one compilation per shape
_FUSED = {"rms": torch.compile(_rms, dynamic=False),
          "rope": torch.compile(apply_rotary_pos_emb, dynamic=False),
          "silu_mul": torch.compile(_silu_mul, dynamic=False)}

COMPILE = ("auto", "step", "ops", "none")
ATTENTION = ("auto", "sdpa", "math", "flex", "triton")
FLEX_BLOCK = 128  # flex attention's key block: its cache is a whole number of them


@dataclass(frozen=True)
class StepConfig:
    """How the decode step is built: what is compiled, packed and which attention it runs."""

    compile: str = "auto"
    """"step": the whole decode step through torch.compile (inductor), so residual adds, norms,
    RoPE, cache writes and SiLU x up fuse between the matmuls; "ops": only RMSNorm, RoPE and
    SiLU x up, one compiled kernel each; "none": eager kernels; "auto": "step" on a GPU with CUDA
    graphs, "none" elsewhere (compiling costs tens of seconds, a CPU decodes eagerly)."""
    pack: bool = True
    """q/k/v and gate/up of each layer as one matrix each, so a decode step runs one GEMM for
    each group; the modules' weights become views of it (nothing is copied, save/load unchanged)."""
    attention: str = "auto"
    """The one-token attention of the decode step: "auto" ("triton" in a compiled step on a CUDA GPU
    of compute capability 8.0 or newer, "sdpa" elsewhere), "sdpa" (PyTorch's fused kernels), "math"
    (scores, masked softmax, weighted sum: two batched matmuls and one fusable softmax) or "flex"
    (flex attention, which inductor lowers to a decoding kernel split along the keys; a GPU and
    compile="step" only, and the cache is rounded up to whole blocks of FLEX_BLOCK keys) or
    "triton" (elmkit.decode_attention: two Triton kernels, split along the keys, each KV head's
    query heads together; a GPU, or a CPU under TRITON_INTERPRET=1 without compile="step")."""
    autotune: bool = False
    """The compiled step lets inductor time its matmuls (max-autotune without its CUDA graphs, which
    the Decoder captures itself): Triton templates against cuBLAS for each shape, so a one-token
    GEMV may run in a template with the bias, residual add or next elementwise op fused after it.
    Compiling takes minutes; only with compile="step" (or "auto", which is "step" on a GPU with
    CUDA graphs; elsewhere the step is eager and there is nothing to time)."""

    def __post_init__(self):
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        if self.autotune and self.compile in ("ops", "none"):
            raise ValueError(f'autotune times the matmuls of the compiled step: use compile="step" or '
                             f'"auto", not {self.compile!r}')


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode."""

    max_new_tokens: int = 128
    """Tokens to generate per row (fewer when every row has stopped)."""
    temperature: float = 0.0
    """0: greedy; > 0: sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    seed: int = 0
    """Seed of the sampling noise."""
    stop_at_eos: bool = True
    """Stop a row at the generation config's eos token(s); later positions hold the pad token."""
    check_every: int = 16
    """Tokens between the host's checks whether every row has stopped (each check syncs)."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError("temperature and top_k must be >= 0")
        if self.check_every < 1:
            raise ValueError("check_every must be >= 1")


@dataclass
class DecodeStats:
    """What one ``generate`` call did."""

    batch_size: int
    prompt_len: int
    new_tokens: int
    """Decode positions run (per row; rows that stopped early count up to the batch's end)."""
    prefill_s: float
    decode_s: float
    """Wall time of the decode steps after the first token (synchronised)."""
    tokens_per_s: float
    """batch_size x (new_tokens - 1) / decode_s: the decode rate, prefill excluded."""
    block_evaluations: float | None = None
    """ELM: mean evaluations per generated token until it converged (per-token count)."""
    block_launches: float | None = None
    """ELM: mean evaluations the batch actually ran per decode step."""


def _stack(mods: list, device: torch.device) -> tuple[Tensor, Tensor | None] | None:
    """One (sum of out, in) weight and bias for Linear modules that read the same input; their own
    weights and biases become row views of it, so the model is unchanged and nothing is copied.
    None where a module is not a plain ``nn.Linear`` (PEFT, quantized), carries hooks (accelerate's
    offloading, weight norm), lives off ``device``, or where they differ in dtype, input width or
    having a bias, or share a weight: that group then runs its modules one by one."""
    if not all(type(m) is torch.nn.Linear and not _hooked(m) for m in mods):
        return None
    ws = [m.weight.data for m in mods]
    bs = [m.bias.data for m in mods if m.bias is not None]
    if (len({(w.device, w.dtype, w.shape[1]) for w in ws}) != 1 or ws[0].device != device
            or len(bs) not in (0, len(mods)) or len({(b.device, b.dtype) for b in bs}) > 1
            or len({w.data_ptr() for w in ws + bs}) != len(ws + bs)):  # a weight shared in the group
        return None
    packed = []
    for part in ("weight", "bias"):
        if part == "bias" and mods[0].bias is None:
            packed.append(None)
            continue
        ts = [getattr(m, part).data for m in mods]
        rows = [t.shape[0] for t in ts]
        if _tiled(ts):  # packed before (another Decoder on this model): view the whole again
            packed.append(ts[0].as_strided((sum(rows), *ts[0].shape[1:]), ts[0].stride()))
            continue
        full = torch.cat(ts)
        start = 0
        for m, n in zip(mods, rows):
            getattr(m, part).data = full[start:start + n]
            start += n
        packed.append(full)
    return packed[0], packed[1]


def _hooked(m) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"))


def _tiled(ts: list[Tensor]) -> bool:
    """Whether contiguous tensors lie back to back, in order, in one storage."""
    first = ts[0]
    at = first.data_ptr()
    for t in ts:
        if (not t.is_contiguous() or t.data_ptr() != at
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return False
        at += t.nbytes
    return True


def _groups(layer) -> dict:
    """The projections of a decoder layer that read one input: {"qkv": [q, k, v], "gu": [gate, up]}."""
    a, m = layer.self_attn, layer.mlp
    groups = {"qkv": [a.q_proj, a.k_proj, a.v_proj],
              "gu": [getattr(m, "gate_proj", None), getattr(m, "up_proj", None)]}
    return {k: v for k, v in groups.items() if all(x is not None for x in v)}


def _pack(layers: list, device: torch.device) -> dict:
    """Each layer's packed projections, {i: {"qkv": (W, b, sizes), "gu": (W, b, sizes)}}, for the
    groups that could be stacked (see ``_stack``). A group holding a module or weight that another
    group also holds (weights shared between layers) is left as it is: one matrix cannot be a view
    of two."""
    groups = {i: _groups(layer) for i, layer in enumerate(layers)}
    seen = Counter(id(t) for g in groups.values() for mods in g.values() for m in mods
                   for t in (m, m.weight))
    out: dict = {}
    for i, g in groups.items():
        out[i] = {}
        for name, mods in g.items():
            if any(seen[id(m)] > 1 or seen[id(m.weight)] > 1 for m in mods):
                continue
            with torch.inference_mode(False), torch.no_grad():  # the weights stay trainable tensors
                wb = _stack(mods, device)
            if wb is not None:
                out[i][name] = (*wb, [x.weight.shape[0] for x in mods])
    return out


def _own_code(fn):
    """``fn`` with a code object of its own. Dynamo keeps compiled code, and a limit of eight
    variants, per code object: without this every Decoder in a process (and every evaluation's
    lambda) would share one cache, and the ninth shape would fail under fullgraph."""
    f = getattr(fn, "__func__", fn)
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, fn.__self__) if hasattr(fn, "__self__") else g


class Decoder:
    """A static-cache decoder for one model at a fixed batch size and cache length.

    ``cuda_graphs`` captures the decode step on first use (CUDA only). The model's weights are
    used in place; keep the model alive and unchanged while the decoder is in use.
    """

    def __init__(self, model, batch_size: int, max_len: int, cuda_graphs: bool = True,
                 step: StepConfig = StepConfig()):
        family = family_of(model)
        fam = family.name
        if fam == "slim" or not family.sequential:
            raise UnsupportedModelError("the fast decoder supports dense and ELM models; decode a "
                                        f"{fam} model with model.generate")
        if batch_size < 1 or max_len < 2:
            raise ValueError("batch_size must be >= 1 and max_len >= 2")
        cfg = model.config
        self.model = model.eval()
        # the ELM's solver settings as they are now: the pieces and graphs are built for them, so a
        # later change to model.config takes effect in a new Decoder
        self.elm = copy.deepcopy(cfg) if fam == "elm" else None
        base = cfg.base_config() if self.elm is not None else cfg
        limit = getattr(base, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings {limit}")
        self.layers = list(get_layers(model))
        for i in range(len(self.layers)):
            window = getattr(base, "sliding_window", None)
            if layer_type(cfg, i) == "sliding_attention" and window is not None and max_len > window:
                raise ValueError(f"layer {i} uses sliding-window attention ({window} tokens) and "
                                 f"max_len {max_len} exceeds it; use model.generate for such lengths")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.B, self.L = batch_size, max_len
        self.d = cfg.hidden_size
        self.head_dim = getattr(base, "head_dim", None) or self.d // base.num_attention_heads
        self.graphs = cuda_graphs and self.device.type == "cuda"
        mode = step.compile if step.compile != "auto" else ("step" if self.graphs else "none")
        self.fuse = mode == "ops" and self.graphs  # compiled elementwise kernels (prefill stays eager)
        self.compiled = mode == "step"
        self.autotune = step.autotune and self.compiled  # "auto" off a GPU: eager, nothing to time
        self.attention = (_auto_attention(self.device, self.compiled) if step.attention == "auto"
                          else step.attention)  # what the step runs: never "auto"
        if self.attention == "triton":
            self._triton_attention = _triton_attention(self.device, self.compiled)
        if self.attention == "flex":
            if self.head_dim < 16:  # inductor's flex lowering raised NotImplementedError for a head
                # dimension of 8 (torch 2.11, on an H100)
                raise ValueError(f'attention="flex" needs a head dimension of at least 16 (inductor\'s '
                                 f'flex kernel); this model\'s is {self.head_dim}: use attention="sdpa" '
                                 'or "math"')
            if not (self.compiled and self.device.type == "cuda"):
                # inductor's CPU flex kernels gave wrong outputs for grouped heads and for key lengths
                # that are not whole blocks (torch 2.13); the GPU's decoding kernel is what it is for
                raise ValueError('attention="flex" runs in a compiled step on a GPU: use compile="step" '
                                 'on CUDA, or attention="sdpa" / "math"')
        self.silu = getattr(base, "hidden_act", None) == "silu"
        B, L, dev = batch_size, max_len, self.device

        # cache slots: layer i -> slot i; an ELM block's evaluation k -> block slot (+ k-1 per_iter)
        n = len(self.layers)
        extra = (self.elm.max_iter - 1) if self.elm is not None and self.elm.kv_mode == "per_iter" else 0
        Lc = -(-L // FLEX_BLOCK) * FLEX_BLOCK if self.attention == "flex" else L  # cache length
        shape = (n + extra, B, base.num_key_value_heads, Lc, self.head_dim)
        self.K = torch.zeros(shape, device=dev, dtype=self.dtype)
        self.V = torch.zeros(shape, device=dev, dtype=self.dtype)
        pos = torch.arange(L, device=dev)[None]
        cos, sin = get_rotary(model)(torch.zeros(1, device=dev, dtype=self.dtype), pos)
        self.cos, self.sin = cos[0], sin[0]  # (L, D), as the model computes them per position

        # decode state: device buffers that the captured step reads and updates in place
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)  # token entering the step
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)  # its RoPE position (pads skipped)
        self.cur = torch.zeros(1, dtype=torch.long, device=dev)  # its cache slot
        self.valid = torch.zeros(B, Lc, dtype=torch.bool, device=dev)  # keys that may be attended
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.n_out = torch.zeros(1, dtype=torch.long, device=dev)  # tokens written so far
        self.out = torch.zeros(B, L, dtype=torch.long, device=dev)  # generated tokens
        self.evals = torch.zeros(B, L, dtype=torch.long, device=dev)  # block evaluations per token
        self.bad = torch.zeros((), dtype=torch.bool, device=dev)  # a NaN/inf appeared
        self.stops = torch.full((8,), -1, dtype=torch.long, device=dev)  # eos ids, -1 = unused
        self.pad = torch.zeros((), dtype=torch.long, device=dev)
        self.temperature = torch.ones((), device=dev)
        if self.elm is not None:
            self._init_block()
        # packed[i] = (W_qkv, b_qkv or None, W_gu or None): q/k/v and gate/up stacked row-wise
        self.packed = _pack(self.layers, self.device) if step.pack else {}
        self._captured: dict = {}
        self._compiled: dict = {}
        self._weights: tuple = ()  # the weights' addresses the graphs read

    # -- the ELM block ----------------------------------------------------------------------

    def _init_block(self) -> None:
        c, B, d, dev = self.elm, self.B, self.d, self.device
        self.bi = c.start  # index of the block in the layer list and of its first cache slot
        W = self.layers[self.bi].proj.weight  # (d, 2d) = [W_z | W_h]
        self.wz = W[:, :d].detach().contiguous()
        self.wh = W[:, d:].detach().contiguous()
        self.b = self.layers[self.bi].proj.bias
        self.h = torch.zeros(B, 1, d, device=dev, dtype=self.dtype)  # input of the block
        self.hb = torch.zeros_like(self.h)  # W_h h + b
        self.z = torch.zeros_like(self.h)  # the iterate
        self.zout = torch.zeros_like(self.h)  # output of the last evaluation for each token
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.any_active = torch.ones((), dtype=torch.bool, device=dev)
        self.iters = torch.zeros(B, dtype=torch.long, device=dev)
        if self.graphs:  # the host reads "any token active after evaluation k" through these
            self._flags = torch.zeros(c.max_iter + 1, dtype=torch.bool).pin_memory()
            self._events = [torch.cuda.Event() for _ in range(c.max_iter + 1)]
        if c.solver == "anderson":
            self.ax = torch.zeros(B, c.anderson_m, d, device=dev, dtype=torch.promote_types(
                self.dtype, torch.float32))
            self.af = torch.zeros_like(self.ax)
        elif c.solver != "naive":
            raise UnsupportedModelError(f"the fast decoder runs the naive and anderson solvers; "
                                        f"{c.solver!r} runs in model.generate")

    # -- one decoder layer --------------------------------------------------------------------

    def _norm(self, mod, x: Tensor, fused: bool) -> Tensor:
        return _FUSED["rms"](x, mod.weight, mod.variance_epsilon) if fused else mod(x)

    def _layer(self, i: int, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, slot: int,
               write, gate: Tensor | None = None) -> Tensor:
        layer = self.layers[i]
        a = layer.self_attn
        B, T, _ = x.shape
        fused = self.fuse and T == 1
        packed = self.packed.get(i, {}) if T == 1 else {}  # prefill runs the modules themselves
        r = x
        x = self._norm(layer.input_layernorm, x, fused)
        shape = (B, T, -1, self.head_dim)
        if "qkv" in packed:
            W, b, sizes = packed["qkv"]
            q, k, v = (t.view(shape) for t in F.linear(x, W, b).split(sizes, -1))
        else:
            q, k, v = a.q_proj(x).view(shape), a.k_proj(x).view(shape), a.v_proj(x).view(shape)
        if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
            q, k = self._norm(a.q_norm, q, fused), self._norm(a.k_norm, k, fused)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = (_FUSED["rope"] if fused else apply_rotary_pos_emb)(q, k, *rope)
        keys, values = write(slot, k, v, gate)  # (B, H_kv, L', D) to attend over
        g = q.shape[1] // keys.shape[1]  # query heads per KV head
        if T == 1:  # decode: the g heads of a KV head are g queries of one (B, H_kv) problem,
            # so K/V are read once and never replicated
            o = self._attend(q.reshape(B, -1, g, self.head_dim), keys, values, mask, a.scaling)
            o = o.reshape(B, -1, 1, self.head_dim)
        else:  # prefill: replicate K/V per query head (as transformers does), mask broadcast
            keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=a.scaling)
        x = r + a.o_proj(o.transpose(1, 2).reshape(B, T, -1))  # o: (B, H, T, D)
        h = self._norm(layer.post_attention_layernorm, x, fused)
        m = layer.mlp
        if "gu" in packed and self.silu:
            W, b, sizes = packed["gu"]
            g, u = F.linear(h, W, b).split(sizes, -1)
            return x + m.down_proj((_FUSED["silu_mul"] if fused else _silu_mul)(g, u))
        if fused and self.silu:
            return x + m.down_proj(_FUSED["silu_mul"](m.gate_proj(h), m.up_proj(h)))
        return x + m(h)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float) -> Tensor:
        """One token's attention: q (B, H_kv, g, D) over keys/values (B, H_kv, L, D), mask
        (B, 1, 1, L) -> (B, H_kv, g, D)."""
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        if self.attention == "triton":
            return self._triton_attention(q, keys, values, mask, scale)
        if self.attention == "flex":  # query head h reads KV head h // g, as the reshape above
            B, H, g, D = q.shape

            def keep(score, b, h, q_idx, kv_idx):
                return torch.where(mask[b, 0, 0, kv_idx], score, float("-inf"))

            o = flex_attention(q.reshape(B, H * g, 1, D), keys, values, score_mod=keep, scale=scale,
                               enable_gqa=True)  # (B, H * g, 1, D)
            return o.reshape(B, H, g, D)
        s = (q @ keys.transpose(-1, -2)).float() * scale  # (B, H_kv, g, L), fp32 softmax as sdpa
        p = s.masked_fill(~mask, float("-inf")).softmax(-1).to(values.dtype)
        return p @ values

    def _write_prefill(self, slot: int, k: Tensor, v: Tensor, gate=None):
        T = k.shape[2]
        self.K[slot, :, :, :T] = k
        self.V[slot, :, :, :T] = v
        return self.K[slot, :, :, :T], self.V[slot, :, :, :T]

    def _write_step(self, slot: int, k: Tensor, v: Tensor, gate: Tensor | None):
        Ks, Vs = self.K[slot], self.V[slot]  # (B, H_kv, L, D)
        if gate is not None:  # keep the old K/V once no token iterates any more
            k = torch.where(gate, k, Ks.index_select(2, self.cur))
            v = torch.where(gate, v, Vs.index_select(2, self.cur))
        Ks.index_copy_(2, self.cur, k)
        Vs.index_copy_(2, self.cur, v)
        return Ks, Vs

    def _slot(self, i: int, k: int = 1) -> int:
        """Cache slot of layer i (evaluation k of the block under per_iter)."""
        if self.elm is None or i < self.bi:
            return i
        if i == self.bi:
            return i + (k - 1 if self.elm.kv_mode == "per_iter" else 0)
        return i + (self.elm.max_iter - 1 if self.elm.kv_mode == "per_iter" else 0)

    # -- prefill (eager) ------------------------------------------------------------------------

    def _prefill(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Run the prompt (B, T), fill the cache; returns the last position's logits (B, V)."""
        B, T = ids.shape
        pad = T - mask.sum(1)  # (B,) left padding
        positions = (torch.arange(T, device=self.device)[None] - pad[:, None]).clamp(min=0)
        rope = (self.cos[positions], self.sin[positions])  # (B, T, D)
        keys = mask.bool()
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        attn = causal[None] & keys[:, None, :]  # (B, T, T)
        attn = (attn | torch.eye(T, dtype=torch.bool, device=self.device))[:, None]  # pads see self
        x = get_embed(self.model)(ids)
        for i in range(len(self.layers)):
            if self.elm is not None and i == self.bi:
                x = self._prefill_block(x, rope, attn)
            else:
                x = self._layer(i, x, rope, attn, self._slot(i), self._write_prefill)
        self.valid.zero_()
        self.valid[:, :T] = keys
        self.pos.copy_(T - pad)
        self.cur.fill_(T)
        return get_head(self.model)(get_norm(self.model)(x[:, -1:]))[:, 0].float()

    def _prefill_block(self, h: Tensor, rope, attn) -> Tensor:
        c, calls = self.elm, [0]
        hb = F.linear(h, self.wh, self.b)

        def f(z):
            calls[0] += 1
            u = F.linear(z, self.wz) + hb
            return self._layer(self.bi, u, rope, attn, self._slot(self.bi, calls[0]),
                               self._write_prefill)

        out, _ = solve(f, torch.zeros_like(h), solver=c.solver, max_iter=c.max_iter, tol=c.tol,
                       tol_mode=c.tol_mode, **c.solver_options())
        return out

    # -- the decode step, in pieces that can each be captured -----------------------------------

    def _rope_mask(self):
        rope = (self.cos[self.pos][:, None], self.sin[self.pos][:, None])  # (B, 1, D)
        return rope, self.valid[:, None, None, :]  # mask (B, 1, 1, L)

    def _pre(self) -> None:
        """Embedding and the layers before the block (all layers for a dense model: then post)."""
        self.valid.index_fill_(1, self.cur, True)
        rope, mask = self._rope_mask()
        x = get_embed(self.model)(self.tok[:, None])  # (B, 1, d)
        stop = self.bi if self.elm is not None else len(self.layers)
        for i in range(stop):
            x = self._layer(i, x, rope, mask, self._slot(i), self._write_step)
        if self.elm is None:
            self._post(x)
            return
        self.h.copy_(x)
        self.hb.copy_(F.linear(x, self.wh, self.b))
        self.z.zero_()
        self.active.fill_(True)
        self.any_active.fill_(True)
        self.iters.zero_()

    def _eval(self, k: int) -> None:
        """Evaluation k (1-based) of the block, then the solver's update; mirrors elm_solvers."""
        c = self.elm
        rope, mask = self._rope_mask()
        gate = self.any_active if c.tol > 0 else None
        u = F.linear(self.z, self.wz) + self.hb
        fz = self._layer(self.bi, u, rope, mask, self._slot(self.bi, k), self._write_step, gate)
        if c.tol == 0:  # every token runs every evaluation: no residual, no masks (a NaN in fz
            # reaches the logits, whose check catches it)
            self.zout.copy_(fz)
            if k == c.max_iter:
                self.iters.fill_(k)
        else:
            self.bad |= ~torch.isfinite(fz).all()  # a frozen token's NaN would not reach the logits
            r = (fz - self.z).float().norm(dim=-1)[:, 0]  # (B,)
            if c.tol_mode == "rel":
                r = r / (fz.float().norm(dim=-1)[:, 0] + 1e-8)
            act = self.active
            self.iters.copy_(torch.where(act, torch.full_like(self.iters, k), self.iters))
            self.zout.copy_(fz if k == 1 else torch.where(act[:, None, None], fz, self.zout))
            self.active &= ~(r < c.tol)
            self.any_active.copy_(self.active.any())
        if c.solver == "naive":
            self.z.copy_(self.zout)  # active tokens: f(z); frozen ones keep their output
        elif k < c.max_iter:
            self._anderson(k, fz)

    def _anderson(self, k: int, fx: Tensor) -> None:
        c = self.elm
        x = self.z
        slot = (k - 1) % c.anderson_m
        dt = self.ax.dtype
        self.ax[:, slot] = x[:, 0].to(dt)
        self.af[:, slot] = fx[:, 0].to(dt)
        n = min(k, c.anderson_m)
        if n == 1:
            nxt = fx[:, 0].to(dt)
        else:
            nxt = anderson_mix(self.ax[:, :n], self.af[:, :n], c.anderson_beta, c.anderson_lam,
                               check=False)  # no host sync inside the graph
        self.z.copy_(torch.where(self.active[:, None, None], nxt[:, None].to(x.dtype), x))

    def _after_block(self) -> None:
        rope, mask = self._rope_mask()
        x = self.zout
        for i in range(self.bi + 1, len(self.layers)):
            x = self._layer(i, x, rope, mask, self._slot(i), self._write_step)
        self.evals.index_copy_(1, self.n_out, self.iters[:, None])
        self._post(x)

    def _post(self, x: Tensor) -> None:
        """Final norm, head, next token; advance the position."""
        logits = get_head(self.model)(self._norm(get_norm(self.model), x, self.fuse))[:, 0].float()
        self._emit(self._choose(logits))
        self.pos.add_(1)
        self.cur.add_(1)

    def _choose(self, logits: Tensor) -> Tensor:
        self.bad |= ~torch.isfinite(logits).all()
        if self._greedy:
            return logits.argmax(-1)
        logits = logits / self.temperature
        if self._top_k:
            kth = logits.topk(self._top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)  # Gumbel-max

    def _emit(self, nxt: Tensor) -> None:
        nxt = torch.where(self.done, self.pad, nxt)
        self.out.index_copy_(1, self.n_out, nxt[:, None])
        self.done |= torch.isin(nxt, self.stops)
        self.tok.copy_(nxt)
        self.n_out += 1

    # -- running the step -------------------------------------------------------------------------

    def _pieces(self) -> list:
        """The step as a list of callables: [pre, evaluation 1..K, after] for an ELM with a
        tolerance (the host decides between them), else the whole step as one. Under
        compile="step" each is compiled once (the greedy and top-k variants on first use)."""
        if "pieces" in self._compiled:
            return self._compiled["pieces"]
        if self.elm is None:
            pieces = [self._pre]
        else:
            evals = [lambda k=k: self._eval(k) for k in range(1, self.elm.max_iter + 1)]
            pieces = [self._pre, *evals, self._after_block]
            if self.elm.tol == 0:
                pieces = [lambda: [p() for p in (self._pre, *evals, self._after_block)]]
        if self.compiled:
            # fallback_random: sampling draws from torch's generator, as the eager step does
            options = {"fallback_random": True, **({"max_autotune": True} if self.autotune else {})}
            pieces = [torch.compile(_own_code(p), fullgraph=True, dynamic=False, options=options)
                      for p in pieces]
        self._compiled["pieces"] = pieces
        return pieces

    def _capture(self, key) -> list:
        """CUDA graphs of the step: one whole, or [pre, eval 1..K, post] with a tolerance."""
        if key in self._captured:
            return self._captured[key]
        pieces = self._pieces()
        groups = [[p] for p in pieces]
        for t in (self.n_out, self.cur, self.pos):  # the warm-up advances them; stay in bounds
            t.zero_()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels pick their algorithms outside the capture
            for _ in range(2):
                for p in pieces:
                    p()
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for group in groups:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                for p in group:
                    p()
            graphs.append(g)
        torch.cuda.synchronize()
        self._captured[key] = graphs
        return graphs

    def _step(self, graphs: list | None) -> int:
        """One decode step; returns the block evaluations the batch ran (0 for a dense model)."""
        adaptive = self.elm is not None and self.elm.tol > 0
        if not adaptive:
            if graphs is not None:
                graphs[0].replay()
            else:
                self._pieces()[0]()
            return self.elm.max_iter if self.elm is not None else 0
        run = (lambda i: graphs[i].replay()) if graphs is not None else (lambda i: self._pieces()[i]())
        run(0)
        K = self.elm.max_iter
        if graphs is None:  # eager: the host check costs nothing on a CPU
            k = 0
            for k in range(1, K + 1):
                run(k)
                if self.elm.tol > 0 and not bool(self.any_active):
                    break
            run(K + 1)
            return k
        # graphs: launch evaluation k + 1, then read whether any token was active after k
        flags, events = self._flags, self._events
        k = 1
        run(1)
        flags[1].copy_(self.any_active, non_blocking=True)
        events[1].record()
        while k < K:
            run(k + 1)
            flags[k + 1].copy_(self.any_active, non_blocking=True)
            events[k + 1].record()
            events[k].synchronize()
            k += 1
            if not bool(flags[k - 1]):
                break
        run(K + 1)
        return k

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 cfg: DecodeConfig = DecodeConfig()) -> tuple[Tensor, DecodeStats]:
        """New tokens (B, n) for left-padded prompts (B, T); rows that stopped hold the pad id."""
        ids = input_ids.to(self.device)
        B, T = ids.shape
        if B != self.B:
            raise ValueError(f"this decoder was built for batch size {self.B}, got {B}")
        if T + cfg.max_new_tokens > self.L:
            raise ValueError(f"prompt {T} + max_new_tokens {cfg.max_new_tokens} exceed the cache "
                             f"length {self.L}; build the Decoder with a larger max_len")
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device)
        if mask.shape != ids.shape:
            raise ValueError("attention_mask must have the shape of input_ids")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("prompts must be left padded (attention_mask 0s before the 1s), as for "
                             "batched generate")
        if (mask.sum(1) == 0).any():
            raise ValueError("a prompt is empty")
        gen = self.model.generation_config
        eos = gen.eos_token_id if cfg.stop_at_eos else None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if len(eos) > self.stops.numel():
            raise ValueError(f"at most {self.stops.numel()} eos ids are supported, got {len(eos)}")
        self.stops.fill_(-1)
        self.stops[:len(eos)] = torch.tensor(eos, dtype=torch.long)
        pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
        self.pad.fill_(int(pad))
        self._greedy, self._top_k = cfg.temperature == 0, cfg.top_k
        self.temperature.fill_(max(cfg.temperature, 1e-6))
        n_new = cfg.max_new_tokens
        weights = tuple(t.data_ptr() for t in self.model.parameters())
        if weights != self._weights:  # re-packed or moved since the graphs were captured
            self._captured.clear()
            self._compiled.clear()
            self._weights = weights
        graphs = self._capture((self._greedy, self._top_k)) if self.graphs else None

        torch.manual_seed(cfg.seed)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.done.zero_()
        self.bad.zero_()
        self.n_out.zero_()
        self.out.fill_(int(pad))
        self.evals.zero_()
        logits = self._prefill(ids, mask)
        first = self._choose(logits)
        self._emit(first)
        if self.elm is not None:  # the prompt's last token's count stands for the first new token
            self.evals[:, 0] = 0
        sync()
        t1 = time.perf_counter()
        steps, launches = 1, 0
        while steps < n_new:
            launches += self._step(graphs)
            steps += 1
            if steps % cfg.check_every == 0:
                if bool(self.bad):
                    break
                if cfg.stop_at_eos and bool(self.done.all()):
                    break
        sync()
        t2 = time.perf_counter()
        if bool(self.bad):
            raise NonFiniteError("decoding produced NaN/inf logits or block outputs; check the model")
        stats = DecodeStats(B, T, steps, t1 - t0, t2 - t1,
                            B * (steps - 1) / max(t2 - t1, 1e-9))
        if self.elm is not None and steps > 1:
            stats.block_evaluations = float(self.evals[:, 1:steps].float().mean())
            stats.block_launches = launches / (steps - 1)
        return self.out[:, :steps].clone(), stats

    def close(self) -> None:
        """Drop the graphs, the compiled step and the cache now (the compiled step refers back to
        the decoder, so ``del`` alone frees its GPU memory only at the next garbage collection)."""
        self._captured.clear()
        self._compiled.clear()
        self.K = self.V = None

    def cache_bytes(self) -> int:
        """Bytes of the K and V cache tensors."""
        return self.K.nbytes + self.V.nbytes


def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None,
             cfg: DecodeConfig = DecodeConfig(), cuda_graphs: bool = True,
             step: StepConfig = StepConfig(compile="ops")) -> tuple[Tensor, DecodeStats]:
    """One-off fast decoding: builds a Decoder sized for this call (see :class:`Decoder`). Its
    step compiles only the small fused kernels, shared by every call, since compiling the whole
    step costs more than one call saves; keep a Decoder to decode many batches."""
    B, T = input_ids.shape
    dec = Decoder(model, B, T + cfg.max_new_tokens, cuda_graphs=cuda_graphs, step=step)
    try:
        return dec.generate(input_ids, attention_mask, cfg)
    finally:
        dec.close()
