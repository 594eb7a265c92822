"""What every benchmark shares: loading a bundled (or local) model and the provenance lines of a run."""

from __future__ import annotations

import os
import platform

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from jtc_lens.harness import bundled  # noqa: E402
from jtc_lens.harness.corpora import get_corpus  # noqa: E402
from jtc_lens.harness.models import build_lens_model  # noqa: E402
from jtc_lens.harness.provenance import model_record, versions  # noqa: E402


def model_folder(name: str) -> str:
    return str(bundled.prepare(name)) if bundled.is_bundled(name) else name


def load_lens(name: str, dtype: torch.dtype = torch.float32):
    folder = model_folder(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    return build_lens_model(model, AutoTokenizer.from_pretrained(folder)), folder


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance_lines(model: str, folder: str, corpus: str | None, extra: dict | None = None) -> list[str]:
    """Markdown lines naming the machine, model (with its source hash), corpus hash, settings and versions."""
    record = model_record(folder) or {}
    model_hash = record.get("gguf_sha256") or record.get("source_sha256") or "(no record: " + folder + ")"
    lines = [
        f"- machine: {cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"{platform.system()} {platform.release()}",
        f"- model: {model} (source sha256 {model_hash})",
        *([f"- corpus: {corpus} (sha256 {get_corpus(corpus).source_hash})"] if corpus else []),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return lines


def plain_pass_seconds(lens, encoded: list, batch_size: int) -> float:
    """One forward pass of the headless model over ``encoded`` in batches, as the studies batch them (seconds)."""
    import time

    from jtc_lens.harness.encoding import batches

    pad = lens.pad_id
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(encoded, batch_size, pad):
            lens.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return time.perf_counter() - start


def timed_against_plain(lens, encoded: list, batch_size: int, run) -> tuple[float, float]:
    """(seconds of ``run()``, the best of four plain passes: three before it and one after, in case the machine was
    busier before it)."""
    import time

    one_pass = min(plain_pass_seconds(lens, encoded, batch_size) for _ in range(3))
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return seconds, min(one_pass, plain_pass_seconds(lens, encoded, batch_size))
