"""Fuzz the safetensors header parser: whatever the bytes, one-line ``UserError`` or data.

Checkpoints come from the internet, so ``SafetensorsFile`` must turn every malformed
file into one ``error:`` line: never another exception (a crash), a hang or an
allocation beyond the file's size. Hypothesis generates four kinds of input: raw bytes,
a header length followed by bytes, well-formed JSON headers with wrong values (huge or
negative shapes, overlapping or out-of-file offsets, unknown dtypes, non-UTF-8 and
unpaired-surrogate names, shape/dtype/size mismatches, a header length beyond the file)
and byte-level mutations of a valid file.

The cases found are kept in ``tests/corpus/safetensors/`` and replayed on every run.
A longer run (it also saves what it finds there)::

    python tests/test_safetensors_fuzz.py --seconds 600
    python tests/test_safetensors_fuzz.py --seconds 600 --atheris   # coverage-guided

``--atheris`` needs ``pip install atheris`` (not a test dependency: CI replays the corpus
and runs hypothesis); it starts from the corpus and follows the parser's coverage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlc_edge.checkpoint.safetensors_file import SafetensorsFile
from mlc_edge.errors import UserError

CORPUS = Path(__file__).parent / "corpus" / "safetensors"
# Far above what parsing a file of a few KB needs; far below a "multi-GB allocation".
MAX_PEAK_BYTES = 16 * 2**20
EXAMPLES = int(os.environ.get("MLC_EDGE_FUZZ_EXAMPLES", "150"))

DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "I64", "I32", "I8", "U8", "BOOL"]


def problem(data: bytes, path: Path) -> str | None:
    """What is wrong with how the parser handles ``data``, or None if all is well."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with SafetensorsFile(path) as f:
            for name in f.names():
                try:
                    arr = f.load(name)
                except UserError as e:
                    if bad := _bad_message(e):
                        return bad
                    continue
                if arr.nbytes > len(data) * 4:  # bf16 widens to f32: at most 2x
                    return f"{name!r}: {arr.nbytes} bytes from a {len(data)}-byte file"
    except UserError as e:
        return _bad_message(e)
    except BaseException as e:  # noqa: BLE001 - anything else is the bug we look for
        return f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if peak > MAX_PEAK_BYTES:
        return f"peak allocation {peak} bytes"
    return None


def _bad_message(err: UserError) -> str | None:
    msg = str(err)
    if "\n" in msg or "\r" in msg or not msg.strip():
        return f"not one line: {msg[:200]!r}"
    try:
        msg.encode("utf-8")
    except UnicodeEncodeError:
        return f"unprintable: {msg[:200]!r}"
    if len(msg) > 1000:
        return f"a {len(msg)}-character line"
    return None


def frame(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def valid_file() -> bytes:
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
        "__metadata__": {"format": "pt"},
    }
    return frame(json.dumps(header).encode(), bytes(range(32)))


# -- strategies -----------------------------------------------------------------------

ints = st.one_of(
    st.integers(-3, 64),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30]),
)
names = st.one_of(
    st.text(max_size=12),
    # unpaired surrogates and control characters survive json.dumps as \\u escapes
    st.text(
        st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=6
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(DTYPES), st.text(max_size=6), json_values),
        "shape": st.one_of(
            st.lists(ints, max_size=5), json_values, st.lists(st.just(1), min_size=60, max_size=80)
        ),
        "data_offsets": st.one_of(
            st.lists(ints, min_size=2, max_size=2),
            st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list),
            json_values,
        ),
    },
)
headers = st.dictionaries(names, st.one_of(entries, json_values), max_size=4)


@st.composite
def structured(draw) -> bytes:
    header = draw(headers)
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header, ensure_ascii=draw(st.booleans()), allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )
    if draw(st.booleans()):  # a raw non-UTF-8 byte inside the header
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    length = draw(
        st.one_of(
            st.none(),
            st.integers(0, len(raw) + 16),
            st.sampled_from([2**63, 2**64 - 1, 100 * 2**20, 100 * 2**20 + 1]),
        )
    )
    return frame(raw, draw(st.binary(max_size=96)), length)


