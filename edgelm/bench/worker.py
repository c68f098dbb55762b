"""One bench row in a fresh process: ``python -m edgelm.bench.worker SPEC.json OUT.json``.

A row is one model on one runtime at one thread count. Speed is measured first and peak RSS read right after, so
the quality pass (which holds the reference's logits) doesn't count toward memory.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)


def prompt_ids(rt, data: tuple[str, ...], split: str, n: int) -> list[int]:
    """The first ``n`` tokens of the split's text, in this runtime's tokenizer (same text for every row)."""
    from edgelm.data.corpus import Corpus, CorpusSpec

    text = ""
    for doc in Corpus(CorpusSpec(data)).texts(split):
        text += doc
        if len(text) > 8 * n:
            ids = rt.encode(text)
            if len(ids) >= n:
                return ids[:n]
    ids = rt.encode(text)
    if len(ids) < n:
        raise EdgelmError(f"the {split} split has only {len(ids)} tokens; lower --prompt-len")
    return ids[:n]


def reference_logits(spec: dict[str, Any]) -> dict[str, Any]:
    """Eval sequences [N, T] and the reference's logits [N, T, V], written as .npy for the rows to compare with."""
    import numpy as np

    from edgelm.data.corpus import Corpus, CorpusSpec, eval_sequences
    from edgelm.runtimes.api import load

    rt = load(spec["model"], runtime="torch", threads=spec.get("threads"))
    seqs = eval_sequences(Corpus(CorpusSpec(spec["data"])), rt.hf_tokenizer, spec["split"], spec["seqlen"],
                          spec["seqs"])
    if len(seqs) == 0:
        raise EdgelmError(f"the {spec['split']} split has no {spec['seqlen']}-token sequence; lower --eval-seqlen")
    out = Path(spec["out"])
    np.save(out / "ids.npy", seqs)
    ref = None
    for i, s in enumerate(seqs):
        row = rt.logits(s.tolist())  # [T, V]
        if ref is None:
            ref = np.lib.format.open_memmap(out / "logits.npy", mode="w+", dtype=np.float32, shape=(len(seqs), *row.shape))
        ref[i] = row
    ref.flush()
    return {"seqs": len(seqs), "seqlen": int(seqs.shape[1]), "vocab": int(ref.shape[-1])}


def bench_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, then ``repeat`` timed generations; optionally overhead and quality."""
    import numpy as np

    from edgelm.metrics import (
        compare_logits,
        mean_std,
        peak_rss_bytes,
        tokens_per_second,
    )
    from edgelm.runtimes.api import load
    from edgelm.runtimes.sampling import GenerationConfig

    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    rt = load(spec["model"], runtime=spec["runtime"], threads=spec["threads"])
    row.update(load_s=time.perf_counter() - t0, runtime=rt.name, threads=rt.threads, size_bytes=rt.model_bytes)
    ids = prompt_ids(rt, tuple(spec["data"]), spec["split"], spec["prompt_len"])
    gen = spec["gen_len"]
    cfg = GenerationConfig(max_new_tokens=gen, min_new_tokens=gen)
    rt.generate(ids, cfg.with_options(max_new_tokens=min(gen, 8), min_new_tokens=min(gen, 8)))  # warm-up
    pp, tg, ttft = [], [], []
    for _ in range(spec["repeat"]):
        g = rt.generate(ids, cfg)
        pp.append(tokens_per_second(len(ids), g.prefill_s))
        tg.append(g.decode_tokens_per_s)
        ttft.append(g.ttft_s * 1e3)
    for name, vals in (("pp_tps", pp), ("tg_tps", tg), ("ttft_ms", ttft)):
        ms = mean_std(vals)
        row[f"{name}_mean"], row[f"{name}_std"] = ms.mean, ms.std
    if spec.get("sustained"):  # decode again and again: each run's tok/s, in order (a fall is throttling)
        row["tg_tps_runs"] = [rt.generate(ids, cfg).decode_tokens_per_s for _ in range(spec["sustained"])]
    row["peak_rss_bytes"] = peak_rss_bytes()
    if spec.get("overhead") and hasattr(rt, "native_greedy"):
        ours, bare = [], []
        for _ in range(spec["repeat"]):
            t = time.perf_counter()
            rt.generate(ids, cfg)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            rt.native_greedy(ids, gen)
            bare.append(time.perf_counter() - t)
        row["overhead_ms_per_token"] = (min(ours) - min(bare)) / gen * 1e3
        row["overhead_pct"] = 100.0 * (min(ours) - min(bare)) / min(bare)
    ref = spec.get("reference_dir")
    if ref:
        seqs = np.load(Path(ref) / "ids.npy")
        ref_logits = np.load(Path(ref) / "logits.npy", mmap_mode="r")  # [N, T, V]

        def pairs():
            for i, s in enumerate(seqs):
                cand = rt.logits(s.tolist())  # [T, V]
                if cand.shape[-1] != ref_logits.shape[-1]:
                    raise EdgelmError(f"vocab of {cand.shape[-1]} differs from the reference's {ref_logits.shape[-1]}; "
                                      "pass a --reference with the same tokenizer")
                yield s, ref_logits[i], cand

        q = compare_logits(pairs())
        row.update(ppl=q.ppl, ppl_ref=q.ppl_ref, dppl=q.dppl, kld=q.kld, top1_agree=q.top1_agree)
    rt.close()
    return row


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        result = reference_logits(spec) if spec.get("kind") == "reference" else bench_row(spec)
    except EdgelmError as e:
        result = {"error": str(e)}
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
