"""
Tokenize a text file of blank-line-separated documents into .bin token shards for finetune:
python shards.py --text FILE --out_dir D [--ckpt_dir X].
"""

import sys
from pathlib import Path
from typing import Optional

import runs
from formats import load_tokenizer, text_to_shards
from runs import check_number, find_demo_gguf
from tokenizer import Tokenizer, find_tokenizer_model


def shards(text: str, out_dir: str, ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
           val_docs: Optional[int] = None):
    """Tokenize a text file of blank-line-separated documents into .bin shards for finetune:
    out_dir/NAME_train.bin and NAME_val.bin (the last val_docs documents; default 1%, at least 2).
    The tokenizer: --tokenizer_path, else the checkpoint's (a directory's tokenizer.model, or a
    .gguf file's own vocabulary), else Llama 3's; without --ckpt_dir, the demo model's."""
    if val_docs is not None:
        check_number("val_docs", val_docs, int, 1)
    if ckpt_dir is None and tokenizer_path is None:
        ckpt_dir = find_demo_gguf()
        print(f"note: no --ckpt_dir, so these shards use the demo model's tokenizer ({ckpt_dir.name}); pass the "
              f"--ckpt_dir of the model you will finetune", file=sys.stderr)
    if ckpt_dir is None:
        tokenizer = Tokenizer(find_tokenizer_model(tokenizer_path))
    else:
        tokenizer = load_tokenizer(ckpt_dir, tokenizer_path)
    train, val = text_to_shards(Path(text), tokenizer, Path(out_dir), val_docs)
    print(f"wrote {train} and {val} ({tokenizer.model.name} tokenizer); finetune with --train_data {train} "
          f"--val_data {val}", file=sys.stderr)


if __name__ == "__main__":
    runs.cli(shards, sys.argv[1:], "shards.py")
