"""A model folder -> one GGUF file that llama.cpp runs: architecture, weights, tokenizer, template.

Edge users serve GGUF files with llama.cpp; elmkit writes transformers folders. A dense Llama,
Qwen2, Qwen3 or Mistral folder, and every depth-pruned one (a stock model with fewer layers), maps
onto llama.cpp's ``llama``, ``qwen2`` and ``qwen3`` graphs tensor for tensor:

    model.embed_tokens                  token_embd      (llama.cpp reuses it as the output when
    lm_head                             output           output.weight is absent: tied models)
    model.norm                          output_norm
    model.layers.N.input_layernorm      blk.N.attn_norm
    model.layers.N.self_attn.q_proj     blk.N.attn_q    (+ k, v, o -> attn_k, attn_v, attn_output;
                                                         Qwen2's biases; Qwen3's q_norm, k_norm)
    model.layers.N.post_attention_layernorm  blk.N.ffn_norm
    model.layers.N.mlp.gate_proj        blk.N.ffn_gate  (+ up, down -> ffn_up, ffn_down)

The names come from the gguf package's constants (``TENSOR_NAMES``), which also say which tensors
each llama.cpp architecture has; the metadata keys from its writer. One layout change: llama.cpp's
``llama`` graph rotates adjacent pairs of a head's dimensions where transformers rotates its two
halves, so the Q and K rows of a Llama are reordered (``_permute``); ``qwen2``/``qwen3`` rotate
halves like transformers and take the rows as they are. The tokenizer goes in as llama.cpp's
``gpt2`` vocabulary (byte-level BPE: SmolLM2, Qwen2.5, Llama 3, elmkit's byte tokenizer).

A slim (width-pruned) model, whose layers differ in head count and MLP width, goes to llama.cpp's
``deci`` graph, which reads the head count, KV-head count and MLP width as one array entry per layer
(0 heads: no attention; width 0: no MLP). Four things need care (``_plan_deci``):

- grouping: llama.cpp's query head h reads KV head h // (n_head / n_head_kv), equal runs, while a
  slim layer maps each kept query head to any kept KV head (``q_to_kv``). The query heads are
  reordered so that each KV head serves a run (Q rows and o_proj columns move together: exact), and a
  KV head that serves more queries than the others is written more than once, runs of the gcd.
- a layer with attention but no MLP: the deci graph skips the rest of a layer whose width is 0,
  its attention output included (it was written for Nemotron layers that have neither; measured with
  llama-cpp-python 0.3.36: the logits move by 0.3), so such a layer gets an MLP of width 1 with zero
  weights, which adds nothing. So does a last layer that keeps neither branch: there the skip also
  misses the selection of the output rows, and llama.cpp aborts.
- RoPE: deci rotates adjacent pairs, as llama does, so Q and K rows (and Qwen2's Q/K biases) of a
  slim model are reordered like a Llama's, whatever its family.
- FLAP's output biases: an attention or MLP output bias goes to attn_output.bias / ffn_down.bias; the
  constant a removed branch adds (its bias alone) goes to that zero MLP's ffn_down.bias, or, where the
  removed branch is an attention before a kept MLP, to the bias of the branch before it (the residual
  stream in between only adds). Both exact.

An ELM or a recurrent model has no llama.cpp graph (a block iterated to a fixed point, a core
repeated r times); each fails with one line that says what to use instead.

Tensors are read one at a time from the safetensors files and written straight into a temporary
file (its table of contents is computed from the shapes beforehand), renamed into place when
complete: memory holds about one tensor, and an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as Q
from tqdm.auto import tqdm

TYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
"""``--type`` -> (ggml type of the 2-D matrices, llama.cpp's file type)."""

ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp runs Mistral as llama (no sliding window)
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
"""transformers ``model_type`` -> llama.cpp architecture."""

SLIM_BASES = ("llama", "mistral", "qwen2")
"""Families whose slim models llama.cpp's deci graph computes (Qwen3's per-head q/k norms it has not)."""

NO_GGUF: dict[str, str] = {
    "elm": "is an ELM: its block is iterated to a fixed point with the input injected at every step, "
           "which no llama.cpp graph computes; serve it with elmkit's decoder (elmkit generate --model "
           "DIR) or with transformers (trust_remote_code=True)",
    "recurrent": "is a recurrent model: its core layers repeat r times through an adapter, which no "
                 "llama.cpp graph computes; serve it with elmkit's decoder (elmkit generate --model DIR) "
                 "or with transformers (trust_remote_code=True)",
}
"""elmkit's own model types, and why each has no GGUF export."""

# Where each transformers tensor goes: (module path, GGUF tensor kind). Per layer, "N" is the index.
TOP = (("model.embed_tokens", T.TOKEN_EMBD), ("model.norm", T.OUTPUT_NORM), ("lm_head", T.OUTPUT))
LAYER = (
    ("input_layernorm", T.ATTN_NORM),
    ("self_attn.q_proj", T.ATTN_Q),
    ("self_attn.k_proj", T.ATTN_K),
    ("self_attn.v_proj", T.ATTN_V),
    ("self_attn.o_proj", T.ATTN_OUT),
    ("self_attn.q_norm", T.ATTN_Q_NORM),
    ("self_attn.k_norm", T.ATTN_K_NORM),
    ("post_attention_layernorm", T.FFN_NORM),
    ("mlp.gate_proj", T.FFN_GATE),
    ("mlp.up_proj", T.FFN_UP),
    ("mlp.down_proj", T.FFN_DOWN),
)
REQUIRED = {T.TOKEN_EMBD, T.OUTPUT_NORM, T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT,
            T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN}

# Pre-tokenizer regexes as the tokenizers' own tokenizer.json files spell them, and llama.cpp's name
# for each (``tokenizer.ggml.pre`` picks llama.cpp's split of the text before the merges apply).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}


class _Writer(gguf.GGUFWriter):
    """The gguf package's writer, able to write an empty array too.

    llama.cpp refuses a ``gpt2`` vocabulary without the ``tokenizer.ggml.merges`` key, and a
    tokenizer without merges (elmkit's byte tokenizer: one token per byte) has an empty list, which
    the package's writer rejects. GGUF itself allows it: element type, count 0, no elements.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


@dataclass(eq=False)
class _Tensor:
    """One tensor of the file: where it comes from and how it is stored."""

    name: str
    """GGUF name, e.g. ``blk.0.attn_q.weight``."""
    key: str | None
    """safetensors key it is read from (None: computed, in ``data``)."""
    shape: tuple[int, ...]
    """Torch order, (rows, cols) for a matrix; the file lists it reversed."""
    qtype: Q
    """Storage type."""
    heads: int = 0
    """Reorder the rows over this many heads (Q and K of llama and deci files; 0: as they are)."""
    data: np.ndarray | None = None
    """The values of a computed tensor (llama3 rope factors, a zero MLP, a folded bias)."""
    rows: torch.Tensor | None = None
    """Take these rows (a bias: entries) first: a slim layer's heads regrouped (before ``heads``)."""
    cols: torch.Tensor | None = None
    """Take these columns first: o_proj's inputs in the regrouped head order."""

    @property
    def nbytes(self) -> int:
        if self.qtype == Q.F32:
            return 4 * math.prod(self.shape)
        if self.qtype == Q.F16:
            return 2 * math.prod(self.shape)
        return math.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype))  # blocks, as bytes


