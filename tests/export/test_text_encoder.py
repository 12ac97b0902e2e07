"""CLIP tokenizer and text encoder as the official FrozenCLIPTextEmbedder uses them."""
from __future__ import annotations

import logging

import torch

from caphuman.export.clip import MAX_TOKENS, TextEncoder, load_tokenizer


def test_tokenizer_reproduces_openai_clip_ids():
    tok = load_tokenizer()
    # ids of openai/clip-vit-large-patch14's tokenizer for this prompt
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok.get_vocab()) == 49408


def test_padding_truncation_and_warning(tiny_config, caplog):
    enc = TextEncoder(tiny_config.text_clip).eval()
    short = enc.tokenize([""])
    assert short.input_ids.shape == (1, MAX_TOKENS)
    assert short.input_ids[0, 0] == 49406 and (short.input_ids[0, 1:] == 49407).all()  # pad = <|endoftext|>
    long_prompt = " ".join(["portrait"] * 100)
    toks = enc.tokenize([long_prompt, "short"])
    assert toks.truncated == [True, False]
    assert toks.input_ids[0, -1] == 49407  # truncation keeps the end token
    with caplog.at_level(logging.WARNING):
        ctx = enc([long_prompt])
    assert "truncated" in caplog.text
    assert ctx.shape == (1, MAX_TOKENS, tiny_config.context_dim)
    with torch.no_grad():
        direct = enc.model(input_ids=toks.input_ids[:1]).last_hidden_state
    assert torch.equal(ctx, direct)
