"""harmony's built-in tools, offline: `Browser(corpus)` (search/open/find over a local corpus) and `Python()`
(a stateful Jupyter kernel). Pass them in `chat(..., tools=[...])` beside function tools; they are declared in
the system message as openai-harmony renders them, and their calls are answered by `ossscope.tools.base`."""

from ossscope.tools.base import BuiltinTool, ToolUsageError, split_tools
from ossscope.tools.browser import CITATION, Browser, Document
from ossscope.tools.python import Python

__all__ = ["CITATION", "Browser", "BuiltinTool", "Document", "Python", "ToolUsageError", "split_tools"]