def write_gguf(folder: Path, out: Path, weight_type: str = "f16", progress: bool = True) -> dict:
    """Write the stock model in ``folder`` to ``out`` (GGUF) with its matrices in ``weight_type``."""
    from transformers import AutoConfig

    from .. import models  # noqa: F401  (registers the slim config with AutoConfig)

    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(_check_model_type(folder))
    _check_config(config, folder)
    weights = _Weights(folder)
    layout = None  # per-layer widths of a slim model (the deci arrays)
    if config.model_type == "slim":
        arch = gguf.MODEL_ARCH.DECI
        plan, layout = _plan_deci(weights, config, TYPES[weight_type][0])
    else:
        arch = ARCHS[config.model_type]
        plan = _plan(weights, config, arch, TYPES[weight_type][0])
    n_vocab = plan[0].shape[0]  # token_embd rows: the vocabulary the model scores
    rope = _rope(config)

    writer = _Writer(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(folder.parent.name if folder.name == "model" else folder.name)  # runs/<name>/model
    writer.add_file_type(TYPES[weight_type][1])
    if any(t.qtype not in (Q.F32, Q.F16, Q.BF16) for t in plan):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(writer, config, n_vocab, rope, layout)
    _add_tokenizer(writer, folder, config, n_vocab)
    if rope["type"] == "llama3":  # llama.cpp divides each rotary frequency by a stored factor
        factors = _llama3_factors(rope, _head_dim(config))
        plan.append(_Tensor(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", None, factors.shape, Q.F32,
                            data=factors))
    for t in plan:
        # raw_dtype gives the stored type; the dtype argument only matters for uint8 (byte shapes)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc=f"export {out.name}", unit="tensor", disable=not progress):
            writer.write_tensor_data(_encode(t, weights))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    counts = Counter(t.qtype.name.lower() for t in plan)
    return {"out": str(out), "architecture": gguf.MODEL_ARCH_NAMES[arch], "type": weight_type,
            "layers": config.num_hidden_layers, "vocab": n_vocab, "tensors": len(plan),
            "tensor_types": dict(counts), "bytes": out.stat().st_size,
            **({"layout": layout} if layout else {}), "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# What the folder holds
# ---------------------------------------------------------------------------------------------


def _check_model_type(folder: Path) -> Path:
    """Refuse elmkit's own model types and unknown families before anything is loaded."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}/config.json could not be read: {e}") from e
    model_type = raw.get("model_type")
    if model_type in NO_GGUF:
        raise ValueError(f"{folder} {NO_GGUF[model_type]}")
    if model_type == "slim":
        base = raw.get("base_model_type")
        if base not in SLIM_BASES:
            raise ValueError(f"{folder} is a slim {base} model; llama.cpp's deci graph, which runs layers of "
                             f"different widths, computes {', '.join(SLIM_BASES)} layers only (no per-head "
                             "q/k norm)")
        return folder
    if model_type not in ARCHS:
        raise ValueError(f"{folder} is a {model_type!r} model; GGUF export covers {', '.join(ARCHS)} "
                         "(dense or depth-pruned)")
    return folder


def _check_config(config, folder: Path) -> None:
    """What llama.cpp's llama/qwen2/qwen3 graphs cannot express fails here, by name."""
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{folder} holds quantized weights ({config.quantization_config}); export the "
                         "unquantized model")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"{folder} uses the {config.hidden_act} activation; llama.cpp's "
                         f"{config.model_type} graph computes SiLU")
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"{folder} has MLP biases (mlp_bias), which GGUF export does not write")
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention"}:
        raise ValueError(f"{folder} has {', '.join(sorted(kinds - {'full_attention'}))} layers; llama.cpp's "
                         f"{config.model_type} graph attends over the full context in every layer")


