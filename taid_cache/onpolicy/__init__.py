"""On-policy distillation: the student's own answers as training data, online: the original's GKD and DistiLLM
samplers (`sampler.py`), with the student generating inside the training loop (`online.py`)."""
