"""The checkpoint file: its documented layout, exact round trips, and refusal of damaged files."""

import json
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

from engine import checkpoint as ckpt


def sample_state():
    g = torch.Generator().manual_seed(0)
    return {
        "format": ckpt.FORMAT,
        "model": {"w": torch.randn(3, 5, generator=g), "b": torch.randn(5, generator=g)},
        "optimizer": {"state": {0: {"step": torch.tensor(7.0)}}, "lr": [1e-3, 0.0]},
        "mixed": (1, 2.5, "text", None, True, [torch.arange(4), torch.tensor(True)]),
        "half": torch.randn(6, generator=g).to(torch.bfloat16),
        "bytes": torch.arange(3, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "rng": ckpt.rng_state(),
    }


def parse_by_the_documented_layout(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return header, raw[8 + n :], 8 + n


def test_the_file_is_a_length_a_json_header_and_aligned_tensor_bytes(tmp_path):
    state = sample_state()
    ckpt.save_atomic(state, tmp_path / "last.pt")
    header, data, data_start = parse_by_the_documented_layout(tmp_path / "last.pt")
    metadata = header.pop("__metadata__")
    assert metadata["format"] == ckpt.FORMAT and all(isinstance(v, str) for v in metadata.values())
    assert data_start % 8 == 0
    spans = sorted(spec["data_offsets"] for spec in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # no holes
    weight = header[next(k for k, v in header.items() if v["shape"] == [3, 5])]
    begin, end = weight["data_offsets"]
    assert weight["dtype"] == "F32" and begin % 4 == 0
    assert data[begin:end] == state["model"]["w"].numpy().tobytes()


def test_load_gives_back_every_value_and_dtype(tmp_path):
    state = sample_state()
    ckpt.save_atomic(state, tmp_path / "last.pt")
    loaded = ckpt.load(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["half"].dtype == torch.bfloat16 and torch.equal(loaded["half"], state["half"])
    assert loaded["mixed"][:5] == (1, 2.5, "text", None, True)
    assert torch.equal(loaded["mixed"][5][0], torch.arange(4))
    assert loaded["mixed"][5][1].dtype == torch.bool
    assert loaded["empty"].shape == (0, 3)
    assert loaded["optimizer"]["state"][0]["step"].item() == 7.0  # int keys stay ints


def tensors_in(value):
    """Every tensor in a nested state, in no particular order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for item in value for t in tensors_in(item)]
    return []


def as_comparable(tensors):
    raw = [t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors]
    return sorted((str(t.dtype), tuple(t.shape), b) for t, b in zip(tensors, raw, strict=True))


def test_the_safetensors_library_reads_every_tensor_of_a_checkpoint(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = sample_state()
    ckpt.save_atomic(state, tmp_path / "last.pt")
    from_safetensors = safetensors_torch.load_file(str(tmp_path / "last.pt"))
    assert as_comparable(list(from_safetensors.values())) == as_comparable(tensors_in(state))


def test_restored_rng_state_replays_the_same_numbers(tmp_path):
    torch.manual_seed(5)
    ckpt.save_atomic({"format": ckpt.FORMAT, "rng": ckpt.rng_state()}, tmp_path / "last.pt")
    expected = torch.rand(4)
    ckpt.set_rng_state(ckpt.load(tmp_path / "last.pt")["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_a_flipped_bit_in_the_tensor_data_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(sample_state(), path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="corrupt.*CRC-32"):
        ckpt.load(path)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_atomic(sample_state(), path)
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ckpt.CheckpointError, match="corrupt.*truncated"):
        ckpt.load(path)


def test_a_checkpoint_of_another_format_version_says_so(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    monkeypatch.setattr(ckpt, "FORMAT", "engine-checkpoint-v0")
    ckpt.save_atomic(sample_state(), path)
    monkeypatch.undo()
    with pytest.raises(ckpt.CheckpointError, match="another version.*engine-checkpoint-v0"):
        ckpt.load(path)


def test_each_background_save_is_a_snapshot_of_its_moment(tmp_path):
    writer = ckpt.AsyncCheckpointer()
    weight = torch.zeros(1000)
    saved = []
    for step in range(4):
        weight.add_(1.0)  # the training step after a save must not leak into it
        writer.save({"format": ckpt.FORMAT, "w": weight}, tmp_path / f"{step}.pt")
        saved.append(step + 1.0)
    writer.close()
    for step, value in enumerate(saved):
        assert torch.all(ckpt.load(tmp_path / f"{step}.pt")["w"] == value)


def test_a_new_shape_gets_a_new_buffer(tmp_path):
    writer = ckpt.AsyncCheckpointer()
    writer.save({"format": ckpt.FORMAT, "w": torch.ones(3)}, tmp_path / "a.pt")
    writer.save({"format": ckpt.FORMAT, "w": torch.full((2, 4), 2.0)}, tmp_path / "b.pt")
    writer.close()
    assert torch.equal(ckpt.load(tmp_path / "a.pt")["w"], torch.ones(3))
    assert torch.equal(ckpt.load(tmp_path / "b.pt")["w"], torch.full((2, 4), 2.0))


def test_best_is_the_last_file_of_its_epoch_and_survives_later_saves(tmp_path):
    writer = ckpt.AsyncCheckpointer()
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    writer.save({"format": ckpt.FORMAT, "epoch": 1}, last, best)
    writer.wait()
    assert os.path.samefile(last, best)
    writer.save({"format": ckpt.FORMAT, "epoch": 2}, last)
    writer.close()
    assert ckpt.load(best)["epoch"] == 1 and ckpt.load(last)["epoch"] == 2


def test_close_ends_the_writer_thread(tmp_path):
    writer = ckpt.AsyncCheckpointer()
    writer.save({"format": ckpt.FORMAT, "x": torch.ones(2)}, tmp_path / "last.pt")
    thread = next(t for t in threading.enumerate() if t is writer._thread)
    writer.close()
    assert not thread.is_alive()
    assert ckpt.load(tmp_path / "last.pt")["x"].sum() == 2


def test_an_unsupported_value_is_named(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        ckpt.save_atomic({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "last.pt")
    with pytest.raises(TypeError, match="set"):
        ckpt.save_atomic({"s": {1, 2}}, tmp_path / "last.pt")


def test_tensors_off_the_cpu_are_staged_into_the_same_bytes():
    # The staging path serves GPU tensors; its bytes must equal the direct CPU path's.
    state = sample_state()
    tensors: list[torch.Tensor] = []
    ckpt._pack(state, tensors)
    direct = ckpt.Serializer()
    header, data = direct.buffers(state)
    staged = ckpt.Serializer()
    staged._layout = ckpt._Layout(tensors)
    assert bytes(staged._staged(tensors)) == b"".join(bytes(chunk) for chunk in data)


@pytest.mark.gpu
def test_a_state_on_the_gpu_round_trips(tmp_path):
    state = {"format": ckpt.FORMAT, "w": torch.randn(4, 3, device="cuda"), "n": torch.tensor(3)}
    expected = state["w"].cpu()
    writer = ckpt.AsyncCheckpointer()
    writer.save(state, tmp_path / "last.pt")
    state["w"].add_(1.0)  # after the save: must not reach the file
    writer.close()
    loaded = ckpt.load(tmp_path / "last.pt")
    assert torch.equal(loaded["w"], expected) and loaded["n"].item() == 3


def test_a_small_checkpoint_keeps_the_file_it_replaces_and_the_next_save_reuses_it(tmp_path):
    last = tmp_path / "last.pt"
    for epoch in (1, 2):
        ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": epoch, "w": torch.ones(64)}, last)
    spare = ckpt.spare_path(last)
    assert ckpt.load(spare)["epoch"] == 1  # the replaced file, kept whole
    reused = spare.stat().st_ino
    ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": 3, "w": torch.ones(64)}, last)
    assert last.stat().st_ino == reused and ckpt.load(last)["epoch"] == 3
    assert ckpt.load(spare)["epoch"] == 2


def test_a_save_never_overwrites_the_file_best_points_at(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": 1}, last, best)
    for epoch in (2, 3, 4):  # the file best.pt links becomes the spare; it must stay intact
        ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": epoch}, last)
    assert ckpt.load(best)["epoch"] == 1 and ckpt.load(last)["epoch"] == 4


def test_a_checkpoint_over_the_reuse_limit_keeps_no_spare(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "REUSE_MAX_BYTES", 16)
    last = tmp_path / "last.pt"
    for epoch in (1, 2, 3):
        ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": epoch, "w": torch.ones(64)}, last)
    assert not ckpt.spare_path(last).exists() and ckpt.load(last)["epoch"] == 3


def test_without_hard_links_saves_still_succeed(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(ckpt.os, "link", refuse)  # as on filesystems without hard links
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    for epoch in (1, 2, 3):
        ckpt.save_atomic(
            {"format": ckpt.FORMAT, "epoch": epoch}, last, best if epoch == 2 else None
        )
    assert ckpt.load(last)["epoch"] == 3 and ckpt.load(best)["epoch"] == 2  # best was copied


def test_a_torch_save_file_from_an_older_version_is_named_as_such(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(ckpt.CheckpointError, match="another version of this engine.*torch.save"):
        ckpt.load(path)


# --------------------------------------------------------------------------------------------
# Hostile files: refused from their header, without allocating what it claims.


def rewrite_header(path, change):
    """Apply ``change`` to the parsed header of the checkpoint at ``path``; keep its data (so
    the CRC still matches)."""
    header, data, _ = parse_by_the_documented_layout(path)
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def entry_of(header, shape):
    return header[next(k for k, v in header.items() if k != "__metadata__" and v["shape"] == shape)]


def set_skeleton_reference(header):
    skeleton = json.loads(header["__metadata__"]["skeleton"])
    skeleton["d"].append(["ghost", {"t": 999}])
    header["__metadata__"]["skeleton"] = json.dumps(skeleton)


def shift(spec, by):
    spec["data_offsets"] = [spec["data_offsets"][0] + by, spec["data_offsets"][1] + by]


HEADER_DAMAGE = {
    "unknown dtype": (lambda h: entry_of(h, [3, 5]).update(dtype="C64"), "unknown dtype 'C64'"),
    "negative dim": (lambda h: entry_of(h, [3, 5]).update(shape=[-3, -5]), "non-negative"),
    "shape not ints": (lambda h: entry_of(h, [3, 5]).update(shape=[3.0, 5]), "non-negative"),
    "size mismatch": (lambda h: entry_of(h, [3, 5]).update(shape=[3, 6]), "shape \\[3, 6\\]"),
    "range past the data": (lambda h: shift(entry_of(h, [3, 5]), 10**12), "truncated"),
    "overlap": (lambda h: shift(entry_of(h, [3, 5]), 4), "gap or overlap"),
    "missing tensor": (set_skeleton_reference, "tensor 999"),
}


class Allocated(BaseException):
    """Raised by a patched torch.empty: load allocated memory before refusing a file."""


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
def test_a_damaged_header_is_refused_before_any_tensor_memory_is_allocated(
    tmp_path, monkeypatch, damage
):
    change, reason = HEADER_DAMAGE[damage]
    path = tmp_path / "last.pt"
    ckpt.save_atomic(sample_state(), path)
    rewrite_header(path, change)

    def refuse(*args, **kwargs):
        raise Allocated

    monkeypatch.setattr(ckpt.torch, "empty", refuse)
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {path} is corrupt.*{reason}"):
        ckpt.load(path)


# The reader of a hostile file must stay within this much of a process that only imported it.
RSS_MARGIN_KIB = 100 * 1024
APPARENT_SIZE = 1_500_000_000

PEAK_RSS = """
import resource, sys
from engine import checkpoint as ckpt
if len(sys.argv) > 1:
    try:
        ckpt.load(sys.argv[1])
        print("loaded")
    except ckpt.CheckpointError as err:
        print(err)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


def peak_rss_kib(*args):
    from conftest import REPO

    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    *message, peak = done.stdout.strip().splitlines()
    return "\n".join(message), int(peak)


@pytest.fixture(scope="module")
def import_only_rss():
    return peak_rss_kib()[1]


def huge_header_length(f):
    f.write((APPARENT_SIZE - 4096).to_bytes(8, "little"))
    f.write(b'{"__metadata__": {"format": "engine-checkpoint-v3"')


def consistent_header_of_a_huge_tensor(f):
    skeleton = {"d": [["model", {"d": [["w", {"t": 0}]]}]]}
    metadata = {"format": ckpt.FORMAT, "skeleton": json.dumps(skeleton), "crc32": "12345"}
    n = APPARENT_SIZE // 4
    header = {
        "__metadata__": metadata,
        "0": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
    }
    text = json.dumps(header).encode()
    f.write(len(text).to_bytes(8, "little") + text)
    return 8 + len(text) + 4 * n


@pytest.mark.parametrize(
    "make, reason",
    [
        (huge_header_length, "header length .* exceeds the limit"),
        (consistent_header_of_a_huge_tensor, "does not match its CRC-32"),
    ],
)
def test_a_sparse_file_of_huge_apparent_size_is_refused_in_little_memory(
    tmp_path, import_only_rss, make, reason
):
    path = tmp_path / "hostile.pt"
    with open(path, "wb") as f:
        f.truncate(make(f) or APPARENT_SIZE)
    if path.stat().st_blocks * 512 > 2**20:
        pytest.skip("this filesystem does not keep sparse files sparse")
    message, peak = peak_rss_kib(path)
    assert peak - import_only_rss < RSS_MARGIN_KIB, f"peak RSS {peak} KiB, {import_only_rss} idle"
    assert re.search(f"checkpoint {re.escape(str(path))} is corrupt.*{reason}", message), message


# --------------------------------------------------------------------------------------------
# trainer.init_from: which file a setting names, and refusals of what is not a checkpoint.


def test_init_from_a_run_dir_takes_its_best_checkpoint_else_its_last(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.ones(2)}}, folder / "last.pt")
    assert ckpt.init_source(str(tmp_path / "run")) == folder / "last.pt"
    ckpt.save_atomic({"format": ckpt.FORMAT, "model": {"w": torch.zeros(2)}}, folder / "best.pt")
    path, weights = ckpt.load_model_weights(str(tmp_path / "run"))
    assert path == folder / "best.pt" and torch.equal(weights["w"], torch.zeros(2))
    assert ckpt.init_source(str(folder / "last.pt")) == folder / "last.pt"


def test_init_from_refuses_what_is_not_a_checkpoint_and_names_it(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="trainer.init_from=.*no checkpoint or run dir"):
        ckpt.load_model_weights(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="has no checkpoints/best.pt or .*/last.pt"):
        ckpt.load_model_weights(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="notes.txt is corrupt.*trainer.init_from=<"):
        ckpt.load_model_weights(str(tmp_path / "notes.txt"))
    ckpt.save_atomic({"format": ckpt.FORMAT, "epoch": 1}, tmp_path / "no_model.pt")
    with pytest.raises(ckpt.CheckpointError, match="no_model.pt has no model weights"):
        ckpt.load_model_weights(str(tmp_path / "no_model.pt"))