class _Weights:
    """The folder's safetensors tensors by key: one file, or the files its index names."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{folder} has no safetensors weights (model.safetensors or its "
                                    "index); save the model with save_pretrained first")
        self.handles = {}  # key -> open file; the files are memory-mapped, read per tensor
        for f in files:
            h = safe_open(str(folder / f), framework="pt")
            self.handles.update({k: h for k in h.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.handles

    def keys(self) -> set[str]:
        return set(self.handles)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self.handles[key].get_tensor(key).float()  # bf16/f16 -> f32 is exact


def _plan(weights: _Weights, config, arch: gguf.MODEL_ARCH, base: Q) -> list[_Tensor]:
    """Every tensor of the file in order, with its GGUF name, shape and type; unknown keys fail."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    allowed = gguf.MODEL_TENSORS[arch]
    n = config.num_hidden_layers
    used = {k for k in weights.keys() if k.endswith("rotary_emb.inv_freq")}  # old checkpoints: derived
    if tied:
        used.add("lm_head.weight")  # some checkpoints store the tied copy too; llama.cpp reuses token_embd
    plan: list[_Tensor] = []

    def add(key_base: str, kind: T, bid: int | None = None) -> None:
        found = False
        for suffix in ("weight", "bias"):
            key = f"{key_base}.{suffix}"
            if key not in weights or key in used:
                continue
            name = gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix
            if kind not in allowed:
                raise ValueError(f"{key} has no place in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} graph "
                                 f"(no {name})")
            shape = weights.shape(key)
            # llama's Q and K rows are reordered per head (see _permute): Q over the query heads, K over
            # the KV heads; biases likewise
            heads = 0
            if arch == gguf.MODEL_ARCH.LLAMA and kind in (T.ATTN_Q, T.ATTN_K):
                heads = config.num_attention_heads if kind == T.ATTN_Q else config.num_key_value_heads
            plan.append(_Tensor(name, key, shape, _storage(kind, shape, base, tied), heads))
            used.add(key)
            found = True
        if not found and kind in REQUIRED:
            raise ValueError(f"the weights have no {key_base}.weight, which a {config.model_type} model of "
                             f"{n} layers needs")

    add(*TOP[0])
    for i in range(n):
        for hf, kind in LAYER:
            add(f"model.layers.{i}.{hf}", kind, i)
    add(*TOP[1])
    if not tied:
        add(*TOP[2])
        if "lm_head.weight" not in weights:
            raise ValueError("the weights have no lm_head.weight and the config does not tie it to the "
                             "embedding (tie_word_embeddings is false)")
    left = sorted(weights.keys() - used)
    if left:
        raise ValueError(f"{len(left)} tensor(s) have no place in a GGUF {config.model_type} model, e.g. "
                         f"{', '.join(left[:3])} (layers beyond num_hidden_layers={n}, or a modified layer)")
    return plan


