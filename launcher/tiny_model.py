"""Make a small Qwen3-architecture model with random weights and a locally trained tokenizer.

No model hub here (nor in CI): the demo, the tests and the benchmarks serve models made by this module.
Two sizes: ``tiny`` (a few MB, boots in seconds) and ``qwen3-0.6b`` (the real Qwen3-0.6B shape, random bf16
weights, ~1.2 GB: a realistic CPU cold boot). The tokenizer is byte-level BPE (a word-level tokenizer breaks
``stop`` in ``transformers serve``) with a ChatML chat template, as Qwen3 uses.

Shapes every engine accepts (one local model serves them all):
- ``head_dim`` >= 32: vLLM's CPU attention refuses 16 at the first request ("Unsupported CPU attention
  configuration"); 32, 64, 80, 128 work.
- the tokenizer has exactly ``vocab_size`` ids: a random model emits any id, and an id past the tokenizer
  decodes to nothing (streams stall on empty deltas, vLLM's detokenizer may fail). The trained BPE vocab is
  padded with plain printable filler tokens up to the model's vocabulary.
A model folder records the shape it was made with (``coldstart-model.json``); an older shape is remade.

Writes atomically: the model is saved under a temporary name and renamed, so an interrupted run never leaves
a half-written model that a later run would serve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Hyper-parameters by size name. "qwen3-0.6b" is Qwen/Qwen3-0.6B's config.json shape.
SIZES: dict[str, dict[str, object]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1024,
        max_position_embeddings=2048,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
}

_CORPUS = (
    "Hello! How can I help you today? The quick brown fox jumps over the lazy dog. "
    "Inference servers start faster when they are restored from a snapshot instead of booted. "
    "0123456789 user assistant system: what is the capital of France? Paris is the capital of France."
)


MARKER = "coldstart-model.json"
# Bumped whenever a size's shape or the tokenizer changes: cached models of an older shape are remade.
SHAPE_VERSION = 2


def _pad_vocab(tok, vocab_size: int):  # (Tokenizer, int) -> Tokenizer
    """``tok`` with plain filler tokens appended until it has ``vocab_size`` ids (each decodes to itself:
    printable ASCII maps to itself in the byte-level alphabet)."""
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in data.get("added_tokens", [])}
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    i = 0
    while next_id < vocab_size:
        token = f"~{i:x}~"
        i += 1
        if token not in taken:
            vocab[token] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(data))


def _train_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 1024),
        special_tokens=SPECIAL_TOKENS,
        # Printable ASCII only (byte-level: space is "Ġ", newline "Ċ"): a random model then never emits
        # half a UTF-8 character, which a streaming detokenizer would hold back.
        initial_alphabet=[chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"],
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    tok = _pad_vocab(tok, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(out: Path, size: str = "tiny", seed: int = 0, dtype: str = "bfloat16") -> Path:
    """Write a random model of ``size`` to ``out`` (if absent) and return ``out``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; valid: {', '.join(SIZES)}")
    out = Path(out).absolute()
    marker = {"size": size, "seed": seed, "dtype": dtype, "shape_version": SHAPE_VERSION}
    if (out / "config.json").exists():
        try:
            if json.loads((out / MARKER).read_text()) == marker:
                return out
        except (OSError, ValueError):
            pass
        if not (out / MARKER).exists() and not (out / "tokenizer.json").exists():
            return out  # not one of ours: leave it alone
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _train_tokenizer(int(SIZES[size]["vocab_size"]))  # type: ignore[call-overload]
    shape = dict(SIZES[size])
    shape["vocab_size"] = len(tokenizer)  # == SIZES' vocab_size: every id the model can emit decodes
    config = Qwen3Config(
        **shape,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.do_sample = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker))
        if out.exists():  # an older shape of ours: move it aside, then swap in the new one
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="coldstart make-model",
        description="Write a Qwen3-architecture model with random weights and a local tokenizer (no hub).",
    )
    parser.add_argument("out", type=Path, help="folder to write (left alone if it already holds a model)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    path = make_model(args.out, args.size, args.seed, args.dtype)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
