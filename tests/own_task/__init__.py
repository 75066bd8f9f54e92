"""A task defined outside vlmrl, used by tests/test_own_task.py to prove the public Task API."""