def _storage(kind: T, shape: tuple[int, ...], base: Q, tied: bool) -> Q:
    """Norms and biases f32; matrices in ``base``, except the 4-bit types' output matrix."""
    if len(shape) == 1:
        return Q.F32
    # the output matrix turns every hidden state into logits, and llama.cpp's quantizer keeps it at
    # higher precision; the embedding is that matrix when tied
    if base in (Q.Q4_0, Q.Q4_1) and (kind == T.OUTPUT or (tied and kind == T.TOKEN_EMBD)):
        base = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[base][0]
    return base if shape[-1] % block == 0 else Q.F16  # rows that don't fill whole blocks: f16


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (0..d/2-1 | d/2..d-1) to pairs (0, d/2, 1, d/2+1, ...).

    transformers rotates dimension i with i + d/2 (rotate_half); llama.cpp's llama graph rotates
    2i with 2i+1. With the rows interleaved, q·k and the rotation are the same computation.
    (heads*d, in) or (heads*d,) -> the same shape.
    """
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _plan_deci(weights: _Weights, config, base: Q) -> tuple[list[_Tensor], dict]:
    """A slim model's tensors as llama.cpp's deci architecture, and its per-layer widths.

    Per layer, from its ``slim_layers`` entry: the query heads regrouped behind their KV heads
    (``_regroup``), the MLP as it is, of width 1 and zeros where the layer keeps attention but no MLP,
    and every removed branch's constant output bias folded where it adds the same (module docstring).
    Returns the plan and ``{"head_count", "head_count_kv", "feed_forward_length": [one per layer],
    "kv_heads_repeated": extra KV heads written}``.
    """
    from ..models.slim import head_rows

    tied = bool(getattr(config, "tie_word_embeddings", False))
    hd, d = _head_dim(config), config.hidden_size
    specs = config.slim_layers
    if not specs[0]["q_to_kv"]:
        raise ValueError("layer 0 has no attention heads left; llama.cpp reads the head size of every layer "
                         "from layer 0's head count, so this model cannot be written as deci")
    used = {k for k in weights.keys() if k.endswith("rotary_emb.inv_freq")}
    if tied:
        used.add("lm_head.weight")

    def take(key: str) -> str:
        if key not in weights:
            raise ValueError(f"the weights have no {key}, which slim_layers says the model has")
        used.add(key)
        return key

    def bias(key: str) -> torch.Tensor | None:
        return weights.get(take(key)) if key in weights else None

    def tensor(kind: T, i: int | None, key: str | None, shape: tuple[int, ...], suffix: str = "weight",
               **kw) -> _Tensor:
        """One tensor of the file, stored as ``_storage`` says for its kind and shape."""
        gname = gguf.TENSOR_NAMES[kind].format(bid=i) + "." + suffix
        return _Tensor(gname, key, shape, _storage(kind, shape, base, tied), **kw)

    shape = weights.shape(take("model.embed_tokens.weight"))
    plan = [tensor(T.TOKEN_EMBD, None, "model.embed_tokens.weight", shape)]
    layout = {"head_count": [], "head_count_kv": [], "feed_forward_length": [], "kv_heads_repeated": 0}
    last_down = None  # the latest ffn_down.bias written (a _Tensor with data): where constants fold
    for i, s in enumerate(specs):
        pre = f"model.layers.{i}."
        q_to_kv, m = [int(g) for g in s["q_to_kv"]], int(s["intermediate_size"])
        # the constants removed branches add (NoAttention / NoMLP biases), (d,) or None
        c_attn = bias(pre + "self_attn.bias") if not q_to_kv else None
        c_mlp = bias(pre + "mlp.bias") if m == 0 else None
        for unused in ([pre + "input_layernorm.weight"] if not q_to_kv else []) + \
                      ([pre + "post_attention_layernorm.weight"] if m == 0 else []):
            used.add(unused)  # norms of removed branches: deci has no slot and needs none
        if q_to_kv:
            q_order, kv_src = _regroup(q_to_kv)
            n_q, n_kv = len(q_order), len(kv_src)
            layout["kv_heads_repeated"] += n_kv - len(set(kv_src))
            plan.append(tensor(T.ATTN_NORM, i, take(pre + "input_layernorm.weight"), (d,)))
            for proj, kind, order, heads in (("q_proj", T.ATTN_Q, q_order, n_q),
                                             ("k_proj", T.ATTN_K, kv_src, n_kv),
                                             ("v_proj", T.ATTN_V, kv_src, 0)):
                for suffix in ("weight", "bias"):
                    key = f"{pre}self_attn.{proj}.{suffix}"
                    if suffix == "bias" and key not in weights:
                        continue
                    shape = (len(order) * hd, *weights.shape(take(key))[1:])
                    plan.append(tensor(kind, i, key, shape, suffix, heads=heads, rows=head_rows(order, hd)))
            key = take(pre + "self_attn.o_proj.weight")
            shape = (weights.shape(key)[0], n_q * hd)
            plan.append(tensor(T.ATTN_OUT, i, key, shape, cols=head_rows(q_order, hd)))
            if pre + "self_attn.o_proj.bias" in weights:
                plan.append(tensor(T.ATTN_OUT, i, take(pre + "self_attn.o_proj.bias"), (d,), "bias"))
        else:
            n_q = n_kv = 0
            if c_attn is not None and m > 0:  # the MLP reads h + c: add c where the stream was last written
                last_down.data = last_down.data + c_attn.numpy()
                c_attn = None
        # the last layer too: deci's width-0 `continue` skips its selection of the output rows there,
        # and llama.cpp aborts (measured)
        zero = m == 0 and (n_q > 0 or c_attn is not None or c_mlp is not None or i == len(specs) - 1)
        n_ff = 1 if zero else m
        if n_ff:
            if zero:  # adds nothing but its bias; keeps llama.cpp from skipping the layer's attention
                plan.append(tensor(T.FFN_NORM, i, None, (d,), data=np.ones(d, np.float32)))
                for kind, shape in ((T.FFN_GATE, (1, d)), (T.FFN_DOWN, (d, 1)), (T.FFN_UP, (1, d))):
                    plan.append(tensor(kind, i, None, shape, data=np.zeros(shape, np.float32)))
                down = np.zeros(d, np.float32)
            else:
                plan.append(tensor(T.FFN_NORM, i, take(pre + "post_attention_layernorm.weight"), (d,)))
                for proj, kind in (("gate_proj", T.FFN_GATE), ("down_proj", T.FFN_DOWN),
                                   ("up_proj", T.FFN_UP)):
                    key = take(f"{pre}mlp.{proj}.weight")
                    plan.append(tensor(kind, i, key, weights.shape(key)))
                b = bias(pre + "mlp.down_proj.bias")
                down = np.zeros(d, np.float32) if b is None else b.numpy()
            for c in (c_attn, c_mlp):
                if c is not None:
                    down = down + c.numpy()
            last_down = tensor(T.FFN_DOWN, i, None, (d,), "bias", data=down)
            plan.append(last_down)
        layout["head_count"].append(n_q)
        layout["head_count_kv"].append(n_kv)
        layout["feed_forward_length"].append(n_ff)
    plan.append(tensor(T.OUTPUT_NORM, None, take("model.norm.weight"), (d,)))
    if not tied:
        plan.append(tensor(T.OUTPUT, None, take("lm_head.weight"), weights.shape("lm_head.weight")))
    left = sorted(weights.keys() - used)
    if left:
        raise ValueError(f"{len(left)} tensor(s) have no place in a GGUF deci model, e.g. "
                         f"{', '.join(left[:3])}")
    # an ffn_down.bias of zeros is left out (llama.cpp's tensor is optional), as the source has none
    plan = [t for t in plan if not (t.name.endswith("ffn_down.bias") and not t.data.any())]
    return plan, layout


def _regroup(q_to_kv: list[int]) -> tuple[list[int], list[int]]:
    """Query heads in an order where every KV head serves an equal run, as llama.cpp's grouping reads.

    llama.cpp's query head h reads KV head h // (n_q / n_kv). Each KV head's queries are split into
    runs of the gcd of the group sizes, and the KV head is written once per run. Returns (query heads
    in file order, the source KV head of each file KV head): [1, 0, 1, 0] -> ([1, 3, 0, 2], [0, 1])
    (reordered only); [0, 0, 1, 0] -> ([0, 1, 3, 2], [0, 0, 0, 1]) (KV head 0 written three times).
    """
    groups: dict[int, list[int]] = {}
    for q, g in enumerate(q_to_kv):
        groups.setdefault(g, []).append(q)
    run = math.gcd(*(len(qs) for qs in groups.values()))
    q_order, kv_src = [], []
    for g in sorted(groups):
        for j in range(0, len(groups[g]), run):
            q_order += groups[g][j:j + run]
            kv_src.append(g)
    return q_order, kv_src


def _encode(t: _Tensor, weights: _Weights) -> np.ndarray:
    """The bytes of one tensor as stored: f32, f16, or gguf's blocks (uint8, per row)."""
    w = torch.from_numpy(t.data.astype(np.float32)) if t.data is not None else weights.get(t.key)
    if t.rows is not None:
        w = w[t.rows]
    if t.cols is not None:
        w = w[:, t.cols]
    if t.heads:
        w = _permute(w, t.heads)
    if t.qtype == Q.F16 and w.abs().max() > torch.finfo(torch.float16).max:  # bf16 reaches further
        raise ValueError(f"{t.key or t.name} has values beyond f16's range (+-65504); export with --type "
                         "bf16 or f32")
    return gguf.quants.quantize(np.ascontiguousarray(w.numpy()), t.qtype)


