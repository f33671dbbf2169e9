"""Write notebooks/02_*.ipynb ... 08_*.ipynb from the cells below: `python scripts/make_notebooks.py`.

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

            print(f"Loss on the assistant's tokens: {with_sinks:.2e} nats with the sinks, {without_sinks:.2e} without "
                  f"(x{torch.exp(torch.tensor(without_sinks - with_sinks)):.4f} in perplexity).")
        '''),
    ]


def reasoning_effort() -> list:
    return [
        md('''
            # 04 · Reasoning effort and the raw chain of thought

            gpt-oss reads how hard to think from its system message (`Reasoning: low | medium | high`) and thinks
            out loud on the **analysis** channel before it answers on the **final** channel. `model.chat` keeps
            both: `trace.analysis` is the raw chain of thought, `trace.final` the answer, and `trace.channels`
            says which channel each generated token belongs to.

            Here the same questions go to nano at the three efforts, greedy, side by side. We measure how long the
            chain of thought gets, whether the answers are right, and whether the router treats the two channels
            differently. nano's model card says what to expect: the length of its reasoning follows the effort,
            and its 4-digit sums are right when it works the columns out at high effort and mostly wrong when it
            answers at once at low effort. Every answer below is checked against Python, not trusted.
        '''),
        code('''
            import html

            import plotly.graph_objects as go
            import torch
            from IPython.display import HTML, display
            from ossscope.widgets import expert_usage_figure
            from plotly.subplots import make_subplots

            import ossscope

            torch.manual_seed(0)
            model = ossscope.load("nano")  # the built-in model; any gpt-oss checkpoint folder works the same way
            cfg = model.config
            L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token
            print(f"{model.name}: {L} layers, {E} experts (top-{k})")
        '''),
        md('''
            ## The same questions at three efforts

            Three two-digit problems and one sorting problem, each at low, medium and high. The right answers are
            computed in Python; `temperature=0` makes every run repeatable.
        '''),
        code('''
            QUESTIONS = {  # question -> the right answer, computed here
                "What is 27 + 82?": str(27 + 82),
                "What is 42 - 18?": str(42 - 18),
                "What is 72 + 13?": str(72 + 13),
                "Sort these numbers from smallest to largest: 42, 7, 19, 88.": "7, 19, 42, 88",
            }
            EFFORTS = ("low", "medium", "high")

            traces = {(question, effort): model.chat(question, reasoning=effort, max_new_tokens=300, temperature=0)
                      for question in QUESTIONS for effort in EFFORTS}


            def analysis_tokens(trace) -> int:
                return sum(channel == "analysis" for channel in trace.channels)


            def is_right(question, trace) -> bool:
                return trace.final.strip() == QUESTIONS[question]


            stops = sorted({trace.metadata["stop_reason"] for trace in traces.values()})
            print(f"{len(traces)} chats; stop reasons: {stops} ('return' = the model ended its turn itself)")
        '''),
        code('''
            def cell_html(question, trace) -> str:
                verdict = "right" if is_right(question, trace) else f"wrong (the answer is {QUESTIONS[question]})"
                return (f"<pre style='white-space:pre-wrap;font-size:11px;margin:0'>{html.escape(trace.analysis)}</pre>"
                        f"<p style='margin:4px 0'><b>final:</b> {html.escape(trace.final)} &middot; {verdict} &middot; "
                        f"{analysis_tokens(trace)} analysis tokens</p>")


            header = "".join(f"<th>reasoning = {effort}</th>" for effort in EFFORTS)
            rows = "".join(
                f"<tr><th style='text-align:left;vertical-align:top'>{html.escape(question)}</th>"
                + "".join(f"<td style='text-align:left;vertical-align:top'>"
                          f"{cell_html(question, traces[question, effort])}</td>" for effort in EFFORTS)
                + "</tr>"
                for question in QUESTIONS
            )
            display(HTML(f"<table><tr><th></th>{header}</tr>{rows}</table>"))
        '''),
        md('''
            ## How long does it think?

            The number of tokens on the analysis channel, per question and effort:
        '''),
        code('''
            lengths = {effort: [analysis_tokens(traces[q, effort]) for q in QUESTIONS] for effort in EFFORTS}
            fig = go.Figure([go.Bar(name=q if len(q) < 30 else q[:27] + "...", x=list(EFFORTS),
                                    y=[lengths[effort][i] for effort in EFFORTS])
                             for i, q in enumerate(QUESTIONS)])
            fig.update_layout(barmode="group", title="Analysis (chain of thought) length by reasoning effort",
                              xaxis_title="reasoning effort", yaxis_title="analysis tokens", height=380)
            fig.show()

            mean = {effort: sum(v) / len(v) for effort, v in lengths.items()}
            right = {effort: sum(is_right(q, traces[q, effort]) for q in QUESTIONS) for effort in EFFORTS}
            print("Mean analysis length: " + ", ".join(f"{e} {mean[e]:.0f} tokens" for e in EFFORTS)
                  + f" (high is {mean['high'] / mean['low']:.1f}x low).")
            print("Right answers: " + ", ".join(f"{e} {right[e]}/{len(QUESTIONS)}" for e in EFFORTS) + ".")
            grows = all(lengths["low"][i] < lengths["medium"][i] < lengths["high"][i] for i in range(len(QUESTIONS)))
            print(f"Longer at every step up in effort, for every question: {grows}")
        '''),
        md('''
            ## Does the answer follow from the reasoning?

            The chain of thought ends with a conclusion (`So a + b = c.`), and at high effort it first writes the
            result digit by digit (`Digits: ...`). We read both out of `trace.analysis` and compare them with the
            final answer and with the truth. A final answer that differs from the model's own conclusion would mean
            the visible reasoning is not what produced the answer.
        '''),
        code('''
            import re

            agree = {"final = conclusion": 0, "conclusion = digits line": 0, "conclusion right": 0}
            checked = {"final = conclusion": 0, "conclusion = digits line": 0, "conclusion right": 0}
            for (question, effort), trace in traces.items():
                if question.startswith("Sort"):
                    continue
                conclusion = re.findall(r"= (\\d+)\\.", trace.analysis)
                conclusion = conclusion[-1] if conclusion else None
                digits = re.search(r"Digits: ([\\d ]+)", trace.analysis)
                digits = digits.group(1).replace(" ", "") if digits else None
                print(f"{question} {effort:6s} digits line {digits or '-':>5s}, conclusion {conclusion}, "
                      f"final {trace.final}, truth {QUESTIONS[question]}")
                for key, a, b in (("final = conclusion", trace.final.strip(), conclusion),
                                  ("conclusion = digits line", conclusion, digits),
                                  ("conclusion right", conclusion, QUESTIONS[question])):
                    if a is not None and b is not None:
                        checked[key] += 1
                        agree[key] += a == b
            print({key: f"{agree[key]}/{checked[key]}" for key in agree})
        '''),
        md('''
            ## One conversation, channel by channel

            `trace.messages` is the parsed conversation; `trace.channels` labels every generated token. Tokens
            with no channel are harmony's own headers (`<|channel|>analysis<|message|>`, `<|end|>`, ...).
        '''),
        code('''
            question = next(iter(QUESTIONS))
            trace = traces[question, "high"]
            for message in trace.messages:
                print(f"[{message['role']} / {message.get('channel') or '-'}]")
                print(message["content"], end="\\n\\n")
            counts = {c or "(headers)": trace.channels.count(c) for c in dict.fromkeys(trace.channels)}
            print("generated tokens per channel:", counts)
        '''),
        md('''
            ## Does the router treat the chain of thought and the answer differently?

            Row t of `trace.router_indices` ([T, L, k]) holds the k experts each layer chose when generated token
            t was the model's input. Pooling every chat above, we count, per channel, how often each expert is
            chosen at each layer, and measure the distance between the two channels' routing. Final answers are
            short, so a difference could be chance: the dotted lines are the distance when the channel labels are
            shuffled (the same tokens split at random into groups of the same sizes; 95th percentile over 300
            shuffles). We also compare digit tokens with digit tokens, so that the comparison is not just
            "numbers vs words".
        '''),
        code('''
            pooled = {"analysis": [], "final": []}  # channel -> one [L, E] one-hot routing row per token
            digits = {"analysis": [], "final": []}  # the same, digit tokens only
            for trace in traces.values():
                hot = torch.zeros(len(trace.tokens), L, E).scatter_(2, trace.router_indices, 1.0)  # [T, L, E]
                for t, (channel, text) in enumerate(zip(trace.channels, trace.token_texts, strict=True)):
                    if channel in pooled:
                        pooled[channel].append(hot[t])
                        if text.strip().isdigit():
                            digits[channel].append(hot[t])
            pooled = {c: torch.stack(v) for c, v in pooled.items()}  # [N, L, E]
            digits = {c: torch.stack(v) for c, v in digits.items()}
            usage = {c: v.mean(0) / k for c, v in pooled.items()}  # [L, E]: each layer's row sums to 1
            print("tokens per channel:", {c: len(v) for c, v in pooled.items()},
                  "of which digits:", {c: len(v) for c, v in digits.items()})


            def distance(a, b):
                """Total variation distance between two routing distributions, per layer: 0 same, 1 disjoint."""
                return 0.5 * (a - b).abs().sum(-1)


            def chance(a, b, draws=300):
                """95th percentile, per layer, of the distance between the tokens of a and b pooled and split at
                random into groups of their sizes: the distance when the channel makes no difference."""
                g = torch.Generator().manual_seed(0)
                pool, out = torch.cat([a, b]), []
                for _ in range(draws):
                    order = torch.randperm(len(pool), generator=g)
                    out.append(distance(pool[order[:len(a)]].mean(0) / k, pool[order[len(a):]].mean(0) / k))
                return torch.stack(out).quantile(0.95, dim=0)


            observed = distance(usage["final"], usage["analysis"])
            observed_digits = distance(digits["final"].mean(0) / k, digits["analysis"].mean(0) / k)
            floor = chance(pooled["final"], pooled["analysis"])
            floor_digits = chance(digits["final"], digits["analysis"])

            fig = make_subplots(rows=1, cols=3, subplot_titles=["analysis", "final", "final - analysis"])
            fig.add_trace(go.Heatmap(z=usage["analysis"].numpy(), coloraxis="coloraxis"), row=1, col=1)
            fig.add_trace(go.Heatmap(z=usage["final"].numpy(), coloraxis="coloraxis"), row=1, col=2)
            fig.add_trace(go.Heatmap(z=(usage["final"] - usage["analysis"]).numpy(), colorscale="RdBu", zmid=0,
                                     showscale=False), row=1, col=3)
            fig.update_layout(title="Share of each channel's tokens routed to each expert (x) at each layer (y)",
                              coloraxis=dict(colorscale="Viridis"), height=330)
            fig.show()

            fig = go.Figure([
                go.Scatter(y=observed.numpy(), name="final vs analysis, all tokens", mode="lines+markers"),
                go.Scatter(y=floor.numpy(), name="chance (all tokens)", mode="lines", line=dict(dash="dot")),
                go.Scatter(y=observed_digits.numpy(), name="final vs analysis, digit tokens", mode="lines+markers"),
                go.Scatter(y=floor_digits.numpy(), name="chance (digit tokens)", mode="lines", line=dict(dash="dot")),
            ])
            fig.update_layout(title="How different is routing on the final channel?", xaxis_title="layer",
                              yaxis_title="total variation distance", height=360)
            fig.show()

            for l in range(L):
                print(f"layer {l}: distance {observed[l]:.2f} (chance up to {floor[l]:.2f}); digits only "
                      f"{observed_digits[l]:.2f} (chance up to {floor_digits[l]:.2f})")
            above = [l for l in range(L) if observed_digits[l] > floor_digits[l]]
            print(f"Layers where digit tokens route differently in the answer than in the reasoning, beyond "
                  f"chance: {above}")
            shift = usage["final"] - usage["analysis"]
            layer, expert = divmod(int(shift.argmax()), E)
            print(f"Largest shift: layer {layer}, expert {expert} takes {usage['final'][layer, expert]:.0%} of the "
                  f"final channel's routing vs {usage['analysis'][layer, expert]:.0%} of the analysis channel's.")
        '''),
        md('''
            The library's own view of one trace: expert usage per layer, one panel per channel.
        '''),
        code('''
            expert_usage_figure(traces[question, "high"])
        '''),
        md('''
            **What to take away.** The effort knob works on nano the way it is meant to: the chain of thought gets
            longer with every step up (the measured lengths are printed above). Longer reasoning is not the same
            as right answers: check the right/wrong counts above before reading anything into one transcript. And
            the router does not route the answer the way it routes the reasoning, even for the same kind of token.
            The agreement counts say whether the final answer copies the reasoning's conclusion, and whether that
            conclusion matches the digits the reasoning had just written: a mismatch there means correct-looking
            steps can still end in a wrong answer.
            Notebook 05 edits the model: it removes an expert and steers the residual stream toward "high" effort.
        '''),
    ]


def ablation_and_steering() -> list:
    return [
        md('''
            # 05 · Expert ablation and steering

            Two ways to edit the model while it runs, and what each one does, measured:

            1. **Ablation.** `with model.ablate({layer: [experts]}, mode=...)` takes experts away. `reroute`
               removes an expert's router logit before the top-k, so the next best expert takes its place;
               `zero` keeps the routing and drops the expert's output (the others are not renormalized). We find
               the expert that nano uses most on digits (notebook 02 maps the experts digits prefer) and measure
               what each kind of ablation changes: the loss and the top prediction on the digits of correct worked
               solutions, the routing downstream, and the generated answer. A second expert of the same layer, the
               one words use most, is the control: an effect only means something if the control does not show it
               too.
            2. **Steering.** `model.set_steering(layer, vector, scale)` adds `scale * vector` to the residual
               stream after a block, at every token. The vector is the difference of mean residual-stream
               activations between prompts rendered with `Reasoning: high` and the same prompts with `low`. Does
               adding it make a low-effort prompt think at length?

            Unedited, nano gets 4-digit sums right at high effort and mostly wrong at low (see its model card), so
            the answers are checked against Python in every condition, the unedited model included.
        '''),
        LOAD_NANO,
        TOKEN_KINDS,
        md('''
            ## The expert digits use most

            Teacher forcing: the conversations above are correct worked solutions, so we can run each one in a
            single forward pass and read the router's choices (`blocks.{l}.mlp.hook_topk_indices`, [B, T, k]) at
            every token.
        '''),
        code('''
            import contextlib
            import difflib

            from plotly.subplots import make_subplots

            topk_names = [f"blocks.{l}.mlp.hook_topk_indices" for l in range(L)]
            runs = [episode_ids(episode) for episode in episodes]  # (ids [1, T], token texts, assistant mask [T])

            use = {"digit": torch.zeros(L, E), "word": torch.zeros(L, E)}
            seen = {"digit": 0, "word": 0}
            for ids, texts, _ in runs:
                _, cache = model.run_with_cache(ids, names=topk_names)
                chosen = torch.stack([cache[name][0] for name in topk_names], dim=1)  # [T, L, k]
                hot = torch.zeros(len(texts), L, E).scatter_(2, chosen, 1.0)
                for t, text in enumerate(texts):
                    if token_kind(text) in use:
                        use[token_kind(text)] += hot[t]
                        seen[token_kind(text)] += 1
            share = {kind: use[kind] / seen[kind] for kind in use}  # [L, E]: share of that kind's tokens

            layer, expert = divmod(int(share["digit"].argmax()), E)
            words_first = share["word"][layer].argsort(descending=True).tolist()
            control = next(e for e in words_first if e != expert)  # the same layer's expert words use most
            print(f"Layer {layer}, expert {expert} is chosen for {share['digit'][layer, expert]:.0%} of digit tokens "
                  f"and {share['word'][layer, expert]:.0%} of word tokens.")
            print(f"Control: layer {layer}, expert {control}, chosen for {share['digit'][layer, control]:.0%} of digit "
                  f"tokens and {share['word'][layer, control]:.0%} of word tokens.")
        '''),
        md('''
            ## What each ablation changes, teacher-forced

            The questions we will generate on below are two-digit problems, so we measure on correct worked
            solutions of two-digit problems at high effort. For each condition we re-run them and measure,
            on the assistant's own tokens: the loss (nats) of predicting each next token, separately where that
            token is a digit and where it is not; how often the model's top prediction changes from the unedited
            model's (greedy generation follows the top prediction, so this is what can change an answer); the KL
            divergence of the next-token distribution from the unedited model's; and, per layer, the share of
            tokens whose set of chosen experts changed.
        '''),
        code('''
            conditions = {
                "unedited": None,
                f"reroute expert {expert}": ({layer: [expert]}, "reroute"),
                f"zero expert {expert}": ({layer: [expert]}, "zero"),
                f"reroute expert {control} (control)": ({layer: [control]}, "reroute"),
                f"zero expert {control} (control)": ({layer: [control]}, "zero"),
            }


            rng = random.Random(1)
            small = []  # (ids, texts, mask) of worked two-digit problems
            for op in ("add", "sub"):
                for _ in range(6):
                    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=op == "sub")
                    small.append(episode_ids(data.arithmetic_episode(rng, op, a, b, "high")))


            def measure(ablation):
                """Loss and top-1 changes on digit / other targets, KL, and routing changes per layer [L]."""
                nll = {"digit": [], "other": []}
                flips = {"digit": [], "other": []}
                kl, changed = [], []
                edit = model.ablate(*ablation) if ablation else contextlib.nullcontext()
                with edit:
                    for i, (ids, texts, mask) in enumerate(small):
                        logits, cache = model.run_with_cache(ids, names=topk_names)
                        chosen = torch.stack([cache[n][0] for n in topk_names], dim=1).sort(-1).values  # [T, L, k]
                        logp = logits[0, :-1].log_softmax(-1)  # position t predicts token t + 1
                        scored = mask[1:]  # the assistant's own tokens
                        loss = -logp.gather(1, ids[0, 1:, None])[:, 0]
                        digit = torch.tensor([token_kind(text) == "digit" for text in texts[1:]])
                        if ablation is None:
                            reference.append((logp, chosen))
                        ref_logp, ref_chosen = reference[i]
                        flipped = (logp.argmax(-1) != ref_logp.argmax(-1)).float()
                        for kind, where in (("digit", scored & digit), ("other", scored & ~digit)):
                            nll[kind].append(loss[where])
                            flips[kind].append(flipped[where])
                        kl.append((ref_logp.exp() * (ref_logp - logp)).sum(-1)[scored])
                        changed.append((chosen != ref_chosen).any(-1).float())  # [T, L]
                mean = {kind: torch.cat(v).mean().item() for kind, v in nll.items()}
                flip = {kind: torch.cat(v).mean().item() for kind, v in flips.items()}
                return {"digit loss": mean["digit"], "other loss": mean["other"], "digit flips": flip["digit"],
                        "other flips": flip["other"], "KL": torch.cat(kl).mean().item(),
                        "changed": torch.cat(changed).mean(0)}


            reference = []  # the unedited model's log-probabilities and routing, per conversation
            results = {name: measure(ablation) for name, ablation in conditions.items()}
            print(f"{sum(int(m[1:].sum()) for _, _, m in small)} assistant tokens scored")
            for name, r in results.items():
                print(f"{name:28s} loss on digits {r['digit loss']:.3f}, on other tokens {r['other loss']:.4f} nats; "
                      f"top prediction changed on {r['digit flips']:.1%} of digits, {r['other flips']:.1%} of other "
                      f"tokens; KL {r['KL']:.4f}; routing changed at layer {layer}: {r['changed'][layer]:.0%}, "
                      f"at the last layer: {r['changed'][-1]:.0%}")
        '''),
        code('''
            names = list(results)
            fig = make_subplots(rows=1, cols=2,
                                subplot_titles=["next-token loss (nats)", "tokens whose experts changed"])
            for kind in ("digit loss", "other loss"):
                fig.add_trace(go.Bar(name=kind, x=names, y=[results[n][kind] for n in names]), row=1, col=1)
            for n in names[1:]:
                fig.add_trace(go.Scatter(name=n, y=results[n]["changed"].numpy(), mode="lines+markers"), row=1, col=2)
            fig.update_xaxes(title_text="layer", row=1, col=2)
            fig.update_yaxes(tickformat=".0%", row=1, col=2)
            fig.update_layout(barmode="group", height=420, title=f"Ablating experts of layer {layer}")
            fig.show()

            base, rerouted, zeroed, ctrl_rerouted, ctrl_zeroed = results.values()
            print(f"Loss on digits: unedited {base['digit loss']:.3f} nats; digit expert rerouted "
                  f"{rerouted['digit loss']:.3f}, zeroed {zeroed['digit loss']:.3f}; control rerouted "
                  f"{ctrl_rerouted['digit loss']:.3f}, zeroed {ctrl_zeroed['digit loss']:.3f}.")
            print(f"Top prediction changed on digits: digit expert rerouted {rerouted['digit flips']:.1%}, zeroed "
                  f"{zeroed['digit flips']:.1%}; control rerouted {ctrl_rerouted['digit flips']:.1%}, zeroed "
                  f"{ctrl_zeroed['digit flips']:.1%}.")
        '''),
        md('''
            ## What it does to the answers

            The same questions generated with and without each ablation (greedy, high effort). The last line of
            the analysis is where nano writes its digits; where a run departs from the unedited one, the first
            line that differs is printed.
        '''),
        code('''
            ASK = {"What is 47 + 25?": str(47 + 25), "What is 27 + 82?": str(27 + 82)}
            generated = {}
            for name, ablation in list(conditions.items())[:4]:
                edit = model.ablate(*ablation) if ablation else contextlib.nullcontext()
                with edit:
                    for question in ASK:
                        generated[name, question] = model.chat(question, reasoning="high", max_new_tokens=250,
                                                               temperature=0)

            changed_answers = {name: sum(generated[name, q].final != generated["unedited", q].final for q in ASK)
                               for name in list(conditions)[1:4]}
            print("answers that changed:", {name: f"{n}/{len(ASK)}" for name, n in changed_answers.items()})
            for question, answer in ASK.items():
                print(f"{question} (the answer is {answer})")
                before = generated["unedited", question].analysis.splitlines()
                for name in list(conditions)[:4]:
                    trace = generated[name, question]
                    digit_rows = [t for t, text in enumerate(trace.token_texts) if text.strip().isdigit()]
                    used = (trace.router_indices[digit_rows, layer] == expert).any(-1).float().mean().item()
                    lines = trace.analysis.splitlines()
                    first_change = next((b for a, b in zip(before, lines, strict=False) if a != b), None)
                    verdict = "right" if trace.final.strip() == answer else "wrong"
                    print(f"  {name:28s} final {trace.final!r:8s} {verdict}; "
                          f"expert {expert} chosen on {used:.0%} of its digit tokens; "
                          f"first changed line: {first_change!r}")
        '''),
        code('''
            diff = difflib.unified_diff(generated["unedited", "What is 47 + 25?"].analysis.splitlines(),
                                        generated[names[1], "What is 47 + 25?"].analysis.splitlines(),
                                        "unedited", names[1], lineterm="", n=0)
            print("\\n".join(diff) or "(the two analyses are identical)")
        '''),
        md('''
            ## Steering toward "high" effort

            The effort is one word in the system message. We render a set of prompts twice, with `high` and with
            `low`, followed by the header `<|channel|>analysis<|message|>`, and keep the residual stream after
            every block (`blocks.{l}.hook_resid_post`) at that last position, where the model is about to write
            the first word of its reasoning. The steering vector of layer l is the mean over the `high` prompts
            minus the mean over the `low` ones. The prompts used to build it are not the ones we test on.
        '''),
        code('''
            from ossscope import harmony

            ANALYSIS_HEADER = model.tokenizer.encode_o200k("<|channel|>analysis<|message|>", allow_special=True)
            BUILD = ["What is 31 + 54?", "What is 68 - 25?", "What is 19 + 77?", "What is 90 - 42?",
                     "What is 250 + 13?", "What is 5 + 8?"]
            TEST = {"What is 47 + 25?": str(47 + 25), "What is 27 + 82?": str(27 + 82),
                    "What is 83 - 46?": str(83 - 46)}
            resid_names = [f"blocks.{l}.hook_resid_post" for l in range(L)]


            def prompt_ids(question, effort):
                """The chat prompt as model.chat renders it, plus the analysis header: [1, T] model ids."""
                o200k = harmony.render_prompt(question, reasoning=effort) + ANALYSIS_HEADER
                return torch.tensor([model.tokenizer.to_model(o200k)])


            def mean_resid(effort):  # [L, D]
                rows = []
                for question in BUILD:
                    _, cache = model.run_with_cache(prompt_ids(question, effort), names=resid_names)
                    rows.append(torch.stack([cache[name][0, -1] for name in resid_names]))
                return torch.stack(rows).mean(0)


            vectors = mean_resid("high") - mean_resid("low")  # [L, D]
            print("norm of the steering vector per layer:", [round(v, 1) for v in vectors.norm(dim=-1).tolist()])

            # What the model writes first at each effort (the argmax next token after the header):
            openers = {effort: {int(model(prompt_ids(q, effort))[0, -1].argmax()) for q in BUILD}
                       for effort in ("low", "high")}
            print({effort: model.tokenizer.token_texts(sorted(ids)) for effort, ids in openers.items()})
            high_openers = sorted(openers["high"])
        '''),
        md('''
            A cheap scan first: for the low-effort test prompts, the probability that the first analysis token is
            one that high effort starts with, with the vector added at each layer and scale. One forward pass per
            cell; no generation yet.
        '''),
        code('''
            SCALES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]


            low_batch = torch.cat([prompt_ids(q, "low") for q in TEST])  # [3, T]: the test prompts have equal length


            def p_high_opener():
                return model(low_batch)[:, -1].softmax(-1)[:, high_openers].sum(-1).mean().item()


            scan = torch.zeros(L, len(SCALES))
            try:
                for l in range(L):
                    for j, scale in enumerate(SCALES):
                        model.set_steering(l, vectors[l], scale)
                        scan[l, j] = p_high_opener()
                        model.clear_steering()
            finally:
                model.clear_steering()

            fig = go.Figure(go.Heatmap(z=scan.numpy(), x=[str(s) for s in SCALES], colorscale="Viridis", zmin=0, zmax=1,
                                       colorbar=dict(title="P")))
            fig.update_layout(title="Low-effort prompts: probability of a high-effort first word, steered",
                              xaxis_title="scale", yaxis_title="layer", height=330)
            fig.show()

            flips = [(SCALES[j], l) for j in range(len(SCALES)) for l in range(L) if scan[l, j] > 0.5]
            steer_scale, steer_layer = min(flips) if flips else (SCALES[-1], int(scan[:, -1].argmax()))
            print(f"Smallest steering that makes a high-effort opening more likely than not: layer {steer_layer}, "
                  f"scale {steer_scale} (P = {scan[steer_layer, SCALES.index(steer_scale)]:.2f}; unsteered "
                  f"P = {scan[steer_layer, 0]:.2g})" if flips else "No layer and scale in the scan passes P = 0.5.")
        '''),
        md('''
            ## Steered generation

            Now generate: each test question at low effort, unsteered and steered at the layer and scale found
            above, and at high effort unsteered for comparison. We measure the analysis length and check the
            answer. `trace.metadata["steering"]` records the steering that was active.
        '''),
        code('''
            steered = {}
            for question in TEST:
                steered["low", question] = model.chat(question, reasoning="low", max_new_tokens=250, temperature=0)
                steered["high", question] = generated.get(("unedited", question)) or model.chat(  # reuse if made
                    question, reasoning="high", max_new_tokens=250, temperature=0)
                model.set_steering(steer_layer, vectors[steer_layer], steer_scale)
                try:
                    steered["low + steering", question] = model.chat(question, reasoning="low", max_new_tokens=250,
                                                                     temperature=0)
                finally:
                    model.clear_steering()

            runs_by = ("low", "low + steering", "high")
            length = {r: [sum(c == "analysis" for c in steered[r, q].channels) for q in TEST] for r in runs_by}
            fig = go.Figure([go.Bar(name=q, x=list(runs_by), y=[length[r][i] for r in runs_by])
                             for i, q in enumerate(TEST)])
            fig.update_layout(barmode="group", title="Analysis length: low effort, low effort steered, high effort",
                              yaxis_title="analysis tokens", height=360)
            fig.show()

            for question, answer in TEST.items():
                for r in runs_by:
                    trace = steered[r, question]
                    first = trace.analysis.splitlines()[0] if trace.analysis else ""
                    print(f"{question} {r:15s} {length[r][list(TEST).index(question)]:4d} analysis tokens, "
                          f"final {trace.final!r} ({'right' if trace.final.strip() == answer else 'wrong'}), "
                          f"stop {trace.metadata['stop_reason']}; starts {first[:45]!r}")
            print("recorded steering (layer: vector norm):", steered["low + steering", question].metadata["steering"])
            mean_len = {r: sum(v) / len(v) for r, v in length.items()}
            print("Mean analysis length: " + ", ".join(f"{r} {mean_len[r]:.0f}" for r in runs_by) + " tokens.")
            switched = sum(s > l for s, l in zip(length["low + steering"], length["low"], strict=True))
            print(f"Steering lengthened the analysis on {switched}/{len(TEST)} low-effort prompts.")
            right = {r: sum(steered[r, q].final.strip() == answer for q, answer in TEST.items()) for r in runs_by}
            print("Right answers: " + ", ".join(f"{r} {n}/{len(TEST)}" for r, n in right.items()) + ".")
        '''),
        md('''
            **What to take away.** Being used for digits is not the same as being needed for them. Compare the
            digit expert's numbers with the control's (printed above): on the shipped nano, removing the expert
            that takes most digit tokens barely moves the loss or the answers, because the other experts cover for
            it, while the control, an expert that mostly serves words, can matter more to the digits. Where an edit
            does flip a top prediction, greedy decoding carries it forward: one changed digit early in the worked
            solution carries through the columns to the answer (the first changed line above shows where).
            `reroute` and `zero` are different edits: rerouting hands the tokens to another expert and changes
            routing downstream, zeroing keeps the routing and removes the contribution.

            Steering is a blunter tool: one difference-of-means vector, added at one layer on every token, can
            switch low-effort prompts to the high-effort style of reasoning. The printed lengths and answers say on
            how many of the test prompts it did, and whether the steered reasoning is as good as real high effort.
        '''),
    ]


def tool_calls() -> list:
    return [
        md('''
            # 06 · Tool calls: the commentary channel

            In harmony, the developer message declares functions with JSON schemas. To call one, gpt-oss writes a
            message on the **commentary** channel addressed `to=functions.NAME`, with JSON arguments, and ends its
            turn with `<|call|>`. `model.chat(..., tools=[...])` runs the loop: it parses the arguments, checks them
            against the schema, calls your Python function, feeds the answer back as a message from
            `functions.NAME`, and lets the model continue until it answers on the **final** channel.

            nano was trained to call two functions, `get_weather(city)` and `convert_units(value, from_unit,
            to_unit)` (deterministic stand-ins that work offline, in `ossscope.nano`). Its model card reports its
            calls as well-formed; this notebook checks that on a few questions, looks at how the router handles
            the call compared with the answer, and then breaks the tool on purpose: a tool that raises, arguments
            that fail the schema, a function that was never declared. None of these may crash the chat; each
            error must reach the model as the tool's answer.
        '''),
        code('''
            import json
            import re
            from dataclasses import replace

            import plotly.graph_objects as go
            import torch
            from ossscope.widgets import router_map_figure
            from plotly.subplots import make_subplots

            import ossscope
            from ossscope.harmony import Tool
            from ossscope.nano import convert_units, get_weather

            torch.manual_seed(0)
            model = ossscope.load("nano")
            cfg = model.config
            L, E, k = cfg.num_hidden_layers, cfg.num_experts, cfg.experts_per_token
            print(f"{model.name}: {L} layers, {E} experts (top-{k})")
        '''),
        md('''
            ## One call

            `trace.tool_calls` lists each call: the raw argument text, the parsed arguments, the tool's result (or
            the error), and the index of the `<|call|>` token among the generated tokens.
        '''),
        code('''
            trace = model.chat("What's the weather in Oslo?", tools=[get_weather], temperature=0)
            print(trace)
            for call in trace.tool_calls:
                print(call)
            print("final:", trace.final)
            print("the same call made directly:", get_weather("Oslo"))
        '''),
        md('''
            The conversation as parsed (`trace.messages`): the user's question, the model's chain of thought, its
            call on the commentary channel, the tool's answer, and the final answer. Below it, the exact harmony
            text the model read, from `trace.context_tokens()` (the generated tokens with the tool's answer
            inserted where the chat loop fed it).
        '''),
        code('''
            for message in trace.messages:
                to = f" to={message['recipient']}" if message.get("recipient") else ""
                print(f"[{message['role']} / {message.get('channel') or '-'}{to}] {message['content']}")

            sequence, _ = trace.context_tokens()
            text = model.tokenizer.decode_o200k(sequence)
            print()
            print(text[text.index("<|start|>user"):])
        '''),
        md('''
            ## Are the calls reliable?

            A few more questions, both tools declared each time. For each chat: which function was called with
            which arguments, whether those are the function and arguments the question asks for (written down
            here by hand), whether the call went through, and whether every value of the tool's result appears in
            the final answer (a check that the answer is grounded in the result). A call can be well-formed and
            still be the wrong call.
        '''),
        code('''
            QUESTIONS = {  # question -> the call it asks for
                "What's the weather in Oslo?": ("get_weather", {"city": "Oslo"}),
                "Is it raining in Tokyo?": ("get_weather", {"city": "Tokyo"}),
                "Convert 12 km to miles.": ("convert_units", {"value": 12, "from_unit": "km", "to_unit": "miles"}),
                "What is 100 fahrenheit in celsius?":
                    ("convert_units", {"value": 100, "from_unit": "fahrenheit", "to_unit": "celsius"}),
                "How many pounds is 70 kg?": ("convert_units", {"value": 70, "from_unit": "kg", "to_unit": "pounds"}),
            }
            chats = {q: model.chat(q, tools=[get_weather, convert_units], temperature=0) for q in QUESTIONS}


            def grounded(call, final):
                """Every value of the tool's JSON result appears in the final answer."""
                return call.error is None and all(str(value) in final for value in json.loads(call.result).values())


            valid = right = answered = 0
            for question, chat in chats.items():
                calls = chat.tool_calls
                ran = len(calls) == 1 and calls[0].error is None
                asked = ran and (calls[0].name, calls[0].parsed_arguments) == QUESTIONS[question]
                fine = ran and grounded(calls[0], chat.final)
                valid, right, answered = valid + ran, right + asked, answered + fine
                made = "; ".join(f"{c.name}({c.arguments})" + (f" -> error {c.error}" if c.error else "")
                                 for c in calls)
                print(f"{question}\\n    call: {made or 'no call'}  (the call the question asks for: {asked})"
                      f"\\n    final: {chat.final!r}  (grounded in the result: {fine})")
            n = len(chats)
            print(f"Valid calls that ran: {valid}/{n}; the function and arguments the question asks for: {right}/{n}; "
                  f"final answer carries every value of the result: {answered}/{n}.")
        '''),
        md('''
            ## The router on the call and on the answer

            The router map of the first chat (top expert of every generated token at every layer; hover for the
            tokens), then the routing pooled over all the chats above, per channel: the chain of thought
            (analysis), the call (commentary: the JSON arguments) and the answer (final). The dotted line is what
            chance alone gives: the distance when the commentary and final tokens are pooled and split at random
            into groups of their sizes (95th percentile over 300 shuffles).
        '''),
        code('''
            router_map_figure(trace)
        '''),
        code('''
            CHANNELS = ("analysis", "commentary", "final")
            rows = {c: [] for c in CHANNELS}
            for chat in [trace, *chats.values()]:
                hot = torch.zeros(len(chat.tokens), L, E).scatter_(2, chat.router_indices, 1.0)  # [T, L, E]
                for t, channel in enumerate(chat.channels):
                    if channel in rows:
                        rows[channel].append(hot[t])
            rows = {c: torch.stack(v) for c, v in rows.items()}  # channel -> [N, L, E]
            usage = {c: v.mean(0) / k for c, v in rows.items()}  # [L, E], rows sum to 1
            print("tokens per channel:", {c: len(v) for c, v in rows.items()})


            def distance(a, b):
                """Total variation distance between routing distributions, per layer (0 same, 1 disjoint)."""
                return 0.5 * (a - b).abs().sum(-1)


            g = torch.Generator().manual_seed(0)
            pool, n = torch.cat([rows["commentary"], rows["final"]]), len(rows["commentary"])
            shuffles = [torch.randperm(len(pool), generator=g) for _ in range(300)]
            chance = torch.stack([distance(pool[order[:n]].mean(0) / k, pool[order[n:]].mean(0) / k)
                                  for order in shuffles]).quantile(0.95, dim=0)
            observed = distance(usage["commentary"], usage["final"])

            fig = make_subplots(rows=1, cols=3, subplot_titles=list(CHANNELS), shared_yaxes=True)
            for col, c in enumerate(CHANNELS, start=1):
                fig.add_trace(go.Heatmap(z=usage[c].numpy(), coloraxis="coloraxis"), row=1, col=col)
            fig.update_layout(title="Share of each channel's tokens routed to each expert (x) at each layer (y)",
                              coloraxis=dict(colorscale="Viridis"), height=330)
            fig.show()

            fig = go.Figure([go.Scatter(y=observed.numpy(), name="commentary vs final", mode="lines+markers"),
                             go.Scatter(y=distance(usage["analysis"], usage["final"]).numpy(), name="analysis vs final",
                                        mode="lines+markers"),
                             go.Scatter(y=chance.numpy(), name="chance", mode="lines", line=dict(dash="dot"))])
            fig.update_layout(title="How different is routing on the call?", xaxis_title="layer",
                              yaxis_title="total variation distance", height=360)
            fig.show()

            for l in range(L):
                print(f"layer {l}: commentary vs final {observed[l]:.2f} (chance up to {chance[l]:.2f})")
            print("Layers where the call routes differently from the answer beyond chance:",
                  [l for l in range(L) if observed[l] > chance[l]])
            shift = usage["commentary"] - usage["final"]
            layer, expert = divmod(int(shift.argmax()), E)
            print(f"Most call-specific: layer {layer}, expert {expert}: {usage['commentary'][layer, expert]:.0%} of "
                  f"the commentary channel's routing, {usage['final'][layer, expert]:.0%} of the final channel's, "
                  f"{usage['analysis'][layer, expert]:.0%} of the analysis channel's.")
        '''),
        md('''
            ## When the tool fails

            Three ways a call can go wrong, each with the exact schema nano was trained on wherever possible (a
            `Tool` built from `get_weather`, with its Python function or its schema swapped):

            - the function raises (the weather service is down);
            - the arguments fail the schema (a tool that takes the city as an integer; the model writes a name);
            - the model calls a function that was never declared (only `convert_units` is offered).

            The chat loop turns each failure into `ToolCall.error` and tells the model `{"error": ...}` as the tool's
            answer; the Python function is only called when the arguments pass. nano never saw a failing tool in
            training, so what it says next is worth reading: the cell checks whether the final answer still states
            a number although no tool returned any.
        '''),
        code('''
            python_calls = []  # what actually reached a Python function


            def weather_service_down(city: str):
                python_calls.append(("weather_service_down", city))
                raise ConnectionError("the weather service is unreachable")


            def weather_by_id(city: int):
                python_calls.append(("weather_by_id", city))
                return {"city": city, "temperature_c": 0, "condition": "unknown"}


            declared = Tool.from_function(get_weather)  # the name, description and schema nano was trained with
            integer_city = dict(declared.parameters, properties={"city": {"type": "integer"}})
            cases = {
                "the tool raises": [replace(declared, fn=weather_service_down)],
                "arguments fail the schema": [replace(declared, parameters=integer_city, fn=weather_by_id)],
                "undeclared function": [convert_units],
            }
            failures = {name: model.chat("What's the weather in Oslo?", tools=tools, temperature=0, max_new_tokens=200)
                        for name, tools in cases.items()}

            for name, chat in failures.items():
                print(f"== {name}")
                for call in chat.tool_calls:
                    print(f"  call {call.name}({call.arguments}) -> error: {call.error}")
                told = [m["content"] for m in chat.messages if m["role"] == "tool"]
                print(f"  the model was told: {told}")
                print(f"  final: {chat.final!r}  (stop: {chat.metadata['stop_reason']}, "
                      f"recorded problems: {chat.parse_errors})")
                invented = bool(re.search(r"\\d", chat.final)) and all(c.result is None for c in chat.tool_calls)
                print(f"  states a number though no tool returned any: {invented}")
            print("calls that reached Python:", python_calls)
        '''),
        md('''
            **What to take away.** The counts above separate three things that are easy to conflate: a call that is
            well-formed and runs, a call that is the one the question asked for, and an answer that carries the
            tool's result. A small model can get the first and the last right on a call that answers the wrong
            question, so check all three. The router handles the JSON of a call differently from the answer
            (compare the distances with chance). When a tool fails, the library holds: the chat ends normally, the
            error is in `ToolCall.error` and in the message the model read, and bad arguments never reach the
            function. The model is another matter: read its final answers above before trusting a small model
            with a failing tool. `trace.to_html(path)` exports any of these traces for someone without Python.
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


