"""The data path of `vqtok tokenize`: one decode (Preprocess.decode, Tokenizer.encode_file), the rows in
flight (UnitRows in pipeline/stages.py) and position-fixed batches, checked with an encoder whose tokens depend
on the batch (tests/batch_dependent.py), so that encoding images in any grouping other than by their
position in their unit shows."""
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

import batch_dependent
from conftest import TINY, part_hashes, png_bytes, write_tar
from vqtok import Preprocess, TokenDataset, Tokenizer, VQVAEConfig, tokenize
from vqtok.models import VQVAE
from vqtok.models.bundle import read_bundle
from vqtok.pipeline.sources import Failure, list_units
from vqtok.pipeline.stages import BatchEncoder, UnitCollector, UnitRows, read_units, unit_items

TESTS = Path(__file__).parent
PHOTOS = TESTS.parent / "examples" / "photos"
BATCH = 5


@pytest.fixture(scope="module")
def ray_batchy():
    """An embedded Ray whose workers all run a batch-dependent tokenizer."""
    import ray

    from vqtok.jobs._ray import init_ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "batch_dependent.install",
                          "env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}})
    yield init_ray(None)  # vqtok joins the Ray it finds running
    ray.shutdown()


@pytest.fixture
def batchy(monkeypatch):
    """The same batch-dependent tokenizer in this process."""
    from vqtok.models.tokenizer import Tokenizer as T

    monkeypatch.setattr(T, "_encode_pixels", T._encode_pixels)  # restored after the test
    batch_dependent.install()


def shards_with_failures(folder: Path, images) -> Path:
    """Three units: 13 good images and one corrupt; none good (an empty unit: only its end row); 7 good."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / "a.tar", [(f"a{i:02d}.png", png_bytes(images[i])) for i in range(13)] + [("bad.png", b"junk")])
    write_tar(folder / "b.tar", [("only.png", b"not an image either")])
    write_tar(folder / "c.tar", [(f"c{i:02d}.png", png_bytes(images[20 + i])) for i in range(7)])
    return folder


def expected_by_position(tok: Tokenizer, unit_images: list[np.ndarray]) -> np.ndarray:
    """What tokenize must write for a unit: its images encoded in consecutive batches of BATCH."""
    return tok.encode(np.stack(unit_images), batch_size=BATCH).numpy() if unit_images else np.zeros((0, 7, 7))


# ---------------------------------------------------------------------------------------------
# One decode
# ---------------------------------------------------------------------------------------------
def test_vqvae_encode_gives_the_training_forwards_tokens_without_its_statistics(monkeypatch):
    """VQVAE.encode computes indices only: not the quantizer's training forward (both losses, the
    code counts and perplexity, the projection back out, a host sync per batch on CUDA)."""
    from vqtok.models.vqvae import VectorQuantizer

    torch.manual_seed(0)
    model = VQVAE(TINY).eval()
    with torch.no_grad():
        model.quantizer.codebook.normal_()
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    with monkeypatch.context() as m:
        m.setattr(VectorQuantizer, "forward", lambda *a: pytest.fail("encode ran the training forward"))
        tokens = model.encode(x)
    with torch.no_grad():
        assert torch.equal(tokens, model(x)[1].indices)
    assert all(torch.equal(before[k], v) for k, v in model.quantizer.state_dict().items())


def test_encode_file_gives_the_pixels_and_tokens_of_vqtok_tokenize(tmp_path, ray_batchy, batchy):
    """Large JPEGs are decoded reduced from their bytes (the bundle's policy): encode_file repeats it,
    so it gives tokenize's tokens when encoded in the same batches; a PIL image is used as given."""
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=64, channels=3, width=32, code_dim=16, codebook_size=256, res_blocks=1))
    with torch.no_grad():
        model.quantizer.codebook.normal_()
    bundle = tmp_path / "tok"
    Tokenizer(model).save(bundle)
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(PHOTOS.glob("*.jpg"))[:6]:  # 1280x960: decoded at 1/4 (the shorter side 240 >= 2 x 64)
        Image.open(p).resize((1280, 960), Image.Resampling.BICUBIC).save(folder / p.name, quality=90)
    out = tmp_path / "tokens"
    r = tokenize(bundle, str(folder), out, batch_size=4, verbose=False)
    assert (r.rows, r.failures) == (6, 0)
    ds = TokenDataset(out)
    tokens, _ = ds.to_numpy()
    files = [folder / f"{k}.jpg" for k in ds.to_table(["key"]).column("key").to_pylist()]
    assert files == sorted(folder.glob("*.jpg"))  # one folder unit, in path order

    tok = Tokenizer.load(bundle)
    assert np.array_equal(tok.encode_file(files, batch_size=4).numpy(), tokens)
    assert np.array_equal(tok.encode_file([f.read_bytes() for f in files], batch_size=4).numpy(), tokens)
    # the reduced decode really happened, and a PIL image is not decoded again
    assert tok.preprocess.open(files[0].read_bytes()).size == (320, 240)
    as_given = tok.preprocess.decode(Image.open(files[0]).convert("RGB"))
    assert not np.array_equal(as_given, tok.preprocess.decode(files[0].read_bytes()))
    with pytest.raises(ValueError, match=r"junk\.jpg: not an image"):
        (folder / "junk.jpg").write_bytes(b"junk")
        tok.encode_file(folder / "junk.jpg")


