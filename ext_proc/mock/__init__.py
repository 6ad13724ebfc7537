"""A mock LLM upstream (OpenAI, Azure OpenAI, Anthropic) with honest token usage."""

from ext_proc.mock.knobs import MockOptions
from ext_proc.mock.upstream import MockUpstream, add_arguments, options_from_args, run

__all__ = ["MockOptions", "MockUpstream", "add_arguments", "options_from_args", "run"]
