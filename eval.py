"""
Perplexity of a model on a text file or on .bin token shards: python eval.py [--ckpt_dir X]
[--data FILE] [--quantize ...] [--T 512]. The last line printed is `perplexity P over N tokens`.
With --tasks, lm-evaluation-harness tasks instead: python eval.py --tasks hellaswag,arc_easy
[--num_fewshot N] [--limit N] [--batch_size B] [--output_path DIR] ... (harness.py).
"""

import glob
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import llama31
import runs
from errors import ConfigError
from formats import HEADER_BYTES, read_datafile_header
from llama31 import Llama, Transformer, check_number


def perplexity(model: Transformer, tokens: torch.Tensor, T: int) -> tuple:
    """(perplexity, tokens predicted) of a 1-D token sequence cut into windows of T tokens; in
    each window every token is predicted from those before it, the first is context only."""
    total, n = 0.0, 0
    for start in range(0, len(tokens) - 1, T):
        window = tokens[start:start + T][None].to(model.norm.weight.device)
        if window.shape[1] < 2:
            break
        logits = model.forward_inference(window[:, :-1])
        total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        n += window.shape[1] - 1
    return math.exp(total / n), n


def evaluate(ckpt_dir: Optional[str] = None, data: Optional[str] = None, T: int = 512,
             quantize: Optional[str] = None, group_size: int = 32, tokenizer_path: Optional[str] = None,
             device: Optional[str] = None, dtype: Optional[str] = None, rope_scale_factor: Optional[float] = None):
    """Perplexity of a model on a text file (documents separated by blank lines, each begun with
    BOS if the tokenizer wants one, as text_completion does) or on .bin token shards (a glob), in
    windows of T tokens. Without --data, data/sample.txt; without --ckpt_dir, the demo model.
    --quantize as for sampling. The last line printed is `perplexity P over N tokens`."""
    device, parallel = runs.start(device)
    device = llama31.check_device(device or llama31.default_device())
    check_number("T", T, int, 2)
    if ckpt_dir is None:
        ckpt_dir = runs.find_demo_gguf()
    data = runs.DEMO_TEXT if data is None else data
    llama = Llama.build(ckpt_dir, tokenizer_path, T, 1, device, dtype, rope_scale_factor, quantize=quantize,
                        group_size=group_size, parallel=parallel)
    tok = llama.tokenizer
    if str(data).endswith(".bin") or glob.has_magic(str(data)):
        files = sorted(glob.glob(str(data)))
        if not files:
            raise ConfigError(f"no token shards match {data}")
        tokens = np.concatenate([np.memmap(f, dtype="<u4", mode="r", offset=HEADER_BYTES,
                                           shape=(read_datafile_header(f),)) for f in files]).astype(np.int64)
    elif Path(data).is_file():
        docs = [d.strip() for d in Path(data).read_text(encoding="utf-8").split("\n\n") if d.strip()]
        tokens = [t for d in docs for t in tok.encode(d, bos=tok.add_bos, eos=False)]
    else:
        raise ConfigError(f"--data {data} is neither a text file nor a pattern of .bin shards")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if len(tokens) < 2 or int(tokens.max()) >= llama.model.args.vocab_size:
        raise ConfigError(f"{data} holds {len(tokens)} tokens" + (
            ", some outside this model's vocabulary; tokenize it with the model's tokenizer" if len(tokens) else ""))
    ppl, n = perplexity(llama.model, tokens, T)
    print(f"{ckpt_dir} ({runs.describe(llama.model)}) on {data}, windows of {T}", file=sys.stderr)
    print(f"perplexity {ppl:.4f} over {n} tokens")
    return ppl


def lm_eval_tasks():
    """harness.main, for --tasks; lm-eval (optional) is imported only then."""
    try:
        import harness
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        print("error: --tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
              "pip install lm-eval==0.4.13", file=sys.stderr)
        sys.exit(2)
    return harness.main


if __name__ == "__main__":
    if any(a.split("=")[0] == "--tasks" for a in sys.argv[1:]):
        runs.cli(lm_eval_tasks(), sys.argv[1:], "eval.py")
    else:
        runs.cli(evaluate, sys.argv[1:], "eval.py")
