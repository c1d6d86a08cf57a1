"""An input rewritten in place with the same size is re-tokenized: the version half of a unit's
signature (a local file's modification time, an object's ETag) is what tells it changed.

The rewrites are same-size on purpose: an IDX file of N 28x28 images is 16 + N*784 bytes whatever
the pixels, so size alone cannot tell the versions apart. (The tar test in test_exactly_once.py keeps
its size only because tar pads to 10 KiB records; the Parquet and IDX rewrites there change size.)

Both tests ask for `s3_env` before `ray_local`: the embedded Ray's workers read the S3 inputs, and
they see the server's endpoint only if it is in the environment when Ray starts (session fixtures
are set up before this module's Ray).
"""
import os
import time
import uuid

import numpy as np

from vqtok import TokenDataset, tokenize


def idx_bytes(images: np.ndarray) -> bytes:
    body = images.astype(np.uint8)
    return b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in body.shape) + body.tobytes()


def same_as_a_clean_run(bundle, data: str, out, tmp_path) -> None:
    clean = tmp_path / f"clean-{time.time_ns()}"
    tokenize(bundle, data, clean, verbose=False)
    a, b = TokenDataset(out).to_table(), TokenDataset(clean).to_table()
    assert a.num_rows == b.num_rows and a.equals(b)


def test_a_local_file_rewritten_with_the_same_size_is_redone(tmp_path, bundle, fmnist, s3_env, ray_local):
    images, _ = fmnist
    data, out = tmp_path / "data", tmp_path / "tokens"
    data.mkdir()
    a, b = data / "a-images-idx3-ubyte", data / "b-images-idx3-ubyte"
    a.write_bytes(idx_bytes(images[0:40]))
    b.write_bytes(idx_bytes(images[40:80]))
    r = tokenize(bundle, str(data), out, verbose=False)
    assert r.units_run == 2

    before = b.stat()
    old_bytes = b.read_bytes()
    b.write_bytes(idx_bytes(images[300:340]))  # other images, the same count: the same size
    os.utime(b, ns=(before.st_atime_ns, before.st_mtime_ns + 7_000_000_000))  # a later mtime, whatever the clock
    after = b.stat()
    assert after.st_size == before.st_size and b.read_bytes() != old_bytes
    assert after.st_mtime_ns != before.st_mtime_ns

    r = tokenize(bundle, str(data), out, verbose=False)
    assert (r.units_run, r.plan.changed) == (1, [str(b)])
    same_as_a_clean_run(bundle, str(data), out, tmp_path)
    r = tokenize(bundle, str(data), out, verbose=False)  # and then nothing more to do
    assert r.units_run == 0


def test_an_s3_object_rewritten_with_the_same_size_is_redone(tmp_path, bundle, fmnist, s3_env, ray_local):
    import fsspec

    images, _ = fmnist
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    prefix = f"vqtok/same-size-{uuid.uuid4().hex[:8]}"
    data, out = f"s3://{prefix}", tmp_path / "tokens"
    fs.pipe_file(f"{prefix}/a-images-idx3-ubyte", idx_bytes(images[0:40]))
    fs.pipe_file(f"{prefix}/b-images-idx3-ubyte", idx_bytes(images[40:80]))
    r = tokenize(bundle, data, out, verbose=False)
    assert r.units_run == 2

    key = f"{prefix}/b-images-idx3-ubyte"
    before = fs.info(key)
    fs.pipe_file(key, idx_bytes(images[300:340]))  # other images, the same count: the same size
    fs.invalidate_cache()
    after = fs.info(key)
    assert after["size"] == before["size"] and after["ETag"] != before["ETag"]

    r = tokenize(bundle, data, out, verbose=False)
    assert (r.units_run, r.plan.changed) == (1, [f"s3://{key}"])
    same_as_a_clean_run(bundle, data, out, tmp_path)
    r = tokenize(bundle, data, out, verbose=False)
    assert r.units_run == 0