# -- 08: harmony's built-in tools and Structured Outputs (issue 19) -------------------------------------------


def agentic_tools() -> list:
    return [
        md("""
            # 08 · Agentic tools: browser, python and Structured Outputs

            gpt-oss was trained on two **built-in tools** besides function calling. They are declared in the
            *system* message (not the developer message), and called by namespace:

            - `browser`: `browser.search`, `browser.open`, `browser.find`. Pages come back with a cursor
              (`[3] Title (url)`), a scrollbar (`viewing lines [0 - 5] of 5`) and numbered lines (`L4: ...`), and
              the model cites what it read as `【cursor†L4】`.
            - `python`: the message *is* the code; the answer is what a notebook cell would print.

            `ossscope.tools` runs both offline: `Browser(corpus)` searches a local folder of text/markdown/HTML
            with SQLite FTS5, `Python()` is a stateful Jupyter kernel in a subprocess with a timeout, a memory cap
            and no network where the OS allows. Pass them in `model.chat(..., tools=[...])` beside functions.

            A third capability, **Structured Outputs**, holds the final answer to a JSON schema
            (`response_format=`) with a grammar (llguidance) while the chain of thought stays free.

            **nano has learned both tools.** Its corpus has browser and python episodes
            (`ossscope/nano/agentic.py`): it searches the shipped corpus of fictional towns, opens the first result
            and answers citing the line it read, and it sends big products to the kernel and answers with what was
            printed. Below: the machinery by hand (declaration, browser, kernel), then nano's tool loop, what it was
            trained on, how well it does on held-out questions, and where it breaks.
        """),
        code("""
            import json

            import torch

            import ossscope
            from ossscope import harmony
            from ossscope.nano import agentic, data
            from ossscope.tools import Browser, Python

            torch.manual_seed(0)
            model = ossscope.load("nano")
            browser = Browser(agentic.TOWNS_DIR)  # 24 fictional towns: facts nobody knows without reading them
            kernel = Python()  # declared as harmony declares it: "time out after 120.0 seconds"
            print(f"{len(browser.documents)} documents, e.g. {browser.documents[0].url!r}")
        """),
        md("""
            ## The declaration

            The system message's `# Tools` section, as ossscope renders it, is byte for byte openai-harmony's
            `SystemContent.with_browser_tool().with_python_tool()` (with their defaults: a `Browser(source=...)`
            or a `Python(timeout=...)` writes its own `sources=` line or timeout into the declaration).
        """),
        code("""
            from openai_harmony import Conversation, Message, Role, SystemContent

            ours = harmony.render_prompt("hi", builtin_tools=[browser, kernel])
            system = SystemContent.new().with_reasoning_effort(harmony._effort("medium"))
            system = system.with_browser_tool().with_python_tool()
            theirs = model.tokenizer.encoding.render_conversation_for_completion(
                Conversation.from_messages([Message.from_role_and_content(Role.SYSTEM, system),
                                            Message.from_role_and_content(Role.USER, "hi")]), Role.ASSISTANT)
            print("identical to openai-harmony:", ours == list(theirs), f"({len(ours)} tokens)")
            text = model.tokenizer.decode_o200k(ours)
            print(text[text.index("# Tools"):text.index("type open")])
        """),
        md("""
            ## The browser by hand

            Search, open the first hit, find a word in it. Every page gets the next cursor; `citations` resolves
            `【cursor†Lstart-Lend】` back to the lines the model would have read.
        """),
        code("""
            print(browser.search("Tordun lighthouse", topn=3))
            print()
            page = browser.open(id=0)
            print(page)
            print()
            print(browser.find("bridges"))
            print()
            print(browser.citations("It is 47 meters tall 【1†L4】; see also 【9†L2】."))
        """),
        md("""
            ## The python kernel by hand

            State persists between calls; an exception is the answer (a plain traceback); a call that runs past
            the timeout is interrupted and the model is told so, and a kernel that dies is restarted.
        """),
        code("""
            from ossscope.tools import ToolUsageError

            print(repr(kernel.run("x = 17 ** 7\\nprint(x)")))
            print(repr(kernel.run("x % 1000")))
            print(kernel.run("1 / 0"))
            with Python(timeout=1.5) as quick:
                try:
                    quick.run("import time\\nprint('working...', flush=True)\\ntime.sleep(60)")
                except ToolUsageError as error:
                    print("told to the model:", error)
            print("limits that took here:", kernel.sandbox)
        """),
        md("""
            ## The tool loop with nano

            Held-out questions (never in its training data), each with the tool it needs, as in training. Each
            call the model makes to `browser.*` or `python` is run and answered on the call's channel, and lands in
            `trace.tool_calls` like a function call; `browser.citations` resolves the answer's citation to the line
            the model opened.
        """),
        code("""
            held_out = agentic.eval_agentic(1)  # one browser and one python question per effort
            town_question = next(e for e in held_out if e.kind == "browser")
            town_browser = Browser(agentic.TOWNS_DIR)  # a fresh one: its cursors are this chat's
            trace = model.chat(town_question.user, reasoning="low", tools=[town_browser], temperature=0,
                               max_new_tokens=120)
            print(trace)
            print("tools declared:", trace.metadata["builtin_tools"])
            for call in trace.tool_calls:
                print(f"{call.name} {call.arguments} -> {(call.result or call.error)[:160]!r}")
            print("the cited line:", [c["lines"] for c in town_browser.citations(trace.final)])
            print("right:", agentic.score_chat(town_question, trace)["correct"])
        """),
        code("""
            product = next(e for e in held_out if e.kind == "python")
            trace = model.chat(product.user, reasoning="medium", tools=[kernel], temperature=0, max_new_tokens=120)
            for call in trace.tool_calls:
                print(f"{call.name} {call.arguments!r} -> {call.result!r}")
            print("final:", trace.final, "| right:", agentic.score_chat(product, trace)["correct"])
        """),
        md("""
            Where it breaks: its training declared one built-in tool per conversation. Declare both (as
            `SystemContent.with_browser_tool().with_python_tool()` does) and the prompt is one it never saw.
        """),
        code("""
            trace = model.chat(product.user, reasoning="medium", tools=[Browser(agentic.TOWNS_DIR), kernel],
                               temperature=0, max_new_tokens=120)
            print("calls:", [call.name for call in trace.tool_calls], "| final:", trace.final,
                  "| right:", agentic.score_chat(product, trace)["correct"])
        """),
        md("""
            ## What nano was trained on

            A browser episode of the corpus, rendered exactly as `model.chat` renders it: the model searches,
            opens the first result, and answers with a citation. The tool answers in it are the real `Browser`'s
            over the same shipped corpus, so nano sees at inference what it saw in training (a test checks this
            token for token).
        """),
        code("""
            import random

            episode = agentic.browser_episode(random.Random(4), "medium")
            tokens, mask = data.render_episode(model.tokenizer.encoding, episode)
            print(episode.user, "->", episode.answer["final"])
            print(f"{len(tokens)} tokens, {sum(mask)} of them the model's own")
            generated = "".join(model.tokenizer.token_texts_o200k([t for t, m in zip(tokens, mask, strict=True) if m]))
            print(generated)
        """),
        md("""
            ## How well: held-out questions per effort

            `ossscope.nano.eval.evaluate_agentic` asks held-out questions through `model.chat` with the real tools,
            greedy, and scores each: a valid call is the right tool sequence without errors (for the browser, a
            search that names the town asked about); a right answer holds the value (for the browser, citing the
            fact's line of the opened page). Three per kind and effort here, so the rates are coarse; the model
            card has 20 per cell (`python -m ossscope.nano.eval --agentic 20`).
        """),
        code("""
            from ossscope.nano.eval import evaluate_agentic

            summary, _ = evaluate_agentic(model, n_per_effort=3)
            print(f"{'':16} {'n':>3} {'valid call':>11} {'right':>7}")
            for case, row in sorted(summary.items()):
                print(f"{case:16} {row['n']:>3} {row['valid_call']:>11.0%} {row['correct']:>7.0%}")
        """),
        md("""
            ## Structured Outputs

            With `response_format=`, the final channel's text is held to the schema: at each step of the final
            message, tokens the grammar refuses are masked before sampling, and the message may end only when
            the JSON is complete. The analysis channel is untouched. `trace.metadata["structured"]` records,
            per token, whether the step was constrained and whether the mask changed the model's top choice (the
            viewer outlines those tokens). At `low` effort nano's arithmetic is mostly wrong (its model card
            says so); the point here is that whatever it answers parses and fits the schema.
        """),
        code("""
            schema = {"type": "object", "properties": {"result": {"type": "integer", "minimum": 0, "maximum": 99999}},
                      "required": ["result"], "additionalProperties": False}
            trace = model.chat("What is 12 + 30?", reasoning="low", temperature=0, max_new_tokens=40,
                               response_format={"name": "sum", "schema": schema})
            record = trace.metadata["structured"]
            print("analysis:", repr(trace.analysis))
            print("final:", trace.final, "->", json.loads(trace.final))
            print(f"{sum(record['constrained'])} tokens constrained, the grammar changed the top choice at "
                  f"{sum(record['changed_top'])}: {[t for t, c in enumerate(record['changed_top']) if c]}")
        """),
        code("""
            trace.show()
        """),
        md("""
            ## Retraining nano on the tools (needs a GPU)

            ```
            python -m ossscope.nano.train prepare --out .carry/nano      # CPU: the corpus, 20% browser/python episodes
            bash scripts/gpu_train_nano.sh                               # on the GPU machine, with .carry/nano
            python -m ossscope.nano.eval --model DIR --agentic 20        # valid-call and right-answer rates
            ```

            The shipped checkpoint took two stages (the model card): the core skills from random weights, then
            `train --init STAGE1_DIR --lr 1e-3` on the full corpus, which keeps the arithmetic while it learns the
            tools.
        """),
        code("""
            kernel.close()
        """),
    ]


