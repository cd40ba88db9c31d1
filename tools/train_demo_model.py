"""Train slimlm's built-in demo model, reproducibly, on CPU.

The corpus is the English documentation text that ships with every CPython
(`pydoc_data.topics`): topics sorted by name, every 10th topic held out as the
built-in evaluation corpus, the rest for training. A byte-level BPE tokenizer
(`tokenizers` library) is trained on the training split, then a small
Llama-architecture model is trained from scratch with AdamW and a
warm-up/cosine schedule.

Usage:  python tools/train_demo_model.py [--out src/slimlm/assets/demo] [--steps 600]

Writes config.json, generation_config.json, model.safetensors, tokenizer files,
heldout.txt and README.md (the model card with the recipe, held-out perplexity
and a greedy sample) into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
HOLDOUT_EVERY = 10
MODEL_SHAPE = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)


def split_topics(segment_chars: int = 2000) -> tuple[list[str], list[str], list[str]]:
    """Return (train_docs, validation_docs, heldout_docs).

    Topics are taken in sorted order and cut at paragraph boundaries into segments of about
    `segment_chars` characters; every HOLDOUT_EVERY-th segment is held out. (Holding out whole
    topics gives a held-out set dominated by a few short topics, too small to measure with.)
    """
    from pydoc_data.topics import topics

    segments: list[str] = []
    for key in sorted(topics):
        current: list[str] = []
        for para in topics[key].strip().split("\n\n"):
            current.append(para)
            if sum(len(c) for c in current) >= segment_chars:
                segments.append("\n\n".join(current))
                current = []
        if current:
            segments.append("\n\n".join(current))
    train = [s for i, s in enumerate(segments) if i % HOLDOUT_EVERY < HOLDOUT_EVERY - 2]
    validation = [s for i, s in enumerate(segments) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 2]
    heldout = [s for i, s in enumerate(segments) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return train, validation, heldout


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None)


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids.append(tokenizer.eos_token_id)  # documents are separated (and started) by EOS
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def heldout_perplexity(model, ids: torch.Tensor, seq_len: int) -> float:
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, seq_len):
        chunk = ids[start : start + seq_len + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0]  # (T, V)
        nll += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    model.train()
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="src/slimlm/assets/demo")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=50, help="validation interval; the best checkpoint is kept")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    train_docs, validation_docs, heldout_docs = split_topics()
    tokenizer = train_tokenizer(train_docs, MODEL_SHAPE["vocab_size"])
    train_ids = encode_docs(tokenizer, train_docs)
    validation_ids = encode_docs(tokenizer, validation_docs)
    heldout_ids = encode_docs(tokenizer, heldout_docs)
    print(f"train tokens {train_ids.numel()}, validation {validation_ids.numel()}, held-out {heldout_ids.numel()}",
          file=sys.stderr)

    config = LlamaConfig(
        **{**MODEL_SHAPE, "max_position_embeddings": args.seq_len},  # positions it was trained on
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    best: tuple[float, int, dict] = (float("inf"), 0, {})
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(batch[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            val = heldout_perplexity(model, validation_ids, args.seq_len)
            if val < best[0]:
                best = (val, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            print(f"step {step + 1:5d} loss {loss.item():.3f} validation ppl {val:.2f} {time.time() - t0:.0f}s",
                  file=sys.stderr)
    val_ppl, best_step, best_state = best
    model.load_state_dict(best_state)

    # Ship fp16 weights (half the bytes); every figure below is measured on the fp16-rounded model.
    model = model.half().float()
    model.config.dtype = torch.float16
    ppl = heldout_perplexity(model, heldout_ids, args.seq_len)
    model.eval()
    prompt = "The for statement"
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    sample = tokenizer.decode(out[0], skip_special_tokens=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    model.half().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "heldout.txt").write_text(f"\n{EOS}\n".join(heldout_docs) + "\n")
    recipe = {k: getattr(args, k) for k in ("steps", "batch", "seq_len", "lr", "seed")}
    card = f"""# slimlm demo model

A small Llama-architecture causal LM ({n_params / 1e6:.2f}M parameters) trained from scratch by
`tools/train_demo_model.py` so that every slimlm verb runs with no model of your own
(`slimlm.load("demo")`, `slimlm compress`).

- **Data**: CPython's bundled documentation text (`pydoc_data.topics`, Python
  {sys.version.split()[0]}): topics sorted by name, cut into ~2000-character segments at paragraph breaks, every {HOLDOUT_EVERY}th segment held out.
  Train {train_ids.numel()} tokens, validation {validation_ids.numel()} tokens (the segment before
  each held-out one; picks the checkpoint), held-out {heldout_ids.numel()} tokens (`heldout.txt`,
  the built-in evaluation corpus, never used in training or selection).
- **Tokenizer**: byte-level BPE, vocabulary {MODEL_SHAPE['vocab_size']}, trained with `tokenizers` on
  the training split; `{EOS}` separates documents.
- **Shape**: {json.dumps(MODEL_SHAPE)}, context {args.seq_len}, tied embeddings; trained in fp32, shipped as fp16
  weights ({n_params * 2 / 1e6:.1f} MB); slimlm loads it as fp32 unless told otherwise.
- **Recipe**: {json.dumps(recipe)}; AdamW (0.9, 0.95), weight decay 0.1, {warmup} warm-up steps,
  cosine to 10% of the peak rate, gradient clipping 1.0, {args.threads} CPU threads,
  {time.time() - t0:.0f} s here; validation every {args.eval_every} steps, best at step {best_step}
  (validation perplexity {val_ppl:.2f}).
- **Held-out perplexity**: {ppl:.2f} (non-overlapping {args.seq_len}-token windows).
- **Greedy sample** (prompt `{prompt}`):

```text
{sample}
```

It is a toy: it knows the look of Python documentation, not its meaning.
"""
    (out_dir / "README.md").write_text(card)
    print(f"held-out perplexity {ppl:.2f}\n{sample}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
