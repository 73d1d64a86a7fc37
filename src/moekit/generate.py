"""Batched autoregressive generation with a preallocated KV cache, and `moekit generate`.

    new_ids = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16)  # one list of new ids per prompt

Prompts are LEFT-padded to the longest one (P tokens), so every sequence's next token goes to the
same cache slot; RoPE positions count only real tokens and a key mask hides the pad slots, so a
padded sequence computes what it would alone. One prefill forward, then one token per sequence
per step. Sampling, checks and stops: `moekit.sampling`. A sequence ends when its tokens end with
a stop sequence (not returned); finished ones are fed a pad token until the batch is done.
`stream(step_tokens)` gets the new token per prompt, or None once finished (a multi-token stop
is recognised at its last token, after its leading tokens were streamed).

`compile=True` runs each decode step through `Transformer.decode_step` (the static plan,
docs/architecture.md) under `torch.compile(fullgraph=True, dynamic=False)`, cached on the model;
each new batch size or cache length compiles again, so the cache length is S rounded up to a
power of two (64 to max_seq_len). Not for MoE layers with token_rounding.

Legend: B batch, P padded prompt length, S cache length (P + max_new_tokens), V vocab.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional

import torch

from . import cliargs
from .runtime import compiled_step
from .sampling import (StopSpec, apply_repetition_penalty, check_sampling, ends_with_stop, new_generator,
                       normalise_prompts, normalise_stops, sample_next)
from .speculative import speculative_generate
from .tokens import eos_token_ids


PAD_ID = 0  # any valid id; pad slots are masked out of attention and never sampled from


def generate(model, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, repetition_penalty: float = 1.0, seed: Optional[int] = None,
             stop: StopSpec = None, eos_token_id=None,
             stream: Optional[Callable[[List[Optional[int]]], None]] = None,
             compile: bool = False, min_p: Optional[float] = None) -> List[List[int]]:
    """One list of up to `max_new_tokens` new ids per prompt (non-empty token-id lists of any lengths).

    temperature 0 = greedy; top_k / top_p / min_p None = off; repetition_penalty 1.0 = off (greedy mode too,
    as in HF); seed None draws one from torch's global RNG; stop / eos_token_id: ids or id sequences
    that end a sequence. The model's train/eval mode is restored afterwards.
    """
    cfg = model.cfg
    prompts = normalise_prompts(prompts, cfg.vocab_size)
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                   max_tokens_name="max_new_tokens", min_tokens=0, min_p=min_p)
    stops = normalise_stops(stop, eos_token_id, cfg.vocab_size)
    lens = [len(p) for p in prompts]
    P = max(lens)
    S = P + max_new_tokens
    if S > cfg.max_seq_len:
        raise ValueError(f"longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) = {S} exceeds the "
                         f"model's max_seq_len={cfg.max_seq_len}; shorten the prompt or lower max_new_tokens")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if compile and any(moe.cfg.token_rounding is not None for moe in model.moe_layers()):
        raise ValueError("generate(compile=True) does not support MoE layers with token_rounding; use compile=False")
    step_fn = compiled_decode_step(model) if compile else None
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    generator = new_generator(temperature, seed, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _decode_loop(model, prompts, lens, P, S, max_new_tokens, temperature, top_k, top_p,
                                repetition_penalty, generator, stops, stream, device, dtype, step_fn, min_p)
    finally:
        model.train(was_training)
        if hasattr(step_fn, "release"):  # a CompiledStep: its replay of the last step holds this call's cache
            step_fn.release()


def _decode_loop(model, prompts, lens, P, S, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                 generator, stops, stream, device, dtype, step_fn=None, min_p=None) -> List[List[int]]:
    B = len(prompts)
    tokens_BP = torch.tensor([[PAD_ID] * (P - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    lens_B = torch.tensor(lens, dtype=torch.long, device=device)
    key_mask_BS = positions_BP = None
    if min(lens) < P:  # padded: real prompt tokens and every generated slot are visible, pad slots are not
        key_mask_BS = torch.arange(S, device=device)[None, :] >= (P - lens_B)[:, None]
        positions_BP = (key_mask_BS[:, :P].long().cumsum(1) - 1).clamp(min=0)
    seen_BV = None
    if repetition_penalty != 1.0:
        seen_BV = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for b, prompt in enumerate(prompts):
            seen_BV[b, torch.tensor(prompt, device=device)] = True

    if step_fn is not None:  # static decoding: a bucketed cache length (fewer recompiles), a mask in every case
        S = min(max(64, 1 << (S - 1).bit_length()), model.cfg.max_seq_len)
        static_valid_BS = torch.arange(S, device=device)[None, :] >= (P - lens_B)[:, None]
        token_limit = model.token_limit
        # the step's inputs written in place: a call with the same tensors replays the last one (runtime.Replay)
        next_B1, positions_B1, slots_B = (torch.zeros(B, 1, dtype=torch.long, device=device),
                                          torch.zeros(B, 1, dtype=torch.long, device=device),
                                          torch.zeros(B, dtype=torch.long, device=device))
    cache = model.new_cache(B, S, dtype, device)
    out: List[List[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits_BV = model(tokens_BP, positions_BT=positions_BP, cache=cache, start=0, key_mask_BS=key_mask_BS)[:, -1]
    for step in range(max_new_tokens):
        logits_BV = logits_BV.float()
        if seen_BV is not None:
            logits_BV = apply_repetition_penalty(logits_BV, seen_BV, repetition_penalty)
        next_B = sample_next(logits_BV, temperature, top_k, top_p, generator, min_p)
        next_ids = next_B.tolist()
        step_tokens: List[Optional[int]] = [None] * B
        for b in range(B):
            if done[b]:
                continue
            out[b].append(next_ids[b])
            n_stop = ends_with_stop(out[b], stops) if stops else 0
            if n_stop:
                del out[b][-n_stop:]
                done[b] = True
            else:
                step_tokens[b] = next_ids[b]
        if stream is not None:
            stream(step_tokens)
        if all(done) or step == max_new_tokens - 1:
            break
        if seen_BV is not None:
            seen_BV.scatter_(1, next_B[:, None], True)
        if any(done):
            next_B = next_B.masked_fill(torch.tensor(done, device=device), PAD_ID)
        # the new token sits in cache slot P + step; its position counts only real tokens
        if step_fn is None:
            logits_BV = model(next_B[:, None], positions_BT=(lens_B + step)[:, None], cache=cache, start=P + step,
                              key_mask_BS=key_mask_BS)[:, -1]
        else:  # the static step skips input checks: a hash router's table must cover the fed ids
            if max(t for t, d in zip(next_ids, done) if not d) >= token_limit:
                raise ValueError(f"token ids must lie in [0, {token_limit}): the model routes by token id "
                                 f"(a hash router with hash_vocab_size={token_limit})")
            next_B1.copy_(next_B[:, None])
            torch.add(lens_B[:, None], step, out=positions_B1)
            slots_B.fill_(P + step)
            logits_BV = step_fn(next_B1, positions_B1, slots_B, static_valid_BS, cache)
    return out


def compiled_decode_step(model):
    """`model.decode_step` under torch.compile, cached on the model (compiled lazily on first call)."""
    return compiled_step(model, "decode_step", dynamic=False)


def _parse_ids(text: str) -> List[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids/--stop-ids must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .quantize.cli import add_runtime_arguments

    p = cliargs.parser("moekit generate", "Generate text from a moekit checkpoint, a training run directory or "
                       "an HF checkpoint.", "examples:\n  moekit generate runs/default --prompt 'def main('\n"
                       "  moekit generate runs/default --prompt-ids 1,2,3 --temperature 0.8 --top-p 0.95 --seed 0")
    cliargs.add_model_argument(p, "checkpoint directory (moekit, run dir or HF format)")
    p.add_argument("--prompt", help="prompt text (needs a tokenizer.json in the checkpoint)")
    p.add_argument("--prompt-ids", help="prompt as comma-separated token ids (works without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top token's probability, "
                   "in [0, 1] (HF MinPLogitsWarper; default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL/HF penalty > 0 (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output; default: random)")
    p.add_argument("--stop-ids", default=None, help="comma-separated token ids that end the generation")
    p.add_argument("--print-ids", action="store_true", help="print token ids even when a tokenizer exists")
    p.add_argument("--dtype", type=cliargs.dtype_name, default=None, metavar="DTYPE",
                   help=cliargs.DTYPE_HELP + " (default: as stored)")
    p.add_argument("--device", type=cliargs.device_name, default="cpu", help=cliargs.DEVICE_HELP)
    add_runtime_arguments(p)  # --quantize, --activations
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="speculative decoding with this draft checkpoint (same tokenizer/vocab; batch 1)")
    p.add_argument("--speculative", default=None, choices=["ngram"],
                   help="draft-free speculative decoding: 'ngram' (prompt lookup)")
    p.add_argument("--gamma", type=int, default=4, help="speculative: tokens proposed per round")
    p.add_argument("--ngram", type=int, default=3, help="--speculative ngram: longest suffix matched")
    return p


class _Streamer:
    """Prints the text of the ids so far as tokens arrive (its new suffix each time): decoded with
    `tokenizer`, or the ids separated by spaces when it is None."""

    def __init__(self, tokenizer=None, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: List[int] = []
        self.printed = ""

    def text(self) -> str:
        return " ".join(map(str, self.ids)) if self.tokenizer is None else self.tokenizer.decode(self.ids)

    def __call__(self, step_tokens: List[Optional[int]]) -> None:
        if step_tokens[0] is None:
            return
        self.ids.append(step_tokens[0])
        text = self.text()
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        new = text[len(self.printed):]  # (a decoder that rewrites earlier text cannot unprint it)
        if new:
            self.out.write(new)
            self.out.flush()
        self.printed = text

    def finish(self) -> None:
        text = self.text()
        if text.startswith(self.printed) and len(text) > len(self.printed):
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def cli(argv: Optional[List[str]] = None) -> int:
    """`moekit generate`: stream the continuation of one prompt to stdout (errors: `moekit.cli`)."""
    p = build_parser()
    args = p.parse_args(argv)
    checkpoint = cliargs.model_path(args, p)
    device = cliargs.check_device(args.device)
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint directory {checkpoint!r} does not exist")
    if args.prompt is None and args.prompt_ids is None:
        raise ValueError("give --prompt TEXT or --prompt-ids 1,2,3")
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("give either --prompt or --prompt-ids, not both")
    if args.draft is not None and args.speculative is not None:
        raise ValueError("give either --draft DIR or --speculative ngram, not both")
    speculative = args.draft is not None or args.speculative is not None
    if speculative and (args.repetition_penalty != 1.0 or args.min_p is not None):
        raise ValueError("--repetition-penalty and --min-p are not supported with speculative decoding")
    from .loading import load_model
    from .quantize.cli import apply_runtime_arguments

    model = load_model(checkpoint, dtype=args.dtype, device=device)
    apply_runtime_arguments(model, args)
    draft = None
    if args.draft is not None:
        if not os.path.isdir(args.draft):
            raise ValueError(f"draft checkpoint directory {args.draft!r} does not exist")
        draft = load_model(args.draft, dtype=args.dtype, device=device)
    tokenizer = getattr(model, "tokenizer", None)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer (tokenizer.json), so --prompt TEXT "
                             "cannot be encoded; pass token ids with --prompt-ids 1,2,3")
        prompt_ids = tokenizer.encode(args.prompt).ids
        if not prompt_ids:
            raise ValueError(f"the prompt {args.prompt!r} encodes to no tokens")
    else:
        prompt_ids = _parse_ids(args.prompt_ids)
    stop = _parse_ids(args.stop_ids) if args.stop_ids else None
    eos = eos_token_ids(checkpoint, model)
    streamer = _Streamer(None if args.print_ids else tokenizer)
    if speculative:
        _, stats = speculative_generate(
            model, prompt_ids, args.max_new_tokens, draft=draft, gamma=args.gamma,
            ngram=args.ngram if draft is None else None, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, stop=(stop or []) + (eos or []) or None, stream=streamer)
        streamer.finish()
        print(f"speculative ({'draft' if draft is not None else f'ngram n={args.ngram}'}, gamma={args.gamma}): "
              f"accepted {stats.accepted}/{stats.proposed} ({stats.acceptance_rate:.0%}), "
              f"{stats.target_forward_passes} target passes, {stats.tokens_per_pass:.2f} tokens/pass",
              file=sys.stderr)
    else:
        generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                 seed=args.seed, stop=stop, eos_token_id=eos, stream=streamer, min_p=args.min_p)
        streamer.finish()
    return 0
