"""Helpers shared by more than one test folder: `from _support.<module> import ...`.

`tests/` is on pytest's import path (`pythonpath` in pyproject.toml), so this
package is found from every folder; a helper used by one folder only stays in
that folder's own helper module.
"""
