"""PyTorch reference for `cargo xtask bench`'s training-step tasks: the same model, the same batches,
the same work per step as relprune's candle training loop, written as a typical PyTorch user would.

Usage:
  VENV/bin/python xtask/bench/torch_train_steps.py --task TASK --batches FILE \
      --threads T --steps N --warmup W

Runs W warm-up steps, then N timed steps, cycling through the batches of FILE. A step is
forward + loss, backward, optimizer (step and zero_grad), each part timed with
time.perf_counter(). Prints ONE JSON object on stdout:
  {"task", "threads", "steps", "seconds": [per-step total, ...], "forward", "backward",
   "optimizer" (totals over the timed steps, s), "parameters" (trained), "tokens" (non-pad
   target or input tokens over the timed steps)}
Logs go to stderr.

Tasks:
  transformer-step    the from-scratch encoder-decoder Transformer of models/src/transformer.rs
                      (Embeddings::SharedAll, Positions::Sinusoidal), label-smoothed
                      cross-entropy (crates/relprune-tasks/src/loss.rs), Adam
                      (crates/relprune-prune/src/adam.rs, no weight decay).
                      FILE: {"config": {...}, "batches": [{"source", "source_mask",
                      "decoder_input", "target"}, ...]} written by the Rust side.
  minilm-distill-step all-MiniLM-L6-v2 (transformers' BertModel from the directory FILE names)
                      distilled against its own dense embeddings (mean pooling, L2-normalized,
                      loss 1 − cos), the parameters prune-hf trains, masked Adam with the
                      regularizer's decay (crates/relprune-tasks/src/encoder.rs,
                      crates/relprune-prune/src/adam.rs). FILE: {"model", "trained",
                      "prunable", "lr", "beta1", "beta2", "eps", "relevance", "gate", "lambda",
                      "penalty", "batches": [{"input_ids", "attention_mask"}, ...]}.
  smollm2-block-step  one decoder layer of SmolLM2-135M (transformers' LlamaDecoderLayer and
                      LlamaRotaryEmbedding from the model's config.json, default attention
                      implementation) trained block-wise as the decoder-LM method's recovery
                      passes do (crates/relprune-hf/src/llm.rs `layer_distill_loss`): one
                      512-token window per step, mean squared error to the dense layer's
                      outputs, masked Adam without the regularizer. FILE: {"config", "layer",
                      "tensors" (safetensors: layer.<name>, input.<i>, target.<i>, and check.0,
                      relprune's output of the pruned layer on input.0, which the reference
                      must reproduce before anything is timed), "windows",
                      "lr", "beta1", "beta2", "eps"}.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Additive mask value of hidden keys (models/src/attention.rs `MASKED`): finite, so a fully
# hidden row (an all-padding source row) stays finite instead of NaN.
MASKED = -1e9
# nn.LayerNorm's default eps, as models/src/transformer.rs `LAYER_NORM_EPS`.
LAYER_NORM_EPS = 1e-5


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# transformer-step
# ---------------------------------------------------------------------------------------------

# Config keys and their defaults when absent (the defaults are TransformerConfig::base's /
# AdamConfig's where the Rust side has one; `vocab`, `pad_id` and the sizes are required).
TRANSFORMER_DEFAULTS = {
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "pre_norm": False,          # TransformerConfig: #[serde(default)] → post-norm
    "scale_embedding": True,    # TransformerConfig: default_true
    "max_len": 1024,
    "label_smoothing": 0.1,     # Seq2SeqConfig::default
    "lr": 1e-3,                 # AdamConfig::default
    "beta1": 0.9,               # AdamConfig::default
    "beta2": 0.999,             # AdamConfig::default (the benchmark passes 0.98)
    "eps": 1e-8,                # AdamConfig::default
    "weight_decay": 0.0,        # AdamConfig::default
}
TRANSFORMER_REQUIRED = ("vocab", "d_model", "heads", "ffn_dim", "encoder_layers",
                        "decoder_layers", "pad_id")


def transformer_config(raw):
    """The config with defaults filled in; rejects what this script does not model."""
    missing = [k for k in TRANSFORMER_REQUIRED if k not in raw]
    if missing:
        raise SystemExit(f"config lacks {missing}")
    c = dict(TRANSFORMER_DEFAULTS)
    c.update(raw)
    for k in ("src_vocab", "tgt_vocab"):
        if k in raw and raw[k] != c["vocab"]:
            raise SystemExit(f"{k} {raw[k]} differs from vocab {c['vocab']}: only SharedAll "
                             "embeddings (one vocabulary) are modelled")
    # Only Embeddings::SharedAll and Positions::Sinusoidal are modelled (serde's spelling of the
    # Rust enums is accepted, as are lower-case / snake-case forms).
    emb = str(raw.get("embeddings", "SharedAll")).lower().replace("_", "")
    if emb != "sharedall":
        raise SystemExit(f"embeddings {raw['embeddings']!r}: only SharedAll is modelled")
    pos = raw.get("positions", "Sinusoidal")
    if not (isinstance(pos, str) and pos.lower() == "sinusoidal"):
        raise SystemExit(f"positions {pos!r}: only Sinusoidal is modelled")
    if c["d_model"] % c["heads"]:
        raise SystemExit(f"d_model {c['d_model']} is not divisible by heads {c['heads']}")
    known = set(TRANSFORMER_DEFAULTS) | set(TRANSFORMER_REQUIRED) | {
        "src_vocab", "tgt_vocab", "embeddings", "positions", "bos_id", "eos_id",
        "decoupled_weight_decay"}
    unknown = sorted(set(raw) - known)
    if unknown:
        log(f"torch_train_steps: ignoring unknown config keys {unknown}")
    return c


def sinusoidal_positions(n_pos, dim):
    """models/src/hf/marian.rs `sinusoidal_positions`: row p, column j < ceil(d/2) is
    sin(p / 10000^(2j/d)), column ceil(d/2) + j the cosine of the same angle."""
    half = dim // 2 + dim % 2
    pos = torch.arange(n_pos, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(half, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * j / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(angle)
    table[:, half:] = torch.cos(angle[:, : dim - half])
    return table.float()


class MultiheadAttention(nn.Module):
    """q/k/v/out projections with biases; softmax(q·kᵀ/√head_dim + mask)·v with dropout on the
    weights (models/src/attention.rs `Attention`)."""

    def __init__(self, d, heads, dropout):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, d // heads, dropout
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def split(self, x):
        b, l, _ = x.shape
        return x.view(b, l, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, kv, mask):
        b, t, d = x.shape
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(kv)), self.split(self.v_proj(kv))
        # Default scale 1/√head_dim, as ours (query_scale = head_dim^-0.5); additive float mask.
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(ctx.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """fc2(relu(fc1(x))), no dropout inside (transformer.rs `FeedForward`)."""

    def __init__(self, d, ffn):
        super().__init__()
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Sublayer(nn.Module):
    """x + drop(f(LN(x))) pre-norm, LN(x + drop(f(x))) post-norm (transformer.rs `residual`)."""

    def __init__(self, d, dropout, pre_norm):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.dropout, self.pre_norm = dropout, pre_norm

    def forward(self, x, f):
        if self.pre_norm:
            return x + F.dropout(f(self.norm(x)), self.dropout, self.training)
        return self.norm(x + F.dropout(f(x), self.dropout, self.training))


class EncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.self_attn = MultiheadAttention(d, c["heads"], c["attention_dropout"])
        self.self_attn_sub = Sublayer(d, c["dropout"], c["pre_norm"])
        self.ffn = FeedForward(d, c["ffn_dim"])
        self.ffn_sub = Sublayer(d, c["dropout"], c["pre_norm"])

    def forward(self, h, mask):
        h = self.self_attn_sub(h, lambda x: self.self_attn(x, x, mask))
        return self.ffn_sub(h, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d = c["d_model"]
        self.self_attn = MultiheadAttention(d, c["heads"], c["attention_dropout"])
        self.self_attn_sub = Sublayer(d, c["dropout"], c["pre_norm"])
        self.encoder_attn = MultiheadAttention(d, c["heads"], c["attention_dropout"])
        self.encoder_attn_sub = Sublayer(d, c["dropout"], c["pre_norm"])
        self.ffn = FeedForward(d, c["ffn_dim"])
        self.ffn_sub = Sublayer(d, c["dropout"], c["pre_norm"])

    def forward(self, h, enc, self_mask, src_mask):
        h = self.self_attn_sub(h, lambda x: self.self_attn(x, x, self_mask))
        h = self.encoder_attn_sub(h, lambda x: self.encoder_attn(x, enc, src_mask))
        return self.ffn_sub(h, self.ffn)


class Transformer(nn.Module):
    """models/src/transformer.rs `Transformer` with Embeddings::SharedAll and sinusoidal
    positions: one table for source, target and the (bias-free) output projection."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        d, pad = c["d_model"], c["pad_id"]
        self.embed_tokens = nn.Embedding(c["vocab"], d, padding_idx=pad)
        self.register_buffer("positions", sinusoidal_positions(c["max_len"], d), persistent=False)
        self.embed_scale = math.sqrt(d) if c["scale_embedding"] else 1.0
        self.encoder_layers = nn.ModuleList(EncoderLayer(c) for _ in range(c["encoder_layers"]))
        self.decoder_layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["decoder_layers"]))
        # Final layer norm per stack, pre-norm only.
        self.encoder_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS) if c["pre_norm"] else None
        self.decoder_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS) if c["pre_norm"] else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """transformer.rs `initial`: N(0, 1/d) embeddings with the pad row zeroed; Xavier-uniform
        matrices (gain 1/√2 for q/k/v); zero biases; unit layer-norm scales."""
        d = self.c["d_model"]
        nn.init.normal_(self.embed_tokens.weight, 0.0, d ** -0.5)
        self.embed_tokens.weight[self.c["pad_id"]].zero_()
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                gain = 2 ** -0.5 if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj") else 1.0
                nn.init.xavier_uniform_(m.weight, gain=gain)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, ids):
        l = ids.shape[1]
        if l > self.c["max_len"]:
            raise ValueError(f"sequence of {l} positions exceeds max_len {self.c['max_len']}")
        x = self.embed_tokens(ids) * self.embed_scale + self.positions[:l]
        return F.dropout(x, self.c["dropout"], self.training)

    def forward(self, source, source_mask, decoder_input):
        b, t = decoder_input.shape
        # Additive masks as ours (attention.rs key_mask / causal_mask, transformer.rs decode_t):
        # padded source keys hidden everywhere, future and padded target keys in self-attention.
        src_mask = ((1.0 - source_mask.float()) * MASKED).view(b, 1, 1, -1)
        causal = torch.full((t, t), MASKED).triu_(1)
        tgt_pad = (decoder_input == self.c["pad_id"]).float() * MASKED
        self_mask = causal.view(1, 1, t, t) + tgt_pad.view(b, 1, 1, t)

        h = self.embed(source)
        for layer in self.encoder_layers:
            h = layer(h, src_mask)
        if self.encoder_norm is not None:
            h = self.encoder_norm(h)
        enc = h

        h = self.embed(decoder_input)
        for layer in self.decoder_layers:
            h = layer(h, enc, self_mask, src_mask)
        if self.decoder_norm is not None:
            h = self.decoder_norm(h)
        # Tied output projection, no bias.
        return F.linear(h, self.embed_tokens.weight)


