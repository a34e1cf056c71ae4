"""
Speculative decoding (Leviathan et al., 2023; Chen et al., 2023): a draft model proposes k tokens
one at a time, the model scores all of them in one forward pass (one read of its weights for up
to k + 1 tokens), and keeps the longest prefix it agrees with, plus one token of its own.

    accept a proposed x with probability min(1, p(x) / q(x));  at the first rejection draw from
    max(0, p - q), normalised;  if all k are accepted draw one more from the model's next p

p is the model's distribution and q the draft's, both after temperature and top-p, so the tokens
kept have exactly the model's distribution; at temperature 0 a proposal is kept when it is the
model's most likely token, and the tokens are exactly the model's greedy ones (up to the rounding
of scoring k + 1 positions in one pass rather than one at a time).

Both KV caches roll back by position alone: a forward pass reads a cache only up to its own last
position, so the keys of rejected proposals are never read, and the next pass overwrites them.
Nothing accepted is computed again.

One stream (a batch of one prompt); llama31.Llama.generate_stream hands such a generation to
stream() when a Speculative variant is set (the `speculator` of a Llama). The draft is a Llama with
the model's tokenizer (the vocabulary is checked before any weight loads: check_draft).
Imports nothing from llama31.py.
"""

from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch

import formats
from errors import ConfigError
from variants import Variant


@dataclass
class Draft:
    """The draft model (Llama.build's draft): its checkpoint (None: the model's own), how it loads
    (quantize, as --quantize), how many tokens it proposes at once."""
    ckpt_dir: Optional[str] = None
    quantize: Optional[str] = None
    k: int = 4


def check_draft(ckpt_dir, draft_dir, tokenizer_path=None):
    """A draft must write and read tokens as the model does: the same vocabulary (size, special
    tokens, and the ids of a probe text). Said in one line before any weight is read."""
    if draft_dir == ckpt_dir:  # the model's own weights, quantized: its tokenizer, nothing to check
        return
    sources = [(ckpt_dir, tokenizer_path), (draft_dir, None)]
    tokenizers = [formats.read(d, p, tokenizer=True).tokenizer for d, p in sources]
    probe = "Speculative decoding: 12345 tokens, ¿señal? 深い <|eot_id|>"
    ours, theirs = ((t.n_words, t.special_tokens, t.encode(probe, bos=True, eos=True))
                    for t in tokenizers)
    if ours != theirs:
        raise ConfigError(f"the draft {draft_dir} has another vocabulary than {ckpt_dir} "
                          f"({theirs[0]} tokens against {ours[0]}, or other ids); use a draft with "
                          f"the model's tokenizer (Llama 3.2 1B drafts for Llama 3.1 8B and 70B)")


