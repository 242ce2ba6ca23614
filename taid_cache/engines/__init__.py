"""Teacher engines: backbones that turn token sequences into the teacher's hidden states (`base.py`, the
contract; `hf_engine.py`, `vllm_engine.py`), and the one head path that turns those into a cache's contents
(`head_path.py`). Light on purpose: the command line reads the choices below without importing torch."""

ENGINES = ("auto", "vllm", "hf")
DISTRIBUTED_BACKENDS = ("mp", "ray")  # vLLM's executors: multiprocessing on one node, Ray across nodes
