"""Run by test_finetune (and test_cuda, with DDP_DEVICE=cuda) under torchrun: argv ckpt train val out mode
[stop_after|- [finetune_type]]. mode ddp: finetune
and save this rank's weights as rank{N}.pt; fsdp: finetune sharded, with activation checkpointing,
evaluation and sampling (which gather the shards), the checkpoint being the output; fsdp-resume:
continue out's latest (without activation checkpointing)."""

import os
import sys

import llama31
import runs

ckpt, train, val, out, mode = sys.argv[1:6]
stop_after = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "-" else None
finetune_type = sys.argv[7] if len(sys.argv) > 7 else "all"
device = os.environ.get("DDP_DEVICE", "cpu")
kw = dict(ckpt_dir=ckpt, train_data=train, val_data=val, out_dir=out, B=2, T=32, total_batch_size=4 * 2 * 32,
          max_steps=3, stop_after=stop_after, learning_rate=1e-3, warmup_steps=2, val_every=0, device=device,
          sample_prompts=[], finetune_type=finetune_type)
if mode == "fsdp":
    kw.update(fsdp=True, checkpoint_activations=True, val_every=2, sample_prompts=["The cat"], sample_len=4)
if mode == "fsdp-resume":
    kw = dict(out_dir=out, resume="latest", device=device, val_every=0, sample_prompts=[])
result = llama31.finetune(**kw)
if mode == "ddp":
    import torch
    torch.save(result["model"].state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
del result  # the model holds the process group (FSDP's mesh), which ends once nothing does
runs.finish()
