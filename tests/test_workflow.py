"""The pipeline API (one config, every stage, skip what exists), its config files and errors, and
the demo command."""
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, SAMPLE_DIR, run_cli
from vqtok import ConfigError, Pipeline, PipelineConfig, TokenDataset

TINY_TRAIN = {"steps": 30, "batch_size": 32, "log_every": 10, "checkpoint_every": 30,
              "model": {"width": 32, "code_dim": 16, "codebook_size": 32, "res_blocks": 1}}
TINY_PRIOR = {"steps": 30, "batch_size": 16, "model": {"n_layer": 1, "n_head": 2, "n_embd": 32}, "log_every": 10,
              "eval_every": 30, "checkpoint_every": 30}


def tiny(out: Path) -> PipelineConfig:
    return PipelineConfig(out=str(out), data=[str(SAMPLE_DIR)], train=dict(TINY_TRAIN), tokenize={"workers": 1},
                          prior=dict(TINY_PRIOR), sample={"n": 20})


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "pipeline: unknown option(s) ['colour']"),
    ({"prior": {"n_embed": 64}}, "pipeline.prior: train-prior config: unknown option(s) ['n_embed']"),
    ({"prior": {"model": {"n_embd": 30, "n_head": 4}}}, "pipeline.prior: --n-embd 30 must be divisible by --n-head 4"),
    ({"prior": {"n_embd": 30, "n_head": 4}}, "pipeline.prior: --n-embd 30 must be divisible by --n-head 4"),  # flat, as before
    ({"prior": {"model": {"n_embed": 64}}}, "pipeline.prior: model: unknown option(s) ['n_embed']"),
    ({"train": {"model": {"downsample": 3}}}, "downsample"),
    ({"train": {"data": ["x"]}}, "pipeline.train: ['data'] are set by the pipeline"),
    ({"sample": {"top_p": 2}}, "pipeline.sample: --top-p 2: must be in (0, 1]"),
    ({"tokenize": {"workers": 0}}, "pipeline.tokenize: --workers 0: must be at least 1"),
    ({"export": {"text_tokenizer": "bytes", "order": "sideways"}}, "pipeline.export: --order 'sideways'"),
    ({"export": {"tokens": "x", "text_tokenizer": "bytes"}}, "pipeline.export: ['tokens'] are set by the pipeline"),
    ({"prior": {"order": "both"}}, "pipeline.prior: --order both: only for a text prior"),
    ({"text_tokenizer": {"vocab_size": 100}}, "pipeline.text_tokenizer: --vocab-size 100: a byte-level BPE needs"),
    ({"text_tokenizer": {"tokens": "x"}}, "pipeline.text_tokenizer: ['tokens'] are set by the pipeline"),
    ({"text_tokenizer": {"vocab_sise": 512}}, "pipeline.text_tokenizer: train-text-tokenizer config: unknown option(s) "
                                              "['vocab_sise']"),
    ({"text_tokenizer": {"vocab_size": 512}, "prior": {"text_tokenizer": "bytes"}},
     "pipeline.prior: text_tokenizer 'bytes': with a `text_tokenizer:` section the pipeline's own"),
    ({"text_tokenizer": {"vocab_size": 512}, "export": {"text_tokenizer": "t.json"}},
     "pipeline.export: text_tokenizer 't.json': with a `text_tokenizer:` section"),
    ({"text_tokenizer": 512}, "pipeline: `text_tokenizer` must be a mapping"),
    ({"data": []}, "pipeline: `data` is required"),
    ({"out": "s3://bucket/run"}, "a pipeline writes under a local (or shared, mounted) directory"),
])
def test_config_errors_name_the_section_and_option(tmp_path, change, message):
    d = tiny(tmp_path).to_dict() | change
    with pytest.raises(ConfigError) as e:
        PipelineConfig.from_dict(d)
    assert message in str(e.value)


