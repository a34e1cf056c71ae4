"""
A conversation with an instruct model whose KV cache outlives each turn: what `python llama31.py
chat` runs. It takes a llama31.Llama (model, tokenizer, chat format) and uses its
generate_stream(cache_from=...), which prefills only the tokens the cache does not hold yet;
nothing here imports llama31.py.
"""

import sys
from typing import Iterator, List, Optional

import torch

from tokenizer import ConfigError


class Conversation:
    """A multi-turn chat whose KV cache outlives each turn, so a turn prefills only what the cache
    does not hold yet: the end of the last answer, the new message and the headers. The dialog is
    written in the model's chat format whole each turn; the cache is reused up to the first token
    where it differs. When the dialog leaves fewer than max_gen_len positions (at most half of
    max_seq_len) for the answer, its oldest turns (never the system message) are dropped, said on
    stderr, and the cache is refilled from the first changed position."""

    def __init__(self, llama, system: Optional[str] = None, max_gen_len: int = 256,
                 temperature: float = 0.6, top_p: float = 0.9, generator: Optional[torch.Generator] = None):
        if llama.chat_format is None:
            raise ConfigError("this model has no known chat format (Llama 3 headers or ChatML), so it cannot chat")
        llama.check_sampling([[0]], temperature, top_p, max_gen_len)
        self.llama, self.system, self.max_gen_len = llama, system, max_gen_len
        self.sampling = dict(temperature=temperature, top_p=top_p, generator=generator)
        self.messages: List[dict] = []  # the user's and the assistant's, oldest first
        self.cached: List[int] = []  # the tokens whose keys and values the cache holds, from position 0
        self.prefilled = 0  # how many tokens the last turn's prefill computed (the rest came from the cache)
        llama.model.setup_caches(1, llama.model.args.max_seq_len)

    def reset(self):
        """Forget the dialog (the cache keeps what a new dialog shares with it: the system part)."""
        self.messages = []

    def close(self):
        self.llama.model.clear_caches()

    def prompt(self) -> List[int]:
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return self.llama.chat_format.encode_dialog(self.llama.tokenizer, system + self.messages)

    def fit(self) -> List[int]:
        """The prompt of the dialog, its oldest turns dropped while it leaves too little room."""
        max_seq_len = self.llama.model.args.max_seq_len
        limit = max_seq_len - min(self.max_gen_len, max_seq_len // 2)
        prompt, dropped = self.prompt(), 0
        while len(prompt) > limit and len(self.messages) > 1:
            self.messages = self.messages[2:]  # a user message and its answer
            prompt, dropped = self.prompt(), dropped + 1
        if dropped:
            print(f"note: the dialog was longer than max_seq_len {max_seq_len} allows with room for an answer; "
                  f"dropped its oldest {dropped} turn(s)", file=sys.stderr)
        if len(prompt) >= max_seq_len:
            self.messages.pop()
            raise ConfigError(f"this message makes a {len(prompt)}-token prompt, and max_seq_len is {max_seq_len}; "
                              f"shorten it or raise --max_seq_len")
        return prompt

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to the user's message, piece by piece as Llama.stream does. The answer
        joins the dialog when it ends, also when the caller stops it early (close the iterator)."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.fit()
        model = self.llama.model
        if model.layers[0].attention.cache is None:  # another generation on this model took it
            model.setup_caches(1, model.args.max_seq_len)
            self.cached = []
        reuse = 0
        while reuse < min(len(self.cached), len(prompt) - 1) and self.cached[reuse] == prompt[reuse]:
            reuse += 1
        self.prefilled, self.cached, ids, steps = len(prompt) - reuse, prompt[:reuse], [], 0

        def counted():
            nonlocal steps
            for step in self.llama.generate_stream([prompt], self.max_gen_len, cache_from=reuse, **self.sampling):
                steps += 1
                yield step

        try:
            for token, piece in self.llama.texts(counted()):
                ids += [token] if token is not None else []
                yield piece
        finally:  # after k steps the cache holds the prompt and the first k - 1 tokens generated
            self.cached = (prompt + ids)[:len(prompt) + steps - 1] if steps else prompt[:reuse]
            self.messages.append({"role": "assistant", "content": self.llama.tokenizer.decode(ids)})
