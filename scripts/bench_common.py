"""Shared pieces of the GPU benchmarks: the Llama-3-8B-shaped model, its tokenizer, the data.

Nothing is downloaded (shared/gpu/README.md): the model gets random weights and is saved to
local disk in bf16, as a user's download would be; the tokenizer is a WordLevel model over the
names ``t0 … t128252`` plus three specials (128,256 ids, Llama-3's vocabulary size), so texts of
those names tokenize one word to one token and lengths are known before tokenizing.

``--arch tiny`` builds the same vocabulary on a 2-layer body: a CPU dry run of every script.

    python scripts/bench_common.py --arch 8b --out /tmp/llama3-8b-random
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

VOCAB = 128256
SPECIALS = ("<pad>", "<s>", "</s>")
WORDS = VOCAB - len(SPECIALS)  # t0 … t128252

ARCHS = {
    # Llama-3-8B (shared/gpu/README.md)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    # same vocabulary and head layout, tiny body: CPU dry runs and the per-step overhead worst case
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def build_model(out: str | Path, arch: str = "8b") -> Path:
    """A randomly initialised Llama of ``arch`` saved in bf16 at ``out`` (kept if already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    started = time.time()
    cfg = LlamaConfig(vocab_size=VOCAB, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                      pad_token_id=VOCAB - 3, **ARCHS[arch])
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    build_tokenizer().save_pretrained(out)
    print(f"bench: built {arch} model at {out} in {time.time() - started:.0f}s", flush=True)
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(WORDS)}
    vocab.update({name: WORDS + k for k, name in enumerate(SPECIALS)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=1 << 20)


def sample_lengths(n: int, target: int, seed: int, *, median_factor: float = 0.55, sigma: float = 0.45,
                   lo: int = 16) -> list[int]:
    """Log-normal lengths (median ``median_factor``·target): ~9 % run past ``target`` (a batch of 8
    usually reaches it) and truncation at ``target`` cuts ~2 % of the tokens. Pure."""
    rng = random.Random(seed)
    mu = math.log(median_factor * target)
    return [max(lo, min(int(rng.lognormvariate(mu, sigma)), 3 * target)) for _ in range(n)]


def write_dataset(path: str | Path, lengths: list[int], seed: int) -> Path:
    """JSONL of ``{"text": "t.. t.."}`` rows with exactly ``lengths[i]`` words each."""
    rng = random.Random(seed + 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for n in lengths:
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(WORDS)}" for _ in range(n))}) + "\n")
    return path


def truncation_share(lengths: list[int], max_len: int, extra: int = 1) -> float:
    """Share of the data's tokens (text + ``extra`` EOS) cut when rows are truncated to ``max_len``. Pure."""
    total = sum(n + extra for n in lengths)
    cut = sum(max(0, n + extra - max_len) for n in lengths)
    return cut / total if total else 0.0


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
            out["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
            out["cuda"] = torch.version.cuda
    except Exception as exc:  # noqa: BLE001 - versions are informative only
        out["gpu_error"] = str(exc)
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="8b")
    ap.add_argument("--out", default=os.environ.get("BENCH_MODEL", "/tmp/llama3-8b-random"))
    args = ap.parse_args()
    build_model(args.out, args.arch)


if __name__ == "__main__":
    main()
