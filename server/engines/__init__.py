"""Teacher engines behind one protocol (``base``): ``hf`` (embedded default), ``vllm`` and ``sglang``."""
