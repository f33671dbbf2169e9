"""Write notebooks/02_*.ipynb ... 07_*.ipynb from the cells below: `python scripts/make_notebooks.py`.

The notebooks are generated so they can be reviewed as code and are stored without outputs; CI executes them
(tests/test_notebooks.py). Every number a notebook states is computed from the model when it runs: the prose
in markdown cells says what is measured, and code cells print the finding with the measured values.
(01_quickstart is written by hand elsewhere.)
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(textwrap.dedent(text).strip())


# Shared cells. Each notebook stays standalone (no helper module to import), so the few helpers it needs are
# defined in the notebook itself.
LOAD_NANO = code('''
    import random

    import plotly.graph_objects as go
    import torch

    import ossscope
    from ossscope.nano import data

    torch.manual_seed(0)
    model = ossscope.load("nano")  # the built-in model; any gpt-oss checkpoint folder works the same way
    cfg = model.config
    L, E, k, H = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token, cfg.num_attention_heads
    print(f"{model.name}: {L} layers, {E} experts (top-{k}), {H} query heads, sliding window {cfg.sliding_window}")
''')

TOKEN_KINDS = code('''
    def token_kind(text: str) -> str:
        """digit, operator, special (harmony's <|...|> tokens) or word."""
        stripped = text.strip()
        if stripped.startswith("<|") and stripped.endswith("|>"):
            return "special"
        if stripped.isdigit():
            return "digit"
        if stripped and all(c in "+-=" for c in stripped):
            return "operator"
        return "word"


    def episode_ids(episode):
        """A whole training-style conversation (prompt + the assistant's reply) as model ids [1, T], the
        text of each token, and a 0/1 mask of the assistant's own tokens."""
        o200k, mask = data.render_episode(model.tokenizer.encoding, episode)
        ids = torch.tensor([model.tokenizer.to_model(o200k)])
        return ids, model.tokenizer.token_texts_o200k(o200k), torch.tensor(mask, dtype=torch.bool)


    rng = random.Random(0)
    episodes = []
    for op in ("add", "sub"):
        for _ in range(6):
            a, b = data.arithmetic_problem(rng, op, four_digit=True)
            episodes.append(data.arithmetic_episode(rng, op, a, b, "high"))
    print(f"{len(episodes)} arithmetic conversations at reasoning=high, e.g. {episodes[0].user!r}")
''')


def router_decisions() -> list:
    return [
        md('''
            # 02 · Router decisions: which experts does gpt-oss pick, and for what?

            Every gpt-oss layer has a router: a linear map from the residual stream to one logit per expert.
            The top-k logits win, and a softmax over just those k gives the mixing weights. Nothing forces
            experts to specialize, so whether they do is an empirical question. Here we feed the model
            arithmetic conversations it knows (prompt, column-by-column reasoning, answer), record the router's
            choice for every token at every layer, and ask whether some experts are reserved for digits.

            Everything runs on the built-in `nano` model on CPU in seconds; swap in `ossscope.load(PATH)` for a
            real checkpoint (notebook 07).
        '''),
        LOAD_NANO,
        TOKEN_KINDS,
        md('''
            ## Record the routing

            `run_with_cache` runs the model once and keeps what flowed through the named hooks.
            `blocks.{l}.mlp.hook_topk_indices` holds the k experts chosen for each token: `[batch, tokens, k]`.
        '''),
        code('''
            kinds = ("digit", "operator", "word", "special")
            counts = {kind: torch.zeros(L, E) for kind in kinds}  # how often each expert is chosen, per kind
            totals = dict.fromkeys(kinds, 0)  # tokens of each kind
            topk_names = [f"blocks.{l}.mlp.hook_topk_indices" for l in range(L)]
            weight_names = [f"blocks.{l}.mlp.hook_topk_weights" for l in range(L)]
            runs = []  # per conversation: (token texts, chosen experts [T, L, k], their weights [T, L, k])

            for episode in episodes:
                ids, texts, _ = episode_ids(episode)
                _, cache = model.run_with_cache(ids, names=topk_names + weight_names)
                chosen = torch.stack([cache[name][0] for name in topk_names], dim=1)  # [T, L, k]
                weights = torch.stack([cache[name][0] for name in weight_names], dim=1)  # [T, L, k]
                runs.append((texts, chosen, weights))
                one_hot = torch.zeros(len(texts), L, E).scatter_(2, chosen, 1.0)  # [T, L, E]
                for t, text in enumerate(texts):
                    counts[token_kind(text)] += one_hot[t]
                    totals[token_kind(text)] += 1

            # share[kind][l, e]: fraction of that kind's tokens for which layer l picked expert e
            share = {kind: counts[kind] / max(totals[kind], 1) for kind in kinds}
            print({kind: totals[kind] for kind in kinds})
        '''),
        md('''
            ## One conversation, token by token

            The top-1 expert of every token at every layer (hover for the token). Stripes that line up with the
            digits in the reasoning are what specialization looks like.
        '''),
        code('''
            texts, chosen, _ = runs[0]
            top1 = chosen[:, :, 0].T  # [L, T]: the expert with the largest router logit
            hover = [[f"{texts[t]!r} -> expert {int(top1[l, t])}" for t in range(len(texts))] for l in range(L)]
            fig = go.Figure(go.Heatmap(z=top1.numpy(), text=hover, hoverinfo="text", colorscale="Turbo",
                                       colorbar=dict(title="expert")))
            fig.update_layout(title="Top-1 expert per token (x) and layer (y)", xaxis_title="token position",
                              yaxis_title="layer", height=320)
            fig.show()
        '''),
        md('''
            ## Which experts prefer digits?

            For every layer and expert: the share of digit tokens routed to it minus the share of word tokens
            routed to it. Red cells are experts that digits use far more than words do.
        '''),
        code('''
            preference = share["digit"] - share["word"]  # [L, E]
            fig = go.Figure(go.Heatmap(z=preference.numpy(), colorscale="RdBu", zmid=0,
                                       colorbar=dict(title="digit - word")))
            fig.update_layout(title="Share of digit tokens minus share of word tokens routed to each expert",
                              xaxis_title="expert", yaxis_title="layer", height=320)
            fig.show()

            layer, expert = divmod(int(preference.argmax()), E)
            print(f"Most digit-specific: layer {layer}, expert {expert}. It is chosen for "
                  f"{share['digit'][layer, expert]:.0%} of digit tokens but only "
                  f"{share['word'][layer, expert]:.0%} of word tokens "
                  f"(uniform routing would give {k / E:.0%} for every expert).")
        '''),
        code('''
            fig = go.Figure([go.Bar(name=kind, x=[f"expert {e}" for e in range(E)], y=share[kind][layer].numpy())
                             for kind in kinds])
            fig.update_layout(barmode="group", title=f"Layer {layer}: how often each expert is chosen, by token kind",
                              yaxis_tickformat=".0%", height=350)
            fig.show()
        '''),
        md('''
            ## How decisive is the router?

            The entropy of the k mixing weights is 0 when one expert takes all the weight and ln k when the k
            experts share equally. Comparing digits with words shows where the router is sure of itself.
        '''),
        code('''
            entropy = {kind: [] for kind in kinds}
            for texts, _, weights in runs:
                w = weights.clamp_min(1e-12)  # [T, L, k]
                h = -(w * w.log()).sum(-1)  # [T, L]
                for t, text in enumerate(texts):
                    entropy[token_kind(text)].append(h[t])
            mean_entropy = {kind: torch.stack(v).mean(0) for kind, v in entropy.items() if v}  # kind -> [L]

            fig = go.Figure([go.Scatter(x=list(range(L)), y=v.numpy(), mode="lines+markers", name=kind)
                             for kind, v in mean_entropy.items()])
            fig.add_hline(y=torch.log(torch.tensor(float(k))).item(), line_dash="dot",
                          annotation_text="ln k (an even split)")
            fig.update_layout(title="Router entropy over the chosen k experts", xaxis_title="layer",
                              yaxis_title="nats", height=350)
            fig.show()
            surest = min(mean_entropy, key=lambda kind: mean_entropy[kind].mean())
            print(f"The router is most decisive on {surest} tokens: mean entropy "
                  f"{mean_entropy[surest].mean():.3f} nats vs "
                  + ", ".join(f"{kind} {v.mean():.3f}" for kind, v in mean_entropy.items() if kind != surest))
        '''),
        md('''
            **Next:** notebook 05 removes the digit expert found here and measures what the model loses.
        '''),
    ]


def attention_sinks() -> list:
    return [
        md('''
            # 03 · Attention sinks: where attention goes when it has nowhere to go

            Each gpt-oss attention head has one learned *sink* logit. It joins every query's softmax as an extra
            column with no value vector, so whatever probability it takes is attention paid to nothing: the
            probabilities over real keys sum to 1 - (sink mass). This lets a head stay quiet on tokens where it
            has nothing useful to add.

            Half the layers (the even ones) attend only to a sliding window of recent tokens; the others see
            the whole context. We measure how much each head leans on its sink, whether that differs between the
            two kinds of layer and along the sequence, and what happens when the sinks are taken away.
        '''),
        LOAD_NANO,
        TOKEN_KINDS,
        code('''
            def assistant_nll(logits, ids, mask):
                """Next-token loss (nats) at each of the assistant's own tokens."""
                logp = logits[0, :-1].log_softmax(-1)  # [T-1, V]: position t predicts token t+1
                nll = -logp.gather(1, ids[0, 1:, None])[:, 0]  # [T-1]
                return nll[mask[1:]]


            sink_names = [f"blocks.{l}.attn.hook_sink" for l in range(L)]
            sinks = []  # per conversation: [L, H, T] sink mass of each head for each query token
            losses = []  # per conversation: the loss at each assistant token
            for episode in episodes:
                ids, texts, mask = episode_ids(episode)
                logits, cache = model.run_with_cache(ids, names=sink_names)
                sinks.append(torch.stack([cache[name][0] for name in sink_names]))
                losses.append(assistant_nll(logits, ids, mask))
            per_head = torch.cat(sinks, dim=-1).mean(-1)  # [L, H]
            sliding = [cfg.is_sliding(l) for l in range(L)]
            labels = [f"{l} ({'sliding' if sliding[l] else 'full'})" for l in range(L)]

            fig = go.Figure(go.Heatmap(z=per_head.numpy(), y=labels, colorscale="Viridis", zmin=0, zmax=1,
                                       colorbar=dict(title="sink mass")))
            fig.update_layout(title="Mean sink mass per head", xaxis_title="head", yaxis_title="layer", height=330)
            fig.show()

            slide_mean = per_head[[l for l in range(L) if sliding[l]]].mean()
            full_mean = per_head[[l for l in range(L) if not sliding[l]]].mean()
            busiest = divmod(int(per_head.argmax()), H)
            print(f"Heads give {per_head.mean():.0%} of their attention to the sink on average: "
                  f"{slide_mean:.0%} in sliding-window layers, {full_mean:.0%} in full-attention layers. "
                  f"The heaviest user is layer {busiest[0]}, head {busiest[1]} ({per_head.max():.0%}).")
        '''),
        md('''
            ## Along the sequence

            A full-attention query late in a conversation has hundreds of keys to choose from; a sliding-window
            query never has more than the window. Mean sink mass by query position, per kind of layer:
        '''),
        code('''
            T_min = min(s.shape[-1] for s in sinks)
            by_position = torch.stack([s[..., :T_min] for s in sinks]).mean(0).mean(1)  # [L, T_min]
            fig = go.Figure()
            for l in range(L):
                fig.add_trace(go.Scatter(y=by_position[l].numpy(), mode="lines", name=labels[l],
                                         line=dict(dash="dot" if sliding[l] else "solid")))
            fig.add_vline(x=cfg.sliding_window, line_dash="dash", annotation_text="window")
            fig.update_layout(title="Sink mass by query position (mean over heads and conversations)",
                              xaxis_title="query position", yaxis_title="sink mass", height=380)
            fig.show()

            positions = torch.arange(T_min, dtype=torch.float32)
            for l in range(L):
                r = torch.corrcoef(torch.stack([positions, by_position[l]]))[0, 1]
                print(f"layer {labels[l]}: correlation of sink mass with position {r:+.2f}")
        '''),
        md('''
            ## One head's pattern, sink included

            `hook_pattern` is the attention over real keys `[batch, heads, queries, keys]`; we append the sink
            mass as a last column, so each row sums to 1.
        '''),
        code('''
            layer = max((l for l in range(L) if not sliding[l]), key=lambda l: per_head[l].max())
            head = int(per_head[layer].argmax())
            ids, texts, _ = episode_ids(episodes[0])
            _, cache = model.run_with_cache(ids, names=[f"blocks.{layer}.attn.hook_pattern",
                                                        f"blocks.{layer}.attn.hook_sink"])
            n = min(80, ids.shape[1])
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, :n, :n]  # [n, n]
            sink = cache[f"blocks.{layer}.attn.hook_sink"][0, head, :n, None]  # [n, 1]
            rows = torch.cat([pattern, sink], dim=1)
            assert torch.allclose(rows.sum(1), torch.ones(n), atol=1e-4)  # keys + sink = 1
            names = [f"{i}:{t!r}" for i, t in enumerate(texts[:n])]
            fig = go.Figure(go.Heatmap(z=rows.numpy(), x=names + ["SINK"], y=names, colorscale="Blues"))
            fig.update_layout(title=f"Layer {layer} head {head}: attention of the first {n} tokens (rows) over keys",
                              height=600, xaxis_showticklabels=False, yaxis_showticklabels=False)
            fig.show()
        '''),
        md('''
            ## Take the sinks away

            Setting every sink logit to -inf forces each head to spread all of its attention over real tokens.
            The loss on the assistant's own tokens (its reasoning and answer) says how much the model relied on
            being able to look away.
        '''),
        code('''
            with_sinks = torch.cat(losses).mean().item()
            saved = [block.attn.sinks.clone() for block in model.layers]
            try:
                for block in model.layers:
                    block.attn.sinks.fill_(float("-inf"))  # exp(-inf) = 0: no probability left for the sink
                without = []
                for episode in episodes:
                    ids, _, mask = episode_ids(episode)
                    without.append(assistant_nll(model(ids), ids, mask))
                without_sinks = torch.cat(without).mean().item()
            finally:
                for block, value in zip(model.layers, saved, strict=True):
                    block.attn.sinks.copy_(value)

            print(f"Loss on the assistant's tokens: {with_sinks:.3f} nats with the sinks, {without_sinks:.3f} without "
                  f"(x{torch.exp(torch.tensor(without_sinks - with_sinks)):.2f} in perplexity).")
        '''),
    ]


def real_checkpoints() -> list:
    return [
        md('''
            # 07 · Real checkpoints: gpt-oss-20b and gpt-oss-120b

            Everything in the other notebooks works unchanged on OpenAI's released weights; only the `load`
            line changes. This notebook says where to get them, how much memory they need (computed from the
            same tensor table the loader checks), and how to run them on a GPU. It runs anywhere: the cells that
            need the real weights only run when they are present.

            ## Getting the weights

            Both models are on Hugging Face under Apache-2.0:

            ```bash
            pip install -U huggingface_hub
            # the original layout (block.N.* names, experts in packed MXFP4): what ossscope reads fastest
            hf download openai/gpt-oss-20b  --include "original/*" --local-dir gpt-oss-20b/
            hf download openai/gpt-oss-120b --include "original/*" --local-dir gpt-oss-120b/
            ```

            The Hugging Face layout (the repo root, `model.safetensors.index.json`) loads too. `ossscope.load`
            takes either folder, or the names `"gpt-oss-20b"` / `"gpt-oss-120b"` when the repo sits in the
            Hugging Face cache (`hf download openai/gpt-oss-20b` without `--local-dir`).
        '''),
        code('''
            import plotly.graph_objects as go
            import torch

            import ossscope
            from ossscope.config import PRESETS
            from ossscope.loading import checkpoint_slots

            GiB = 2**30


            def checkpoint_bytes(config) -> dict[str, int]:
                """Bytes of each part of a checkpoint, from the loader's table of tensors: packed MXFP4 experts
                (uint8: 16 bytes of nibbles + 1 scale byte per 32 weights), everything else bf16."""
                parts = {"experts (MXFP4)": 0, "attention": 0, "embedding + unembedding": 0, "router, norms, biases": 0}
                for name, slot in checkpoint_slots(config, "original").items():
                    n = torch.Size(slot.shape).numel()
                    if slot.kind == "uint8":
                        parts["experts (MXFP4)"] += n
                    elif name.startswith(("embedding", "unembedding")):
                        parts["embedding + unembedding"] += 2 * n
                    elif name.endswith(("qkv.weight", "out.weight")):
                        parts["attention"] += 2 * n
                    else:
                        parts["router, norms, biases"] += 2 * n
                return parts


            sizes = {name: checkpoint_bytes(PRESETS[name]) for name in ("gpt-oss-20b", "gpt-oss-120b")}
            for name, parts in sizes.items():
                print(f"{name}: {sum(parts.values()) / GiB:.1f} GiB of weights: "
                      + ", ".join(f"{part} {b / GiB:.2f}" for part, b in parts.items()))
        '''),
        code('''
            fig = go.Figure([go.Bar(name=part, x=list(sizes), y=[sizes[m][part] / GiB for m in sizes])
                             for part in next(iter(sizes.values()))])
            fig.update_layout(barmode="stack", title="Checkpoint size by part (GiB)", yaxis_title="GiB", height=380)
            fig.show()
        '''),
        md('''
            ## Memory on the GPU

            ossscope keeps the experts packed in MXFP4 on the GPU, so the weights take about what they take on
            disk. On top come the KV cache (full-attention layers grow with the context; sliding-window layers
            keep only their window) and activations. Dequantizing the experts to bf16, as some libraries do,
            multiplies the footprint (computed below):
        '''),
        code('''
            def kv_cache_bytes(config, tokens: int, bytes_per_value: int = 2) -> int:
                """K and V for `tokens` tokens of context, bf16: full layers hold all of it, sliding ones the window."""
                per_token_layer = 2 * config.num_key_value_heads * config.head_dim * bytes_per_value
                return sum(per_token_layer * (min(tokens, config.sliding_window) if config.is_sliding(l) else tokens)
                           for l in range(config.num_hidden_layers))


            GPU_SIZES_GB = (16, 24, 40, 48, 80, 141)  # common GPU memory sizes (GB = 1e9 bytes)
            for name, parts in sizes.items():
                config = PRESETS[name]
                packed = sum(parts.values())
                experts = parts["experts (MXFP4)"]
                dequantized = packed - experts + experts * 2 * 32 / 17  # bf16: 2 bytes per weight instead of 17/32
                kv_8k = kv_cache_bytes(config, 8192)
                need = (packed + kv_8k) * 1.1  # 10% for activations and the allocator
                fits = next((f"{gb} GB" for gb in GPU_SIZES_GB if gb * 1e9 >= need), "several GPUs")
                print(f"{name}: weights {packed / GiB:.1f} GiB packed, {dequantized / GiB:.1f} GiB with bf16 experts "
                      f"(x{dequantized / packed:.1f}); KV cache {kv_8k / GiB:.2f} GiB at 8k tokens, "
                      f"{kv_cache_bytes(config, 131072) / GiB:.1f} GiB at the full 131k context; "
                      f"with 8k of context it fits one {fits} GPU")
        '''),
        md('''
            So gpt-oss-20b fits a consumer GPU and gpt-oss-120b one 80 GB card (H100, A100-80GB) or several
            smaller ones through expert parallelism (`torchrun`). On a GPU the default dtype is bf16; on CPU it is
            fp32 for the non-expert weights, which doubles their share (CPU works for 20b, slowly).

            ## Loading and chatting on a GPU

            ```python
            model = ossscope.load("gpt-oss-20b", device="cuda")      # or a folder: ossscope.load("gpt-oss-20b/")
            trace = model.chat("What is 1234 + 987?", reasoning="high")
            trace.show()
            ```

            or, in a notebook, `%load_ext ossscope` then `%oss load gpt-oss-20b --device cuda` and a `%%oss chat`
            cell. `python -m ossscope.bench` measures the fast GPU path on your card. The cell below runs this for
            real when a CUDA GPU and the weights are there, and says what is missing otherwise.
        '''),
        code('''
            from ossscope.loading import locate

            try:
                found = locate("gpt-oss-20b")
            except FileNotFoundError as missing:
                found = None
                print(f"Not run here: {missing}")
            if found is not None and not torch.cuda.is_available():
                print(f"gpt-oss-20b is at {found.root}, but there is no CUDA GPU here: skipping the big load")
            elif found is not None:
                real = ossscope.load("gpt-oss-20b", device="cuda")
                trace = real.chat("What is 1234 + 987?", reasoning="low", max_new_tokens=256)
                print(trace.analysis, "\\n->", trace.final)
                print(f"peak GPU memory {torch.cuda.max_memory_allocated() / GiB:.1f} GiB")
        '''),
        md('''
            ## Same loader, both layouts

            The loader reads the original layout and the Hugging Face layout (possibly sharded) and checks every
            tensor's name, shape and dtype against the config before loading anything. A tiny model written in
            both layouts loads back to the same logits:
        '''),
        code('''
            import tempfile
            from pathlib import Path

            tiny = ossscope.random_model("tiny", seed=0)
            ids = torch.randint(0, tiny.config.vocab_size, (1, 12))
            with tempfile.TemporaryDirectory() as folder:
                for layout in ("original", "hf"):
                    path = ossscope.write_checkpoint(tiny, Path(folder) / layout, layout=layout)
                    again = ossscope.load(path, device="cpu", progress=False)
                    difference = (again(ids) - tiny(ids)).abs().max().item()
                    files = sorted(p.name for p in path.iterdir())
                    print(f"{layout:8s} layout: {files} -> max logit difference {difference:.1e}")
        '''),
    ]


NOTEBOOK_CELLS = {
    "02_router_decisions.ipynb": router_decisions,
    "03_attention_sinks.ipynb": attention_sinks,
    "07_real_checkpoints.ipynb": real_checkpoints,
}


def build(name: str) -> nbformat.NotebookNode:
    notebook = new_notebook(cells=NOTEBOOK_CELLS[name]())
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(notebook.cells):
        cell.id = f"{Path(name).stem[:2]}-{i:02d}"  # stable ids: regenerating changes nothing that did not change
    nbformat.validate(notebook)
    return notebook


def main(argv: list[str]) -> int:
    """Write every notebook (or the ones named); with --check, fail if a stored notebook differs."""
    check = "--check" in argv
    names = [a for a in argv if not a.startswith("--")] or list(NOTEBOOK_CELLS)
    stale = []
    for name in names:
        path = NOTEBOOKS / name
        text = nbformat.writes(build(name)) + "\n"
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python scripts/make_notebooks.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