@st.composite
def length_then_bytes(draw) -> bytes:
    body = draw(st.binary(max_size=256))
    length = draw(st.one_of(st.integers(0, len(body) + 8), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + body


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(valid_file())
    for _ in range(draw(st.integers(1, 4))):
        op, at = draw(st.sampled_from("fidt")), draw(st.integers(0, len(data)))
        if op == "f" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "i":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "d":
            del data[at : at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


nested = st.integers(1, 100_000).map(lambda n: frame(b"[" * n + b"]" * n))

INPUTS = {
    "raw bytes": st.binary(max_size=512),
    "header length then bytes": length_then_bytes(),
    "structured header": structured(),
    "mutated valid file": mutated(),
    "deeply nested JSON": nested,
}


# -- tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", INPUTS)
def test_fuzzed_files_end_in_one_line(kind, tmp_path):
    @settings(
        max_examples=EXAMPLES,
        deadline=5000,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(INPUTS[kind])
    def check(data: bytes) -> None:
        assert problem(data, tmp_path / "x.safetensors") is None, data[:200]

    check()


def test_a_valid_file_still_loads(tmp_path):
    assert problem(valid_file(), tmp_path / "x.safetensors") is None
    path = tmp_path / "ok.safetensors"
    path.write_bytes(valid_file())
    with SafetensorsFile(path) as f:
        assert f.load("a").shape == (2, 3) and f.load("b").dtype.name == "float32"


CORPUS_FILES = sorted(CORPUS.glob("*.safetensors"))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_corpus_case(path, tmp_path):
    """Each case the fuzzer (or a person) found: a one-line UserError, nothing else."""
    data = path.read_bytes()
    assert problem(data, tmp_path / "x.safetensors") is None
    with pytest.raises(UserError):
        with SafetensorsFile(tmp_path / "x.safetensors") as f:
            for name in f.names():
                f.load(name)


def test_the_corpus_is_there():
    assert len(CORPUS_FILES) >= 10


# -- a longer run: python tests/test_safetensors_fuzz.py --seconds N ---------------------


def _recorder(strategy, kind: str, counts: dict[str, int], found: dict[str, bytes], path: Path):
    @settings(
        max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(strategy)
    def record(data: bytes) -> None:
        counts[kind] += 1
        why = problem(data, path)
        if why is not None:
            found.setdefault(why.split(":")[0], data)

    return record


def _long_run(seconds: float) -> None:
    found: dict[str, bytes] = {}
    counts = dict.fromkeys(INPUTS, 0)
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        while time.monotonic() < deadline:
            for kind, strategy in INPUTS.items():
                _recorder(strategy, kind, counts, found, path)()
    total = sum(counts.values())
    print(f"{total} inputs in {seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    CORPUS.mkdir(parents=True, exist_ok=True)
    for why, data in found.items():
        name = f"found-{hashlib.sha1(data).hexdigest()[:10]}.safetensors"
        (CORPUS / name).write_bytes(data)
        print(f"found: {why} -> {name}")
    print(f"{len(found)} kinds of failure found")


def _atheris_run(seconds: float) -> None:
    import atheris

    atheris.instrument_all()  # the parser (already imported) reports its coverage
    found: dict[str, bytes] = {}
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / "x.safetensors"
    seeds = Path(tmp.name) / "seeds"
    seeds.mkdir()
    for case in CORPUS.glob("*.safetensors"):
        shutil.copy(case, seeds / case.name)
    (seeds / "valid.safetensors").write_bytes(valid_file())

    def one_input(data: bytes) -> None:
        why = problem(data, path)
        if why is not None and why.split(":")[0] not in found:
            found[why.split(":")[0]] = data  # libFuzzer exits without atexit: save now
            name = f"found-{hashlib.sha1(data).hexdigest()[:10]}.safetensors"
            (CORPUS / name).write_bytes(data)
            print(f"found: {why} -> {name}", flush=True)

    # libFuzzer prints the number of inputs run ("Done N runs in S second(s)").
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={int(seconds)}",
            "-rss_limit_mb=4096",
            "-max_len=4096",
            str(seeds),
        ],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (atheris)")
    args = parser.parse_args()
    if args.atheris:
        _atheris_run(args.seconds)
    else:
        _long_run(args.seconds)
    sys.exit(0)
