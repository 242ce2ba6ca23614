"""Run by test_hf_trainer.py under torchrun: DistillationTrainer on a cache (DDP over gloo), the per-step losses
and t written by rank 0 as JSON."""

import json
import sys

import torch.distributed as dist
from transformers import AutoModelForCausalLM, TrainingArguments

from taid_cache.integrations import DistillationTrainer
from taid_cache.losses import LossConfig, TaidSchedule

student, cache, out, steps, batch, lr = sys.argv[1:7]
args = TrainingArguments(output_dir=out, max_steps=int(steps), per_device_train_batch_size=int(batch), learning_rate=float(lr),
                         lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, seed=0, report_to=[],
                         save_strategy="no", dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo")
trainer = DistillationTrainer(AutoModelForCausalLM.from_pretrained(student), cache, args, LossConfig("taid"), TaidSchedule(), max_length=256)
trainer.train()
if dist.get_rank() == 0:
    with open(f"{out}/history.json", "w") as fh:
        json.dump(trainer.taid.history, fh)
