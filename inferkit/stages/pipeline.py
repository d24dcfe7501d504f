"""``inferkit run RECIPE``: the whole pipeline, resumable, each stage cached by its inputs.

Stages, in order: calibrate → sensitivity-scan (mixed-precision recipes) → quantize → distill
(when the recipe has a ``distill:`` section) → serve-test → pack. Serve-test runs before pack so
its report travels inside the final artifact; it loads the same weights and draft.

Each stage writes ``WORK/<stage>-<key>/``, where the key is a hash of the stage's settings, the
keys of the stages it reads, the source checkpoint's file hashes and inferkit's version. Stage
outputs are written to a temporary folder and renamed when complete, so a folder that exists is
finished: a rerun skips it, and a run killed in the middle of a stage redoes only that stage.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from inferkit.errors import InferkitError

STAGES = ("calibrate", "sensitivity-scan", "quantize", "distill", "serve-test", "pack")


@dataclass
class StageResult:
    stage: str
    status: str  # ran, cached, skipped, failed
    seconds: float = 0.0
    output: str = ""
    passed: bool | None = None
    detail: str = ""


@dataclass
class RunSummary:
    recipe: str
    work: str
    stages: list[StageResult] = field(default_factory=list)
    artifact: str | None = None

    @property
    def passed(self) -> bool:
        return all(s.passed is not False for s in self.stages) and all(s.status != "failed" for s in self.stages)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "work": self.work, "artifact": self.artifact, "passed": self.passed,
                "stages": [vars(s) for s in self.stages]}


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan_stages(recipe) -> list[str]:
    mixed = recipe.quantize.target_bpw is not None or recipe.quantize.max_cost is not None
    return [s for s in STAGES if (s != "sensitivity-scan" or mixed) and (s != "distill" or recipe.distill is not None)]


def run_pipeline(recipe_path: Path, work: Path, out: Path | None = None, from_stage: str | None = None,
                 only: str | None = None, overwrite: bool = False, log=lambda msg: None, progress=None) -> RunSummary:
    from inferkit import __version__
    from inferkit.config import load_recipe
    from inferkit.models.demo import resolve_model_arg
    from inferkit.models.loading import resolve_model_path
    from inferkit.stages.artifact import input_hashes

    recipe = load_recipe(recipe_path)
    if not recipe.model:
        raise InferkitError(f"recipe {recipe_path} names no model (add `model: PATH` or `model: demo`)")
    stages = plan_stages(recipe)
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in stages:
            raise InferkitError(f"{name} {value}: this recipe's stages are {', '.join(stages)}")
    if out is not None and out.exists() and not overwrite:
        raise InferkitError(f"output {out} already exists; pass --overwrite to replace it")
    model = resolve_model_arg(recipe.model, log=log)
    source = resolve_model_path(model)
    base = {"version": __version__, "model": input_hashes(source.folder, source.gguf_file)}
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(str(recipe_path), str(work))
    dirs: dict[str, Path] = {}
    keys: dict[str, str] = {}
    sections = recipe.to_dict()
    settings = {"calibrate": [sections["calibration"]],
                "sensitivity-scan": [sections["sensitivity"], sections["calibration"], sections["quantize"]],
                "quantize": [sections["quantize"], sections["calibration"]],
                "distill": [sections["distill"]],
                "serve-test": [sections["serve_test"]],
                "pack": [sections["pack"]]}
    reads = {"quantize": ["calibrate", "sensitivity-scan"], "serve-test": ["quantize", "distill"],
             "pack": ["quantize", "distill", "serve-test"], "sensitivity-scan": ["calibrate"]}
    force_from = stages.index(from_stage) if from_stage else len(stages)
    for i, stage in enumerate(stages):
        upstream = [keys[s] for s in reads.get(stage, []) if s in keys]
        keys[stage] = _key({**base, "stage": stage, "settings": settings[stage], "upstream": upstream})
        folder = work / f"{stage}-{keys[stage]}"
        dirs[stage] = folder
        selected = only is None or only == stage
        if not selected:
            if not folder.is_dir():
                raise InferkitError(f"--only {only} needs the {stage} stage's output; run the earlier stages first")
            summary.stages.append(StageResult(stage, "cached", output=str(folder)))
            continue
        if folder.is_dir() and i < force_from and only is None:
            summary.stages.append(StageResult(stage, "cached", output=str(folder), passed=_passed(stage, folder)))
            log(f"{stage}: done before ({folder.name}), skipped")
            continue
        log(f"{stage}: running → {folder.name}")
        start = time.perf_counter()
        try:
            _run_stage(stage, recipe, model, folder, dirs, progress)
        except InferkitError as exc:
            summary.stages.append(StageResult(stage, "failed", time.perf_counter() - start, str(folder), False, str(exc)))
            raise
        summary.stages.append(StageResult(stage, "ran", time.perf_counter() - start, str(folder), _passed(stage, folder)))
    final = dirs.get("pack")
    if final is not None and final.is_dir() and out is not None:
        import shutil

        from inferkit.artifacts import atomic_output_dir

        with atomic_output_dir(out, overwrite) as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(final, tmp)
        summary.artifact = str(out)
        if (recipe.pack or {}).get("archive"):
            from inferkit.stages.pack import write_archive

            write_archive(out)
    elif final is not None:
        summary.artifact = str(final)
    (work / "run-summary.json").write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _passed(stage: str, folder: Path) -> bool | None:
    if stage == "serve-test" and (folder / "report.json").is_file():
        return bool(json.loads((folder / "report.json").read_text()).get("passed"))
    return None


def _run_stage(stage: str, recipe, model: str, folder: Path, dirs: dict[str, Path], progress) -> None:
    if stage == "calibrate":
        from inferkit.stages.calibrate import run_calibrate

        run_calibrate(model, recipe.calibration, folder, overwrite=True, batch_size=recipe.quantize.batch_size,
                      progress=progress)
    elif stage == "sensitivity-scan":
        from inferkit.stages.sensitivity import run_scan

        run_scan(model, recipe, recipe.sensitivity, folder, overwrite=True, stats_dir=dirs.get("calibrate"),
                 progress=progress)
    elif stage == "quantize":
        from inferkit.stages.quantize import run_quantize

        run_quantize(model, recipe, folder, overwrite=True, stats_dir=dirs.get("calibrate"), progress=progress,
                     scan=dirs.get("sensitivity-scan"))
    elif stage == "distill":
        from inferkit.stages.distill import DistillConfig, run_distill

        opts = dict(recipe.distill)
        student_layers = opts.pop("student_layers", None)
        student = opts.pop("student", None)
        eval_prompts = opts.pop("eval_prompts", 0)
        eval_data = opts.pop("eval_data", "builtin")
        if student is None and student_layers is None:
            student_layers = 4
        run_distill(model, folder, DistillConfig(**opts), student=student, student_layers=student_layers, overwrite=True,
                    eval_prompts=eval_prompts, eval_data=eval_data, progress=progress)
    elif stage == "serve-test":
        from dataclasses import replace

        from inferkit.stages.serve_test import run_serve_test, write_reports

        cfg = recipe.serve_test
        if dirs.get("distill") is not None:
            cfg = replace(cfg, draft=str(dirs["distill"]))
        adapt = (lambda label, done, total: progress(done, total, label)) if progress else None  # its order
        report, checks = run_serve_test(dirs["quantize"], cfg, progress=adapt)
        write_reports(folder, report, checks, overwrite=True)
    elif stage == "pack":
        from inferkit.stages.pack import pack

        pack(dirs["quantize"], folder, draft=dirs.get("distill"), serve_test=dirs.get("serve-test"),
             archive=bool((recipe.pack or {}).get("archive", False)), overwrite=True)
