"""Run by test_hf_trainer.py under torchrun: CacheDistillationTrainer on a cache (DDP over gloo) for each loss named,
one after the other in this process group; rank 0 writes each run's per-step losses and t as JSON."""

import json
import sys

import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from taid_cache.errors import run_and_exit
from taid_cache.integrations import CacheDistillationConfig, CacheDistillationTrainer

def main() -> None:
    student, cache, out, steps, batch, lr, losses = sys.argv[1:8]
    for loss in losses.split(","):
        args = CacheDistillationConfig(output_dir=f"{out}/{loss}", max_steps=int(steps), per_device_train_batch_size=int(batch),
                                       learning_rate=float(lr), lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                                       logging_steps=1, seed=0, report_to=[], save_strategy="no", dataloader_num_workers=0,
                                       use_cpu=True, ddp_backend="gloo", loss=loss, max_length=256)
        trainer = CacheDistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, train_dataset=cache,
                                           processing_class=AutoTokenizer.from_pretrained(student))
        trainer.train()
        if dist.get_rank() == 0:
            with open(f"{out}/{loss}.json", "w") as fh:
                json.dump(trainer.steps.history, fh)


# Ended as docs/API.md advises for a Trainer script under torchrun: without interpreter teardown, where gloo's
# threads were seen to abort a finished rank ("terminate called without an active exception", exit -6).
run_and_exit(main)
