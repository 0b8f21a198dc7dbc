"""Code that runs inside vLLM's own processes (its venv, not coldstart's): see ``coldstart_vllm_ext``."""
