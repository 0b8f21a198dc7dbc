"""Models of shapes the suite's own tiny model does not have: whose greedy answer is one chosen token.

A new user's model is not ours: its greedy first token may decode to ``""`` (a special token, half a UTF-8
character) or be end-of-sequence, and the canary must still verify a restore. These are small
Llama-architecture models with their own byte-level tokenizer (trained locally, no hub), whose weights are
biased so the greedy token is the same chosen id after any prompt:
- every embedding has a constant 1.0 in hidden dimension 0, and no layer writes to dimension 0 (row 0 of
  each ``o_proj`` and ``down_proj`` is zero), so the final hidden state always has it;
- after the final RMSNorm that dimension dominates, and only the chosen id's ``lm_head`` row reads it
  (weight 10, every other row 0 there): its logit is ~100, the others' are ~0.2.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from support import CACHE

# first token -> the tokenizer's token it is
TOKENS = {
    "empty": "<|im_start|>",  # a special token that is not EOS: skipped when decoding, the text is ""
    "eos": "<|im_end|>",  # the model's end-of-sequence token
}
SHAPE_VERSION = 1


def make_biased_model(kind: str) -> tuple[Path, int]:
    """The cached model whose greedy token is ``TOKENS[kind]`` (made on first use) and that token's id."""
    out = CACHE / "models" / f"llama-first-{kind}"
    marker = {"kind": kind, "shape_version": SHAPE_VERSION}
    try:
        made = json.loads((out / "coldstart-biased.json").read_text())
        if {k: made.get(k) for k in marker} == marker:
            return out, int(made["token_id"])
    except (OSError, ValueError, KeyError):
        pass
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from coldstart.launcher.tiny_model import _train_tokenizer

    tokenizer = _train_tokenizer(1024)
    token_id = int(tokenizer.convert_tokens_to_ids(TOKENS[kind]))
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention refuses 16
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[token_id, 0] = 10.0
        ids = torch.tensor([tokenizer.encode("Name a colour.")])
        assert int(model(ids).logits[0, -1].argmax()) == token_id, "the bias did not pick the token"
    model = model.to(torch.bfloat16)
    model.generation_config.do_sample = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "coldstart-biased.json").write_text(json.dumps({**marker, "token_id": token_id}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, token_id
