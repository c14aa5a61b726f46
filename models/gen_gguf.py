#!/usr/bin/env python3
"""Write a random-weight llama-architecture GGUF that a real llama-server loads and answers.

The model talks gibberish, but it is a genuine GGUF: a SentencePiece-style ("llama") vocabulary with
byte fallback, ChatML special tokens and a ChatML chat template, F16 weights drawn from a fixed seed.
The same preset and seed always give the same bytes.

    python models/gen_gguf.py --preset tiny --out gen-tiny.gguf   # about 0.3 MB
    python models/gen_gguf.py --preset 300m --out gen-300m.gguf   # about 300 MB
    python models/gen_gguf.py --preset 1500m --out gen-1500m.gguf # about 1.5 GB

Gotcha: a random model emits arbitrary byte tokens; bytes 0x80-0xFF on their own are not valid UTF-8 and
llama-server then answers HTTP 500. Those byte tokens are typed CONTROL (never rendered) instead of BYTE.

Needs the `gguf` (0.19) and `numpy` packages (the dev venv has both). The file is written to a
temporary name next to --out and renamed into place, so readers never see a partial model.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

try:
    import gguf
except ImportError as exc:  # pragma: no cover - a clear message for a wrong interpreter
    sys.exit(f"gen_gguf.py: cannot import gguf ({exc}); run it with the dev venv's python")

# name -> hyperparameters. Sizes are F16 bytes of the weights (the norms are F32 and tiny).
PRESETS: dict[str, dict[str, int]] = {
    # ~150k parameters, ~0.3 MB
    "tiny": dict(n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=4, n_ctx=2048),
    # 12 x (4 * 1024^2 + 3 * 1024 * 2816) + 2 * 1024 * vocab ~ 155M parameters, ~310 MB
    "300m": dict(n_embd=1024, n_ff=2816, n_layer=12, n_head=16, n_head_kv=16, n_ctx=2048),
    # 15 x (4 * 2048^2 + 3 * 2048 * 5632) + 2 * 2048 * vocab ~ 773M parameters, ~1.5 GB
    # (`cargo xtask bench warm-tiers`; not made by setup)
    "1500m": dict(n_embd=2048, n_ff=5632, n_layer=15, n_head=16, n_head_kv=16, n_ctx=2048),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part hello world paris france capital model token answer question"
).split()


def build_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary: specials, 256 byte tokens, characters, words."""
    T = gguf.TokenType
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.CONTROL, T.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        # 0x80-0xFF alone are not valid UTF-8: CONTROL tokens are never rendered, so the server's
        # output stays valid UTF-8 (see the module docstring).
        types.append(T.BYTE if b < 0x80 else T.CONTROL)
    pieces: list[str] = ["\u2581"]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
    pieces += list(chars)
    pieces += ["\u2581" + c for c in chars]
    pieces += ["\u2581" + w for w in WORDS]
    seen = set(tokens)
    for p in pieces:
        if p not in seen:
            seen.add(p)
            tokens.append(p)
            types.append(T.NORMAL)
    # Longer pieces score higher so that the SPM tokenizer prefers whole words.
    scores = [0.0] * len(tokens)
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty == T.NORMAL:
            scores[i] = -1000.0 + 10.0 * len(tok) - i * 1e-3
        elif ty == T.BYTE or (ty == T.CONTROL and tok.startswith("<0x")):
            scores[i] = -10000.0
    return tokens, scores, [int(t) for t in types]


def tensor_plan(p: dict[str, int], n_vocab: int) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, numpy shape, dtype) of every tensor, in file order. numpy shape = reversed ggml ne."""
    e, ff, kv = p["n_embd"], p["n_ff"], p["n_embd"] // p["n_head"] * p["n_head_kv"]
    plan: list[tuple[str, tuple[int, ...], type]] = [("token_embd.weight", (n_vocab, e), np.float16)]
    for i in range(p["n_layer"]):
        plan += [
            (f"blk.{i}.attn_norm.weight", (e,), np.float32),
            (f"blk.{i}.attn_q.weight", (e, e), np.float16),
            (f"blk.{i}.attn_k.weight", (kv, e), np.float16),
            (f"blk.{i}.attn_v.weight", (kv, e), np.float16),
            (f"blk.{i}.attn_output.weight", (e, e), np.float16),
            (f"blk.{i}.ffn_norm.weight", (e,), np.float32),
            (f"blk.{i}.ffn_gate.weight", (ff, e), np.float16),
            (f"blk.{i}.ffn_up.weight", (ff, e), np.float16),
            (f"blk.{i}.ffn_down.weight", (e, ff), np.float16),
        ]
    plan += [("output_norm.weight", (e,), np.float32), ("output.weight", (n_vocab, e), np.float16)]
    return plan


def generate(preset: str, out: str, seed: int) -> int:
    p = PRESETS[preset]
    tokens, scores, types = build_vocab()
    n_vocab = len(tokens)
    plan = tensor_plan(p, n_vocab)
    rng = np.random.default_rng(seed)

    tmp = f"{out}.tmp-{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch="llama")
    try:
        w.add_name(f"hearth-gen-{preset}")
        w.add_context_length(p["n_ctx"])
        w.add_embedding_length(p["n_embd"])
        w.add_block_count(p["n_layer"])
        w.add_feed_forward_length(p["n_ff"])
        w.add_head_count(p["n_head"])
        w.add_head_count_kv(p["n_head_kv"])
        w.add_rope_dimension_count(p["n_embd"] // p["n_head"])
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(n_vocab)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_chat_template(CHATML_TEMPLATE)

        for name, shape, dtype in plan:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            w.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # Generate tensor by tensor so that memory stays at one tensor, not the whole model.
        for name, shape, dtype in plan:
            if len(shape) == 1:
                data = np.ones(shape, dtype=np.float32)
            else:
                std = 0.02 if not name.endswith("ffn_down.weight") else 0.02 / np.sqrt(2 * p["n_layer"])
                data = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)
            w.write_tensor_data(data)
        w.close()
        size = os.path.getsize(tmp)
        os.replace(tmp, out)
    except BaseException:
        w.close()
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True, help="output .gguf path")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    size = generate(args.preset, args.out, args.seed)
    print(f"gen_gguf.py: wrote {args.out} ({size} bytes, preset {args.preset}, seed {args.seed})")


if __name__ == "__main__":
    main()
