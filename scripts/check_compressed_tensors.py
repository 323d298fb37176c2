"""Checks a relprune `sparse-bitmask` checkpoint with compressed-tensors' own decompressor.

Usage:  VENV/bin/python scripts/check_compressed_tensors.py --compressed DIR --dense DIR [--hf]

VENV holds torch, safetensors and compressed-tensors 0.12.x (the last releases that read
sparse-bitmask; see docs/PERFORMANCE.md for how to make it). DIR (compressed) was written by
`relprune compress --format sparse-bitmask` (or `prune-hf --format sparse-bitmask`) from the
dense checkpoint DIR (dense). The script
  1. reads the compressed checkpoint's config.json as compressed-tensors does
     (ModelCompressor.from_pretrained) and checks it finds a sparse-bitmask compressor;
  2. decompresses the weights with that compressor and compares every tensor, bit for bit, with
     the dense checkpoint's;
  3. with --hf, also loads both directories with transformers' AutoModel and compares the
     models' state dicts (reported, not required: recent transformers may refuse a
     compressed-tensors sparsity-only checkpoint).
Prints one JSON object; exits 1 if 1 or 2 fails.
"""
import argparse, json, os, sys

import torch
from safetensors.torch import load_file
import compressed_tensors
from compressed_tensors.compressors import ModelCompressor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compressed", required=True)
    ap.add_argument("--dense", required=True)
    ap.add_argument("--hf", action="store_true")
    a = ap.parse_args()
    out = {"compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__}

    compressor = ModelCompressor.from_pretrained(a.compressed)
    if compressor is None or compressor.sparsity_compressor is None:
        raise SystemExit(f"{a.compressed}/config.json: compressed-tensors finds no sparsity config")
    out["sparsity_config"] = compressor.sparsity_config.model_dump()
    out["sparsity_compressor"] = type(compressor.sparsity_compressor).__name__

    dense = load_file(os.path.join(a.dense, "model.safetensors"))
    path = os.path.join(a.compressed, "model.safetensors")
    decompressed = dict(compressor.sparsity_compressor.decompress(path))
    mismatched = sorted(
        n for n in dense
        if n not in decompressed
        or decompressed[n].dtype != dense[n].dtype
        or decompressed[n].shape != dense[n].shape
        or not torch.equal(decompressed[n].view(torch.uint8) if dense[n].dtype.is_floating_point
                           else decompressed[n], dense[n].view(torch.uint8)
                           if dense[n].dtype.is_floating_point else dense[n])
    )
    extra = sorted(set(decompressed) - set(dense))
    out.update(
        tensors=len(dense),
        decompressed=len(decompressed),
        zeros=int(sum((t == 0).sum().item() for t in dense.values() if t.dtype.is_floating_point)),
        elements=int(sum(t.numel() for t in dense.values() if t.dtype.is_floating_point)),
        mismatched=mismatched,
        unexpected=extra,
        identical=not mismatched and not extra,
    )

    if a.hf:
        try:
            import transformers
            from transformers import AutoModel
            out["transformers"] = transformers.__version__
            m_dense = AutoModel.from_pretrained(a.dense).state_dict()
            m_comp = AutoModel.from_pretrained(a.compressed).state_dict()
            diff = sorted(n for n in m_dense if n not in m_comp or not torch.equal(m_dense[n], m_comp[n]))
            out["hf_load"] = {"ok": not diff, "differing": diff[:20]}
        except Exception as e:  # reported, not fatal: see the docstring
            out["hf_load"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}

    print(json.dumps(out, indent=1))
    sys.exit(0 if out["identical"] else 1)


if __name__ == "__main__":
    main()
