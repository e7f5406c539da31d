"""Textual-inversion embeddings for generation (`sdkit generate --embedding FILE`).

A FILE is a diffusers `learned_embeds.safetensors` ({token: [vectors, width]}; for a second
text encoder `learned_embeds_2.safetensors` beside it is read too), an A1111/ComfyUI embedding
(`emb_params`, or `clip_l`/`clip_g`; its token is the file name, or the `sdkit_token` sdkit
writes into it), or a textual-inversion run folder. Only safetensors files are read.

sdkit adds the tokens itself rather than through diffusers' `load_textual_inversion`:
StableDiffusion3Pipeline has no such method, and one way serves every family (the tests
compare it with diffusers' loader on SD and SDXL).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdkit.errors import UserError, first_line, shorten
from sdkit.training.adapters.textual_inversion import (
    LEARNED_EMBEDS, add_new_tokens, diffusers_file_name, placeholder_tokens,
)

MAX_VECTORS = 64  # recipe's method.num_vectors cap; a file with more rows is not an embedding sdkit wrote or reads


@dataclass
class Embedding:
    token: str
    vectors: list  # one [vectors, width] tensor per CLIP text encoder, in the family's order
    source: str


def resolve_embedding(ref: str, key: str = "--embedding") -> str:
    """The embedding file `ref` names (a file, or a run folder holding learned_embeds.safetensors)."""
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        path = path / LEARNED_EMBEDS
    if not path.is_file():
        raise UserError(f"{key}: '{shorten(ref)}' is neither an embedding file nor a folder with {LEARNED_EMBEDS}")
    if path.suffix != ".safetensors":
        raise UserError(f"{key}: '{shorten(ref)}' is not a .safetensors file (pickled embeddings are not loaded)")
    return str(path)


def _read(path: Path, key: str):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:
        raise UserError(f"{key}: '{path}' is not a readable safetensors file ({shorten(first_line(e))})") from None


def read_embedding(ref: str, family_cls, key: str = "--embedding") -> Embedding:
    """The token and per-encoder vectors of an embedding file, checked against the family."""
    path = Path(resolve_embedding(ref, key))
    tensors, meta = _read(path, key)
    n_encoders = len(family_cls.text_encoder_attrs)
    if set(family_cls.embedding_keys) <= set(tensors):  # A1111 / ComfyUI layout
        token = meta.get("sdkit_token") or path.stem
        vectors = [tensors[k] for k in family_cls.embedding_keys]
    elif len(tensors) == 1:  # diffusers: {token: vectors}, one file per text encoder
        token, first = next(iter(tensors.items()))
        vectors = [first]
        for i in range(1, n_encoders):
            sibling = path.with_name(diffusers_file_name(i))
            if not sibling.is_file():
                raise UserError(f"{key}: {family_cls.name} models have {n_encoders} text encoders; "
                                f"'{path}' needs {sibling.name} beside it (or pass the A1111 file with "
                                f"{'/'.join(family_cls.embedding_keys)})")
            vectors.append(_read(sibling, key)[0].get(token))
            if vectors[-1] is None:
                raise UserError(f"{key}: {sibling} holds no vectors for '{shorten(token, 40)}'")
    else:
        raise UserError(f"{key}: '{path}' is not an embedding for {family_cls.name} models (keys "
                        f"{shorten(', '.join(sorted(tensors)), 80)}; expected one token or "
                        f"{'/'.join(family_cls.embedding_keys)})")
    for v in vectors:
        if v.dim() == 1:
            v.unsqueeze_(0)
    if any(v.dim() != 2 or not 1 <= v.shape[0] <= MAX_VECTORS for v in vectors) or not token.strip():
        raise UserError(f"{key}: '{path}' does not hold [vectors, width] embeddings of at most {MAX_VECTORS} vectors")
    return Embedding(token=token, vectors=vectors, source=str(path))


def add_embedding(pipe, family_cls, embedding: Embedding, key: str = "--embedding") -> None:
    """Add the embedding's tokens to each CLIP tokenizer and its vectors to each text encoder."""
    import torch

    for attr_tok, attr_enc, vectors in zip(family_cls.tokenizer_attrs, family_cls.text_encoder_attrs, embedding.vectors):
        tokenizer, encoder = getattr(pipe, attr_tok), getattr(pipe, attr_enc)
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise UserError(f"{key}: '{embedding.source}' has {vectors.shape[1]}-wide vectors, {attr_enc} of this "
                            f"model takes {width} (an embedding of another model)")
        tokens = placeholder_tokens(embedding.token, vectors.shape[0])
        ids = add_new_tokens(tokenizer, tokens, f"{key}: token '{shorten(embedding.token, 40)}' is already known to "
                             "the model (the same embedding twice?)")
        rows = encoder.get_input_embeddings().weight.shape[0]
        if max(ids) >= rows:
            encoder.resize_token_embeddings(max(ids) + 1)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[torch.tensor(ids)] = vectors.to(weight.device, weight.dtype)
