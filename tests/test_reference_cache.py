"""The reference log-prob cache is keyed by what the numbers depend on (the checkpoint's bytes, the data, dtype,
backend, code), never by file size and modification time, and concurrent writers both succeed."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlmf.reference
from rlmf.data import PreferencePair, tokenize_pairs
from rlmf.kernels import get_default_backend, set_default_backend
from rlmf.models import load_generator
from rlmf.reference import attach_precomputed, model_fingerprint

PAIRS = [PreferencePair(f"Brief {i}:", f" a short specific email {i}", f" spam spam spam {i}") for i in range(6)]


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama"), directory)
    return directory


def _fill(model, directory, tokenizer, cache):
    features = {"train": tokenize_pairs(PAIRS, tokenizer, 64, 32)[0]}
    return attach_precomputed(model, directory, features, "paired", tokenizer.pad_token_id, cache)


def test_weights_changed_in_place_with_the_same_size_and_mtime_miss_the_cache(checkpoint, tmp_path):
    model, tokenizer = load_generator(checkpoint)
    path, hit = _fill(model, checkpoint, tokenizer, tmp_path / "cache")
    assert not hit and _fill(model, checkpoint, tokenizer, tmp_path / "cache") == (path, True)
    weights = checkpoint / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same modification time
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    path2, hit2 = _fill(model, checkpoint, tokenizer, tmp_path / "cache")
    assert not hit2 and path2 != path


def test_dtype_backend_and_code_version_are_part_of_the_key(checkpoint, tmp_path, monkeypatch):
    model, tokenizer = load_generator(checkpoint)
    path, _ = _fill(model, checkpoint, tokenizer, tmp_path / "cache")
    assert _fill(model.to(torch.bfloat16), checkpoint, tokenizer, tmp_path / "cache")[0] != path
    model.to(torch.float32)
    backend = get_default_backend()
    try:
        set_default_backend("triton" if backend != "triton" else "torch")
        assert _fill(model, checkpoint, tokenizer, tmp_path / "cache")[0] != path
    finally:
        set_default_backend(backend)
    monkeypatch.setattr(rlmf.reference, "REFERENCE_CACHE_VERSION", rlmf.reference.REFERENCE_CACHE_VERSION + 1)
    assert _fill(model, checkpoint, tokenizer, tmp_path / "cache")[0] != path


def test_fingerprint_reads_every_byte_of_large_files(checkpoint):
    before = model_fingerprint(checkpoint)
    (checkpoint / "extra.bin").write_bytes(b"\0" * (300 * 2**20))  # above the old 256 MiB content-hash limit
    big = model_fingerprint(checkpoint)
    data = bytearray((checkpoint / "extra.bin").read_bytes())
    data[len(data) // 2] = 1
    (checkpoint / "extra.bin").write_bytes(bytes(data))
    assert len({before, big, model_fingerprint(checkpoint)}) == 3


def test_a_single_file_checkpoint_is_fingerprinted_by_its_bytes(tmp_path, caplog):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF one")
    first = model_fingerprint(path)
    path.write_bytes(b"GGUF two")
    assert model_fingerprint(path) != first
    assert "keyed by its name only" not in caplog.text


FILL = textwrap.dedent("""
    import sys, time
    from rlmf.data import PreferencePair, tokenize_pairs
    from rlmf.models import load_generator
    from rlmf.reference import attach_precomputed
    checkpoint, cache, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model, tokenizer = load_generator(checkpoint)
    pairs = [PreferencePair(f"Brief {i}:", f" a short specific email {i}", f" spam spam spam {i}") for i in range(200)]
    features = {"train": tokenize_pairs(pairs, tokenizer, 64, 32)[0]}
    time.sleep(max(0.0, start - time.time()))  # both processes compute and write at the same moment
    path, hit = attach_precomputed(model, checkpoint, features, "paired", tokenizer.pad_token_id, cache)
    print(path, hit, sum(sum(f["reference_logps"]) for f in features["train"]))
""")


def test_two_processes_filling_one_entry_at_once_both_succeed_and_agree(checkpoint, tmp_path):
    import time

    start = str(time.time() + 8)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FILL, str(checkpoint), str(tmp_path / "cache"), start],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    (path_a, _, total_a), (path_b, _, total_b) = (out.split() for out, _ in outputs)
    assert path_a == path_b and float(total_a) == float(total_b)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(path_a)], "no temporary left"
    assert torch.load(path_a)["train"]


def test_two_jobs_evaluating_one_shared_base_at_once_both_succeed_and_agree(compose, tmp_path):
    """The evaluation cache beside a shared SFT checkpoint: two sweep jobs fill it at the same moment."""
    import json
    from pathlib import Path

    from rlmf.train import run_job

    base = tmp_path / "base"
    run_job(compose("experiment=quick", "stage=sft"), base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = str(Path(sys.executable).with_name("rlmf-train"))
    jobs = [subprocess.Popen([train, "experiment=quick", "stage=evaluate", f"stage.from_run={base}",
                              f"hydra.run.dir={tmp_path / name}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env) for name in ("a", "b")]
    errors = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [e[-2000:] for e in errors]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("a", "b")]
    assert summaries[0] == summaries[1]
    caches = sorted((base / "sft").glob("eval-*.json"))
    assert len(caches) == 2 and all(json.loads(c.read_text()) for c in caches)
    assert not list((base / "sft").glob(".*tmp")), "no temporary file left behind"


def test_the_code_fingerprint_covers_the_kernels():
    """The kernels live in the repository's kernels/rlmf_kernels/ folder, installed as rlmf.kernels: the fingerprint
    must read them where the import system finds them, not beside rlmf/reference.py."""
    import importlib.util
    from unittest import mock

    read = []
    real = rlmf.reference._hash_file
    with mock.patch.object(rlmf.reference, "_hash_file", lambda digest, path: (read.append(path.name),
                                                                                 real(digest, path))):
        rlmf.reference.code_fingerprint()
    assert {"logprobs.py", "dispatch.py", "logprobs_torch.py", "logprobs_hidden_triton.py",
            "logprobs_logits_triton.py"} <= set(read)
    assert importlib.util.find_spec("rlmf.kernels.dispatch").origin
