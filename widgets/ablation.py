"""The expert-ablation picker: a layers x experts grid (anywidget) with a reroute/zero choice.

The picker only holds a choice; `apply(model)` turns it into `model.set_ablation(...)` (the Lab calls it
before every run, so the choice changes the next run).
"""

from __future__ import annotations

from typing import Any

import anywidget
import ipywidgets as w
import traitlets

from .export import static_text


class AblationGrid(anywidget.AnyWidget):
    """Clickable layers x experts grid. `cells`: [[layer, expert], ...] chosen; `usage`: L*E shares to shade."""

    _esm = static_text("ablation_grid.js")
    _css = static_text("ablation_grid.css")

    layers = traitlets.Int(1).tag(sync=True)
    experts = traitlets.Int(1).tag(sync=True)
    cells = traitlets.List(traitlets.List(traitlets.Int()), default_value=[]).tag(sync=True)
    usage = traitlets.List(traitlets.Float(), default_value=[]).tag(sync=True)

    @traitlets.validate("cells")
    def _check_cells(self, proposal: Any) -> list[list[int]]:
        clean = set()
        for cell in proposal["value"]:
            if len(cell) != 2:
                raise traitlets.TraitError(f"an ablation cell is [layer, expert], got {cell!r}")
            layer, expert = int(cell[0]), int(cell[1])
            if not (0 <= layer < self.layers and 0 <= expert < self.experts):
                raise traitlets.TraitError(
                    f"cell {cell!r} is outside the grid of layers 0..{self.layers - 1}, experts 0..{self.experts - 1}"
                )
            clean.add((layer, expert))
        return [list(c) for c in sorted(clean)]


class AblationPicker(w.VBox):
    """Grid + mode + clear, with a line saying what the next run will ablate."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.grid = AblationGrid(layers=num_layers, experts=num_experts)
        self.mode = w.ToggleButtons(options=["reroute", "zero"], value="reroute",
                                    tooltips=["the expert can never be chosen; the next best takes its place",
                                              "routing unchanged; the expert's output is dropped"],
                                    style={"button_width": "80px"})
        self.clear_button = w.Button(description="Clear", icon="times", layout=w.Layout(width="90px"))
        self.summary = w.HTML()
        self.clear_button.on_click(lambda _: self.clear())
        self.grid.observe(self._update_summary, names="cells")
        self.mode.observe(self._update_summary, names="value")
        help_text = w.HTML("<span style='color:#57606a;font-size:12px'>Click cells to pick experts (a layer label "
                           "toggles its row). Blue shading: how often the last run used each expert. "
                           "The choice applies from the next run.</span>")
        super().__init__([help_text, w.HBox([w.Label("mode"), self.mode, self.clear_button]), self.grid,
                          self.summary])
        self._update_summary()

    @property
    def experts_by_layer(self) -> dict[int, list[int]]:
        """The chosen experts, {layer: [expert, ...]}."""
        chosen: dict[int, list[int]] = {}
        for layer, expert in self.grid.cells:
            chosen.setdefault(layer, []).append(expert)
        return chosen

    def set(self, experts_by_layer: dict[int, list[int]], mode: str | None = None) -> None:
        """Choose experts from Python (same form as model.set_ablation)."""
        self.grid.cells = [[int(layer), int(e)] for layer, experts in experts_by_layer.items() for e in experts]
        if mode is not None:
            self.mode.value = mode

    def clear(self) -> None:
        self.grid.cells = []

    def apply(self, model: Any) -> dict[str, Any]:
        """Make the model ablate what is chosen (or nothing); returns model.active_ablation."""
        chosen = self.experts_by_layer
        if chosen:
            model.set_ablation(chosen, mode=self.mode.value)
        else:
            model.clear_ablation()
        return dict(model.active_ablation)

    def describe(self) -> str:
        chosen = self.experts_by_layer
        if not chosen:
            return "none"
        return f"{self.mode.value} " + "; ".join(f"L{layer}: {', '.join(map(str, e))}" for layer, e in chosen.items())

    def _update_summary(self, _: Any = None) -> None:
        self.summary.value = f"<b>Next run ablates:</b> {self.describe()}"
