"""
Convert a checkpoint to another layout: python export.py --ckpt_dir X --out_dir D --format
hf|meta|gguf. A LoRA checkpoint exports merged (W + scale * B A).
"""

import sys
from pathlib import Path
from typing import Optional

import formats
import runs
from errors import ConfigError
from llama31 import load_checkpoint, load_model, rope_divisors, save_meta
from variants import lora
from runs import check_out_dir, resolve_dtype
from tokenizer import gguf_vocab_fields


def export(ckpt_dir: str, out_dir: str, format: str = "hf", dtype: str = "bf16",
           rope_scale_factor: Optional[float] = None, gguf_type: str = "f16"):
    """Convert a checkpoint (Meta's layout, model-parallel files included, HF's, or a GGUF file) to
    HF's layout (--format hf: config.json + safetensors, for transformers and vLLM), Meta's
    single-file layout (--format meta: params.json + consolidated.00.pth), or one GGUF file for
    llama.cpp and ollama (--format gguf: out_dir/model.gguf, --gguf_type f32, f16, bf16, q8_0 or
    q4_0, with the tokenizer and chat template). A GGUF source exports to GGUF only (its
    tokenizer has no Meta or HF form here)."""
    if format not in ("hf", "meta", "gguf"):
        raise ConfigError(f"unknown format {format!r}; use hf, meta or gguf")
    if format == "gguf" and gguf_type not in formats.GGUF_TYPES:
        raise ConfigError(f"unknown gguf_type {gguf_type!r}; use one of {', '.join(formats.GGUF_TYPES)}")
    if Path(out_dir).resolve() == Path(ckpt_dir).resolve():
        raise ConfigError("out_dir is ckpt_dir; write the converted checkpoint to a new directory")
    check_out_dir(out_dir)
    adapters = lora.checkpoint(ckpt_dir)  # a LoRA checkpoint: the base's tokenizer, adapters merged
    source, kind = formats.locate(adapters.base if adapters else ckpt_dir)
    formats.check_export_tokenizer(source)  # damage found before anything is written
    if format == "gguf":
        return export_gguf(source, kind, Path(out_dir), rope_scale_factor, gguf_type, ckpt_dir)
    if kind == "gguf":
        raise ConfigError(f"{ckpt_dir} is a GGUF file, whose tokenizer has no Meta or HF form here; export it "
                          f"with --format gguf")
    model = load_model(ckpt_dir, device="cpu", dtype=dtype, rope_scale_factor=rope_scale_factor)
    lora.merge(model)
    if format == "hf":
        formats.save_hf(model.state_dict(), model.args.to_params(), out_dir, dtype=resolve_dtype(dtype, "cpu"))
    else:
        save_meta(model, out_dir, dtype=resolve_dtype(dtype, "cpu"))
    print(f"wrote {out_dir} ({format}, {dtype})", file=sys.stderr)
    formats.export_tokenizer(source, Path(out_dir), format, model.args.to_params())


def export_gguf(source: Path, kind: str, out_dir: Path, rope_scale_factor, gguf_type: str, weights=None):
    """weights: where the weights come from if not source (a LoRA checkpoint on the base `source`)."""
    llama = load_checkpoint(weights or source, None, "cpu", "fp32", "none", rope_scale_factor=rope_scale_factor)
    lora.merge(llama.model)
    args = llama.model.args
    if kind == "gguf":  # the file's own tokenizer metadata and template, as they are
        fields = formats.gguf_fields(source)
    else:
        fields = {**gguf_vocab_fields(llama.tokenizer.vocab), "chat_template": formats.LLAMA3_CHAT_TEMPLATE}
    out_dir.mkdir(parents=True, exist_ok=True)
    formats.save_gguf(llama.model.state_dict(), args.to_params(), out_dir / "model.gguf", fields, gguf_type,
                      rope_divisors(args) if args.use_scaled_rope else None, name=source.name)
    print(f"wrote {out_dir / 'model.gguf'} ({gguf_type}); python llama31.py --ckpt_dir {out_dir / 'model.gguf'} "
          f"samples from it, as llama.cpp does", file=sys.stderr)


if __name__ == "__main__":
    runs.cli(export, sys.argv[1:], "export.py")
