"""A random-weight Llama small enough for vLLM's CPU build on a 2-core machine.

The connector's tests and the example need a real model that vLLM serves,
without downloading one. This writes a Hugging Face checkpoint of a 2-layer
Llama (vocab 1024, hidden 128, 4 query heads over 2 KV heads) with seeded
random weights: the same seed gives the same bytes, so two vLLM instances
(prefill and decode, or a colocated reference) load the same model.

The weights are drawn wider than Hugging Face's default initialisation so
that greedy decoding does not sit on near-ties between logits: a colocated
run and a disaggregated one may batch differently, and a tie broken by a
rounding difference would make "identical tokens" a coin toss rather than a
check of the transferred KV.

``python -m aiokvpipe.integrations.vllm.tiny_model DIR`` builds it into DIR
(and prints DIR); it needs ``transformers`` and ``torch`` (vLLM brings both).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["TINY_LLAMA", "build_tiny_model", "main"]

#: The architecture, as LlamaConfig keyword arguments.
TINY_LLAMA: dict[str, int] = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}

_MARKER = "aiokvpipe_tiny_model.json"


def build_tiny_model(path: str | Path, *, seed: int = 0, std: float = 0.25) -> Path:
    """Write the tiny Llama checkpoint into ``path`` (created if missing).

    Idempotent: a directory already holding the same build (same seed, std
    and architecture) is left as it is, so repeated test runs do not rewrite
    it. Returns the directory.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    recipe = {"seed": seed, "std": std, **TINY_LLAMA}
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        **TINY_LLAMA,
        initializer_range=std,
        # No end-of-sequence token: every request runs to max_tokens, so a
        # random model cannot stop early on one side and not the other.
        eos_token_id=None,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config.dtype = torch.float32
    generator = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(out, safe_serialization=True)
    marker.write_text(json.dumps(recipe))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: build the model into the given directory and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.directory, seed=args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover - CLI
    raise SystemExit(main())