# ---------------------------------------------------------------------------------------------
# Metadata: architecture, rope, tokenizer
# ---------------------------------------------------------------------------------------------


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_architecture(w: gguf.GGUFWriter, config, n_vocab: int, rope: dict, layout: dict | None) -> None:
    """The ``<arch>.*`` keys llama.cpp builds the graph from; a slim model's widths one per layer."""
    d = _head_dim(config)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    if layout:
        w.add_feed_forward_length(layout["feed_forward_length"])
        w.add_head_count(layout["head_count"])
        w.add_head_count_kv(layout["head_count_kv"])
    else:
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    w.add_key_length(d)  # llama.cpp's default is embedding_length / head_count (not Qwen3's)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_rope_freq_base(rope["theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    if rope["type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])


def _rope(config) -> dict:
    """The rotary settings: theta, type and its parameters (transformers 5 ``rope_parameters``)."""
    p = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    p["theta"] = p.get("rope_theta", getattr(config, "rope_theta", None))
    p["type"] = p.get("rope_type", p.get("type", "default"))
    if p["theta"] is None:
        raise ValueError("the config gives no rope_theta")
    if p["type"] not in ("default", "linear", "yarn", "llama3"):
        raise ValueError(f"rope type {p['type']!r} has no GGUF form elmkit writes (default, linear, yarn, "
                         "llama3)")
    if p["type"] == "yarn" and not p.get("original_max_position_embeddings"):
        p["original_max_position_embeddings"] = config.max_position_embeddings
    return p


