"""lm-evaluation-harness integration: the task class, the request handler and task discovery."""
