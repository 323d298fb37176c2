"""PyTorch side of `cargo xtask bench`'s inference tasks, on the weights relprune ran.

Usage:  VENV/bin/python scripts/torch_infer.py TASK [options]     (one JSON object on stdout)

Tasks (each runs once to warm up, then --repeat timed times; seconds per run are printed):
  linear --weights F --batch N [--reps K]
                                    y = F.linear(x, W, b) for a seeded x of N rows, W and b the
                                    `weight` and `bias` of safetensors file F; also, as
                                    `csr_seconds`, the same product with W as a torch.sparse CSR
                                    tensor (torch.sparse.mm(W, xᵀ)ᵀ + b); seconds per product,
                                    timed over K products
  lenet300 --weights F --batch N --images K
  lenet5 --weights F --batch N --images K
                                    forward passes over K seeded images in batches of N with the
                                    LeNet weights of F (relprune's names: fc1/fc2/fc3, conv1/conv2/
                                    fc1/fc2), no grad
  minilm --model DIR --sentences FILE [--batch 32]
                                    sentence-transformers' SentenceTransformer(DIR).encode of the
                                    file's lines (it sorts them by length before batching)
Common: --threads T (torch.set_num_threads), --repeat R.
"""
import argparse, json, time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


def timed(fn, repeat):
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=["linear", "lenet300", "lenet5", "minilm"])
    ap.add_argument("--weights")
    ap.add_argument("--model")
    ap.add_argument("--sentences")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    out = {"task": a.task, "engine": f"torch {torch.__version__}", "threads": torch.get_num_threads()}

    with torch.no_grad():
        if a.task == "linear":
            t = load_file(a.weights)
            w, b = t["weight"], t["bias"]
            x = torch.randn(a.batch, w.shape[1])
            def reps(fn):
                def run():
                    for _ in range(a.reps):
                        fn()
                return [s / a.reps for s in timed(run, a.repeat)]
            out["seconds"] = reps(lambda: F.linear(x, w, b))
            csr = w.to_sparse_csr()
            xt = x.t().contiguous()
            out["csr_seconds"] = reps(lambda: torch.sparse.mm(csr, xt).t() + b)
        elif a.task in ("lenet300", "lenet5"):
            t = load_file(a.weights)
            x = torch.rand(a.images, 784)
            if a.task == "lenet300":
                def net(v):
                    v = F.relu(F.linear(v, t["fc1.weight"], t["fc1.bias"]))
                    v = F.relu(F.linear(v, t["fc2.weight"], t["fc2.bias"]))
                    return F.linear(v, t["fc3.weight"], t["fc3.bias"])
            else:
                def net(v):
                    v = F.max_pool2d(F.conv2d(v.view(-1, 1, 28, 28), t["conv1.weight"], t["conv1.bias"]), 2)
                    v = F.max_pool2d(F.conv2d(v, t["conv2.weight"], t["conv2.bias"]), 2)
                    v = F.relu(F.linear(v.flatten(1), t["fc1.weight"], t["fc1.bias"]))
                    return F.linear(v, t["fc2.weight"], t["fc2.bias"])
            def run():
                for i in range(0, a.images, a.batch):
                    net(x[i:i + a.batch])
            out["seconds"] = timed(run, a.repeat)
        else:
            from sentence_transformers import SentenceTransformer
            lines = [l.rstrip("\n") for l in open(a.sentences, encoding="utf-8")]
            m = SentenceTransformer(a.model, device="cpu")
            out["seconds"] = timed(lambda: m.encode(lines, batch_size=a.batch), a.repeat)
            out["sentences"] = len(lines)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