def test_config_files_yaml_and_json(tmp_path):
    import yaml

    d = tiny(tmp_path / "run").to_dict()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d))
    (tmp_path / "p.json").write_text(json.dumps(d))
    assert PipelineConfig.load(str(tmp_path / "p.yaml")) == PipelineConfig.load(str(tmp_path / "p.json")) == tiny(tmp_path / "run")
    for example in sorted((REPO / "examples").glob("pipeline-*.yaml")):  # the shipped examples are valid
        PipelineConfig.load(str(example))
    r = run_cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr


# examples/pipeline-fashion-mnist.yaml as it was before the prior's options nested, verbatim
OLD_FLAT_PIPELINE = """\
# The demo's pipeline as a config file: `vqtok run examples/pipeline-fashion-mnist.yaml`
# (the same as `vqtok demo`). Paths are relative to where you run it.
out: runs/demo-config
data: [examples/fashion-mnist]          # the bundled 10k Fashion-MNIST test split (IDX files)
convert_shard_size: 2500                # write it as 4 WebDataset shards first
train:                                  # any `vqtok train-vqvae` option, by field name
  steps: 1200
  batch_size: 128
  workers: 2                            # Ray Train workers (DDP); 1 trains in this process
tokenize:                               # any `vqtok tokenize` option
  workers: 1
prior:                                  # any `vqtok train-prior` option
  steps: 1000
  batch_size: 64
  n_layer: 4
  n_head: 4
  n_embd: 128
  lr: 2.0e-3
sample:                                 # any `vqtok sample` option
  n: 100
  cfg_scale: 2.0
"""


def test_an_old_pipeline_file_with_flat_prior_options_loads_as_the_nested_one(tmp_path):
    from vqtok.models.prior import PriorShape

    (tmp_path / "old.yaml").write_text(OLD_FLAT_PIPELINE)
    old = PipelineConfig.load(str(tmp_path / "old.yaml")).stage_config("train-prior")
    new = PipelineConfig.load(str(REPO / "examples" / "pipeline-fashion-mnist.yaml")).stage_config("train-prior")
    assert old.model == PriorShape(n_layer=4, n_head=4, n_embd=128)
    assert old.model == new.model and old.lr == new.lr == 2e-3 and (old.steps, new.steps) == (1000, 800)
    assert old.text_tokenizer == "" and new.text_tokenizer.endswith("text-tokenizer/tokenizer.json")  # a text prior since
    assert "n_layer" not in old.to_dict() and old.to_dict()["model"]["n_embd"] == 128  # saved nested