def test_preprocess_batch_takes_arrays_pil_images_and_bytes_alike(fmnist):
    pre = Preprocess(image_size=28, channels=1)
    images = fmnist[0][:3]
    from_array = pre.batch(images)
    assert from_array.shape == (3, 28, 28, 1) and from_array.dtype == torch.uint8
    assert torch.equal(pre.batch([Image.fromarray(a) for a in images]), from_array)
    assert torch.equal(pre.batch([png_bytes(a) for a in images]), from_array)
    with pytest.raises(TypeError, match="a batch is expected"):
        pre.batch(png_bytes(images[0]))


# ---------------------------------------------------------------------------------------------
# The rows in flight
# ---------------------------------------------------------------------------------------------
def read_all(tok: Tokenizer, folder: Path) -> tuple[list[pa.Table], list]:
    units = list_units(str(folder))
    items = pa.Table.from_pylist(unit_items([(u, i) for i, u in enumerate(units)]))
    return list(read_units(items, preprocess=tok.preprocess, batch_size=BATCH, max_pixels=1 << 26)), units


def collect(encoder, blocks) -> dict[int, object]:
    collector, done = UnitCollector(), {}
    for block in blocks:
        for unit in collector.add(encoder(block)):
            assert unit.part_index not in done  # each unit handed back once
            done[unit.part_index] = unit
    assert collector.in_flight == 0
    return done


def test_encoders_group_rows_by_their_position_however_the_blocks_arrive(tmp_path, bundle, fmnist, batchy):
    images = fmnist[0]
    folder = shards_with_failures(tmp_path / "data", images)
    tok = Tokenizer.load(bundle)
    tables, units = read_all(tok, folder)
    encoder = BatchEncoder(read_bundle(bundle), threads=1)
    # Ray Data may merge the read tasks' outputs into blocks in any combination and order; it never
    # cuts a batch (jobs/tokenize.py keeps blocks large enough to hold one)
    rng = np.random.default_rng(0)
    shuffled = [tables[i] for i in rng.permutation(len(tables))]
    runs = [pa.concat_tables(shuffled[a:b]) for a, b in zip([0, 2, 3, 6], [2, 3, 6, len(shuffled)])]
    retried = tables + tables[1:4] + tables[-1:]  # a retried read task delivers batches (and an end row) twice

    ways = {"as read": tables, "one block": [pa.concat_tables(tables)], "merged, shuffled": runs, "retried": retried}
    results = {name: collect(encoder, blocks) for name, blocks in ways.items()}
    expected = {
        0: expected_by_position(tok, [images[i] for i in range(13)]),
        1: expected_by_position(tok, []),
        2: expected_by_position(tok, [images[20 + i] for i in range(7)]),
    }
    for name, done in results.items():
        assert sorted(done) == [0, 1, 2], name
        for i, unit in done.items():
            grids = np.asarray(unit.rows.column("tokens").to_pylist(), dtype=np.int64).reshape(-1, 7, 7)
            assert np.array_equal(grids, expected[i]), (name, i)
            assert unit.rows.column("key").to_pylist() == [
                *(f"a{j:02d}" for j in range(13))] * (i == 0) + [f"c{j:02d}" for j in range(7)] * (i == 2)
    failures = {i: u.failures for i, u in results["as read"].items()}
    assert [f.key for f in failures[0]] == ["bad"] and failures[2] == []
    assert failures[1] == [Failure("only", units[1].url, failures[1][0].reason)] and "not an image" in failures[1][0].reason