def load_transformer_batches(path):
    with open(path) as f:
        data = json.load(f)
    c = transformer_config(data["config"])
    batches = []
    for i, b in enumerate(data["batches"]):
        t = {k: torch.tensor(b[k], dtype=torch.long) for k in
             ("source", "source_mask", "decoder_input", "target")}
        if t["source"].shape != t["source_mask"].shape or t["decoder_input"].shape != t["target"].shape \
                or t["source"].shape[0] != t["target"].shape[0]:
            raise SystemExit(f"batch {i}: inconsistent shapes "
                             f"{ {k: tuple(v.shape) for k, v in t.items()} }")
        hi = max(int(t["source"].max()), int(t["decoder_input"].max()), int(t["target"].max()))
        if hi >= c["vocab"]:
            raise SystemExit(f"batch {i}: token id {hi} is outside the vocabulary ({c['vocab']})")
        if not (t["target"] != c["pad_id"]).any():
            raise SystemExit(f"batch {i}: every target is padding")
        batches.append(t)
    if not batches:
        raise SystemExit("no batches")
    return c, batches


def transformer_step(args):
    c, batches = load_transformer_batches(args.batches)
    model = Transformer(c)
    model.train()
    params = list(model.parameters())
    # Adam as MaskedAdam without masks or regularizer: u = (m1/bc1)/(√(m2/bc2) + ε), which is
    # torch's formula too. Ours with weight decay is AdamW-style by default
    # (decoupled_weight_decay: true), so a nonzero weight_decay selects AdamW here.
    opt_cls = torch.optim.AdamW if c["weight_decay"] > 0 and c.get(
        "decoupled_weight_decay", True) else torch.optim.Adam
    opt = opt_cls(params, lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                  weight_decay=c["weight_decay"])
    pad, eps_ls, vocab = c["pad_id"], c["label_smoothing"], c["vocab"]

    def step(batch):
        t0 = time.perf_counter()
        logits = model(batch["source"], batch["source_mask"], batch["decoder_input"])
        # loss.rs: (1−ε)·nll + ε·mean_c(−log p_c), averaged over non-pad targets — exactly
        # PyTorch's label_smoothing with ignore_index and reduction="mean" (no class weights).
        loss = F.cross_entropy(logits.view(-1, vocab), batch["target"].view(-1),
                               ignore_index=pad, label_smoothing=eps_ls)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss.item()

    count = lambda b: int((b["target"] != pad).sum())
    return {**timed(args, batches, step, count), "parameters": sum(p.numel() for p in params)}


