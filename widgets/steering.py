"""The steering control: a vector added at one layer, scaled; built from two sets of prompts (difference of
mean activations) or set from Python. `apply(model)` calls model.set_steering / clear_steering."""

from __future__ import annotations

from typing import Any

import ipywidgets as w
import torch

from .analysis import steering_vector


class SteeringControl(w.VBox):
    def __init__(self, num_layers: int, model: Any = None) -> None:
        self.model = model
        self.vector: torch.Tensor | None = None  # [D] fp32, before scaling
        self.vector_layer: int | None = None  # the layer the vector was computed at
        self.enabled = w.Checkbox(value=False, description="steer the next runs", indent=False)
        self.layer = w.Dropdown(options=[(f"layer {i}", i) for i in range(num_layers)], value=num_layers // 2,
                                description="layer", layout=w.Layout(width="200px"))
        self.scale = w.FloatSlider(value=4.0, min=-32.0, max=32.0, step=0.5, description="scale",
                                   continuous_update=False, layout=w.Layout(width="320px"))
        area = dict(layout=w.Layout(width="100%", height="90px"))
        self.positive = w.Textarea(placeholder="prompts to steer toward, one per line", **area)
        self.negative = w.Textarea(placeholder="prompts to steer away from, one per line", **area)
        self.compute_button = w.Button(description="Compute vector", icon="calculator", button_style="info",
                                       disabled=model is None)
        self.status = w.HTML("<span style='color:#57606a'>No vector yet.</span>")
        self.compute_button.on_click(lambda _: self.compute())
        help_text = w.HTML("<span style='color:#57606a;font-size:12px'>The vector is the mean residual stream "
                           "after the layer over the first prompts minus the mean over the second ones; the run "
                           "adds scale \u00d7 vector there on every token.</span>")
        super().__init__([help_text, w.HBox([self.layer, self.scale]), w.Label("toward"), self.positive,
                          w.Label("away from"), self.negative, w.HBox([self.compute_button, self.enabled]),
                          self.status])

    @staticmethod
    def _lines(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip()]

    def compute(self) -> torch.Tensor | None:
        """Difference of mean activations between the two prompt sets at the chosen layer; enables steering."""
        if self.model is None:
            self.status.value = "<span style='color:#cf222e'>No model: steering needs Lab(model).</span>"
            return None
        positive, negative = self._lines(self.positive.value), self._lines(self.negative.value)
        if not positive or not negative:
            self.status.value = "<span style='color:#cf222e'>Write at least one prompt in each box.</span>"
            return None
        try:
            vector = steering_vector(self.model, positive, negative, self.layer.value)
        except ValueError as exc:
            self.status.value = f"<span style='color:#cf222e'>{type(exc).__name__}: {exc}</span>"
            return None
        self.set_vector(vector, self.layer.value)
        return vector

    def set_vector(self, vector: torch.Tensor, layer: int) -> None:
        """Use this vector [D] at `layer` (enables steering for the next runs)."""
        self.vector, self.vector_layer = torch.as_tensor(vector).float(), int(layer)
        self.layer.value = int(layer)
        self.enabled.value = True
        self.status.value = (f"Vector at layer {layer}: norm {float(self.vector.norm()):.3g} "
                             f"({self.vector.numel()} dims).")

    def apply(self, model: Any) -> dict[str, Any] | None:
        """Set or clear the model's steering; returns what was applied (for the run's record)."""
        model.clear_steering()
        if not self.enabled.value or self.vector is None:
            return None
        model.set_steering(self.layer.value, self.vector, self.scale.value)
        return {"layer": self.layer.value, "scale": self.scale.value, "norm": float(self.vector.norm())}

    def describe(self) -> str:
        if not self.enabled.value or self.vector is None:
            return "none"
        return f"L{self.layer.value} \u00d7{self.scale.value:g}"