def _llama3_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.x's frequency scaling as llama.cpp stores it: one divisor per rotary frequency.

    Frequencies whose wavelength fits well inside the original context are kept (factor 1), the
    long ones slowed by ``factor``, and those in between blended. (head_dim / 2,) f32.
    """
    inv = 1.0 / rope["theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    ctx, factor = rope["original_max_position_embeddings"], rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = (ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < ctx / high, 1.0, np.where(wavelen > ctx / low, factor, blended))
    return out.astype(np.float32)


def _add_tokenizer(w: gguf.GGUFWriter, folder: Path, config, n_vocab: int) -> None:
    """The ``tokenizer.*`` keys: llama.cpp's gpt2 (byte-level BPE) vocabulary and the chat template.

    Token i of the list is id i; ids the tokenizer does not use (an embedding padded past the
    vocabulary) are filled with ``[PADi]`` marked unused, so the list matches the embedding rows.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{folder} has no readable tokenizer ({type(e).__name__}); a GGUF file carries "
                         "its tokenizer: save it next to the model") from e
    if not hasattr(tok, "backend_tokenizer"):
        raise ValueError(f"{folder}: only fast (tokenizer.json) tokenizers can be exported")
    spec = json.loads(tok.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    pre, prefix_space = _pre_tokenizer(spec, bool(merges), folder)

    vocab = tok.get_vocab()  # token -> id, added tokens included
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding has "
                         f"{n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():  # specials: matched whole, never merged
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.STRING)  # may be empty (_Writer)
    w.add_add_space_prefix(prefix_space)

    def first(x):
        return x[0] if isinstance(x, (list, tuple)) else x

    bos = tok.bos_token_id if tok.bos_token_id is not None else first(getattr(config, "bos_token_id", None))
    eos = tok.eos_token_id if tok.eos_token_id is not None else first(getattr(config, "eos_token_id", None))
    for add, i in ((w.add_bos_token_id, bos), (w.add_eos_token_id, eos),
                   (w.add_unk_token_id, tok.unk_token_id), (w.add_pad_token_id, tok.pad_token_id)):
        if i is not None:
            add(int(i))
    # whether the tokenizer itself adds BOS / EOS, read from what it does rather than its flags
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    w.add_add_bos_token(bool(len(full) > len(plain) and bos is not None and full[0] == bos))
    w.add_add_eos_token(bool(len(full) > len(plain) and eos is not None and full[-1] == eos))
    template = tok.chat_template
    if isinstance(template, dict):  # several named templates: llama.cpp reads them by name
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)


