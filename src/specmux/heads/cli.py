"""``specmux heads train | list``: registered on the main app by :mod:`specmux.cli`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

heads_app = typer.Typer(help="Draft heads on the target's hidden states (train, list).",
                        no_args_is_help=True)

DEFAULT_NUM_EVAL = 40  # eval prompts kept out of the corpus (bench --prompts-per-domain <= it)


@heads_app.command("train")
def train_command(
    domains: Annotated[list[str] | None, typer.Option(
        "--domain", help="Domain to train a head for (repeatable): code, math, chat.")] = None,
    target: Annotated[str, typer.Option(help="Target model (HF dir, .gguf, embedded:NAME).")
                      ] = "embedded:qwen2.5-coder-1.5b",
    dtype: Annotated[str, typer.Option(help="Target dtype: bfloat16 (the bench default) or "
                                       "float32.")] = "bfloat16",
    num_eval: Annotated[int, typer.Option(help="Eval prompts per domain kept out of the corpus "
                                          "(same split as bench with this many prompts).")
                        ] = DEFAULT_NUM_EVAL,
    corpus: Annotated[list[Path] | None, typer.Option(
        "--corpus", help="More training text (repeatable): a text or .jsonl file or a "
        "directory of sources, cut into pieces of about 3 x --max-tokens characters and "
        "shuffled; used after the domain's own corpus.")] = None,
    max_texts: Annotated[int, typer.Option(help="Corpus texts (or pieces) used at most.")
                         ] = 40,
    self_distill: Annotated[int, typer.Option(
        "--self-distill", help="Also train on the target's own greedy answers to up to this "
        "many corpus prompts (never an eval prompt): the text the head drafts at run time. "
        "Generated on llama.cpp for a GGUF target (2-3.5 s a prompt on two cores here), "
        "cached; 0 = corpus text only.")] = 144,
    distill_tokens: Annotated[int, typer.Option(help="Tokens per self-distilled answer.")
                              ] = 48,
    distill_generator: Annotated[str, typer.Option(
        help="Who writes the answers: auto (llama.cpp for a GGUF target), llama.cpp or "
        "transformers.")] = "auto",
    max_tokens: Annotated[int, typer.Option(help="Tokens per text at most.")] = 384,
    inner: Annotated[int, typer.Option(help="Head MLP width.")] = 1024,
    draft_vocab: Annotated[int, typer.Option(help="Draft vocabulary size (0 = full).")] = 32768,
    depth: Annotated[int, typer.Option(help="Unrolled drafting steps per sample.")] = 2,
    epochs: Annotated[int, typer.Option(help="Passes over the corpus.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Positions per step.")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    max_minutes: Annotated[float, typer.Option(help="Training wall clock per head (the "
                                               "extraction is extra).")] = 3.5,
    seed: Annotated[int, typer.Option(help="Data split and training seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output directory (default "
                                             "<cache>/heads).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    extract_only: Annotated[bool, typer.Option(help="Only extract (and cache) the hidden "
                                               "states; train later.")] = False,
    install: Annotated[bool, typer.Option(help="Install embedded models if missing.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Extract target hidden states from each domain's corpus (cached, resumable), train one
    head per domain and save it as DIR/head-DOMAIN.{safetensors,json}.  With --self-distill N
    the target first answers N corpus prompts and the head trains on those answers too."""
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from specmux.cli_common import console, setup_logging, user_errors

    setup_logging(verbose)
    with user_errors():
        from specmux.bench.datasets import load_domain
        from specmux.bench.runner import DTYPES
        from specmux.errors import ConfigError
        from specmux.heads.distill import GENERATORS, check_request
        from specmux.heads.distill import self_distill as distill
        from specmux.heads.extract import corpus_chunks, extract, extraction_key, load_shards
        from specmux.heads.store import heads_dir, save_head
        from specmux.heads.train import TrainConfig, train_head
        from specmux.models import cache_dir, load_model

        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        if max_texts < 0 or max_tokens < 4 or self_distill < 0:
            raise ConfigError("--max-texts and --self-distill must be >= 0 and --max-tokens "
                              ">= 4")
        if distill_generator not in GENERATORS:
            raise ConfigError(f"unknown --distill-generator {distill_generator!r}; known: "
                              f"{', '.join(GENERATORS)}")
        if max_texts == 0 and self_distill == 0:
            raise ConfigError("nothing to train on: give --max-texts or --self-distill > 0")
        if threads is not None:
            if threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        cfg = TrainConfig(inner=inner, draft_vocab=draft_vocab, depth=depth, epochs=epochs,
                          batch_size=batch_size, lr=lr, max_seconds=max_minutes * 60, seed=seed)
        directory = out or heads_dir()
        splits = {d: load_domain(d, num_eval=num_eval, seed=seed) for d in domains or ["code"]}
        for split in splits.values():  # before loading the target
            check_request(split, self_distill, distill_tokens)
        extra = corpus_chunks(corpus or [], max_tokens, seed)
        with console.status("loading the target"):
            model, tok = load_model(target, dtype=DTYPES[dtype], install=install)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        for domain, split in splits.items():
            seqs, distill_meta = [], {}
            if self_distill:
                with Progress(*columns, console=console) as progress:
                    seqs, distill_meta = distill(
                        split, tok, model, target, num_prompts=self_distill,
                        max_new_tokens=distill_tokens, generator=distill_generator,
                        threads=threads, on_item=_answer_progress(
                            progress, f"{domain}: answer",
                            min(self_distill, len(split.prompts))))
            texts = [*seqs, *[*split.corpus, *extra][:max_texts]]
            key = extraction_key(target, dtype, max_tokens)
            where = cache_dir() / "extract" / f"{domain}-{key}"
            t0 = time.perf_counter()
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{domain}: extract", total=len(texts), info="")
                seen = {"tokens": 0}

                def on_text(n: int, done: int, task=task, progress=progress, seen=seen) -> None:
                    seen["tokens"] += n
                    progress.update(task, completed=done, info=f"{seen['tokens']} tokens")

                paths = extract(model, tok, texts, where, max_tokens=max_tokens, on_text=on_text)
            extract_s = time.perf_counter() - t0
            if extract_only:
                console.print(f"{domain}: {len(paths)} texts extracted in {extract_s:.0f} s "
                              f"-> {where}", highlight=False)
                continue
            shards = load_shards(paths)
            with Progress(*columns, console=console) as progress:
                task = progress.add_task(f"{domain}: train", total=None, info="")

                def on_step(step: int, total: int, loss: float, task=task,
                            progress=progress) -> None:
                    progress.update(task, completed=step, total=total, info=f"loss {loss:.3f}")

                meta = {"domain": domain, "target": target, "dtype": dtype, "seed": seed,
                        "num_eval": num_eval, "corpus_texts": len(texts) - len(seqs),
                        **distill_meta,
                        "extra_corpus": [str(p) for p in corpus or []],
                        "corpus_tokens": int(sum(len(s.ids) for s in shards)),
                        "extract_seconds": round(extract_s, 1), "extract_dir": str(where)}
                head = train_head(model, shards, cfg, meta=meta, on_step=on_step)
            path = save_head(head, directory, f"head-{domain}")
            m = head.meta
            console.print(
                f"{domain}: {m['corpus_tokens']} tokens, "
                + (f"answers {m['distill_seconds']:.0f} s, " if seqs else "")
                + f"extract {extract_s:.0f} s, train "
                f"{m['train_seconds']:.0f} s ({m['steps']}/{m['steps_planned']} steps), "
                f"held-out agreement by depth {m['holdout_agreement']} -> {path}",
                highlight=False)


def _answer_progress(progress: Any, label: str, total: int) -> Callable[[int, int], None]:
    """A rich progress task for the self-distilled answers: ``on_item(tokens, done)``."""
    task = progress.add_task(label, total=total, info="")
    made = {"tokens": 0}

    def on_item(n: int, done: int) -> None:
        made["tokens"] += n
        progress.update(task, completed=done, info=f"{made['tokens']} tokens")

    return on_item


@heads_app.command("list")
def list_command(
    directory: Annotated[Path | None, typer.Option("--dir", help="Heads directory.")] = None,
) -> None:
    """List the trained heads (name, domain, target, size, held-out agreement)."""
    from specmux.cli_common import console, user_errors

    with user_errors():
        from specmux.heads.store import find_heads, load_head

        found = find_heads(directory)
        if not found:
            console.print("no heads found")
        for name, path in found.items():
            m = load_head(path).meta
            console.print(f"{name}  domain={m.get('domain')}  target={m.get('target')}  "
                          f"params={m.get('params')}  draft_vocab={m.get('draft_vocab_size')}  "
                          f"agreement={m.get('holdout_agreement')}  {path}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``heads`` command group to ``app``."""
    app.add_typer(heads_app, name="heads")
