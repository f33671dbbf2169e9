"""gpt-oss-nano: the built-in model, `ossscope.load("nano")`.

The gpt-oss architecture unchanged (sinks, alternating sliding window, YaRN RoPE, top-k MoE with MXFP4
experts), small, trained on a synthetic harmony corpus (`data.py`): column-by-column arithmetic whose analysis
length follows the reasoning effort, sorting, and function calls. See MODEL_CARD.md.

Pass `get_weather` / `convert_units` from here as `tools=` to `model.chat` to get the tools it was trained with:

    import ossscope
    from ossscope.nano import get_weather
    model = ossscope.load("nano")
    trace = model.chat("What is 4821 + 1390?", reasoning="high", temperature=0)
    trace = model.chat("What's the weather in Oslo?", tools=[get_weather], temperature=0)
"""

from .data import TOOL_FUNCTIONS, convert_units, get_weather

__all__ = ["TOOL_FUNCTIONS", "convert_units", "get_weather"]
