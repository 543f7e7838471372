import pytest

from modelcache.digest import Digest
from modelcache.errors import InvalidInput
from modelcache.server.blobs.ranges import ByteRange, Unsatisfiable, parse_range

HEX = "a" * 64


@pytest.mark.parametrize("text", [
    f"sha256:{HEX.upper()}", f"sha256:{HEX[:-1]}", f"sha256:{HEX}0", f"sha512:{HEX}", HEX, "",
    f"sha256:{HEX}\n", f" sha256:{HEX}", f"sha256:../{HEX[3:]}",
])
def test_digest_rejects_everything_but_sha256_lowercase_hex(text):
    with pytest.raises(InvalidInput, match="invalid digest"):
        Digest.parse(text)


def test_digest_round_trips():
    d = Digest.parse(f"sha256:{HEX}")
    assert str(d) == f"sha256:{HEX}" and d.hex == HEX and d == Digest.from_hex(HEX)


@pytest.mark.parametrize("header,expected", [
    ("bytes=500-1499", ByteRange(500, 1499)),
    ("bytes=500-", ByteRange(500, 2047)),
    ("bytes=-500", ByteRange(1548, 2047)),
    ("bytes=2000-5000", ByteRange(2000, 2047)),
    ("bytes=-5000", ByteRange(0, 2047)),
    ("bytes=0-0", ByteRange(0, 0)),
    (None, None),
    ("bytes=0-1,5-6", None),  # multi-range: whole body, never 416
    ("items=0-5", None),
    ("bytes=abc", None),
    ("bytes=-", None),
])
def test_parse_range(header, expected):
    assert parse_range(header, 2048) == expected


@pytest.mark.parametrize("header", ["bytes=500-0", "bytes=5000-10000", "bytes=2048-", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(Unsatisfiable):
        parse_range(header, 2048)