def many_prompts() -> list:
    return [
        md('''
            # 09 · Many prompts at once: batched chats and router statistics over a set

            Studies run over sets of prompts ("which experts fire during the chain of thought, across a few
            hundred questions?"). `model.chat([...])` takes a list of conversations and returns a list of
            Traces, running them through one batched decoder: every row of the batch sits at its own position
            in the KV cache (no padding), a conversation that ends frees its row for the next one (continuous
            batching), and a tool call runs in its own row. On the CPU each conversation gets exactly the tokens
            and records it gets alone; on a GPU the same is true up to rounding (batch 1 and larger batches use
            different MoE kernels). For thousands of prompts, `python -m ossscope.collect --batch-size N` does the
            same from a JSONL file, resumably (last cell).
        '''),
        code('''
            import time

            import plotly.graph_objects as go
            import torch

            import ossscope

            model = ossscope.load("nano")
            cfg = model.config
            L, E = cfg.num_hidden_layers, cfg.num_experts
            questions = [f"What is {13 * i + 7} + {31 * i + 4}?" for i in range(24)]
        '''),
        md('''
            ## One at a time, then as a batch

            The same 8 questions, greedy, both ways: the tokens match, and the batch is faster (on the CPU the
            gain is modest; on a GPU a batch of 64 decodes about 12x the tokens per second of batch 1).
        '''),
        code('''
            options = dict(reasoning="medium", max_new_tokens=120, temperature=0.0)
            started = time.perf_counter()
            alone = [model.chat(q, **options) for q in questions[:8]]
            alone_s = time.perf_counter() - started
            started = time.perf_counter()
            batched = model.chat(questions[:8], batch_size=8, **options)
            batched_s = time.perf_counter() - started
            tokens = sum(len(t.tokens) for t in batched)
            print(f"one at a time: {alone_s:.1f} s; as a batch of 8: {batched_s:.1f} s ({tokens} tokens)")
            print("same tokens:", all(a.tokens == b.tokens for a, b in zip(alone, batched, strict=True)))
            print("answers:", [t.final for t in batched[:4]])
        '''),
        md('''
            ## Router statistics over the set, split by channel

            Each Trace keeps, for every generated token, its channel (analysis = the chain of thought, final =
            the answer) and the experts each layer chose. Counting over all 24 conversations (4 rows at a time,
            so rows are refilled as conversations end) shows which experts the model leans on while it reasons
            and while it answers.
        '''),
        code('''
            traces = model.chat(questions, batch_size=4, **options)
            use = {channel: torch.zeros(L, E) for channel in ("analysis", "final")}
            for trace in traces:
                for t, channel in enumerate(trace.channels):
                    if channel in use:
                        use[channel][torch.arange(L)[:, None], trace.router_indices[t]] += 1
            share = {c: u / u.sum(dim=1, keepdim=True).clamp_min(1) for c, u in use.items()}  # per layer
            tokens = {c: int(u[0].sum()) // cfg.experts_per_token for c, u in use.items()}
            print("tokens per channel:", tokens)
            go.Figure(go.Heatmap(z=(share["analysis"] - share["final"]).numpy(), colorscale="RdBu", zmid=0,
                                 x=[f"e{e}" for e in range(E)], y=[f"layer {l}" for l in range(L)],
                                 colorbar=dict(title="analysis - final"))).update_layout(
                title="Share of each layer's routing: chain of thought minus answer", height=320)
        '''),
        md('''
            ## Thousands of prompts: collect

            ```
            python -m ossscope.collect --model nano --prompts prompts.jsonl --out runs/set --batch-size 16
            ```

            One JSONL line per prompt; one stats file (and, in `--mode traces`, one Trace) per prompt; a rerun
            skips what is done; `summary.json` has the expert counts per layer and the mean sink mass per head.
            `--batch-size` defaults to what free GPU memory holds (up to 64), and to 1 on a CPU. Greedy runs give
            the same files as one at a time; sampled runs in a batch share one generator seeded with `--seed`.
        '''),
    ]


NOTEBOOK_CELLS = {
    "02_router_decisions.ipynb": router_decisions,
    "03_attention_sinks.ipynb": attention_sinks,
    "04_reasoning_effort_and_cot.ipynb": reasoning_effort,
    "05_expert_ablation_and_steering.ipynb": ablation_and_steering,
    "06_tool_calls.ipynb": tool_calls,
    "07_real_checkpoints.ipynb": real_checkpoints,
    "08_agentic_tools.ipynb": agentic_tools,
    "09_many_prompts.ipynb": many_prompts,
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
