"""`vqtok run CONFIG`: the whole path in one object: images -> tokenizer -> token dataset -> prior -> samples.

    cfg = PipelineConfig.load("examples/pipeline-fashion-mnist.yaml")   # or PipelineConfig(out=..., data=[...])
    result = Pipeline(cfg).run()              # every stage; a stage whose output exists is skipped
    Pipeline(cfg).run(stages=["sample"])      # one stage (its inputs must exist)

Stages and where they write (under cfg.out):
    convert      shards/          the images as WebDataset shards (only with convert_shard_size)
    train        tokenizer-run/   `vqtok train-vqvae` (tokenizer-run/tokenizer is the bundle)
    tokenize     tokens/          `vqtok tokenize` (captions and metadata as the tokenize section says)
    train-text-tokenizer
                 text-tokenizer/  `vqtok train-text-tokenizer` on the tokens' captions (only with a
                                  `text_tokenizer:` section: vocab_size, max_captions); the export and the
                                  prior then use its tokenizer.json
    export-lm    export/          `vqtok export-lm` (only with an `export:` section: text_tokenizer, order, pack, ...)
    train-prior  prior/           `vqtok train-prior`
    sample       samples.png      `vqtok sample`

Each stage calls the same function as its CLI command, with that command's config built from the
section of the same name ("train", "tokenize", "prior", "sample": any option of that command, by
field name; the export's from "export", the text tokenizer's from "text_tokenizer"). A text prior:
`text_tokenizer: {vocab_size: 512}` (a BPE fitted on the captions; or, without that section,
`prior: {text_tokenizer: bytes}`), `prior: {order: both}` and `sample: {prompts: ["a dark ankle
boot", ...]}`. Both models' options nest under `model:` (`train: {model: {codebook_size: 512}}`,
`prior: {model: {n_layer: 8}}`); files written when the prior's were flat (`prior: {n_layer: 8}`)
still load. The resolved config is saved as OUT/pipeline.json, and each job saves its own next to
its outputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..models.config import Config, ConfigError, option
from ..pipeline.sources import split_patterns
from .options import Command, job_main, load_config_file
from .rundir import save_json
from .progress import fmt_duration
from .export_lm import ExportLMConfig, run as run_export
from .sample import SampleConfig, sample
from .tokenize import TokenizeConfig, run as run_tokenize
from .train_prior import PriorTrainConfig, train_prior
from .train_text_tokenizer import TextTokenizerConfig, run as run_text_tokenizer
from .train_vqvae import TrainConfig, train_vqvae

STAGES = ("convert", "train", "tokenize", "train-text-tokenizer", "export-lm", "train-prior", "sample")
OPTIONAL = {"convert": "convert_shard_size", "train-text-tokenizer": "text_tokenizer", "export-lm": "export"}  # run when set
OUTPUT_NEUTRAL = {"address", "workers", "cpus_per_worker", "gpus_per_worker", "threads", "threads_per_worker",
                  "device", "log_every", "progress_seconds", "verbose", "max_failures", "keep_checkpoints",
                  "checkpoint_every", "lease_seconds", "max_failure_fraction", "eval_every", "eval_rows",
                  "train_eval_rows"}  # options that change neither what a stage writes nor its model
OUTPUT_NEUTRAL_IN = {"tokenize": {"batch_size"}}  # tokens do not depend on the encoder batch (position-fixed batches)
SECTION = {"train-text-tokenizer": "text_tokenizer", "export-lm": "export", "train-prior": "prior"}  # else the stage's name
_FIXED = {  # options each stage takes from the pipeline itself, not from its section
    "train": {"data", "out", "val_data"},
    "tokenize": {"tokenizer", "data", "out"},
    "text_tokenizer": {"tokens", "out"},
    "export": {"tokens", "out"},
    "prior": {"tokens", "out", "val_tokens"},
    "sample": {"prior", "out"},
}


@dataclass(kw_only=True)
class PipelineConfig(Config):
    WHAT = "pipeline"
    out: str = option("", "the pipeline's directory: every stage writes under it")
    data: list[str] = option(help="images: the tokenizer trains on them and they are tokenized", factory=list)
    val_data: list[str] = option(help="held-out images: tokenizer metrics, the prior's bits per token", factory=list)
    convert_shard_size: int = option(0, "> 0: first write the data as WebDataset shards of this many images")
    address: str | None = option(None, "a Ray cluster for every Ray stage (default: an embedded local Ray)")
    train: dict = option(help="train-vqvae options (model: the model's options)", factory=dict)
    tokenize: dict = option(help="tokenize options", factory=dict)
    prior: dict = option(help="train-prior options (model: the prior's model options)", factory=dict)
    sample: dict = option(help="sample options", factory=dict)
    text_tokenizer: dict = option(help="train-text-tokenizer options (vocab_size, max_captions): a byte-level BPE "
                                       "fitted on the tokens' captions, which the export and the prior then use; no "
                                       "section, no such stage", factory=dict)
    export: dict = option(help="export-lm options (text_tokenizer, order, pack, ...): the token dataset as LM rows; "
                               "no section, no export", factory=dict)

    def __post_init__(self):
        self.data = split_patterns(self.data) if self.data else []
        self.val_data = split_patterns(self.val_data) if self.val_data else []
        if not self.out:
            raise ConfigError("pipeline: `out` is required (the directory every stage writes under)")
        if not self.data:
            raise ConfigError("pipeline: `data` is required (images: paths or URL patterns)")
        if "://" in self.out and not self.out.startswith("file://"):
            raise ConfigError(f"pipeline: out {self.out}: a pipeline writes under a local (or shared, mounted) "
                              f"directory; the data may be URLs, and each job on its own (train-vqvae, tokenize, "
                              f"train-prior) also writes to object-store URLs")
        if self.convert_shard_size < 0:
            raise ConfigError(f"pipeline: convert_shard_size {self.convert_shard_size}: 0 (off) or more")
        for section in ("train", "tokenize", "text_tokenizer", "prior", "sample", "export"):
            value = getattr(self, section)
            if not isinstance(value, dict):
                raise ConfigError(f"pipeline: `{section}` must be a mapping of {section} options, got {value!r}")
            fixed = sorted(_FIXED[section] & set(value))
            if fixed:
                raise ConfigError(f"pipeline.{section}: {fixed} are set by the pipeline (from out, data, val_data); "
                                  f"remove them from the {section} section")
            if self.text_tokenizer and section in ("prior", "export") and "text_tokenizer" in value:
                raise ConfigError(f"pipeline.{section}: text_tokenizer {value['text_tokenizer']!r}: with a "
                                  f"`text_tokenizer:` section the pipeline's own ({self.text_tokenizer_file}) is used; "
                                  f"remove it from the {section} section, or remove the text_tokenizer section")
        # build every stage's config now: a bad option fails here, named, before hours of training
        for stage in STAGES[1:]:
            if self.runs(stage):
                self.stage_config(stage)

    def runs(self, stage: str) -> bool:
        """Is this stage part of this pipeline (the optional ones only with their section or setting)?"""
        return bool(getattr(self, OPTIONAL[stage])) if stage in OPTIONAL else stage in STAGES

    # --- where things go ----------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.out)

    def path(self, stage: str) -> Path:
        return self.root / {"convert": "shards", "train": "tokenizer-run", "tokenize": "tokens",
                            "train-text-tokenizer": "text-tokenizer", "export-lm": "export", "train-prior": "prior",
                            "sample": "samples.png"}[stage]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path("train") / "tokenizer"

    @property
    def text_tokenizer_file(self) -> Path:
        return self.path("train-text-tokenizer") / "tokenizer.json"

    def _text(self, opts: dict) -> dict:
        """A stage's options with the pipeline's trained text tokenizer, where it has one."""
        return opts | {"text_tokenizer": str(self.text_tokenizer_file)} if self.text_tokenizer else opts

    def _inputs(self) -> list[str]:
        return [str(self.path("convert"))] if self.convert_shard_size else self.data

    def stage_config(self, stage: str):
        """The job config a stage runs with."""
        try:
            if stage == "train":
                opts = dict(self.train)
                opts.setdefault("address", self.address)
                return TrainConfig.from_dict({**opts, "data": self._inputs(), "out": str(self.path("train")),
                                              "val_data": self.val_data}, where="train config")
            if stage == "tokenize":
                opts = dict(self.tokenize)
                opts.setdefault("address", self.address)
                return TokenizeConfig.from_dict({**opts, "tokenizer": str(self.tokenizer_dir), "data": self._inputs(),
                                                 "out": str(self.path("tokenize"))})
            if stage == "train-text-tokenizer":
                return TextTokenizerConfig.from_dict({**self.text_tokenizer, "tokens": str(self.path("tokenize")),
                                                      "out": str(self.text_tokenizer_file)})
            if stage == "train-prior":
                opts = self._text(dict(self.prior))
                opts.setdefault("address", self.address)
                return PriorTrainConfig.from_dict({**opts, "tokens": [str(self.path("tokenize"))],
                                                   "out": str(self.path("train-prior")),
                                                   "val_tokens": [str(self.root / "val-tokens")] if self.val_data else []})
            if stage == "sample":
                return SampleConfig.from_dict({**self.sample, "prior": str(self.path("train-prior")),
                                               "out": str(self.path("sample"))})
            if stage == "export-lm":
                opts = self._text(dict(self.export))
                opts.setdefault("address", self.address)
                return ExportLMConfig.from_dict({**opts, "tokens": str(self.path("tokenize")),
                                                 "out": str(self.path("export-lm"))})
        except ConfigError as e:
            raise ConfigError(f"pipeline.{SECTION.get(stage, stage)}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"pipeline.{SECTION.get(stage, stage)}: {e}") from None
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")

    # --- files ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str) -> "PipelineConfig":
        """From a YAML (.yaml/.yml) or JSON file."""
        return cls.from_dict(load_config_file(path))


@dataclass
class PipelineResult:
    out: str
    tokenizer: str
    tokens: str
    prior: str
    samples: str
    reconstructions: str
    ran: list[str]  # stages run this time
    skipped: list[str]  # stages whose output existed
    seconds: float
    results: dict = field(default_factory=dict)  # stage -> that job's result object
    text_tokenizer: str | None = None  # the trained tokenizer.json (with a text_tokenizer section)
    export: str | None = None  # the LM export (with an export section)


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def done(self, stage: str) -> bool:
        """Has this stage's output been written completely (so a run can skip it)?"""
        c = self.cfg
        if stage == "convert":
            return not c.convert_shard_size or (c.path("convert") / "_done.json").is_file()
        if stage == "train":
            return _finished(c.path("train") / "metrics.json", c.stage_config("train").steps)
        if stage == "tokenize":
            from ..pipeline.sources import list_units
            from ..pipeline.token_dataset import TokenDataset
            from ..pipeline.token_format import input_changed

            try:
                committed = TokenDataset(c.path("tokenize")).committed
            except FileNotFoundError:
                return False
            # done when every input unit is committed as it is now (an input changed since is not)
            return all(u.url in committed and not input_changed(committed[u.url], u) for u in list_units(c._inputs()))
        if stage == "train-text-tokenizer":
            return _fitted(c.path("train-text-tokenizer"), c.stage_config(stage))
        # the export and a text prior count as done only when made with their text tokenizer as it is now
        if stage == "export-lm":
            text_id = _text_id(c.stage_config(stage).text_tokenizer)
            return (text_id is not None and _made_with(c.path(stage)) == text_id
                    and _exported(c.path(stage), c.path("tokenize")))
        if stage == "train-prior":
            cfg = c.stage_config(stage)
            return (_finished(c.path(stage) / "metrics.json", cfg.steps)
                    and _made_with(c.path(stage)) == (_text_id(cfg.text_tokenizer) if cfg.text_tokenizer else None))
        if stage == "sample":
            return c.path("sample").is_file()
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")

    def changed(self, stage: str) -> list[str]:
        """The options a stage's existing output was made with that differ from the config now
        ("name old -> new"), from the config its job saved beside the output; options that do not
        change an output (workers, devices, logging) are left out. The text tokenizer's stage is
        redone on a change instead, so it has none."""
        c = self.cfg
        saved_at = {"train": c.path("train") / "config.json", "tokenize": c.path("tokenize") / "_tokenize_config.json",
                    "export-lm": c.path("export-lm") / "_export.json", "train-prior": c.path("train-prior") / "config.json",
                    "sample": c.path("sample").with_suffix(".json")}.get(stage)
        if saved_at is None:
            return []
        saved = _read_json(saved_at)
        if stage == "export-lm":
            saved = saved.get("options", {})
        now = json.loads(json.dumps(c.stage_config(stage).to_dict(), default=str))
        # what the pipeline sets itself (paths; the text tokenizer, whose id done() compares) is not an option here
        ignore = OUTPUT_NEUTRAL | OUTPUT_NEUTRAL_IN.get(stage, set()) | _FIXED.get(SECTION.get(stage, stage), set())
        return _differences(saved, now, ignore | ({"text_tokenizer"} if c.text_tokenizer else set()))

    def run(self, stages: list[str] | None = None, *, force: bool = False) -> PipelineResult:
        """Run the stages in order (all by default), skipping those already done unless force."""
        c = self.cfg
        todo = list(stages or STAGES)
        bad = [s for s in todo if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
        c.root.mkdir(parents=True, exist_ok=True)
        save_json(c.to_dict(), c.root / "pipeline.json")
        t0 = time.time()
        ran, skipped, results = [], [], {}
        for stage in STAGES:
            if stage not in todo:
                continue
            if not c.runs(stage):
                continue
            if not force and self.done(stage):
                print(f"vqtok pipeline: {stage}: output exists ({c.path(stage)}), skipping", flush=True)
                changed = self.changed(stage)
                if changed:
                    how = (f"run the stage with force (`vqtok run CONFIG --stages {stage} --force`)" if stage == "sample"
                           else f"delete {c.path(stage)} and run again")
                    print(f"vqtok pipeline: {stage}: note: that output was made with other options ({'; '.join(changed)}); "
                          f"to make it with these, {how}", flush=True)
                skipped.append(stage)
                continue
            print(f"vqtok pipeline: {stage} -> {c.path(stage)}", flush=True)
            t = time.time()
            results[stage] = self._run_stage(stage)
            print(f"vqtok pipeline: {stage} done in {fmt_duration(time.time() - t)}", flush=True)
            ran.append(stage)
        res = PipelineResult(str(c.root), str(c.tokenizer_dir), str(c.path("tokenize")), str(c.path("train-prior")),
                             str(c.path("sample")), str(c.path("train") / "reconstructions.png"), ran, skipped,
                             time.time() - t0, results,
                             str(c.text_tokenizer_file) if c.text_tokenizer else None,
                             str(c.path("export-lm")) if c.export else None)
        print(summary(res), flush=True)
        return res

    def _fit_text_tokenizer(self):
        """Fit the text tokenizer. A refit goes to text-tokenizer/candidate/ first: when it differs from
        the file the export or the prior were made with, it is refused (their ids would not be the new
        tokenizer's) and the file stays; otherwise it replaces the file."""
        c = self.cfg
        cfg, file = c.stage_config("train-text-tokenizer"), c.text_tokenizer_file
        old = _text_id(str(file))
        if old is None:
            r = run_text_tokenizer(cfg)
        else:
            candidate = file.parent / "candidate" / file.name
            r = run_text_tokenizer(dataclasses.replace(cfg, out=str(candidate)))
            users = [str(c.path(s)) for s in ("export-lm", "train-prior") if _made_with(c.path(s)) == old]
            if r.id != old and users:
                shutil.rmtree(candidate.parent)
                before = _read_json(file.parent / "_done.json").get("options")
                raise ConfigError(
                    f"pipeline.text_tokenizer: these options fit another text tokenizer ({r.id[:23]}...) than the one "
                    f"{' and '.join(users)} were made with ({old[:23]}..., {file}"
                    + (f", from {json.dumps(before)}" if before else "") + "): their text ids are that one's. Keep "
                    f"its options, or delete {' and '.join(users)} to make them again with the new one")
            os.replace(candidate, file)
            shutil.rmtree(candidate.parent)
            r.out = str(file)
            print(f"vqtok pipeline: train-text-tokenizer: {file} "
                  + ("is the same file as before" if r.id == old else "replaced (nothing was made with the old one)"),
                  flush=True)
        save_json({"id": r.id, "options": _text_options(cfg), "captions": r.captions}, file.parent / "_done.json")
        return r

    def _run_stage(self, stage: str):
        c = self.cfg
        if stage == "convert":
            from ..pipeline.convert import convert

            r = convert(c.data, str(c.path("convert")), shard_size=c.convert_shard_size)
            save_json({"images": r.images, "shards": r.shards}, c.path("convert") / "_done.json")
            return r
        if stage == "train":
            return train_vqvae(c.stage_config("train"))
        if stage == "tokenize":
            r = run_tokenize(c.stage_config("tokenize"))
            if c.val_data:  # held-out images, tokenized for the prior's bits per token
                val = c.stage_config("tokenize")
                val.data, val.out = c.val_data, str(c.root / "val-tokens")
                run_tokenize(val)
            return r
        if stage == "train-text-tokenizer":
            return self._fit_text_tokenizer()
        if stage == "export-lm":
            return run_export(c.stage_config("export-lm"))
        if stage == "train-prior":
            return train_prior(c.stage_config("train-prior"))
        if stage == "sample":
            return sample(c.stage_config("sample"))
        raise ConfigError(f"unknown stage {stage!r}")


def _read_json(path: Path) -> dict:
    """A JSON file a stage wrote; {} when it is not there (or not whole)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _finished(metrics: Path, steps: int) -> bool:
    return _read_json(metrics).get("steps") == steps


def _fitted(out: Path, cfg: TextTokenizerConfig) -> bool:
    """The tokenizer.json is there, the one recorded (by its id), fitted with these options. Parts
    the token dataset gains later do not refit it: a byte-level BPE encodes any caption, and the ids
    already written (the export, the prior) stay valid."""
    done, file_id = _read_json(out / "_done.json"), _text_id(str(out / "tokenizer.json"))
    return file_id is not None and done.get("id") == file_id and done.get("options") == _text_options(cfg)


def _text_options(cfg: TextTokenizerConfig) -> dict:
    """The options a fit depends on (not where the captions and the file are: the pipeline's paths)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in _FIXED["text_tokenizer"]}


def _text_id(spec: str) -> str | None:
    """The id of the text tokenizer `spec` names ("bytes", a tokenizer.json path or URL); None when it
    cannot be read (then what was made with it is not done: its job says why)."""
    from ..models.text_tokenizer import TextTokenizer

    try:
        return TextTokenizer.load(spec).id
    except Exception:  # noqa: BLE001 - any failure to read it means "not done"; the job reports the cause
        return None


def _made_with(output: Path) -> str | None:
    """The text tokenizer id an export (its _export.json) or a text prior (its metrics.json) records;
    None for anything else (a class prior, no output)."""
    export = _read_json(output / "_export.json")
    if export:
        return export.get("options", {}).get("text_tokenizer_id")
    return _read_json(output / "metrics.json").get("text", {}).get("text_tokenizer_id")


def _differences(saved: dict, now: dict, ignore: set[str], prefix: str = "") -> list[str]:
    """"name old -> new" for the keys both hold (nested mappings key by key), but those in ignore."""
    out = []
    for k in sorted(set(saved) & set(now)):
        if k in ignore or saved[k] == now[k]:
            continue
        if isinstance(saved[k], dict) and isinstance(now[k], dict):
            out += _differences(saved[k], now[k], set(), f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k} {json.dumps(saved[k])} -> {json.dumps(now[k])}")
    return out


def _exported(export: Path, tokens: Path) -> bool:
    """Complete, and from the token dataset's parts as they are now (by their sha256)."""
    from ..pipeline.token_dataset import TokenDataset

    try:
        manifest = json.loads((export / "_export.json").read_text())
        parts = TokenDataset(tokens).parts
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    exported = {r.get("source_sha256") for r in manifest.get("parts", {}).values()}
    return bool(manifest.get("complete")) and exported == {p.sha256 for p in parts}


def summary(r: PipelineResult) -> str:
    lines = [f"vqtok pipeline: done in {fmt_duration(r.seconds)} (ran: {', '.join(r.ran) or 'nothing'}; "
             f"skipped, output existed: {', '.join(r.skipped) or 'nothing'})",
             f"  tokenizer        {r.tokenizer}",
             f"  reconstructions  {r.reconstructions}",
             f"  token dataset    {r.tokens}",
             *([f"  text tokenizer   {r.text_tokenizer}"] if r.text_tokenizer else []),
             *([f"  LM export        {r.export}"] if r.export else []),
             f"  prior            {r.prior}",
             f"  samples          {r.samples}",
             f"  config           {Path(r.out) / 'pipeline.json'}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunOptions(Config):
    WHAT = "run"
    path: str = option(help="a pipeline config file, YAML or JSON (see examples/)", positional=True, metavar="CONFIG")
    stages: str = option("", "comma-separated stages to run (default: all; finished ones are skipped)")
    force: bool = option(False, "re-run stages whose output exists")


def run_pipeline(opts: RunOptions) -> PipelineResult:
    stages = [s.strip() for s in opts.stages.split(",")] if opts.stages else None
    return Pipeline(PipelineConfig.load(opts.path)).run(stages, force=opts.force)


COMMAND = Command("run", "run a pipeline config (YAML/JSON): convert, train, tokenize, train-text-tokenizer, export-lm, "
                          "train-prior, sample", RunOptions,
                  run_pipeline, config_file=False)


def main(argv: list[str] | None = None) -> int:
    return job_main(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
