/* Expert-ablation picker: a layers x experts grid of cells; click a cell (or a layer label for the whole row)
 * to toggle it. Synced trait `cells` is a list of [layer, expert] pairs; `usage` (optional, L*E floats in
 * [0, 1]) shades each cell by how often the last run used that expert, to show which ones matter. */
function draw(model, el) {
  const L = model.get("layers"), E = model.get("experts");
  const cells = new Set(model.get("cells").map((c) => c[0] * E + c[1]));
  const usage = model.get("usage");
  el.textContent = "";
  const root = document.createElement("div");
  root.className = "oss-grid";
  const size = E > 64 ? 7 : E > 32 ? 11 : 16;
  root.style.gridTemplateColumns = "44px repeat(" + E + ", " + size + "px)";
  const corner = document.createElement("div");
  corner.className = "oss-grid-corner";
  corner.textContent = "layer";
  root.appendChild(corner);
  for (let e = 0; e < E; e++) {
    const head = document.createElement("div");
    head.className = "oss-grid-col";
    head.textContent = E <= 32 || e % 8 === 0 ? String(e) : "";
    root.appendChild(head);
  }
  const save = () => {
    model.set("cells", Array.from(cells).sort((a, b) => a - b).map((i) => [Math.floor(i / E), i % E]));
    model.save_changes();
  };
  for (let l = 0; l < L; l++) {
    const label = document.createElement("button");
    label.className = "oss-grid-row";
    label.textContent = "L" + l;
    label.title = "toggle every expert of layer " + l;
    label.addEventListener("click", () => {
      let all = true;
      for (let e = 0; e < E; e++) if (!cells.has(l * E + e)) all = false;
      for (let e = 0; e < E; e++) all ? cells.delete(l * E + e) : cells.add(l * E + e);
      save();
    });
    root.appendChild(label);
    for (let e = 0; e < E; e++) {
      const cell = document.createElement("div");
      const on = cells.has(l * E + e);
      cell.className = "oss-grid-cell" + (on ? " on" : "");
      cell.setAttribute("data-cell", l + ":" + e);
      cell.style.width = cell.style.height = size + "px";
      const u = usage.length === L * E ? usage[l * E + e] : 0;
      if (!on && u > 0) cell.style.background = "rgba(9,105,218," + (0.08 + 0.6 * u).toFixed(3) + ")";
      cell.title = "layer " + l + ", expert " + e + (usage.length ? ", used by " + (100 * u).toFixed(1) +
        "% of tokens in the last run" : "");
      cell.addEventListener("click", () => {
        on ? cells.delete(l * E + e) : cells.add(l * E + e);
        save();
      });
      root.appendChild(cell);
    }
  }
  el.appendChild(root);
}

export default {
  render({ model, el }) {
    const redraw = () => draw(model, el);
    redraw();
    for (const key of ["cells", "usage", "layers", "experts"]) model.on("change:" + key, redraw);
  },
};
