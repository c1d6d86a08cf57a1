"""One config mechanism: flags, config files and the Python API all come from the config
dataclasses; the flags users type are unchanged; unknown keys fail the same way everywhere; and the
layers import one way (jobs -> pipeline -> models -> kernels)."""
import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from conftest import REPO
from vqtok.cli import COMMANDS, build_parser
from vqtok.jobs.options import config_from_args
from vqtok.models.config import ConfigError, nested_config

# Every flag each command took before the options were generated from the dataclasses.
LEGACY_FLAGS = {
    "train-vqvae": "--data --val-data --out --config --steps --batch-size --lr --weight-decay --warmup-steps --grad-clip "
                   "--seed --log-every --checkpoint-every --keep-checkpoints --max-failure-fraction --max-image-pixels "
                   "--device --threads --workers --gpus-per-worker --cpus-per-worker --address --max-failures "
                   "--codebook-size --code-dim --codebook-dim --image-size --channels --downsample --width --res-blocks "
                   "--beta --codebook --restart-window --random-init --no-kmeans-init --l2-normalize --no-l2-normalize",
    "train-prior": "--tokens --val-tokens --out --config --tokenizer --num-classes --n-layer --n-head --n-embd --dropout "
                   "--class-dropout --steps --batch-size --lr --weight-decay --warmup-steps --grad-clip --seed --log-every "
                   "--eval-every --eval-rows --train-eval-rows --checkpoint-every --keep-checkpoints --shuffle-buffer --stats-rows "
                   "--no-sample-grid --device --threads --workers --gpus-per-worker --cpus-per-worker --address "
                   "--max-failures",
    "tokenize": "--tokenizer --data --out --batch-size --workers --gpus-per-worker --cpus-per-worker --threads-per-worker "
                "--address --max-failure-fraction --max-image-pixels --progress-seconds",
    "sample": "--prior --n --class --temperature --top-k --top-p --cfg-scale --seed --batch-size --tokenizer --out "
              "--save-images --save-tokens --device",
    "eval-vqvae": "--tokenizer --data --out --batch-size --max-images --device",
    "run": "--stages --force",
    "demo": "--out --quick",
    "inspect": "--rows --verify",
    "convert": "--shard-size --prefix",
}


def _subparsers():
    p = build_parser()
    action = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_flag_users_type_still_exists():
    subs = _subparsers()
    for command, flags in LEGACY_FLAGS.items():
        have = set(subs[command]._option_string_actions)
        missing = [f for f in flags.split() if f not in have]
        assert not missing, (command, missing)


def _config_classes():
    seen, todo = [], [c.config for c in COMMANDS]
    from vqtok.jobs.run import PipelineConfig
    from vqtok.models.prior import PriorConfig

    todo += [PipelineConfig, PriorConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo += [t for t in (nested_config(h) for h in cls.field_types().values()) if t is not None]
    return seen


def test_every_option_has_help_text():
    for cls in _config_classes():
        for f in dataclasses.fields(cls):
            if nested_config(cls.field_types()[f.name]) is None:
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_unknown_keys_fail_naming_the_known_ones(cls):
    with pytest.raises(ConfigError) as e:
        cls.from_dict({"no_such_option": 1})
    assert "unknown option(s) ['no_such_option']" in str(e.value) and "known: [" in str(e.value)
    assert str(cls.known_keys()[0]) in str(e.value)


def test_a_nested_model_key_is_refused_by_name(tmp_path):
    from vqtok import TrainConfig

    with pytest.raises(ConfigError, match=r"model: unknown option\(s\) \['colour'\]"):
        TrainConfig.from_dict({"data": ["x"], "out": str(tmp_path), "model": {"colour": 3}})


def _args(command, *argv):
    return build_parser().parse_args([command, *argv])


def test_file_then_flags_then_defaults(tmp_path):
    from vqtok import TrainConfig, VQVAEConfig

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"steps": 7, "lr": 5e-4, "model": {"codebook_size": 64, "width": 48}}))
    cfg = config_from_args(TrainConfig, _args("train-vqvae", "--config", str(cfg_file), "--data", "a,b", "--data", "c",
                                              "--out", str(tmp_path / "run"), "--steps", "9", "--codebook-size", "32",
                                              "--no-kmeans-init", "--codebook-dim", "0"))
    assert cfg.steps == 9 and cfg.lr == 5e-4  # the flag wins over the file, the file over the default
    assert cfg.data == ["a", "b", "c"]  # repeatable and comma-separated
    assert cfg.model.codebook_size == 32 and cfg.model.width == 48 and cfg.model.kmeans_init is False
    assert cfg.model.codebook_dim is None  # 0 means: no projection
    defaults = VQVAEConfig()
    assert cfg.model.res_blocks == defaults.res_blocks and cfg.batch_size == TrainConfig.__dataclass_fields__["batch_size"].default
    # the resolved config, saved next to the outputs, is itself a valid config file
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_the_priors_model_options_nest_and_old_flat_files_still_load(tmp_path):
    """train-prior's model options are `model: {...}` like train-vqvae's; a --config file written
    when they were flat still loads, and a flag given on top overrides its value."""
    from vqtok import PriorTrainConfig
    from vqtok.models.prior import PriorShape

    old = tmp_path / "old.yaml"
    old.write_text("tokens: [t]\nsteps: 7\nn_layer: 6\nn_head: 2\nn_embd: 64\n")
    cfg = config_from_args(PriorTrainConfig, _args("train-prior", "--config", str(old), "--out", "o", "--n-layer", "3"))
    assert cfg.model == PriorShape(n_layer=3, n_head=2, n_embd=64) and cfg.steps == 7
    nested = tmp_path / "new.yaml"
    nested.write_text("tokens: [t]\nsteps: 7\nmodel:\n  n_layer: 3\n  n_head: 2\n  n_embd: 64\n")
    assert config_from_args(PriorTrainConfig, _args("train-prior", "--config", str(nested), "--out", "o")) == cfg
    assert PriorTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the saved config.json


