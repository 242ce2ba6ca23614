"""Run by test_hf_trainer.py under torchrun: train-student's run (FSDP2 over gloo) for each loss named, one after the
other in one process group (one torchrun start for all of them)."""

import json
import sys

from taid_cache.config import TrainConfig, from_json
from taid_cache.errors import run_and_exit
from taid_cache.pipelines.train_student import run
from taid_cache.training.distributed import close_distributed, init_distributed

def main() -> None:
    config, losses = json.loads(open(sys.argv[1]).read()), sys.argv[2].split(",")
    env = init_distributed()
    for loss in losses:
        run(from_json(TrainConfig, {**config, "loss": loss, "output": f"{config['output']}/{loss}"}), env)
    close_distributed(env)


run_and_exit(main)  # as train-student's own ranks end: without interpreter teardown (see run_and_exit)
