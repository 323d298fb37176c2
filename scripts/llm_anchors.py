# An independent PyTorch check of ../shared/anchors/smollm2-pruning.json: Wanda and SparseGPT as
# their reference code runs them (locuslab/wanda `prune_wanda` / `prune_sparsegpt`, IST-DASLab's
# `fasterprune`), sequential layer by layer, on SmolLM2 loaded by transformers from its GGUF file,
# perplexity of valid.txt by the anchors' protocol. docs/LLM.md gives what it measured.
#
#   bash ../shared/bench/setup_torch.sh venv
#   venv/bin/pip install transformers gguf accelerate tokenizers safetensors
#   venv/bin/python scripts/llm_anchors.py sparsegpt unstructured   # or wanda, 2:4, dense
#
# transformers 5 hands each decoder layer a `cache` (DynamicCache) among the keyword arguments a
# layer-0 catcher records; passed back on every calibration call, each window then also attends
# to the keys and values of the windows before it. The script drops it (what the algorithms
# mean); KEEP_CACHE=1 keeps it, which reproduces the anchors' figures. STARTS='[...]' sets other
# calibration window starts, SAVE=FILE writes the pruned projections (to compare masks).
# SHARED=DIR points at the shared material (default: ../shared beside the repository).
import json, math, sys, time
import torch, torch.nn as nn
from transformers import AutoModelForCausalLM
from tokenizers import Tokenizer

torch.set_num_threads(1)
import os
SHARED = os.environ.get("SHARED", os.path.join(os.path.dirname(__file__), "../../shared"))
M = f"{SHARED}/models/SmolLM2-135M-Instruct-Q4_1"
A = json.load(open(f"{SHARED}/anchors/smollm2-pruning.json"))
method, pattern = sys.argv[1], sys.argv[2]
hp = len(sys.argv) > 3 and sys.argv[3] == "f64"
prunen, prunem = (2, 4) if pattern == "2:4" else (0, 0)
sparsity = 0.5
tok = Tokenizer.from_file(f"{M}/tokenizer.json")


def ids_of(path):
    lines = [l.strip() for l in open(path, encoding="utf-8") if l.strip()]
    return tok.encode("\n\n".join(lines), add_special_tokens=False).ids


model = AutoModelForCausalLM.from_pretrained(M, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                             dtype=torch.float32)
model.eval()
calib = ids_of(f"{SHARED}/data/debian-reference-en/calib.txt")
assert len(calib) == A["calibration"]["tokens_in_text"], len(calib)
import os
starts = json.loads(os.environ["STARTS"]) if "STARTS" in os.environ else A["calibration"]["window_starts"]
wins = [calib[s:s + 512] for s in starts]


@torch.no_grad()
def ppl():
    ids = ids_of(f"{SHARED}/data/debian-reference-en/valid.txt")
    nll, n = 0.0, 0
    for s in range(0, len(ids), 512):
        w = torch.tensor([ids[s:s + 512]])
        if w.shape[1] < 2:
            continue
        logits = model(w).logits[0, :-1].double()
        nll += nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
    return math.exp(nll / n)


class SparseGPT:
    def __init__(self, layer):
        self.layer, self.columns = layer, layer.weight.shape[1]
        self.H = torch.zeros((self.columns, self.columns))
        self.nsamples = 0

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t()
        tmp = 1
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())

    def fasterprune(self, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=.01):
        dt = torch.float64 if hp else torch.float32
        W = self.layer.weight.data.clone().to(dt)
        H = self.H.to(dt)
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        diag = torch.arange(self.columns)
        H[diag, diag] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        H = torch.linalg.cholesky(H, upper=True)
        Hinv = H
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prunen == 0:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
                mask1 = tmp <= thresh
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                    mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.data.dtype)


class WrappedGPT:
    def __init__(self, layer):
        self.layer, self.columns = layer, layer.weight.shape[1]
        self.scaler_row = torch.zeros((self.columns,))
        self.nsamples = 0

    def add_batch(self, inp):
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        tmp = 1
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def find_layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def prune():
    layers = model.model.layers
    cache = {"inps": [], "kw": None}

    class Catcher(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.attention_type = getattr(m, "attention_type", None)

        def forward(self, x, **kw):
            cache["inps"].append(x)
            cache["kw"] = kw
            raise ValueError

    layers[0] = Catcher(layers[0])
    for w in wins:
        try:
            model(torch.tensor([w]))
        except ValueError:
            pass
    layers[0] = layers[0].m
    inps, kw = cache["inps"], cache["kw"]
    kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "cache") or os.environ.get("KEEP_CACHE")}
    kw["use_cache"] = False
    for li, layer in enumerate(layers):
        subset = find_layers(layer)
        wrapped = {n: (SparseGPT if method == "sparsegpt" else WrappedGPT)(subset[n]) for n in subset}
        hs = [subset[n].register_forward_hook(
            (lambda n: lambda _, inp, out: wrapped[n].add_batch(inp[0].data))(n)) for n in subset]
        for x in inps:
            layer(x, **kw)
        for h in hs:
            h.remove()
        for n in subset:
            if method == "sparsegpt":
                wrapped[n].fasterprune(sparsity, prunen, prunem)
            else:
                W = subset[n].weight.data
                metric = W.abs() * torch.sqrt(wrapped[n].scaler_row.reshape((1, -1)))
                mask = torch.zeros_like(metric) == 1
                if prunen != 0:
                    for ii in range(metric.shape[1]):
                        if ii % prunem == 0:
                            tmp = metric[:, ii:(ii + prunem)].float()
                            mask.scatter_(1, ii + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
                else:
                    idx = torch.sort(metric, dim=-1, stable=True)[1][:, :int(metric.shape[1] * sparsity)]
                    mask.scatter_(1, idx, True)
                W[mask] = 0
        outs = []
        for x in inps:
            o = layer(x, **kw)
            outs.append(o[0] if isinstance(o, tuple) else o)
        inps = outs
        print("layer", li, flush=True)


t = time.time()
if method == "dense":
    print(json.dumps({"method": "dense", "ppl": ppl()}))
else:
    prune()
    secs = time.time() - t
    lin = [m.weight for l in model.model.layers for m in find_layers(l).values()]
    z = sum((w == 0).sum().item() for w in lin) / sum(w.numel() for w in lin)
    if "SAVE" in os.environ:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if "_proj" in k}, os.environ["SAVE"])
    print(json.dumps({"method": method, "pattern": pattern, "f64": hp, "sparsity": z,
                      "ppl": ppl(), "seconds": secs}))