def _pre_tokenizer(spec: dict, has_merges: bool, folder: Path) -> tuple[str, bool]:
    """llama.cpp's name for how the tokenizer splits text before its merges, and add_prefix_space.

    Known: ``gpt-2`` (ByteLevel's own regex: the SmolLM2 folder elmkit fetches), ``smollm`` (digits
    split singly, then GPT-2's regex: SmolLM2, StarCoder), ``qwen2`` and ``llama-bpe`` (their Split
    regex). Without merges every byte is its own token whatever the split: ``default``.
    """
    model = spec["model"]
    parts = _flatten(spec.get("pre_tokenizer"))
    byte_level = [p for p in parts if p["type"] == "ByteLevel"]
    if model.get("type") != "BPE" or not byte_level or model.get("byte_fallback"):
        kind = model.get("type") + (" with byte fallback" if model.get("byte_fallback") else "")
        raise ValueError(f"{folder}: the tokenizer is {kind}, not byte-level BPE; GGUF export writes "
                         "byte-level BPE tokenizers (SmolLM2, Qwen2.5, Llama 3) only")
    prefix_space = bool(byte_level[0].get("add_prefix_space", False))
    if not has_merges:
        return "default", prefix_space
    rest = [p for p in parts if p["type"] != "ByteLevel"]
    regex = byte_level[0].get("use_regex", True)
    if not rest and regex:
        return "gpt-2", prefix_space
    if ([p["type"] for p in rest] == ["Digits"] and rest[0].get("individual_digits") and regex):
        return "smollm", prefix_space
    if len(rest) == 1 and rest[0]["type"] == "Split" and not regex:
        pattern = rest[0].get("pattern", {}).get("Regex")
        if pattern in PRE_SPLITS:
            return PRE_SPLITS[pattern], prefix_space
    raise ValueError(f"{folder}: the tokenizer splits text in a way elmkit cannot name for llama.cpp "
                     f"({', '.join(p['type'] for p in parts)}); known: gpt-2, smollm, qwen2, llama-bpe")


def _flatten(pre: dict | None) -> list[dict]:
    if pre is None:
        return []
    if pre["type"] == "Sequence":
        return [p for q in pre["pretokenizers"] for p in _flatten(q)]
    return [pre]
