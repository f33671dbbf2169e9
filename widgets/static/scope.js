/* ossscope trace viewer: draws a Trace payload (widgets/payload.py) with plain DOM and canvas.
 *
 * One file serves two hosts: the offline HTML export (inlined in a <script>, no network) and the notebook's
 * anywidget (TraceView), which appends an ES-module `export default` after this file. Every string that came
 * from the model or the user goes into the page through textContent or a canvas, never through innerHTML.
 */
(function (global) {
  "use strict";

  // ---------------------------------------------------------------------------------------------- data
  function bytesFromBase64(text) {
    const bin = atob(text || "");
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function decode(p) {
    const d = p.dims;
    const idxRaw = bytesFromBase64(p.router.idx);
    const idx = p.router.idx_bytes === 2 ? new Uint16Array(idxRaw.buffer) : idxRaw;
    const w = bytesFromBase64(p.router.w);
    const sink = bytesFromBase64(p.sink);
    const attention = {};
    for (const key of Object.keys(p.attention || {})) {
      const a = p.attention[key];
      const rowOf = new Map();
      a.rows.forEach((t, r) => rowOf.set(t, r));
      attention[key] = { rowOf: rowOf, keys: a.keys, data: bytesFromBase64(a.data) };
    }
    let lensRowOf = null;
    if (p.lens) {
      lensRowOf = new Map();
      p.lens.rows.forEach((t, r) => lensRowOf.set(t, r));
    }
    const data = {
      p: p, T: d.T, L: d.L, K: d.k, H: d.H, E: d.E, P: d.P,
      idx: (t, l, j) => idx[(t * d.L + l) * d.k + j],
      w: (t, l, j) => w[(t * d.L + l) * d.k + j] / 255,
      sink: (t, l, h) => sink[(t * d.L + l) * d.H + h] / 255,
      attention: attention,
      lensRowOf: lensRowOf,
    };
    data.sinkMean = (t, l) => {
      let s = 0;
      for (let h = 0; h < d.H; h++) s += data.sink(t, l, h);
      return s / d.H;
    };
    data.entropy = (t, l) => {
      let e = 0;
      for (let j = 0; j < d.k; j++) {
        const x = Math.max(data.w(t, l, j), 1e-12);
        e -= x * Math.log(x);
      }
      return e;
    };
    data.topExpert = (t, l) => {
      let best = 0;
      for (let j = 1; j < d.k; j++) if (data.w(t, l, j) > data.w(t, l, best)) best = j;
      return data.idx(t, l, best);
    };
    data.lensRank = (t, l) => {
      const ranks = p.lens && p.lens.rank;
      if (!ranks || !ranks[t] || ranks[t][0] < 0) return NaN;
      if (l !== null) return ranks[t][l];
      for (let k = 0; k < d.L; k++) if (ranks[t][k] === 0) return k;
      return d.L;
    };
    return data;
  }

  const METRICS = {
    entropy: "Router entropy",
    sink: "Sink mass",
    expert: "Top expert",
    lens_rank: "Logit-lens rank of next token",
  };

  // Same definitions as widgets/metrics.py (layer null = mean over layers; expert uses layer 0 then).
  function metricValue(data, metric, layer, t) {
    const L = data.L;
    if (metric === "expert") return data.topExpert(t, layer === null ? 0 : layer);
    if (metric === "lens_rank") return data.lensRank(t, layer);
    const f = metric === "sink" ? data.sinkMean : data.entropy;
    if (layer !== null) return f(t, layer);
    let s = 0;
    for (let l = 0; l < L; l++) s += f(t, l);
    return s / L;
  }

  // --------------------------------------------------------------------------------------------- colors
  const BLUES = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

  function ramp(stops, x) {
    if (!(x >= 0)) x = 0;
    if (x > 1) x = 1;
    const pos = x * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(pos));
    const f = pos - i;
    const a = stops[i], b = stops[i + 1];
    return [0, 1, 2].map((c) => Math.round(a[c] + (b[c] - a[c]) * f));
  }
  const rgb = (c) => "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")";
  const expertHue = (e) => (e * 137.508) % 360;
  const expertColor = (e, light) => "hsl(" + expertHue(e).toFixed(1) + ",62%," + (light || 58) + "%)";
  const luminance = (c) => (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255;

  // ----------------------------------------------------------------------------------------------- dom
  function h(tag, attrs) {
    const node = document.createElement(tag);
    for (const key of Object.keys(attrs || {})) {
      const v = attrs[key];
      if (v === null || v === undefined || v === false) continue;
      if (key === "class") node.className = v;
      else if (key === "style") node.style.cssText = v;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), v);
      else node.setAttribute(key, v);
    }
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }
  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach((c) => append(node, c));
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }
  function select(options, value, onChange, label) {
    const s = h("select", { "aria-label": label, onchange: (e) => onChange(e.target.value) });
    for (const [v, text] of options) {
      const o = h("option", { value: String(v) }, text);
      if (String(v) === String(value)) o.selected = true;
      s.appendChild(o);
    }
    return h("label", { class: "oss-control" }, h("span", {}, label), s);
  }
  // Make whitespace visible in token chips and tooltips.
  const showToken = (text) => (text === "" ? "\u2205" : text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"));
  /* [min, max] of the finite values, or null: a loop, because Math.min.apply and spreads pass every value as
   * an argument and overflow the stack on long traces (a 131k-token trace has 131k values). */
  function finiteRange(values) {
    let lo = Infinity, hi = -Infinity;
    for (let i = 0; i < values.length; i++) {
      const x = values[i];
      if (Number.isFinite(x)) {
        if (x < lo) lo = x;
        if (x > hi) hi = x;
      }
    }
    return lo <= hi ? [lo, hi] : null;
  }

  const fmt = (x, digits) => (Number.isFinite(x) ? x.toFixed(digits === undefined ? 2 : digits) : "\u2013");

  // --------------------------------------------------------------------------------------------- canvas
  /* A heatmap on a canvas: rows x cols cells, labels on the left, a tooltip and clicks per cell. */
  const MAX_CANVAS_PX = 16384; // per side, in device pixels: browsers leave a larger canvas blank (Chromium: 32,767)

  function heatmap(view, opts) {
    const labelW = opts.labelWidth || 56;
    const dpr = global.devicePixelRatio || 1;
    // A long trace (131k tokens) would need a canvas wider than any browser draws: narrow the cells below a
    // pixel, and draw one sampled column per pixel (hover and click still find each column's token).
    const room = Math.floor(MAX_CANVAS_PX / dpr) - labelW - 2;
    const cellW = opts.cols * opts.cellW > room ? room / opts.cols : opts.cellW, cellH = opts.cellH;
    const width = Math.ceil(labelW + opts.cols * cellW + 2), height = opts.rows * cellH + 2;
    const canvas = h("canvas", { class: "oss-canvas", style: "width:" + width + "px;height:" + height + "px" });
    canvas.width = Math.ceil(width * dpr);
    canvas.height = Math.ceil(height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.font = "10px ui-monospace, SFMono-Regular, Menlo, monospace";
    ctx.textBaseline = "middle";
    for (let r = 0; r < opts.rows; r++) {
      ctx.fillStyle = "#57606a";
      ctx.textAlign = "right";
      if (cellH >= 8) ctx.fillText(opts.rowLabel(r), labelW - 6, r * cellH + cellH / 2 + 1);
      if (cellW < 1) {
        for (let x = 0; x < Math.ceil(opts.cols * cellW); x++) {
          ctx.fillStyle = opts.color(r, Math.min(opts.cols - 1, Math.floor(x / cellW)));
          ctx.fillRect(labelW + x, r * cellH, 1, cellH - 1);
        }
        continue;
      }
      for (let c = 0; c < opts.cols; c++) {
        ctx.fillStyle = opts.color(r, c);
        ctx.fillRect(labelW + c * cellW, r * cellH, Math.max(1, cellW - (cellW > 4 ? 1 : 0)), cellH - 1);
      }
    }
    if (opts.highlightCol !== undefined && opts.highlightCol >= 0) {
      ctx.strokeStyle = "#d1242f";
      ctx.lineWidth = 2;
      ctx.strokeRect(labelW + opts.highlightCol * cellW - 1, 0, Math.max(1, cellW) + 1, opts.rows * cellH);
    }
    const cellAt = (ev) => {
      const box = canvas.getBoundingClientRect();
      const c = Math.floor((ev.clientX - box.left - labelW) / cellW);
      const r = Math.floor((ev.clientY - box.top) / cellH);
      return c >= 0 && c < opts.cols && r >= 0 && r < opts.rows ? [r, c] : null;
    };
    canvas.addEventListener("mousemove", (ev) => {
      const cell = cellAt(ev);
      if (cell && opts.tooltip) view.tooltip(ev, opts.tooltip(cell[0], cell[1]));
      else view.tooltip(null);
      if (cell && opts.onHover) opts.onHover(cell[0], cell[1]);
    });
    canvas.addEventListener("mouseleave", () => view.tooltip(null));
    canvas.addEventListener("click", (ev) => {
      const cell = cellAt(ev);
      if (cell && opts.onClick) opts.onClick(cell[0], cell[1]);
    });
    return h("div", { class: "oss-scroll" }, canvas);
  }

  function colorBar(stops, lo, hi, label) {
    const bar = h("span", { class: "oss-colorbar" });
    const grad = stops.map((s, i) => rgb(s) + " " + ((100 * i) / (stops.length - 1)).toFixed(0) + "%").join(",");
    bar.style.background = "linear-gradient(90deg," + grad + ")";
    return h("span", { class: "oss-legend" }, h("span", {}, label), h("span", { class: "oss-num" }, lo), bar,
      h("span", { class: "oss-num" }, hi));
  }

  // ----------------------------------------------------------------------------------------------- view
  function View(root, payloads, host) {
    this.root = root;
    this.host = host || {};
    this.state = { run: 0, tab: "reasoning", metric: "entropy", layer: null, head: 0, channel: "all",
      selected: -1, hover: -1 };
    this.setPayloads(payloads);
  }

  View.prototype.setPayloads = function (payloads) {
    this.payloads = Array.isArray(payloads) ? payloads : [payloads];
    if (this.state.run >= this.payloads.length) this.state.run = this.payloads.length - 1;
    this.data = decode(this.payloads[this.state.run]);
    if (this.state.selected >= this.data.T) this.state.selected = -1;
    if (this.state.head >= this.data.H) this.state.head = 0;
    if (this.state.layer !== null && this.state.layer >= this.data.L) this.state.layer = null;
    this.render();
  };

  View.prototype.set = function (changes) {
    const before = Object.assign({}, this.state);
    Object.assign(this.state, changes);
    if (changes.run !== undefined && changes.run !== before.run) {
      this.data = decode(this.payloads[this.state.run]);
      this.state.selected = -1;
    }
    if (changes.selected !== undefined && this.host.onSelect) this.host.onSelect(this.state.selected);
    if (this.host.onState) this.host.onState(this.state);
    this.render();
  };

  View.prototype.focusToken = function () {
    return this.state.hover >= 0 ? this.state.hover : this.state.selected;
  };

  View.prototype.visible = function (t) {
    const ch = this.state.channel;
    return ch === "all" || this.data.p.channels[t] === ch;
  };

  View.prototype.visibleTokens = function () {
    const out = [];
    for (let t = 0; t < this.data.T; t++) if (this.visible(t)) out.push(t);
    return out;
  };

  View.prototype.metricValues = function () {
    const out = [];
    for (let t = 0; t < this.data.T; t++) out.push(metricValue(this.data, this.state.metric, this.state.layer, t));
    return out;
  };

  View.prototype.tooltip = function (ev, lines) {
    const tip = this.tip;
    if (!ev || !lines) {
      tip.style.display = "none";
      return;
    }
    tip.textContent = "";
    (Array.isArray(lines) ? lines : [lines]).forEach((line) => tip.appendChild(h("div", {}, line)));
    tip.style.display = "block";
    tip.style.left = ev.clientX + 14 + "px";
    tip.style.top = ev.clientY + 14 + "px";
  };

  View.prototype.layerName = function (l) {
    return "L" + l + (this.data.p.sliding[l] ? " \u00b7 sliding" : " \u00b7 full");
  };

  View.prototype.render = function () {
    const root = this.root;
    root.textContent = "";
    root.classList.add("oss-scope");
    this.tip = h("div", { class: "oss-tip" });
    root.appendChild(this.header());
    const body = h("div", { class: "oss-body" });
    this.main = h("div", { class: "oss-main" });
    this.panel = h("aside", { class: "oss-panel" });
    body.appendChild(this.main);
    body.appendChild(this.panel);
    root.appendChild(body);
    root.appendChild(this.tip);
    this.renderMain();
    this.renderPanel();
  };

  View.prototype.header = function () {
    const s = this.state, d = this.data, p = d.p;
    const chips = [p.model, "reasoning: " + p.reasoning, d.T + " tokens", d.L + " layers", d.E + " experts (top " +
      d.K + ")", d.H + " heads"].filter(Boolean);
    const title = h("div", { class: "oss-title" }, h("span", { class: "oss-logo" }, "ossscope"),
      h("span", { class: "oss-name" }, p.title), chips.map((c) => h("span", { class: "oss-chip" }, c)),
      checkBadge(p.check));
    const controls = h("div", { class: "oss-controls" });
    if (this.payloads.length > 1) {
      controls.appendChild(select(this.payloads.map((q, i) => [i, (i + 1) + ". " + q.title]), s.run,
        (v) => this.set({ run: Number(v) }), "Run"));
    }
    controls.appendChild(select(Object.entries(METRICS), s.metric, (v) => this.set({ metric: v }), "Color by"));
    const layers = [["all", "all layers (mean)"]];
    for (let l = 0; l < d.L; l++) layers.push([l, this.layerName(l)]);
    controls.appendChild(select(layers, s.layer === null ? "all" : s.layer,
      (v) => this.set({ layer: v === "all" ? null : Number(v) }), "Layer"));
    const heads = [];
    for (let hd = 0; hd < d.H; hd++) heads.push([hd, "head " + hd]);
    controls.appendChild(select(heads, s.head, (v) => this.set({ head: Number(v) }), "Head"));
    const channels = [["all", "all channels"]];
    for (const c of ["analysis", "commentary", "final"]) if (p.channels.includes(c)) channels.push([c, c]);
    controls.appendChild(select(channels, s.channel, (v) => this.set({ channel: v }), "Channel"));
    const runs = this.payloads.length > 1 ? this.runStrip() : null;
    const tabs = h("nav", { class: "oss-tabs", role: "tablist" });
    for (const [key, label] of [["reasoning", "Reasoning"], ["router", "Router map"], ["attention", "Attention & sinks"],
      ["lens", "Logit lens"]]) {
      tabs.appendChild(h("button", { class: "oss-tab" + (s.tab === key ? " active" : ""), role: "tab",
        "data-tab": key, onclick: () => this.set({ tab: key }) }, label));
    }
    return h("header", { class: "oss-header" }, h("div", { class: "oss-row" }, title, controls), runs, tabs);
  };

  // A verdict on the final answer, where the payload says what it should have been.
  function checkBadge(check) {
    if (!check) return null;
    return h("span", { class: "oss-check " + (check.correct ? "right" : "wrong"), "data-correct": String(check.correct),
      title: "expected " + check.expected }, check.correct ? "\u2713 right" : "\u2717 wrong (expected " + check.expected + ")");
  }

  // Every run side by side: its title, effort, length and final answer (with its verdict); click one to open it.
  View.prototype.runStrip = function () {
    const strip = h("div", { class: "oss-runs", role: "list" });
    this.payloads.forEach((q, i) => {
      const final = q.final.length > 80 ? q.final.slice(0, 79) + "\u2026" : q.final;
      strip.appendChild(h("button", { class: "oss-run" + (i === this.state.run ? " active" : ""), role: "listitem",
        "data-run": String(i), onclick: () => this.set({ run: i }) },
      h("div", { class: "oss-run-title" }, (i + 1) + ". " + q.title),
      h("div", { class: "oss-run-meta" }, "reasoning " + q.reasoning + " \u00b7 " + q.dims.T + " tokens"),
      h("div", { class: "oss-run-final" }, h("span", { class: "oss-run-label" }, "final"), final || "\u2205"),
      checkBadge(q.check)));
    });
    return strip;
  };

  View.prototype.renderMain = function () {
    this.main.textContent = "";
    const tab = this.state.tab;
    if (tab === "reasoning") this.reasoning();
    else if (tab === "router") this.routerMap();
    else if (tab === "attention") this.attention();
    else this.lens();
  };

  // -- reasoning view --------------------------------------------------------------------------------
  View.prototype.metricScale = function (values) {
    const metric = this.state.metric;
    if (metric === "expert") return null;
    // Colors stretch over the values present (the legend gives the range); ranks always start at 0.
    const range = finiteRange(values);
    let lo = range ? range[0] : 0, hi = range ? range[1] : 1;
    if (metric === "lens_rank") {
      lo = 0;
      hi = Math.max(hi, 1);
    }
    if (!(hi > lo)) hi = lo + 1;
    // Ranks span orders of magnitude: a log scale, with rank 0 (already the top prediction) darkest.
    const norm = metric === "lens_rank"
      ? (x) => 1 - Math.log1p(x) / Math.log1p(hi)
      : (x) => (x - lo) / (hi - lo);
    return { lo: lo, hi: hi, norm: norm };
  };

  View.prototype.reasoning = function () {
    const d = this.data, p = d.p, s = this.state;
    const values = this.metricValues();
    const scale = this.metricScale(values);
    const legend = h("div", { class: "oss-legendrow" });
    if (scale) {
      const lo = s.metric === "lens_rank" ? fmt(scale.hi, 0) : fmt(scale.lo);
      const hi = s.metric === "lens_rank" ? "0" : fmt(scale.hi);
      legend.appendChild(colorBar(BLUES, lo, hi, METRICS[s.metric] + (s.layer === null ? " (mean over layers)" :
        " at " + this.layerName(s.layer))));
      if (s.metric === "lens_rank" && !p.lens) {
        legend.appendChild(h("span", { class: "oss-note" },
          "Not computed yet: run ossscope.widgets.logit_lens(model, trace)."));
      }
    } else {
      legend.appendChild(h("span", { class: "oss-legend" }, "Top expert at " +
        this.layerName(s.layer === null ? 0 : s.layer) + " (one color per expert)"));
    }
    if (p.grammar) {
      legend.appendChild(h("span", { class: "oss-legend oss-grammar-key" }, "dashed: the schema's grammar changed " +
        "the model's top choice (" + p.grammar.changed.reduce((a, b) => a + b, 0) + " tokens)"));
    }
    legend.appendChild(h("span", { class: "oss-hint" }, "Hover a token for its router decisions; click to pin."));
    this.main.appendChild(legend);

    const convo = h("div", { class: "oss-convo" });
    const after = new Map();
    for (const m of p.conversation) {
      const card = h("div", { class: "oss-msg oss-role-" + m.role.split(" ")[0] + (m.error ? " oss-tool-error" : "") },
        h("div", { class: "oss-msg-role" }, m.role));
      // A tool call (function or built-in browser/python): what the model sent, then what came back.
      if (m.call !== undefined) card.appendChild(h("pre", { class: "oss-tool-call" }, m.call));
      card.appendChild(h("div", { class: "oss-msg-text" }, m.text));
      if (m.after < 0) convo.appendChild(card);
      else after.set(m.after, (after.get(m.after) || []).concat([card]));
    }
    const stream = h("div", { class: "oss-msg oss-role-assistant" }, h("div", { class: "oss-msg-role" }, "assistant"));
    let segment = null, current = null;
    const spans = [];
    for (let t = 0; t < d.T; t++) {
      const ch = p.channels[t];
      if (ch && ch !== current) {
        current = ch;
        segment = h("div", { class: "oss-seg oss-seg-" + ch, "data-channel": ch },
          h("span", { class: "oss-seg-label" }, ch));
        stream.appendChild(segment);
      }
      if (!segment) {
        segment = h("div", { class: "oss-seg", "data-channel": "" });
        stream.appendChild(segment);
      }
      const text = p.tokens[t];
      const span = h("span", { class: "oss-tok" + (ch ? "" : " oss-special") + (t === s.selected ? " selected" : ""),
        "data-t": String(t) }, text.includes("\n") ? text.replace(/\n/g, "\u21b5\n") : text || "\u2205");
      if (p.grammar && p.grammar.changed[t]) span.classList.add("oss-grammar-changed");
      const v = values[t];
      if (ch) {
        if (scale) {
          if (Number.isFinite(v)) {
            const c = ramp(BLUES, scale.norm(v));
            span.style.background = rgb(c);
            if (luminance(c) < 0.55) span.style.color = "#fff";
          }
        } else {
          span.style.background = expertColor(v, 80);
          span.style.boxShadow = "inset 0 -2px 0 " + expertColor(v, 45);
        }
      }
      if (!this.visible(t)) span.classList.add("oss-hidden");
      spans.push(span);
      segment.appendChild(span);
      for (const card of after.get(t) || []) {
        stream.appendChild(card);
        segment = null;
        current = null;
      }
    }
    // A channel filter hides whole segments whose tokens are all filtered out.
    for (const seg of stream.querySelectorAll(".oss-seg")) {
      if (s.channel !== "all" && seg.getAttribute("data-channel") !== s.channel) seg.classList.add("oss-hidden");
    }
    convo.appendChild(stream);
    if (p.parse_errors.length) {
      convo.appendChild(h("div", { class: "oss-msg oss-role-error" }, h("div", { class: "oss-msg-role" },
        "parse problems"), h("div", { class: "oss-msg-text" }, p.parse_errors.join("\n"))));
    }
    stream.addEventListener("mouseover", (ev) => {
      const t = ev.target.getAttribute && ev.target.getAttribute("data-t");
      if (t !== null && t !== undefined) this.hover(Number(t));
    });
    stream.addEventListener("mouseleave", () => this.hover(-1));
    stream.addEventListener("click", (ev) => {
      const t = ev.target.getAttribute && ev.target.getAttribute("data-t");
      if (t === null || t === undefined) return;
      const prev = spans[this.state.selected];
      if (prev) prev.classList.remove("selected");
      ev.target.classList.add("selected");
      this.state.selected = Number(t);
      if (this.host.onSelect) this.host.onSelect(this.state.selected);
      this.renderPanel();
    });
    this.main.appendChild(convo);
  };

  View.prototype.hover = function (t) {
    if (t === this.state.hover) return;
    this.state.hover = t;
    this.renderPanel();
  };

  // -- token panel -------------------------------------------------------------------------------------
  View.prototype.renderPanel = function () {
    const panel = this.panel, d = this.data, p = d.p;
    panel.textContent = "";
    const t = this.focusToken();
    if (t < 0 || t >= d.T) {
      panel.appendChild(h("div", { class: "oss-panel-empty" }, h("div", { class: "oss-panel-title" }, "Token details"),
        "Hover or click a token to see, layer by layer, the experts its router chose (with their weights) and the " +
        "attention mass each head gave to the sink."));
      return;
    }
    const v = metricValue(d, this.state.metric, this.state.layer, t);
    panel.appendChild(h("div", { class: "oss-panel-title", "data-token": String(t) },
      "Token " + t + (t === this.state.selected ? " (pinned)" : ""),
      h("span", { class: "oss-chip oss-ch-" + (p.channels[t] || "none") }, p.channels[t] || "special"),
      p.grammar && p.grammar.constrained[t] ? h("span", { class: "oss-chip oss-grammar-chip" },
        p.grammar.changed[t] ? "grammar changed top choice" : "grammar kept top choice") : null));
    panel.appendChild(h("div", { class: "oss-token-big" }, showToken(p.tokens[t])));
    panel.appendChild(h("div", { class: "oss-kv" },
      h("span", {}, "id " + p.ids[t]), h("span", {}, "position " + p.positions[t]),
      h("span", {}, METRICS[this.state.metric] + ": " + (this.state.metric === "expert" ? "E" + v : fmt(v, 3)))));
    const table = h("div", { class: "oss-router" });
    table.appendChild(h("div", { class: "oss-router-head" }, h("span", {}, "layer"),
      h("span", {}, "experts (weight)"), h("span", {}, "sink per head")));
    let maxSink = 0;
    for (let l = 0; l < d.L; l++) for (let hd = 0; hd < d.H; hd++) maxSink = Math.max(maxSink, d.sink(t, l, hd));
    for (let l = 0; l < d.L; l++) {
      const order = [];
      for (let j = 0; j < d.K; j++) order.push(j);
      order.sort((a, b) => d.w(t, l, b) - d.w(t, l, a));
      const experts = h("span", { class: "oss-experts" }, order.map((j) => {
        const e = d.idx(t, l, j), wt = d.w(t, l, j);
        return h("span", { class: "oss-expert", title: "expert " + e + ", weight " + fmt(wt, 3),
          style: "border-color:" + expertColor(e, 45) },
        h("span", { class: "oss-expert-fill", style: "width:" + (100 * wt).toFixed(1) + "%;background:" +
          expertColor(e, 78) }), h("span", { class: "oss-expert-label" }, "E" + e + " " + fmt(wt).replace(/^0/, "")));
      }));
      const strip = h("canvas", { class: "oss-strip", width: String(d.H), height: "1" });
      const ctx = strip.getContext("2d");
      const img = ctx.createImageData(d.H, 1);
      for (let hd = 0; hd < d.H; hd++) {
        const c = ramp(VIRIDIS, d.sink(t, l, hd) / Math.max(maxSink, 1e-6));
        img.data.set([c[0], c[1], c[2], 255], hd * 4);
      }
      ctx.putImageData(img, 0, 0);
      strip.addEventListener("mousemove", (ev) => {
        const box = strip.getBoundingClientRect();
        const hd = Math.min(d.H - 1, Math.floor(((ev.clientX - box.left) / box.width) * d.H));
        this.tooltip(ev, ["layer " + l + ", head " + hd, "sink mass " + fmt(d.sink(t, l, hd), 3)]);
      });
      strip.addEventListener("mouseleave", () => this.tooltip(null));
      const rowClass = "oss-router-row" + (this.state.layer === l ? " current" : "");
      table.appendChild(h("div", { class: rowClass },
        h("span", { class: "oss-layer" }, "L" + l, h("span", { class: "oss-badge" + (p.sliding[l] ? " sliding" : "") },
          p.sliding[l] ? "S" : "F")),
        experts, h("span", { class: "oss-sinkcell" }, strip, h("span", { class: "oss-num" }, fmt(d.sinkMean(t, l))))));
    }
    panel.appendChild(table);
    panel.appendChild(h("div", { class: "oss-legendrow small" }, colorBar(VIRIDIS, "0", fmt(maxSink),
      "sink mass"), h("span", { class: "oss-badge sliding" }, "S"), "sliding window",
    h("span", { class: "oss-badge" }, "F"), "full attention"));
  };

  // -- router map --------------------------------------------------------------------------------------
  View.prototype.tokenTooltip = function (t, l) {
    const d = this.data, lines = ["token " + t + " \u201c" + showToken(this.data.p.tokens[t]) + "\u201d (" +
      (d.p.channels[t] || "special") + ")", this.layerName(l)];
    const parts = [];
    for (let j = 0; j < d.K; j++) parts.push("E" + d.idx(t, l, j) + " " + fmt(d.w(t, l, j)));
    lines.push("experts: " + parts.join(", "));
    lines.push("sink mass (mean over heads): " + fmt(d.sinkMean(t, l), 3));
    return lines;
  };

  View.prototype.cellWidth = function (n) {
    const avail = Math.max(400, (this.main.clientWidth || 900) - 80);
    return Math.max(3, Math.min(16, Math.floor(avail / Math.max(1, n))));
  };

  View.prototype.routerMap = function () {
    const d = this.data, s = this.state;
    const cols = this.visibleTokens();
    const cellW = this.cellWidth(cols.length);
    this.main.appendChild(h("h3", {}, "Router map"));
    this.main.appendChild(h("p", { class: "oss-caption" }, "Each column is a generated token" +
      (s.channel === "all" ? "" : " of the " + s.channel + " channel") + ", each row a layer. Color: the expert with " +
      "the largest router weight; saturation: that weight. Hover for all " + d.K + " experts; click to pin."));
    this.main.appendChild(heatmap(this, {
      rows: d.L, cols: cols.length, cellW: cellW, cellH: 14, rowLabel: (l) => "L" + l + (d.p.sliding[l] ? " S" : " F"),
      color: (l, c) => {
        const t = cols[c];
        let best = 0;
        for (let j = 1; j < d.K; j++) if (d.w(t, l, j) > d.w(t, l, best)) best = j;
        const wt = d.w(t, l, best);
        return "hsla(" + expertHue(d.idx(t, l, best)).toFixed(1) + ",65%,50%," + (0.25 + 0.75 * wt).toFixed(2) + ")";
      },
      tooltip: (l, c) => this.tokenTooltip(cols[c], l),
      onHover: (l, c) => this.hover(cols[c]),
      onClick: (l, c) => this.set({ selected: cols[c] }),
      highlightCol: cols.indexOf(s.selected),
    }));
    this.main.appendChild(h("h3", {}, "Expert usage per layer"));
    this.main.appendChild(h("p", { class: "oss-caption" }, "Share of the channel's tokens routed to each expert " +
      "(a token picks " + d.K + "). The chain of thought (analysis) beside the final answer."));
    const row = h("div", { class: "oss-side-by-side" });
    const channels = ["analysis", "commentary", "final"].filter((c) => d.p.channels.includes(c));
    if (!channels.length) channels.push("all");
    for (const ch of channels) {
      const toks = [];
      for (let t = 0; t < d.T; t++) if (ch === "all" || d.p.channels[t] === ch) toks.push(t);
      const usage = new Float64Array(d.L * d.E);
      for (const t of toks) for (let l = 0; l < d.L; l++) for (let j = 0; j < d.K; j++) usage[l * d.E + d.idx(t, l, j)] += 1;
      let hi = 0;
      for (let i = 0; i < usage.length; i++) {
        usage[i] /= Math.max(1, toks.length);
        hi = Math.max(hi, usage[i]);
      }
      const cw = Math.max(4, Math.min(14, Math.floor(360 / d.E)));
      row.appendChild(h("figure", { class: "oss-figure", "data-channel": ch },
        h("figcaption", {}, ch + " (" + toks.length + " tokens)"),
        heatmap(this, {
          rows: d.L, cols: d.E, cellW: cw, cellH: 12, labelWidth: 40, rowLabel: (l) => "L" + l,
          color: (l, e) => rgb(ramp(VIRIDIS, usage[l * d.E + e] / Math.max(hi, 1e-6))),
          tooltip: (l, e) => [ch + ", layer " + l + ", expert " + e, "share of tokens " + fmt(usage[l * d.E + e], 3)],
        }), h("div", { class: "oss-axis" }, "experts 0\u2013" + (d.E - 1))));
    }
    this.main.appendChild(row);
  };

  // -- attention & sinks -------------------------------------------------------------------------------
  View.prototype.attention = function () {
    const d = this.data, s = this.state, p = d.p;
    const cols = this.visibleTokens();
    const cellW = this.cellWidth(cols.length);
    const layer = s.layer === null ? 0 : s.layer;
    let hi = 0;
    for (const t of cols) for (let l = 0; l < d.L; l++) hi = Math.max(hi, d.sinkMean(t, l));
    this.main.appendChild(h("h3", {}, "Sink mass per layer (mean over heads)"));
    this.main.appendChild(h("p", { class: "oss-caption" }, "How much of each query's attention went to the " +
      "learned sink instead of any key. S rows: sliding-window layers (" + windowText(p) + "); F rows: full " +
      "attention."));
    this.main.appendChild(h("div", { class: "oss-legendrow small" }, colorBar(VIRIDIS, "0", fmt(hi), "sink mass")));
    this.main.appendChild(heatmap(this, {
      rows: d.L, cols: cols.length, cellW: cellW, cellH: 14, rowLabel: (l) => "L" + l + (p.sliding[l] ? " S" : " F"),
      color: (l, c) => rgb(ramp(VIRIDIS, d.sinkMean(cols[c], l) / Math.max(hi, 1e-6))),
      tooltip: (l, c) => this.tokenTooltip(cols[c], l),
      onHover: (l, c) => this.hover(cols[c]),
      onClick: (l, c) => this.set({ selected: cols[c], layer: l }),
      highlightCol: cols.indexOf(s.selected),
    }));
    let hiHead = 0;
    for (const t of cols) for (let hd = 0; hd < d.H; hd++) hiHead = Math.max(hiHead, d.sink(t, layer, hd));
    this.main.appendChild(h("h3", {}, "Sink mass per head at " + this.layerName(layer)));
    this.main.appendChild(heatmap(this, {
      rows: d.H, cols: cols.length, cellW: cellW, cellH: d.H > 32 ? 5 : 10, rowLabel: (hd) => "h" + hd,
      color: (hd, c) => rgb(ramp(VIRIDIS, d.sink(cols[c], layer, hd) / Math.max(hiHead, 1e-6))),
      tooltip: (hd, c) => ["token " + cols[c] + " \u201c" + showToken(p.tokens[cols[c]]) + "\u201d", "layer " + layer +
        ", head " + hd, "sink mass " + fmt(d.sink(cols[c], layer, hd), 3)],
      onClick: (hd, c) => this.set({ selected: cols[c], head: hd }),
      highlightCol: cols.indexOf(s.selected),
    }));
    this.main.appendChild(this.patternView(layer));
  };

  // The sliding layers' window as the trace recorded it (payload.window; older payloads lack it).
  function windowText(p) {
    return p.window ? "each query sees the last " + p.window + " keys" : "a window of recent keys";
  }

  View.prototype.patternView = function (layer) {
    const d = this.data, s = this.state, p = d.p;
    const box = h("div", { class: "oss-pattern" });
    const t = s.selected;
    box.appendChild(h("h3", {}, "Attention pattern: " + this.layerName(layer) + ", head " + s.head +
      (t >= 0 ? ", query token " + t : "")));
    const a = d.attention[String(layer)];
    if (t < 0) {
      box.appendChild(h("p", { class: "oss-note" }, "Click a token to see where its query attended."));
      return box;
    }
    if (!a || !a.rowOf.has(t)) {
      box.appendChild(h("p", { class: "oss-note" }, "Pattern not captured for this layer and token. In the " +
        "notebook: ossscope.widgets.capture_attention(model, trace, layers=[" + layer + "]) re-runs the sequence " +
        "and keeps the pattern."));
      return box;
    }
    const r = a.rowOf.get(t), S = a.keys, q = p.positions[t];
    const n = Math.min(S, q + 1);
    const values = [];
    for (let k = 0; k < n; k++) values.push(a.data[(r * d.H + s.head) * S + k] / 255);
    const sinkValue = d.sink(t, layer, s.head);
    const hi = Math.max(sinkValue, finiteRange(values) ? finiteRange(values)[1] : 0, 1e-6);
    const barW = Math.max(2, Math.min(12, Math.floor(((this.main.clientWidth || 900) - 120) / (n + 2))));
    const tokenAt = new Map(p.positions.map((pos, i) => [pos, i]));
    const labelOf = (k) => {
      const text = " \u201c" + showToken(p.context[k] || "") + "\u201d";
      if (k < d.P) return "prompt " + k + text;
      return tokenAt.has(k) ? "token " + tokenAt.get(k) + text : "tool answer" + text;
    };
    box.appendChild(h("p", { class: "oss-caption" }, "Probability over keys (gray: prompt, blue: generated, brown: tool " +
      "answers), then the sink column (orange). Keys and sink sum to 1." + (p.sliding[layer] ? " A sliding layer: " +
      windowText(p) + (p.window && q + 1 > p.window ? " (keys before " + (q + 1 - p.window) + " get nothing)" : "") +
      "." : "")));
    const chart = heatmap(this, {
      rows: 1, cols: n + 1, cellW: barW, cellH: 90, labelWidth: 8, rowLabel: () => "",
      color: () => "#fff", tooltip: (row, k) => (k < n ? [labelOf(k), "attention " + fmt(values[k], 3)] :
        ["sink", "mass " + fmt(sinkValue, 3)]),
    });
    const canvas = chart.querySelector("canvas");
    const ctx = canvas.getContext("2d");
    for (let k = 0; k <= n; k++) {
      const v = k < n ? values[k] : sinkValue;
      const bh = Math.round((88 * v) / hi);
      ctx.fillStyle = k < n ? (k < d.P ? "#8c959f" : tokenAt.has(k) ? "#0969da" : "#bc4c00") : "#e16f24";
      ctx.fillRect(8 + k * barW, 90 - bh, Math.max(1, barW - 1), bh);
    }
    box.appendChild(chart);
    return box;
  };

  // -- logit lens --------------------------------------------------------------------------------------
  View.prototype.lens = function () {
    const d = this.data, p = d.p, s = this.state;
    this.main.appendChild(h("h3", {}, "Logit lens"));
    if (!p.lens) {
      this.main.appendChild(h("p", { class: "oss-note" }, "Not computed for this trace. In the notebook: " +
        "ossscope.widgets.logit_lens(model, trace) decodes every layer's residual stream through the final norm " +
        "and the unembedding, and stores the result in the trace so it exports."));
      return;
    }
    const lens = p.lens;
    let t = s.selected;
    if (!d.lensRowOf.has(t)) t = lens.rows.length ? lens.rows[0] : -1;
    if (t < 0) return;
    const r = d.lensRowOf.get(t);
    const nextId = t + 1 < d.T ? p.ids[t + 1] : null;
    this.main.appendChild(h("p", { class: "oss-caption" }, "Top " + lens.n + " next-token predictions when each " +
      "layer's residual stream is read out directly. Position: token " + t + " \u201c" + showToken(p.tokens[t]) +
      "\u201d" + (nextId !== null ? "; the model went on with \u201c" + showToken(p.tokens[t + 1]) + "\u201d (outlined)." :
        ".") + " Choose a position by clicking a token."));
    const positions = h("div", { class: "oss-positions" });
    for (const row of lens.rows) {
      positions.appendChild(h("button", { class: "oss-pos" + (row === t ? " active" : ""), "data-t": String(row),
        onclick: () => this.set({ selected: row }) }, row + " " + showToken(p.tokens[row])));
    }
    this.main.appendChild(positions);
    const table = h("table", { class: "oss-lens" });
    const head = h("tr", {}, h("th", {}, "layer"));
    for (let i = 0; i < lens.n; i++) head.appendChild(h("th", {}, "#" + (i + 1)));
    head.appendChild(h("th", {}, "rank of next"));
    table.appendChild(head);
    for (let l = 0; l < d.L; l++) {
      const tr = h("tr", {}, h("td", { class: "oss-layer" }, this.layerName(l)));
      for (let i = 0; i < lens.n; i++) {
        const id = lens.ids[r][l][i], prob = lens.probs[r][l][i];
        const c = ramp(BLUES, Math.sqrt(prob));
        tr.appendChild(h("td", { class: "oss-lens-cell" + (id === nextId ? " hit" : ""),
          style: "background:" + rgb(c) + (luminance(c) < 0.55 ? ";color:#fff" : ""),
          title: "p = " + fmt(prob, 4) }, showToken(lens.vocab[String(id)] || "#" + id), h("small", {}, fmt(prob))));
      }
      const rank = lens.rank ? lens.rank[t][l] : -1;
      tr.appendChild(h("td", { class: "oss-num" }, rank >= 0 ? String(rank) : "\u2013"));
      table.appendChild(tr);
    }
    this.main.appendChild(table);
  };

  function mount(root, payloads, host) {
    const view = new View(root, payloads, host);
    root.__ossscope = view;
    global.__ossscopeViews = (global.__ossscopeViews || []).concat([view]);
    return view;
  }

  global.OSSScope = { mount: mount, decode: decode, metricValue: metricValue, METRICS: METRICS };
})(typeof window !== "undefined" ? window : globalThis);