def test_defaults_come_from_the_dataclass_not_the_parser(tmp_path):
    from vqtok import PriorTrainConfig, SampleConfig

    cfg = config_from_args(PriorTrainConfig, _args("train-prior", "--tokens", "t", "--out", str(tmp_path)))
    assert cfg == PriorTrainConfig(tokens=["t"], out=str(tmp_path))
    s = config_from_args(SampleConfig, _args("sample", "--prior", "p", "--class", "3"))
    assert s.classes == "3" and s.n == SampleConfig(prior="p").n


def test_readme_tables_state_the_real_defaults():
    """The option tables in the README quote each flag's default: they must be the dataclasses'."""
    from vqtok import PriorTrainConfig, TrainConfig, VQVAEConfig

    fields = {**{f.name: f for f in dataclasses.fields(TrainConfig)}, **{f.name: f for f in dataclasses.fields(VQVAEConfig)}}
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Train a tokenizer"):readme.index("## Tokenize a corpus")]
    checked = set()
    # A row names one flag (`--steps`, `--workers N`), an alias in parentheses (`--code-dim` (`--z-channels`)),
    # an on/off pair (`--l2-normalize` / `--no-l2-normalize`), or several flags separated by commas, whose
    # defaults are then listed in the same order (separated by "; " when a default itself holds a comma).
    prose = {"threads": "torch default"}  # defaults the README states in words: flag -> its words
    for cell, defaults in re.findall(r"^\| (`--[^|]+) \| ([^|]+) \|", section, re.M):
        names = [re.match(r"`--([a-z0-9-]+)", part.strip()).group(1)
                 for part in re.sub(r"\([^)]*\)", "", cell).split(",")]
        values = [v.strip() for v in (defaults.split(";") if ";" in defaults else defaults.split(","))] \
            if len(names) > 1 else [defaults.strip()]
        assert len(values) == len(names), f"row {cell!r}: {len(names)} flags but defaults {defaults!r}"
        for flag, default in zip(names, values):
            f = fields.get(flag.replace("-", "_"))
            if f is None or f.default in (dataclasses.MISSING, None) or isinstance(f.default, bool):
                continue  # prose defaults ("embedded Ray", "on") are not checked
            if default == "required":
                assert f.default in ("", dataclasses.MISSING), (flag, default, f.default)
                continue
            if flag.replace("-", "_") in prose:
                assert default == prose[flag.replace("-", "_")] and f.default == 0, (flag, default, f.default)
            else:
                try:
                    quoted = float(default)
                except ValueError:
                    assert default.split()[0].strip("`") == str(f.default), (flag, default, f.default)
                else:
                    assert quoted == float(f.default), (flag, default, f.default)
            checked.add(flag.replace("-", "_"))
    # the rows that list two flags are read too (each flag against its own default)
    assert {"image_size", "channels", "ema_decay", "ema_eps", "res_blocks", "checkpoint_every", "keep_checkpoints",
            "device", "threads", "gpus_per_worker", "cpus_per_worker", "code_dim", "workers"} <= checked, checked
    assert len(checked) >= 25, checked
    assert PriorTrainConfig.__dataclass_fields__["lr"].default == 1e-3  # the prior's own, not the tokenizer's


def _imports(path: Path) -> list[str]:
    """Package-relative modules a file imports, as 'layer' names (kernels, models, pipeline, jobs, top)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(REPO).parts
    here = rel[0] if len(rel) > 1 else "top"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = [here] if node.level == 1 and here != "top" else []
            target = (base + (node.module or "").split(".")) if node.module else base
            first = target[0] if target and target[0] else "top"
            if node.level >= 2 or here == "top":
                first = (node.module or "").split(".")[0] or "top"
                if first not in ("kernels", "models", "pipeline", "jobs"):
                    first = "top"
            out.append(first)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vqtok"):
            parts = node.module.split(".")
            out.append(parts[1] if len(parts) > 1 and parts[1] in ("kernels", "models", "pipeline", "jobs") else "top")
    return out


def test_dependencies_point_one_way():
    order = {"kernels": 0, "models": 1, "pipeline": 2, "jobs": 3}
    bad = []
    for layer in order:
        for path in sorted((REPO / layer).glob("*.py")):
            for target in _imports(path):
                if target == "top" or order[target] > order[layer]:
                    bad.append(f"{path.relative_to(REPO)} imports {target}")
    assert not bad, bad


def _module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports ('kernels.nearest_code', ...), at the top or inside a
    function (a lazy import still closes a circle for a reader)."""
    def name(p: Path) -> str:
        rel = p.relative_to(REPO).with_suffix("").parts
        return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)

    modules = {name(p): p for layer in ("kernels", "models", "pipeline", "jobs") for p in (REPO / layer).glob("*.py")}
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: package.count(".") + 1 - (node.level - 1)]
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vqtok."):
                target = node.module[len("vqtok."):]
            else:
                continue
            for alias in node.names:  # `from . import x` names a module, `from .m import f` a module's member
                deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[mod] = {d for d in deps if d in modules and d != mod}
    return graph


def test_no_circular_imports_between_modules():
    graph = _module_graph()
    assert graph["kernels.nearest_code"] >= {"kernels.triton_kernel", "kernels.distance"}  # the graph sees lazy imports
    cycles, state = [], {}

    def visit(mod, stack):
        state[mod] = "open"
        stack.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
    assert not cycles, cycles