def test_an_end_row_alone_is_a_whole_unit_and_failures_keep_their_type():
    codec = UnitRows((2, 2, 1))
    fails = [Failure("k", "u.tar", "cut short", unit_damaged=True), Failure("j", "u.tar", "bad png")]
    end = codec.end_row(7, 0, fails)
    assert end.schema == codec.schema and end.num_rows == 1
    (unit,) = UnitCollector().add(UnitRows.with_tokens(end, pa.nulls(1, pa.list_(pa.uint16()))))
    assert unit.part_index == 7 and unit.rows.num_rows == 0 and unit.failures == fails
    assert unit.failures[0].unit_damaged and not unit.failures[1].unit_damaged


def test_a_unit_waits_for_its_last_batch_even_when_its_end_row_comes_first():
    codec = UnitRows((2, 2, 1))
    px = [bytes(4)] * 3
    first = codec.image_rows(0, 0, 0, ["a", "b", "c"], [1, 2, 3], px)
    second = codec.image_rows(0, 1, 3, ["d"], [4], px[:1])
    end = codec.end_row(0, 4, [])
    tok = lambda t: UnitRows.with_tokens(t, pa.array([[i] for i in range(t.num_rows)], pa.list_(pa.uint16())))  # noqa: E731
    c = UnitCollector()
    assert c.add(tok(end)) == [] and c.add(tok(second)) == [] and c.add(tok(second)) == []  # a copy counts once
    (unit,) = c.add(tok(first))
    assert unit.rows.column("key").to_pylist() == ["a", "b", "c", "d"] and c.in_flight == 0
    assert c.add(tok(first)) == [] and c.in_flight == 0  # a late copy of a handed-back unit is dropped


# ---------------------------------------------------------------------------------------------
# End to end on Ray, with the batch-dependent tokenizer in every worker
# ---------------------------------------------------------------------------------------------
def test_one_and_two_workers_write_identical_datasets_encoded_by_position(tmp_path, bundle, fmnist, ray_batchy,
                                                                          batchy):
    images = fmnist[0]
    folder = shards_with_failures(tmp_path / "data", images)
    one, two = tmp_path / "one", tmp_path / "two"
    # blocks far smaller than a batch: Ray Data would cut batches, unless the job keeps them whole
    context = ray_batchy.data.DataContext.get_current()
    saved, context.target_max_block_size = context.target_max_block_size, 1024
    tokenize(bundle, str(folder), one, batch_size=BATCH, workers=1, verbose=False, max_failure_fraction=1.0)
    tokenize(bundle, str(folder), two, batch_size=BATCH, workers=2, verbose=False, max_failure_fraction=1.0)
    context.target_max_block_size = saved
    assert part_hashes(one) == part_hashes(two)  # byte-identical parts
    tok = Tokenizer.load(bundle)
    tokens, _ = TokenDataset(one).to_numpy()
    expected = np.concatenate([expected_by_position(tok, [images[i] for i in range(13)]),
                               expected_by_position(tok, [images[20 + i] for i in range(7)])])
    assert np.array_equal(tokens, expected)
    # the batch-dependent tokenizer did run in the workers: the plain one gives other tokens
    plain = Tokenizer._encode_pixels.real(tok, tok.preprocess.batch(images[:13]), BATCH).numpy()
    assert not np.array_equal(tokens[:13], plain)


def test_extra_per_row_columns_travel_from_the_read_side_to_the_finished_unit():
    codec = UnitRows((2, 2, 1), extra=[pa.field("caption", pa.string())])
    rows = codec.image_rows(3, 0, 0, ["a", "b"], [None, 1], [bytes(4)] * 2, extra={"caption": ["a cat", None]})
    end = codec.end_row(3, 2, [])
    assert rows.schema == end.schema == codec.schema
    tokens = pa.array([[1], [2], None], pa.list_(pa.uint16()))
    (unit,) = UnitCollector().add(UnitRows.with_tokens(pa.concat_tables([rows, end]), tokens))
    assert unit.rows.column_names == ["key", "label", "caption", "tokens"]
    assert unit.rows.column("caption").to_pylist() == ["a cat", None]
