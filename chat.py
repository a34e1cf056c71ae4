"""
Talk to an instruct model: python chat.py [--ckpt_dir X] [--system "..."] [--tools brave_search,...]
(each line typed is a message; /tool TEXT answers a tool call; /reset, /exit). Conversation keeps the
KV cache between turns: it takes a llama31.Llama (model, tokenizer, chat format) and uses its
generate_stream(cache_from=...), which prefills only the tokens the cache does not hold yet.
"""

import json
import sys
from typing import Iterator, List, Optional

import torch

import llama31
import variants
import runs
from errors import ConfigError
from tokenizer import llama3_system_prompt


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
        self.messages: List[dict] = []  # the user's, the assistant's (as decode_assistant reads them), the tools'
        self.last: Optional[dict] = None  # the assistant's last message
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
            self.messages = self.messages[1:]  # a turn: a user message, and its answers and tool answers
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                self.messages = self.messages[1:]
            prompt, dropped = self.prompt(), dropped + 1
        if dropped:
            print(f"note: the dialog was longer than max_seq_len {max_seq_len} allows with room for an answer; "
                  f"dropped its oldest {dropped} turn(s)", file=sys.stderr)
        if len(prompt) >= max_seq_len:
            self.messages.pop()
            raise ConfigError(f"this message makes a {len(prompt)}-token prompt, and max_seq_len is {max_seq_len}; "
                              f"shorten it or raise --max_seq_len")
        return prompt

    def ask(self, text: str, role: str = "user") -> Iterator[str]:
        """Stream the answer to a message (role "ipython": a tool's answer to the last tool call), piece
        by piece as Llama.stream does. The answer joins the dialog when it ends, also when the caller
        stops it early (close the iterator), as ChatFormat.decode_assistant reads it (self.last:
        content, tool_calls, stop_reason)."""
        self.messages.append({"role": role, "content": text})
        self.last = None
        prompt = self.fit()
        model = self.llama.model
        if model.layers[0].attention.cache is None:  # another generation on this model took it
            model.setup_caches(1, model.args.max_seq_len)
            self.cached = []
        reuse = 0
        while reuse < min(len(self.cached), len(prompt) - 1) and self.cached[reuse] == prompt[reuse]:
            reuse += 1
        self.prefilled, self.cached, ids, stop, steps = len(prompt) - reuse, prompt[:reuse], [], [], 0
        stops = set(self.llama.tokenizer.stop_tokens)

        def counted():  # the tokens to show; the stop token is kept apart, to read the message back
            nonlocal steps
            for (token,) in self.llama.generate_stream([prompt], self.max_gen_len, cache_from=reuse, stops=True,
                                                       **self.sampling):
                steps += 1
                if token in stops:
                    stop.append(token)
                else:
                    yield token

        try:
            for token, piece in self.llama.tokenizer.pieces(counted()):
                ids += [token] if token is not None else []
                yield piece
        finally:  # after k steps the cache holds the prompt and the first k - 1 tokens generated
            self.cached = (prompt + ids)[:len(prompt) + steps - 1] if steps else prompt[:reuse]
            self.last = self.llama.chat_format.decode_assistant(self.llama.tokenizer, ids + stop)
            self.messages.append(self.last)


def chat(ckpt_dir: Optional[str] = None, system: Optional[str] = None, tools=None,
         tokenizer_path: Optional[str] = None, temperature: float = 0.6, top_p: float = 0.9, max_gen_len: int = 256,
         max_seq_len: int = 2048, device: Optional[str] = None, dtype: Optional[str] = None, seed: int = 1,
         rope_scale_factor: Optional[float] = None, compile: bool = False, quantize: Optional[str] = None,
         group_size: int = 32, draft_ckpt_dir: Optional[str] = None, draft_quantize: Optional[str] = None,
         speculate_k: int = 4):
    """Talk to an instruct model: each line you type is a message, each answer streams as it is
    generated, and the whole dialog stays in the model's chat format (its KV cache kept between
    turns, so a long dialog answers as fast as a short one). /reset starts over; /exit or end of
    input leaves; Ctrl-C stops an answer and keeps the dialog. Reads piped input too, one message
    per line. --system sets a system message. --tools brave_search,wolfram_alpha,code_interpreter
    (or your own functions' names) writes Llama 3.1's system prompt that turns tool calls on
    (--system follows it); a tool call the model makes is shown as one line, `tool call: {json}`,
    and `/tool TEXT` sends TEXT as the tool's answer (nothing is run here). Without --ckpt_dir, the
    demo model, drafted by its own 4-bit matrices. --draft_ckpt_dir D, --draft_quantize Q,
    --speculate_k K: speculative decoding, as for sampling (python llama31.py --help). Under
    torchrun, tensor parallel: rank 0 reads the lines and prints the answers."""
    device, parallel = runs.start(device)
    device = llama31.check_device(device or llama31.default_device())
    draft = variants.draft_of(draft_ckpt_dir, draft_quantize, speculate_k, ckpt_dir is None and quantize is None)
    if ckpt_dir is None:
        ckpt_dir, quantize = runs.demo_checkpoint(quantize, drafted=draft is not None)
    llama31.check_sampling_args(temperature, top_p, max_gen_len)
    llama31.check_number("max_seq_len", max_seq_len, int, 2)
    llama31.check_number("seed", seed, int, 0)
    if system is not None and not isinstance(system, str):
        raise ConfigError(f"--system must be a string, got {system!r}")
    tools = [t.strip() for t in (tools.split(",") if isinstance(tools, str) else tools or []) if str(t).strip()]
    llama = llama31.Llama.build(ckpt_dir, tokenizer_path, max_seq_len, 1, device, dtype, rope_scale_factor,
                                compile, quantize, group_size, parallel, draft=draft)
    if tools and getattr(llama.chat_format, "style", None) != "llama3":
        raise ConfigError(f"--tools writes Llama 3's tool prompt, and {ckpt_dir} chats in another format; drop --tools")
    system = llama3_system_prompt(system, tools) if tools else system
    generator = torch.Generator(device=llama.model.output.weight.device).manual_seed(seed)
    conversation = Conversation(llama, system, max_gen_len, temperature, top_p, generator)
    if sys.stdin.isatty():
        print("type a message; /tool TEXT answers a tool call, /reset starts over, /exit leaves", file=sys.stderr)
    while True:
        line = read_line(parallel)
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            conversation.reset()
            print("note: the dialog starts over", file=sys.stderr)
        elif line.strip():
            tool = line.startswith("/tool ")
            show(conversation, line.rstrip("\n")[len("/tool "):] if tool else line.rstrip("\n"),
                 "ipython" if tool else "user")
    conversation.close()


def read_line(parallel: bool) -> Optional[str]:
    """The next line typed (a prompt on a terminal), rank 0's under torchrun; None at the end."""
    try:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = runs.from_rank_0(sys.stdin.readline) if parallel else sys.stdin.readline()
    except KeyboardInterrupt:
        return None
    return line or None


def show(conversation: Conversation, text: str, role: str):
    """The answer to a message, printed as it streams; then each tool call it makes, one JSON line."""
    answer = conversation.ask(text, role)
    try:
        for piece in answer:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:  # stop this answer, keep the dialog
        answer.close()
        print(" [stopped]", end="", file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
    print(flush=True)
    for call in (conversation.last or {}).get("tool_calls", []):
        print("tool call: " + json.dumps(call), flush=True)


if __name__ == "__main__":
    runs.cli(chat, sys.argv[1:], "chat.py")
