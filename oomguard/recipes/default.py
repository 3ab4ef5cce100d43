"""The embedded default: a tiny Llama-architecture model and an SFT dataset, so
``oomguard demo`` and the tests need no download.

Shipped files (``oomguard/recipes/default/``): ``config.json`` (the architecture)
and ``sft.jsonl`` (the examples, also the tokenizer's training corpus). On first
use the model directory is built from them (a BPE tokenizer trained on the corpus,
random weights from a fixed seed) and cached under
``$OOMGUARD_CACHE`` or ``$XDG_CACHE_HOME/oomguard`` or ``~/.cache/oomguard``, in a
folder named by a hash of the shipped files and this builder's version. The build
happens in a temporary folder that is renamed into place, so two processes may
race: the loser discards its copy and uses the winner's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["build_model", "build_tokenizer", "BUILD_VERSION", "cache_root", "CHAT_TEMPLATE", "CONFIG_FILE",
           "DATASET_FILE", "default_dataset_path", "ensure_default_model", "ENV_CACHE", "SHIPPED_DIR", "shipped_hash",
           "SPECIAL_TOKENS", "WEIGHT_SEED"]

SHIPPED_DIR = Path(__file__).with_name("default")
CONFIG_FILE = SHIPPED_DIR / "config.json"
DATASET_FILE = SHIPPED_DIR / "sft.jsonl"
ENV_CACHE = "OOMGUARD_CACHE"
BUILD_VERSION = "2"  # bump when the builder below changes what it writes
WEIGHT_SEED = 1234
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# One turn per role, each closed by eos: simple, and close enough to Llama-3 to
# exercise the same pad/eos handling.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def default_dataset_path() -> Path:
    """The shipped SFT dataset: JSONL, one ``{"messages": [...]}`` chat a line."""
    return DATASET_FILE


def cache_root() -> Path:
    """Where built artefacts live: $OOMGUARD_CACHE, else $XDG_CACHE_HOME/oomguard, else ~/.cache/oomguard."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "oomguard"


def shipped_hash() -> str:
    """First 16 hex digits of sha256 over the shipped files and BUILD_VERSION."""
    h = hashlib.sha256(BUILD_VERSION.encode())
    for path in (CONFIG_FILE, DATASET_FILE):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """The local directory of the tiny default model (config, weights, tokenizer); built once.

    ``cache_dir`` overrides :func:`cache_root` (tests use it for isolation).
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"default-model-{shipped_hash()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    try:
        _build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # another process won the race: its copy is identical (same inputs, same seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(directory: Path) -> None:
    tokenizer = build_tokenizer()
    model = build_model()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _corpus() -> list[str]:
    lines = []
    for raw in DATASET_FILE.read_text(encoding="utf-8").splitlines():
        lines.extend(m["content"] for m in json.loads(raw)["messages"])
    return lines


def build_tokenizer():
    """A byte-level BPE trained on the shipped corpus, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    vocab_size = json.loads(CONFIG_FILE.read_text())["vocab_size"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0.. in this order: pad=0, bos=1, eos=2 as config.json says
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model():
    """The tiny Llama with random weights drawn from WEIGHT_SEED (deterministic on CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(str(CONFIG_FILE))
    # devices=[]: fork only the CPU generator, which initialises the weights; leaves the caller's RNG alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)