def top_p_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution llama31.sample_top_p draws from, as probabilities over the vocabulary:
    softmax(logits / temperature) cut to its smallest top set of mass top_p, renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    sorted_probs[torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p] = 0.0
    sorted_probs /= sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def draw(probs: torch.Tensor, generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify(proposals: List[int], drafted: List[torch.Tensor], target: torch.Tensor, temperature: float,
           top_p: float, generator) -> List[int]:
    """The tokens kept of one round: the accepted prefix of proposals and one token of the model's.
    drafted: the draft's distribution of each proposal (temperature 0: unused); target: the model's
    logits (k + 1, vocab) after the context and after each proposal."""
    if temperature == 0:
        best = target.argmax(dim=-1).tolist()
        kept = next((i for i, (x, b) in enumerate(zip(proposals, best)) if x != b), len(proposals))
        return proposals[:kept] + [best[kept]]
    for i, x in enumerate(proposals):
        p = top_p_probs(target[i], temperature, top_p)
        q = drafted[i]
        accept = torch.rand((), device=p.device, generator=generator) * q[x] <= p[x]  # u < p/q
        if not accept:
            residual = (p - q).clamp_(min=0)
            mass = residual.sum()  # positive wherever a rejection can happen; rounding aside
            return proposals[:i] + [draw(residual / mass if mass > 0 else p, generator)]
    return proposals + [draw(top_p_probs(target[-1], temperature, top_p), generator)]


class Speculative(Variant):
    """A sampling variant: the Llama's one-prompt generations go through stream(), proposed by
    draft (a Llama) k tokens at a time. stats: proposals made, accepted, and verifying passes."""

    def __init__(self, draft, k: int):
        self.draft = draft
        self.k = k
        self.cached: List[int] = []  # the tokens whose keys the draft's cache holds, from position 0
        self.stats = {"proposed": 0, "accepted": 0, "verifications": 0}

    def sampling(self, llama):
        llama.speculator = self

    def summary(self) -> str:
        s = self.stats
        if not s["verifications"]:
            return ""
        rate = s["accepted"] / max(1, s["proposed"])
        per = (s["accepted"] + s["verifications"]) / s["verifications"]
        return f"; speculative (k={self.k}): {rate:.0%} of proposals accepted, {per:.2f} tokens a verification"

    def propose(self, seq: List[int], k: int, temperature: float, top_p: float, generator):
        """k tokens drafted after seq, each with the draft's distribution (temperature 0: none).
        The draft runs through its decoder (compiled, with --compile), within stream()'s
        generation."""
        draft = self.draft
        done = next((i for i, (a, b) in enumerate(zip(self.cached, seq)) if a != b), min(len(self.cached), len(seq)))
        done = min(done, len(seq) - 1)  # the last token is fed again, for the logits after it
        feed = seq[done:]
        proposals, drafted = [], []
        for _ in range(k):
            tokens = torch.tensor([feed], device=draft.model.norm.weight.device)
            logits = draft.decoder.logits(tokens, done)[0]
            if temperature == 0:
                x = int(logits.argmax())
            else:
                q = top_p_probs(logits, temperature, top_p)
                drafted.append(q)
                x = draw(q, generator)
            proposals.append(x)
            done += len(feed)
            feed = [x]
        self.cached = (seq + proposals)[:done]
        return proposals, drafted

    def round(self, model, seq: List[int], done: int, k: int, temperature: float, top_p: float,
              generator) -> tuple:
        """One round after seq, whose first `done` tokens model's cache holds: up to k tokens
        proposed, scored with seq's uncached rest in one pass, the kept ones (verify) counted in
        stats. Returns (kept, the model's logits (k + 1, vocab) after seq and each proposal)."""
        proposals, drafted = self.propose(seq, k, temperature, top_p, generator) if k else ([], [])
        tokens = torch.tensor([seq[done:] + proposals], device=model.norm.weight.device)
        logits = model.forward_inference(tokens, done, last=k + 1)[0]
        kept = verify(proposals, drafted, logits, temperature, top_p, generator)
        self.stats["proposed"] += k
        self.stats["accepted"] += len(kept) - 1
        self.stats["verifications"] += 1
        return kept, logits

    @torch.inference_mode()
    def stream(self, llama, prompt: List[int], max_gen_len: int, total_len: int, temperature: float,
               top_p: float, generator, cache_from: Optional[int], stops: bool) -> Iterator[List[Optional[int]]]:
        """generate_stream's steps for one prompt (the same contract: a list of one token, or None
        for nothing new), up to max_gen_len new tokens and total_len positions in all."""
        model = llama.model
        if cache_from is None:
            model.setup_caches(1, total_len)
        stop_tokens = set(llama.tokenizer.stop_tokens)
        seq = list(prompt)
        done = cache_from or 0  # the positions the model's cache holds
        made = 0
        self.cached = []
        try:
            with self.draft.decoder.caches(1, total_len):  # the draft's, for this generation
                while True:
                    k = max(0, min(self.k, max_gen_len - made - 1, total_len - len(seq) - 1))
                    kept, _ = self.round(model, seq, done, k, temperature, top_p, generator)
                    done = len(seq) + len(kept) - 1  # the last kept token is not in the cache yet
                    for x in kept:
                        seq.append(x)
                        made += 1
                        stopped = x in stop_tokens
                        yield [x if stops or not stopped else None]
                        if stopped or made >= max_gen_len or len(seq) >= total_len:
                            return
        finally:
            if cache_from is None:
                model.clear_caches()
