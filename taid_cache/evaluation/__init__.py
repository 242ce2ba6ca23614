"""Judging students: against the real teacher on the held-out data (CE, KL, top-1: `against_teacher.py`), and by
what they generate (`generation.py`: answers to held-out prompts; `scores.py`: ROUGE-L and exact match against the
references; the teacher's per-token NLL of the answers). `taid-cache evaluate` and `make reproduce` run both."""
