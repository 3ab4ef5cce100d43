"""The embedded SFT examples: short instruction/response chats about GPU memory,
fine-tuning and checkpoints, written for this project.

They are generated from templates with a fixed seed and shipped as
``oomguard/recipes/default/sft.jsonl`` (a test checks the file still equals what
this module generates). Regenerate after editing the templates with::

    python -m oomguard.recipes.examples

Lengths vary on purpose: about one example in six chains several paragraphs so
that a ``max_seq_length`` cut (the first rung of the OOM ladder) truncates a
measurable share of the data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["generate_examples", "LONG_SHARE", "N_EXAMPLES", "render_jsonl", "SEED", "write_examples"]

SEED = 20240611
N_EXAMPLES = 360
LONG_SHARE = 1 / 6  # share of examples that chain many facts (hundreds of tokens)

_TOPICS = {
    "GPU memory": [
        "Model weights, gradients, optimizer state and activations all compete for the same GPU memory.",
        "A 4-bit NF4 model stores roughly half a byte per weight, plus small quantization constants.",
        "Activations grow with batch size times sequence length, so long sequences are the first thing to cut.",
        "The caching allocator keeps freed blocks reserved, so reserved memory is usually above allocated memory.",
        "Fragmentation can make an allocation fail even when the total free memory looks large enough.",
        "Setting expandable_segments lets the allocator grow segments instead of leaving holes between them.",
        "The CUDA context itself takes about half a gibibyte before any tensor is created.",
        "Paged optimizers move optimizer state to host memory when the GPU runs short.",
    ],
    "fine-tuning": [
        "LoRA trains two small matrices per target layer while the base weights stay frozen.",
        "QLoRA combines a 4-bit base model with LoRA adapters kept in higher precision.",
        "The LoRA rank sets the size of the adapter; alpha divided by rank scales its update.",
        "Gradient accumulation sums gradients over several micro-batches before one optimizer step.",
        "The effective batch is the per-device batch times accumulation steps times the number of devices.",
        "Gradient clipping with a max norm of 0.3 keeps early QLoRA updates from exploding.",
        "A warmup period raises the learning rate slowly so the first steps do not overshoot.",
        "bf16 keeps the exponent range of fp32, so it rarely overflows the way fp16 can.",
    ],
    "checkpoints": [
        "A checkpoint holds the adapter, the optimizer state, the scheduler state and the random number state.",
        "trainer_state.json is written last, so a checkpoint without it was cut off while saving.",
        "Resuming with the same effective batch continues on exactly the samples that were not yet seen.",
        "Without optimizer.pt a resumed run silently restarts its learning-rate schedule.",
        "Keeping older checkpoints lets a supervisor roll back past a step whose loss became NaN.",
        "Saving every few hundred steps bounds how much work a crash can cost.",
        "The newest checkpoint may be half written; the newest complete one is the safe choice.",
        "An emergency checkpoint saved just before the process dies keeps the lost work small.",
    ],
    "out-of-memory recovery": [
        "A CUDA out-of-memory error during the forward pass leaves the weights untouched.",
        "Restarting the whole process gives a fresh CUDA context with no leaked memory.",
        "Halving the per-device batch while doubling accumulation keeps the effective batch exact.",
        "Lowering the maximum sequence length shortens activations but truncates long examples.",
        "Cutting the LoRA rank shrinks the adapter and its optimizer state.",
        "A NaN loss is caught on the step it happens, before the optimizer applies a bad update.",
        "A hang is detected when the heartbeat file stops being touched.",
        "Host memory exhaustion shows up as the kernel killing the process with SIGKILL.",
    ],
}

_QUESTIONS = [
    "What should I know about {topic}?",
    "Explain one fact about {topic}.",
    "Give me a short tip on {topic}.",
    "Why does {topic} matter when fine-tuning a language model?",
    "Tell me something useful about {topic}.",
]
_LONG_QUESTIONS = [
    "Write a detailed note on {topic} for someone running an overnight fine-tuning job.",
    "Summarize everything a practitioner should remember about {topic}.",
]
_OPENERS = ["", "In short: ", "Here is the key point. ", "A useful rule: "]


def _short_example(rng: random.Random) -> dict:
    topic = rng.choice(sorted(_TOPICS))
    facts = rng.sample(_TOPICS[topic], k=rng.randint(1, 3))
    answer = rng.choice(_OPENERS) + " ".join(facts)
    return _chat(rng.choice(_QUESTIONS).format(topic=topic), answer)


def _long_example(rng: random.Random) -> dict:
    topic = rng.choice(sorted(_TOPICS))
    paragraphs = []
    for _ in range(rng.randint(4, 8)):  # paragraphs; each draws from every topic
        other = rng.choice(sorted(_TOPICS))
        paragraphs.append(" ".join(rng.sample(_TOPICS[other], k=rng.randint(3, 6))))
    return _chat(rng.choice(_LONG_QUESTIONS).format(topic=topic), "\n\n".join(paragraphs))


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def generate_examples(n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    """The examples, deterministic for a given ``n`` and ``seed``."""
    rng = random.Random(seed)
    return [_long_example(rng) if rng.random() < LONG_SHARE else _short_example(rng) for _ in range(n)]


def render_jsonl(examples: list[dict]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in examples)


def write_examples(path: Path) -> Path:
    path.write_text(render_jsonl(generate_examples()), encoding="utf-8")
    return path


if __name__ == "__main__":
    target = Path(__file__).with_name("default") / "sft.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_examples(target)}")