def test_pipeline_runs_every_stage_then_skips_what_exists(tmp_path, capsys):
    cfg = tiny(tmp_path / "run")
    res = Pipeline(cfg).run()
    assert res.ran == ["train", "tokenize", "train-prior", "sample"] and res.skipped == []
    assert TokenDataset(res.tokens).num_rows == 10_000
    assert Image.open(res.samples).size[0] > 0 and Path(res.reconstructions).is_file()
    saved = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert PipelineConfig.from_dict(saved) == cfg  # the resolved config is saved next to the outputs
    run = tmp_path / "run"  # and each stage's own, next to its output
    for f in ("tokenizer-run/config.json", "tokens/_tokenize_config.json", "prior/config.json", "samples.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "samples.json").read_text())["n"] == 20
    capsys.readouterr()
    again = Pipeline(cfg).run()
    assert again.ran == [] and again.skipped == ["train", "tokenize", "train-prior", "sample"]
    assert "other options" not in capsys.readouterr().out  # each job's saved config is the pipeline's own
    # an output made with other options is still skipped (it is complete), and the note says what differs and how
    # to redo it; options that do not change an output (workers, logging) are not named
    edited = PipelineConfig.from_dict(cfg.to_dict() | {"sample": {"n": 30}, "tokenize": {"workers": 2}})
    assert Pipeline(edited).run().ran == []
    out = capsys.readouterr().out
    assert "sample: note: that output was made with other options (n 20 -> 30); to make it with these, run the " \
           "stage with force" in out and "--stages sample --force" in out and "tokenize: note" not in out
    # a trained stage is not redone by force (it would resume at its last step): the note says to delete it
    edited = PipelineConfig.from_dict(cfg.to_dict() | {"prior": dict(TINY_PRIOR, lr=5e-4)})
    assert Pipeline(edited).run().ran == []
    out = capsys.readouterr().out
    assert f"train-prior: note: that output was made with other options (lr 0.001 -> 0.0005); to make it with " \
           f"these, delete {tmp_path / 'run' / 'prior'} and run again" in out
    # the same run directory written another way (relative, not absolute) is not another option
    relative = PipelineConfig.from_dict(cfg.to_dict() | {"out": os.path.relpath(tmp_path / "run")})
    assert Pipeline(relative).run().ran == [] and "note:" not in capsys.readouterr().out
    Path(res.samples).unlink()
    assert Pipeline(cfg).run().ran == ["sample"]


def test_the_text_tokenizer_stage_fits_the_captions_once_and_again_when_they_change(tmp_path):
    """With a text_tokenizer section: a BPE fitted on the token dataset's captions, the file the export
    and the prior are given; skipped while the options and the file are the ones recorded (a part
    added keeps it: the ids written with it stay valid), fitted again when an option changes or the
    file is not the one it wrote."""
    from test_export_lm import make_dataset
    from vqtok.models.text_tokenizer import TextTokenizer

    cfg = PipelineConfig.from_dict(tiny(tmp_path / "run").to_dict() | {
        "text_tokenizer": {"vocab_size": 300}, "export": {"order": "both"}, "prior": dict(TINY_PRIOR, order="both")})
    file = tmp_path / "run" / "text-tokenizer" / "tokenizer.json"
    assert cfg.stage_config("export-lm").text_tokenizer == cfg.stage_config("train-prior").text_tokenizer == str(file)
    assert tiny(tmp_path).stage_config("train-prior").text_tokenizer == ""  # no section: a class prior, as before
    tokens = make_dataset(cfg.path("tokenize"), 3, 50)
    pipe = Pipeline(cfg)
    assert not pipe.done("train-text-tokenizer")
    res = pipe.run(stages=["train-text-tokenizer"])
    assert res.ran == ["train-text-tokenizer"] and res.text_tokenizer == str(file)
    captions = [c for c in TokenDataset(tokens).to_table(["caption"]).column("caption").to_pylist() if c is not None]
    fitted = res.results["train-text-tokenizer"]
    assert fitted.captions == len(captions) and fitted.not_round_trip == 0 and fitted.vocab_size <= 300
    text = TextTokenizer.load(str(file))
    assert text.id == fitted.id and all(text.decode(text.encode(c)) == c for c in captions)
    assert pipe.run(stages=["train-text-tokenizer"]).skipped == ["train-text-tokenizer"]

    make_dataset(tokens, 4, 50)  # a part more: the tokenizer stays (a byte-level BPE encodes its captions too)
    assert pipe.done("train-text-tokenizer")
    other = PipelineConfig.from_dict(cfg.to_dict() | {"text_tokenizer": {"vocab_size": 280}})
    assert not Pipeline(other).done("train-text-tokenizer")  # other options
    res = Pipeline(other).run(stages=["train-text-tokenizer"])
    assert res.ran == ["train-text-tokenizer"] and res.results["train-text-tokenizer"].captions > len(captions)
    assert Pipeline(other).done("train-text-tokenizer") and not pipe.done("train-text-tokenizer")
    assert TextTokenizer.load(str(file)).id == res.results["train-text-tokenizer"].id != text.id
    assert sorted(p.name for p in file.parent.iterdir()) == ["_done.json", "tokenizer.json"]  # no candidate left
    file.write_bytes(file.read_bytes() + b" ")
    assert not Pipeline(other).done("train-text-tokenizer")  # not the file it wrote


@pytest.mark.slow
def test_a_text_pipeline_tokenizes_captions_exports_and_samples_prompts(tmp_path):
    """The bundled Fashion-MNIST sample has captions (t10k-captions.txt): tokenize keeps them, a BPE
    is fitted on them, the export stage writes LM rows in its ids, the prior is a text prior over the
    same ids, the samples come from prompts."""
    import pyarrow.parquet as pq
    from vqtok.models.text_tokenizer import TextTokenizer

    cfg = PipelineConfig(out=str(tmp_path / "run"), data=[str(SAMPLE_DIR)], train=dict(TINY_TRAIN),
                         tokenize={"workers": 1}, text_tokenizer={"vocab_size": 512}, export={"order": "both"},
                         prior=dict(TINY_PRIOR, max_text_tokens=12),
                         sample={"n": 4, "prompts": ["a dark ankle boot", "a light bag"]})
    res = Pipeline(cfg).run()
    assert res.ran == ["train", "tokenize", "train-text-tokenizer", "export-lm", "train-prior", "sample"]
    text = TextTokenizer.load(res.text_tokenizer)
    layout = json.loads((tmp_path / "run" / "export" / "layout.json").read_text())
    prior_text = json.loads((tmp_path / "run" / "prior" / "metrics.json").read_text())["text"]
    assert layout["text_tokenizer_id"] == prior_text["text_tokenizer_id"] == text.id
    assert layout["text_vocab_size"] == text.vocab_size == 447 and prior_text["captions_truncated"] == 0  # 10 ids at most
    ds = TokenDataset(res.tokens)
    lines = (SAMPLE_DIR / "t10k-captions.txt").read_text(encoding="utf-8").split("\n")
    assert ds.to_table(["caption"]).column("caption").to_pylist()[:50] == lines[:50]
    rows = pq.read_table(sorted((tmp_path / "run" / "export" / "data").glob("*.parquet"))[0])
    assert rows.num_rows > 0 and set(rows.column("order").to_pylist()) == {"text-first", "image-first"}
    assert json.loads((tmp_path / "run" / "prior" / "metrics.json").read_text())["text"]["order"] == "text-first"
    assert Image.open(res.samples).size[0] > 0
    assert Pipeline(cfg).run().ran == []  # every stage done, the export included
    # options that fit another text tokenizer: refused while the export and the prior were made with this one
    # (the file stays); once they are deleted, fitted, and the export and the prior are not done any more
    other = PipelineConfig.from_dict(cfg.to_dict() | {"text_tokenizer": {"vocab_size": 300}})  # 447 ids saturate 512
    same = PipelineConfig.from_dict(cfg.to_dict() | {"text_tokenizer": {"vocab_size": 1024}})
    assert Pipeline(same).run(stages=["train-text-tokenizer"]).ran == ["train-text-tokenizer"]  # the same file
    assert TextTokenizer.load(res.text_tokenizer).id == text.id and Pipeline(same).done("export-lm")
    with pytest.raises(ConfigError, match=r"pipeline.text_tokenizer: these options fit another text tokenizer .* "
                                          r"delete .*export and .*prior to make them again"):
        Pipeline(other).run(stages=["train-text-tokenizer"])
    assert TextTokenizer.load(res.text_tokenizer).id == text.id and Pipeline(same).done("train-prior")
    # the file edited by hand (still a tokenizer, another id): what was made with the old one is not done
    file = Path(res.text_tokenizer)
    original = file.read_bytes()
    file.write_bytes(original + b"\n")
    assert not Pipeline(cfg).done("export-lm") and not Pipeline(cfg).done("train-prior")
    file.write_bytes(original)
    assert Pipeline(cfg).done("export-lm") and Pipeline(cfg).done("train-prior")
    shutil.rmtree(tmp_path / "run" / "prior")
    with pytest.raises(ConfigError, match=r"delete .*export to make them again"):
        Pipeline(other).run(stages=["train-text-tokenizer"])
    shutil.rmtree(tmp_path / "run" / "export")
    assert Pipeline(other).run(stages=["train-text-tokenizer"]).ran == ["train-text-tokenizer"]
    assert TextTokenizer.load(res.text_tokenizer).id != text.id and not Pipeline(other).done("export-lm")


@pytest.mark.slow
def test_demo_quick_runs_every_stage_on_embedded_ray(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--out", str(out), timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for line in ("reconstructions", "token dataset", "samples"):
        assert line in r.stdout
    assert "on Ray Train with 2 workers" in r.stdout
    assert len(list((out / "shards").glob("*.tar"))) == 4
    assert TokenDataset(str(out / "tokens")).num_rows == 10_000
    assert Image.open(out / "samples.png").size[0] > 0