def timed(args, batches, step, count):
    """W warm-up steps, then N timed ones cycling through `batches`: the per-part totals."""
    n = len(batches)
    for i in range(args.warmup):
        *_, loss = step(batches[i % n])
        log(f"warm-up step {i}: loss {loss:.4f}")
    seconds, fwd, bwd, optim, tokens = [], 0.0, 0.0, 0.0, 0
    for i in range(args.steps):
        b = batches[(args.warmup + i) % n]
        f, bw, o, loss = step(b)
        seconds.append(f + bw + o)
        fwd, bwd, optim = fwd + f, bwd + bw, optim + o
        tokens += count(b)
        log(f"step {i}: {f + bw + o:.4f}s (forward {f:.4f}, backward {bw:.4f}, "
            f"optimizer {o:.4f}), loss {loss:.4f}")
    return {"seconds": seconds, "forward": fwd, "backward": bwd, "optimizer": optim,
            "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# minilm-distill-step
# ---------------------------------------------------------------------------------------------

def sentence_embeddings(hidden, mask):
    """Mean pooling over the unmasked tokens, L2-normalized (sentence-transformers')."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def minilm_step(args):
    from transformers import BertModel

    with open(args.batches) as f:
        data = json.load(f)
    model = BertModel.from_pretrained(data["model"])
    # crates/relprune-tasks/src/encoder.rs runs the student without dropout.
    model.eval()
    named = dict(model.named_parameters())
    missing = [n for n in data["trained"] if n not in named]
    if missing:
        raise SystemExit(f"parameters not in the checkpoint: {missing[:5]}")
    trained = set(data["trained"])
    for n, p in named.items():
        p.requires_grad_(n in trained)
    params = [named[n] for n in data["trained"]]
    prunable = [named[n] for n in data["prunable"]]
    masks = [torch.ones_like(w) for w in prunable]
    batches = [{k: torch.tensor(b[k], dtype=torch.long) for k in ("input_ids", "attention_mask")}
               for b in data["batches"]]
    if not batches:
        raise SystemExit("no batches")
    with torch.no_grad():
        for b in batches:
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
            b["teacher"] = sentence_embeddings(h, b["attention_mask"])
    opt = torch.optim.Adam(params, lr=data["lr"], betas=(data["beta1"], data["beta2"]),
                           eps=data["eps"])
    gate, lam = data["gate"], data["lambda"]
    if data["penalty"] != "L2" or data["relevance"] not in ("Gradient", "OutputSensitivity", "Taylor"):
        raise SystemExit(f"no reference for penalty {data['penalty']}, relevance {data['relevance']}")

    def decay_gate(w, g):
        # crates/relprune-core: the relevance score, then the gate over it.
        s = (w * g).abs() if data["relevance"] == "Taylor" else g.abs()
        if gate["kind"] == "soft":
            return (1.0 - s).clamp_(min=0.0)
        if gate["kind"] == "hard-max":
            return (s < gate["tau"] * s.max()).to(w.dtype)
        return torch.ones_like(w)

    def step(b):
        t0 = time.perf_counter()
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0]
        student = sentence_embeddings(h, b["attention_mask"])
        loss = (1.0 - (student * b["teacher"]).sum(1)).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        # MaskedAdam (crates/relprune-prune/src/adam.rs): masked gradients, Adam, then the
        # regularizer's decay λ·d⊙w outside the learning rate, then the masks again.
        with torch.no_grad():
            gates = []
            for w, m in zip(prunable, masks):
                # The pooler is trained but unused by the loss: no gradient, no update.
                if w.grad is not None:
                    w.grad.mul_(m)
                    gates.append((w, m, decay_gate(w, w.grad)))
            opt.step()
            for w, m, d in gates:
                w.sub_(lam * d * w)
                w.mul_(m)
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss.item()

    count = lambda b: int(b["attention_mask"].sum())
    return {**timed(args, batches, step, count), "parameters": sum(p.numel() for p in params)}


# ---------------------------------------------------------------------------------------------
# smollm2-block-step
# ---------------------------------------------------------------------------------------------

def smollm2_block_step(args):
    from safetensors.torch import load_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    with open(args.batches) as f:
        data = json.load(f)
    config = LlamaConfig.from_json_file(data["config"])
    # What from_pretrained picks on a CPU; with no mask it is causal by `is_causal`.
    config._attn_implementation = "sdpa"
    tensors = load_file(data["tensors"])
    layer = LlamaDecoderLayer(config, layer_idx=data["layer"])
    state = {k[len("layer."):]: v for k, v in tensors.items() if k.startswith("layer.")}
    layer.load_state_dict(state, strict=True)
    layer.train()
    rotary = LlamaRotaryEmbedding(config)
    windows = [(tensors[f"input.{i}"], tensors[f"target.{i}"]) for i in range(data["windows"])]
    if not windows:
        raise SystemExit("no windows")
    projections = [m.weight for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                      layer.self_attn.v_proj, layer.self_attn.o_proj,
                                      layer.mlp.gate_proj, layer.mlp.up_proj,
                                      layer.mlp.down_proj)]
    # The method trains the projections alone (norms fixed); the masks are the pruned zeros.
    for p in layer.parameters():
        p.requires_grad_(False)
    for w in projections:
        w.requires_grad_(True)
    masks = [(w != 0).to(w.dtype) for w in projections]
    opt = torch.optim.Adam(projections, lr=data["lr"], betas=(data["beta1"], data["beta2"]),
                           eps=data["eps"])
    tokens = windows[0][0].shape[1]
    position_ids = torch.arange(tokens).unsqueeze(0)

    def forward(x):
        out = layer(x, attention_mask=None, position_ids=position_ids,
                    position_embeddings=rotary(x, position_ids))
        return out[0] if isinstance(out, tuple) else out

    # Same work or no comparison: the pruned layer must compute what relprune's computes.
    with torch.no_grad():
        expected = tensors["check.0"]
        err = (forward(windows[0][0]) - expected).abs().max().item()
        scale = expected.abs().max().item()
    if not err <= 1e-4 * max(scale, 1.0):
        raise SystemExit(f"the reference layer differs from relprune's by {err:.3g} "
                         f"(outputs up to {scale:.3g})")
    log(f"reference layer matches relprune's within {err:.3g} (outputs up to {scale:.3g})")

    def step(b):
        x, y = b
        t0 = time.perf_counter()
        loss = F.mse_loss(forward(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        # MaskedAdam without a regularizer: masked gradients, Adam, the masks again.
        with torch.no_grad():
            for w, m in zip(projections, masks):
                w.grad.mul_(m)
            opt.step()
            for w, m in zip(projections, masks):
                w.mul_(m)
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, loss.item()

    count = lambda b: int(b[0].shape[0] * b[0].shape[1])
    return {**timed(args, windows, step, count),
            "parameters": sum(w.numel() for w in projections)}


TASKS = {
    "transformer-step": transformer_step,
    "minilm-distill-step": minilm_step,
    "smollm2-block-step": smollm2_block_step,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--batches", required=True, help="JSON file of config and batches")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.threads < 1 or args.steps < 0 or args.warmup < 0:
        raise SystemExit("--threads must be ≥ 1, --steps and --warmup ≥ 0")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = TASKS[args.task](args)
    print(json.dumps({"task": args.task, "threads": args.threads, "steps": args.steps, **out}))


if __name__ == "__main__":
    main()
