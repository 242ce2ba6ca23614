"""Stage two's steps after the reader: batches (data.py), the teacher (teacher.py), the student and its FSDP2
step (student.py, distributed.py), checkpoints and the run folder, metrics and held-out evaluation."""
