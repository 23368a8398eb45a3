"""Every test helper, one module per concept: `from _support.<module> import ...`.

`tests/` is on pytest's import path (`pythonpath` in pyproject.toml) and test modules
are imported by path (`--import-mode=importlib`), so this package is the one place a
test imports a helper from; a test folder holds tests and its conftest only.
"""
