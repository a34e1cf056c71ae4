"""Run by test_finetune under torchrun: finetune, then save this rank's weights for comparison."""

import os
import sys

import torch

import llama31

ckpt, train, val, out = sys.argv[1:5]
result = llama31.finetune(ckpt_dir=ckpt, train_data=train, val_data=val, out_dir=out, B=2, T=32,
                          total_batch_size=4 * 2 * 32, max_steps=3, learning_rate=1e-3, warmup_steps=2,
                          val_every=0, device="cpu", sample_prompts=[])
torch.save(result["model"].state_dict(), os.path.join(out, f"rank{os.environ['RANK']}.pt"))
