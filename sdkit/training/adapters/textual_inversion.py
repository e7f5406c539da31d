"""Textual inversion: new tokens whose input embeddings, in every CLIP text encoder of the
family (SD 1.x/2.x: one; SDXL and SD3: CLIP-L and CLIP-G; SD3's T5 is left as it is and reads
the placeholder as ordinary text), are the only weights that train.

`method.num_vectors` tokens are added: the placeholder and `placeholder_1` ... as diffusers
names them, so its pipelines expand the placeholder in prompts to all of them. Results:
  learned_embeds.safetensors      {placeholder: [vectors, width]} of the first text encoder
  learned_embeds_2.safetensors    the same for the second (SDXL, SD3), as diffusers' SDXL example writes
  NAME.safetensors                the A1111/ComfyUI embedding: emb_params (SD) or clip_l + clip_g
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from sdkit.errors import UserError, shorten
from sdkit.training.adapters.full import freeze

LEARNED_EMBEDS = "learned_embeds.safetensors"  # sdkit.inference.embeddings reads these names too


def diffusers_file_name(index: int) -> str:
    """learned_embeds.safetensors for the first text encoder, learned_embeds_2... for the next."""
    return LEARNED_EMBEDS if index == 0 else f"learned_embeds_{index + 1}.safetensors"


def placeholder_tokens(token: str, vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def add_new_tokens(tokenizer, tokens: list[str], error: str) -> list[int]:
    """The ids of `tokens`, added to `tokenizer`; UserError(error) when one of them is known already."""
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise UserError(error)
    return tokenizer.convert_tokens_to_ids(tokens)


def a1111_file_name(token: str) -> str:
    """A1111 and ComfyUI take the trigger word from the file name: the token's letters, digits, - and _."""
    return (re.sub(r"[^A-Za-z0-9_-]", "", token) or "embedding") + ".safetensors"


def added_embeddings(encoders: list) -> list:
    """The AddedTokenEmbedding of each text encoder (unwrapped), in order."""
    return [enc.get_input_embeddings() for enc in encoders]


class TextualInversion:
    kind = "textual_inversion"
    title = "Textual inversion"
    checkpoints_adapters_only = True  # checkpoints hold the new rows only: kilobytes
    usage = """```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_textual_inversion("{run}/learned_embeds.safetensors")  # SDXL: also learned_embeds_2 with text_encoder_2
image = pipe("{prompt}").images[0]
```
Or `sdkit generate "{prompt}" --model {base} --embedding {run}`; A1111/ComfyUI: put the other
.safetensors file in their embeddings folder and write its file name in the prompt."""

    def __init__(self, method):
        self.method = method

    @property
    def label(self) -> str:  # how `sdkit plan` names the method
        return f"{self.title} ({self.method.num_vectors} vector(s) of {self.method.placeholder_token})"

    @property
    def tokens(self) -> list[str]:
        return placeholder_tokens(self.method.placeholder_token, self.method.num_vectors)

    def caption_problem(self, captions: list[str]) -> Optional[str]:
        token = self.method.placeholder_token
        missing = [c for c in captions if token not in c]
        if not missing:
            return None
        return (f"method.placeholder_token: {len(missing)} of {len(captions)} captions lack '{shorten(token, 40)}' "
                f"(first: '{shorten(missing[0], 60)}'); put it in data.instance_prompt or data.caption_prefix")

    def attach(self, family, dtype=None) -> list:
        """Add the tokens to every CLIP tokenizer and give each text encoder trainable rows for
        them; returns [denoiser (frozen), *text encoders]: the step runs the encoders in its graph."""
        import torch

        from sdkit.training.adapters.token_embedding import AddedTokenEmbedding

        freeze(family)
        for tokenizer, encoder in zip(family.tokenizers, family.text_encoders):
            base = encoder.get_input_embeddings()
            ids = add_new_tokens(tokenizer, self.tokens,
                                 f"method.placeholder_token: '{shorten(self.method.placeholder_token, 40)}' (or a "
                                 f"'_N' form of it) is already a token of the model; choose a new word such as <my-thing>")
            init_ids = tokenizer.encode(self.method.initializer_token, add_special_tokens=False)
            if not init_ids:
                raise UserError(f"method.initializer_token: '{shorten(self.method.initializer_token, 40)}' "
                                "gives no tokens; choose a word such as 'cat'")
            with torch.no_grad():
                start = base.weight[torch.tensor(init_ids, device=base.weight.device)].float().mean(dim=0)
            initial = start.expand(len(self.tokens), -1).to(dtype or torch.float32)
            encoder.set_input_embeddings(AddedTokenEmbedding(base, ids, initial))
        return [family.denoiser, *family.text_encoders]

    def prepare_trace(self, modules: list) -> None:
        """Nothing to prepare for `sdkit plan`'s fake-tensor trace."""

    def compute_dtype(self, weight_dtype):
        """The frozen denoiser runs in the weight dtype; its inputs match it."""
        return weight_dtype

    def shape(self, family) -> dict:
        m = self.method
        return {"method.type": self.kind, "method.placeholder_token": m.placeholder_token,
                "method.num_vectors": m.num_vectors}

    def card_lines(self) -> list[str]:
        m = self.method
        return [f"- textual inversion: token `{m.placeholder_token}`, {m.num_vectors} vector(s) per text encoder, "
                f"started from `{m.initializer_token}`; only these embeddings trained, every model weight is the base's"]

    def trainable_state(self, module) -> dict:
        embedding = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
        return {"added": embedding.added} if hasattr(embedding, "added") else {}

    def load_trainable_state(self, module, state: dict) -> None:
        import torch

        own = self.trainable_state(module)
        if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
            raise RuntimeError(f"{self.title} checkpoint does not match the model ({sorted(state)} vs {sorted(own)})")
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(state[key])

    def save(self, family, modules: list, out: Path) -> list[Path]:
        from safetensors.torch import save_file

        rows = [emb.added.detach().float().cpu().contiguous() for emb in added_embeddings(modules[1:])]
        token = self.method.placeholder_token
        written = []
        for i, vectors in enumerate(rows):
            written.append(Path(out) / diffusers_file_name(i))
            save_file({token: vectors}, str(written[-1]))
        a1111 = Path(out) / a1111_file_name(token)
        # sdkit_token: the word the run trained (A1111 uses the file name instead).
        save_file(dict(zip(family.embedding_keys, rows)), str(a1111), metadata={"sdkit_token": token})
        return [*written, a1111]
