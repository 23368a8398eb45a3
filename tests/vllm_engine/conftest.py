"""vLLM engine tests: each module skips itself unless vLLM is installed.

`scripts/test-vllm.sh` installs the extra into `.venv-vllm` and runs them; the main
`.venv` (no vLLM) skips them.
"""
