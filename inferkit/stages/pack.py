"""``inferkit pack``: the final artifact folder a serving team receives.

From a quantized artifact (checked with ``verify`` first): its weights, config and tokenizer;
``draft/`` (a draft model for speculative decoding, with its vocabulary map if reduced);
``reports/`` (serve-test report and JUnit, sensitivity scan, quality, any extra files); a
generated model card (``README.md``); and a new ``inferkit.json`` over every file. Written to
a temporary folder and renamed when complete; ``--archive`` also writes a ``.tar`` (``.tar.zst``
when the zstandard package is installed) whose first member is the manifest.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

from inferkit.artifacts import MANIFEST, atomic_output_dir, check_output_dir, write_manifest
from inferkit.errors import InferkitError


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _source_bytes(manifest: dict) -> int | None:
    src = Path((manifest.get("source") or {}).get("path", ""))
    folder = src if src.is_dir() else src.parent
    files = [folder / name for name in (manifest.get("source") or {}).get("inputs_sha256", {})
             if name.endswith((".safetensors", ".gguf", ".bin"))]
    return sum(f.stat().st_size for f in files) if files and all(f.is_file() for f in files) else None


def model_card(name: str, manifest: dict, weights: int, serve: dict | None, draft: dict | None) -> str:
    """The artifact's README.md; ``weights``: bytes of its model*.safetensors files."""
    layers = manifest.get("layers") or {}
    counts = Counter(layers.values())
    before = _source_bytes(manifest)
    recipe = manifest.get("recipe") or {}
    q = recipe.get("quantize") or {}
    lines = [f"# {name}", "",
             "A serving artifact made by [inferkit](https://github.com/inferkit): weights in the compressed-tensors "
             "`pack-quantized` format (transformers with `compressed-tensors`, and vLLM, load it as is).", "",
             "## Source", "",
             f"- checkpoint: `{(manifest.get('source') or {}).get('path', 'unknown')}`"]
    for f, digest in sorted(((manifest.get("source") or {}).get("inputs_sha256") or {}).items()):
        lines.append(f"  - `{f}` sha256 `{digest}`")
    lines += ["", "## Quantization", "",
              f"- method: {manifest.get('method', q.get('method', 'unknown'))}; recipe: bits {q.get('bits')}, "
              f"group size {q.get('group_size')}, symmetric {q.get('symmetric')}",
              f"- bits per weight (scales and zero points included): {manifest.get('bits_per_weight', 'unknown')}",
              f"- weights: {_human(weights)}" + (f" (source {_human(before)}, {before / weights:.2f}x smaller)" if before else ""),
              "", "| precision | layers |", "|---|---|"]
    lines += [f"| {fmt} | {n} |" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if serve:
        quality, load, memory = serve.get("quality") or {}, serve.get("load") or {}, serve.get("memory") or {}
        lines += ["", "## Measured (inferkit serve-test)", "",
                  f"- verdict: {'PASSED' if serve.get('passed') else 'FAILED'} on {serve.get('device')} "
                  f"({serve.get('threads')} threads, torch {serve.get('torch')})",
                  f"- perplexity {quality.get('perplexity', float('nan')):.3f} against the reference's "
                  f"{quality.get('reference_perplexity', float('nan')):.3f} ({quality.get('reference')}); greedy "
                  f"agreement {quality.get('agreement', float('nan')):.3f}",
                  f"- load test: {load.get('requests')} requests, {load.get('throughput_tok_s', float('nan')):.1f} "
                  f"generated tok/s, TTFT p50 {load.get('ttft_ms_p50', float('nan')):.0f} ms, inter-token p50 "
                  f"{load.get('itl_ms_p50', float('nan')):.1f} ms, {load.get('preemptions')} preemptions",
                  f"- memory: KV utilisation {memory.get('kv_utilisation', load.get('kv_utilisation', float('nan'))):.3f}",
                  "- full report: `reports/serve-test.json`, `reports/serve-test.junit.xml`"]
    if draft:
        lines += ["", "## Draft model (`draft/`)", "",
                  f"- {draft.get('layers')} decoder layers, vocabulary {draft.get('vocabulary')}"]
        acc = draft.get("acceptance_after")
        if acc:
            lines.append(f"- greedy acceptance at k=4 on held-out prompts: {acc.get('acceptance_rate', 0):.3f} "
                         f"(before distillation {(draft.get('acceptance_before') or {}).get('acceptance_rate', 0):.3f})")
        lines.append("- use: `LLM(path, draft=path + '/draft', num_speculative_tokens=k)`, "
                     "or `inferkit serve-test ARTIFACT` (uses it by default)")
    lines += ["", "## Checking and loading", "",
              "- `inferkit verify .` re-hashes every file against `inferkit.json` and checks the tensors against "
              "`config.json`",
              "- `AutoModelForCausalLM.from_pretrained(path)` with `compressed-tensors` installed; "
              "`vllm serve path` for production", ""]
    return "\n".join(lines)


def pack(artifact: Path, out: Path, draft: Path | None = None, serve_test: Path | None = None,
         reports: list[Path] = (), archive: bool = False, overwrite: bool = False) -> dict:
    from inferkit.stages.verify import verify_artifact

    artifact = Path(artifact)
    check_output_dir(out, overwrite)
    report = verify_artifact(artifact)
    if not report.ok:
        raise InferkitError(f"{artifact} fails verification ({len(report.errors)} problems; first: {report.errors[0]}); "
                            "run `inferkit verify` for the list")
    source = json.loads((artifact / MANIFEST).read_text())
    config = json.loads((artifact / "config.json").read_text())
    draft_info = None
    if draft is not None:
        draft = Path(draft)
        if not (draft / "config.json").is_file():
            raise InferkitError(f"draft {draft} is not a model folder (no config.json)")
        d_cfg = json.loads((draft / "config.json").read_text())
        if d_cfg.get("vocab_size") != config.get("vocab_size"):
            raise InferkitError(f"the draft's vocabulary has {d_cfg.get('vocab_size')} tokens, the model's "
                                f"{config.get('vocab_size')}: a draft must share the model's tokenizer")
        distill = json.loads((draft / "distill.json").read_text()) if (draft / "distill.json").is_file() else {}
        from inferkit.runtime.speculative import read_draft_vocab

        vocab = d_cfg.get("vocab_size")
        d2t = read_draft_vocab(draft, vocab)  # checked as the runtime will read it
        if d2t is not None:
            vocab = f"{len(d2t)} of {vocab} tokens"
        draft_info = {"layers": d_cfg.get("num_hidden_layers"), "vocabulary": vocab,
                      "acceptance_before": distill.get("acceptance_before"), "acceptance_after": distill.get("acceptance_after")}
    serve = None
    if serve_test is not None:
        serve_test = Path(serve_test)
        if not (serve_test / "report.json").is_file():
            raise InferkitError(f"{serve_test} has no report.json (pass the folder `inferkit serve-test -o` wrote)")
        serve = json.loads((serve_test / "report.json").read_text())
    for r in reports:
        if not Path(r).is_file():
            raise InferkitError(f"report {r} does not exist")
    with atomic_output_dir(out, overwrite) as tmp:
        for f in sorted(artifact.rglob("*")):
            rel = f.relative_to(artifact)
            if f.is_file() and rel.as_posix() != MANIFEST:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / rel)
        (tmp / "reports").mkdir(exist_ok=True)
        if draft is not None:
            shutil.copytree(draft, tmp / "draft", ignore=shutil.ignore_patterns(MANIFEST))
        if serve_test is not None:
            shutil.copy2(serve_test / "report.json", tmp / "reports" / "serve-test.json")
            if (serve_test / "junit.xml").is_file():
                shutil.copy2(serve_test / "junit.xml", tmp / "reports" / "serve-test.junit.xml")
        for r in reports:
            shutil.copy2(r, tmp / "reports" / Path(r).name)
        for name in ("scan.json", "scan.png", "plan.json"):  # what quantize --target-bpw carried
            if (tmp / name).is_file() and not (tmp / "reports" / name).exists():
                shutil.copy2(tmp / name, tmp / "reports" / name)
        weights = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
        card = model_card(out.name, source, weights, serve, draft_info)
        (tmp / "README.md").write_text(card)
        manifest = {key: value for key, value in source.items() if key not in ("files", "manifest_sha256")}
        manifest.update(stage="pack", quantize_manifest_sha256=source.get("manifest_sha256"),
                        draft=draft_info, serve_test_passed=serve.get("passed") if serve else None)
        manifest = write_manifest(tmp, manifest)
    if archive:
        write_archive(out)
    return manifest


def write_archive(folder: Path) -> Path:
    """``folder.tar`` (``.tar.zst`` with zstandard), the manifest first, written atomically."""
    try:
        import zstandard
    except ImportError:
        zstandard = None
    target = folder.with_name(folder.name + (".tar.zst" if zstandard else ".tar"))
    tmp = target.with_name(f".{target.name}.tmp")
    members = [folder / MANIFEST] + sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    with open(tmp, "wb") as raw:
        stream = zstandard.ZstdCompressor(level=10).stream_writer(raw, closefd=False) if zstandard else raw
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for p in members:
                info = tar.gettarinfo(str(p), arcname=f"{folder.name}/{p.relative_to(folder).as_posix()}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0  # reproducible archives
                with open(p, "rb") as fh:
                    tar.addfile(info, fh)
        if zstandard:
            stream.close()
    tmp.replace(target)
    return target
